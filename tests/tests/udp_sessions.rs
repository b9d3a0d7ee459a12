//! UDP sessions: connected sockets are one session until release; an
//! unconnected server socket is split per peer, each flow ending at its idle
//! timeout or at the socket's release. Exact bytes, checked per session.
use std::{
    net::{SocketAddr, UdpSocket},
    time::Duration,
};

use observer_tests::{NetNs, ObserverProcess, TempDir, read_session_log, session_between, wait_sessions};

const DATAGRAM: usize = 1000;
const ROUNDS: usize = 1200; // 1.2 MB each way: over the 1 MB goodput floor

/// Ping-pong so no datagram can overflow a receive buffer: every byte sent
/// is received, and the test knows each side's totals exactly.
fn ping_pong(a: &UdpSocket, b: &UdpSocket, rounds: usize, size_a: usize, size_b: usize) {
    let mut buf = vec![0u8; 65536];
    for _ in 0..rounds {
        a.send(&vec![1u8; size_a]).unwrap();
        let (n, from) = b.recv_from(&mut buf).unwrap();
        assert_eq!(n, size_a);
        b.send_to(&vec![2u8; size_b], from).unwrap();
        assert_eq!(a.recv(&mut buf).unwrap(), size_b);
    }
}

fn timeout(s: &UdpSocket) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
}

#[test]
fn connected_udp_ipv4_and_ipv6_exact_bytes_and_goodput() {
    let ns = NetNs::new("udpc").unwrap();
    let tmp = TempDir::new("udp-connected").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo", "--session-log", log.to_str().unwrap()]).unwrap();

    let pairs: Vec<(SocketAddr, SocketAddr)> = ["127.0.0.1:0", "[::1]:0"]
        .into_iter()
        .map(|any| {
            ns.run(|| {
                let a = UdpSocket::bind(any).unwrap();
                let b = UdpSocket::bind(any).unwrap();
                a.connect(b.local_addr().unwrap()).unwrap();
                b.connect(a.local_addr().unwrap()).unwrap();
                timeout(&a);
                timeout(&b);
                ping_pong(&a, &b, ROUNDS, DATAGRAM, DATAGRAM);
                (a.local_addr().unwrap(), b.local_addr().unwrap())
                // Both sockets are released here: that ends their sessions.
            })
        })
        .collect();

    let sessions = wait_sessions(&log, 4, Duration::from_secs(10), |s| s.protocol == "udp").unwrap();
    let bytes = (ROUNDS * DATAGRAM) as u64;
    for (a, b) in pairs {
        for (local, remote) in [(a, b), (b, a)] {
            let s = session_between(&sessions, local, remote);
            assert_eq!((s.bytes_transmitted, s.bytes_received), (bytes, bytes), "{s:?}");
            assert!(s.lifetime.unwrap() > Duration::ZERO);
            assert_eq!(s.pid, Some(std::process::id()), "the test process owns the sockets");
        }
    }
    let m = observer.metrics().unwrap();
    for direction in ["receive", "transmit"] {
        let labels = [("direction", direction), ("protocol", "udp")];
        assert_eq!(m.value_exact("observer_session_bytes_total", &labels), Some((4 * bytes) as f64));
        assert_eq!(m.value_exact("observer_bytes_total", &labels), Some((4 * bytes) as f64), "live counter caught up");
        let h = m.histogram("observer_session_goodput_bytes_per_second", &labels).unwrap();
        assert_eq!(h.count, 4.0, "{direction}: one observation per session over the floor");
    }
    assert_eq!(m.value_exact("observer_sessions_total", &[("protocol", "udp")]), Some(4.0));
}

