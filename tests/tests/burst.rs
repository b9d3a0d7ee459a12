//! A burst of short connections: every session counted, nothing lost.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use observer_tests::{NetNs, ObserverProcess, TcpServer, transfer, wait_until};

const CONNECTIONS: usize = 2_000;
const CLIENTS: usize = 8;

#[test]
fn two_thousand_short_connections_are_all_counted() {
    let ns = NetNs::new("burst").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo"]).unwrap();
    let server = Arc::new(TcpServer::start_in(&ns, "127.0.0.1:0".parse::<SocketAddr>().unwrap()).unwrap());
    let addr = server.addr();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| {
            ns.spawn(move || {
                for _ in 0..CONNECTIONS / CLIENTS {
                    transfer(addr, 100, 100, None).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    server.wait_connections(CONNECTIONS, Duration::from_secs(30)).unwrap();

    // Both ends of every connection are sessions on lo.
    let expected = (2 * CONNECTIONS) as f64;
    let m = wait_until("every session counted", Duration::from_secs(30), Duration::from_millis(200), || {
        let m = observer.metrics()?;
        let counted = m.value("observer_sessions_total", &[("protocol", "tcp")]).unwrap_or(0.0);
        Ok((counted >= expected).then_some(m))
    })
    .unwrap();
    assert_eq!(m.value("observer_sessions_total", &[("protocol", "tcp")]), Some(expected));
    for source in ["session_ring_full", "session_table_full", "session_record_malformed"] {
        assert_eq!(m.value_exact("observer_events_lost_total", &[("source", source)]), Some(0.0), "{source}");
    }
    let bytes = (CONNECTIONS as u64 * (16 + 100 + 100)) as f64;
    assert_eq!(m.value("observer_session_bytes_total", &[("direction", "receive"), ("protocol", "tcp")]), Some(bytes));
    assert_eq!(m.value("observer_session_bytes_total", &[("direction", "transmit"), ("protocol", "tcp")]), Some(bytes));
}
