//! The tests' HTTP client: ureq, over ONE connection that the scraper opens itself.
//!
//! Every TCP connection on the observed loopback is itself a session the
//! observer may report, so scraping with a fresh connection each time would
//! change the very counts a test checks. The scraper gives ureq a connector of
//! its own, which opens the connection the scraper's way (from inside the test's
//! namespace), counts every open in [`Scraper::connections_opened`] and keeps
//! sight of the socket (its local address, its TCP_INFO); ureq's agent keeps
//! that one connection between requests, for as long as the server does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, Transport};

use crate::netns::NetNs;

/// Read and write timeout for one request: long enough for a loaded CI box,
/// short enough that a wedged observer fails the test quickly.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Cap protecting the test from a runaway server.
const MAX_BODY: u64 = 64 * 1024 * 1024;

/// One HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// In received order (compare names case-insensitively, or use
    /// [`Response::header`]).
    pub headers: Vec<(String, String)>,
    /// Decoded body (chunked transfer encoding already removed).
    pub body: Vec<u8>,
}

impl Response {
    /// First header of that name, case-insensitive.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as UTF-8 (lossy: a metrics page is ASCII anyway, and a
    /// readable error beats a decode failure in a test log).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

type Connect = Box<dyn FnMut() -> std::io::Result<TcpStream> + Send>;

/// What the scraper and its connector share.
struct Shared {
    connect: Mutex<Connect>,
    /// The socket of the connection ureq holds, while it holds it.
    socket: Mutex<Weak<TcpStream>>,
    opened: AtomicU32,
}

/// HTTP/1.1 client over a single persistent connection.
pub struct Scraper {
    addr: SocketAddr,
    shared: Arc<Shared>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for Scraper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraper")
            .field("addr", &self.addr)
            .field("connected", &self.socket().is_some())
            .field("connections_opened", &self.connections_opened())
            .finish()
    }
}

impl Scraper {
    /// A scraper whose connection is opened from inside `ns` (lazily, on
    /// the first request). The socket keeps the namespace it was created in,
    /// so the scraper itself can be used from any thread.
    pub fn new(ns: &NetNs, addr: SocketAddr) -> Self {
        let ns = ns.clone();
        Self::with_connector(addr, move || {
            ns.try_run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5))).map_err(std::io::Error::other)?
        })
    }

    /// A scraper that connects from the calling thread's namespace.
    pub fn new_here(addr: SocketAddr) -> Self {
        Self::with_connector(addr, move || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))
    }

    /// A scraper using a custom way to open its connection.
    pub fn with_connector(
        addr: SocketAddr,
        connector: impl FnMut() -> std::io::Result<TcpStream> + Send + 'static,
    ) -> Self {
        let shared = Arc::new(Shared {
            connect: Mutex::new(Box::new(connector)),
            socket: Mutex::new(Weak::new()),
            opened: 0.into(),
        });
        Self { addr, agent: agent(&shared), shared }
    }

    /// The server address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many TCP connections this scraper has opened so far. Tests that
    /// count sessions exactly should assert this stays 1.
    pub fn connections_opened(&self) -> u32 {
        self.shared.opened.load(Ordering::Relaxed)
    }

    fn socket(&self) -> Option<Arc<TcpStream>> {
        self.shared.socket.lock().unwrap_or_else(|e| e.into_inner()).upgrade()
    }

    /// The local address of the open connection, if any: lets tests
    /// recognise (and exclude) the scrape connection among reported sessions.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.socket()?.local_addr().ok()
    }

    /// Payload bytes the open connection has moved so far, both directions
    /// (TCP_INFO: sent and acknowledged, plus received). The scrape
    /// connection is itself an observed session on the observer's `lo`, so
    /// a test bounding the observer's byte counters from above allows for it.
    pub fn bytes_moved(&self) -> Option<u64> {
        let info = crate::traffic::tcp_info(&*self.socket()?)?;
        Some(info.tcpi_bytes_acked + info.tcpi_bytes_received)
    }

    /// Drops the connection; the next request opens a new one.
    pub fn disconnect(&mut self) {
        // The agent's pool holds the connection: a new agent drops it.
        self.agent = agent(&self.shared);
    }

    /// `GET path`, reusing the open connection.
    ///
    /// A connection the server has closed while idle is not reused: the next
    /// request opens another, with a warning on stderr, and
    /// [`Scraper::connections_opened`] shows it. If a request over a kept
    /// connection fails, it is retried once over a new one; any other failure
    /// drops the connection and is returned.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        let kept = self.socket().is_some();
        let opened = self.connections_opened();
        let result = match self.try_get(path) {
            Err(e) if kept && self.connections_opened() == opened => {
                eprintln!(
                    "warning: scraper: GET {path} over the kept connection to {} failed ({e:#}); retrying",
                    self.addr
                );
                self.disconnect();
                self.try_get(path)
            }
            other => {
                if kept && self.connections_opened() > opened {
                    eprintln!(
                        "warning: scraper: the server closed the keep-alive connection to {}; reconnected",
                        self.addr
                    );
                }
                other
            }
        };
        result.inspect_err(|_| self.disconnect())
    }

    /// `GET path` expecting 200; returns the body as text.
    pub fn get_ok_text(&mut self, path: &str) -> Result<String> {
        let r = self.get(path)?;
        if r.status != 200 {
            bail!("GET {path}: status {} body {:?}", r.status, r.text());
        }
        Ok(r.text())
    }

    fn try_get(&mut self, path: &str) -> Result<Response> {
        let url = format!("http://{}{path}", self.addr);
        let mut answer = self
            .agent
            .get(&url)
            .header("Accept", "text/plain;version=0.0.4;q=1,*/*;q=0.1")
            .call()
            .with_context(|| format!("GET {url}"))?;
        let status = answer.status().as_u16();
        let headers = answer
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let body = answer.body_mut().with_config().limit(MAX_BODY).read_to_vec();
        Ok(Response { status, headers, body: body.with_context(|| format!("reading the answer to GET {url}"))? })
    }
}

