//! Parser for the Prometheus text exposition format (0.0.4).
//!
//! Tests assert on what a real Prometheus would ingest, so the parser is
//! strict where Prometheus is (syntax, duplicate series) and keeps the raw
//! text for failure messages.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;

use anyhow::{Context, Result, bail};

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Full sample name, including `_bucket`/`_sum`/`_count` suffixes.
    pub name: String,
    /// Label values are unescaped.
    pub labels: BTreeMap<String, String>,
    pub value: f64,
    /// Milliseconds since the epoch, if the exporter wrote one.
    pub timestamp_ms: Option<i64>,
}

impl Sample {
    /// Whether every `(k, v)` pair is among this sample's labels.
    pub fn has_labels(&self, want: &[(&str, &str)]) -> bool {
        want.iter().all(|(k, v)| self.labels.get(*k).is_some_and(|x| x == v))
    }

    /// Whether this sample's labels are exactly `want` (order irrelevant).
    pub fn has_exact_labels(&self, want: &[(&str, &str)]) -> bool {
        self.labels.len() == want.len() && self.has_labels(want)
    }
}

impl fmt::Display for Sample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{{", self.name)?;
        for (i, (k, v)) in self.labels.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{k}={v:?}")?;
        }
        write!(f, "}} {}", self.value)
    }
}

/// A histogram series (or several, summed) reassembled from its
/// `_bucket`/`_sum`/`_count` samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// Value of `<base>_count`.
    pub count: f64,
    /// Value of `<base>_sum`.
    pub sum: f64,
    /// `(le, cumulative count)` sorted by `le`; the last is `+Inf` in a
    /// well-formed histogram.
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    /// Cumulative count of the bucket whose upper bound is `le`.
    pub fn bucket(&self, le: f64) -> Option<f64> {
        self.buckets
            .iter()
            .find(|(b, _)| *b == le || (le.is_finite() && (b - le).abs() <= 1e-9 * le.abs()))
            .map(|(_, c)| *c)
    }

    /// Observations that fell in `(lo, hi]`, both being bucket bounds.
    pub fn count_between(&self, lo: f64, hi: f64) -> Option<f64> {
        Some(self.bucket(hi)? - self.bucket(lo)?)
    }

    /// Checks the invariants Prometheus relies on: buckets present,
    /// cumulative counts non-decreasing, a `+Inf` bucket equal to `count`.
    pub fn check(&self) -> Result<()> {
        if self.buckets.is_empty() {
            bail!("histogram has no buckets");
        }
        for w in self.buckets.windows(2) {
            if w[1].1 < w[0].1 {
                bail!("bucket counts decrease: le={} has {} but le={} has {}", w[0].0, w[0].1, w[1].0, w[1].1);
            }
        }
        match self.buckets.last() {
            Some((le, c)) if le.is_infinite() && *le > 0.0 => {
                if *c != self.count {
                    bail!("+Inf bucket {c} != count {}", self.count);
                }
            }
            _ => bail!("histogram lacks a +Inf bucket"),
        }
        Ok(())
    }
}

/// A parsed scrape.
#[derive(Clone)]
pub struct Metrics {
    samples: Vec<Sample>,
    types: BTreeMap<String, String>,
    help: BTreeMap<String, String>,
    raw: String,
}

