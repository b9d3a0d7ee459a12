//! Deterministic TCP traffic: a server and a client that move exactly the
//! byte counts a test asks for, so observer counters can be compared with
//! exact expectations.
//!
//! Wire protocol (client → server first):
//! 1. the client sends a 16-byte header: `u64` BE bytes it will send next,
//!    `u64` BE bytes the server must send back;
//! 2. the client sends that many bytes; the server reads them all;
//! 3. the server sends its bytes; the client reads them all;
//! 4. the client shuts down its write side, the server sees EOF and closes,
//!    the client sees EOF and closes.
//!
//! So on the wire the client sends `HEADER_LEN + send` payload bytes and
//! receives `recv`; the client closes first (its socket ends in TIME_WAIT).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;
use crate::util::wait_until;

/// Size of the request header, counted in the client's sent bytes.
pub const HEADER_LEN: u64 = 16;
/// Unit of writes and reads, and of pacing.
pub const CHUNK: usize = 64 * 1024;
/// Per-operation socket timeout; a stalled peer becomes an error, not a hang.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

static ZEROS: [u8; CHUNK] = [0; CHUNK];

/// What one [`transfer`] did, from the client's side.
#[derive(Clone, Copy, Debug)]
pub struct TransferStats {
    /// Client socket address (as the server and observer see it).
    pub local: SocketAddr,
    /// Server socket address.
    pub peer: SocketAddr,
    /// Payload bytes the client wrote: [`HEADER_LEN`] + `send`.
    pub sent: u64,
    /// Payload bytes the client read: `recv`.
    pub received: u64,
    /// Just before `connect()`.
    pub started: Instant,
    /// Just after the socket was closed.
    pub finished: Instant,
    /// Segments the client's kernel retransmitted (TCP_INFO `tcpi_total_retrans`,
    /// read once the exchange was over, before the close).
    pub retransmits: u32,
}

impl TransferStats {
    /// Wall time from before connect to after close: an upper bound for the
    /// session duration any observer can measure.
    pub fn duration(&self) -> Duration {
        self.finished - self.started
    }
}

/// Connects to `addr` from the calling thread's network namespace and runs
/// the protocol described in the module docs.
///
/// `pace` stretches the exchange over about that long: after each
/// [`CHUNK`] (either direction) the client sleeps until its share of `pace`
/// has elapsed. Reading slowly throttles the server through TCP flow
/// control, but socket buffers absorb a few MiB first, so for long
/// sessions it is the client's timeline that is paced. With no payload at
/// all, the connection is simply held open for `pace`.
pub fn transfer(addr: SocketAddr, send: u64, recv: u64, pace: Option<Duration>) -> Result<TransferStats> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    // Small writes (the header) must not wait for delayed ACKs.
    s.set_nodelay(true)?;
    let local = s.local_addr()?;
    let peer = s.peer_addr()?;
    let ctx = || format!("transfer {local} -> {peer} (send {send}, recv {recv})");

    let chunks = |n: u64| n.div_ceil(CHUNK as u64);
    let total_chunks = (chunks(send) + chunks(recv)).max(1);
    let mut done_chunks = 0u64;
    let mut pace_step = || {
        done_chunks += 1;
        if let Some(p) = pace {
            let frac = p.as_secs_f64() * done_chunks as f64 / total_chunks as f64;
            let due = started + Duration::from_secs_f64(frac);
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
        }
    };

    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(&send.to_be_bytes());
    header[8..].copy_from_slice(&recv.to_be_bytes());
    s.write_all(&header).with_context(ctx)?;
    let mut left = send;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&ZEROS[..n]).with_context(ctx)?;
        left -= n as u64;
        pace_step();
    }
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0u64;
    while received < recv {
        let n = (recv - received).min(CHUNK as u64) as usize;
        s.read_exact(&mut buf[..n]).with_context(|| format!("{}: after {received} bytes", ctx()))?;
        received += n as u64;
        pace_step();
    }
    if send == 0 && recv == 0 {
        pace_step();
    }
    s.shutdown(Shutdown::Write).with_context(ctx)?;
    let extra = drain_to_eof(&mut s, &mut buf).with_context(ctx)?;
    if extra != 0 {
        bail!("{}: server sent {extra} bytes more than asked", ctx());
    }
    let retransmits = tcp_info(&s).map_or(0, |i| i.tcpi_total_retrans);
    drop(s);
    let finished = Instant::now();
    Ok(TransferStats { local, peer, sent: HEADER_LEN + send, received, started, finished, retransmits })
}

