//! Series economy of the session histograms, classic against native, measured
//! from the observer's real expositions (docs/series.md quotes its output).
//!
//! A node with `--label region=... --label track=...` and the session labels
//! `namespace`, `pod` and `peer_country` on, whose sessions fill `--sets`
//! label sets (the default `--max-label-sets` is 1,000): 40 pods in 5
//! namespaces talking to 25 peer countries, each set with TCP sessions in
//! both directions, impaired and not, goodputs spread over three decades.
//! Both expositions come through the same public calls the running observer
//! makes (`Metrics::record`, `encode`, `encode_protobuf`).
//!
//! Series are what Prometheus stores: each sample line of the text format is
//! one; a native histogram is one series whatever its buckets.
//!
//! Usage: `series_economy [--sets N]`; prints one JSON object.
use std::time::Duration;

use observer::{
    metrics::{Metrics, labels::parse_label, native::HistogramMode},
    session::{Protocol, Session},
};
use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as dm;
use prost::Message as _;

const SESSION_LABELS: [&str; 3] = ["namespace", "pod", "peer_country"];

fn session(i: usize, impaired: bool) -> Session {
    // Goodputs from ~1 MB/s to ~1 GB/s, deterministic.
    let bytes = 2_000_000 + (i as u64 * 7_919) % 1_000_000_000;
    let millis = 10 + (i as u64 * 104_729) % 2_000;
    Session {
        protocol: Protocol::Tcp,
        local: "10.0.0.1:40000".parse().unwrap(),
        remote: "10.0.0.2:443".parse().unwrap(),
        bytes_transmitted: bytes,
        bytes_received: bytes / 2,
        lifetime: Some(Duration::from_millis(millis)),
        active_transmit: Some(Duration::from_millis(millis / 2 + 1)),
        active_receive: Some(Duration::from_millis(millis / 2 + 1)),
        owner: None,
        netns_ino: 0,
        rx_ifindex: 1,
        tx_ifindex: 1,
        retransmits: u32::from(impaired),
    }
}

fn filled(mode: HistogramMode, sets: usize) -> Metrics {
    let labels = vec![parse_label("region=eu-west-1").unwrap(), parse_label("track=stable").unwrap()];
    let m = Metrics::new(labels, &SESSION_LABELS, mode).unwrap();
    for set in 0..sets {
        let pod = set % 40;
        let values =
            vec![format!("team-{}", pod % 5), format!("inference-{pod}-7d9f8"), format!("C{:02}", (set / 40) % 25)];
        for n in 0..20 {
            m.record(&session(set * 20 + n, n % 4 == 0), &values, 1_000_000);
        }
    }
    m
}

/// Sample lines of the text exposition, and of those the session histograms'.
fn text_series(text: &str) -> (usize, usize) {
    let samples = text.lines().filter(|l| !l.starts_with('#') && !l.is_empty());
    let (mut all, mut histograms) = (0, 0);
    for l in samples {
        all += 1;
        if l.starts_with("observer_session_goodput")
            || l.starts_with("observer_session_active_goodput")
            || l.starts_with("observer_session_duration")
        {
            histograms += 1;
        }
    }
    (all, histograms)
}

/// Series of a protobuf exposition as a Prometheus storing native histograms
/// keeps them: one per native histogram, the text's count for the rest; and
/// the native histograms' populated buckets.
fn protobuf_series(body: &[u8]) -> (usize, usize, usize) {
    let (mut read, mut series, mut native, mut buckets) = (body, 0, 0, 0);
    while !read.is_empty() {
        let f = dm::MetricFamily::decode_length_delimited(&mut read).unwrap();
        for m in &f.metric {
            series += match (&m.histogram, &m.summary) {
                (Some(h), _) if !h.positive_span.is_empty() => {
                    native += 1;
                    buckets += h.positive_delta.len();
                    1
                }
                (Some(h), _) => h.bucket.len() + 3,
                (_, Some(s)) => s.quantile.len() + 2,
                _ => 1,
            };
        }
    }
    (series, native, buckets)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut sets = 1_000;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--sets" => sets = args.next().and_then(|v| v.parse().ok()).expect("--sets N"),
            _ => panic!("usage: series_economy [--sets N]"),
        }
    }
    let classic = filled(HistogramMode::Classic, sets);
    let both = filled(HistogramMode::Both, sets);
    let native = filled(HistogramMode::Native, sets);
    let classic_text = classic.encode().unwrap();
    let (classic_series, classic_histogram_series) = text_series(&classic_text);
    let both_body = both.encode_protobuf();
    let native_body = native.encode_protobuf();
    let (native_series, native_histograms, native_buckets) = protobuf_series(&native_body);
    let (native_text_series, _) = text_series(&native.encode().unwrap());
    let out = serde_json::json!({
        "label_sets": sets,
        "classic": {
            "series": classic_series,
            "session_histogram_series": classic_histogram_series,
            "text_bytes": classic_text.len(),
        },
        "native": {
            "series": native_series,
            "session_histogram_series": native_histograms,
            "populated_buckets_per_histogram": native_buckets as f64 / native_histograms.max(1) as f64,
            "protobuf_bytes": native_body.len(),
            "text_series": native_text_series,
        },
        "both": {
            "protobuf_bytes": both_body.len(),
            "text_bytes": both.encode().unwrap().len(),
        },
    });
    println!("{out}");
}
