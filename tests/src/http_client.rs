//! Raw HTTP clients for the server-hardening tests (tests/tests/http.rs,
//! http_pressure.rs): connections from a chosen loopback address (so that
//! several "clients" with different IP addresses share one namespace), with
//! a small receive buffer for clients that never read, one-shot timed
//! requests, and the observer's thread count and resident memory.
use std::{
    io::{Read, Write},
    mem::size_of,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::NetNs;

/// Connects from `source` (any 127.x.y.z: the namespace's loopback owns the
/// whole 127.0.0.0/8) to `addr`, inside `ns`. With `receive_buffer`, the
/// socket's receive buffer is set that small before connecting, so a client
/// that never reads leaves the server's writes waiting. Connect times out
/// after 5 s.
pub fn connect_from(
    ns: &NetNs,
    source: Ipv4Addr,
    addr: SocketAddrV4,
    receive_buffer: Option<usize>,
) -> Result<TcpStream> {
    ns.try_run(move || connect_here(source, addr, receive_buffer))?
        .with_context(|| format!("connecting from {source} to {addr} in netns {}", ns.name()))
}

fn connect_here(source: Ipv4Addr, addr: SocketAddrV4, receive_buffer: Option<usize>) -> std::io::Result<TcpStream> {
    let check = |rc: libc::c_int| if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) };
    // SAFETY: plain socket calls on a descriptor we own; every pointer is to
    // a local of the size passed with it.
    unsafe {
        let fd = check(libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0))?;
        let owned = OwnedFd::from_raw_fd(fd);
        let set = |level, name, value: libc::c_int| {
            check(libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as _,
            ))
        };
        if let Some(bytes) = receive_buffer {
            set(libc::SOL_SOCKET, libc::SO_RCVBUF, bytes as libc::c_int)?;
        }
        // A blocking connect honours the send timeout.
        let timeout = libc::timeval { tv_sec: 5, tv_usec: 0 };
        check(libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as _,
        ))?;
        let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*a.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sockaddr(SocketAddrV4::new(source, 0));
        check(libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len))?;
        let remote = sockaddr(addr);
        check(libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len))?;
        Ok(TcpStream::from(owned))
    }
}

/// One request on a fresh connection from `source` (`Connection: close`):
/// the status (`None`: closed without an answer) and the time from before
/// connecting to the end of the response.
pub fn timed_get(
    ns: &NetNs,
    source: Ipv4Addr,
    addr: SocketAddrV4,
    path: &str,
    timeout: Duration,
) -> Result<(Option<u16>, Duration)> {
    let started = Instant::now();
    let mut s = connect_from(ns, source, addr, None)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    s.read_to_end(&mut response).with_context(|| format!("GET {path} from {source}"))?;
    let text = String::from_utf8_lossy(&response);
    let status = text.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|s| s.parse().ok());
    Ok((status, started.elapsed()))
}

/// The IPv4 address of `addr`, which the tests' observer listens on.
pub fn v4(addr: SocketAddr) -> Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => bail!("{a}: an IPv4 address was expected"),
    }
}

/// A process's thread count and resident memory, from /proc/PID/status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStatus {
    pub threads: u64,
    pub rss_kib: u64,
}

pub fn proc_status(pid: u32) -> Result<ProcStatus> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_proc_status(&text).with_context(|| format!("/proc/{pid}/status without Threads or VmRSS"))
}

fn parse_proc_status(text: &str) -> Option<ProcStatus> {
    let field = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some(ProcStatus { threads: field("Threads:")?, rss_kib: field("VmRSS:")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_status_fields() {
        let text = "Name:\tobserver\nVmRSS:\t   20480 kB\nThreads:\t7\n";
        assert_eq!(parse_proc_status(text), Some(ProcStatus { threads: 7, rss_kib: 20480 }));
        assert_eq!(parse_proc_status("Name:\tx\n"), None);
        let me = proc_status(std::process::id()).unwrap();
        assert!(me.threads >= 1 && me.rss_kib > 0, "{me:?}");
    }
}
