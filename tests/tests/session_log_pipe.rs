//! A session log nobody reads holds up none of the measuring: the log's
//! writer runs off the ring readers' path. Userspace only: the kernel matrix
//! leaves it to the host.
use std::{
    ffi::CString,
    net::UdpSocket,
    os::unix::ffi::OsStrExt,
    time::{Duration, Instant},
};

use observer_tests::{NetNs, ObserverProcess, TempDir, concern_hooked, scaled};

/// `--session-log` pointed at a pipe nobody reads, while 10,000 sessions a
/// second end for 10 seconds (one-datagram connected UDP sockets): the log's
/// writer blocks for good once the pipe is full, and the ring readers go on
/// without it. Every session is in the metrics; the lines that could not be
/// written are counted (`session_log_line`).
#[test]
fn a_session_log_nobody_reads_loses_lines_not_sessions() {
    const RATE: usize = 10_000;
    const SECONDS: usize = 10;
    const SESSIONS: usize = RATE * SECONDS;
    // UDP sessions need a hook for every send call and the socket's release.
    for concern in ["sock_calls", "udp_release"] {
        if !concern_hooked(concern).unwrap() {
            eprintln!("skipped: no {concern} hook in this tier, so no UDP sessions");
            return;
        }
    }
    let ns = NetNs::new("logpipe").unwrap();
    let tmp = TempDir::new("logpipe").unwrap();
    let fifo = tmp.path().join("sessions.fifo");
    let path = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; the read end is opened (non-blocking, so
    // the open does not wait for a writer) and kept open, never read, so the
    // observer's open for writing succeeds and its writes fill the pipe.
    let read_end = unsafe {
        assert_eq!(libc::mkfifo(path.as_ptr(), 0o600), 0);
        libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK)
    };
    assert!(read_end >= 0);
    let mut observer =
        ObserverProcess::start(&ns, &["--iface", "lo", "--session-log", fifo.to_str().unwrap()]).unwrap();
    let started = Instant::now();
    let took = ns.run(|| {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = peer.local_addr().unwrap();
        let start = Instant::now();
        for i in 0..SESSIONS {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(to).unwrap();
            s.send(b"one").unwrap();
            // Paced: `RATE` a second.
            if i % 100 == 99 {
                let due = start + Duration::from_secs_f64((i + 1) as f64 / RATE as f64);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
        start.elapsed()
    });
    eprintln!("{SESSIONS} sessions in {took:?}");
    let sessions = |m: &observer_tests::Metrics| m.value("observer_sessions_total", &[("protocol", "udp")]);
    let m = observer.scrape_until("every session in the metrics", scaled(Duration::from_secs(30)), |m| {
        sessions(m) >= Some(SESSIONS as f64)
    });
    assert_eq!(sessions(&m), Some(SESSIONS as f64));
    let lost = m.value_exact("observer_events_lost_total", &[("source", "session_log_line")]).unwrap();
    eprintln!("session log lines lost: {lost} of {SESSIONS}, in {:?}", started.elapsed());
    // What the pipe (64 KiB, about 300 lines) and the writer's queue (32,768
    // lines) hold is not lost (yet); everything else is, and counted.
    assert!(lost >= (SESSIONS - 32_768 - 1_000) as f64 && lost <= SESSIONS as f64, "{lost}");
    for source in ["session_ring_full", "udp_release_ring_full", "session_record_malformed"] {
        assert_eq!(m.value_exact("observer_events_lost_total", &[("source", source)]), Some(0.0), "{source}");
    }
    // SAFETY: our descriptor, closed once.
    unsafe { libc::close(read_end) };
}
