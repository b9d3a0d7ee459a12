//! The two exposition formats of `/metrics` and how a scrape chooses one:
//! Prometheus text format 0.0.4, and the protobuf format (length-delimited
//! `io.prometheus.client.MetricFamily` messages), the only one that carries
//! native histograms. The scrape's `Accept` header decides, as in the Go
//! client's `expfmt.Negotiate`: its media ranges by decreasing quality, the
//! first that names a format served here wins, text when none does.
//! Prometheus asks for protobuf first when its native histograms are on
//! (`--enable-feature=native-histograms` before 3.x, `scrape_protocols`
//! after), for text otherwise.
use prometheus::proto;
use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as dm;
use prost::Message as _;

pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// As the Go client names it (expfmt's `FmtProtoDelim`).
pub const PROTOBUF_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Protobuf,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => TEXT_CONTENT_TYPE,
            Format::Protobuf => PROTOBUF_CONTENT_TYPE,
        }
    }
}

/// One media range of an Accept header: type, subtype, parameters, quality.
struct MediaRange<'a> {
    kind: &'a str,
    params: Vec<(&'a str, &'a str)>,
    q: f64,
}

impl MediaRange<'_> {
    fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| *v)
    }

    /// Ranges with a wildcard sort after specific ones of the same quality.
    fn specificity(&self) -> u8 {
        match self.kind.split_once('/') {
            Some(("*", _)) => 0,
            Some((_, "*")) => 1,
            _ => 2,
        }
    }
}

fn parse_accept(header: &str) -> Vec<MediaRange<'_>> {
    let mut ranges: Vec<MediaRange<'_>> = header
        .split(',')
        .filter_map(|part| {
            let mut fields = part.split(';').map(str::trim);
            let kind = fields.next().filter(|k| k.contains('/'))?;
            let params: Vec<(&str, &str)> =
                fields.filter_map(|p| p.split_once('=')).map(|(k, v)| (k.trim(), v.trim().trim_matches('"'))).collect();
            let q = params.iter().find(|(k, _)| k.eq_ignore_ascii_case("q")).map_or(Some(1.0), |(_, v)| v.parse().ok());
            Some(MediaRange { kind, params, q: q? })
        })
        .filter(|r| r.q > 0.0)
        .collect();
    // Stable: equal ranges keep the header's order.
    ranges.sort_by(|a, b| b.q.total_cmp(&a.q).then(b.specificity().cmp(&a.specificity())));
    ranges
}

/// The format a scrape with this `Accept` header gets, when protobuf may be
/// served at all.
pub fn negotiate(accept: Option<&str>) -> Format {
    for range in parse_accept(accept.unwrap_or("")) {
        if range.kind.eq_ignore_ascii_case("application/vnd.google.protobuf")
            && range.param("proto") == Some("io.prometheus.client.MetricFamily")
            && range.param("encoding") == Some("delimited")
        {
            return Format::Protobuf;
        }
        if range.kind.eq_ignore_ascii_case("text/plain") && matches!(range.param("version"), None | Some("0.0.4")) {
            return Format::Text;
        }
    }
    Format::Text
}

pub fn metric_type(t: proto::MetricType) -> dm::MetricType {
    match t {
        proto::MetricType::COUNTER => dm::MetricType::Counter,
        proto::MetricType::GAUGE => dm::MetricType::Gauge,
        proto::MetricType::SUMMARY => dm::MetricType::Summary,
        proto::MetricType::UNTYPED => dm::MetricType::Untyped,
        proto::MetricType::HISTOGRAM => dm::MetricType::Histogram,
    }
}

/// A family gathered from the `prometheus` crate's registry (info gauges,
/// self-telemetry, process, GPUs), in the exposition's messages.
pub fn from_registry(family: &proto::MetricFamily) -> dm::MetricFamily {
    let t = family.get_field_type();
    let metric = family
        .get_metric()
        .iter()
        .map(|m| {
            let label = m
                .get_label()
                .iter()
                .map(|l| dm::LabelPair { name: l.name().to_string(), value: l.value().to_string() })
                .collect();
            let mut out = dm::Metric { label, timestamp_ms: m.timestamp_ms(), ..Default::default() };
            match t {
                proto::MetricType::COUNTER => {
                    out.counter = Some(dm::Counter { value: m.get_counter().get_value(), ..Default::default() })
                }
                proto::MetricType::GAUGE => out.gauge = Some(dm::Gauge { value: m.get_gauge().get_value() }),
                // No collector here makes untyped metrics; converted all the same.
                #[allow(deprecated)]
                proto::MetricType::UNTYPED => out.untyped = Some(dm::Untyped { value: m.get_untyped().get_value() }),
                proto::MetricType::SUMMARY => {
                    let s = m.get_summary();
                    out.summary = Some(dm::Summary {
                        sample_count: s.sample_count(),
                        sample_sum: s.sample_sum(),
                        quantile: s
                            .get_quantile()
                            .iter()
                            .map(|q| dm::Quantile { quantile: q.quantile(), value: q.value() })
                            .collect(),
                        ..Default::default()
                    })
                }
                proto::MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    out.histogram = Some(dm::Histogram {
                        sample_count: h.get_sample_count(),
                        sample_sum: h.get_sample_sum(),
                        bucket: h
                            .get_bucket()
                            .iter()
                            .map(|b| dm::Bucket {
                                cumulative_count: b.cumulative_count(),
                                upper_bound: b.upper_bound(),
                                ..Default::default()
                            })
                            .collect(),
                        ..Default::default()
                    })
                }
            }
            out
        })
        .collect();
    dm::MetricFamily {
        name: family.name().to_string(),
        help: family.help().to_string(),
        r#type: metric_type(t) as i32,
        metric,
        unit: String::new(),
    }
}

