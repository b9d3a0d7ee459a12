//! Scrape latency of the observer's real metrics server and metric families with many
//! series, for `cargo xtask bench` (which runs it and reports its output).
//!
//! The series come through the same public calls the running observer makes:
//! packet drops per (reason, interface), the largest family on a node with many
//! interfaces (one veth per pod), plus each interface's retransmit, reset and
//! device counters, and closed sessions in every goodput histogram. The server is
//! `observer::server`'s router and connection loop; one client keeps its
//! connection, as Prometheus does. Not included: the kernel-table walk a live
//! observer does at each scrape (`Pipeline::refresh`), which depends on open
//! sessions, not on series.
//!
//! Usage: `scrape_latency [--series N] [--scrapes N] [--protobuf 0|1]`; prints one
//! JSON object. `--protobuf 1` scrapes as a Prometheus with native histograms
//! does (the protobuf exposition, `--histograms both`).
use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use observer::{
    metrics::Metrics,
    metrics::labels::parse_label,
    server::{AppState, router, serve},
    session::{Protocol, Session},
};

/// Real drop reasons (`enum skb_drop_reason`, as the observer names them).
const REASONS: [&str; 30] = [
    "not_specified",
    "no_socket",
    "pkt_too_small",
    "tcp_csum",
    "socket_filter",
    "udp_csum",
    "netfilter_drop",
    "otherhost",
    "ip_csum",
    "ip_inhdr",
    "ip_rpfilter",
    "unicast_in_l2_multicast",
    "xfrm_policy",
    "ip_noproto",
    "socket_rcvbuff",
    "proto_mem",
    "tcp_md5notfound",
    "tcp_md5unexpected",
    "tcp_md5failure",
    "socket_backlog",
    "tcp_flags",
    "tcp_zerowindow",
    "tcp_old_data",
    "tcp_overwindow",
    "tcp_ofomerge",
    "tcp_rfc7323_paws",
    "tcp_invalid_sequence",
    "tcp_reset",
    "qdisc_drop",
    "neigh_failed",
];
/// Series each interface adds: one per drop reason, retransmits, resets sent and
/// received, and packets/bytes/drops per direction.
const SERIES_PER_IFACE: usize = REASONS.len() + 1 + 2 + 6;
/// Far above the answer's size (about 1 MiB for 10,000 series).
const MAX_BODY: u64 = 64 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut series = 10_000;
    let mut scrapes = 200;
    let mut protobuf = 0;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or(format!("{arg} needs a value"))?.parse()?;
        match arg.as_str() {
            "--series" => series = value,
            "--scrapes" => scrapes = value,
            "--protobuf" => protobuf = value,
            _ => return Err(format!("unknown argument {arg}").into()),
        }
    }
    let labels = vec![parse_label("region=eu-west")?, parse_label("track=bench")?];
    let metrics = Arc::new(Metrics::new(labels, &[], observer::metrics::native::HistogramMode::Both)?);
    populate(&metrics, series);
    let state = Arc::new(AppState { metrics, ready: true.into(), pipeline: OnceLock::new(), auth: None });

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))?;
    let addr = listener.local_addr()?;
    runtime.spawn(serve(listener, router(state), None));

    // One kept-alive connection, as Prometheus scrapes (ureq's agent keeps it).
    let client = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .max_idle_connections_per_host(1)
        .build()
        .new_agent();
    let url = format!("http://{addr}/metrics");
    let accept = match protobuf {
        0 => "text/plain;version=0.0.4",
        _ => "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited",
    };
    let get_metrics =
        || client.get(&url).header("accept", accept).call()?.body_mut().with_config().limit(MAX_BODY).read_to_vec();
    let body = get_metrics()?;
    let text = String::from_utf8_lossy(&body);
    let exported = match protobuf {
        0 => text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count(),
        // The protobuf body has no lines: the same metrics' text count.
        _ => state_series(&url, &client)?,
    };
    let mut ms = Vec::with_capacity(scrapes);
    for _ in 0..scrapes {
        // From the request to the last byte of the answer.
        let started = Instant::now();
        get_metrics()?;
        ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let format = if protobuf == 0 { "text" } else { "protobuf" };
    let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
    println!(
        "{{\"format\": \"{format}\", \"series\": {exported}, \"bytes\": {}, \"scrapes\": {scrapes}, \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"max_ms\": {:.3}}}",
        body.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    Ok(())
}

/// Series of the text exposition of the server at `url`.
fn state_series(url: &str, client: &ureq::Agent) -> Result<usize, Box<dyn std::error::Error>> {
    let text = client.get(url).call()?.body_mut().with_config().limit(MAX_BODY).read_to_string()?;
    Ok(text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count())
}

/// Fills the metrics with about `series` series.
fn populate(metrics: &Metrics, series: usize) {
    for (i, (protocol, retransmits)) in
        [(Protocol::Tcp, 0), (Protocol::Tcp, 1), (Protocol::Udp, 0)].into_iter().enumerate()
    {
        let session = Session {
            protocol,
            local: SocketAddr::from((Ipv4Addr::LOCALHOST, 40_000 + i as u16)),
            remote: SocketAddr::from((Ipv4Addr::LOCALHOST, 443)),
            bytes_transmitted: 4 << 20,
            bytes_received: 8 << 20,
            lifetime: Some(Duration::from_millis(250)),
            active_transmit: Some(Duration::from_millis(200)),
            active_receive: Some(Duration::from_millis(200)),
            owner: None,
            netns_ino: 0,
            rx_ifindex: 1,
            tx_ifindex: 1,
            retransmits,
        };
        metrics.record(&session, &[], 1);
    }
    for i in 0..series.div_ceil(SERIES_PER_IFACE) {
        let iface = format!("veth{i:05}");
        for reason in REASONS {
            metrics.add_drops(reason, &iface, 1);
        }
        metrics.add_tcp_retransmits(&iface, 1);
        metrics.add_tcp_resets("sent", &iface, 1);
        metrics.add_tcp_resets("received", &iface, 1);
        metrics.add_interface(&iface, "receive", [1, 1500, 0]);
        metrics.add_interface(&iface, "transmit", [1, 1500, 0]);
    }
}
