//! Every common way of sending and receiving reaches the per-call hooks
//! (`sock_calls`), whichever tier serves them (`cargo xtask kernels` runs this
//! once per tier on each kernel): known bytes through send, sendmsg and
//! sendfile (TCP), send, sendto, sendmsg and sendmmsg with recvmsg and
//! recvmmsg (UDP, connected and unconnected sockets), over IPv4 and IPv6.
//! Live bytes while the sockets are open and session bytes after they close
//! are asserted exactly.
use std::{
    fs::File,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, RawFd},
    thread,
    time::Duration,
};

use observer_tests::{Metrics, NetNs, ObserverProcess, TempDir, by_local, scaled, session_between, wait_sessions};

/// TCP: what the client sends with each call, and the server's answer.
const SEND: usize = 100_000;
const SENDMSG: [usize; 2] = [50_000, 30_000];
const SENDFILE: usize = 200_000;
/// One segment: when it arrives, it acknowledges everything the client sent.
const REPLY: usize = 1_000;
const TCP_TOTAL: usize = SEND + SENDMSG[0] + SENDMSG[1] + SENDFILE;

const WAIT: Duration = Duration::from_secs(10);

fn live(m: &Metrics, direction: &str, protocol: &str) -> u64 {
    m.value_exact("observer_bytes_total", &[("direction", direction), ("protocol", protocol)]).unwrap_or(0.0) as u64
}

fn closed(m: &Metrics, direction: &str, protocol: &str) -> u64 {
    m.value_exact("observer_session_bytes_total", &[("direction", direction), ("protocol", protocol)]).unwrap_or(0.0)
        as u64
}

/// `addr` as the kernel takes it in a `msghdr`.
fn raw_addr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid `sockaddr_storage`.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: a sockaddr_storage holds any socket address, aligned for it.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in>(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in6>(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Buffers of `sizes` bytes and their iovecs (which point into the buffers).
fn buffers(sizes: &[usize], fill: u8) -> (Vec<Vec<u8>>, Vec<libc::iovec>) {
    let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![fill; n]).collect();
    let iov = bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
    (bufs, iov)
}

/// A `msghdr` over `iov`, naming `name` (a destination, or room for a source).
fn msghdr(iov: &mut [libc::iovec], name: Option<&mut (libc::sockaddr_storage, libc::socklen_t)>) -> libc::msghdr {
    // SAFETY: all-zero bytes are a valid `msghdr` (null pointers, zero lengths).
    let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
    m.msg_iov = iov.as_mut_ptr();
    m.msg_iovlen = iov.len() as _;
    if let Some((ss, len)) = name {
        m.msg_name = (ss as *mut libc::sockaddr_storage).cast();
        m.msg_namelen = *len;
    }
    m
}

/// One sendmsg(2) of `parts` (one message of several iovecs), to `to` if given.
fn sendmsg(fd: RawFd, to: Option<SocketAddr>, parts: &[usize]) {
    let (_bufs, mut iov) = buffers(parts, 5);
    let mut name = to.map(raw_addr);
    let m = msghdr(&mut iov, name.as_mut());
    // SAFETY: `m` points at live iovecs and address for the call's duration.
    let n = unsafe { libc::sendmsg(fd, &m, 0) };
    assert_eq!(n, parts.iter().sum::<usize>() as isize, "sendmsg: {}", std::io::Error::last_os_error());
}

/// One sendmmsg(2): a datagram of each size, to `to` if given.
fn sendmmsg(fd: RawFd, to: Option<SocketAddr>, sizes: &[usize]) {
    let (_bufs, mut iov) = buffers(sizes, 6);
    let mut names: Vec<_> = sizes.iter().map(|_| to.map(raw_addr)).collect();
    let mut msgs: Vec<libc::mmsghdr> = iov
        .chunks_mut(1)
        .zip(names.iter_mut())
        .map(|(iov, name)| libc::mmsghdr { msg_hdr: msghdr(iov, name.as_mut()), msg_len: 0 })
        .collect();
    // SAFETY: every header points at live buffers and addresses for the call.
    let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as _, 0) };
    assert_eq!(n, sizes.len() as i32, "sendmmsg: {}", std::io::Error::last_os_error());
    assert_eq!(msgs.iter().map(|m| m.msg_len as usize).collect::<Vec<_>>(), sizes);
}

