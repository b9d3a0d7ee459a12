//! Reading the observer's `--session-log` (one JSON object per reported
//! session), to check individual sessions against what the test did.
use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// One line of the session log.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedSession {
    /// `tcp` or `udp`.
    pub protocol: String,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub bytes_received: u64,
    pub bytes_transmitted: u64,
    /// `None` for sessions adopted mid-life.
    pub lifetime: Option<Duration>,
    /// Time during which data moved out / in; `None` when not measured.
    pub active_transmit: Option<Duration>,
    pub active_receive: Option<Duration>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

pub fn read_session_log(path: &Path) -> Result<Vec<ObservedSession>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines().filter(|l| !l.trim().is_empty()).map(parse_line).collect()
}

fn parse_line(line: &str) -> Result<ObservedSession> {
    let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("session log line {line:?}"))?;
    let addr = |k: &str| -> Result<SocketAddr> {
        v[k].as_str()
            .with_context(|| format!("{k} missing in {line}"))?
            .parse()
            .with_context(|| format!("{k} in {line}"))
    };
    let num = |k: &str| v[k].as_u64().with_context(|| format!("{k} missing in {line}"));
    Ok(ObservedSession {
        protocol: v["protocol"].as_str().with_context(|| format!("protocol missing in {line}"))?.to_owned(),
        local: addr("local")?,
        remote: addr("remote")?,
        bytes_received: num("bytes_received")?,
        bytes_transmitted: num("bytes_transmitted")?,
        lifetime: v["lifetime_seconds"].as_f64().map(Duration::from_secs_f64),
        active_transmit: v["active_transmit_seconds"].as_f64().map(Duration::from_secs_f64),
        active_receive: v["active_receive_seconds"].as_f64().map(Duration::from_secs_f64),
        pid: v["pid"].as_u64().map(|p| p as u32),
        comm: v["comm"].as_str().map(str::to_owned),
    })
}

/// Waits until the log holds at least `n` sessions that satisfy `pred`.
pub fn wait_sessions(
    path: &Path,
    n: usize,
    timeout: Duration,
    pred: impl Fn(&ObservedSession) -> bool,
) -> Result<Vec<ObservedSession>> {
    let deadline = Instant::now() + timeout;
    loop {
        let found: Vec<_> = read_session_log(path).unwrap_or_default().into_iter().filter(&pred).collect();
        if found.len() >= n {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            bail!("{} of {n} expected sessions in {} after {timeout:?}", found.len(), path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The one session whose local address is `local`.
pub fn by_local(sessions: &[ObservedSession], local: SocketAddr) -> Result<&ObservedSession> {
    let mut it = sessions.iter().filter(|s| s.local == local);
    match (it.next(), it.next()) {
        (Some(s), None) => Ok(s),
        (None, _) => bail!("no session with local address {local}"),
        (Some(_), Some(_)) => bail!("several sessions with local address {local}"),
    }
}

/// The one session from `local` to `remote` (a UDP socket has one per peer);
/// panics, listing the log, unless there is exactly one.
pub fn session_between(log: &[ObservedSession], local: SocketAddr, remote: SocketAddr) -> &ObservedSession {
    let found: Vec<_> = log.iter().filter(|s| s.local == local && s.remote == remote).collect();
    assert_eq!(found.len(), 1, "one session {local} -> {remote} in {log:#?}");
    found[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_observer_format() {
        let s = parse_line(r#"{"bytes_received":12345,"bytes_transmitted":2000000,"cgroup_id":1,"comm":"python3","lifetime_seconds":0.5,"local":"[::1]:40552","pid":20243,"protocol":"tcp","remote":"[::1]:5555","rx_ifindex":0,"tx_ifindex":1}"#).unwrap();
        assert_eq!(s.local, "[::1]:40552".parse().unwrap());
        assert_eq!(s.bytes_transmitted, 2_000_000);
        assert_eq!(s.lifetime, Some(Duration::from_millis(500)));
        assert_eq!(s.comm.as_deref(), Some("python3"));
        let adopted = parse_line(r#"{"bytes_received":0,"bytes_transmitted":0,"comm":null,"lifetime_seconds":null,"local":"127.0.0.1:1","pid":null,"protocol":"tcp","remote":"127.0.0.1:2"}"#).unwrap();
        assert_eq!(adopted.lifetime, None);
        assert!(parse_line("{}").is_err());
    }
}