impl fmt::Debug for Metrics {
    /// The raw exposition text: the most useful thing to see when an
    /// assertion on a scrape fails.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl Metrics {
    /// Parses exposition text.
    ///
    /// Errors on malformed lines and on duplicate series (same name and
    /// label set), which Prometheus would reject at scrape time.
    pub fn parse(text: &str) -> Result<Self> {
        let mut samples = Vec::new();
        let mut types = BTreeMap::new();
        let mut help = BTreeMap::new();
        let mut seen = HashSet::new();
        for (i, line) in text.lines().enumerate() {
            let ctx = || format!("line {}: {line:?}", i + 1);
            let t = line.trim_start();
            if t.is_empty() {
                continue;
            }
            if let Some(rest) = t.strip_prefix('#') {
                let rest = rest.trim_start();
                if let Some(r) = rest.strip_prefix("HELP ").or_else(|| rest.strip_prefix("HELP\t")) {
                    let (name, doc) = split_word(r.trim_start());
                    help.insert(name.to_string(), unescape_help(doc));
                } else if let Some(r) = rest.strip_prefix("TYPE ").or_else(|| rest.strip_prefix("TYPE\t")) {
                    let (name, ty) = split_word(r.trim_start());
                    let ty = ty.trim();
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                        bail!("{}: unknown metric type {ty:?}", ctx());
                    }
                    if types.insert(name.to_string(), ty.to_string()).is_some() {
                        bail!("{}: second TYPE line for {name}", ctx());
                    }
                }
                continue;
            }
            let s = parse_sample(t).with_context(ctx)?;
            let key = (s.name.clone(), s.labels.clone());
            if !seen.insert(key) {
                bail!("{}: duplicate series {s}", ctx());
            }
            samples.push(s);
        }
        Ok(Self { samples, types, help, raw: text.to_string() })
    }

    /// All samples, in exposition order.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The text this was parsed from.
    pub fn raw(&self) -> &str {
        &self.raw
    }

    /// Distinct sample names.
    pub fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }

    /// `# TYPE` of a metric family (base name, without `_bucket` etc.).
    pub fn metric_type(&self, family: &str) -> Option<&str> {
        self.types.get(family).map(String::as_str)
    }

    /// `# HELP` of a metric family, unescaped.
    pub fn help(&self, family: &str) -> Option<&str> {
        self.help.get(family).map(String::as_str)
    }

    /// Samples named `name` whose labels include every `(k, v)` in `labels`
    /// (other labels may be present).
    pub fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name && s.has_labels(labels)).collect()
    }

    /// Value of the series named `name` whose label set is exactly `labels`.
    pub fn value_exact(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples.iter().find(|s| s.name == name && s.has_exact_labels(labels)).map(|s| s.value)
    }

    /// Value of the one series named `name` whose labels include `labels`;
    /// labels not mentioned are ignored (so constant `--label`s need not be
    /// repeated). `None` if no series matches.
    ///
    /// # Panics
    /// If several series match: the test's selector is ambiguous, and
    /// silently picking one would hide that. Use [`Metrics::sum`] or
    /// [`Metrics::matching`] when several are expected.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let m = self.matching(name, labels);
        match m.as_slice() {
            [] => None,
            [one] => Some(one.value),
            many => panic!(
                "Metrics::value({name}, {labels:?}) is ambiguous, {} series match:\n{}",
                many.len(),
                many.iter().map(|s| format!("  {s}")).collect::<Vec<_>>().join("\n")
            ),
        }
    }

    /// Sum over all series named `name` whose labels include `labels`
    /// (0 if none match).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).iter().map(|s| s.value).sum()
    }

    /// The histogram `base` (samples `base_bucket`, `base_sum`,
    /// `base_count`) restricted to series whose labels include `labels`.
    ///
    /// If several series match (they differ in labels not given), their
    /// buckets, sums and counts are added, which is exactly how Prometheus
    /// aggregates histograms. `None` if no `_count` sample matches.
    pub fn histogram(&self, base: &str, labels: &[(&str, &str)]) -> Option<Histogram> {
        let count_s = self.matching(&format!("{base}_count"), labels);
        if count_s.is_empty() {
            return None;
        }
        let count = count_s.iter().map(|s| s.value).sum();
        let sum = self.sum(&format!("{base}_sum"), labels);
        let mut buckets: Vec<(f64, f64)> = Vec::new();
        for s in self.matching(&format!("{base}_bucket"), labels) {
            let Some(le) = s.labels.get("le").and_then(|v| parse_float(v).ok()) else {
                continue;
            };
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += s.value,
                None => buckets.push((le, s.value)),
            }
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Some(Histogram { count, sum, buckets })
    }
}

fn split_word(s: &str) -> (&str, &str) {
    match s.find([' ', '\t']) {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, ""),
    }
}

