//! The exposition as production reads it: a real Prometheus server (Debian's
//! package) scrapes the observer every second while the test moves traffic,
//! and a PromQL quantile over the goodput histogram agrees with what the test
//! measured itself; every query of the Grafana dashboard runs on it.
//! `promtool check metrics` lints the same exposition. Native histograms
//! (`--histograms`, protobuf exposition) against a Prometheus with them on,
//! beside one without, and the chart's recording rules evaluated by both.
//!
//! Prometheus' scrapes and API calls are TCP sessions in the test's namespace
//! too; they stay far below the goodput floor, and no count is asserted here.
use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use observer_tests::{
    NetNs, ObserverProcess, PrometheusOptions, PrometheusServer, TcpServer, TempDir, counter_rate, promtool_bin,
    promtool_check_metrics, run_with_timeout, transfer, wait_sessions, wait_until, workspace_root,
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
    let queries = dashboard_queries("1m", "node");
    assert!(!queries.is_empty());
    for (e, q) in queries {
        prom.query(&q).unwrap_or_else(|err| panic!("dashboard query {e}: {err:#}"));
    }

    let (health, error) = prom.target_health().unwrap();
    assert_eq!(health, "up", "Prometheus' last scrape of the observer failed: {error}");
    assert!(prom.query_value("scrape_samples_post_metric_relabeling{job=\"observer\"} > 0").unwrap().is_some());
}

