//! Userspace cost of session labels: how many closed sessions one core can
//! label and record. Real parts throughout: the observer's own `Enricher`
//! (with this host's cgroup tree) and `Metrics`; only the sessions are made
//! up, since the kernel side is not what is measured here. Scrape latency
//! with 10,000 series is `cargo xtask bench --workload scrape`.
//!
//! `cargo bench -p observer --bench session_labels` (`-- --quick` for a
//! seconds-long smoke run). Prints one JSON line per figure.
use std::{
    hint::black_box,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use observer::{
    enrich::{
        EnrichConfig, Enricher, SessionLabel,
        peers::{parse_peer_group, parse_service_ports},
    },
    metrics::Metrics,
    session::{Owner, Protocol, Session},
};

/// CPU time of the calling thread: the figure is per core, whatever else
/// the machine runs.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn enricher(labels: &[SessionLabel]) -> Enricher {
    Enricher::new(EnrichConfig {
        labels: labels.to_vec(),
        peer_groups: vec![
            parse_peer_group("10.0.0.0/8=cluster").unwrap(),
            parse_peer_group("10.20.0.0/16=storage").unwrap(),
        ],
        service_ports: vec![parse_service_ports("8000-8099").unwrap()],
        series_ttl: Duration::from_secs(1800),
        pod_log_dir: "/var/log/pods".into(),
        cgroup_root: observer::kernel::cgroup::cgroup2_root(),
        ..Default::default()
    })
    .unwrap()
}

/// The i-th made-up session: 40 processes, peers spread over the groups
/// and 100 service ports, sizes around the goodput floor.
fn session(i: u64) -> Session {
    let peer = IpAddr::V4(Ipv4Addr::new(10, (i % 3 * 10) as u8, (i >> 8) as u8, i as u8));
    Session {
        protocol: if i.is_multiple_of(5) { Protocol::Udp } else { Protocol::Tcp },
        local: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 1, 0, 1)), 40_000 + (i % 20_000) as u16),
        remote: SocketAddr::new(peer, 8000 + (i % 100) as u16),
        bytes_transmitted: 500_000 + i % 1_000_000,
        bytes_received: 2_000_000 + i % 3_000_000,
        lifetime: Some(Duration::from_micros(1000 + i % 100_000)),
        active_transmit: Some(Duration::from_micros(500 + i % 50_000)),
        active_receive: Some(Duration::from_micros(600 + i % 50_000)),
        owner: Some(Owner { pid: 1000 + (i % 40) as u32, comm: format!("worker-{}", i % 40), cgroup_id: 1 }),
        netns_ino: 1,
        rx_ifindex: 1,
        tx_ifindex: 1,
        retransmits: i.is_multiple_of(7) as u32,
    }
}

/// Sessions one core labels and records per second, every label on.
fn enrich_and_record(n: u64) {
    let labels = [
        SessionLabel::Comm,
        SessionLabel::ContainerId,
        SessionLabel::PodUid,
        SessionLabel::Pod,
        SessionLabel::Namespace,
        SessionLabel::PeerGroup,
        SessionLabel::PeerPort,
    ];
    let mut e = enricher(&labels);
    let metrics = Metrics::new(Vec::new(), &e.names(), observer::metrics::native::HistogramMode::Both).unwrap();
    let sessions: Vec<Session> = (0..n).map(session).collect();
    let (cpu, wall) = (thread_cpu(), Instant::now());
    for s in &sessions {
        let now = Instant::now();
        let values = e.label(s, now, |l| metrics.label_overflow(l));
        metrics.record(s, &values, 1_000_000);
    }
    let (cpu, wall) = (thread_cpu() - cpu, wall.elapsed());
    black_box(&metrics);
    println!(
        "{}",
        serde_json::json!({
            "figure": "enrich_and_record",
            "sessions": n,
            "labels": e.names(),
            "cpu_seconds": cpu.as_secs_f64(),
            "sessions_per_cpu_second": n as f64 / cpu.as_secs_f64(),
            "ns_per_session": cpu.as_nanos() as f64 / n as f64,
            "wall_seconds": wall.as_secs_f64(),
        })
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    enrich_and_record(if quick { 20_000 } else { 1_000_000 });
}
