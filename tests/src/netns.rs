//! Throw-away network namespaces.
//!
//! The observer's kernel programs see every namespace, but `--iface lo` makes
//! it report only sessions on the loopback of the namespace it runs in. Giving
//! each test its own namespace (observer, servers, clients, scraper all inside)
//! is what makes exact per-test counts possible while tests run in parallel.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::{run_with_timeout, wait_until};

const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Names created by this process and not yet deleted, so two tests asking for
/// the same tag get distinct namespaces instead of deleting each other's.
static LIVE: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// A named network namespace (`ip netns add`), deleted when the last clone is
/// dropped.
///
/// Cloning is cheap and shares the namespace: helpers that run processes or
/// threads inside it ([`crate::ObserverProcess`], [`crate::Haproxy`],
/// [`crate::TcpServer`]) keep a clone, so the namespace cannot be deleted
/// while they still use it, whatever order a test drops things in.
#[derive(Clone, Debug)]
pub struct NetNs {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates `obs-<tag>-<pid>` (with `-<n>` appended if this process
    /// already has one by that name), loopback up, IPv4 and IPv6 loopback
    /// usable.
    ///
    /// A namespace of the same name left behind by an earlier, crashed run
    /// with the same pid is deleted first.
    pub fn new(tag: &str) -> Result<Self> {
        if tag.is_empty() || !tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("netns tag {tag:?} must be non-empty [A-Za-z0-9_-]");
        }
        let name = reserve_name(&format!("obs-{tag}-{}", std::process::id()));
        let path = Path::new("/var/run/netns").join(&name);
        if path.exists() {
            let _ = run_with_timeout(Command::new("ip").args(["netns", "delete", &name]), IP_TIMEOUT);
        }
        if let Err(e) = ip(&["netns", "add", &name]) {
            release_name(&name);
            return Err(e);
        }
        // From here on Drop cleans up, also when the set-up below fails.
        let ns = NetNs { inner: Arc::new(Inner { name, path }) };
        ip(&["-n", ns.name(), "link", "set", "lo", "up"])?;
        ns.enable_ipv6_loopback()?;
        Ok(ns)
    }

