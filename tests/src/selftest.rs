//! Checks of the harness itself against the real system (root needed):
//! namespaces, traffic and haproxy, without the observer.

use std::net::SocketAddr;
use std::time::Duration;

use crate::{HEADER_LEN, Haproxy, NetNs, TcpServer, is_root, kernel_links, kernel_programs, transfer, transfer_in};

fn skip_unless_root() -> bool {
    if !is_root() {
        eprintln!("skipping: needs root");
        return true;
    }
    false
}

#[test]
fn transfer_in_netns_v4_and_v6() {
    if skip_unless_root() {
        return;
    }
    let ns = NetNs::new("selftest").unwrap();
    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let srv = TcpServer::start_in(&ns, bind.parse().unwrap()).unwrap();
        let (send, recv) = (1_000_000u64, 300_001u64);
        let t = transfer_in(&ns, srv.addr(), send, recv, None).unwrap();
        assert_eq!((t.sent, t.received), (HEADER_LEN + send, recv));
        assert_eq!(t.peer, srv.addr());
        let c = srv.wait_connections(1, Duration::from_secs(10)).unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].error, None);
        assert_eq!((c[0].received, c[0].sent), (HEADER_LEN + send, recv));
        assert_eq!(c[0].peer, t.local);
        // Several concurrent clients from threads that stay in the namespace.
        let hs: Vec<_> = (0..4u64)
            .map(|i| {
                let addr = srv.addr();
                ns.spawn(move || transfer(addr, i * 1000, i * 70_000, None).unwrap())
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(srv.wait_connections(5, Duration::from_secs(10)).unwrap().len(), 5);
    }
    // The listener lives in the namespace: the host's loopback cannot reach it.
    let srv = TcpServer::start_in(&ns, "127.0.0.1:0".parse().unwrap()).unwrap();
    assert!(ns.is_listening(srv.addr()).unwrap());
    assert!(transfer(srv.addr(), 1, 1, None).is_err());
}

#[test]
fn netns_run_propagates_panics_and_isolates() {
    if skip_unless_root() {
        return;
    }
    let ns = NetNs::new("selftest").unwrap();
    let ns2 = NetNs::new("selftest").unwrap();
    assert_ne!(ns.name(), ns2.name());
    let inode = |p: &str| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    let host = inode("/proc/thread-self/ns/net");
    let inside = ns.run(|| inode("/proc/thread-self/ns/net"));
    assert_ne!(host, inside);
    assert_eq!(inode("/proc/thread-self/ns/net"), host, "caller thread must not move");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ns.run(|| panic!("boom"))));
    let msg = r.unwrap_err();
    assert_eq!(msg.downcast_ref::<&str>(), Some(&"boom"));
    let out = ns.command("ip").args(["-o", "link"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "only lo expected: {text}");
    let path = ns.path().to_path_buf();
    drop(ns);
    assert!(!path.exists(), "netns not deleted");
}

#[test]
fn haproxy_logs_sessions() {
    if skip_unless_root() {
        return;
    }
    let ns = NetNs::new("selftest-ha").unwrap();
    for (srv_bind, ha_listen) in [("[::1]:0", "127.0.0.1"), ("127.0.0.1:0", "::1")] {
        let srv = TcpServer::start_in(&ns, srv_bind.parse().unwrap()).unwrap();
        let port = ns.free_port(ha_listen.parse().unwrap()).unwrap();
        let listen = SocketAddr::new(ha_listen.parse().unwrap(), port);
        let ha = Haproxy::start_on(&ns, listen, srv.addr()).unwrap();
        assert!(ha.sessions().unwrap().is_empty(), "readiness check must not connect");
        let t = transfer_in(&ns, listen, 50_000, 2_000_000, Some(Duration::from_millis(300))).unwrap();
        let s = ha.wait_sessions(1, Duration::from_secs(10)).unwrap();
        let c = srv.wait_connections(1, Duration::from_secs(10)).unwrap();
        assert_eq!(s.len(), 1, "{s:?}");
        let s = &s[0];
        assert_eq!(s.client, t.local);
        assert_eq!(s.frontend, listen);
        assert_eq!(s.server, Some(srv.addr()));
        assert_eq!(s.backend_source, Some(c[0].peer));
        assert_eq!((s.bytes_from_client, s.bytes_to_client), (t.sent, t.received));
        assert_eq!(s.termination_state, "--");
        let client_ms = t.duration().as_millis() as i64;
        assert!(s.total_ms >= 250 && s.total_ms <= client_ms + 5, "Tt {} vs client {client_ms}", s.total_ms);
        eprintln!("haproxy {s:?}\nclient {:?}", t.duration());
    }
}

#[test]
fn bpf_enumeration_works() {
    if skip_unless_root() {
        return;
    }
    // Just that the syscalls work and parse; what is loaded depends on the host.
    let progs = kernel_programs().unwrap();
    let links = kernel_links().unwrap();
    for p in &progs {
        assert!(p.id > 0 && p.name.len() < 16, "{p:?}");
    }
    for l in &links {
        assert!(l.id > 0, "{l:?}");
    }
    eprintln!("{} programs, {} links", progs.len(), links.len());
}