#[test]
fn unconnected_server_splits_flows_per_peer_and_ends_idle_ones() {
    let ns = NetNs::new("udpu").unwrap();
    let tmp = TempDir::new("udp-unconnected").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let mut observer = ObserverProcess::start(
        &ns,
        &["--iface", "lo", "--session-log", log.to_str().unwrap(), "--udp-idle-timeout", "1s"],
    )
    .unwrap();

    // Request sizes 500, answers 250; three clients with different volumes.
    let volumes = [100usize, 200, 300];
    let (server_addr, clients, idle_client) = ns.run(|| {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        timeout(&server);
        let mut clients = Vec::new();
        for &n in &volumes {
            let c = UdpSocket::bind("127.0.0.1:0").unwrap();
            c.connect(server.local_addr().unwrap()).unwrap();
            timeout(&c);
            ping_pong(&c, &server, n, 500, 250);
            clients.push(c);
        }
        // A fourth peer talks briefly, then stays quiet past the idle timeout
        // while its socket and the server's stay open.
        let idle = UdpSocket::bind("127.0.0.1:0").unwrap();
        idle.connect(server.local_addr().unwrap()).unwrap();
        timeout(&idle);
        ping_pong(&idle, &server, 10, 500, 250);
        (server, clients, idle)
    });
    let idle_addr = idle_client.local_addr().unwrap();
    let server = server_addr.local_addr().unwrap();

    // The quiet peer's flow at the server ends by timeout, before any release.
    let ended =
        wait_sessions(&log, 1, Duration::from_secs(10), |s| s.local == server && s.remote == idle_addr).unwrap();
    assert_eq!((ended[0].bytes_received, ended[0].bytes_transmitted), (10 * 500, 10 * 250));
    // The other peers were just as quiet: their flows ended too, all at the
    // server, and none of the connected clients' (connected = until release).
    let client_addrs: Vec<SocketAddr> = clients.iter().map(|c| c.local_addr().unwrap()).collect();
    let at_server = wait_sessions(&log, 4, Duration::from_secs(10), |s| s.local == server).unwrap();
    for (addr, n) in client_addrs.iter().zip(volumes) {
        let s = session_between(&at_server, server, *addr);
        assert_eq!((s.bytes_received, s.bytes_transmitted), ((n * 500) as u64, (n * 250) as u64), "{s:?}");
    }
    let sessions = read_session_log(&log).unwrap();
    assert!(sessions.iter().all(|s| s.local == server), "connected clients still open: {sessions:#?}");

    // Releasing the clients ends their sessions with exact bytes.
    drop(clients);
    drop(idle_client);
    let all = wait_sessions(&log, 8, Duration::from_secs(10), |s| s.protocol == "udp").unwrap();
    for (addr, n) in client_addrs.iter().zip(volumes) {
        let s = session_between(&all, *addr, server);
        assert_eq!((s.bytes_transmitted, s.bytes_received), ((n * 500) as u64, (n * 250) as u64));
    }
    drop(server_addr);
    let m = observer.metrics().unwrap();
    assert_eq!(m.value_exact("observer_sessions_total", &[("protocol", "udp")]), Some(8.0));
    let total: usize = volumes.iter().sum::<usize>() + 10;
    let labels = [("direction", "receive"), ("protocol", "udp")];
    assert_eq!(m.value_exact("observer_session_bytes_total", &labels), Some((total * (500 + 250)) as f64));
    assert_eq!(m.sum("observer_events_lost_total", &[]), 0.0);
}

