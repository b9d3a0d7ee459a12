//! Restarts keep sessions: the tables that give a session its birth are
//! pinned in bpffs (`--state-dir`), so a connection open across a SIGTERM or
//! SIGKILL of the observer is reported by the next process with its whole
//! lifetime and exact bytes; sessions that close while no observer runs are
//! reported once, by the next start's sweep; a state of another layout is
//! discarded and said so; `observer cleanup` removes it all.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use observer_tests::{
    NetNs, ObservedSession, ObserverProcess, TempDir, pin_hash_map, read_session_log, run_observer_cli, scaled,
    session_between, wait_sessions,
};

const CONNECTIONS: usize = 20;
const UDP_PAIRS: usize = 5;
/// Bytes each TCP client sends before and after the restart.
const HALF: usize = 150_000;
/// `--min-session-bytes`: both halves together pass it, one alone does not.
const MIN_BYTES: &str = "200000";
/// UDP rounds (1000-byte datagram each way) before and after the restart.
const ROUNDS: usize = 150;
const DATAGRAM: usize = 1000;
/// How far an observed lifetime may be from the test's own measurement.
const LIFETIME_TOLERANCE: Duration = Duration::from_millis(10);

/// Sessions of the test's own sockets (made on a thread inside the
/// namespace), not the scrape connections of the observers, which also run
/// over this namespace's loopback and close with them.
fn ours(s: &ObservedSession) -> bool {
    s.comm.as_deref().is_some_and(|c| c.starts_with("netns-")) || s.protocol == "udp"
}

/// Every session in the log is counted once in `observer_sessions_total`,
/// and nothing else is.
fn assert_counted_as_logged(m: &observer_tests::Metrics, log: &Path) {
    let logged = read_session_log(log).unwrap();
    for protocol in ["tcp", "udp"] {
        let n = logged.iter().filter(|s| s.protocol == protocol).count() as f64;
        assert_eq!(m.value_exact("observer_sessions_total", &[("protocol", protocol)]), Some(n), "{protocol}");
    }
}

/// A state directory of its own on bpffs, removed on drop (pins, layout
/// directories; the private bpffs mount, if one was needed). Under
/// /sys/fs/bpf when that is bpffs, else on a bpffs mounted for the test.
struct StateDir {
    path: PathBuf,
    mount: Option<(TempDir, PathBuf)>,
}

impl StateDir {
    fn new(tag: &str) -> Self {
        let name = format!("observer-test-{tag}-{}", std::process::id());
        if is_bpffs(Path::new("/sys/fs/bpf")) {
            return StateDir { path: Path::new("/sys/fs/bpf").join(name), mount: None };
        }
        let tmp = TempDir::new("bpffs").unwrap();
        let point = tmp.path().join("bpf");
        std::fs::create_dir(&point).unwrap();
        let ok = std::process::Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&point).status().unwrap();
        assert!(ok.success(), "mounting a bpffs at {}", point.display());
        StateDir { path: point.join(name), mount: Some((tmp, point)) }
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Everything under the directory, recursively.
    fn contents(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                out.push(e.path());
                if e.path().is_dir() {
                    walk(&e.path(), out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.path, &mut out);
        out
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let mut all = self.contents();
        all.reverse();
        for p in all {
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir(&p));
        }
        let _ = std::fs::remove_dir(&self.path);
        if let Some((_, point)) = &self.mount {
            let _ = std::process::Command::new("umount").arg(point).status();
        }
    }
}

fn is_bpffs(p: &Path) -> bool {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs writes into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `c` is a valid C string.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as u32 == 0xcafe_4a11 }
}

fn start(ns: &NetNs, state: &StateDir, log: &Path, extra: &[&str]) -> ObserverProcess {
    let mut args = vec![
        "--iface",
        "lo",
        "--session-log",
        log.to_str().unwrap(),
        "--min-session-bytes",
        MIN_BYTES,
        "--state-dir",
        state.arg(),
    ];
    args.extend_from_slice(extra);
    ObserverProcess::start(ns, &args).unwrap()
}

