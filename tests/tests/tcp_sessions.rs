//! TCP sessions over loopback, IPv4 and IPv6, measured end to end: known bytes
//! in each direction, concurrent large and small sessions, one scrape of the
//! real /metrics and the observer's per-session log.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use observer_tests::{
    NetNs, ObserverProcess, TcpServer, TempDir, TransferStats, by_local, scaled, time_scale, transfer, wait_sessions,
};

const BIG: u64 = 4 * 1024 * 1024;
const SMALL: u64 = 64 * 1024;
const PER_KIND: usize = 3;
/// Large sessions are stretched to about this long (times the emulation's
/// [`time_scale`]), so that a millisecond of difference between the test's
/// clock and the kernel's is far below 10%.
const PACE: Duration = Duration::from_millis(400);

/// How long after the client's close returned the server's socket may still
/// close. The client's socket closes as it takes the server's FIN, before its
/// last read returns; the server's closes (LAST_ACK -> CLOSE) when the
/// client's ACK of that FIN reaches it, which loopback may deliver in a
/// softirq after the client's thread has already returned from close(): seen
/// once on a loaded 2-CPU machine, 93 µs after.
const SERVER_CLOSE_LATE: Duration = Duration::from_millis(2);

#[test]
fn loopback_sessions_ipv4_and_ipv6_exact_bytes_and_goodput() {
    let ns = NetNs::new("tcp").unwrap();
    let tmp = TempDir::new("tcp-sessions").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let log_arg = log.to_str().unwrap();
    let mut observer =
        ObserverProcess::start(&ns, &["--iface", "lo", "--session-log", log_arg, "--label", "region=test"]).unwrap();

    let servers: Vec<TcpServer> = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)]
        .into_iter()
        .map(|ip| TcpServer::start_in(&ns, SocketAddr::new(ip, 0)).unwrap())
        .collect();

    // (send, recv, pace): uploads, downloads, and small exchanges both ways.
    let pace = Some(scaled(PACE));
    let kinds = [(BIG, 0, pace), (0, BIG, pace), (SMALL, SMALL, None)];
    let mut handles = Vec::new();
    for server in &servers {
        for &(send, recv, pace) in &kinds {
            for _ in 0..PER_KIND {
                let addr = server.addr();
                handles.push(ns.spawn(move || transfer(addr, send, recv, pace).unwrap()));
            }
        }
    }
    let transfers: Vec<TransferStats> = handles.into_iter().map(|h| h.join().unwrap()).collect();

    // Every transfer is two sessions on lo: the client's socket and the server's.
    let n_sessions = 2 * transfers.len();
    let sessions = wait_sessions(&log, n_sessions, Duration::from_secs(20), |_| true).unwrap();
    assert_eq!(sessions.len(), n_sessions, "only the test's sessions closed in this namespace: {sessions:#?}");

    let floor = 1_000_000;
    let mut expected_goodput = [(0u64, 0f64); 2]; // [receive, transmit]: (count, sum of bytes/lifetime)
    let mut test_goodput_sum = [0f64; 2];
    let mut bytes = 0u64;
    for t in &transfers {
        let client = by_local(&sessions, t.local).unwrap();
        assert_eq!(client.remote, t.peer);
        assert_eq!((client.bytes_transmitted, client.bytes_received), (t.sent, t.received), "client {t:?}");
        let server = sessions.iter().find(|s| s.remote == t.local).expect("server side of the session");
        assert_eq!((server.bytes_received, server.bytes_transmitted), (t.sent, t.received), "server {t:?}");
        bytes += t.sent + t.received;

        for (s, late) in [(client, Duration::ZERO), (server, SERVER_CLOSE_LATE)] {
            let lifetime = s.lifetime.expect("sessions born under the observer have a lifetime");
            let measured = t.duration();
            // The kernel's lifetime is inside the test's connect..close window,
            // the server's up to `SERVER_CLOSE_LATE` after it. Under emulation
            // that softirq can run later still.
            let slack = Duration::from_millis(10) * (time_scale() - 1) + late;
            assert!(lifetime <= measured + slack, "{s:?} lived {lifetime:?} > test's {measured:?}");
            for (i, b) in [s.bytes_received, s.bytes_transmitted].into_iter().enumerate() {
                if b >= floor {
                    expected_goodput[i].0 += 1;
                    expected_goodput[i].1 += b as f64 / lifetime.as_secs_f64();
                    test_goodput_sum[i] += b as f64 / measured.as_secs_f64();
                }
            }
        }
    }

    let m = observer.metrics().unwrap();
    let tcp = [("protocol", "tcp"), ("region", "test")];
    assert_eq!(m.value_exact("observer_sessions_total", &tcp), Some(n_sessions as f64));
    for (i, direction) in ["receive", "transmit"].into_iter().enumerate() {
        let labels = [("direction", direction), tcp[0], tcp[1]];
        assert_eq!(
            m.value_exact("observer_session_bytes_total", &labels),
            Some(bytes as f64),
            "{direction}: on loopback every byte sent is a byte received"
        );
        let h = m.histogram("observer_session_goodput_bytes_per_second", &labels).unwrap();
        // 3 large sessions per family and kind, each over the floor on both ends.
        assert_eq!(h.count, (2 * 2 * PER_KIND) as f64, "{direction}");
        assert_eq!(h.count as u64, expected_goodput[i].0);
        let rel = |a: f64, b: f64| (a - b).abs() / b;
        assert!(
            rel(h.sum, expected_goodput[i].1) < 1e-6,
            "{direction}: histogram sum {} vs log {}",
            h.sum,
            expected_goodput[i].1
        );
        assert!(
            rel(h.sum, test_goodput_sum[i]) < 0.10,
            "{direction}: observer goodput sum {} vs test-measured {}",
            h.sum,
            test_goodput_sum[i]
        );
    }
    let durations = m.histogram("observer_session_duration_seconds", &tcp).unwrap();
    assert_eq!(durations.count, n_sessions as f64, "small sessions are in the duration histogram too");
    assert_eq!(m.sum("observer_events_lost_total", &[]), 0.0);
    assert_eq!(observer.scraper().connections_opened(), 1);
}
