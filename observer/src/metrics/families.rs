//! Counter and histogram families whose series the observer stores itself and
//! writes straight into the text exposition.
//!
//! Why not the `prometheus` crate's vectors for these: its registry answers a
//! scrape by copying every series into a protobuf `MetricFamily` (label pairs,
//! buckets), sorting them, encoding the copies and freeing them. With 10,000
//! series (a node with a few hundred interfaces, or many session label sets)
//! that was 11-17 ms of a 2-CPU node per scrape, measured before this module
//! existed (today's figure: BENCHMARKS.md, "Scrape latency"). Here a series' label text is rendered once, when the series is
//! created, and a scrape appends lines from it. The text is the crate's own
//! format: label names in alphabetical order, values escaped alike, numbers
//! printed alike. Families of a fixed, small size (info gauges, the observer's
//! own health, GPUs) stay on the crate's registry.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus::proto;
use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as dm;

use crate::metrics::native::{HistogramMode, NativeBuckets};

/// What one series of a family holds and how it is written.
pub trait Series: Send + Sync {
    /// What every series of a family shares (a histogram's buckets).
    type Layout: Send + Sync;
    const TYPE: proto::MetricType;
    fn new(layout: &Self::Layout) -> Self;
    /// Appends the series' sample lines; `labels` is its rendered label text
    /// (`a="x",b="y"`, empty without labels).
    fn write(&self, layout: &Self::Layout, name: &str, labels: &str, out: &mut String);
    /// Sets the series' value in a protobuf metric (`/api/v1/snapshot`).
    fn fill(&self, layout: &Self::Layout, metric: &mut proto::Metric);
    /// Sets the series' value in a metric of the protobuf exposition.
    fn expose(&self, layout: &Self::Layout, metric: &mut dm::Metric);
}

/// A monotonic integer counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Series for Counter {
    type Layout = ();
    const TYPE: proto::MetricType = proto::MetricType::COUNTER;

    fn new(_: &()) -> Self {
        Counter::default()
    }

    fn write(&self, _: &(), name: &str, labels: &str, out: &mut String) {
        sample(out, name, "", labels, None);
        let _ = writeln!(out, "{}", self.get());
    }

    fn fill(&self, _: &(), metric: &mut proto::Metric) {
        let mut counter = proto::Counter::default();
        counter.set_value(self.get() as f64);
        metric.set_counter(counter);
    }

    fn expose(&self, _: &(), metric: &mut dm::Metric) {
        metric.counter = Some(dm::Counter { value: self.get() as f64, ..Default::default() });
    }
}

/// Upper bounds of a histogram family's classic buckets, with their `le`
/// text, and which kinds of buckets its exposition carries.
#[derive(Debug)]
pub struct Buckets {
    bounds: Vec<f64>,
    /// `le="<bound>"` of each bound, then of `+Inf`.
    le: Vec<String>,
    /// Classic buckets are always counted (`/api/v1/snapshot` reads them);
    /// without [`HistogramMode::classic`] the exposition has only their
    /// `+Inf` bucket. With [`HistogramMode::native`] series keep native
    /// buckets too.
    mode: HistogramMode,
}

impl Buckets {
    pub fn new(bounds: Vec<f64>, mode: HistogramMode) -> Self {
        let le = bounds.iter().map(f64::to_string).chain(["+Inf".to_string()]).map(|b| format!("le=\"{b}\"")).collect();
        Buckets { bounds, le, mode }
    }
}

/// A histogram: how many observations fell at or under each bound, and their sum.
#[derive(Debug)]
pub struct Histogram {
    buckets: Arc<Buckets>,
    /// Observations per bucket (not cumulative), the last one over every bound.
    counts: Box<[AtomicU64]>,
    /// Sum of observations, as `f64` bits.
    sum: AtomicU64,
    /// Native buckets, when the family keeps them. Observations then update
    /// everything under its lock, so that the protobuf exposition reads
    /// count, sum and both kinds of buckets of the same observations.
    native: Option<NativeBuckets>,
}