/// One TCP connection of the test: the client end here, the server end read
/// to EOF and closed by a thread of its own.
struct Conn {
    client: TcpStream,
    local: SocketAddr,
    server: SocketAddr,
    connected_at: Instant,
    reader: JoinHandle<usize>,
}

fn connect_all(ns: &NetNs, n: usize) -> Vec<Conn> {
    ns.run(|| {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (0..n)
            .map(|_| {
                let connected_at = Instant::now();
                let client = TcpStream::connect(addr).unwrap();
                let (mut server, _) = listener.accept().unwrap();
                let local = client.local_addr().unwrap();
                let server_addr = server.local_addr().unwrap();
                let reader = std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    let mut total = 0;
                    loop {
                        match server.read(&mut buf).unwrap() {
                            0 => break,
                            k => total += k,
                        }
                    }
                    // The server closes once it has read everything.
                    drop(server);
                    total
                });
                Conn { client, local, server: server_addr, connected_at, reader }
            })
            .collect()
    })
}

/// Sends `bytes` on every connection.
fn send_all(conns: &mut [Conn], bytes: usize) {
    let chunk = vec![7u8; bytes];
    for c in conns.iter_mut() {
        c.client.write_all(&chunk).unwrap();
    }
}

/// Ends every connection: the client shuts its side, the server reads to
/// EOF and closes, the client sees the server's FIN and closes. Returns, per
/// connection, (client address, server address, connect-to-close time).
fn close_all(conns: Vec<Conn>, sent: usize) -> Vec<(SocketAddr, SocketAddr, Duration)> {
    conns
        .into_iter()
        .map(|mut c| {
            c.client.shutdown(Shutdown::Write).unwrap();
            let mut buf = [0u8; 16];
            assert_eq!(c.client.read(&mut buf).unwrap(), 0, "the server sends nothing");
            drop(c.client);
            let took = c.connected_at.elapsed();
            assert_eq!(c.reader.join().unwrap(), sent);
            (c.local, c.server, took)
        })
        .collect()
}

struct UdpPair {
    a: UdpSocket,
    b: UdpSocket,
    first_at: Option<Instant>,
}

fn udp_pairs(ns: &NetNs, n: usize) -> Vec<UdpPair> {
    ns.run(|| {
        (0..n)
            .map(|_| {
                let a = UdpSocket::bind("127.0.0.1:0").unwrap();
                let b = UdpSocket::bind("127.0.0.1:0").unwrap();
                a.connect(b.local_addr().unwrap()).unwrap();
                b.connect(a.local_addr().unwrap()).unwrap();
                for s in [&a, &b] {
                    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                }
                UdpPair { a, b, first_at: None }
            })
            .collect()
    })
}

/// Ping-pong on every pair: each side sends and receives `rounds` datagrams.
fn ping_pong_all(pairs: &mut [UdpPair], rounds: usize) {
    let mut buf = vec![0u8; 65536];
    for p in pairs.iter_mut() {
        p.first_at.get_or_insert_with(Instant::now);
        for _ in 0..rounds {
            p.a.send(&[1u8; DATAGRAM]).unwrap();
            assert_eq!(p.b.recv(&mut buf).unwrap(), DATAGRAM);
            p.b.send(&[2u8; DATAGRAM]).unwrap();
            assert_eq!(p.a.recv(&mut buf).unwrap(), DATAGRAM);
        }
    }
}

/// Releases both sockets of every pair; returns (a, b, first-datagram-to-release time).
fn release_all(pairs: Vec<UdpPair>) -> Vec<(SocketAddr, SocketAddr, Duration)> {
    pairs
        .into_iter()
        .map(|p| {
            let (a, b) = (p.a.local_addr().unwrap(), p.b.local_addr().unwrap());
            drop(p.a);
            drop(p.b);
            (a, b, p.first_at.unwrap().elapsed())
        })
        .collect()
}

