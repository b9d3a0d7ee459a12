//! Series per node, classic against native histograms: runs observer's
//! `series_economy` example (a node's real expositions through the metrics'
//! public API, 1,000 label sets) and reports what a Prometheus stores and what
//! a scrape carries. docs/series.md says what the label configuration is.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::util;

pub const HEADING: &str = "## Series economy (1,000 label sets, classic vs native histograms)";
pub const LABEL_SETS: u32 = 1_000;

#[derive(Debug, Clone, PartialEq)]
pub struct SeriesEconomy {
    pub label_sets: u64,
    pub classic_series: u64,
    pub classic_histogram_series: u64,
    pub classic_text_bytes: u64,
    pub native_series: u64,
    pub native_histogram_series: u64,
    pub native_buckets_per_histogram: f64,
    pub native_protobuf_bytes: u64,
    pub both_protobuf_bytes: u64,
    pub both_text_bytes: u64,
}

/// Builds and runs the example (release build).
pub fn measure() -> Result<SeriesEconomy> {
    parse(&util::observer_example_output("series_economy", &["--sets", &LABEL_SETS.to_string()])?)
}

fn parse(json: &str) -> Result<SeriesEconomy> {
    let v: Value = serde_json::from_str(json.trim()).context("series_economy output is not JSON")?;
    let f = |path: &str| {
        v.pointer(path)
            .and_then(Value::as_f64)
            .with_context(|| format!("no {path} in the series_economy output {json}"))
    };
    Ok(SeriesEconomy {
        label_sets: f("/label_sets")? as u64,
        classic_series: f("/classic/series")? as u64,
        classic_histogram_series: f("/classic/session_histogram_series")? as u64,
        classic_text_bytes: f("/classic/text_bytes")? as u64,
        native_series: f("/native/series")? as u64,
        native_histogram_series: f("/native/session_histogram_series")? as u64,
        native_buckets_per_histogram: f("/native/populated_buckets_per_histogram")?,
        native_protobuf_bytes: f("/native/protobuf_bytes")? as u64,
        both_protobuf_bytes: f("/both/protobuf_bytes")? as u64,
        both_text_bytes: f("/both/text_bytes")? as u64,
    })
}

impl SeriesEconomy {
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_markdown(&mut s);
        s
    }

    fn write_markdown(&self, s: &mut String) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let fleet = |n: u64| format!("{:.1} M", n as f64 * 1_000.0 / 1e6);
        writeln!(s, "{HEADING}\n")?;
        writeln!(
            s,
            "What one node's session histograms cost a Prometheus, with {} label sets (the default \
             `--max-label-sets`): `cargo xtask bench --workload scrape` runs \
             `observer/examples/series_economy.rs` (release build), which records sessions into the \
             observer's own metrics through the calls the running observer makes (static labels \
             `region` and `track`, session labels `namespace`, `pod`, `peer_country`; both directions, \
             impaired and not) and counts the series of the real expositions: a sample line of the \
             text format is one series, a native histogram is one whatever its buckets \
             ([series](docs/series.md)). Series per fleet: 1,000 such nodes.\n",
            self.label_sets
        )?;
        writeln!(s, "| figure | classic (`--histograms classic`) | native (`--histograms native`) |")?;
        writeln!(s, "|---|---:|---:|")?;
        writeln!(s, "| series per node | {} | {} |", self.classic_series, self.native_series)?;
        writeln!(
            s,
            "| of which the session histograms | {} | {} |",
            self.classic_histogram_series, self.native_histogram_series
        )?;
        writeln!(s, "| series per 1,000 nodes | {} | {} |", fleet(self.classic_series), fleet(self.native_series))?;
        writeln!(
            s,
            "| scrape size | {:.1} MiB (text) | {:.1} MiB (protobuf) |",
            mib(self.classic_text_bytes),
            mib(self.native_protobuf_bytes)
        )?;
        writeln!(s, "| populated buckets per native histogram | – | {:.1} |", self.native_buckets_per_histogram)?;
        writeln!(
            s,
            "\nWith `--histograms both` (the default) a scrape is {:.1} MiB as text (what a server \
             without native histograms reads: the classic series above) and {:.1} MiB as protobuf.",
            mib(self.both_text_bytes),
            mib(self.both_protobuf_bytes)
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_writes() {
        let json = r#"{"label_sets": 1000, "classic": {"series": 317051, "session_histogram_series": 306000, "text_bytes": 70000000},
            "native": {"series": 12051, "session_histogram_series": 1000, "populated_buckets_per_histogram": 9.5,
            "protobuf_bytes": 2700000, "text_series": 12051}, "both": {"protobuf_bytes": 6300000, "text_bytes": 70000000}}"#;
        let e = parse(json).unwrap();
        assert_eq!((e.classic_series, e.native_series), (317_051, 12_051));
        let md = e.markdown();
        assert!(md.starts_with(HEADING), "{md}");
        assert!(md.contains("| series per node | 317051 | 12051 |"), "{md}");
        assert!(md.contains("| series per 1,000 nodes | 317.1 M | 12.1 M |"), "{md}");
        assert!(md.contains("| scrape size | 66.8 MiB (text) | 2.6 MiB (protobuf) |"), "{md}");
        assert!(parse(r#"{"label_sets": 1000}"#).unwrap_err().to_string().contains("/classic/series"));
    }
}
