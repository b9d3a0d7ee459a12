//! The observer's metrics about itself, from a real run: its kernel programs'
//! run counts and run time (the kernel's BPF statistics, switched on while it
//! runs and back to the previous state after), attached state, table usage,
//! scrape duration and the process_* metrics.
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use observer_tests::{NetNs, ObserverProcess, TcpServer, transfer, wait_until};

fn bpf_stats_enabled() -> String {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap().trim().to_string()
}

#[test]
fn self_telemetry_from_the_kernel_and_the_process() {
    let before = bpf_stats_enabled();
    let ns = NetNs::new("selftel").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo"]).unwrap();
    // The observer holds a BPF_ENABLE_STATS descriptor: statistics are on
    // (the counters below advance) without touching the sysctl, which shows
    // only its own setting.

    let server = TcpServer::start_in(&ns, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    let addr = server.addr();
    ns.spawn(move || transfer(addr, 2_000_000, 2_000_000, None).unwrap()).join().unwrap();

    let m = observer.metrics().unwrap();
    let attached: Vec<_> =
        m.matching("observer_bpf_program_attached", &[]).into_iter().filter(|s| s.value == 1.0).collect();
    assert!(!attached.is_empty(), "{m:?}");
    // Every attached program has run counters, and the TCP state program ran
    // for the connection's state changes.
    assert!(m.sum("observer_bpf_program_runs_total", &[]) > 0.0, "{m:?}");
    assert!(m.sum("observer_bpf_program_run_seconds_total", &[]) > 0.0, "{m:?}");
    for s in attached {
        let program = s.labels["program"].as_str();
        assert!(m.value("observer_bpf_program_runs_total", &[("program", program)]).is_some(), "{program}: {m:?}");
        // Skipped runs are events the observer did not see: exported for
        // every attached program (zero on this quiet path).
        assert!(
            m.value("observer_bpf_program_recursion_misses_total", &[("program", program)]).is_some(),
            "{program}: {m:?}"
        );
    }
    for map in ["open_sessions", "udp_flows"] {
        assert!(m.value("observer_bpf_map_capacity", &[("map", map)]).unwrap() > 0.0, "{map}");
        assert!(m.value("observer_bpf_map_entries", &[("map", map)]).is_some(), "{map}");
    }
    // The scrape keep-alive connection is open, so one TCP session is in the table.
    assert!(m.value("observer_bpf_map_entries", &[("map", "open_sessions")]).unwrap() >= 1.0);
    assert!(m.value("process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(m.value("process_cpu_seconds_total", &[]).is_some());
    let m = observer.metrics().unwrap();
    assert!(m.value("observer_scrape_duration_seconds_count", &[]).unwrap() >= 1.0);

    let stopped = observer.stop().unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    wait_until(
        "kernel.bpf_stats_enabled back to its value before",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || Ok((bpf_stats_enabled() == before).then_some(())),
    )
    .unwrap();
}

/// `--bpf-stats=false` leaves the kernel's statistics as they are: with the
/// host's off, the programs run (the transfer's sessions are counted) and
/// their run counters stay at 0.
#[test]
fn bpf_stats_false_leaves_statistics_off() {
    assert_eq!(
        bpf_stats_enabled(),
        "0",
        "kernel.bpf_stats_enabled is on on this host, so run counters advance whatever the flag says: \
         this test needs it off (sysctl kernel.bpf_stats_enabled=0)"
    );
    let ns = NetNs::new("nostats").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo", "--bpf-stats=false"]).unwrap();
    let server = TcpServer::start_in(&ns, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    let addr = server.addr();
    ns.spawn(move || transfer(addr, 2_000_000, 2_000_000, None).unwrap()).join().unwrap();

    let m =
        wait_until("the transfer's two sessions counted", Duration::from_secs(5), Duration::from_millis(50), || {
            let m = observer.metrics()?;
            Ok((m.sum("observer_sessions_total", &[("protocol", "tcp")]) >= 2.0).then_some(m))
        })
        .unwrap();
    assert!(m.matching("observer_bpf_program_attached", &[]).iter().any(|s| s.value == 1.0), "{m:?}");
    assert_eq!(m.sum("observer_bpf_program_runs_total", &[]), 0.0, "{m:?}");
    assert_eq!(m.sum("observer_bpf_program_run_seconds_total", &[]), 0.0, "{m:?}");
    let stopped = observer.stop().unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
}