fn assert_lifetime(s: &ObservedSession, measured: Duration) {
    let lifetime = s.lifetime.unwrap_or_else(|| panic!("no lifetime: the birth was lost across the restart: {s:?}"));
    let diff = lifetime.abs_diff(measured);
    assert!(diff <= scaled(LIFETIME_TOLERANCE), "lifetime {lifetime:?}, measured {measured:?}: {s:?}");
}

/// Open sessions, restart the observer with `signal`, finish them: every
/// one is reported by the new process with its whole lifetime and exact bytes.
fn sessions_survive_a_restart(signal: libc::c_int, tag: &str) {
    let ns = NetNs::new(tag).unwrap();
    let state = StateDir::new(tag);
    let tmp = TempDir::new(tag).unwrap();
    let (log1, log2) = (tmp.path().join("before.jsonl"), tmp.path().join("after.jsonl"));
    let mut first = start(&ns, &state, &log1, &[]);

    let mut conns = connect_all(&ns, CONNECTIONS);
    send_all(&mut conns, HALF);
    let mut pairs = udp_pairs(&ns, UDP_PAIRS);
    ping_pong_all(&mut pairs, ROUNDS);

    first.stop_with(signal).unwrap();
    let stopped_at = Instant::now();
    // Its scrape connection (both ends on this namespace's loopback) closes
    // now, while no observer runs: two more TCP sessions for the sweep.
    drop(first);
    let mut second = ObserverProcess::spawn(
        &ns,
        &[
            "--iface",
            "lo",
            "--session-log",
            log2.to_str().unwrap(),
            "--min-session-bytes",
            MIN_BYTES,
            "--state-dir",
            state.arg(),
        ],
    )
    .unwrap();
    let gap = stopped_at.elapsed();
    assert!(gap < Duration::from_secs(1), "started again {gap:?} after the stop");
    second.wait_ready(observer_tests::observer::READY_TIMEOUT).unwrap();
    assert!(second.log().contains("reused=true"), "{}", second.log());

    send_all(&mut conns, HALF);
    ping_pong_all(&mut pairs, ROUNDS);
    let tcp = close_all(conns, 2 * HALF);
    let udp = release_all(pairs);

    let sessions = wait_sessions(&log2, 2 * CONNECTIONS + 2 * UDP_PAIRS, scaled(Duration::from_secs(10)), ours)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", second.log()));
    let bytes = 2 * HALF as u64;
    for (client, server, measured) in &tcp {
        let c = session_between(&sessions, *client, *server);
        assert_eq!((c.bytes_transmitted, c.bytes_received), (bytes, 0), "{c:?}");
        assert_lifetime(c, *measured);
        let s = session_between(&sessions, *server, *client);
        assert_eq!((s.bytes_transmitted, s.bytes_received), (0, bytes), "{s:?}");
        assert_lifetime(s, *measured);
    }
    let udp_bytes = (2 * ROUNDS * DATAGRAM) as u64;
    for (a, b, measured) in &udp {
        for (local, remote) in [(a, b), (b, a)] {
            let s = session_between(&sessions, *local, *remote);
            assert_eq!((s.bytes_transmitted, s.bytes_received), (udp_bytes, udp_bytes), "{s:?}");
            assert_lifetime(s, *measured);
        }
    }
    assert!(read_session_log(&log1).unwrap().is_empty(), "nothing closed under the first observer");
    assert_eq!(sessions.len(), 2 * CONNECTIONS + 2 * UDP_PAIRS, "each session once: {sessions:#?}");
    let m = second.metrics().unwrap();
    for direction in ["transmit", "receive"] {
        let tcp =
            m.histogram("observer_session_goodput_bytes_per_second", &[("direction", direction), ("protocol", "tcp")]);
        assert_eq!(tcp.map(|h| h.count), Some(CONNECTIONS as f64), "{direction}: one per connection");
        let udp =
            m.histogram("observer_session_goodput_bytes_per_second", &[("direction", direction), ("protocol", "udp")]);
        assert_eq!(udp.map(|h| h.count), Some((2 * UDP_PAIRS) as f64), "{direction}: one per flow");
    }
    assert_counted_as_logged(&m, &log2);
    assert_eq!(m.sum("observer_state_discarded_total", &[]), 0.0);
    second.stop().unwrap();
}