/// Loads a no-op raw-tracepoint program and attaches it (a raw_tp link), to
/// check the info-struct offsets the enumeration relies on against the
/// running kernel. The name deliberately does not start with `obs_`, so
/// concurrent leak checks of real tests never see it.
#[test]
fn bpf_enumeration_finds_a_loaded_program_and_link() {
    use std::os::fd::{FromRawFd, OwnedFd};
    if skip_unless_root() {
        return;
    }
    const NAME: &str = "harness_selfchk";
    fn sys_bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> libc::c_long {
        // SAFETY: a zeroed 128-byte bpf_attr; pointers in it refer to live buffers.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), 128 as libc::c_uint) }
    }
    // r0 = 0; exit
    let insns: [u64; 2] =
        [u64::from_le_bytes([0xb7, 0, 0, 0, 0, 0, 0, 0]), u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0])];
    let license = b"GPL\0";
    let mut attr = [0u64; 16];
    attr[0] = 17 | (2u64 << 32); // prog_type RAW_TRACEPOINT, insn_cnt 2
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let mut name = [0u8; 16];
    name[..NAME.len()].copy_from_slice(NAME.as_bytes());
    attr[6] = u64::from_ne_bytes(name[..8].try_into().unwrap());
    attr[7] = u64::from_ne_bytes(name[8..].try_into().unwrap());
    let prog = sys_bpf(5, &mut attr);
    assert!(prog >= 0, "BPF_PROG_LOAD: {}", std::io::Error::last_os_error());
    // SAFETY: fresh fd from the kernel, owned here.
    let prog = unsafe { OwnedFd::from_raw_fd(prog as i32) };
    let tp = b"sys_enter\0";
    let mut attr = [0u64; 16];
    attr[0] = tp.as_ptr() as u64;
    attr[1] = std::os::fd::AsRawFd::as_raw_fd(&prog) as u64;
    let link = sys_bpf(17, &mut attr);
    assert!(link >= 0, "BPF_RAW_TRACEPOINT_OPEN: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let link = unsafe { OwnedFd::from_raw_fd(link as i32) };

    assert_eq!(crate::kernel_programs_named("harness_self").unwrap(), vec![NAME.to_string()]);
    let p = kernel_programs().unwrap().into_iter().find(|p| p.name == NAME).unwrap();
    assert_eq!(p.prog_type, 17);
    let l = crate::kernel_links_named("harness_self").unwrap();
    assert_eq!(l.len(), 1, "{l:?}");
    assert_eq!((l[0].link_type, l[0].prog_id), (1, p.id));

    drop(link);
    drop(prog);
    crate::wait_no_kernel_objects("harness_self", Duration::from_secs(10)).unwrap();
}

/// A stand-in for `observer run`: HTTP/1.1 keep-alive server that is not
/// ready for its first 300 ms, counts its connections, exits 0 on SIGTERM.
const FAKE_OBSERVER: &str = r#"#!/usr/bin/env python3
import http.server, signal, sys, time, threading
args = sys.argv[1:]
assert args[0] == "run" and args[1] == "--listen", args
host, port = args[2].rsplit(":", 1)
t0 = time.time(); conns = [0]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def setup(self):
        conns[0] += 1; super().setup()
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path == "/readyz":
            code, body = (200, b"ok\n") if time.time() - t0 > 0.3 else (503, b"not ready\n")
        elif self.path == "/metrics":
            code, body = 200, ('# TYPE fake_connections gauge\nfake_connections %d\nfake_args{args="%s"} 1\n' % (conns[0], " ".join(args[3:]))).encode()
        else:
            code, body = 404, b""
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
srv = http.server.ThreadingHTTPServer((host, int(port)), H)
srv.daemon_threads = True
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=srv.shutdown).start())
print("fake observer listening", flush=True)
srv.serve_forever()
print("fake observer stopping", file=sys.stderr, flush=True)
"#;

#[test]
fn observer_process_mechanics_with_a_stand_in() {
    use std::os::unix::fs::PermissionsExt;
    if skip_unless_root() {
        return;
    }
    let tmp = crate::TempDir::new("fake").unwrap();
    let bin = tmp.path().join("fake-observer");
    std::fs::write(&bin, FAKE_OBSERVER).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ns = NetNs::new("selftest-obs").unwrap();
    let mut p = crate::ObserverProcess::spawn_bin(&ns, &bin, &["--iface", "lo"]).unwrap();
    p.wait_ready(Duration::from_secs(20)).unwrap();
    for _ in 0..3 {
        let m = p.metrics().unwrap();
        assert_eq!(m.value("fake_connections", &[]), Some(1.0), "{m:?}");
        // The harness adds `--state-dir ''` (no pinned state shared between
        // tests) where a test gives none.
        assert_eq!(m.value("fake_args", &[("args", "--iface lo --state-dir ")]), Some(1.0), "{m:?}");
    }
    assert_eq!(p.scraper().connections_opened(), 1);
    assert_eq!(p.get("/nope").unwrap().status, 404);
    let st = p.stop().unwrap();
    assert!(st.status.success(), "{st:?}");
    assert!(st.elapsed < Duration::from_secs(1), "{st:?}");
    assert!(p.log().contains("fake observer stopping"), "{}", p.log());
}