    /// The namespace name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The bind-mounted namespace file (`/var/run/netns/NAME`).
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// `ip netns exec NAME program`.
    ///
    /// Beware: `ip netns exec` also enters a new mount namespace and remounts
    /// `/sys` for the target netns, which hides sub-mounts such as tracefs
    /// (`/sys/kernel/tracing`), debugfs and bpffs. Programs that need those
    /// (the observer attaching tracepoints does) must use
    /// [`NetNs::command_setns`] instead.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.name()]).arg(program);
        c
    }

    /// A command whose child switches only its network namespace (setns in
    /// the forked child, before exec), keeping the host's mounts, and whose
    /// pid is the program itself, so signals reach it directly.
    pub fn command_setns(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new(program);
        // Allocated before fork: only async-signal-safe calls run in the child.
        let cpath = CString::new(self.path().as_os_str().as_bytes()).ok();
        // SAFETY: the closure only calls open/setns/close and builds
        // `io::Error`s from errno, all async-signal-safe, no allocation.
        unsafe {
            c.pre_exec(move || {
                let Some(p) = cpath.as_ref() else {
                    return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
                };
                let fd = libc::open(p.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = libc::setns(fd, libc::CLONE_NEWNET);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if rc != 0 { Err(err) } else { Ok(()) }
            });
        }
        c
    }

    /// Moves the calling thread into this namespace. Private because it is
    /// irreversible for the thread; [`NetNs::run`] and [`NetNs::spawn`] use
    /// fresh threads for that reason.
    fn enter(&self) -> Result<()> {
        let f = File::open(self.path()).with_context(|| format!("opening {}", self.path().display()))?;
        // SAFETY: `f` is a valid open fd for the duration of the call.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("setns into {}", self.name()));
        }
        Ok(())
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its result.
    ///
    /// A thread's network namespace is per-thread state, so this never
    /// affects the caller. Sockets created inside `f` stay in this namespace
    /// for their whole life and may be used from any thread afterwards.
    ///
    /// # Panics
    /// Re-raises a panic from `f` (with its original payload), and panics if
    /// the thread cannot enter the namespace; use [`NetNs::try_run`] to get
    /// that as an error.
    pub fn run<F, T>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        match self.try_run(f) {
            Ok(v) => v,
            Err(e) => panic!("{e:#}"),
        }
    }

    /// [`NetNs::run`], but failing to enter the namespace is an error.
    /// Panics from `f` are still re-raised.
    pub fn try_run<F, T>(&self, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let joined = thread::scope(|s| {
            thread::Builder::new()
                .name(format!("netns-{}", self.name()))
                .spawn_scoped(s, || self.enter().map(|()| f()))
                .map(|h| h.join())
        });
        match joined.context("spawning netns thread")? {
            Ok(r) => r,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }

    /// Like [`NetNs::run`] but does not wait: the thread runs inside the
    /// namespace and `join()` yields `f`'s result. If the thread cannot enter
    /// the namespace it panics, which `join()` reports as `Err`.
    pub fn spawn<F, T>(&self, f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let ns = self.clone();
        let name = format!("netns-{}", self.name());
        let body = move || {
            if let Err(e) = ns.enter() {
                panic!("{e:#}");
            }
            drop(ns);
            f()
        };
        match thread::Builder::new().name(name).spawn(body) {
            Ok(h) => h,
            // Only fails when the OS refuses a thread; std::thread::spawn
            // panics in that case too.
            Err(e) => panic!("spawning netns thread: {e}"),
        }
    }

    /// Opens a TCP connection from inside the namespace (5 s connect
    /// timeout). The returned socket stays in the namespace, so it can be
    /// used from any thread.
    pub fn connect(&self, addr: SocketAddr) -> Result<TcpStream> {
        self.try_run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
            .with_context(|| format!("connecting to {addr} in netns {}", self.name()))
    }

    /// Binds a listener inside the namespace (port 0 picks a free port).
    pub fn bind(&self, addr: SocketAddr) -> Result<TcpListener> {
        self.try_run(|| TcpListener::bind(addr))?.with_context(|| format!("binding {addr} in netns {}", self.name()))
    }

    /// A port that was free on `ip` in the namespace a moment ago. Racy only
    /// against other processes in the same namespace, which tests control.
    pub fn free_port(&self, ip: std::net::IpAddr) -> Result<u16> {
        Ok(self.bind(SocketAddr::new(ip, 0))?.local_addr()?.port())
    }

    /// Runs `ip -n <this namespace> <args>` (bounded), failing with its
    /// stderr: links, addresses and routes of test topologies.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let out = run_with_timeout(Command::new("ip").args(["-n", self.name()]).args(args), Duration::from_secs(10))?;
        if !out.status.success() {
            bail!("ip -n {} {}: {}", self.name(), args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    /// Whether something in the namespace listens on `addr` (or on the
    /// wildcard address of its family, same port).
    ///
    /// Reads `/proc/thread-self/net/tcp{,6}` instead of connecting, because a
    /// probe connection would itself be a session that the observer (and, for
    /// a proxy, the backend) counts.
    pub fn is_listening(&self, addr: SocketAddr) -> Result<bool> {
        let file = if addr.is_ipv4() { "tcp" } else { "tcp6" };
        let text = self.try_run(|| std::fs::read_to_string(format!("/proc/thread-self/net/{file}")))??;
        Ok(parse_proc_net_tcp_listeners(&text)
            .into_iter()
            .any(|l| l.port() == addr.port() && (l.ip() == addr.ip() || l.ip().is_unspecified())))
    }

    /// Waits (bounded) until [`NetNs::is_listening`] holds.
    pub fn wait_listening(&self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        wait_until(
            &format!("a listener on {addr} in netns {}", self.name()),
            timeout,
            Duration::from_millis(20),
            || Ok(self.is_listening(addr)?.then_some(())),
        )
    }

    fn enable_ipv6_loopback(&self) -> Result<()> {
        if !Path::new("/proc/sys/net/ipv6").exists() {
            bail!("IPv6 is disabled on this kernel (no /proc/sys/net/ipv6); the tests need ::1");
        }
        // Net sysctls resolve against the opening thread's namespace.
        self.try_run(|| -> Result<()> {
            for knob in ["all", "lo"] {
                let p = format!("/proc/sys/net/ipv6/conf/{knob}/disable_ipv6");
                if std::fs::read_to_string(&p).with_context(|| p.clone())?.trim() != "0" {
                    std::fs::write(&p, "0").with_context(|| format!("writing 0 to {p}"))?;
                }
            }
            Ok(())
        })??;
        // ::1 appears on lo asynchronously once IPv6 is enabled and lo is up.
        wait_until(
            &format!("::1 and 127.0.0.1 to be bindable in netns {}", self.name()),
            Duration::from_secs(5),
            Duration::from_millis(20),
            || {
                let v6 = self.try_run(|| TcpListener::bind("[::1]:0").is_ok())?;
                let v4 = self.try_run(|| TcpListener::bind("127.0.0.1:0").is_ok())?;
                Ok((v4 && v6).then_some(()))
            },
        )
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        match run_with_timeout(
            Command::new("ip").args(["netns", "delete", &self.name]).stdin(Stdio::null()),
            IP_TIMEOUT,
        ) {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns delete {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns delete {}: {e:#}", self.name),
        }
        release_name(&self.name);
    }
}

fn reserve_name(base: &str) -> String {
    let mut g = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    let set = g.get_or_insert_with(HashSet::new);
    let mut name = base.to_string();
    let mut n = 1;
    while set.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    set.insert(name.clone());
    name
}

fn release_name(name: &str) {
    let mut g = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(set) = g.as_mut() {
        set.remove(name);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let o = run_with_timeout(Command::new("ip").args(args), IP_TIMEOUT)?;
    if !o.status.success() {
        bail!("ip {} failed ({}): {}", args.join(" "), o.status, String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

/// Local addresses of sockets in LISTEN state (st == 0A) from the text of
/// `/proc/net/tcp` or `/proc/net/tcp6`.
///
/// The kernel prints each 32-bit word of the address with `%08X` straight
/// from memory (network order), so native-endian bytes of the parsed word are
/// the address bytes; the port is printed already in host order.
pub fn parse_proc_net_tcp_listeners(text: &str) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let mut f = line.split_whitespace();
        let (Some(_sl), Some(local), Some(_rem), Some(st)) = (f.next(), f.next(), f.next(), f.next()) else {
            continue;
        };
        if st != "0A" {
            continue;
        }
        let Some((a, p)) = local.split_once(':') else {
            continue;
        };
        let Ok(port) = u16::from_str_radix(p, 16) else {
            continue;
        };
        let mut bytes = Vec::with_capacity(16);
        for i in (0..a.len()).step_by(8) {
            let Some(Ok(w)) = a.get(i..i + 8).map(|s| u32::from_str_radix(s, 16)) else {
                break;
            };
            bytes.extend_from_slice(&w.to_ne_bytes());
        }
        let ip = if let Ok(b) = <[u8; 4]>::try_from(bytes.as_slice()) {
            std::net::IpAddr::from(b)
        } else if let Ok(b) = <[u8; 16]>::try_from(bytes.as_slice()) {
            std::net::IpAddr::from(b)
        } else {
            continue;
        };
        out.push(SocketAddr::new(ip, port));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n\
           1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n";
        assert_eq!(parse_proc_net_tcp_listeners(v4), vec!["127.0.0.1:8080".parse().unwrap()]);
        let v6 = "  sl  local_address                         remote_address                        st\n\
           0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 0\n";
        assert_eq!(parse_proc_net_tcp_listeners(v6), vec!["[::1]:80".parse().unwrap()]);
    }
}
