//! Least privilege (issue 27): once the programs are attached, no thread of
//! the observer holds a capability (effective, permitted, inheritable and
//! ambient sets empty, bounding set cleared, no_new_privs set), and what it
//! measures keeps being measured: a TCP session, a UDP flow, a drop, a
//! labelled session, GPU sampling, a scrape over TLS with basic
//! authentication, and a clean shutdown that leaves nothing attached.
use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use observer_tests::{
    FakeNvml, Metrics, NetNs, ObserverProcess, TcpServer, TempDir, ThreadCaps, TlsWebConfig, forced_probes,
    run_observer_cli, scaled, set_thread_comm, thread_caps, transfer, wait_no_kernel_objects, wait_until,
};

const TIMEOUT: Duration = Duration::from_secs(15);
const CAP_SETPCAP: u32 = 8;
const CAP_BPF: u32 = 39;

/// What the observer may keep after attach on this kernel: nothing from
/// 5.19, whose bpf() checks capabilities only to create maps and load
/// programs; before, with unprivileged BPF disabled, CAP_BPF (or nothing,
/// where that change was backported: the observer tries a map read).
fn allowed_kept() -> Vec<u64> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let disabled = std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled").unwrap_or_default();
    if version >= (5, 19) || disabled.trim() == "0" { vec![0] } else { vec![0, 1 << CAP_BPF] }
}

/// Whether the test itself may clear a bounding set (it runs as root).
fn test_has_setpcap() -> bool {
    thread_caps(std::process::id()).unwrap().iter().all(|t| t.effective & (1 << CAP_SETPCAP) != 0)
}

fn assert_no_capabilities(threads: &[ThreadCaps], kept: u64, bounding_cleared: bool, when: &str) {
    for t in threads {
        let what = format!("{when}: thread {} ({}): {t:?}", t.name, t.tid);
        assert_eq!((t.effective, t.permitted, t.inheritable), (kept, kept, 0), "{what}");
        assert_eq!(t.ambient, 0, "{what}");
        assert!(t.no_new_privs, "{what}");
        if bounding_cleared {
            assert_eq!(t.bounding, 0, "{what}");
        }
    }
}

fn metrics(ns: &NetNs, tls: &TlsWebConfig, addr: SocketAddr) -> Metrics {
    let answer =
        observer_tests::curl(ns, &tls.cacert, &format!("https://{addr}/metrics"), Some(&TlsWebConfig::credentials()))
            .unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    Metrics::parse(&answer.body).unwrap()
}

fn scrape_until(ns: &NetNs, tls: &TlsWebConfig, addr: SocketAddr, what: &str, f: impl Fn(&Metrics) -> bool) -> Metrics {
    let mut last = None;
    wait_until(what, TIMEOUT, Duration::from_millis(100), || {
        let m = metrics(ns, tls, addr);
        let ok = f(&m);
        last = Some(m.raw().to_string());
        Ok(ok.then_some(m))
    })
    .unwrap_or_else(|e| panic!("{e:#}\nlast scrape:\n{}", last.unwrap_or_default()))
}