/// ureq's agent over the scraper's connector: every status is an answer (the
/// test judges it), at most one idle connection, kept as long as the server keeps it.
fn agent(shared: &Arc<Shared>) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .user_agent("observer-tests")
        .max_idle_connections_per_host(1)
        .max_idle_age(Duration::from_secs(24 * 3600))
        .build();
    ureq::Agent::with_parts(config, OneConnection(shared.clone()), DefaultResolver::default())
}

/// Opens the scraper's connections (ureq calls it when it has none to reuse).
struct OneConnection(Arc<Shared>);

impl std::fmt::Debug for OneConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OneConnection").finish_non_exhaustive()
    }
}

impl Connector for OneConnection {
    type Out = Socket;

    fn connect(&self, details: &ConnectionDetails, _: Option<()>) -> Result<Option<Socket>, ureq::Error> {
        let stream = (self.0.connect.lock().unwrap_or_else(|e| e.into_inner()))()?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let stream = Arc::new(stream);
        *self.0.socket.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(&stream);
        self.0.opened.fetch_add(1, Ordering::Relaxed);
        let buffers = LazyBuffers::new(details.config.input_buffer_size(), details.config.output_buffer_size());
        Ok(Some(Socket { stream, buffers }))
    }
}

/// A plain TCP transport; the socket's own timeouts ([`IO_TIMEOUT`]) bound each
/// read and write. Closed when ureq drops it (the scraper holds it weakly).
#[derive(Debug)]
struct Socket {
    stream: Arc<TcpStream>,
    buffers: LazyBuffers,
}

impl Transport for Socket {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, _: NextTimeout) -> Result<(), ureq::Error> {
        Ok((&*self.stream).write_all(&self.buffers.output()[..amount])?)
    }

    fn await_input(&mut self, _: NextTimeout) -> Result<bool, ureq::Error> {
        let n = (&*self.stream).read(self.buffers.input_append_buf())?;
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    /// Whether the server has not closed it (nor sent anything unasked).
    fn is_open(&mut self) -> bool {
        let probe = || -> std::io::Result<bool> {
            self.stream.set_nonblocking(true)?;
            let open = match (&*self.stream).read(&mut [0]) {
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                Ok(_) => false,
            };
            self.stream.set_nonblocking(false)?;
            Ok(open)
        };
        probe().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::net::TcpListener;

    /// Reads one request's head; false at the end of the connection.
    fn read_request(r: &mut impl BufRead) -> bool {
        let mut first = true;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap() == 0 {
                return false;
            }
            if line == "\r\n" {
                return !first;
            }
            first = false;
        }
    }

    /// A tiny server answering every request on one connection, in turn with a
    /// length and chunked, to check the client really reuses it.
    #[test]
    fn reuses_one_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (s, peer) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            for i in 0..3 {
                assert!(read_request(&mut r));
                let body = format!("n {i}\n");
                if i % 2 == 0 {
                    write!(w, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
                } else {
                    write!(
                        w,
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
                        body.len()
                    )
                    .unwrap();
                }
            }
            // Open until the client closes it.
            assert!(!read_request(&mut r));
            peer
        });
        let mut s = Scraper::new_here(addr);
        assert_eq!(s.local_addr(), None);
        for i in 0..3 {
            assert_eq!(s.get_ok_text("/metrics").unwrap(), format!("n {i}\n"));
        }
        assert_eq!(s.connections_opened(), 1);
        let local = s.local_addr();
        assert!(s.bytes_moved().unwrap() > 3 * 30, "{:?}", s.bytes_moved());
        s.disconnect();
        assert_eq!(s.local_addr(), None);
        // The server saw the end of the one connection it served.
        assert_eq!(local, Some(srv.join().unwrap()), "disconnect closes the connection");
    }

    /// Every status is an answer, with its headers; a server that closes the
    /// connection is reconnected to, and that shows in the count.
    #[test]
    fn statuses_headers_and_reconnects() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            for answer in [
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot ready",
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            ] {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                assert!(read_request(&mut r));
                (&s).write_all(answer.as_bytes()).unwrap();
            }
        });
        let mut s = Scraper::new_here(addr);
        let r = s.get("/readyz").unwrap();
        assert_eq!((r.status, r.text().as_str(), r.header("content-type")), (503, "not ready", Some("text/plain")));
        assert!(s.get_ok_text("/readyz").is_ok());
        assert_eq!(s.connections_opened(), 2);
        srv.join().unwrap();
    }

    #[test]
    fn a_refused_connection_is_an_error_and_not_counted() {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let mut s = Scraper::new_here(addr);
        assert!(s.get("/metrics").is_err());
        assert_eq!(s.connections_opened(), 0);
    }
}
