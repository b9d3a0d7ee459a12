//! `/api/v1/snapshot`: session counts and goodput percentiles per label set,
//! as JSON, for a quick look without a Prometheus server.
//!
//! Everything is computed at read time from the gathered metric families,
//! so the answer follows whatever labels the metrics carry (static labels,
//! and any label added to the session families later) without naming them
//! here. Percentiles use the same linear interpolation within a bucket as
//! PromQL's `histogram_quantile`, so they match what a dashboard shows for
//! the same counts.
use prometheus::proto::{Metric, MetricFamily, MetricType};
use serde_json::{Map, Value, json};

/// The histograms the snapshot summarises.
pub const GOODPUT_FAMILIES: [&str; 2] =
    ["observer_session_goodput_bytes_per_second", "observer_session_active_goodput_bytes_per_second"];
/// The counter whose series the snapshot lists as `sessions_total`.
pub const SESSIONS_FAMILY: &str = "observer_sessions_total";
/// Percentiles reported for each goodput series, as (JSON key, quantile).
const QUANTILES: [(&str, f64); 3] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)];

/// The snapshot document:
/// `{"goodput": {FAMILY: [{labels, count, sum, p50, p90, p99}]}, "sessions_total": [{labels, value}]}`.
/// Percentiles of a series with no observation are `null`.
pub fn build(families: &[MetricFamily]) -> Value {
    let mut goodput = Map::new();
    for name in GOODPUT_FAMILIES {
        let series: Vec<Value> = family(families, name, MetricType::HISTOGRAM).map(histogram_series).collect();
        goodput.insert(name.to_string(), Value::Array(series));
    }
    let sessions: Vec<Value> = family(families, SESSIONS_FAMILY, MetricType::COUNTER)
        .map(|m| json!({ "labels": labels(m), "value": m.get_counter().get_value() as u64 }))
        .collect();
    json!({ "goodput": goodput, "sessions_total": sessions })
}

/// The series of family `name`, if it is registered with that type.
fn family<'a>(families: &'a [MetricFamily], name: &str, kind: MetricType) -> impl Iterator<Item = &'a Metric> {
    families.iter().filter(move |f| f.name() == name && f.get_field_type() == kind).flat_map(|f| f.get_metric().iter())
}

fn labels(m: &Metric) -> Map<String, Value> {
    m.get_label().iter().map(|l| (l.name().to_string(), Value::from(l.value()))).collect()
}

fn histogram_series(m: &Metric) -> Value {
    let h = m.get_histogram();
    // The exposition's buckets plus the implicit +Inf bucket holding every
    // observation, as histogram_quantile sees them.
    let buckets: Vec<(f64, f64)> = h
        .get_bucket()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count() as f64))
        .chain([(f64::INFINITY, h.get_sample_count() as f64)])
        .collect();
    let mut series = Map::new();
    series.insert("labels".into(), Value::Object(labels(m)));
    series.insert("count".into(), h.get_sample_count().into());
    series.insert("sum".into(), h.get_sample_sum().into());
    for (key, q) in QUANTILES {
        // serde_json writes a non-finite f64 as null: no observations.
        series.insert(key.into(), histogram_quantile(q, &buckets).into());
    }
    Value::Object(series)
}

/// The `q`-quantile of a cumulative histogram given as (upper bound,
/// cumulative count) pairs in increasing bound order, the last bound being
/// +Inf: Prometheus' `histogram_quantile` (promql/quantile.go,
/// `bucketQuantile`). The quantile's rank falls in one bucket, and the value
/// is interpolated linearly between that bucket's lower and upper bounds
/// (the lowest bucket starts at 0). A rank in the +Inf bucket gives the
/// highest finite bound. NaN when there are no observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> f64 {
    if q.is_nan() {
        return f64::NAN;
    }
    if q < 0.0 {
        return f64::NEG_INFINITY;
    }
    if q > 1.0 {
        return f64::INFINITY;
    }
    let Some(&(last_bound, observations)) = buckets.last() else { return f64::NAN };
    if buckets.len() < 2 || last_bound != f64::INFINITY || observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    // The first bucket (not the +Inf one) whose count reaches the rank.
    let b = buckets[..buckets.len() - 1].iter().position(|&(_, count)| count >= rank).unwrap_or(buckets.len() - 1);
    if b == buckets.len() - 1 {
        return buckets[b - 1].0;
    }
    let (end, mut count) = buckets[b];
    if b == 0 && end <= 0.0 {
        return end;
    }
    let mut start = 0.0;
    if b > 0 {
        let (previous_end, previous_count) = buckets[b - 1];
        start = previous_end;
        count -= previous_count;
        rank -= previous_count;
    }
    start + (end - start) * (rank / count)
}