#[test]
fn after_attach_no_thread_holds_a_capability_and_everything_is_still_measured() {
    let ns = NetNs::new("privs").unwrap();
    let tls = TlsWebConfig::new().unwrap();
    let fake =
        FakeNvml::new("privs-nvml", "count=1\ngpu0.uuid=GPU-00000000-0000-4000-8000-000000000027\ngpu0.util=42\n");
    // A session log: its writer is a thread of its own, started before attach.
    let log_dir = TempDir::new("privs-log").unwrap();
    let log = log_dir.path().join("sessions.jsonl");
    let mut args = vec!["--iface", "lo", "--session-label", "comm", "--web-config-file", tls.file.to_str().unwrap()];
    args.extend(["--session-log", log.to_str().unwrap()]);
    let gpu_args = fake.args("100ms");
    args.extend(gpu_args.iter().map(String::as_str));
    let mut observer = ObserverProcess::spawn(&ns, &args).unwrap();
    let addr = observer.addr();
    wait_until("/readyz over HTTPS", Duration::from_secs(60), Duration::from_millis(100), || {
        if let Some(status) = observer.try_status()? {
            anyhow::bail!("observer exited ({status}): {}", observer.log());
        }
        let url = format!("https://{addr}/readyz");
        Ok((observer_tests::curl(&ns, &tls.cacert, &url, None)?.status == 200).then_some(()))
    })
    .unwrap();

    // Ready: every thread has given its capabilities up.
    let allowed = allowed_kept();
    let kept = thread_caps(observer.pid()).unwrap()[0].permitted;
    assert!(allowed.contains(&kept), "kept {kept:#x}, allowed {allowed:?}");
    let bounding_cleared = test_has_setpcap();
    let threads = thread_caps(observer.pid()).unwrap();
    let names: Vec<&str> = threads.iter().map(|t| t.name.as_str()).collect();
    eprintln!("threads after /readyz: {names:?}, kept {kept:#x}");
    assert!(threads.len() >= 5, "main, two runtime workers, two ring readers, the GPU sampler: {names:?}");
    assert!(names.contains(&"nvml-sampler") && names.contains(&"session-log"), "{names:?}");
    assert_no_capabilities(&threads, kept, bounding_cleared, "after /readyz");
    assert!(observer.log().contains("capabilities given up in every thread"), "{}", observer.log());
    assert!(!observer.log().contains("still holds capabilities"), "{}", observer.log());

    // A labelled TCP session: the client names its thread, the owner's comm.
    let server = TcpServer::start_in(&ns, "127.0.0.1:0".parse().unwrap()).unwrap();
    let server_addr = server.addr();
    let t = ns
        .spawn(move || {
            set_thread_comm("privs-client").unwrap();
            transfer(server_addr, 100_000, 50_000, None).unwrap()
        })
        .join()
        .unwrap();
    // Each curl scrape is a TCP session too (comm "curl"): the test's is told
    // apart by its owner's name.
    let client = [("comm", "privs-client"), ("protocol", "tcp")];
    let m =
        scrape_until(&ns, &tls, addr, "the labelled TCP session", |m| m.sum("observer_sessions_total", &client) >= 1.0);
    assert_eq!(m.value("observer_sessions_total", &client), Some(1.0), "{}", m.raw());
    for (direction, bytes) in [("transmit", t.sent), ("receive", t.received)] {
        let labels = [client[0], client[1], ("direction", direction)];
        assert_eq!(m.value("observer_session_bytes_total", &labels), Some(bytes as f64), "{direction}: {}", m.raw());
    }

    // A connected UDP flow, ended by the sockets' release.
    ns.run(|| {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        b.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..10 {
            a.send(&[7u8; 1000]).unwrap();
            b.recv(&mut buf).unwrap();
        }
    });
    let m = scrape_until(&ns, &tls, addr, "both ends of the UDP flow", |m| {
        m.sum("observer_sessions_total", &[("protocol", "udp")]) >= 2.0
    });
    assert_eq!(m.sum("observer_sessions_total", &[("protocol", "udp")]), 2.0, "{}", m.raw());
    assert_eq!(m.sum("observer_session_bytes_total", &[("direction", "transmit"), ("protocol", "udp")]), 10_000.0);

    // Drops: datagrams to a port where no socket listens.
    let check = run_observer_cli(&["check"]).unwrap();
    let no_reasons = String::from_utf8_lossy(&check.stdout).lines().any(|l| l.starts_with("limit drops: "));
    if matches!(forced_probes().as_deref(), Some("fentry" | "kprobe")) {
        eprintln!("drops skipped: OBSERVER_TEST_PROBES forces a tier without drop hooks");
    } else if no_reasons {
        // Every drop is reason="unknown" there, the scrapes' own TCP included:
        // the test's drops cannot be told apart (tests/tests/drops.rs covers them).
        eprintln!("drops skipped: this kernel's drops carry no reason (observer check: limit drops)");
    } else {
        const N: usize = 9;
        // Datagrams that a netfilter rule drops: only the test's own packets
        // match it, whereas no_socket drops also come from the TCP of the
        // scrapes themselves (a segment arriving after a close).
        let closed = ns.free_port("127.0.0.1".parse().unwrap()).unwrap();
        let rules = format!(
            "table inet obs_priv {{\n chain input {{\n  type filter hook input priority 0; policy accept;\n  udp dport {closed} drop\n }}\n}}\n"
        );
        let rules_file = std::env::temp_dir().join(format!("obs-priv-{}.nft", std::process::id()));
        std::fs::write(&rules_file, rules).unwrap();
        let out = ns.command("nft").arg("-f").arg(&rules_file).output().unwrap();
        let _ = std::fs::remove_file(&rules_file);
        assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
        let labels = [("reason", "netfilter_drop"), ("iface", "lo")];
        let before = scrape_until(&ns, &tls, addr, "a baseline", |_| true).value_exact("observer_drops_total", &labels);
        let before = before.unwrap_or(0.0);
        ns.run(|| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            for _ in 0..N {
                let _ = s.send_to(b"nobody", ("127.0.0.1", closed));
            }
        });
        let m = scrape_until(&ns, &tls, addr, "the drops", |m| {
            m.value_exact("observer_drops_total", &labels).unwrap_or(0.0) >= before + N as f64
        });
        assert_eq!(m.value_exact("observer_drops_total", &labels), Some(before + N as f64), "{}", m.raw());
    }

    // GPU sampling, on a thread without capabilities from its start.
    let m = scrape_until(&ns, &tls, addr, "GPU sampled", |m| m.value_exact("observer_nvml_up", &[]) == Some(1.0));
    assert_eq!(m.value("observer_gpu_utilization_ratio", &[("gpu", "0")]), Some(0.42), "{}", m.raw());
    assert_eq!(m.sum("observer_events_lost_total", &[]), 0.0, "{}", m.raw());
    assert_eq!(m.value("observer_bpf_map_capacity", &[("map", "open_sessions")]), Some(65_536.0));

    // Threads started since (blocking threads for scrapes and bcrypt checks)
    // inherited the empty sets.
    let threads = thread_caps(observer.pid()).unwrap();
    assert_no_capabilities(&threads, kept, bounding_cleared, "after the traffic");

    // Shutdown needs no capability either: links are closed, not detached
    // by a privileged call.
    let stopped = observer.stop().unwrap();
    assert_eq!(stopped.status.code(), Some(0), "{}", observer.log());
    wait_no_kernel_objects("obs_", scaled(Duration::from_secs(2))).unwrap();
}
