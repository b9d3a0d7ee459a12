//! The label set cap (`--max-label-sets`): 18,000 sessions from 6,000
//! distinct comm values against a cap of 500. What is capped is userspace's
//! (the enricher's admission of label sets); the comm it reads is the state
//! hook's, which session_labels and haproxy check on every kernel.
use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use observer_tests::{Metrics, NetNs, ObserverProcess, rss_bytes, set_thread_comm};

const TIMEOUT: Duration = Duration::from_secs(15);

fn sessions(m: &Metrics, labels: &[(&str, &str)]) -> f64 {
    m.sum("observer_sessions_total", labels)
}

/// Connections from `comms` distinct process names (the client thread sets
/// its comm before each group) to each of `ports`, accepted by one thread
/// named `lbl-server`: `comms.len() * ports.len()` client label sets and one
/// server set (its peer port is ephemeral: `other`).
fn connect_from_many_comms(ns: &NetNs, comms: std::ops::Range<usize>, ports: &[u16]) {
    let listeners: Vec<std::net::TcpListener> =
        ports.iter().map(|p| ns.run(|| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).unwrap())).collect();
    let (tx, rx) = std::sync::mpsc::channel::<Option<usize>>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        set_thread_comm("lbl-server").unwrap();
        while let Ok(Some(i)) = rx.recv() {
            drop(listeners[i].accept().unwrap());
            done_tx.send(()).unwrap();
        }
    });
    let ports = ports.to_vec();
    ns.spawn(move || {
        for c in comms {
            set_thread_comm(&format!("c{c:05}")).unwrap();
            for (i, port) in ports.iter().enumerate() {
                let client = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, *port)).unwrap();
                tx.send(Some(i)).unwrap();
                done_rx.recv().unwrap();
                drop(client);
            }
        }
        tx.send(None).unwrap();
    })
    .join()
    .unwrap();
    server.join().unwrap();
}

/// Issue 27: 2,000 distinct comm values times 3 service ports against
/// `--max-label-sets 500`: at most 500 label sets plus the all-`other` set
/// are exported, every refused session is counted once, and memory stays
/// flat when 6,000 more new sets come after 6,000 refused ones.
#[test]
fn label_sets_beyond_the_cap_are_all_other_counted_exactly_and_memory_stays_bounded() {
    const COMMS: usize = 2000;
    const PORTS: [u16; 3] = [21_000, 21_001, 21_002];
    const CAP: usize = 500;
    let ns = NetNs::new("labelsets").unwrap();
    let mut observer = ObserverProcess::start(
        &ns,
        &[
            "--iface",
            "lo",
            "--session-label",
            "comm",
            "--service-port",
            "21000-21002",
            // The comm budget must not be what folds: the set cap is under test.
            "--label-limit",
            "comm=100000",
            "--max-label-sets",
            &CAP.to_string(),
        ],
    )
    .unwrap();
    let rss_start = rss_bytes(observer.pid()).unwrap();
    let connections = COMMS * PORTS.len();
    let skipped = |m: &Metrics| m.sum("observer_bpf_program_recursion_misses_total", &[]);
    let check = |m: &Metrics, rounds: usize| {
        let all_other = [("comm", "other"), ("peer_port", "other")];
        let sets: BTreeSet<(String, String)> = m
            .matching("observer_sessions_total", &[])
            .iter()
            .map(|s| (s.labels["comm"].clone(), s.labels["peer_port"].clone()))
            .filter(|(c, p)| !(c == "other" && p == "other"))
            .collect();
        assert_eq!(sets.len(), CAP, "exactly the cap's worth of sets besides the all-other one");
        let server_sets: Vec<_> = sets.iter().filter(|(_, p)| p == "other").collect();
        assert_eq!(server_sets.len(), 1, "the server's ends share one set: {server_sets:?}");
        let overflow = m.value("observer_label_overflow_total", &[("label", "label_set")]).unwrap();
        // The server's set and CAP - 1 client sets were admitted, one session each
        // for the clients; every other client session is refused.
        assert_eq!(overflow, (rounds * connections - (CAP - 1)) as f64, "{}", m.raw());
        assert_eq!(sessions(m, &all_other), overflow, "each refused session is in the all-other set");
        assert_eq!(m.value("observer_label_overflow_total", &[("label", "comm")]), Some(0.0));
        // A close the kernel ran no program for (a recursion miss) is reported
        // only at its address's next birth (docs/sessions.md): at most that many
        // sessions may still be missing here.
        let total = (2 * rounds * connections) as f64;
        let n = sessions(m, &[]);
        assert!(n <= total && n >= total - skipped(m), "{n} sessions of {total}, {} skipped", skipped(m));
    };

    connect_from_many_comms(&ns, 0..COMMS, &PORTS);
    let want = (2 * connections) as f64;
    let m = observer.scrape_until("both ends of 6,000 connections", TIMEOUT, |m| sessions(m, &[]) + skipped(m) >= want);
    check(&m, 1);
    let rss_one = rss_bytes(observer.pid()).unwrap();
    let series_one = m.samples().len();

    // 6,000 more new sets: all refused, and the exposition stays.
    connect_from_many_comms(&ns, COMMS..2 * COMMS, &PORTS);
    let m = observer
        .scrape_until("both ends of 12,000 connections", TIMEOUT, |m| sessions(m, &[]) + skipped(m) >= 2.0 * want);
    check(&m, 2);
    let rss_two = rss_bytes(observer.pid()).unwrap();
    assert!(m.samples().len() <= series_one + 50, "{} series after, {series_one} before", m.samples().len());

    // And 6,000 more: memory stays too. Measured from the second batch, not
    // the first: in qemu guests the allocator's heap kept growing by up to
    // 5 MiB during the first refused batch (sessions processed while full
    // expositions were rendered) and then not by one page over 24,000 more
    // refused sets, in two runs on 6.1 (on this host: flat from the first).
    // A cost per refused set still shows here, whatever the heap's high-water.
    connect_from_many_comms(&ns, 2 * COMMS..3 * COMMS, &PORTS);
    let m = observer
        .scrape_until("both ends of 18,000 connections", TIMEOUT, |m| sessions(m, &[]) + skipped(m) >= 3.0 * want);
    check(&m, 3);
    let rss_three = rss_bytes(observer.pid()).unwrap();
    assert!(m.samples().len() <= series_one + 50, "{} series after, {series_one} before", m.samples().len());
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    eprintln!(
        "label set cap {CAP}: RSS {:.1} MiB at start, {:.1} MiB after 6,001 sets, {:.1} MiB after 12,001, {:.1} MiB after 18,001; {series_one} samples exposed",
        mib(rss_start),
        mib(rss_one),
        mib(rss_two),
        mib(rss_three)
    );
    assert!(rss_three < rss_start + (32 << 20), "RSS grew from {rss_start} to {rss_three}");
    assert!(rss_three < rss_two + (4 << 20), "6,000 refused sets grew RSS from {rss_two} to {rss_three}");
}
