//! What the per-call programs (`sock_calls`) cost per run, next to an empty
//! program (`r0 = 0; exit`) of the same attach type on the same function, under
//! the same calls: the benchmark's reference-program method (BENCHMARKS.md) for
//! every tier. Both are timed by the kernel's BPF statistics, which the observer
//! keeps on (`--bpf-stats`, the default): a program's time, not the trampoline's
//! or the kprobe's around it, which the empty program's own cost stands for.
//!
//! `cargo xtask kernels` runs it in the fentry and kprobe tiers, which the build
//! host lacks; elsewhere it measures the tier that `--probes auto` (or
//! `OBSERVER_TEST_PROBES`) gives `sock_calls`, and without a hook it says so and
//! passes. It prints a table (docs/kernels.md has the figures) and asserts no
//! timing: only that every program ran for every call made.
use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use observer_tests::{
    KernelProgram, NetNs, ObserverProcess, program_of_fd, programs_of_process,
    refprog::{Attach, EMPTY, RefProg},
    scaled,
};

/// Batches of rounds of one send and the receives that take it (UDP, then TCP).
/// Each batch is timed apart and the median batch reported: under emulation a
/// vCPU preempted while a program runs adds milliseconds to that run, which
/// would move a mean over all runs.
const BATCHES: usize = 9;
const ROUNDS: u64 = 250;
const DATAGRAM: usize = 100;
const SEGMENT: usize = 1_000;

/// The calls the traffic made.
#[derive(Debug, Default)]
struct Calls {
    udp_send: u64,
    udp_recv: u64,
    tcp_send: u64,
    tcp_recv: u64,
}

/// Which of the calls run a program.
#[derive(Clone, Copy, Debug)]
enum Runs {
    Sends,
    Receives,
    /// Entry of both (the kprobe tier's `obs_call_kp`).
    Both,
    /// TCP receives (`tcp_cleanup_rbuf`, at least once per `tcp_recvmsg`).
    TcpReceives,
}

impl Runs {
    fn of(self, c: &Calls) -> u64 {
        match self {
            Runs::Sends => c.udp_send + c.tcp_send,
            Runs::Receives => c.udp_recv + c.tcp_recv,
            Runs::Both => c.udp_send + c.tcp_send + c.udp_recv + c.tcp_recv,
            Runs::TcpReceives => c.tcp_recv,
        }
    }
}

/// An observer program and where its empty twin is attached: the IPv4
/// functions, which the traffic (IPv4) goes through.
struct Pair {
    program: &'static str,
    runs: Runs,
    empty_at: &'static [Attach<'static>],
}

