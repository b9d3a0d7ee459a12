//! `/metrics` latency with many series: runs observer's `scrape_latency` example (the
//! real metrics server and metric families, filled through their public API) twice, as a
//! Prometheus without native histograms scrapes (text) and as one with them does
//! (protobuf, native and classic buckets), and reports the percentiles of each. No on/off
//! pair: there is nothing to compare a scrape with.

use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde_json::Value;

use super::report::Machine;
use crate::util;

pub const HEADING: &str = "## Scrape latency (/metrics with 10,000 series)";
pub const SERIES: usize = 10_000;
/// Target: 99th percentile of scrape latency.
pub const TARGET_P99_MS: f64 = 20.0;

/// Both formats' timings.
#[derive(Debug, Clone, PartialEq)]
pub struct ScrapeLatency {
    pub text: Scrape,
    pub protobuf: Scrape,
}

/// One format's timed scrapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Scrape {
    pub series: u64,
    pub bytes: u64,
    pub scrapes: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Builds and runs the example (release build): `scrapes` timed scrapes in each format.
pub fn measure(scrapes: u32) -> Result<ScrapeLatency> {
    Ok(ScrapeLatency { text: measure_format(scrapes, false)?, protobuf: measure_format(scrapes, true)? })
}

fn measure_format(scrapes: u32, protobuf: bool) -> Result<Scrape> {
    let (series, scrapes) = (SERIES.to_string(), scrapes.to_string());
    let protobuf = if protobuf { "1" } else { "0" };
    let args = ["--series", &series, "--scrapes", &scrapes, "--protobuf", protobuf];
    parse(&util::observer_example_output("scrape_latency", &args)?)
}

fn parse(json: &str) -> Result<Scrape> {
    let v: Value = serde_json::from_str(json.trim()).context("scrape_latency output is not JSON")?;
    let f = |k: &str| v.get(k).and_then(Value::as_f64).with_context(|| format!("no {k} in {json}"));
    Ok(Scrape {
        series: f("series")? as u64,
        bytes: f("bytes")? as u64,
        scrapes: f("scrapes")? as u64,
        p50_ms: f("p50_ms")?,
        p99_ms: f("p99_ms")?,
        max_ms: f("max_ms")?,
    })
}

impl Scrape {
    pub fn p99_met(&self) -> bool {
        self.p99_ms < TARGET_P99_MS
    }
}

impl ScrapeLatency {
    /// Both formats under the target.
    pub fn p99_met(&self) -> bool {
        self.text.p99_met() && self.protobuf.p99_met()
    }

    pub fn markdown(&self, machine: &Machine, smoke: bool) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_markdown(&mut s, machine, smoke);
        s
    }

    fn write_markdown(&self, s: &mut String, m: &Machine, smoke: bool) -> std::fmt::Result {
        writeln!(s, "{HEADING}\n")?;
        writeln!(
            s,
            "How long a Prometheus scrape of a busy node's observer takes. Target: 99th \
             percentile under {TARGET_P99_MS} ms with {SERIES} series, in both formats.\n"
        )?;
        if smoke {
            writeln!(s, "**Smoke run**: its numbers are not a measurement.\n")?;
        }
        writeln!(
            s,
            "`cargo xtask bench --workload scrape` runs `observer/examples/scrape_latency.rs` (release \
             build): it fills the observer's own metrics through the calls the running observer makes \
             (drops per reason on a few hundred interfaces, interface counters, sessions in every \
             histogram), serves them with the observer's own HTTP server on loopback (`--histograms \
             both`, the default) and times {} scrapes over one kept-alive connection, from the request \
             to the last byte of the answer: once asking for text, as a Prometheus without native \
             histograms does, once for protobuf, as one with them does (every histogram with native and \
             classic buckets). The kernel-table walk of a live observer's scrape (which grows with open \
             sessions, not series) is not in this figure. Load average {} at the start, {} at the end.\n",
            self.text.scrapes, m.load, m.load_end
        )?;
        let verdict = |met: bool| {
            if smoke {
                "not judged (smoke run)"
            } else if met {
                "met"
            } else {
                "NOT met"
            }
        };
        let (t, p) = (&self.text, &self.protobuf);
        writeln!(s, "| figure | text | protobuf (native on) |")?;
        writeln!(s, "|---|---:|---:|")?;
        writeln!(s, "| series in the answer (text count) | {} | {} |", t.series, p.series)?;
        writeln!(s, "| answer size | {:.0} KiB | {:.0} KiB |", t.bytes as f64 / 1024.0, p.bytes as f64 / 1024.0)?;
        writeln!(s, "| scrapes timed | {} | {} |", t.scrapes, p.scrapes)?;
        writeln!(s, "| p50 | {:.2} ms | {:.2} ms |", t.p50_ms, p.p50_ms)?;
        writeln!(s, "| p99 | {:.2} ms | {:.2} ms |", t.p99_ms, p.p99_ms)?;
        writeln!(s, "| max | {:.2} ms | {:.2} ms |", t.max_ms, p.max_ms)?;
        writeln!(s, "| target p99 < {TARGET_P99_MS} ms | {} | {} |", verdict(t.p99_met()), verdict(p.p99_met()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_judges() {
        let json =
            r#"{"series": 10123, "bytes": 1500000, "scrapes": 200, "p50_ms": 6.5, "p99_ms": 9.25, "max_ms": 12.0}"#;
        let text = parse(json).unwrap();
        assert_eq!(text.series, 10_123);
        let protobuf = Scrape { p99_ms: 21.0, ..text.clone() };
        let m = Machine {
            cpus: 2,
            kernel: "6.18".into(),
            arch: "x86_64".into(),
            date: "2026-01-01".into(),
            load: "0.5".into(),
            load_end: "0.6".into(),
        };
        let both = ScrapeLatency { text: text.clone(), protobuf };
        assert!(!both.p99_met(), "protobuf over the target");
        let md = both.markdown(&m, false);
        assert!(md.starts_with(HEADING), "{md}");
        assert!(md.contains("| p99 | 9.25 ms | 21.00 ms |"), "{md}");
        assert!(md.contains("| target p99 < 20 ms | met | NOT met |"), "{md}");
        assert!(both.markdown(&m, true).contains("not judged"));
        assert!(ScrapeLatency { protobuf: text.clone(), text }.p99_met());
        assert!(parse("{}").is_err());
    }
}