impl Histogram {
    pub fn observe(&self, v: f64) {
        let mut native = self.native.as_ref().map(NativeBuckets::lock);
        if let Some(native) = native.as_mut() {
            native.observe(v);
        }
        // As the prometheus crate: the first bound not under v; NaN or above
        // every bound counts only in +Inf.
        let i = self.buckets.bounds.iter().position(|b| v <= *b).unwrap_or(self.buckets.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
        drop(native);
    }

    /// Cumulative count at each bound and at +Inf. The +Inf entry is the
    /// count, so `_count` and the `+Inf` bucket always agree, even while
    /// observations land during a scrape.
    fn cumulative(&self) -> impl Iterator<Item = u64> + '_ {
        self.counts.iter().scan(0u64, |total, c| {
            *total += c.load(Ordering::Relaxed);
            Some(*total)
        })
    }

    fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }
}

impl Series for Histogram {
    type Layout = Arc<Buckets>;
    const TYPE: proto::MetricType = proto::MetricType::HISTOGRAM;

    fn new(buckets: &Arc<Buckets>) -> Self {
        let counts = (0..=buckets.bounds.len()).map(|_| AtomicU64::new(0)).collect();
        let native = buckets.mode.native().then(NativeBuckets::default);
        Histogram { buckets: buckets.clone(), counts, sum: AtomicU64::new(0), native }
    }

    fn write(&self, buckets: &Arc<Buckets>, name: &str, labels: &str, out: &mut String) {
        let mut count = 0;
        for (i, (le, cumulative)) in buckets.le.iter().zip(self.cumulative()).enumerate() {
            // Native only: the +Inf bucket, as the Go client writes it.
            if buckets.mode.classic() || i == buckets.bounds.len() {
                sample(out, name, "_bucket", labels, Some(le));
                let _ = writeln!(out, "{cumulative}");
            }
            count = cumulative;
        }
        sample(out, name, "_sum", labels, None);
        let _ = writeln!(out, "{}", self.sum());
        sample(out, name, "_count", labels, None);
        let _ = writeln!(out, "{count}");
    }

    fn fill(&self, buckets: &Arc<Buckets>, metric: &mut proto::Metric) {
        let cumulative: Vec<u64> = self.cumulative().collect();
        let mut h = proto::Histogram::default();
        h.set_bucket(
            buckets
                .bounds
                .iter()
                .zip(&cumulative)
                .map(|(bound, count)| {
                    let mut b = proto::Bucket::default();
                    b.set_upper_bound(*bound);
                    b.set_cumulative_count(*count);
                    b
                })
                .collect(),
        );
        h.set_sample_count(cumulative.last().copied().unwrap_or(0));
        h.set_sample_sum(self.sum());
        metric.set_histogram(h);
    }

    fn expose(&self, buckets: &Arc<Buckets>, metric: &mut dm::Metric) {
        // Observations wait while this reads: all of it is one moment's.
        let native = self.native.as_ref().map(NativeBuckets::lock);
        let cumulative: Vec<u64> = self.cumulative().collect();
        let mut h = dm::Histogram {
            sample_count: cumulative.last().copied().unwrap_or(0),
            sample_sum: self.sum(),
            bucket: match buckets.mode.classic() {
                true => buckets
                    .bounds
                    .iter()
                    .zip(&cumulative)
                    .map(|(bound, count)| dm::Bucket {
                        cumulative_count: *count,
                        upper_bound: *bound,
                        ..Default::default()
                    })
                    .collect(),
                false => Vec::new(),
            },
            ..Default::default()
        };
        if let Some(native) = native {
            native.fill(&mut h);
        }
        metric.histogram = Some(h);
    }
}

/// Writes a sample's name and labels and the space before its value.
fn sample(out: &mut String, name: &str, suffix: &str, labels: &str, extra: Option<&str>) {
    out.push_str(name);
    out.push_str(suffix);
    match (labels.is_empty(), extra) {
        (true, None) => {}
        (true, Some(extra)) => {
            out.push('{');
            out.push_str(extra);
            out.push('}');
        }
        (false, extra) => {
            out.push('{');
            out.push_str(labels);
            if let Some(extra) = extra {
                out.push(',');
                out.push_str(extra);
            }
            out.push('}');
        }
    }
    out.push(' ');
}

/// Escaping of the text format: backslash and newline, and in label values
/// (`quotes`) the double quote.
fn escape_into(out: &mut String, value: &str, quotes: bool) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
}

/// The caller's `i`-th label value; a missing one reads as empty, as in the
/// rendered key (callers give one per label: `render` checks it in debug builds).
fn value_at<'a>(values: &[&'a str], i: usize) -> &'a str {
    values.get(i).copied().unwrap_or("")
}

