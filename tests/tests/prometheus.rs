//! The exposition as production reads it: a real Prometheus server (Debian's
//! package) scrapes the observer every second while the test moves traffic,
//! and a PromQL quantile over the goodput histogram agrees with what the test
//! measured itself; every query of the Grafana dashboard runs on it.
//! `promtool check metrics` lints the same exposition.
//!
//! Prometheus' scrapes and API calls are TCP sessions in the test's namespace
//! too; they stay far below the goodput floor, and no count is asserted here.
use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use observer_tests::{
    NetNs, ObserverProcess, PrometheusServer, TcpServer, TempDir, promtool_bin, run_with_timeout, transfer, wait_until,
};

const DOWNLOAD: u64 = 4 * 1024 * 1024;
const PACE: Duration = Duration::from_millis(300);
const TRANSFERS: usize = 8;

/// Buckets are a quarter decade apart: an interpolated quantile is within one
/// bucket (x1.78) of the true one.
const BUCKET_FACTOR: f64 = 1.8;

#[test]
fn prometheus_quantile_matches_measured_goodput() {
    let ns = NetNs::new("prom").unwrap();
    let observer = ObserverProcess::start(&ns, &["--iface", "lo"]).unwrap();
    let mut prom = PrometheusServer::start(&ns, observer.addr(), Duration::from_secs(1)).unwrap();
    // One scrape before the traffic, so that rate() has a zero to start from.
    wait_until("a first successful scrape", Duration::from_secs(20), Duration::from_millis(200), || {
        Ok(prom.query_value("up{job=\"observer\"}")?.filter(|v| *v == 1.0))
    })
    .unwrap();

    let server = TcpServer::start_in(&ns, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    // Two waves of four concurrent 4 MiB downloads, each stretched over ~300 ms.
    let mut goodputs = Vec::new();
    for _ in 0..TRANSFERS / 4 {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let addr = server.addr();
                ns.spawn(move || transfer(addr, 0, DOWNLOAD, Some(PACE)).unwrap())
            })
            .collect();
        for h in handles {
            let t = h.join().unwrap();
            goodputs.push(t.received as f64 / t.duration().as_secs_f64());
        }
    }
    goodputs.sort_by(f64::total_cmp);
    let measured_median = (goodputs[TRANSFERS / 2 - 1] + goodputs[TRANSFERS / 2]) / 2.0;

    // Only the client sockets receive 4 MiB; server sockets and Prometheus'
    // own connections receive far less than the floor.
    let count = "sum(observer_session_goodput_bytes_per_second_count{direction=\"receive\"})";
    wait_until(
        "Prometheus to have scraped every download",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || Ok(prom.query_value(count)?.filter(|c| *c >= TRANSFERS as f64)),
    )
    .unwrap();

    let quantile = |q: f64| {
        format!(
            "histogram_quantile({q}, sum by (le) (increase(observer_session_goodput_bytes_per_second_bucket{{direction=\"receive\"}}[1m])))"
        )
    };
    let median = prom.query_value(&quantile(0.5)).unwrap().expect("a median");
    let ratio = median / measured_median;
    eprintln!("Prometheus median {median:.0} B/s, test-measured median {measured_median:.0} B/s, ratio {ratio:.2}");
    assert!(
        (1.0 / BUCKET_FACTOR..=BUCKET_FACTOR).contains(&ratio),
        "PromQL median {median} vs measured {measured_median} (ratio {ratio}); per-transfer: {goodputs:?}"
    );
    // rate() over the same window answers the same quantile (it only scales).
    let via_rate = prom
        .query_value(
            "histogram_quantile(0.5, sum by (le) (rate(observer_session_goodput_bytes_per_second_bucket{direction=\"receive\"}[1m])))",
        )
        .unwrap()
        .expect("a median via rate()");
    assert!((via_rate / median - 1.0).abs() < 1e-6, "rate() {via_rate} vs increase() {median}");

    // Every query of the Grafana dashboard parses and runs on the real
    // server, with its variables set as Grafana would.
    let dashboard = observer_tests::workspace_root().join("deploy/grafana/observer-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dashboard).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(!exprs.is_empty());
    for e in exprs {
        let q = e.replace("$__rate_interval", "1m").replace("$job", ".+").replace("$group_by", "node");
        prom.query(&q).unwrap_or_else(|err| panic!("dashboard query {e}: {err:#}"));
    }

    let (health, error) = prom.target_health().unwrap();
    assert_eq!(health, "up", "Prometheus' last scrape of the observer failed: {error}");
    assert!(prom.query_value("scrape_samples_post_metric_relabeling{job=\"observer\"} > 0").unwrap().is_some());
}

fn collect_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::String(e)) = m.get("expr") {
                out.push(e.clone());
            }
            m.values().for_each(|v| collect_exprs(v, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

#[test]
fn promtool_check_metrics_reports_nothing() {
    let ns = NetNs::new("promtool").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo", "--label", "region=test"]).unwrap();
    let server = TcpServer::start_in(&ns, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    // Some traffic, so that histograms and counters carry values, not only zeros.
    let addr = server.addr();
    ns.spawn(move || transfer(addr, 2_000_000, 2_000_000, None).unwrap()).join().unwrap();
    let exposition = observer.metrics().unwrap().raw().to_string();

    let tmp = TempDir::new("promtool").unwrap();
    let file = tmp.path().join("metrics.txt");
    std::fs::write(&file, &exposition).unwrap();
    // promtool reads the exposition from stdin; a shell redirect keeps the
    // run bounded by run_with_timeout, which gives the child no stdin itself.
    let out = run_with_timeout(
        Command::new("sh").args(["-c", "exec \"$0\" check metrics < \"$1\""]).arg(promtool_bin().unwrap()).arg(&file),
        Duration::from_secs(30),
    )
    .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics: {}\n{report}", out.status);
}
