//! SIGTERM and SIGINT: exit 0 within a second, with every program and link of
//! ours gone from the kernel; during a burst of connections, within the
//! `--shutdown-timeout` budget and with the sessions queued at the signal
//! read and reported. Under emulation the time bounds are stretched
//! ([`scaled`]): detaching fentry programs alone takes about half a second.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use observer_tests::{
    NetNs, ObserverProcess, TcpServer, TempDir, kernel_programs_named, read_session_log, scaled, transfer,
    wait_no_kernel_objects,
};

fn stop_cleanly(signal: libc::c_int) {
    let ns = NetNs::new("shutdown").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo"]).unwrap();
    assert!(!kernel_programs_named("obs_").unwrap().is_empty(), "programs are loaded while running");
    let server = TcpServer::start_in(&ns, "127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
    let addr = server.addr();
    ns.run(|| transfer(addr, 100_000, 100_000, None).unwrap());
    let stopped = observer.stop_with(signal).unwrap();
    assert_eq!(stopped.status.code(), Some(0), "{}", observer.log());
    assert!(stopped.elapsed < scaled(Duration::from_secs(1)), "took {:?}", stopped.elapsed);
    wait_no_kernel_objects("obs_", scaled(Duration::from_secs(2))).unwrap();
}

#[test]
fn sigterm_detaches_everything_and_exits_zero() {
    stop_cleanly(libc::SIGTERM);
}

#[test]
fn sigint_detaches_everything_and_exits_zero() {
    stop_cleanly(libc::SIGINT);
}

/// The budget given to the observer; the test allows no more.
const BUDGET: Duration = Duration::from_secs(3);
const CLIENTS: usize = 4;

#[test]
fn sigterm_during_a_burst_reports_queued_sessions_and_exits_within_the_budget() {
    let ns = NetNs::new("shutdown-burst").unwrap();
    let tmp = TempDir::new("shutdown-burst").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let budget = scaled(BUDGET);
    let budget_arg = format!("{}s", budget.as_secs());
    let args = ["--iface", "lo", "--session-log", log.to_str().unwrap(), "--shutdown-timeout", &budget_arg];
    let mut observer = ObserverProcess::start(&ns, &[&args[..], &["--log-format", "json"]].concat()).unwrap();
    let server = Arc::new(TcpServer::start_in(&ns, "127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap());
    let addr = server.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, done) = (stop.clone(), done.clone());
            ns.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    done.lock().unwrap().push(transfer(addr, 1000, 1000, None).unwrap());
                }
            })
        })
        .collect();
    std::thread::sleep(scaled(Duration::from_millis(700)));

    let signalled = Instant::now();
    let stopped = observer.stop().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(stopped.status.code(), Some(0), "{}", observer.log());
    assert!(stopped.elapsed < budget, "took {:?}, budget {budget:?}", stopped.elapsed);
    wait_no_kernel_objects("obs_", scaled(Duration::from_secs(2))).unwrap();

    // A client socket is closed (and its record queued) before its read of
    // the server's FIN returns; 100 ms before the signal is ample for the
    // record to be queued, and it must then be reported, not dropped.
    let sessions = read_session_log(&log).unwrap();
    let before: Vec<_> = done
        .lock()
        .unwrap()
        .iter()
        .filter(|t| t.finished + scaled(Duration::from_millis(100)) < signalled)
        .copied()
        .collect();
    assert!(before.len() >= 100, "the burst ran: {} transfers", before.len());
    let missing: Vec<_> = before.iter().filter(|t| !sessions.iter().any(|s| s.local == t.local)).collect();
    assert!(missing.is_empty(), "{} of {} sessions not reported: {missing:?}", missing.len(), before.len());

    // --log-format json: every line on stderr is a JSON object (stdout's
    // one line, the address banner, shares the file).
    let text = observer.log();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.starts_with("observer: serving metrics on"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["fields"]["message"] == "stopped; kernel programs detached, queued sessions read"),
        "{text}"
    );
}