fn unescape_help(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.next() {
                Some('n') => out.push('\n'),
                Some('\\') => out.push('\\'),
                Some(o) => {
                    out.push('\\');
                    out.push(o);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Float as Prometheus writes it: Go's `strconv.ParseFloat` forms plus
/// `+Inf`/`-Inf`/`NaN` in any case.
pub fn parse_float(s: &str) -> Result<f64> {
    let l = s.to_ascii_lowercase();
    Ok(match l.as_str() {
        "+inf" | "inf" | "+infinity" | "infinity" => f64::INFINITY,
        "-inf" | "-infinity" => f64::NEG_INFINITY,
        "nan" | "+nan" | "-nan" => f64::NAN,
        _ => s.parse::<f64>().with_context(|| format!("bad float {s:?}"))?,
    })
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit()
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line.find(|c: char| !is_name_char(c)).unwrap_or(line.len());
    let name = &line[..name_end];
    if !name.starts_with(is_name_start) {
        bail!("bad metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.trim_start().strip_prefix('{') {
        rest = parse_labels(r, &mut labels)?;
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = parse_float(fields.next().context("missing value")?)?;
    let timestamp_ms = match fields.next() {
        Some(t) => Some(t.parse::<i64>().with_context(|| format!("bad timestamp {t:?}"))?),
        None => None,
    };
    if let Some(extra) = fields.next() {
        bail!("trailing garbage {extra:?}");
    }
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        bail!("no space before value");
    }
    Ok(Sample { name: name.to_string(), labels, value, timestamp_ms })
}

/// Parses `k="v",...}` (after the `{`) and returns the text after the `}`.
fn parse_labels<'a>(mut s: &'a str, out: &mut BTreeMap<String, String>) -> Result<&'a str> {
    loop {
        s = s.trim_start();
        if let Some(r) = s.strip_prefix('}') {
            return Ok(r);
        }
        let end = s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len());
        let key = &s[..end];
        if key.is_empty() || key.starts_with(|c: char| c.is_ascii_digit()) {
            bail!("bad label name at {s:?}");
        }
        s = s[end..].trim_start();
        s = s.strip_prefix('=').with_context(|| format!("expected '=' after label {key}"))?.trim_start();
        s = s.strip_prefix('"').with_context(|| format!("expected '\"' for label {key}"))?;
        let mut val = String::new();
        let mut chars = s.char_indices();
        let close = loop {
            match chars.next() {
                None => bail!("unterminated value for label {key}"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => val.push('\n'),
                    Some((_, '\\')) => val.push('\\'),
                    Some((_, '"')) => val.push('"'),
                    other => bail!("bad escape {:?} in label {key}", other.map(|(_, c)| c)),
                },
                Some((_, c)) => val.push(c),
            }
        };
        if out.insert(key.to_string(), val).is_some() {
            bail!("label {key} repeated");
        }
        s = s[close + 1..].trim_start();
        if let Some(r) = s.strip_prefix(',') {
            s = r;
        } else if !s.starts_with('}') {
            bail!("expected ',' or '}}' after label {key}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"# HELP observer_session_bytes_total Bytes carried by \\ finished sessions.\nSecond line.
# TYPE observer_session_bytes_total counter
observer_session_bytes_total{direction="tx",iface="lo",env="ci"} 1.048592e+06
observer_session_bytes_total{direction="rx",iface="lo",env="ci"} 16
# A free-form comment
# HELP observer_session_duration_seconds Session duration.
# TYPE observer_session_duration_seconds histogram
observer_session_duration_seconds_bucket{iface="lo",le="0.005"} 0
observer_session_duration_seconds_bucket{iface="lo",le="0.1"} 2
observer_session_duration_seconds_bucket{iface="lo",le="1"} 3
observer_session_duration_seconds_bucket{iface="lo",le="+Inf"} 4
observer_session_duration_seconds_sum{iface="lo"} 7.25
observer_session_duration_seconds_count{iface="lo"} 4
observer_session_duration_seconds_bucket{iface="eth0",le="0.005"} 1
observer_session_duration_seconds_bucket{iface="eth0",le="0.1"} 1
observer_session_duration_seconds_bucket{iface="eth0",le="1"} 1
observer_session_duration_seconds_bucket{iface="eth0",le="+Inf"} 1
observer_session_duration_seconds_sum{iface="eth0"} 0.001
observer_session_duration_seconds_count{iface="eth0"} 1

# TYPE observer_build_info gauge
observer_build_info{version="0.1.0",note="a \"quoted\"\\path\nnext", empty=""} 1
observer_ratio NaN
observer_min -Inf 1700000000000
process_start_time_seconds   1.7e9
"#;

    #[test]
    fn parses_realistic_exposition() {
        let m = Metrics::parse(SAMPLE).unwrap();
        assert_eq!(m.samples().len(), 18);
        assert_eq!(m.metric_type("observer_session_bytes_total"), Some("counter"));
        assert_eq!(m.metric_type("observer_session_duration_seconds"), Some("histogram"));
        assert_eq!(
            m.help("observer_session_bytes_total"),
            Some("Bytes carried by \\ finished sessions.\nSecond line.")
        );
        assert_eq!(m.value("observer_session_bytes_total", &[("direction", "tx")]), Some(1_048_592.0));
        assert_eq!(m.value_exact("observer_session_bytes_total", &[("direction", "tx")]), None);
        assert_eq!(
            m.value_exact("observer_session_bytes_total", &[("direction", "rx"), ("iface", "lo"), ("env", "ci")]),
            Some(16.0)
        );
        assert_eq!(m.sum("observer_session_bytes_total", &[("iface", "lo")]), 1_048_608.0);
        assert_eq!(m.sum("observer_session_bytes_total", &[("iface", "nope")]), 0.0);
        assert_eq!(m.value("absent", &[]), None);

        let info = m.matching("observer_build_info", &[]);
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].labels["note"], "a \"quoted\"\\path\nnext");
        assert_eq!(info[0].labels["empty"], "");

        assert!(m.value("observer_ratio", &[]).unwrap().is_nan());
        let min = &m.matching("observer_min", &[])[0];
        assert_eq!((min.value, min.timestamp_ms), (f64::NEG_INFINITY, Some(1_700_000_000_000)));
        assert_eq!(m.value("process_start_time_seconds", &[]), Some(1.7e9));
    }

    #[test]
    fn reassembles_histograms() {
        let m = Metrics::parse(SAMPLE).unwrap();
        let h = m.histogram("observer_session_duration_seconds", &[("iface", "lo")]).unwrap();
        assert_eq!(h.count, 4.0);
        assert_eq!(h.sum, 7.25);
        assert_eq!(h.buckets, vec![(0.005, 0.0), (0.1, 2.0), (1.0, 3.0), (f64::INFINITY, 4.0)]);
        assert_eq!(h.bucket(0.1), Some(2.0));
        assert_eq!(h.count_between(0.1, 1.0), Some(1.0));
        h.check().unwrap();

        let all = m.histogram("observer_session_duration_seconds", &[]).unwrap();
        assert_eq!((all.count, all.bucket(0.005), all.bucket(f64::INFINITY)), (5.0, Some(1.0), Some(5.0)));
        all.check().unwrap();
        assert!(m.histogram("observer_session_duration_seconds", &[("iface", "x")]).is_none());
    }

    #[test]
    #[should_panic(expected = "ambiguous")]
    fn value_panics_when_ambiguous() {
        Metrics::parse(SAMPLE).unwrap().value("observer_session_bytes_total", &[("iface", "lo")]);
    }

    #[test]
    fn rejects_malformed_input() {
        for bad in [
            "m{a=\"1\"} 1\nm{a=\"1\"} 2\n",
            "m{a=\"1} 1\n",
            "m{a=1} 1\n",
            "m{a=\"\\x\"} 1\n",
            "m 1 2 3\n",
            "m abc\n",
            "1m 1\n",
            "m{a=\"1\",a=\"2\"} 1\n",
            "# TYPE m bogus\n",
            "m\n",
        ] {
            assert!(Metrics::parse(bad).is_err(), "accepted {bad:?}");
        }
        // Trailing comma and spaces inside braces are legal.
        let m = Metrics::parse("m{ a = \"1\" , } 3\n").unwrap();
        assert_eq!(m.value_exact("m", &[("a", "1")]), Some(3.0));
    }

    #[test]
    fn histogram_check_catches_inconsistencies() {
        let h = Histogram { count: 3.0, sum: 1.0, buckets: vec![(1.0, 2.0), (f64::INFINITY, 2.0)] };
        assert!(h.check().is_err());
        let h = Histogram { count: 2.0, sum: 1.0, buckets: vec![(1.0, 3.0), (f64::INFINITY, 2.0)] };
        assert!(h.check().is_err());
    }
}