/// Every query of the Grafana dashboard: (as written, with its variables set
/// as Grafana would: `$__rate_interval`, every job, `group_by`).
fn dashboard_queries(rate_interval: &str, group_by: &str) -> Vec<(String, String)> {
    let dashboard = workspace_root().join("deploy/grafana/observer-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dashboard).unwrap()).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    exprs
        .into_iter()
        .map(|e| {
            let q = e
                .replace("$__rate_interval", rate_interval)
                .replace("$job", ".+")
                .replace("${group_by}", group_by)
                .replace("$group_by", group_by);
            (e, q)
        })
        .collect()
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
    // The default (classic buckets in text), and native only, whose text
    // histograms have only the +Inf bucket.
    for histograms in ["both", "native"] {
        let ns = NetNs::new("promtool").unwrap();
        let mut observer =
            ObserverProcess::start(&ns, &["--iface", "lo", "--label", "region=test", "--histograms", histograms])
                .unwrap();
        let server = TcpServer::start_in(&ns, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        // Some traffic, so that histograms and counters carry values, not only zeros.
        let addr = server.addr();
        ns.spawn(move || transfer(addr, 2_000_000, 2_000_000, None).unwrap()).join().unwrap();
        let exposition = observer.metrics().unwrap().raw().to_string();
        let has_buckets = exposition.contains("observer_session_goodput_bytes_per_second_bucket{direction=\"receive\",impaired=\"false\",protocol=\"tcp\",region=\"test\",le=\"1000\"}");
        assert_eq!(has_buckets, histograms == "both", "{histograms}: {exposition}");

        promtool_check_metrics(&exposition).unwrap_or_else(|e| panic!("{histograms}: {e:#}"));
    }
}

/// Native buckets at the observer's schema (3) are a factor 2^(1/8) wide: a
/// quantile interpolated within the bucket that holds the true one is within
/// this factor of it.
const NATIVE_FACTOR: f64 = 1.090_507_732_665_257_7;
/// Classic goodput buckets: a quarter decade, at most 1.78 between bounds
/// (rounded to three digits).
const CLASSIC_FACTOR: f64 = 1.78;
/// Known sessions: downloads of 4 MiB paced over 100 ms to 900 ms, so that
/// their goodputs fall in distinct native buckets; an odd count has one
/// median.
const KNOWN: usize = 9;
const FLOOR: u64 = 1_000_000;
/// Both servers scrape and evaluate their rules every second.
const SCRAPE: Duration = Duration::from_secs(1);
/// The chart's recorded drop rate reads `[5m]`.
const RATE_RANGE: Duration = Duration::from_secs(300);

/// `a / b` within a factor `f` (and a rounding of the values either way).
fn within(a: f64, b: f64, f: f64) -> bool {
    let r = a / b;
    r >= 1.0 / f * (1.0 - 1e-9) && r <= f * (1.0 + 1e-9)
}

/// The same value but for rounding (of the API's decimal text).
fn same(a: f64, b: f64) -> bool {
    within(a, b, 1.0)
}

/// The chart's recording rules for static label `region`, as its
/// PrometheusRule template assembles them (templates/prometheusrule.yaml):
/// the rule file, then the per-label group with the label's name in place.
fn chart_rules(labels: &[&str]) -> String {
    let dir = workspace_root().join("deploy/helm/observer/rules");
    let mut rules = std::fs::read_to_string(dir.join("observer.rules.yaml")).unwrap();
    let by_label = std::fs::read_to_string(dir.join("by-label.rules.yaml")).unwrap();
    for label in labels {
        rules.push_str(&by_label.replace("LABEL", label));
    }
    rules
}

/// Datagrams to a port nothing listens on: drops with reason `no_socket`.
fn drop_on_loopback(ns: &NetNs) {
    ns.spawn(|| {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..5 {
            s.send_to(b"nobody", "127.0.0.1:9").unwrap();
        }
    })
    .join()
    .unwrap();
}

/// Known sessions, read by two Prometheus servers at once: one with native
/// histograms on (it negotiates protobuf and stores the session histograms
/// as native ones), one without (text, classic buckets); both evaluate the
/// chart's recording rules.
struct Known {
    /// Receive-direction goodputs of the known sessions as the observer
    /// computed them (session log: bytes / lifetime), sorted.
    goodputs: Vec<f64>,
    /// How many of them retransmitted (impaired="true").
    impaired: usize,
    native: PrometheusServer,
    classic: PrometheusServer,
    _observer: ObserverProcess,
    _server: TcpServer,
    tmp: TempDir,
    _ns: NetNs,
}

fn known_sessions(name: &str) -> Known {
    let ns = NetNs::new(name).unwrap();
    let tmp = TempDir::new(name).unwrap();
    let log = tmp.path().join("sessions.jsonl");
    let rules = tmp.path().join("observer.rules.yaml");
    std::fs::write(&rules, chart_rules(&["region"])).unwrap();
    let observer = ObserverProcess::start(
        &ns,
        &["--iface", "lo", "--label", "region=test", "--session-log", log.to_str().unwrap(), "--histograms", "both"],
    )
    .unwrap();
    let options = |native_histograms| PrometheusOptions {
        native_histograms,
        rule_files: vec![rules.clone()],
        target_labels: vec![("node".into(), "test-node".into())],
    };
    let mut native = PrometheusServer::start_with(&ns, observer.addr(), SCRAPE, &options(true)).unwrap();
    let mut classic = PrometheusServer::start_with(&ns, observer.addr(), SCRAPE, &options(false)).unwrap();
    for prom in [&mut native, &mut classic] {
        wait_until("a first successful scrape", Duration::from_secs(20), Duration::from_millis(200), || {
            Ok(prom.query_value("up{job=\"observer\"}")?.filter(|v| *v == 1.0))
        })
        .unwrap();
    }

    // Drops of a known reason before and after the traffic (seconds of
    // scrapes apart), so that their rate is not zero.
    drop_on_loopback(&ns);
    let server = TcpServer::start_in(&ns, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    for wave in 0..KNOWN / 3 {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let addr = server.addr();
                let pace = Duration::from_millis(100 * (wave * 3 + i + 1) as u64);
                ns.spawn(move || transfer(addr, 0, DOWNLOAD, Some(pace)).unwrap())
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
    drop_on_loopback(&ns);

    // Only the clients receive over the floor (servers and Prometheus'
    // connections far less).
    let sessions = wait_sessions(&log, KNOWN, Duration::from_secs(20), |s| s.bytes_received >= FLOOR).unwrap();
    assert_eq!(sessions.len(), KNOWN, "{sessions:?}");
    let mut goodputs: Vec<f64> =
        sessions.iter().map(|s| s.bytes_received as f64 / s.lifetime.unwrap().as_secs_f64()).collect();
    goodputs.sort_by(f64::total_cmp);
    let log_text = std::fs::read_to_string(&log).unwrap();
    let impaired = log_text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["bytes_received"].as_u64().unwrap() >= FLOOR && v["retransmits"].as_u64().unwrap() > 0)
        .count();

    let native_count = "histogram_count(sum(observer_session_goodput_bytes_per_second{direction=\"receive\"}))";
    let classic_count = "sum(observer_session_goodput_bytes_per_second_count{direction=\"receive\"})";
    for (prom, count) in [(&mut native, native_count), (&mut classic, classic_count)] {
        wait_until(
            "Prometheus to have scraped every session",
            Duration::from_secs(30),
            Duration::from_millis(500),
            || Ok(prom.query_value(count)?.filter(|c| *c >= KNOWN as f64)),
        )
        .unwrap();
    }
    eprintln!("known goodputs (B/s): {goodputs:.0?}; impaired: {impaired}");
    Known { goodputs, impaired, native, classic, _observer: observer, _server: server, tmp, _ns: ns }
}

/// A native histogram's median is within the schema's bucket factor of the
/// sessions' true median and agrees with the classic one within the classic
/// bucket factor; its count is the session count; the TSDB holds one series
/// per label set.
#[test]
fn native_histogram_quantiles_match_the_sessions_and_the_classic_buckets() {
    let mut k = known_sessions("promnative");
    let median = k.goodputs[KNOWN / 2];
    let selector = "observer_session_goodput_bytes_per_second{direction=\"receive\"}";
    let count = k.native.query_value(&format!("histogram_count(sum({selector}))")).unwrap();
    assert_eq!(count, Some(KNOWN as f64), "histogram_count is the session count");
    let native = k.native.query_value(&format!("histogram_quantile(0.5, sum({selector}))")).unwrap().unwrap();
    let classic = k
        .classic
        .query_value(
            "histogram_quantile(0.5, sum by (le) (observer_session_goodput_bytes_per_second_bucket{direction=\"receive\"}))",
        )
        .unwrap()
        .unwrap();
    eprintln!(
        "median: true {median:.0} B/s, native {native:.0} ({:+.2}%), classic {classic:.0} ({:+.2}%)",
        (native / median - 1.0) * 100.0,
        (classic / median - 1.0) * 100.0
    );
    assert!(within(native, median, NATIVE_FACTOR), "native median {native} vs true {median}: {:?}", k.goodputs);
    assert!(within(classic, median, CLASSIC_FACTOR), "classic median {classic} vs true {median}");
    assert!(within(native, classic, NATIVE_FACTOR * CLASSIC_FACTOR), "native {native} vs classic {classic}");
    // Every value's rank: the native p-quantiles at each session's rank fall
    // in that session's bucket.
    for (i, g) in k.goodputs.clone().iter().enumerate() {
        let q = (i as f64 + 0.5) / KNOWN as f64;
        let v = k.native.query_value(&format!("histogram_quantile({q}, sum({selector}))")).unwrap().unwrap();
        assert!(within(v, *g, NATIVE_FACTOR), "q {q}: native {v} vs session {g}");
    }

    // One series per label set: 2 directions x 2 protocols x 2 impaired
    // values, all exist from the start; no _bucket, _sum or _count series.
    let series = k.native.series("{__name__=~\"observer_session_goodput_bytes_per_second.*\"}").unwrap();
    assert_eq!(series.len(), 8, "{series:?}");
    assert!(series.iter().all(|s| s["__name__"] == "observer_session_goodput_bytes_per_second"), "{series:?}");
    for family in ["observer_session_active_goodput_bytes_per_second", "observer_session_duration_seconds"] {
        let series = k.native.series(&format!("{{__name__=~\"{family}.*\"}}")).unwrap();
        assert!(!series.is_empty() && series.iter().all(|s| s["__name__"] == family), "{family}: {series:?}");
        let classic = k.classic.series(&format!("{{__name__=\"{family}_bucket\"}}")).unwrap();
        assert!(classic.len() > series.len() * 10, "{family}: classic buckets are series of their own");
    }
    let classic_series = k.classic.series("{__name__=~\"observer_session_goodput_bytes_per_second.*\"}").unwrap();
    assert_eq!(classic_series.len(), 8 * (34 + 2), "33 bounds and +Inf, _sum, _count per label set");
    let tcp_durations =
        k.native.query_value("histogram_count(sum(observer_session_duration_seconds{protocol=\"tcp\"}))");
    assert!(tcp_durations.unwrap().unwrap() >= 2.0 * KNOWN as f64, "both ends of every download");
    // Everything else is there over protobuf too.
    for family in ["observer_sessions_total", "observer_build_info", "process_resident_memory_bytes"] {
        assert!(k.native.query_value(&format!("count({family})")).unwrap().is_some(), "{family}");
    }
    let (health, error) = k.native.target_health().unwrap();
    assert_eq!(health, "up", "{error}");

    // The dashboard reads native histograms where the server stores them:
    // every query runs, and the goodput median panel has data on both servers.
    for (e, q) in dashboard_queries("5m", "node") {
        for prom in [&mut k.native, &mut k.classic] {
            let data = prom.query(&q).unwrap_or_else(|err| panic!("dashboard query {e}: {err:#}"));
            if e.contains("histogram_quantile(0.5, sum by (direction, $group_by)") {
                let result = data["result"].as_array().unwrap();
                assert!(result.iter().any(|r| r["metric"]["direction"] == "receive"), "{q}: {data}");
            }
        }
    }
}

/// The chart's recording rules load (promtool check rules) and evaluate, in
/// both servers, to the known sessions' values.
#[test]
fn recording_rules_evaluate_to_the_known_sessions() {
    let mut k = known_sessions("promrules");
    let rules = k.tmp.path().join("observer.rules.yaml");
    let out = run_with_timeout(
        Command::new(promtool_bin().unwrap()).arg("check").arg("rules").arg(&rules),
        Duration::from_secs(30),
    )
    .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.contains("SUCCESS: 6 rules found"), "{report}");

    // Rules run every second: wait for an evaluation that saw every session
    // and the drops, then for the 10 s the drop samples below are read over
    // (an evaluation before the drops' second scrape records a rate of 0).
    let impaired_share = k.impaired as f64 / KNOWN as f64;
    let share = "direction:observer_session_goodput_impaired:ratio_rate5m{direction=\"receive\"}";
    let drops = "node_reason:observer_drops:rate5m{node=\"test-node\",reason=\"no_socket\"}";
    for prom in [&mut k.native, &mut k.classic] {
        wait_until("the rules to see every session", Duration::from_secs(20), Duration::from_millis(500), || {
            let p50 = prom.query_value(
                "direction_region:observer_session_goodput_bytes_per_second:p50_rate5m{direction=\"receive\",region=\"test\"}",
            )?;
            let seen = prom.query_value(share)?.is_some_and(|s| (s - impaired_share).abs() < 1e-9);
            let dropped = prom.query_value(drops)?.is_some_and(|d| d > 0.0);
            Ok((p50.is_some() && seen && dropped).then_some(()))
        })
        .unwrap();
    }
    std::thread::sleep(Duration::from_secs(10));
    let (median, p10) = (k.goodputs[KNOWN / 2], k.goodputs[0]);
    for (prom, factor, what) in [(&mut k.native, NATIVE_FACTOR, "native"), (&mut k.classic, CLASSIC_FACTOR, "classic")]
    {
        for (record, want) in [
            ("direction:observer_session_goodput_bytes_per_second:p50_rate5m{direction=\"receive\"}", median),
            ("direction:observer_session_goodput_bytes_per_second:p10_rate5m{direction=\"receive\"}", p10),
            (
                "direction_region:observer_session_goodput_bytes_per_second:p50_rate5m{direction=\"receive\",region=\"test\"}",
                median,
            ),
            (
                "direction_region:observer_session_goodput_bytes_per_second:p10_rate5m{direction=\"receive\",region=\"test\"}",
                p10,
            ),
        ] {
            let got = prom.query_value(record).unwrap().unwrap_or(f64::NAN);
            eprintln!("{what}: {record} = {got:.0}, sessions' {want:.0}");
            assert!(within(got, want, factor), "{what}: {record} = {got}, want {want} within x{factor}");
        }
        let got = prom.query_value(share).unwrap().unwrap_or(f64::NAN);
        assert!((got - impaired_share).abs() < 1e-9, "{what}: impaired share {got}, sessions' {impaired_share}");

        // Drops per node and reason: each recorded sample is the rate it
        // names over the samples the rule could read when it ran. That is
        // every scrape before it, except one still being read or written
        // then (with 1 s scrapes and rules on a slow machine, often the last
        // one): so a prefix of the samples a query at its time reads, missing
        // at most the scrapes of its last two intervals. Prometheus' own rate
        // over all of them checks the formula computed here.
        let data = prom.query(&format!("{drops}[10s]")).unwrap();
        let samples = data["result"][0]["values"].as_array().cloned().unwrap_or_default();
        assert!(samples.len() >= 5, "{what}: {data}");
        let counter = "observer_drops_total{reason=\"no_socket\"}";
        let direct = format!("sum by (node, reason) (rate({counter}[{}s]))", RATE_RANGE.as_secs());
        let mut in_flight = 0;
        for sample in &samples {
            let (at, got) = (sample[0].as_f64().unwrap(), sample[1].as_str().unwrap().parse::<f64>().unwrap());
            assert!(got > 0.0, "{what}: {data}");
            let raw = prom.range_samples_at(counter, RATE_RANGE, at).unwrap();
            let at_ms = (at * 1000.0).round() as i64;
            let want: f64 =
                prom.query_at(&direct, at).unwrap()["result"][0]["value"][1].as_str().unwrap().parse().unwrap();
            let all = counter_rate(&raw, at_ms, RATE_RANGE);
            assert!(all.is_some_and(|r| same(r, want)), "{what}: at {at}: rate {all:?}, Prometheus' {want}: {raw:?}");
            let readable = raw.iter().take_while(|(t, _)| *t <= at_ms - 2 * SCRAPE.as_millis() as i64).count();
            let seen = (readable..=raw.len())
                .rev()
                .find(|n| counter_rate(&raw[..*n], at_ms, RATE_RANGE).is_some_and(|r| same(r, got)));
            assert!(
                seen.is_some(),
                "{what}: at {at}: recorded {got} is the rate over none of the samples' prefixes from {readable} \
                 on (Prometheus' over all {}: {want}): {raw:?}",
                raw.len()
            );
            in_flight += usize::from(seen != Some(raw.len()));
        }
        eprintln!("{what}: {} recorded drop rates, {in_flight} of them while a scrape was in flight", samples.len());

        // The dashboard reads what the rules recorded: every panel query
        // naming a recorded series has data, and grouped by a static label
        // the median panel is the recorded median (queried at one instant).
        let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() - 2.0;
        let value = |data: &serde_json::Value| -> Option<f64> {
            let result = data["result"].as_array()?;
            let r = result.iter().find(|r| r["metric"]["direction"] == "receive" && r["metric"]["region"] == "test")?;
            r["value"][1].as_str()?.parse().ok()
        };
        let recorded_median =
            value(&prom.query_at("direction_region:observer_session_goodput_bytes_per_second:p50_rate5m", at).unwrap());
        assert!(recorded_median.is_some(), "{what}: no recorded median at {at}");
        let mut read = 0;
        for (e, q) in dashboard_queries("5m", "region") {
            if !e.contains(":observer_") {
                continue;
            }
            read += 1;
            let data = prom.query_at(&q, at).unwrap();
            assert!(!data["result"].as_array().unwrap().is_empty(), "{what}: {q}: no data: {data}");
            if e.starts_with("direction_${group_by}:observer_session_goodput_bytes_per_second:p50_rate5m or ") {
                assert_eq!(value(&data), recorded_median, "{what}: {q}: {data}");
            }
        }
        assert!(read >= 5, "{what}: the dashboard reads the recorded series ({read} queries)");
    }
}