/// [`transfer`] from inside `ns`.
pub fn transfer_in(
    ns: &NetNs,
    addr: SocketAddr,
    send: u64,
    recv: u64,
    pace: Option<Duration>,
) -> Result<TransferStats> {
    ns.try_run(|| transfer(addr, send, recv, pace))?
}

/// The kernel's TCP_INFO of a connected socket.
pub fn tcp_info(s: &TcpStream) -> Option<libc::tcp_info> {
    // SAFETY: a zeroed tcp_info is a valid value; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid descriptor and a buffer of `len` bytes.
    let rc =
        unsafe { libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, (&raw mut info).cast(), &mut len) };
    (rc == 0).then_some(info)
}

fn drain_to_eof(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<u64> {
    let mut n = 0u64;
    loop {
        match s.read(buf) {
            Ok(0) => return Ok(n),
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// One connection the [`TcpServer`] served, from the server's side.
#[derive(Clone, Debug)]
pub struct ServerConn {
    /// The client's address.
    pub peer: SocketAddr,
    /// The server socket's address.
    pub local: SocketAddr,
    /// Bytes read, header included (so `HEADER_LEN + send` when all went well).
    pub received: u64,
    /// Bytes written.
    pub sent: u64,
    pub accepted: Instant,
    /// Just after the server closed its socket.
    pub closed: Instant,
    /// Why the exchange failed, if it did (bytes above count what happened).
    pub error: Option<String>,
}

type Live = Arc<Mutex<HashMap<u64, TcpStream>>>;

/// Server side of the protocol (see module docs), one thread per
/// connection, stopped and joined on drop.
pub struct TcpServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<ServerConn>>>,
    live: Live,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
    _ns: Option<NetNs>,
}

impl std::fmt::Debug for TcpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpServer").field("addr", &self.addr).finish()
    }
}

impl TcpServer {
    /// Listens on `addr` in the calling thread's network namespace (port 0
    /// picks a free port; see [`TcpServer::addr`]).
    pub fn start(addr: SocketAddr) -> Result<Self> {
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        Self::from_listener(l, None)
    }

    /// Listens on `addr` inside `ns`. The listening socket stays in `ns`;
    /// the serving threads need not be in it.
    pub fn start_in(ns: &NetNs, addr: SocketAddr) -> Result<Self> {
        Self::from_listener(ns.bind(addr)?, Some(ns.clone()))
    }

    fn from_listener(l: TcpListener, ns: Option<NetNs>) -> Result<Self> {
        let addr = l.local_addr()?;
        // Non-blocking + poll lets the acceptor notice `stop` without a
        // wake-up connection, which would be a session of its own.
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let live: Live = Arc::new(Mutex::new(HashMap::new()));
        let workers = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, done, live, workers) = (stop.clone(), done.clone(), live.clone(), workers.clone());
            thread::Builder::new()
                .name(format!("tcpserver-{addr}"))
                .spawn(move || accept_loop(l, stop, done, live, workers))?
        };
        Ok(Self { addr, stop, done, live, workers, acceptor: Some(acceptor), _ns: ns })
    }

    /// The bound address (with the real port if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections finished so far, in order of completion.
    pub fn connections(&self) -> Vec<ServerConn> {
        lock(&self.done).clone()
    }

    /// Waits (bounded) until at least `n` connections have finished.
    pub fn wait_connections(&self, n: usize, timeout: Duration) -> Result<Vec<ServerConn>> {
        wait_until(&format!("{n} finished connections on {}", self.addr), timeout, Duration::from_millis(10), || {
            let c = self.connections();
            Ok((c.len() >= n).then_some(c))
        })
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for s in lock(&self.live).values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let ws: Vec<_> = lock(&self.workers).drain(..).collect();
        for w in ws {
            let _ = w.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(
    l: TcpListener,
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<ServerConn>>>,
    live: Live,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 50) };
        let (s, peer) = match l.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                continue;
            }
            Err(e) => {
                eprintln!("tcpserver: accept failed: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let accepted = Instant::now();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = s.try_clone() {
            lock(&live).insert(id, c);
        }
        let (done, live2) = (done.clone(), live.clone());
        let spawned = thread::Builder::new().name(format!("tcpserver-conn-{peer}")).spawn(move || {
            let c = serve(s, peer, accepted);
            lock(&live2).remove(&id);
            lock(&done).push(c);
        });
        match spawned {
            Ok(h) => lock(&workers).push(h),
            Err(e) => {
                lock(&live).remove(&id);
                eprintln!("tcpserver: cannot spawn a connection thread: {e}");
            }
        }
    }
}