/// One recvmsg(2), asking for the source address: the bytes it returned.
fn recvmsg(fd: RawFd) -> usize {
    let (_bufs, mut iov) = buffers(&[65_536], 0);
    // SAFETY: all-zero bytes are a valid `sockaddr_storage`.
    let mut name = (unsafe { std::mem::zeroed::<libc::sockaddr_storage>() }, 0);
    name.1 = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let mut m = msghdr(&mut iov, Some(&mut name));
    // SAFETY: `m` points at a live buffer and address room for the call.
    let n = unsafe { libc::recvmsg(fd, &mut m, 0) };
    assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
    n as usize
}

/// recvmmsg(2) calls, asking for source addresses, until `count` datagrams
/// came: their sizes in order.
fn recvmmsg(fd: RawFd, count: usize) -> Vec<usize> {
    let mut got = Vec::new();
    while got.len() < count {
        let want = count - got.len();
        let (_bufs, mut iov) = buffers(&vec![65_536; want], 0);
        // SAFETY: all-zero bytes are a valid `sockaddr_storage`.
        let mut names: Vec<_> = (0..want)
            .map(|_| {
                let ss = unsafe { std::mem::zeroed::<libc::sockaddr_storage>() };
                (ss, std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t)
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .chunks_mut(1)
            .zip(names.iter_mut())
            .map(|(iov, name)| libc::mmsghdr { msg_hdr: msghdr(iov, Some(name)), msg_len: 0 })
            .collect();
        // SAFETY: every header points at live buffers and address room; no timeout.
        let n = unsafe { libc::recvmmsg(fd, msgs.as_mut_ptr(), want as _, libc::MSG_WAITFORONE, std::ptr::null_mut()) };
        assert!(n > 0, "recvmmsg: {}", std::io::Error::last_os_error());
        got.extend(msgs[..n as usize].iter().map(|m| m.msg_len as usize));
    }
    got
}

/// sendfile(2) of all of `file` to the socket.
fn sendfile(fd: RawFd, file: &File, len: usize) {
    let mut offset: libc::off_t = 0;
    while (offset as usize) < len {
        // SAFETY: two open descriptors and a pointer to our offset.
        let n = unsafe { libc::sendfile(fd, file.as_raw_fd(), &mut offset, len - offset as usize) };
        assert!(n > 0, "sendfile: {}", std::io::Error::last_os_error());
    }
}

/// send(2) until all of `len` bytes went.
fn send(fd: RawFd, len: usize) {
    let buf = vec![4u8; len];
    let mut sent = 0;
    while sent < len {
        // SAFETY: a live buffer of the length given.
        let n = unsafe { libc::send(fd, buf[sent..].as_ptr().cast(), len - sent, 0) };
        assert!(n > 0, "send: {}", std::io::Error::last_os_error());
        sent += n as usize;
    }
}

/// Two namespaces joined by a veth pair, the observer on the client's side
/// with `--iface` on the pair: its own scrape connection (on lo) is left out
/// of `observer_bytes_total`, which then holds the test's TCP bytes alone.
#[test]
fn tcp_send_sendmsg_sendfile_and_recvmsg_exact_bytes_ipv4_and_ipv6() {
    let client_ns = NetNs::new("callc").unwrap();
    let server_ns = NetNs::new("calls").unwrap();
    let ip = |ns: &NetNs, args: &[&str]| ns.ip(args).unwrap();
    ip(&client_ns, &["link", "add", "obscall0", "type", "veth", "peer", "name", "obscall1", "netns", server_ns.name()]);
    for (ns, dev, v4, v6) in [
        (&client_ns, "obscall0", "10.125.0.1/24", "fd00:125::1/64"),
        (&server_ns, "obscall1", "10.125.0.2/24", "fd00:125::2/64"),
    ] {
        ip(ns, &["addr", "add", v4, "dev", dev]);
        ip(ns, &["-6", "addr", "add", v6, "dev", dev, "nodad"]);
        ip(ns, &["link", "set", dev, "up"]);
    }
    let tmp = TempDir::new("sock-calls-tcp").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let data = tmp.path().join("sendfile.bin");
    std::fs::write(&data, vec![3u8; SENDFILE]).unwrap();
    let mut observer =
        ObserverProcess::start(&client_ns, &["--iface", "obscall0", "--session-log", log.to_str().unwrap()]).unwrap();

    let mut clients = Vec::new();
    for (i, server_ip) in ["10.125.0.2", "fd00:125::2"].into_iter().enumerate() {
        let listener = server_ns.bind(SocketAddr::new(server_ip.parse().unwrap(), 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        // The server answers once it has everything: the answer's segment
        // acknowledges all the client sent.
        let server = thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(scaled(WAIT))).unwrap();
            let mut all = vec![0u8; TCP_TOTAL];
            s.read_exact(&mut all).unwrap();
            s.write_all(&[9u8; REPLY]).unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).unwrap();
            rest.len()
        });
        let client = client_ns.connect(addr).unwrap();
        client.set_read_timeout(Some(scaled(WAIT))).unwrap();
        let fd = client.as_raw_fd();
        send(fd, SEND);
        sendmsg(fd, None, &SENDMSG);
        sendfile(fd, &File::open(&data).unwrap(), SENDFILE);
        let mut got = 0;
        while got < REPLY {
            let n = recvmsg(fd);
            assert!(n > 0, "server closed early");
            got += n;
        }
        // The receive call that returned the answer read the socket's
        // counters after the answer acknowledged everything: live bytes of
        // the open connection are exact.
        let (tx, rx) = ((i + 1) * TCP_TOTAL, (i + 1) * REPLY);
        observer.scrape_until("exact live bytes of the open connection", scaled(WAIT), |m| {
            live(m, "transmit", "tcp") == tx as u64 && live(m, "receive", "tcp") == rx as u64
        });
        client.shutdown(Shutdown::Write).unwrap();
        assert_eq!(server.join().unwrap(), 0);
        clients.push(client.local_addr().unwrap());
        drop(client);
        // Its close adds nothing the open connection had not shown.
        observer.scrape_until("the closed connection", scaled(WAIT), |m| {
            closed(m, "transmit", "tcp") == tx as u64 && closed(m, "receive", "tcp") == rx as u64
        });
    }

    let sessions = wait_sessions(&log, 2, scaled(WAIT), |s| s.protocol == "tcp").unwrap();
    for local in clients {
        let s = by_local(&sessions, local).unwrap();
        assert_eq!((s.bytes_transmitted, s.bytes_received), (TCP_TOTAL as u64, REPLY as u64), "{s:?}");
    }
    let m = observer.metrics().unwrap();
    assert_eq!(live(&m, "transmit", "tcp"), 2 * TCP_TOTAL as u64, "{}", m.raw());
    assert_eq!(live(&m, "receive", "tcp"), 2 * REPLY as u64, "{}", m.raw());
}