/// One series: its label values (in the family's name order) and its value.
struct Entry<S> {
    values: Box<[String]>,
    series: Arc<S>,
}

/// A family of series of one type, keyed by label values.
pub struct Family<S: Series> {
    name: &'static str,
    help: String,
    /// `# HELP` and `# TYPE` lines.
    header: String,
    /// Label names in alphabetical order, as the text is written.
    names: Vec<String>,
    /// For each of `names`, the index of its value in the caller's values.
    order: Vec<usize>,
    layout: S::Layout,
    /// By rendered label text, which is unique per set of values and gives a
    /// stable order.
    series: RwLock<BTreeMap<String, Entry<S>>>,
    /// Bumped (under `series`' write lock) whenever a series comes or goes.
    generation: AtomicU64,
    /// The family's message of the last protobuf scrape, with its label
    /// pairs: the next one only sets the values again (no allocation per
    /// counter), unless series came or went since (`generation`).
    protobuf: parking_lot::Mutex<Option<(u64, dm::MetricFamily)>>,
}

pub type CounterFamily = Family<Counter>;
pub type HistogramFamily = Family<Histogram>;

impl CounterFamily {
    pub fn counter(name: &'static str, help: &str, labels: &[String]) -> prometheus::Result<Self> {
        Family::new(name, help, labels, ())
    }
}

impl HistogramFamily {
    /// `bounds`: the classic buckets; `mode`: which buckets the exposition carries.
    pub fn histogram(
        name: &'static str,
        help: &str,
        labels: &[String],
        bounds: Vec<f64>,
        mode: HistogramMode,
    ) -> prometheus::Result<Self> {
        Family::new(name, help, labels, Arc::new(Buckets::new(bounds, mode)))
    }
}