fn serve(mut s: TcpStream, peer: SocketAddr, accepted: Instant) -> ServerConn {
    let local = s.local_addr().unwrap_or(peer);
    let mut received = 0u64;
    let mut sent = 0u64;
    let res = serve_inner(&mut s, &mut received, &mut sent);
    drop(s);
    ServerConn {
        peer,
        local,
        received,
        sent,
        accepted,
        closed: Instant::now(),
        error: res.err().map(|e| format!("{e:#}")),
    }
}

fn serve_inner(s: &mut TcpStream, received: &mut u64, sent: &mut u64) -> Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    let mut header = [0u8; HEADER_LEN as usize];
    s.read_exact(&mut header).context("reading header")?;
    *received += HEADER_LEN;
    let mut w = [0u8; 8];
    w.copy_from_slice(&header[..8]);
    let c2s = u64::from_be_bytes(w);
    w.copy_from_slice(&header[8..]);
    let s2c = u64::from_be_bytes(w);
    let mut buf = vec![0u8; CHUNK];
    let mut left = c2s;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        match s.read(&mut buf[..n]) {
            Ok(0) => bail!("client closed with {left} of {c2s} bytes unsent"),
            Ok(k) => {
                left -= k as u64;
                *received += k as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading payload"),
        }
    }
    let mut left = s2c;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&ZEROS[..n]).context("writing payload")?;
        left -= n as u64;
        *sent += n as u64;
    }
    let extra = drain_to_eof(s, &mut buf).context("waiting for the client to close")?;
    *received += extra;
    if extra != 0 {
        bail!("client sent {extra} bytes beyond the announced {c2s}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_here() {
        let srv = TcpServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let t = transfer(srv.addr(), 200_000, 70_000, None).unwrap();
        assert_eq!((t.sent, t.received), (HEADER_LEN + 200_000, 70_000));
        let c = srv.wait_connections(1, Duration::from_secs(10)).unwrap();
        assert_eq!((c[0].received, c[0].sent, c[0].error.as_deref()), (HEADER_LEN + 200_000, 70_000, None));
        assert_eq!(c[0].peer, t.local);
    }

    #[test]
    fn pacing_stretches_the_session() {
        let srv = TcpServer::start("127.0.0.1:0".parse().unwrap()).unwrap();
        let t = transfer(srv.addr(), 4 * CHUNK as u64, 4 * CHUNK as u64, Some(Duration::from_millis(400))).unwrap();
        assert!(t.duration() >= Duration::from_millis(400), "{:?}", t.duration());
        assert!(t.duration() < Duration::from_secs(3), "{:?}", t.duration());
        let t = transfer(srv.addr(), 0, 0, Some(Duration::from_millis(100))).unwrap();
        assert!(t.duration() >= Duration::from_millis(100));
        assert_eq!((t.sent, t.received), (HEADER_LEN, 0));
    }
}