const fn pair(program: &'static str, runs: Runs, empty_at: &'static [Attach<'static>]) -> Pair {
    Pair { program, runs, empty_at }
}

/// The per-call programs of the tier `hook` (`observer_probe_info`'s label) names.
fn pairs(hook: &str) -> &'static [Pair] {
    use Attach::*;
    const TRACEPOINT: &[Pair] = &[
        pair("obs_send", Runs::Sends, &[TpBtf("sock_send_length")]),
        pair("obs_recv", Runs::Receives, &[TpBtf("sock_recv_length")]),
    ];
    const FEXIT: &[Pair] = &[
        pair("obs_send_fx4", Runs::Sends, &[FExit("inet_sendmsg")]),
        pair("obs_recv_fx4", Runs::Receives, &[FExit("inet_recvmsg")]),
    ];
    const KPROBE: &[Pair] = &[
        pair("obs_call_kp", Runs::Both, &[KProbe("inet_sendmsg"), KProbe("inet_recvmsg")]),
        pair("obs_send_kret", Runs::Sends, &[KRetProbe("inet_sendmsg")]),
        pair("obs_recv_kret", Runs::Receives, &[KRetProbe("inet_recvmsg")]),
        pair("obs_rbuf_kp", Runs::TcpReceives, &[KProbe("tcp_cleanup_rbuf")]),
    ];
    let tiers: [(&str, &'static [Pair]); 3] =
        [("tp_btf/", TRACEPOINT), ("fexit/", FEXIT), ("kprobe+kretprobe/", KPROBE)];
    tiers.into_iter().find(|(prefix, _)| hook.starts_with(prefix)).map_or(&[], |(_, p)| p)
}

/// A connected UDP pair and a TCP connection on 127.0.0.1, receiving
/// nonblocking: no receive sleeps, as a kretprobe may miss a call that slept
/// (docs/kernels.md, 5.10).
struct Traffic {
    a: UdpSocket,
    b: UdpSocket,
    client: TcpStream,
    server: TcpStream,
}

impl Traffic {
    fn new() -> Self {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        b.connect(a.local_addr().unwrap()).unwrap();
        b.set_nonblocking(true).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        Traffic { a, b, client, server }
    }

    /// `ROUNDS` of one UDP send and the receives that take it, then as many of
    /// one TCP send (or more, if it took part) and the receives that take it.
    fn batch(&mut self, calls: &mut Calls) {
        let deadline = Instant::now() + scaled(Duration::from_secs(30));
        let mut buf = vec![0u8; 65_536];
        // Counts one receive call; None while nothing had arrived.
        let took = |r: std::io::Result<usize>, count: &mut u64| -> Option<usize> {
            *count += 1;
            match r {
                Ok(n) => Some(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "loopback traffic stalled");
                    std::thread::yield_now();
                    None
                }
                Err(e) => panic!("receive: {e}"),
            }
        };
        for _ in 0..ROUNDS {
            assert_eq!(self.a.send(&[1; DATAGRAM]).unwrap(), DATAGRAM);
            calls.udp_send += 1;
            while took(self.b.recv(&mut buf), &mut calls.udp_recv).map(|n| assert_eq!(n, DATAGRAM)).is_none() {}
        }
        for _ in 0..ROUNDS {
            let mut sent = 0;
            while sent < SEGMENT {
                sent += self.client.write(&[2; SEGMENT][sent..]).unwrap();
                calls.tcp_send += 1;
            }
            let mut got = 0;
            while got < SEGMENT {
                if let Some(n) = took(self.server.read(&mut buf[..SEGMENT - got]), &mut calls.tcp_recv) {
                    assert!(n > 0, "the connection closed");
                    got += n;
                }
            }
        }
    }
}

/// `after` less `before`: what the traffic's calls ran.
fn delta(before: &KernelProgram, after: &KernelProgram) -> (u64, u64, u64) {
    (
        after.run_cnt - before.run_cnt,
        after.run_time_ns - before.run_time_ns,
        after.recursion_misses - before.recursion_misses,
    )
}

/// Runs, ns/run of the median batch, and runs the kernel skipped, of one
/// program over the batches (`(runs, ns, missed)` each).
fn summary(batches: &[(u64, u64, u64)]) -> (u64, f64, u64) {
    let mut per: Vec<f64> =
        batches.iter().map(|&(runs, ns, _)| if runs == 0 { 0.0 } else { ns as f64 / runs as f64 }).collect();
    per.sort_by(f64::total_cmp);
    let median = per.get(per.len() / 2).copied().unwrap_or(0.0);
    (batches.iter().map(|b| b.0).sum(), median, batches.iter().map(|b| b.2).sum())
}

#[test]
fn per_call_programs_next_to_empty_ones() {
    let ns = NetNs::new("callcost").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo", "--bpf-stats", "true"]).unwrap();
    let m = observer.metrics().unwrap();
    let hook = m
        .matching("observer_probe_info", &[("concern", "sock_calls")])
        .first()
        .and_then(|s| s.labels.get("hook").cloned());
    let Some(hook) = hook else {
        println!("skipped: sock_calls has no hook on this kernel in this tier");
        return;
    };
    let pairs = pairs(&hook);
    assert!(!pairs.is_empty(), "a sock_calls hook this test does not know: {hook}");

    let empties: Vec<RefProg> = pairs
        .iter()
        .map(|p| {
            let name = p.program.replacen("obs_", "empty_", 1);
            let mut r = RefProg::attach(&name, &EMPTY, p.empty_at[0]).unwrap();
            for &at in &p.empty_at[1..] {
                r.also(at).unwrap();
            }
            r
        })
        .collect();
    // Per pair: the observer's program and its empty twin, with their counters now.
    let snapshot = || {
        let ours = programs_of_process(observer.pid()).unwrap();
        pairs
            .iter()
            .zip(&empties)
            .map(|(p, e)| {
                let prog = ours.iter().find(|k| k.name == p.program);
                let prog = prog.unwrap_or_else(|| panic!("the observer holds no {}: {ours:?}", p.program)).clone();
                (prog, program_of_fd(e.fd()).unwrap())
            })
            .collect::<Vec<_>>()
    };

    let mut traffic = ns.run(Traffic::new);
    let mut calls = Calls::default();
    // Per pair, per batch: the program's and the empty one's (runs, ns, missed).
    let mut batches: Vec<(Vec<_>, Vec<_>)> = vec![(Vec::new(), Vec::new()); pairs.len()];
    for _ in 0..BATCHES {
        let before = snapshot();
        traffic.batch(&mut calls);
        for (i, (after, before)) in snapshot().iter().zip(&before).enumerate() {
            batches[i].0.push(delta(&before.0, &after.0));
            batches[i].1.push(delta(&before.1, &after.1));
        }
    }
    let sizes = snapshot();

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("call_cost: kernel {}, sock_calls hook {hook}", kernel.trim());
    println!(
        "call_cost: calls: UDP {} sends, {} receives; TCP {} sends, {} receives (IPv4, 127.0.0.1), \
         in {BATCHES} batches; ns/run of the median batch",
        calls.udp_send, calls.udp_recv, calls.tcp_send, calls.tcp_recv
    );
    println!("cost | program | insns | runs | ns/run | empty program at | runs | ns/run | ratio | ns over empty |");
    let mut problems = Vec::new();
    for (((p, e), (prog, empty)), size) in pairs.iter().zip(&empties).zip(&batches).zip(&sizes) {
        let (runs, per, missed) = summary(prog);
        let (e_runs, e_per, e_missed) = summary(empty);
        let ratio = if e_per > 0.0 { format!("{:.2}", per / e_per) } else { "-".to_owned() };
        let places: Vec<String> = p.empty_at.iter().map(|a| a.to_string()).collect();
        println!(
            "cost | {} | {} | {runs} | {per:.0} | {} | {e_runs} | {e_per:.0} | {ratio} | {:.0} |",
            p.program,
            size.0.xlated_insns,
            places.join(" + "),
            per - e_per
        );
        let want = p.runs.of(&calls);
        // A run the kernel skipped (recursion on a CPU) is counted as missed.
        for (name, ran, missed) in [(p.program, runs, missed), (e.name(), e_runs, e_missed)] {
            if ran + missed < want {
                problems.push(format!("{name} ran {ran} times (missed {missed}) for {want} calls"));
            }
        }
        if e_runs > 0 && e_per == 0.0 {
            problems.push(format!("{} ran with no time counted: BPF statistics are off", e.name()));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}\n{calls:?}\n{}", observer.log());
}

#[test]
fn every_tier_has_programs_and_empty_twins() {
    for hook in [
        "tp_btf/sock_send_length+sock_recv_length+cgroup/sendmsg+recvmsg",
        "fexit/inet_sendmsg+inet6_sendmsg+inet_recvmsg+inet6_recvmsg+cgroup/sendmsg+recvmsg",
        "kprobe+kretprobe/inet_sendmsg+inet6_sendmsg+inet_recvmsg+inet6_recvmsg+kprobe/tcp_cleanup_rbuf+cgroup/sendmsg+recvmsg",
    ] {
        let pairs = pairs(hook);
        assert!(pairs.len() >= 2, "{hook}");
        for p in pairs {
            let kind = |a: &Attach| a.to_string().split('/').next().unwrap().to_owned();
            assert!(p.empty_at.iter().all(|a| hook.starts_with(&kind(a)) || hook.contains(&format!("+{}/", kind(a)))));
            // The kernel keeps 15 bytes of a name.
            assert!(p.program.len() <= 15 && p.program.replacen("obs_", "empty_", 1).len() <= 15, "{}", p.program);
        }
    }
    assert!(pairs("none").is_empty());
}