/// A receive that does not ask for the source address, on an unconnected
/// socket, has no peer to count its bytes for: each such datagram is counted
/// as lost (`udp_peer_unknown`), not skipped in silence, while the sender's
/// connected side still counts every byte.
#[test]
fn unconnected_receive_without_source_is_counted_as_lost() {
    const N: usize = 25;
    let ns = NetNs::new("udpn").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo"]).unwrap();
    ns.run(|| {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        timeout(&server);
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr().unwrap()).unwrap();
        let mut buf = [0u8; 2048];
        for _ in 0..N {
            client.send(&[7u8; 300]).unwrap();
            assert_eq!(server.recv(&mut buf).unwrap(), 300);
        }
    });
    let lost =
        |m: &observer_tests::Metrics| m.value_exact("observer_events_lost_total", &[("source", "udp_peer_unknown")]);
    let sent = [("direction", "transmit"), ("protocol", "udp")];
    let bytes_sent = |m: &observer_tests::Metrics| m.value_exact("observer_bytes_total", &sent);
    // The client's socket is released by now: its flow's bytes arrive with
    // the release, which the reader collects within its poll period.
    let m = observer.scrape_until("udp_peer_unknown and the client's bytes counted", Duration::from_secs(10), |m| {
        lost(m) >= Some(N as f64) && bytes_sent(m) >= Some((N * 300) as f64)
    });
    assert_eq!(lost(&m), Some(N as f64), "one per datagram received without a peer");
    assert_eq!(bytes_sent(&m), Some((N * 300) as f64), "the client's bytes count");
    let received = [("direction", "receive"), ("protocol", "udp")];
    assert_eq!(m.value_exact("observer_bytes_total", &received).unwrap_or(0.0), 0.0, "no flow for the receives");
}

/// A socket's release ends every flow it has, at once: the server's flows with
/// three peers, and a socket that sent to one peer before connecting to
/// another. The kernel tells a socket with one flow from one with several
/// (`UdpSocketFlows::many`); were a second flow not noted, its release would
/// end only the first, and the others would wait for the idle timeout, here
/// far beyond the test's wait.
#[test]
fn release_ends_every_flow_of_a_socket_with_several_peers() {
    let ns = NetNs::new("udpr").unwrap();
    let tmp = TempDir::new("udp-release").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let mut observer = ObserverProcess::start(
        &ns,
        &["--iface", "lo", "--session-log", log.to_str().unwrap(), "--udp-idle-timeout", "300s"],
    )
    .unwrap();
    let volumes = [10usize, 20, 30];
    let (server, clients, mover, peers) = ns.run(|| {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        timeout(&server);
        let clients: Vec<UdpSocket> = volumes
            .iter()
            .map(|&n| {
                let c = UdpSocket::bind("127.0.0.1:0").unwrap();
                c.connect(server.local_addr().unwrap()).unwrap();
                timeout(&c);
                ping_pong(&c, &server, n, 400, 100);
                c
            })
            .collect();
        // One datagram to a first peer unconnected, then connected to a second.
        let peers = [UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap()];
        let mover = UdpSocket::bind("127.0.0.1:0").unwrap();
        mover.send_to(&[3u8; 700], peers[0].local_addr().unwrap()).unwrap();
        mover.connect(peers[1].local_addr().unwrap()).unwrap();
        mover.send(&[4u8; 900]).unwrap();
        (server, clients, mover, peers)
    });
    let server_addr = server.local_addr().unwrap();
    let mover_addr = mover.local_addr().unwrap();
    drop(server);
    drop(mover);
    let ended =
        wait_sessions(&log, 5, Duration::from_secs(10), |s| s.local == server_addr || s.local == mover_addr).unwrap();
    for (c, n) in clients.iter().zip(volumes) {
        let s = session_between(&ended, server_addr, c.local_addr().unwrap());
        assert_eq!((s.bytes_received, s.bytes_transmitted), ((n * 400) as u64, (n * 100) as u64), "{s:?}");
    }
    for (peer, bytes) in peers.iter().zip([700u64, 900]) {
        let s = session_between(&ended, mover_addr, peer.local_addr().unwrap());
        assert_eq!((s.bytes_transmitted, s.bytes_received), (bytes, 0), "{s:?}");
    }
    drop(clients);
    let all = wait_sessions(&log, 8, Duration::from_secs(10), |s| s.protocol == "udp").unwrap();
    assert_eq!(all.len(), 8, "{all:#?}");
    let m = observer.metrics().unwrap();
    assert_eq!(m.sum("observer_events_lost_total", &[]), 0.0);
}

