//! `/api/v1/snapshot` after real traffic: the session counts are the test's
//! transfers exactly, and the median goodput lies in the histogram bucket
//! that holds the goodput the test measured itself.
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use observer_tests::{NetNs, ObserverProcess, TcpServer, transfer, wait_until};
use serde_json::Value;

const DOWNLOAD: u64 = 4 * 1024 * 1024;
/// Each download is stretched to about this long, so the test's clock and the
/// kernel's agree to a few percent (far below a bucket's width): about
/// 14 MB/s, inside the bucket (10, 17.8] MB/s rather than at one of its edges.
const PACE: Duration = Duration::from_millis(300);
const TRANSFERS: usize = 3;
/// Bounds of the goodput histogram (see docs/sessions.md): a quarter decade
/// apart from 1 kB/s, rounded to three significant digits.
const BOUNDS: [f64; 4] = [1.0, 1.78, 3.16, 5.62];

#[test]
fn snapshot_counts_transfers_and_its_median_is_in_the_measured_bucket() {
    let ns = NetNs::new("snapshot").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo", "--label", "region=test"]).unwrap();
    let server = TcpServer::start_in(&ns, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
    let mut measured = Vec::new();
    for _ in 0..TRANSFERS {
        let addr = server.addr();
        let t = ns.spawn(move || transfer(addr, 0, DOWNLOAD, Some(PACE)).unwrap()).join().unwrap();
        measured.push(t.received as f64 / t.duration().as_secs_f64());
    }
    measured.sort_by(f64::total_cmp);
    let median = measured[TRANSFERS / 2];

    // Client and server socket of every transfer; the scrape connection is
    // still open, so nothing else closed in this namespace.
    let sessions = 2 * TRANSFERS as u64;
    let doc =
        wait_until("the snapshot to count every session", Duration::from_secs(20), Duration::from_millis(200), || {
            let r = observer.get("/api/v1/snapshot")?;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.header("content-type"), Some("application/json"));
            let doc: Value = serde_json::from_slice(&r.body)?;
            Ok((sessions_total(&doc, "tcp") == sessions).then_some(doc))
        })
        .unwrap();
    assert_eq!(observer.scraper().connections_opened(), 1, "one scrape connection, kept open");

    let goodput = &doc["goodput"]["observer_session_goodput_bytes_per_second"];
    let receive = series(goodput, "receive");
    // Over the floor: each client's receive and each server's transmit.
    let count = |series: Vec<&Value>| series.iter().map(|s| s["count"].as_u64().unwrap()).sum::<u64>();
    assert_eq!(count(receive.clone()), TRANSFERS as u64, "{doc:#}");
    assert_eq!(count(series(goodput, "transmit")), TRANSFERS as u64, "{doc:#}");
    let clean = receive.iter().find(|s| s["count"] == TRANSFERS as u64).expect("all in one series (no retransmits)");
    assert_eq!(clean["labels"]["region"], "test", "static labels are part of the label set");
    let (p50, p90, p99) = (quantile(clean, "p50"), quantile(clean, "p90"), quantile(clean, "p99"));
    let (low, high) = bucket_of(median);
    eprintln!("snapshot p50 {p50:.0} B/s, measured median {median:.0} B/s in bucket ({low}, {high}]");
    assert!(low <= p50 && p50 <= high, "p50 {p50} outside the measured median's bucket ({low}, {high}]: {measured:?}");
    assert!(p50 <= p90 && p90 <= p99, "{p50} {p90} {p99}");
    let sum = clean["sum"].as_f64().unwrap();
    assert!(sum > 0.0 && clean["labels"]["protocol"] == "tcp", "{clean}");
}

fn sessions_total(doc: &Value, protocol: &str) -> u64 {
    doc["sessions_total"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["labels"]["protocol"] == protocol)
        .map(|s| s["value"].as_u64().unwrap())
        .sum()
}

fn series<'a>(family: &'a Value, direction: &str) -> Vec<&'a Value> {
    family.as_array().unwrap().iter().filter(|s| s["labels"]["direction"] == direction).collect()
}

fn quantile(series: &Value, key: &str) -> f64 {
    series[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {series}"))
}

/// The goodput bucket (lower, upper] that holds `x`.
fn bucket_of(x: f64) -> (f64, f64) {
    let bounds: Vec<f64> =
        (3..=11).flat_map(|e| BOUNDS.map(|m| m * 10f64.powi(e))).filter(|b| *b <= 1e11 * 1.0001).collect();
    let i = bounds.iter().position(|&b| x <= b).expect("goodput within the histogram's range");
    (if i == 0 { 0.0 } else { bounds[i - 1] }, bounds[i])
}
