//! `--session-log`: one JSON line per reported session, for looking at
//! individual sessions (the metrics only hold aggregates).
//!
//! The lines are written on a thread of their own, never by the ring readers:
//! a slow disk, a full pipe or a stopped terminal must not hold up the
//! readers, whose rings would overflow and lose sessions meanwhile. The
//! readers hand each line over through a bounded queue; a line that finds it
//! full is dropped and counted (`observer_events_lost_total{source=
//! "session_log_line"}`), as is one the writer fails to write. The metrics
//! never depend on the log.
use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread,
    time::Duration,
};

use crate::session::Session;

/// Lines waiting for the writer: about 10 MB of lines at most, and a second
/// of the heaviest session rates measured, so a stall of the writer shorter
/// than that loses nothing.
const QUEUE_LINES: usize = 32_768;

/// How long the end of `run` waits for the writer to write what is queued.
const FINISH_WAIT: Duration = Duration::from_secs(2);

pub struct SessionLog {
    lines: Option<SyncSender<String>>,
    /// Lines dropped (queue full) or not written (write failed), not yet
    /// taken by `take_lost`.
    lost: Arc<AtomicU64>,
    /// Closed by the writer thread when it has written everything and ends.
    finished: Receiver<()>,
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
        Self::start(out, QUEUE_LINES)
    }

    /// Starts the writer thread for `out`, with room for `queue` lines.
    fn start(out: Box<dyn Write + Send>, queue: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(queue);
        let (done_tx, finished) = mpsc::channel();
        let lost = Arc::new(AtomicU64::new(0));
        let writer_lost = lost.clone();
        thread::Builder::new().name("session-log".into()).spawn(move || {
            // Started before the programs are attached: give up what the
            // main thread holds now, which a writer of lines never needs.
            crate::kernel::privileges::drop_in_this_thread();
            write_lines(out, &rx, &writer_lost);
            drop(done_tx);
        })?;
        Ok(Self { lines: Some(tx), lost, finished })
    }

    /// One session with its session labels (`names[i]` = `values[i]`): queued
    /// for the writer, or counted as lost if its queue is full. Never waits.
    pub fn write(&self, s: &Session, names: &[&str], values: &[String]) {
        let line = to_json(s, names, values) + "\n";
        let Some(lines) = &self.lines else { return };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = lines.try_send(line) {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines lost since the last call.
    pub fn take_lost(&self) -> u64 {
        self.lost.swap(0, Ordering::Relaxed)
    }

    /// No more lines: lets the writer write what is queued and waits for it,
    /// at most `wait`. A writer blocked for good (a pipe nobody reads) is
    /// left behind, and ends with the process. Returns whether it finished.
    pub fn close(mut self, wait: Duration) -> bool {
        self.finish(wait)
    }

    fn finish(&mut self, wait: Duration) -> bool {
        let Some(lines) = self.lines.take() else { return true };
        // The writer ends once its queue is empty and has no sender.
        drop(lines);
        self.finished.recv_timeout(wait) == Err(RecvTimeoutError::Disconnected)
    }
}

impl Drop for SessionLog {
    /// As `close`, waiting at most `FINISH_WAIT`.
    fn drop(&mut self) {
        self.finish(FINISH_WAIT);
    }
}

/// The writer thread: writes lines as they come, flushing whenever the queue
/// is empty (so a line reaches the file at once when sessions are few, and in
/// batches when they are many), until the queue's sender is dropped.
fn write_lines(mut out: Box<dyn Write + Send>, lines: &Receiver<String>, lost: &AtomicU64) {
    let mut failed = false;
    while let Ok(line) = lines.recv() {
        let mut written = 0u64;
        let mut next = Some(line);
        while let Some(line) = next.take() {
            match out.write_all(line.as_bytes()) {
                Ok(()) => written += 1,
                Err(e) => report_failure(&mut failed, lost, 1, &e),
            }
            next = lines.try_recv().ok();
        }
        if let Err(e) = out.flush() {
            // What the buffer held is lost with the error.
            report_failure(&mut failed, lost, written, &e);
        }
    }
}

/// Counts `lines` lost to a failed write; says so in the log the first time.
fn report_failure(failed: &mut bool, lost: &AtomicU64, lines: u64, e: &io::Error) {
    if !*failed {
        tracing::error!(
            error = %e,
            "cannot write the session log; metrics continue, lost lines count in observer_events_lost_total{{source=\"session_log_line\"}}"
        );
        *failed = true;
    }
    lost.fetch_add(lines, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};

    use super::*;
    use crate::session::Protocol;

    fn session() -> Session {
        Session {
            protocol: Protocol::Tcp,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.2:80".parse().unwrap(),
            bytes_transmitted: 1,
            bytes_received: 2,
            lifetime: None,
            active_transmit: None,
            active_receive: None,
            owner: None,
            netns_ino: 0,
            rx_ifindex: 0,
            tx_ifindex: 0,
            retransmits: 0,
        }
    }

    /// A writer that blocks until released, like a pipe nobody reads.
    #[derive(Clone, Default)]
    struct Stuck(Arc<(Mutex<bool>, Condvar)>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (released, wake) = &*self.0;
            let _unused = wake.wait_while(released.lock().unwrap(), |r| !*r).unwrap();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_writer_that_never_returns_holds_up_nobody_and_its_lines_are_counted() {
        let stuck = Stuck::default();
        let log = SessionLog::start(Box::new(stuck.clone()), 4).unwrap();
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            log.write(&session(), &[], &[]);
        }
        assert!(started.elapsed() < Duration::from_secs(1), "writes never wait for the writer");
        // One line in the writer's hands, four queued: the rest are lost.
        let lost = log.take_lost();
        assert!((995..=996).contains(&lost), "{lost}");
        assert_eq!(log.take_lost(), 0, "taken once");
        *stuck.0.0.lock().unwrap() = true;
        stuck.0.1.notify_all();
    }

    #[test]
    fn close_waits_for_the_queued_lines() {
        #[derive(Clone, Default)]
        struct Slow(Arc<Mutex<usize>>);
        impl Write for Slow {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                thread::sleep(Duration::from_millis(1));
                *self.0.lock().unwrap() += 1;
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let slow = Slow::default();
        let log = SessionLog::start(Box::new(slow.clone()), 1000).unwrap();
        for _ in 0..100 {
            log.write(&session(), &[], &[]);
        }
        assert!(log.close(Duration::from_secs(10)), "finished");
        assert_eq!(*slow.0.lock().unwrap(), 100, "every queued line written");
    }

    #[test]
    fn failed_writes_are_counted() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk gone"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let log = SessionLog::start(Box::new(Broken), 16).unwrap();
        for _ in 0..3 {
            log.write(&session(), &[], &[]);
        }
        let lost = log.lost.clone();
        drop(log);
        assert_eq!(lost.load(Ordering::Relaxed), 3);
    }
}