/// `--max-udp-flows` sizes the kernel's flow table: with room for two flows,
/// the first client's flow and the server's flow with it fit, and the second
/// client's datagram (its send and the server's receive) is counted as lost,
/// not dropped in silence.
#[test]
fn a_full_flow_table_counts_what_it_leaves_out() {
    let ns = NetNs::new("udpf").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo", "--max-udp-flows", "2"]).unwrap();
    let _sockets = ns.run(|| {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        timeout(&server);
        let mut buf = [0u8; 2048];
        let clients: Vec<UdpSocket> = (0..2)
            .map(|_| {
                let c = UdpSocket::bind("127.0.0.1:0").unwrap();
                c.connect(server.local_addr().unwrap()).unwrap();
                c.send(&[5u8; 200]).unwrap();
                assert_eq!(server.recv_from(&mut buf).unwrap().0, 200);
                c
            })
            .collect();
        (server, clients)
    });
    let full =
        |m: &observer_tests::Metrics| m.value_exact("observer_events_lost_total", &[("source", "udp_flow_table_full")]);
    let m = observer.scrape_until("the second client's datagram counted as lost", Duration::from_secs(10), |m| {
        full(m) >= Some(2.0)
    });
    assert_eq!(full(&m), Some(2.0), "its send and the server's receive");
    assert_eq!(m.value_exact("observer_bpf_map_capacity", &[("map", "udp_flows")]), Some(2.0));
    let sent = [("direction", "transmit"), ("protocol", "udp")];
    assert_eq!(m.value_exact("observer_bytes_total", &sent), Some(200.0), "the first client's datagram only");
}

/// A socket whose release the observer will never hear of must not keep its
/// connected flow in the table for good. With room for two sockets in
/// `UDP_SOCKETS`, two unconnected senders fill it (their flows then end idle,
/// but their sockets stay open and noted); a third, connected socket's flow
/// finds no room for its socket, which is counted, and still ends once idle,
/// with its bytes, while the socket is open.
#[test]
fn a_connected_flow_whose_release_cannot_be_seen_ends_when_idle() {
    let ns = NetNs::new("udpo").unwrap();
    let tmp = TempDir::new("udp-orphan").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let mut observer = ObserverProcess::start(
        &ns,
        &["--iface", "lo", "--session-log", log.to_str().unwrap(), "--max-udp-flows", "2", "--udp-idle-timeout", "1s"],
    )
    .unwrap();
    // Peers that never read: only the senders' calls make flows.
    let (peers, senders) = ns.run(|| {
        let peers = [UdpSocket::bind("127.0.0.1:0").unwrap(), UdpSocket::bind("127.0.0.1:0").unwrap()];
        let senders: Vec<UdpSocket> = peers
            .iter()
            .map(|p| {
                let s = UdpSocket::bind("127.0.0.1:0").unwrap();
                s.send_to(&[1u8; 100], p.local_addr().unwrap()).unwrap();
                s
            })
            .collect();
        (peers, senders)
    });
    let senders_ended = wait_sessions(&log, 2, Duration::from_secs(10), |s| s.protocol == "udp").unwrap();
    assert!(senders_ended.iter().all(|s| s.bytes_transmitted == 100), "{senders_ended:#?}");

    let connected = ns.run(|| {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        c.connect(peers[0].local_addr().unwrap()).unwrap();
        c.send(&[2u8; 300]).unwrap();
        c
    });
    let addr = connected.local_addr().unwrap();
    let ended = wait_sessions(&log, 1, Duration::from_secs(10), |s| s.local == addr).unwrap();
    assert_eq!((ended[0].bytes_transmitted, ended[0].bytes_received), (300, 0), "{:?}", ended[0]);
    let m = observer.metrics().unwrap();
    let lost = [("source", "udp_socket_table_full")];
    assert_eq!(m.value_exact("observer_events_lost_total", &lost), Some(1.0), "the connected socket, once");
    drop((connected, senders));
}