impl<S: Series> Family<S> {
    /// `labels`: label names in the order values will be given.
    pub fn new(name: &'static str, help: &str, labels: &[String], layout: S::Layout) -> prometheus::Result<Self> {
        let mut order: Vec<usize> = (0..labels.len()).collect();
        order.sort_by(|a, b| labels[*a].cmp(&labels[*b]));
        let names: Vec<String> = order.iter().map(|i| labels[*i].clone()).collect();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(prometheus::Error::Msg(format!("{name}: label name `{}` given twice", w[0])));
        }
        let kind = format!("{:?}", S::TYPE).to_lowercase();
        let mut header = format!("# HELP {name} ");
        escape_into(&mut header, help, false);
        header.push_str(&format!("\n# TYPE {name} {kind}\n"));
        Ok(Family {
            name,
            help: help.to_string(),
            header,
            names,
            order,
            layout,
            series: RwLock::default(),
            generation: AtomicU64::new(0),
            protobuf: parking_lot::Mutex::new(None),
        })
    }

    /// The series of these label values (in the order given to `new`),
    /// created at zero if it does not exist.
    pub fn with_label_values(&self, values: &[&str]) -> Arc<S> {
        let key = self.render(values);
        if let Some(entry) = self.read().get(&key) {
            return entry.series.clone();
        }
        let mut series = self.series.write().unwrap_or_else(|p| p.into_inner());
        let entry = series.entry(key).or_insert_with(|| {
            self.generation.fetch_add(1, Ordering::Relaxed);
            Entry {
                values: self.order.iter().map(|i| value_at(values, *i).to_string()).collect(),
                series: Arc::new(S::new(&self.layout)),
            }
        });
        entry.series.clone()
    }

    /// Removes the series of these label values; whether it existed.
    pub fn remove(&self, values: &[&str]) -> bool {
        let key = self.render(values);
        let removed = self.series.write().unwrap_or_else(|p| p.into_inner()).remove(&key).is_some();
        if removed {
            self.generation.fetch_add(1, Ordering::Relaxed);
        }
        removed
    }

    /// Appends the family in text format; nothing when it has no series, as
    /// the registry leaves out empty families.
    pub fn write_text(&self, out: &mut String) {
        let series = self.read();
        if series.is_empty() {
            return;
        }
        out.push_str(&self.header);
        for (labels, entry) in series.iter() {
            entry.series.write(&self.layout, self.name, labels, out);
        }
    }

    /// The family as the registry would gather it; `None` without series.
    pub fn to_proto(&self) -> Option<proto::MetricFamily> {
        let series = self.read();
        if series.is_empty() {
            return None;
        }
        let metrics = series
            .values()
            .map(|entry| {
                let pairs = self
                    .names
                    .iter()
                    .zip(entry.values.iter())
                    .map(|(name, value)| {
                        let mut pair = proto::LabelPair::default();
                        pair.set_name(name.clone());
                        pair.set_value(value.clone());
                        pair
                    })
                    .collect();
                let mut metric = proto::Metric::from_label(pairs);
                entry.series.fill(&self.layout, &mut metric);
                metric
            })
            .collect();
        let mut family = proto::MetricFamily::default();
        family.set_name(self.name.to_string());
        family.set_help(self.help.clone());
        family.set_field_type(S::TYPE);
        family.set_metric(metrics);
        Some(family)
    }

    /// Appends the family to a protobuf exposition (one length-delimited
    /// message); nothing when it has no series.
    pub fn write_protobuf(&self, out: &mut Vec<u8>) {
        let series = self.read();
        if series.is_empty() {
            return;
        }
        // Stable while the read lock is held: writers bump it under the write lock.
        let generation = self.generation.load(Ordering::Relaxed);
        let mut cached = self.protobuf.lock();
        match cached.as_mut() {
            Some((g, family)) if *g == generation => {
                // The same series in the same (map) order: only values change.
                for (metric, entry) in family.metric.iter_mut().zip(series.values()) {
                    entry.series.expose(&self.layout, metric);
                }
            }
            _ => *cached = self.exposition_of(&series).map(|f| (generation, f)),
        }
        if let Some((_, family)) = cached.as_ref() {
            // Writing to a Vec only fails when it cannot grow (allocation aborts first).
            let _ = prost::Message::encode_length_delimited(family, out);
        }
    }

    /// The family in the protobuf exposition, built afresh; `None` without series.
    #[cfg(test)]
    pub fn to_exposition(&self) -> Option<dm::MetricFamily> {
        self.exposition_of(&self.read())
    }

    fn exposition_of(&self, series: &BTreeMap<String, Entry<S>>) -> Option<dm::MetricFamily> {
        if series.is_empty() {
            return None;
        }
        let metric = series
            .values()
            .map(|entry| {
                let label = self
                    .names
                    .iter()
                    .zip(entry.values.iter())
                    .map(|(name, value)| dm::LabelPair { name: name.clone(), value: value.clone() })
                    .collect();
                let mut metric = dm::Metric { label, ..Default::default() };
                entry.series.expose(&self.layout, &mut metric);
                metric
            })
            .collect();
        Some(dm::MetricFamily {
            name: self.name.to_string(),
            help: self.help.clone(),
            r#type: crate::metrics::exposition::metric_type(S::TYPE) as i32,
            metric,
            unit: String::new(),
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.read().len()
    }

    /// `a="x",b="y"`: the values, escaped, under their names in name order.
    fn render(&self, values: &[&str]) -> String {
        debug_assert_eq!(values.len(), self.names.len(), "{}: label values", self.name);
        let mut text = String::with_capacity(values.iter().map(|v| v.len() + 16).sum());
        for (n, (name, i)) in self.names.iter().zip(&self.order).enumerate() {
            if n > 0 {
                text.push(',');
            }
            text.push_str(name);
            text.push_str("=\"");
            escape_into(&mut text, value_at(values, *i), true);
            text.push('"');
        }
        text
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry<S>>> {
        self.series.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// Any family, for writing and gathering them all alike.
trait AnyFamily: Send + Sync {
    fn write_text(&self, out: &mut String);
    fn to_proto(&self) -> Option<proto::MetricFamily>;
    fn write_protobuf(&self, out: &mut Vec<u8>);
}

impl<S: Series> AnyFamily for Family<S> {
    fn write_text(&self, out: &mut String) {
        Family::write_text(self, out);
    }

    fn to_proto(&self) -> Option<proto::MetricFamily> {
        Family::to_proto(self)
    }

    fn write_protobuf(&self, out: &mut Vec<u8>) {
        Family::write_protobuf(self, out);
    }
}

/// The families one `Metrics` owns, in creation order: creating a family here
/// is what puts it in the exposition, so none can be created and left out.
#[derive(Default)]
pub struct Families(Vec<Arc<dyn AnyFamily>>);

impl Families {
    pub fn counter(
        &mut self,
        name: &'static str,
        help: &str,
        labels: &[String],
    ) -> prometheus::Result<Arc<CounterFamily>> {
        Ok(self.add(CounterFamily::counter(name, help, labels)?))
    }

    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &str,
        labels: &[String],
        bounds: Vec<f64>,
        mode: HistogramMode,
    ) -> prometheus::Result<Arc<HistogramFamily>> {
        Ok(self.add(HistogramFamily::histogram(name, help, labels, bounds, mode)?))
    }

    fn add<S: Series + 'static>(&mut self, family: Family<S>) -> Arc<Family<S>> {
        let family = Arc::new(family);
        self.0.push(family.clone());
        family
    }

    /// Appends every family in text format.
    pub fn write_text(&self, out: &mut String) {
        for family in &self.0 {
            family.write_text(out);
        }
    }

    /// Every family with series, as the registry would gather them.
    pub fn to_protos(&self) -> impl Iterator<Item = proto::MetricFamily> + '_ {
        self.0.iter().filter_map(|f| f.to_proto())
    }

    /// Appends every family with series to a protobuf exposition, in the
    /// order `write_text` writes them.
    pub fn write_protobuf(&self, out: &mut Vec<u8>) {
        for family in &self.0 {
            family.write_protobuf(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus::{Encoder as _, HistogramOpts, HistogramVec, IntCounterVec, Opts, TextEncoder};

    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    fn crate_text(families: &[proto::MetricFamily]) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(families, &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    /// The same updates through the prometheus crate and through a family
    /// give the same text, line for line (series order aside).
    fn sorted_lines(text: &str) -> Vec<String> {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.sort();
        lines
    }

    #[test]
    fn counters_write_what_the_prometheus_crate_writes() {
        let labels = names(&["reason", "iface", "region"]);
        let ours = CounterFamily::counter("t_drops_total", "Drops.\nSecond \\ line.", &labels).unwrap();
        let theirs =
            IntCounterVec::new(Opts::new("t_drops_total", "Drops.\nSecond \\ line."), &["reason", "iface", "region"])
                .unwrap();
        for (values, n) in [
            (["no_socket", "eth0", "eu"], 3),
            (["tcp_csum", "veth\"1\"", "eu"], 1),
            (["no_socket", "a\\b\nc", "eu"], 12),
            (["no_socket", "", "eu"], 0),
        ] {
            ours.with_label_values(&values).inc_by(n);
            theirs.with_label_values(&values).inc_by(n);
        }
        ours.with_label_values(&["no_socket", "eth0", "eu"]).inc();
        theirs.with_label_values(&["no_socket", "eth0", "eu"]).inc();
        let mut text = String::new();
        ours.write_text(&mut text);
        let expected = crate_text(&prometheus::core::Collector::collect(&theirs));
        assert_eq!(sorted_lines(&text), sorted_lines(&expected), "{text}");
        assert!(text.contains(r#"t_drops_total{iface="veth\"1\"",reason="tcp_csum",region="eu"} 1"#), "{text}");
        assert_eq!(ours.to_proto().map(|f| crate_text(&[f])), Some(text));
    }

    #[test]
    fn histograms_write_what_the_prometheus_crate_writes() {
        let bounds = vec![0.001, 0.5, 1.0, 1780.0, 1e11];
        let ours = HistogramFamily::histogram(
            "t_seconds",
            "Time.",
            &names(&["protocol", "direction"]),
            bounds.clone(),
            HistogramMode::Classic,
        )
        .unwrap();
        let theirs =
            HistogramVec::new(HistogramOpts::new("t_seconds", "Time.").buckets(bounds), &["protocol", "direction"])
                .unwrap();
        for (values, v) in [
            (["tcp", "receive"], 0.25),
            (["tcp", "receive"], 0.5),
            (["tcp", "receive"], 2e11),
            (["udp", "transmit"], 1780.0),
            (["udp", "transmit"], 0.0001),
        ] {
            ours.with_label_values(&values).observe(v);
            theirs.with_label_values(&values).observe(v);
        }
        ours.with_label_values(&["udp", "receive"]);
        theirs.with_label_values(&["udp", "receive"]);
        let mut text = String::new();
        ours.write_text(&mut text);
        let expected = crate_text(&prometheus::core::Collector::collect(&theirs));
        assert_eq!(sorted_lines(&text), sorted_lines(&expected), "{text}");
        assert!(text.contains("t_seconds_bucket{direction=\"receive\",protocol=\"tcp\",le=\"+Inf\"} 3\n"), "{text}");
        assert_eq!(ours.to_proto().map(|f| crate_text(&[f])), Some(text));
    }

    /// The protobuf message reused between scrapes always equals one built
    /// afresh: after values change, and after series come and go.
    #[test]
    fn protobuf_scrapes_reuse_the_message_and_stay_exact() {
        use prost::Message as _;

        let decode = |body: Vec<u8>| -> Option<dm::MetricFamily> {
            (!body.is_empty()).then(|| dm::MetricFamily::decode_length_delimited(&body[..]).unwrap())
        };
        let write = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut body = Vec::new();
            f(&mut body);
            decode(body)
        };
        let c = CounterFamily::counter("t_total", "T.", &names(&["pod", "iface"])).unwrap();
        let h =
            HistogramFamily::histogram("t_h", "H.", &names(&["pod"]), vec![1.0, 10.0], HistogramMode::Both).unwrap();
        assert_eq!(write(&|b| c.write_protobuf(b)), None, "no series, no family");
        c.with_label_values(&["a", "eth0"]).inc_by(3);
        h.with_label_values(&["a"]).observe(5.0);
        for step in 0..4 {
            match step {
                1 => {
                    c.with_label_values(&["a", "eth0"]).inc();
                    h.with_label_values(&["a"]).observe(0.5);
                }
                2 => {
                    c.with_label_values(&["b", "eth\"1"]).inc_by(2);
                    h.with_label_values(&["b"]).observe(50.0);
                }
                3 => {
                    assert!(c.remove(&["a", "eth0"]) && h.remove(&["a"]));
                }
                _ => {}
            }
            let (counters, histograms) = (write(&|b| c.write_protobuf(b)), write(&|b| h.write_protobuf(b)));
            assert_eq!(counters, c.to_exposition(), "step {step}");
            assert_eq!(histograms, h.to_exposition(), "step {step}");
            let total: f64 = counters.unwrap().metric.iter().map(|m| m.counter.as_ref().unwrap().value).sum();
            assert_eq!(total, [3.0, 4.0, 6.0, 2.0][step], "step {step}");
            let histograms = histograms.unwrap();
            let first = histograms.metric[0].histogram.as_ref().unwrap();
            assert_eq!(first.bucket.len(), 2);
            assert!(!first.positive_span.is_empty(), "native buckets");
        }
    }

    #[test]
    fn unlabelled_series_and_empty_families() {
        let c = CounterFamily::counter("t_total", "T.", &[]).unwrap();
        let mut text = String::new();
        c.write_text(&mut text);
        assert_eq!(text, "", "no series, no family");
        assert!(c.to_proto().is_none());
        c.with_label_values(&[]).inc_by(7);
        c.write_text(&mut text);
        assert_eq!(text, "# HELP t_total T.\n# TYPE t_total counter\nt_total 7\n");
        let h = HistogramFamily::histogram("t_h", "H.", &[], vec![1.0], HistogramMode::Classic).unwrap();
        h.with_label_values(&[]).observe(0.5);
        let mut text = String::new();
        h.write_text(&mut text);
        assert!(
            text.ends_with("t_h_bucket{le=\"1\"} 1\nt_h_bucket{le=\"+Inf\"} 1\nt_h_sum 0.5\nt_h_count 1\n"),
            "{text}"
        );
    }

    #[test]
    fn removed_series_leave_and_come_back_at_zero() {
        let c = CounterFamily::counter("t_total", "T.", &names(&["pod"])).unwrap();
        c.with_label_values(&["a"]).inc_by(5);
        c.with_label_values(&["b"]).inc();
        assert!(c.remove(&["a"]));
        assert!(!c.remove(&["a"]), "already gone");
        assert_eq!(c.len(), 1);
        assert_eq!(c.with_label_values(&["a"]).get(), 0);
    }

    #[test]
    fn a_label_name_given_twice_is_refused() {
        let err = CounterFamily::counter("t_total", "T.", &names(&["iface", "region", "iface"])).err().unwrap();
        assert!(err.to_string().contains("label name `iface` given twice"), "{err}");
    }
}
