//! `--disable`: a switched-off concern loads no program (the kernel's own
//! program list says so), `observer_probe_info` shows it with
//! `hook="disabled"`, its metrics are absent, `observer check` given the same
//! flag says what `run` did, and what stays on measures as exactly as ever.
use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use observer_tests::{
    Metrics, NetNs, ObserverProcess, TcpServer, TempDir, by_local, forced_probes, kernel_programs_named,
    run_observer_cli, scaled, transfer, wait_no_kernel_objects, wait_sessions,
};

/// The programs of each concern a test switches off, in every tier (names as
/// the kernel lists them: at most 15 bytes, which these all fit). The
/// per-call programs of `sock_calls`:
const SOCK_CALLS_PROGRAMS: [&str; 10] = [
    "obs_send",
    "obs_recv",
    "obs_send_fx4",
    "obs_send_fx6",
    "obs_recv_fx4",
    "obs_recv_fx6",
    "obs_call_kp",
    "obs_send_kret",
    "obs_recv_kret",
    "obs_rbuf_kp",
];
/// `sock_calls`' UDP peer hooks, loaded only where UDP flows are measured.
const UDP_PEER_PROGRAMS: [&str; 4] = ["obs_sendmsg4", "obs_sendmsg6", "obs_recvmsg4", "obs_recvmsg6"];
const UDP_RELEASE_PROGRAMS: [&str; 3] = ["obs_release_fe", "obs_release_cg", "obs_release_kp"];
const DROPS_PROGRAMS: [&str; 1] = ["obs_kfree_skb"];

const TCP_BYTES: (u64, u64) = (300_000, 700_000);

/// Per concern, the hook `observer check` chose, or `Err(what it printed)`
/// for one with none (`disabled: ...` or `none: ...`).
type Choices = Vec<(String, Result<String, String>)>;

/// `observer check --disable <disable>`: the report and its choices.
fn check_report(disable: &str) -> (String, Choices) {
    let forced = forced_probes();
    let mut args = vec!["check", "--disable", disable];
    if let Some(tier) = forced.as_deref() {
        args.extend(["--probes", tier]);
    }
    let out = run_observer_cli(&args).unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{report}");
    let concerns = report
        .lines()
        .filter_map(|l| {
            let (concern, rest) = l.strip_prefix("concern ")?.split_once(' ')?;
            let choice = rest.split_once("): ")?.1;
            let hook = choice.strip_suffix(" (chosen)").map(str::to_owned).ok_or_else(|| choice.to_owned());
            Some((concern.to_owned(), hook))
        })
        .collect();
    (report, concerns)
}

/// `observer run --disable <disable>` in a fresh namespace, once no program
/// of an earlier observer is left: the kernel's list is then this one's.
fn start(ns: &NetNs, disable: &str, log: &str) -> ObserverProcess {
    wait_no_kernel_objects("obs_", scaled(Duration::from_secs(5))).unwrap();
    ObserverProcess::start(ns, &["--iface", "lo", "--session-log", log, "--disable", disable]).unwrap()
}

/// Check and run agree: every hook check chose is attached, every concern
/// check shows disabled is `hook="disabled"` (value 0), and nothing else.
fn assert_agrees_with_check(observer: &ObserverProcess, m: &Metrics, report: &str, check: &Choices) {
    for (concern, choice) in check {
        let series = m.matching("observer_probe_info", &[("concern", concern)]);
        match choice {
            Ok(hook) => assert_eq!(
                m.value_exact("observer_probe_info", &[("concern", concern), ("hook", hook)]),
                Some(1.0),
                "check chose {hook} for {concern}, run did not attach it\n{report}\n{}",
                observer.log()
            ),
            Err(line) if line.starts_with("disabled: ") => assert_eq!(
                m.value_exact("observer_probe_info", &[("concern", concern), ("hook", "disabled")]),
                Some(0.0),
                "{concern}: {series:?}\n{report}"
            ),
            Err(_) => assert!(series.is_empty(), "{concern} has no hook, yet {series:?}\n{report}"),
        }
    }
    let attached = check.iter().filter(|(_, c)| c.is_ok() || c.as_ref().is_err_and(|l| l.starts_with("disabled: ")));
    assert_eq!(m.matching("observer_probe_info", &[]).len(), attached.count(), "{}\n{report}", m.raw());
}

