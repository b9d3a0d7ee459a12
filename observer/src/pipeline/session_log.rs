//! `--session-log`: one JSON line per reported session, for looking at
//! individual sessions (the metrics only hold aggregates).
use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::Path,
};

use crate::session::Session;

pub struct SessionLog {
    out: Box<dyn Write + Send>,
    failed: bool,
}

impl SessionLog {
    /// `-` writes to standard output; anything else is a file, appended to.
    pub fn open(path: &Path) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(io::stdout())
        } else {
            let file: File = OpenOptions::new().create(true).append(true).open(path)?;
            Box::new(BufWriter::new(file))
        };
        Ok(Self { out, failed: false })
    }

    /// One session with its session labels (`names[i]` = `values[i]`).
    pub fn write(&mut self, s: &Session, names: &[&str], values: &[String]) {
        let line = to_json(s, names, values) + "\n";
        let result = self.out.write_all(line.as_bytes()).and_then(|()| self.out.flush());
        if let Err(e) = result {
            // Say it once; the metrics do not depend on the log.
            if !self.failed {
                tracing::error!(error = %e, "cannot write the session log; metrics continue");
                self.failed = true;
            }
        }
    }
}

pub fn to_json(s: &Session, names: &[&str], values: &[String]) -> String {
    let labels: serde_json::Map<String, serde_json::Value> =
        names.iter().zip(values).map(|(n, v)| (n.to_string(), v.as_str().into())).collect();
    serde_json::json!({
        "protocol": s.protocol.as_str(),
        "local": s.local.to_string(),
        "remote": s.remote.to_string(),
        "bytes_received": s.bytes_received,
        "bytes_transmitted": s.bytes_transmitted,
        "lifetime_seconds": s.lifetime.map(|d| d.as_secs_f64()),
        "active_transmit_seconds": s.active_transmit.map(|d| d.as_secs_f64()),
        "active_receive_seconds": s.active_receive.map(|d| d.as_secs_f64()),
        "pid": s.owner.as_ref().map(|o| o.pid),
        "comm": s.owner.as_ref().map(|o| o.comm.as_str()),
        "cgroup_id": s.owner.as_ref().map(|o| o.cgroup_id),
        "rx_ifindex": s.rx_ifindex,
        "tx_ifindex": s.tx_ifindex,
        "retransmits": s.retransmits,
        "labels": labels,
    })
    .to_string()
}