#[test]
fn sessions_keep_their_birth_across_sigterm() {
    sessions_survive_a_restart(libc::SIGTERM, "rsterm");
}

#[test]
fn sessions_keep_their_birth_across_sigkill() {
    sessions_survive_a_restart(libc::SIGKILL, "rskill");
}

#[test]
fn sessions_closed_while_no_observer_runs_are_counted_once() {
    let ns = NetNs::new("rsgap").unwrap();
    let state = StateDir::new("rsgap");
    let tmp = TempDir::new("rsgap").unwrap();
    let (log1, log2) = (tmp.path().join("before.jsonl"), tmp.path().join("after.jsonl"));
    let mut first = start(&ns, &state, &log1, &[]);

    // Four connections, each moving a count of bytes of its own, and two
    // UDP pairs, all open when the observer stops.
    let mut conns = connect_all(&ns, 4);
    let sizes: Vec<usize> = (0..conns.len()).map(|i| 1000 + 111 * i).collect();
    for (c, n) in conns.iter_mut().zip(&sizes) {
        c.client.write_all(&vec![3u8; *n]).unwrap();
    }
    let mut pairs = udp_pairs(&ns, 2);
    ping_pong_all(&mut pairs, 10);
    // Every byte is read and acknowledged before the stop; a call on each
    // client (a receive with nothing to read) brings its entry's live bytes
    // up to the acknowledged ones, which is what a close no hook saw reports.
    std::thread::sleep(Duration::from_millis(300));
    for c in &conns {
        c.client.set_nonblocking(true).unwrap();
        let _ = (&c.client).read(&mut [0u8; 16]);
    }
    first.stop().unwrap();
    drop(first);

    // Everything closes during a 3 s gap.
    let gap = Instant::now();
    let readers: Vec<_> = conns.into_iter().map(|c| (c.client, c.reader)).collect();
    for (client, reader) in readers {
        client.shutdown(Shutdown::Write).unwrap();
        reader.join().unwrap();
        drop(client);
    }
    let udp: Vec<(SocketAddr, SocketAddr)> = release_all(pairs).into_iter().map(|(a, b, _)| (a, b)).collect();
    std::thread::sleep(Duration::from_secs(3).saturating_sub(gap.elapsed()));

    let mut second = start(&ns, &state, &log2, &[]);
    let want = 2 * sizes.len() + 2 * udp.len();
    let sessions = wait_sessions(&log2, want, scaled(Duration::from_secs(10)), ours).unwrap_or_else(|e| {
        let logged = read_session_log(&log2).unwrap_or_default();
        let m = second.metrics().map(|m| m.sum("observer_sessions_ignored_total", &[]));
        panic!("{e:#}\nlogged: {logged:#?}\nignored: {m:?}\n{}", second.log())
    });
    // TCP: reported as closes no hook saw (no addresses, no lifetime), bytes
    // as of their last call; each end once.
    let tcp: Vec<&ObservedSession> = sessions.iter().filter(|s| s.protocol == "tcp").collect();
    assert_eq!(tcp.len(), 2 * sizes.len(), "{sessions:#?}");
    assert!(tcp.iter().all(|s| s.lifetime.is_none()), "{tcp:#?}");
    for &n in &sizes {
        for pair in [(n as u64, 0), (0, n as u64)] {
            let found = tcp.iter().filter(|s| (s.bytes_transmitted, s.bytes_received) == pair).count();
            assert_eq!(found, 1, "(transmitted, received) {pair:?}: {tcp:#?}");
        }
    }
    for (a, b) in &udp {
        for (local, remote) in [(a, b), (b, a)] {
            let s = session_between(&sessions, *local, *remote);
            assert_eq!((s.bytes_transmitted, s.bytes_received), (10_000, 10_000), "{s:?}");
        }
    }
    // Once: nothing more for them, however long it runs and whatever reuses
    // their sockets' addresses.
    let more = connect_all(&ns, 20);
    let _ = close_all(more, 0);
    let total = want + 40;
    wait_sessions(&log2, total, scaled(Duration::from_secs(10)), ours).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let m = second.metrics().unwrap();
    assert_counted_as_logged(&m, &log2);
    let missed = m.value_exact("observer_events_lost_total", &[("source", "session_close_missed")]).unwrap_or(0.0);
    assert!(missed >= (2 * sizes.len()) as f64, "the swept sessions are counted as closes no hook saw: {missed}");
    let logged = read_session_log(&log2).unwrap();
    assert_eq!(logged.iter().filter(|s| ours(s)).count(), total, "each session reported once: {logged:#?}");
    assert!(second.log().contains("sessions that closed while no observer ran"), "{}", second.log());
    second.stop().unwrap();
}