/// Datagram sizes per call, all different so a miscount shows which call.
const A_SEND: usize = 100;
const A_SENDMSG: [usize; 2] = [200, 300];
const A_SENDMMSG: [usize; 3] = [400, 500, 600];
const C_SENDTO: usize = 110;
const C_SENDMSG: [usize; 2] = [210, 310];
const C_SENDMMSG: [usize; 3] = [410, 510, 610];
const TO_A_SENDTO: usize = 120;
const TO_A_SENDMMSG: [usize; 2] = [220, 320];
const TO_C_SENDMSG: usize = 130;

/// A connected client `a` and an unconnected client `c` talk to an
/// unconnected server: every datagram through another call, the server's
/// flows split per peer.
#[test]
fn udp_send_sendto_sendmsg_sendmmsg_and_recvmsg_recvmmsg_exact_bytes_ipv4_and_ipv6() {
    let ns = NetNs::new("callu").unwrap();
    let tmp = TempDir::new("sock-calls-udp").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo", "--session-log", log.to_str().unwrap()]).unwrap();
    let a_tx = A_SEND + A_SENDMSG.iter().sum::<usize>() + A_SENDMMSG.iter().sum::<usize>();
    let c_tx = C_SENDTO + C_SENDMSG.iter().sum::<usize>() + C_SENDMMSG.iter().sum::<usize>();
    let a_rx = TO_A_SENDTO + TO_A_SENDMMSG.iter().sum::<usize>();
    let c_rx = TO_C_SENDMSG;
    let per_family = (a_tx + c_tx + a_rx + c_rx) as u64;

    let mut families = Vec::new();
    for (i, any) in ["127.0.0.1:0", "[::1]:0"].into_iter().enumerate() {
        let sockets = ns.run(|| {
            let bind = || {
                let s = UdpSocket::bind(any).unwrap();
                s.set_read_timeout(Some(scaled(WAIT))).unwrap();
                s
            };
            let (server, a, c) = (bind(), bind(), bind());
            let (s_addr, a_addr) = (server.local_addr().unwrap(), a.local_addr().unwrap());
            a.connect(s_addr).unwrap();
            let (sfd, afd, cfd) = (server.as_raw_fd(), a.as_raw_fd(), c.as_raw_fd());
            let mut buf = vec![0u8; 65_536];

            // Connected client: send, sendmsg, sendmmsg without addresses;
            // the server takes them with recvmsg and recvmmsg.
            assert_eq!(a.send(&[1u8; A_SEND]).unwrap(), A_SEND);
            assert_eq!(recvmsg(sfd), A_SEND);
            sendmsg(afd, None, &A_SENDMSG);
            assert_eq!(recvmsg(sfd), A_SENDMSG.iter().sum::<usize>());
            sendmmsg(afd, None, &A_SENDMMSG);
            assert_eq!(recvmmsg(sfd, 3), A_SENDMMSG);

            // Unconnected client: sendto, sendmsg and sendmmsg naming the server.
            assert_eq!(c.send_to(&[2u8; C_SENDTO], s_addr).unwrap(), C_SENDTO);
            sendmsg(cfd, Some(s_addr), &C_SENDMSG);
            sendmmsg(cfd, Some(s_addr), &C_SENDMMSG);
            assert_eq!(
                recvmmsg(sfd, 5),
                [C_SENDTO, C_SENDMSG.iter().sum(), C_SENDMMSG[0], C_SENDMMSG[1], C_SENDMMSG[2]]
            );

            // The server answers each peer by address.
            assert_eq!(server.send_to(&[3u8; TO_A_SENDTO], a_addr).unwrap(), TO_A_SENDTO);
            sendmmsg(sfd, Some(a_addr), &TO_A_SENDMMSG);
            assert_eq!(a.recv(&mut buf).unwrap(), TO_A_SENDTO);
            assert_eq!(recvmmsg(afd, 2), TO_A_SENDMMSG);
            sendmsg(sfd, Some(c.local_addr().unwrap()), &[TO_C_SENDMSG]);
            assert_eq!(recvmsg(cfd), TO_C_SENDMSG);
            (server, a, c)
        });
        let want = (i as u64 + 1) * per_family;
        // Every call counted at once: live bytes of the open flows are exact.
        observer.scrape_until("exact live bytes of the open flows", scaled(WAIT), |m| {
            live(m, "transmit", "udp") == want && live(m, "receive", "udp") == want
        });
        let addrs = [&sockets.0, &sockets.1, &sockets.2].map(|s| s.local_addr().unwrap());
        drop(sockets); // released: their flows end
        families.push(addrs);
    }

    let sessions = wait_sessions(&log, 8, scaled(WAIT), |s| s.protocol == "udp").unwrap();
    assert_eq!(sessions.len(), 8, "{sessions:#?}");
    for [server, a, c] in families {
        let bytes = |local, remote| {
            let s = session_between(&sessions, local, remote);
            (s.bytes_transmitted as usize, s.bytes_received as usize)
        };
        assert_eq!(bytes(a, server), (a_tx, a_rx), "connected client");
        assert_eq!(bytes(c, server), (c_tx, c_rx), "unconnected client");
        assert_eq!(bytes(server, a), (a_rx, a_tx), "server's flow with the connected client");
        assert_eq!(bytes(server, c), (c_rx, c_tx), "server's flow with the unconnected client");
    }
    let m = observer.scrape_until("the released flows", scaled(WAIT), |m| {
        closed(m, "transmit", "udp") == 2 * per_family && closed(m, "receive", "udp") == 2 * per_family
    });
    assert_eq!(live(&m, "transmit", "udp"), 2 * per_family, "{}", m.raw());
    assert_eq!(live(&m, "receive", "udp"), 2 * per_family, "{}", m.raw());
    assert_eq!(m.value_exact("observer_events_lost_total", &[("source", "udp_peer_unknown")]).unwrap_or(0.0), 0.0);
}
