//! The short-connection load generator: client threads that each connect to a local
//! server, send a few bytes and close, as fast as they can; and a holder that opens
//! many connections and keeps them open. Everything runs in the benchmark's network
//! namespace, on loopback.
//!
//! Written here rather than taken from a package: the benchmark needs the exact count
//! of connections made (each is two sessions for the observer, one per end), which
//! generic HTTP load tools do not give for plain TCP.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use socket2::{Domain, Socket, Type};

use super::sys::NetNs;

/// Where the servers listen, in the benchmark's own namespace.
pub const RATE_PORT: u16 = 5301;
const HOLD_PORT: u16 = 5302;
/// Client threads: more than the CPUs, so one blocked in connect() leaves work for the
/// others, but few enough that they do not just queue for the CPUs.
pub const CLIENT_THREADS: usize = 4;
/// Server threads, each accepting and draining one connection at a time.
const SERVER_THREADS: usize = 2;
/// Bytes each short connection sends before it closes.
pub const PAYLOAD_BYTES: usize = 64;
/// Clients bind 127.0.0.2 ..= 127.0.0.(1 + SOURCES) before connecting: each source
/// address has its own ephemeral port range, so 100,000 open connections (and the
/// TIME_WAIT sockets of short ones) do not run out of ports.
const SOURCES: u8 = 8;
const LISTEN_BACKLOG: i32 = 4096;

/// What one generator run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    /// Connections that connected, sent and closed.
    pub connections: u64,
    /// Connection attempts that failed (connect refused or out of ports).
    pub failed: u64,
    pub seconds: f64,
}

impl Run {
    pub fn rate(&self) -> f64 {
        self.connections as f64 / self.seconds
    }
}

/// Sets the namespace's ephemeral port range to its widest, so each source address
/// offers 64,000 ports.
pub fn widen_port_range(ns: &NetNs) -> Result<()> {
    ns.run_in(|| std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535"))?
        .context("setting net.ipv4.ip_local_port_range in the benchmark's namespace")
}

fn listener(ns: &NetNs, port: u16, backlog: i32) -> Result<TcpListener> {
    ns.run_in(|| -> io::Result<TcpListener> {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        sock.set_reuse_address(true)?;
        sock.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
        sock.listen(backlog)?;
        Ok(sock.into())
    })?
    .with_context(|| format!("listening on 127.0.0.1:{port} in the benchmark's namespace"))
}

/// Stops accept threads: shutdown(2) on a listening socket wakes every accept(2)
/// blocked on it (Linux), which then fails and sees the flag.
fn wake_acceptors(listener: &TcpListener, stop: &AtomicBool) {
    stop.store(true, Ordering::SeqCst);
    // SAFETY: shutdown on a socket fd the caller owns.
    unsafe { libc::shutdown(listener.as_raw_fd(), libc::SHUT_RDWR) };
}

/// The server side of short connections: accepts, reads the client's bytes, closes.
pub struct Server {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    pub fn start(ns: &NetNs) -> Result<Self> {
        let listener = Arc::new(listener(ns, RATE_PORT, LISTEN_BACKLOG)?);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..SERVER_THREADS)
            .map(|_| {
                let (listener, stop) = (listener.clone(), stop.clone());
                thread::spawn(move || serve(&listener, &stop))
            })
            .collect();
        Ok(Server { listener, stop, threads })
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool) {
    let mut buf = [0u8; PAYLOAD_BYTES];
    while !stop.load(Ordering::Relaxed) {
        let Ok((mut conn, _)) = listener.accept() else {
            // EMFILE and the like: let the clients' failures show it, do not spin.
            thread::sleep(Duration::from_millis(1));
            continue;
        };
        // The server closes first, as an HTTP/1.0 server does, so the TIME_WAIT sockets
        // are the server's. Client TIME_WAITs would pile up (60 s each, 100,000s of them
        // over a benchmark) and make every connect(2) search longer for a free port:
        // measured here, rates fell from 17,000 to 200 connections/s over 5 rounds.
        let _ = conn.read_exact(&mut buf);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        wake_acceptors(&self.listener, &self.stop);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs the clients for `duration`: each connection connects, sends `PAYLOAD_BYTES`
/// and closes. `rate` (connections per second, all threads together) paces them;
/// None runs them flat out.
pub fn run(ns: &NetNs, duration: Duration, rate: Option<f64>) -> Result<Run> {
    let made = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let first_error = std::sync::Mutex::new(None::<io::Error>);
    let started = Instant::now();
    let deadline = started + duration;
    let interval = rate.map(|r| Duration::from_secs_f64(CLIENT_THREADS as f64 / r));
    thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..CLIENT_THREADS)
            .map(|t| {
                let (made, failed, first_error) = (&made, &failed, &first_error);
                scope.spawn(move || -> Result<()> {
                    ns.enter_this_thread()?;
                    let mut next = Instant::now();
                    let mut n = t;
                    while Instant::now() < deadline {
                        if let Some(interval) = interval {
                            let now = Instant::now();
                            if now < next {
                                thread::sleep(next - now);
                            }
                            next += interval;
                        }
                        n = n.wrapping_add(CLIENT_THREADS);
                        match short_connection(source(n)) {
                            Ok(()) => made.fetch_add(1, Ordering::Relaxed),
                            Err(err) => {
                                first_error.lock().unwrap().get_or_insert(err);
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("a load generator thread panicked"))??;
        }
        Ok(())
    })?;
    let run =
        Run { connections: made.into_inner(), failed: failed.into_inner(), seconds: started.elapsed().as_secs_f64() };
    if let Some(err) = first_error.into_inner().unwrap() {
        eprintln!(
            "xtask: warning: {} of {} connections failed, the first with: {err}",
            run.failed,
            run.failed + run.connections
        );
    }
    Ok(run)
}

/// The n-th source address.
fn source(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (n % usize::from(SOURCES)) as u8)
}

/// A socket bound to `src` without a port: the port is chosen at connect, per
/// destination, so the source's whole range is usable (IP_BIND_ADDRESS_NO_PORT).
fn client_socket(src: Ipv4Addr) -> io::Result<Socket> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    sock.bind(&SocketAddr::from((src, 0)).into())?;
    Ok(sock)
}

fn short_connection(src: Ipv4Addr) -> io::Result<()> {
    let sock = client_socket(src)?;
    sock.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, RATE_PORT)).into())?;
    (&sock).write_all(&[0x42; PAYLOAD_BYTES])?;
    // Wait for the server's close (end of stream), then close.
    let mut byte = [0u8; 1];
    while (&sock).read(&mut byte)? > 0 {}
    Ok(())
}