#[cfg(test)]
mod tests {
    use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

    use super::*;

    const INF: f64 = f64::INFINITY;

    #[test]
    fn quantiles_interpolate_within_the_bucket_like_promql() {
        // 10 observations: 2 in (0, 1], 6 in (1, 2], 2 in (2, 4].
        let b = [(1.0, 2.0), (2.0, 8.0), (4.0, 10.0), (INF, 10.0)];
        // Rank 5 is the 3rd of 6 in (1, 2]: 1 + 1 * 3/6.
        assert_eq!(histogram_quantile(0.5, &b), 1.5);
        // Rank 9 is the 1st of 2 in (2, 4]: 2 + 2 * 1/2.
        assert_eq!(histogram_quantile(0.9, &b), 3.0);
        // Rank 1 in the lowest bucket, which starts at 0.
        assert_eq!(histogram_quantile(0.1, &b), 0.5);
        assert_eq!(histogram_quantile(1.0, &b), 4.0);
        assert_eq!(histogram_quantile(0.0, &b), 0.0);
    }

    #[test]
    fn ranks_in_the_inf_bucket_give_the_highest_finite_bound() {
        let b = [(1.0, 1.0), (2.0, 2.0), (INF, 10.0)];
        assert_eq!(histogram_quantile(0.99, &b), 2.0);
    }

    #[test]
    fn empty_and_out_of_range() {
        assert!(histogram_quantile(0.5, &[(1.0, 0.0), (INF, 0.0)]).is_nan());
        assert!(histogram_quantile(0.5, &[(INF, 3.0)]).is_nan());
        assert!(histogram_quantile(0.5, &[]).is_nan());
        assert!(histogram_quantile(f64::NAN, &[(1.0, 1.0), (INF, 1.0)]).is_nan());
        assert_eq!(histogram_quantile(-0.1, &[(1.0, 1.0), (INF, 1.0)]), f64::NEG_INFINITY);
        assert_eq!(histogram_quantile(1.1, &[(1.0, 1.0), (INF, 1.0)]), INF);
        // A lowest bound at or below zero is returned as is (no interpolation from 0).
        assert_eq!(histogram_quantile(0.5, &[(-1.0, 4.0), (INF, 4.0)]), -1.0);
    }

    #[test]
    fn empty_buckets_between_are_skipped() {
        // Nothing in (1, 2]: the median's rank 2 is reached at bound 1 already.
        let b = [(1.0, 2.0), (2.0, 2.0), (4.0, 4.0), (INF, 4.0)];
        assert_eq!(histogram_quantile(0.5, &b), 1.0);
        assert_eq!(histogram_quantile(0.75, &b), 3.0);
    }

    #[test]
    fn snapshot_follows_whatever_labels_the_families_carry() {
        let registry = Registry::new();
        let goodput = HistogramVec::new(
            HistogramOpts::new(GOODPUT_FAMILIES[0], "h").buckets(vec![1.0, 2.0, 4.0]),
            &["direction", "peer_country"],
        )
        .unwrap();
        let sessions = IntCounterVec::new(Opts::new(SESSIONS_FAMILY, "c"), &["protocol", "track"]).unwrap();
        registry.register(Box::new(goodput.clone())).unwrap();
        registry.register(Box::new(sessions.clone())).unwrap();
        for v in [0.5, 1.5, 1.5, 3.0] {
            goodput.with_label_values(&["receive", "fr"]).observe(v);
        }
        goodput.with_label_values(&["transmit", "fr"]);
        sessions.with_label_values(&["tcp", "a"]).inc_by(7);

        let doc = build(&registry.gather());
        let series = doc["goodput"][GOODPUT_FAMILIES[0]].as_array().unwrap();
        assert_eq!(series.len(), 2);
        let rx = series.iter().find(|s| s["labels"]["direction"] == "receive").unwrap();
        assert_eq!(rx["labels"]["peer_country"], "fr");
        assert_eq!(rx["count"], 4);
        assert_eq!(rx["sum"], 6.5);
        assert_eq!(rx["p50"], 1.5);
        let tx = series.iter().find(|s| s["labels"]["direction"] == "transmit").unwrap();
        assert_eq!(tx["count"], 0);
        assert!(tx["p50"].is_null() && tx["p99"].is_null());
        // A family not registered is an empty list, not an error.
        assert_eq!(doc["goodput"][GOODPUT_FAMILIES[1]], json!([]));
        assert_eq!(doc["sessions_total"], json!([{ "labels": { "protocol": "tcp", "track": "a" }, "value": 7 }]));
    }
}
