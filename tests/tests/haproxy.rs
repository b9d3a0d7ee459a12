//! An unmodified proxy: haproxy (Debian's package) relays transfers between a
//! client and a server the test starts. Its own log of each session's bytes
//! and duration must agree with what the observer measured on both legs.
use std::{net::SocketAddr, time::Duration};

use observer_tests::{Haproxy, NetNs, ObserverProcess, TcpServer, TempDir, by_local, scaled, transfer, wait_sessions};

const TRANSFERS: [(u64, u64); 3] = [(2 << 20, 3 << 20), (5 << 20, 64 << 10), (300_000, 6 << 20)];

#[test]
fn observer_bytes_and_durations_match_haproxys_log_on_both_legs() {
    let ns = NetNs::new("haproxy").unwrap();
    let tmp = TempDir::new("haproxy").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let _observer = ObserverProcess::start(&ns, &["--iface", "lo", "--session-log", log.to_str().unwrap()]).unwrap();
    let server = TcpServer::start_in(&ns, "127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap();
    let port = ns.free_port("127.0.0.1".parse().unwrap()).unwrap();
    let haproxy = Haproxy::start(&ns, port, server.addr()).unwrap();
    let front = haproxy.listen_addr();

    let mut clients = Vec::new();
    for (send, recv) in TRANSFERS {
        // Paced so each session lasts long enough for a 50 ms comparison to mean something.
        clients.push(ns.run(|| transfer(front, send, recv, Some(Duration::from_millis(300))).unwrap()));
    }
    let proxied = haproxy.wait_sessions(TRANSFERS.len(), Duration::from_secs(20)).unwrap();
    // Four sessions per relayed transfer: client, haproxy's frontend and backend sockets, server.
    let observed = wait_sessions(&log, 4 * TRANSFERS.len(), Duration::from_secs(20), |_| true).unwrap();

    for client in &clients {
        let hp = proxied.iter().find(|p| p.client == client.local).expect("haproxy logged the session");
        // haproxy's byte counts are its own: what it read from the client and sent back.
        assert_eq!((hp.bytes_from_client, hp.bytes_to_client), (client.sent, client.received), "{hp:?}");
        let backend_source = hp.backend_source.expect("haproxy connected to the server");

        // Leg 1: client <-> haproxy.
        let c = by_local(&observed, client.local).unwrap();
        assert_eq!(
            (c.bytes_transmitted, c.bytes_received),
            (hp.bytes_from_client, hp.bytes_to_client),
            "client leg, client side"
        );
        let f = observed.iter().find(|s| s.remote == client.local).expect("haproxy's frontend socket");
        assert_eq!(f.local, front);
        assert_eq!(
            (f.bytes_received, f.bytes_transmitted),
            (hp.bytes_from_client, hp.bytes_to_client),
            "client leg, haproxy side"
        );
        assert_eq!(f.comm.as_deref(), Some("haproxy"), "the accepted socket's owner is haproxy");
        // Leg 2: haproxy <-> server.
        let b = by_local(&observed, backend_source).unwrap();
        assert_eq!(b.remote, server.addr());
        assert_eq!(
            (b.bytes_transmitted, b.bytes_received),
            (hp.bytes_from_client, hp.bytes_to_client),
            "server leg, haproxy side"
        );
        assert_eq!(b.comm.as_deref(), Some("haproxy"), "the connecting socket's owner is haproxy");
        let s = observed.iter().find(|s| s.remote == backend_source).expect("server's socket");
        assert_eq!(
            (s.bytes_received, s.bytes_transmitted),
            (hp.bytes_from_client, hp.bytes_to_client),
            "server leg, server side"
        );

        // Durations: haproxy's %Tt (accept to both sides closed) against the
        // lifetimes of haproxy's own two sockets.
        let total = Duration::from_millis(hp.total_ms as u64);
        for (leg, session) in [("frontend", f), ("backend", b)] {
            let lifetime = session.lifetime.unwrap();
            let diff = lifetime.abs_diff(total);
            assert!(diff <= scaled(Duration::from_millis(50)), "{leg}: observer {lifetime:?} vs haproxy {total:?}");
        }
    }
}
