//! A minimal HTTP/1.1 client that keeps ONE connection open.
//!
//! Every TCP connection on the observed loopback is itself a session the
//! observer may report, so scraping with a fresh connection each time would
//! change the very counts a test checks. General-purpose HTTP clients pool
//! and re-open connections at will; this one makes the connection explicit
//! and counts every (re)open in [`Scraper::connections_opened`].

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;

/// Read and write timeout for one request: long enough for a loaded CI box,
/// short enough that a wedged observer fails the test quickly.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Caps protecting the test from a runaway server.
const MAX_LINE: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024 * 1024;

/// One HTTP response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    /// In received order; names as sent (compare case-insensitively, or use
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

type Connector = Box<dyn FnMut() -> std::io::Result<TcpStream> + Send>;

/// HTTP/1.1 client over a single persistent connection.
pub struct Scraper {
    addr: SocketAddr,
    connector: Connector,
    conn: Option<BufReader<TcpStream>>,
    /// Requests sent over the current connection.
    on_conn: u64,
    connections_opened: u32,
}

impl std::fmt::Debug for Scraper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraper")
            .field("addr", &self.addr)
            .field("connected", &self.conn.is_some())
            .field("connections_opened", &self.connections_opened)
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
        Self { addr, connector: Box::new(connector), conn: None, on_conn: 0, connections_opened: 0 }
    }

    /// The server address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many TCP connections this scraper has opened so far. Tests that
    /// count sessions exactly should assert this stays 1.
    pub fn connections_opened(&self) -> u32 {
        self.connections_opened
    }

    /// The local address of the open connection, if any: lets tests
    /// recognise (and exclude) the scrape connection among reported sessions.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.conn.as_ref().and_then(|c| c.get_ref().local_addr().ok())
    }

    /// Payload bytes the open connection has moved so far, both directions
    /// (TCP_INFO: sent and acknowledged, plus received). The scrape
    /// connection is itself an observed session on the observer's `lo`, so
    /// a test bounding the observer's byte counters from above allows for it.
    pub fn bytes_moved(&self) -> Option<u64> {
        let info = crate::traffic::tcp_info(self.conn.as_ref()?.get_ref())?;
        Some(info.tcpi_bytes_acked + info.tcpi_bytes_received)
    }

    /// Opens the connection now if none is open (no request is sent).
    pub fn ensure_connected(&mut self) -> Result<()> {
        if self.conn.is_none() {
            let s = (self.connector)().with_context(|| format!("connecting to {}", self.addr))?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)?;
            self.conn = Some(BufReader::new(s));
            self.on_conn = 0;
            self.connections_opened += 1;
        }
        Ok(())
    }

    /// Drops the connection; the next request opens a new one.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// `GET path`, reusing the open connection.
    ///
    /// If the server had closed the idle connection before our request (EOF
    /// before any response byte, or a reset on write), this reconnects once
    /// and retries, with a warning on stderr; [`Scraper::connections_opened`]
    /// then shows it. Any other failure drops the connection and is returned.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        match self.try_get(path) {
            Ok(r) => Ok(r),
            Err(GetError::StaleConnection(e)) => {
                eprintln!(
                    "warning: scraper: server closed the keep-alive connection to {} ({e}); reconnecting",
                    self.addr
                );
                self.conn = None;
                match self.try_get(path) {
                    Ok(r) => Ok(r),
                    Err(GetError::StaleConnection(e)) | Err(GetError::Other(e)) => {
                        self.conn = None;
                        Err(e)
                    }
                }
            }
            Err(GetError::Other(e)) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    /// `GET path` expecting 200; returns the body as text.
    pub fn get_ok_text(&mut self, path: &str) -> Result<String> {
        let r = self.get(path)?;
        if r.status != 200 {
            bail!("GET {path}: status {} body {:?}", r.status, r.text());
        }
        Ok(r.text())
    }

    fn try_get(&mut self, path: &str) -> Result<Response, GetError> {
        self.ensure_connected().map_err(GetError::Other)?;
        let reused = self.on_conn > 0;
        let addr = self.addr;
        let Some(conn) = self.conn.as_mut() else {
            return Err(GetError::Other(anyhow::anyhow!("no connection")));
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: observer-tests\r\n\
             Accept: text/plain;version=0.0.4;q=1,*/*;q=0.1\r\nConnection: keep-alive\r\n\r\n"
        );
        if let Err(e) = conn.get_mut().write_all(req.as_bytes()) {
            let stale =
                reused && matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset);
            let e = anyhow::Error::new(e).context(format!("sending GET {path}"));
            return Err(if stale { GetError::StaleConnection(e) } else { GetError::Other(e) });
        }
        self.on_conn += 1;
        // Distinguish "closed before answering" (retryable) from a broken response.
        match conn.fill_buf() {
            Ok([]) if reused => {
                return Err(GetError::StaleConnection(anyhow::anyhow!("EOF before response")));
            }
            Err(e) if reused && e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(GetError::StaleConnection(e.into()));
            }
            _ => {}
        }
        let (resp, keep) = read_response(conn)
            .with_context(|| format!("reading response to GET {path} from {addr}"))
            .map_err(GetError::Other)?;
        if !keep {
            self.conn = None;
        }
        Ok(resp)
    }
}

enum GetError {
    StaleConnection(anyhow::Error),
    Other(anyhow::Error),
}

/// Reads one response; the flag says whether the connection stays usable.
fn read_response<R: BufRead>(r: &mut R) -> Result<(Response, bool)> {
    let status_line = read_line(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x status line: {status_line:?}");
    }
    let status: u16 =
        parts.next().and_then(|s| s.parse().ok()).with_context(|| format!("bad status line {status_line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').with_context(|| format!("bad header line {line:?}"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
        if headers.len() > 200 {
            bail!("too many headers");
        }
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.as_str());
    let mut keep = match get("connection") {
        Some(v) => !v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")),
        None => version != "HTTP/1.0",
    };
    let body = if (100..200).contains(&status) || status == 204 || status == 304 {
        Vec::new()
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        decode_chunked(r)?
    } else if let Some(cl) = get("content-length") {
        let n: usize = cl.parse().with_context(|| format!("bad Content-Length {cl:?}"))?;
        if n > MAX_BODY {
            bail!("Content-Length {n} too large");
        }
        let mut b = vec![0; n];
        r.read_exact(&mut b).context("reading body")?;
        b
    } else {
        // Body delimited by connection close.
        keep = false;
        let mut b = Vec::new();
        r.take(MAX_BODY as u64 + 1).read_to_end(&mut b).context("reading body to EOF")?;
        b
    };
    if body.len() > MAX_BODY {
        bail!("body too large");
    }
    Ok((Response { status, headers, body }, keep))
}

/// Decodes a chunked body, consuming the terminating chunk and any trailer
/// section, so the connection is positioned at the next response.
pub fn decode_chunked<R: BufRead>(r: &mut R) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r)?;
        let size_s = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_s, 16).with_context(|| format!("bad chunk size line {line:?}"))?;
        if size == 0 {
            // Trailer fields, then an empty line.
            while !read_line(r)?.is_empty() {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            bail!("chunked body too large");
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..]).context("reading chunk")?;
        let end = read_line(r)?;
        if !end.is_empty() {
            bail!("chunk not followed by CRLF (got {end:?})");
        }
    }
}

/// One CRLF- (or LF-) terminated line without its terminator. EOF is an
/// error: every line we read is required by the protocol.
fn read_line<R: BufRead>(r: &mut R) -> Result<String> {
    let mut buf = Vec::new();
    let n = r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        bail!("unexpected EOF");
    }
    if buf.last() != Some(&b'\n') {
        if buf.len() > MAX_LINE {
            bail!("line too long");
        }
        bail!("unexpected EOF inside a line");
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    String::from_utf8(buf).context("non-UTF-8 line")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::net::TcpListener;

    #[test]
    fn chunked_with_extensions_and_trailers() {
        let raw = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\nNEXT";
        let mut c = Cursor::new(&raw[..]);
        assert_eq!(decode_chunked(&mut c).unwrap(), b"hello, world");
        let mut rest = String::new();
        c.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "NEXT");
    }

    #[test]
    fn chunked_uppercase_hex_and_bad_input() {
        let raw = b"A\r\n0123456789\r\n0\r\n\r\n";
        assert_eq!(decode_chunked(&mut Cursor::new(&raw[..])).unwrap(), b"0123456789");
        assert!(decode_chunked(&mut Cursor::new(&b"zz\r\n"[..])).is_err());
        assert!(decode_chunked(&mut Cursor::new(&b"5\r\nhel"[..])).is_err());
        assert!(decode_chunked(&mut Cursor::new(&b"3\r\nabcX\r\n0\r\n\r\n"[..])).is_err());
    }

    #[test]
    fn parses_pipelined_responses() {
        let raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n\
                    3\r\nabc\r\n0\r\n\r\n\
                    HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\nnot ready\
                    HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n";
        let mut c = Cursor::new(&raw[..]);
        let (a, keep) = read_response(&mut c).unwrap();
        assert_eq!((a.status, a.body.as_slice(), keep), (200, &b"abc"[..], true));
        assert_eq!(a.header("Content-Type"), Some("text/plain"));
        let (b, _) = read_response(&mut c).unwrap();
        assert_eq!((b.status, b.text().as_str()), (503, "not ready"));
        let (d, keep) = read_response(&mut c).unwrap();
        assert_eq!((d.status, d.body.len(), keep), (204, 0, false));
    }

    /// A tiny server answering every request on one connection, to check the
    /// client really reuses it.
    #[test]
    fn reuses_one_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let srv = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            for i in 0..3 {
                loop {
                    let line = read_line(&mut r).unwrap();
                    if line.is_empty() {
                        break;
                    }
                }
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
        });
        let mut s = Scraper::new_here(addr);
        for i in 0..3 {
            assert_eq!(s.get_ok_text("/metrics").unwrap(), format!("n {i}\n"));
        }
        assert_eq!(s.connections_opened(), 1);
        srv.join().unwrap();
    }
}