/// Length-delimited messages, the body of a protobuf scrape.
pub fn encode_delimited(families: impl IntoIterator<Item = dm::MetricFamily>, out: &mut Vec<u8>) {
    for family in families {
        // Writing to a Vec only fails when it cannot grow (then allocation aborts first).
        let _ = family.encode_length_delimited(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers_of_prometheus_and_others() {
        // Prometheus 2.4x with native histograms on.
        let native = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,application/openmetrics-text;version=1.0.0;q=0.8,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(native)), Format::Protobuf);
        // Prometheus without native histograms: OpenMetrics first, which is
        // not served here, then text.
        let classic = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(classic)), Format::Text);
        // Prometheus 3 with scrape_protocols [PrometheusText0.0.4, PrometheusProto]: text first.
        let text_first = "text/plain;version=0.0.4;q=0.5,application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.4";
        assert_eq!(negotiate(Some(text_first)), Format::Text);
        // Quality decides, not order.
        let proto_better = "text/plain;q=0.2, application/vnd.google.protobuf; proto=\"io.prometheus.client.MetricFamily\"; encoding=delimited; q=0.9";
        assert_eq!(negotiate(Some(proto_better)), Format::Protobuf);
        for text in [None, Some(""), Some("*/*"), Some("text/html"), Some("garbage;;,")] {
            assert_eq!(negotiate(text), Format::Text, "{text:?}");
        }
        // Protobuf in a form not served (text encoding), or refused (q=0).
        let other = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text";
        assert_eq!(negotiate(Some(other)), Format::Text);
        let refused = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0";
        assert_eq!(negotiate(Some(refused)), Format::Text);
    }

    #[test]
    fn registry_families_keep_every_field() {
        let registry = prometheus::Registry::new();
        let g = prometheus::GaugeVec::new(prometheus::Opts::new("t_gauge", "G."), &["a"]).unwrap();
        g.with_label_values(&["x"]).set(2.5);
        let c = prometheus::IntCounter::new("t_total", "C.").unwrap();
        c.inc_by(7);
        let h = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new("t_seconds", "H.").buckets(vec![1.0]))
            .unwrap();
        h.observe(0.5);
        h.observe(3.0);
        registry.register(Box::new(g)).unwrap();
        registry.register(Box::new(c)).unwrap();
        registry.register(Box::new(h)).unwrap();
        let families: Vec<dm::MetricFamily> = registry.gather().iter().map(from_registry).collect();
        let mut body = Vec::new();
        encode_delimited(families.clone(), &mut body);
        let mut read = &body[..];
        let mut decoded = Vec::new();
        while !read.is_empty() {
            decoded.push(dm::MetricFamily::decode_length_delimited(&mut read).unwrap());
        }
        assert_eq!(decoded, families);
        let gauge = &decoded[0];
        assert_eq!((gauge.name.as_str(), gauge.r#type), ("t_gauge", dm::MetricType::Gauge as i32));
        assert_eq!(gauge.metric[0].label, vec![dm::LabelPair { name: "a".into(), value: "x".into() }]);
        assert_eq!(gauge.metric[0].gauge.as_ref().unwrap().value, 2.5);
        let hist = decoded[1].metric[0].histogram.as_ref().unwrap();
        assert_eq!((hist.sample_count, hist.sample_sum, hist.bucket.len()), (2, 3.5, 1));
        assert_eq!(hist.bucket[0].cumulative_count, 1);
        assert!(hist.positive_span.is_empty(), "classic only");
        assert_eq!(decoded[2].metric[0].counter.as_ref().unwrap().value, 7.0);
    }
}
