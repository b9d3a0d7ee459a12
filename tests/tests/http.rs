//! The metrics server under abuse, over real sockets: slow headers are cut
//! off, oversized headers refused, methods other than GET/HEAD answered 405,
//! 1,000 concurrent scrapes all served, and the process healthy afterwards.
//!
//! Every connection here is an observed session in the test's namespace; no
//! session count is asserted.
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use observer_tests::{NetNs, ObserverProcess};

/// The server's header deadline (observer/src/server/conn.rs).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `request` on a fresh connection and reads the whole response (the
/// request asks the server to close). Returns the status code, or `None`
/// when the server closed the connection without answering.
fn exchange(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<(Option<u16>, String)> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // A server that refuses early may reset the connection while we write.
    let write = stream.write_all(request);
    let mut response = Vec::new();
    let read = stream.read_to_end(&mut response);
    if response.is_empty() {
        write?;
        read?;
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|s| s.parse().ok());
    Ok((status, text))
}

fn request(ns: &NetNs, addr: SocketAddr, request: &str) -> (Option<u16>, String) {
    let mut s = ns.connect(addr).unwrap();
    exchange(&mut s, request.as_bytes()).unwrap()
}

#[test]
fn metrics_server_withstands_abuse() {
    let ns = NetNs::new("http").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo"]).unwrap();
    let addr = observer.addr();

    // Methods: only GET and HEAD.
    for method in ["POST", "PUT", "DELETE"] {
        let (status, text) = request(
            &ns,
            addr,
            &format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(status, Some(405), "{method}: {text}");
        let allow = text.lines().find(|l| l.to_ascii_lowercase().starts_with("allow:")).unwrap_or_default().to_string();
        assert!(allow.contains("GET") && allow.contains("HEAD"), "{method}: {text}");
    }
    let (status, text) = request(&ns, addr, "HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status, Some(200), "{text}");
    assert_eq!(request(&ns, addr, "GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").0, Some(404));
    for path in ["/healthz", "/readyz"] {
        let (status, text) =
            request(&ns, addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
        assert_eq!(status, Some(200), "{text}");
        assert!(text.to_ascii_lowercase().contains("cache-control: no-store"), "{path}: {text}");
    }

    // A 100 KB header: 431, or the connection closed without an answer.
    let big =
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "a".repeat(100_000));
    let mut s = ns.connect(addr).unwrap();
    match exchange(&mut s, big.as_bytes()) {
        Ok((status, text)) => assert!(matches!(status, Some(431) | None), "100 KB header answered: {text:.200}"),
        Err(e) => assert!(matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe), "{e}"),
    }

    // Slow headers, one byte a second: cut off about HEADER_READ_TIMEOUT after
    // the first byte.
    let mut s = ns.connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
    let started = Instant::now();
    let slow = b"GET /metrics HTTP/1.1\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a'));
    let mut closed_after = None;
    for &byte in slow.take(40) {
        if s.write_all(&[byte]).is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        // Doubles as the one-second pace: returns at once if the server closed.
        let mut buf = [0u8; 1024];
        match s.read(&mut buf) {
            Ok(0) => {
                closed_after = Some(started.elapsed());
                break;
            }
            Ok(n) => panic!("the server answered incomplete headers: {}", String::from_utf8_lossy(&buf[..n])),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed_after = Some(started.elapsed());
                break;
            }
        }
    }
    let closed_after = closed_after.expect("a client sending one header byte a second was never cut off");
    eprintln!("slow-headers client cut off after {closed_after:?}");
    assert!(
        closed_after >= HEADER_READ_TIMEOUT - Duration::from_secs(1) && closed_after <= HEADER_READ_TIMEOUT * 3 / 2,
        "cut off after {closed_after:?}, deadline {HEADER_READ_TIMEOUT:?}"
    );

    // 1,000 concurrent scrapes, each on its own connection.
    const CLIENTS: usize = 1000;
    // Threads start within tens of milliseconds of each other while each
    // scrape takes a millisecond or more: the server sees them concurrently.
    let started = Instant::now();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| {
            ns.spawn(move || {
                let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
                exchange(&mut s, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            })
        })
        .collect();
    let mut failures = Vec::new();
    for h in handles {
        match h.join().unwrap() {
            Ok((Some(200), text)) if text.contains("observer_build_info") => {}
            Ok((status, text)) => failures.push(format!("status {status:?}: {text:.200}")),
            Err(e) => failures.push(e.to_string()),
        }
    }
    eprintln!("{CLIENTS} concurrent scrapes took {:?}", started.elapsed());
    assert!(failures.is_empty(), "{} of {CLIENTS} scrapes failed, first: {}", failures.len(), failures[0]);

    // Still healthy, on the harness' keep-alive connection too.
    assert!(observer.try_status().unwrap().is_none(), "the observer exited");
    assert_eq!(observer.get("/healthz").unwrap().status, 200);
    let m = observer.metrics().unwrap();
    assert!(m.sum("observer_scrape_duration_seconds_count", &[]) >= CLIENTS as f64);
}