/// Connections each holding process opens: under the open-file limit (20,000 on
/// machines like this one, where even root lacks CAP_SYS_RESOURCE to raise it).
const HOLD_PER_PROCESS: usize = 15_000;

/// `n` connections held open; dropping it closes them.
///
/// The client ends live in helper processes (`xtask hold-connections`, several, since
/// one process may not have enough file descriptors); the server ends stay in the
/// listener's accept queue, never accepted, so they need no descriptor at all. Both
/// ends are established sockets the observer tracks.
pub struct Held {
    helpers: Vec<Child>,
    _listener: TcpListener,
}

impl Drop for Held {
    fn drop(&mut self) {
        // Closing a helper's stdin tells it to exit, which closes its connections.
        for h in &mut self.helpers {
            drop(h.stdin.take());
        }
        for h in &mut self.helpers {
            let _ = h.wait();
        }
    }
}

/// Opens `n` connections on loopback and keeps them open. `xtask` is this program's
/// own executable, run for the helpers.
pub fn open_and_hold(ns: &NetNs, n: usize, xtask: &Path) -> Result<Held> {
    // The accept queue holds them all: raise the namespace's cap on listen backlogs.
    let backlog = i32::try_from(n + 1024).context("too many connections to hold")?;
    ns.run_in(|| std::fs::write("/proc/sys/net/core/somaxconn", backlog.to_string()))?
        .context("setting net.core.somaxconn in the benchmark's namespace")?;
    let listener = listener(ns, HOLD_PORT, backlog)?;
    let mut held = Held { helpers: Vec::new(), _listener: listener };
    let mut first = 0;
    while first < n {
        let count = HOLD_PER_PROCESS.min(n - first);
        let mut cmd = ns.command(xtask);
        cmd.args(["hold-connections", "--port", &HOLD_PORT.to_string()])
            .args(["--count", &count.to_string(), "--first", &first.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let child = cmd.spawn().with_context(|| format!("starting `{}`", crate::util::show(&cmd)))?;
        held.helpers.push(child);
        first += count;
    }
    // One at a time: each says "ready" once all its connections are open.
    for h in &mut held.helpers {
        let mut line = String::new();
        let stdout = h.stdout.take().context("helper without stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        ensure!(line.trim() == "ready", "a connection-holding helper failed (it said {:?})", line.trim());
    }
    Ok(held)
}

/// The helper's side (`xtask hold-connections`): opens `count` connections to
/// 127.0.0.1:`port` from the sources after the `first`-th, says "ready" on stdout and
/// keeps them until stdin closes.
pub fn hold_connections(port: u16, count: usize, first: usize) -> Result<()> {
    let dst = SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into();
    let mut open = Vec::with_capacity(count);
    for i in first..first + count {
        let sock = client_socket(source(i))?;
        sock.connect(&dst).with_context(|| format!("connection {} of {count}", open.len() + 1))?;
        open.push(sock);
    }
    println!("ready");
    io::stdout().flush()?;
    // Blocks until the parent closes its end (or dies).
    io::copy(&mut io::stdin(), &mut io::sink())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_rotate_over_loopback_addresses() {
        assert_eq!(source(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source(7), Ipv4Addr::new(127, 0, 0, 9));
        assert_eq!(source(8), Ipv4Addr::new(127, 0, 0, 2));
        assert!((0..100).all(|n| source(n).is_loopback() && source(n) != Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn rate_is_connections_per_second() {
        let run = Run { connections: 50_000, failed: 0, seconds: 2.0 };
        assert_eq!(run.rate(), 25_000.0);
    }
}