/// One TCP transfer of known size; its two sessions (client and server on
/// lo) are reported with exactly the bytes the test moved (its header
/// included). Returns those bytes, both directions together.
fn assert_tcp_exact(ns: &NetNs, log: &std::path::Path) -> u64 {
    let server = TcpServer::start_in(ns, "127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
    let addr = server.addr();
    let t = ns.run(|| transfer(addr, TCP_BYTES.0, TCP_BYTES.1, None).unwrap());
    assert!(t.sent >= TCP_BYTES.0 && t.received >= TCP_BYTES.1, "{t:?}");
    let sessions = wait_sessions(log, 2, scaled(Duration::from_secs(10)), |s| s.protocol == "tcp").unwrap();
    let client = by_local(&sessions, t.local).unwrap();
    assert_eq!((client.bytes_transmitted, client.bytes_received), (t.sent, t.received), "{t:?}: {sessions:#?}");
    let server = sessions.iter().find(|s| s.remote == t.local).expect("the server's side");
    assert_eq!((server.bytes_received, server.bytes_transmitted), (t.sent, t.received), "{t:?}: {sessions:#?}");
    t.sent + t.received
}

/// A connected UDP pair that exchanges datagrams and closes: a UDP session
/// (two, one per socket) wherever UDP flows are measured.
fn udp_exchange(ns: &NetNs) {
    ns.run(|| {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..5 {
            a.send(b"ping").unwrap();
            assert_eq!(b.recv(&mut buf).unwrap(), 4);
            b.send(b"pong!").unwrap();
            assert_eq!(a.recv(&mut buf).unwrap(), 5);
        }
    });
}

fn loaded(names: &[&str]) -> Vec<String> {
    kernel_programs_named("obs_").unwrap().into_iter().filter(|p| names.contains(&p.as_str())).collect()
}

#[test]
fn sock_calls_and_drops_switched_off() {
    let disable = "sock_calls,drops";
    let (report, check) = check_report(disable);
    for (concern, why) in [
        ("sock_calls", "disabled: switched off with --disable"),
        ("drops", "disabled: switched off with --disable"),
        ("udp_release", "disabled: switched off with sock_calls (--disable)"),
    ] {
        let line = check.iter().find(|(c, _)| c == concern).map(|(_, l)| l.clone());
        assert!(line.as_ref().is_some_and(|l| l.as_ref().is_err_and(|l| l.starts_with(why))), "{concern}: {report}");
    }

    let ns = NetNs::new("disable").unwrap();
    let tmp = TempDir::new("disable").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let mut observer = start(&ns, disable, log.to_str().unwrap());
    let programs = kernel_programs_named("obs_").unwrap();
    assert!(programs.iter().any(|p| p.starts_with("obs_state")), "tcp_state's programs are loaded: {programs:?}");
    for off in [&SOCK_CALLS_PROGRAMS[..], &UDP_PEER_PROGRAMS, &UDP_RELEASE_PROGRAMS, &DROPS_PROGRAMS] {
        assert!(loaded(off).is_empty(), "switched off, yet loaded: {:?}\n{}", loaded(off), observer.log());
    }
    let line = observer.log().lines().find(|l| l.contains("switched off with --disable")).map(str::to_owned);
    let line = line.unwrap_or_else(|| panic!("no start-up line names what was switched off:\n{}", observer.log()));
    assert!(line.contains("sock_calls,udp_release,drops") && line.contains("udp_sessions=false"), "{line}");

    // Drops happen (datagrams to a port nothing listens on), none is counted.
    ns.run(|| {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        for _ in 0..20 {
            let _ = s.send_to(b"nobody", closed);
        }
    });
    udp_exchange(&ns);
    let tcp_bytes = assert_tcp_exact(&ns, &log);
    // Releases and the last scrape's refresh are 250 ms at most behind.
    std::thread::sleep(scaled(Duration::from_millis(500)));
    let m = observer.metrics().unwrap();
    assert_agrees_with_check(&observer, &m, &report, &check);
    assert!(!m.names().contains("observer_drops_total"), "{}", m.raw());
    assert_eq!(m.sum("observer_sessions_total", &[("protocol", "udp")]), 0.0, "{}", m.raw());
    assert_eq!(m.sum("observer_bytes_total", &[("protocol", "udp")]), 0.0, "{}", m.raw());
    // Both ends of the one transfer: the scrape connection is still open.
    assert_eq!(m.sum("observer_session_bytes_total", &[("protocol", "tcp")]), 2.0 * tcp_bytes as f64, "{}", m.raw());
    // The observer's own view agrees: in its object, not attached.
    assert_eq!(m.value_exact("observer_bpf_program_attached", &[("program", "obs_kfree_skb")]), Some(0.0));
}

#[test]
fn udp_release_switched_off_leaves_sock_calls_tcp_only() {
    let (report, check) = check_report("udp_release");
    let calls = check.iter().find(|(c, _)| c == "sock_calls").map(|(_, h)| h.clone()).unwrap();
    if let Ok(hook) = &calls {
        assert!(!hook.contains("cgroup"), "no UDP peer hooks without UDP flows: {report}");
    }

    let ns = NetNs::new("disable-rel").unwrap();
    let tmp = TempDir::new("disable-rel").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let mut observer = start(&ns, "udp_release", log.to_str().unwrap());
    for off in [&UDP_RELEASE_PROGRAMS[..], &UDP_PEER_PROGRAMS] {
        assert!(loaded(off).is_empty(), "not needed, yet loaded: {:?}\n{}", loaded(off), observer.log());
    }
    if calls.is_ok() {
        assert!(!loaded(&SOCK_CALLS_PROGRAMS).is_empty(), "sock_calls stays on\n{}", observer.log());
    }
    udp_exchange(&ns);
    assert_tcp_exact(&ns, &log);
    std::thread::sleep(scaled(Duration::from_millis(500)));
    let m = observer.metrics().unwrap();
    assert_agrees_with_check(&observer, &m, &report, &check);
    assert_eq!(m.sum("observer_sessions_total", &[("protocol", "udp")]), 0.0, "{}", m.raw());
    assert_eq!(m.sum("observer_bytes_total", &[("protocol", "udp")]), 0.0, "{}", m.raw());
    // Had the kernel programs measured the exchange anyway, its flows would
    // sit in the table (no release ends them), or find it full.
    assert_eq!(m.value_exact("observer_bpf_map_capacity", &[("map", "udp_flows")]), Some(1.0), "{}", m.raw());
    assert_eq!(m.value_exact("observer_bpf_map_entries", &[("map", "udp_flows")]), Some(0.0), "{}", m.raw());
    for source in ["udp_flow_table_full", "udp_socket_table_full"] {
        assert_eq!(m.sum("observer_events_lost_total", &[("source", source)]), 0.0, "{source}: {}", m.raw());
    }
}