#[test]
fn another_layout_is_discarded_and_cleanup_removes_everything() {
    let ns = NetNs::new("rslay").unwrap();
    let state = StateDir::new("rslay");
    let tmp = TempDir::new("rslay").unwrap();
    let log = tmp.path().join("sessions.jsonl");
    // Left by another build: its own version's directory, and in ours an
    // open-session table whose values are another size.
    std::fs::create_dir_all(state.path.join("v0")).unwrap();
    std::fs::create_dir_all(state.path.join("v1")).unwrap();
    pin_hash_map(&state.path.join("v1/OPEN_SESSIONS"), 8, 100, 64).unwrap();

    let mut observer = start(&ns, &state, &log, &[]);
    let text = observer.log();
    assert!(text.contains("discarding pinned kernel state of another layout"), "{text}");
    assert!(text.contains("layout_version") && text.contains("map_layout"), "{text}");
    assert!(text.contains("OPEN_SESSIONS: type Some(Hash), key 8 bytes, value 100 bytes"), "{text}");
    let m = observer.metrics().unwrap();
    for (reason, n) in [("layout_version", 1.0), ("map_layout", 1.0), ("capacity", 0.0)] {
        assert_eq!(m.value_exact("observer_state_discarded_total", &[("reason", reason)]), Some(n), "{reason}");
    }
    // And it works: a session is measured.
    let conns = connect_all(&ns, 1);
    let _ = close_all(conns, 0);
    wait_sessions(&log, 2, scaled(Duration::from_secs(10)), |s| s.protocol == "tcp").unwrap();
    observer.stop().unwrap();

    // Another capacity: discarded too, said so.
    let mut resized = start(&ns, &state, &log, &["--max-sessions", "1024"]);
    let m = resized.metrics().unwrap();
    assert_eq!(m.value_exact("observer_state_discarded_total", &[("reason", "capacity")]), Some(1.0));
    assert!(resized.log().contains("OPEN_SESSIONS: 65536 entries; this run asks for 1024"), "{}", resized.log());
    // A second observer on the same directory is refused.
    let mut twin = ObserverProcess::spawn(&ns, &["--state-dir", state.arg(), "--max-sessions", "1024"]).unwrap();
    let status = twin.wait_exit(scaled(Duration::from_secs(30))).unwrap().expect("the second observer exits");
    assert_eq!(status.code(), Some(2), "{}", twin.log());
    assert!(twin.log().contains("is in use by another observer process"), "{}", twin.log());
    // Cleanup is refused while it runs...
    let out = run_observer_cli(&["cleanup", "--state-dir", state.arg()]).unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    resized.stop().unwrap();

    // ...and removes everything once it stopped.
    assert!(!state.contents().is_empty());
    let out = run_observer_cli(&["cleanup", "--state-dir", state.arg()]).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("removed"), "{stdout}");
    assert!(!state.path.exists(), "left behind: {:?}", state.contents());
    let out = run_observer_cli(&["cleanup", "--state-dir", state.arg()]).unwrap();
    assert!(out.status.success(), "cleaning an absent directory is fine");
}
