//! Kernel diagnostics (aya-log): with `--log-level debug` the programs log the
//! first time the open-session table is full, with its fields, in the
//! observer's own log; at the default level they are switched off at load and
//! log nothing, although the table fills the same way.
use std::{net::SocketAddr, time::Duration};

use observer_tests::{NetNs, ObserverProcess, TcpServer, transfer_in, wait_until};

/// Connections made against a one-entry session table: each of their ends
/// that finds it full is a `session_table_full` event.
const CONNECTIONS: usize = 20;

/// Runs the observer with a one-entry session table and `args`, makes
/// [`CONNECTIONS`] connections and waits until the table-full counter shows
/// them.
fn fill_the_session_table(name: &str, args: &[&str]) -> ObserverProcess {
    let ns = NetNs::new(name).unwrap();
    let mut all = vec!["--iface", "lo", "--max-sessions", "1"];
    all.extend_from_slice(args);
    let mut observer = ObserverProcess::start(&ns, &all).unwrap();
    let server = TcpServer::start_in(&ns, "127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
    for _ in 0..CONNECTIONS {
        transfer_in(&ns, server.addr(), 100, 100, None).unwrap();
    }
    observer.scrape_until("the session table full", Duration::from_secs(10), |m| {
        m.value_exact("observer_events_lost_total", &[("source", "session_table_full")]).unwrap_or(0.0)
            >= CONNECTIONS as f64
    });
    observer
}

/// The diagnostic lines of the table-full event in `log`.
fn table_full_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("kernel table full")).collect()
}

/// `key=<number>` in `line`.
fn field(line: &str, key: &str) -> Option<u32> {
    let rest = &line[line.find(&format!(" {key}="))? + key.len() + 2..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[test]
fn at_debug_level_a_full_session_table_is_logged_once_with_its_fields() {
    let observer = fill_the_session_table("kernel-log-debug", &["--log-level", "debug"]);
    // The observer copies the kernel's records as they come: read its log
    // again until the line is there.
    wait_until("the kernel's log line", Duration::from_secs(5), Duration::from_millis(100), || {
        Ok(Some(()).filter(|()| !table_full_lines(&observer.log()).is_empty()))
    })
    .unwrap();
    // The first time only, although every connection found the table full:
    // records of the later ones, were there any, would follow within this.
    std::thread::sleep(Duration::from_millis(500));
    let log = observer.log();
    let lines = table_full_lines(&log);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = lines[0];
    assert!(line.contains("DEBUG") && line.contains("observer_ebpf"), "level and target: {line}");
    assert!(line.contains("table=OPEN_SESSIONS"), "{line}");
    assert!(line.contains("source=\"session_table_full\""), "names its counter: {line}");
    // Ports of a real socket and a TCP state number (1 to 12). One port may
    // be 0: the local one at a connect's SYN_SENT, before the kernel picks
    // it; the remote one at an accepted child's SYN_RECV before 6.x, whose
    // state is set before its ports are copied from the request (6.1 does).
    let (local, remote, state) = (field(line, "local_port"), field(line, "remote_port"), field(line, "state"));
    assert!(local.zip(remote).is_some_and(|(l, r)| l > 0 || r > 0), "ports: {line}");
    assert!(state.is_some_and(|s| (1..=12).contains(&s)), "state: {line}");
}

#[test]
fn at_the_default_level_the_kernel_logs_nothing() {
    let observer = fill_the_session_table("kernel-log-info", &[]);
    // Longer than the debug run's line takes to arrive.
    std::thread::sleep(Duration::from_secs(1));
    let log = observer.log();
    assert!(table_full_lines(&log).is_empty(), "{log}");
    assert!(!log.contains("observer_ebpf"), "{log}");
}
