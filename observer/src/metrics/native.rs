//! Native histograms (Prometheus' sparse, exponential histograms) of the
//! session families: which histograms a scrape carries (`--histograms`), the
//! bucketing, and the bucket fields of the protobuf exposition.
//!
//! The bucketing follows the specification (prometheus.io, "Native
//! Histograms"; the Go client's `histogram.go`): at schema `s`, bucket `i`
//! holds the observations `v` with `2^((i-1)·2^-s) < |v| <= 2^(i·2^-s)`, so
//! 1 is always a boundary and every power of two is cut into `2^s` buckets;
//! observations within [`ZERO_THRESHOLD`] of zero go to the zero bucket.
//! [`SCHEMA`] is 3: a bucket's bounds are a factor `2^(1/8)` (1.0905) apart,
//! so a quantile estimated within the bucket that holds the true one is
//! within 9.05% of it, at about 27 buckets per decade of values that occur.
//! A histogram that would hold more than [`MAX_BUCKETS`] buckets halves its
//! resolution (schema - 1, neighbouring buckets merged), as the Go client
//! does, down to schema -4; counts are never dropped.
//!
//! Only non-negative values reach these histograms (goodput, durations);
//! negative ones are bucketed on the negative side all the same. NaN is
//! counted in the count and sum only, as in the Go client.
use std::{collections::BTreeMap, sync::OnceLock};

use parking_lot::{Mutex, MutexGuard};
use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as dm;

/// Schema of new native histograms: buckets a factor 2^(2^-3) = 1.0905 wide.
pub const SCHEMA: i32 = 3;
/// Lowest and highest schema the exposition format defines.
pub const MIN_SCHEMA: i32 = -4;
pub const MAX_SCHEMA: i32 = 8;
/// Width of the zero bucket: 2^-128, the Go client's default (far below any
/// goodput or duration, so only exact zeros land there).
pub const ZERO_THRESHOLD: f64 = 2.938735877055719e-39;
/// Most populated buckets one histogram keeps before halving its resolution
/// (the Go client's customary `NativeHistogramMaxBucketNumber`). At schema 3
/// that is six decades of distinct values.
pub const MAX_BUCKETS: usize = 160;

/// Which representation of the session histograms the exposition carries
/// (`--histograms`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum HistogramMode {
    /// Classic buckets only: every scrape is the text format, as before
    /// native histograms existed.
    Classic,
    /// Native buckets only: protobuf scrapes carry the native histogram; a
    /// text scrape has only `_sum`, `_count` and the `+Inf` bucket.
    Native,
    /// Both: protobuf scrapes carry each histogram's classic and native
    /// buckets, text scrapes the classic ones.
    #[default]
    Both,
}

impl HistogramMode {
    pub fn classic(self) -> bool {
        self != HistogramMode::Native
    }

    pub fn native(self) -> bool {
        self != HistogramMode::Classic
    }
}

/// Splits a positive, finite, non-zero `v` as `frac · 2^exp` with `frac` in
/// [0.5, 1) (C's frexp).
fn frexp(v: f64) -> (f64, i32) {
    let bits = v.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32;
    let mantissa = bits & ((1u64 << 52) - 1);
    if exponent == 0 {
        // Subnormal: scale into the normal range first.
        let (frac, exp) = frexp(v * 2f64.powi(64));
        return (frac, exp - 64);
    }
    (f64::from_bits(mantissa | (1022u64 << 52)), exponent - 1022)
}

/// For each positive schema, the `2^schema` bucket boundaries within [0.5, 1):
/// `2^(j·2^-schema - 1)`.
fn fraction_bounds(schema: i32) -> &'static [f64] {
    static BOUNDS: OnceLock<Vec<Vec<f64>>> = OnceLock::new();
    let all = BOUNDS.get_or_init(|| {
        (0..=MAX_SCHEMA)
            .map(|s| {
                let n = 1u32 << s;
                (0..n).map(|j| (f64::from(j) / f64::from(n) - 1.0).exp2()).collect()
            })
            .collect()
    });
    &all[schema as usize]
}

/// Index of the bucket that holds `|v|` at `schema` (`|v|` above the zero
/// threshold; +Inf lands one bucket past the largest finite value's).
pub fn bucket_index(schema: i32, v: f64) -> i32 {
    let v = v.abs();
    let (frac, exp) = frexp(if v.is_infinite() { f64::MAX } else { v });
    let index = if schema > 0 {
        let bounds = fraction_bounds(schema);
        // The first boundary not below frac: frac <= boundary, upper bounds
        // being inclusive.
        bounds.partition_point(|b| *b < frac) as i32 + (exp - 1) * bounds.len() as i32
    } else {
        let key = if frac == 0.5 { exp - 1 } else { exp };
        let shift = -schema;
        (key + (1 << shift) - 1) >> shift
    };
    if v.is_infinite() { index.saturating_add(1) } else { index }
}

/// Upper bound of bucket `index` at `schema`: `2^(index·2^-schema)`.
pub fn upper_bound(schema: i32, index: i32) -> f64 {
    (f64::from(index) * (-f64::from(schema)).exp2()).exp2()
}

/// Observations per bucket index, of one sign.
type Buckets = BTreeMap<i32, u64>;

/// The native part of one histogram series.
#[derive(Debug)]
pub struct NativeState {
    schema: i32,
    /// Most populated buckets before the resolution halves.
    max_buckets: usize,
    zero_count: u64,
    positive: Buckets,
    negative: Buckets,
}

impl Default for NativeState {
    fn default() -> Self {
        NativeState::new(SCHEMA)
    }
}

impl NativeState {
    pub fn new(schema: i32) -> Self {
        Self::with_limit(schema, MAX_BUCKETS)
    }

    pub fn with_limit(schema: i32, max_buckets: usize) -> Self {
        assert!((MIN_SCHEMA..=MAX_SCHEMA).contains(&schema), "schema {schema}");
        NativeState { schema, max_buckets, zero_count: 0, positive: Buckets::new(), negative: Buckets::new() }
    }

    pub fn observe(&mut self, v: f64) {
        if v.is_nan() {
            return;
        }
        if v.abs() <= ZERO_THRESHOLD {
            self.zero_count += 1;
            return;
        }
        let side = if v > 0.0 { &mut self.positive } else { &mut self.negative };
        *side.entry(bucket_index(self.schema, v)).or_default() += 1;
        while self.positive.len() + self.negative.len() > self.max_buckets && self.schema > MIN_SCHEMA {
            self.halve_resolution();
        }
    }

    /// Schema - 1: bucket `i` becomes `ceil(i / 2)`, whose range at the lower
    /// schema is exactly buckets `2·ceil(i/2) - 1` and `2·ceil(i/2)` at this one.
    fn halve_resolution(&mut self) {
        self.schema -= 1;
        for side in [&mut self.positive, &mut self.negative] {
            let mut merged = Buckets::new();
            for (index, count) in std::mem::take(side) {
                *merged.entry((index + 1) >> 1).or_default() += count;
            }
            *side = merged;
        }
    }

    pub fn schema(&self) -> i32 {
        self.schema
    }

    /// Observations in the zero bucket and in each populated bucket.
    pub fn total(&self) -> u64 {
        self.zero_count + self.positive.values().chain(self.negative.values()).sum::<u64>()
    }

    /// Sets the native fields of a protobuf histogram.
    pub fn fill(&self, h: &mut dm::Histogram) {
        h.schema = self.schema;
        h.zero_threshold = ZERO_THRESHOLD;
        h.zero_count = self.zero_count;
        (h.positive_span, h.positive_delta) = spans_and_deltas(&self.positive);
        (h.negative_span, h.negative_delta) = spans_and_deltas(&self.negative);
        if h.positive_span.is_empty() && h.negative_span.is_empty() {
            // The spec's no-op span: marks a histogram without observations
            // as native for servers that look only at spans.
            h.positive_span.push(dm::BucketSpan { offset: 0, length: 0 });
        }
    }
}

/// The protobuf encoding of one side's buckets: runs of consecutive indexes
/// (each span's offset is the gap after the previous span, the first one's
/// its starting index) and each bucket's count as the difference from the
/// previous bucket's.
fn spans_and_deltas(buckets: &Buckets) -> (Vec<dm::BucketSpan>, Vec<i64>) {
    let mut spans: Vec<dm::BucketSpan> = Vec::new();
    let mut deltas = Vec::with_capacity(buckets.len());
    let (mut next, mut previous) = (None::<i32>, 0i64);
    for (&index, &count) in buckets {
        match (next, spans.last_mut()) {
            (Some(n), Some(span)) if n == index => span.length += 1,
            _ => spans.push(dm::BucketSpan { offset: next.map_or(index, |n| index - n), length: 1 }),
        }
        next = Some(index + 1);
        let count = count as i64;
        deltas.push(count - previous);
        previous = count;
    }
    (spans, deltas)
}

/// A histogram's native part behind the lock its observations and scrapes
/// share, so a scrape reads count, sum and buckets of the same observations.
#[derive(Debug, Default)]
pub struct NativeBuckets(Mutex<NativeState>);

impl NativeBuckets {
    pub fn lock(&self) -> MutexGuard<'_, NativeState> {
        self.0.lock()
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        encoding::prometheus_protobuf,
        metrics::histogram::{Histogram, NativeHistogramConfig},
        registry::Registry,
    };

    use super::*;

    /// Index -> count of one side, from a protobuf histogram's spans and deltas.
    fn expand(spans: &[dm::BucketSpan], deltas: &[i64]) -> BTreeMap<i32, u64> {
        let mut out = BTreeMap::new();
        let (mut index, mut count, mut d) = (0i32, 0i64, deltas.iter());
        for span in spans {
            index += span.offset;
            for _ in 0..span.length {
                count += d.next().unwrap();
                if count != 0 {
                    out.insert(index, count as u64);
                }
                index += 1;
            }
        }
        assert!(d.next().is_none(), "deltas left over");
        out
    }

    fn filled(state: &NativeState) -> dm::Histogram {
        let mut h = dm::Histogram::default();
        state.fill(&mut h);
        h
    }

    #[test]
    fn boundaries_are_inclusive_upper_bounds_at_every_schema() {
        for schema in MIN_SCHEMA..=MAX_SCHEMA {
            for index in -40..40 {
                let upper = upper_bound(schema, index);
                if upper <= ZERO_THRESHOLD || upper.is_infinite() {
                    continue;
                }
                // Powers of two are exact; other bounds are checked to within
                // a rounding of the bound itself.
                let exact = (f64::from(index) * (-f64::from(schema)).exp2()).fract() == 0.0;
                if exact {
                    assert_eq!(bucket_index(schema, upper), index, "schema {schema}: {upper} is in bucket {index}");
                }
                assert_eq!(bucket_index(schema, upper * (1.0 + 1e-12)), index + 1, "schema {schema} above {upper}");
                assert_eq!(bucket_index(schema, upper * (1.0 - 1e-12)), index, "schema {schema} below {upper}");
            }
        }
        // Schema 0: (0.5, 1], (1, 2], (2, 4]; schema 3 divides each in 8.
        assert_eq!([0.5, 0.75, 1.0, 1.5, 2.0, 3.0].map(|v| bucket_index(0, v)), [-1, 0, 0, 1, 1, 2]);
        assert_eq!([1.0, 1.09, 1.0906, 2.0].map(|v| bucket_index(3, v)), [0, 1, 2, 8]);
        // Schema -2: buckets 16 times wide: (1/16, 1], (1, 16], (16, 256].
        assert_eq!([0.0625, 0.07, 1.0, 1.01, 16.0, 17.0].map(|v| bucket_index(-2, v)), [-1, 0, 0, 1, 1, 2]);
        assert_eq!(bucket_index(SCHEMA, -3.0), bucket_index(SCHEMA, 3.0), "negative values by magnitude");
    }

    #[test]
    fn schema_three_keeps_a_value_within_nine_percent_of_its_bucket_bounds() {
        let factor = upper_bound(SCHEMA, 1);
        assert!((factor - 1.0905).abs() < 1e-4, "{factor}");
        for v in [1e3, 12_345.0, 2.5e6, 8.75e8, 1e11, 0.0042, 86_400.0] {
            let i = bucket_index(SCHEMA, v);
            let (lower, upper) = (upper_bound(SCHEMA, i - 1), upper_bound(SCHEMA, i));
            assert!(lower < v && v <= upper, "{v} in ({lower}, {upper}]");
            assert!(upper / lower < 1.0906);
        }
    }

    #[test]
    fn zero_bucket_takes_zeros_and_values_within_the_threshold() {
        let mut s = NativeState::default();
        for v in [0.0, -0.0, ZERO_THRESHOLD, -ZERO_THRESHOLD / 2.0, ZERO_THRESHOLD * 2.0, f64::NAN] {
            s.observe(v);
        }
        let h = filled(&s);
        assert_eq!(h.zero_count, 4);
        assert_eq!(h.zero_threshold, ZERO_THRESHOLD);
        assert_eq!(expand(&h.positive_span, &h.positive_delta).values().sum::<u64>(), 1);
        assert_eq!(s.total(), 5, "NaN has no bucket");
    }

    #[test]
    fn an_empty_histogram_is_marked_native_by_a_no_op_span() {
        let h = filled(&NativeState::default());
        assert_eq!((h.schema, h.zero_count), (SCHEMA, 0));
        assert_eq!(h.positive_span, vec![dm::BucketSpan { offset: 0, length: 0 }]);
        assert!(h.positive_delta.is_empty() && h.negative_span.is_empty());
    }

    #[test]
    fn spans_and_deltas_encode_runs_and_gaps() {
        let buckets: Buckets = [(-2, 1), (-1, 3), (0, 3), (3, 1), (4, 5), (10, 2)].into_iter().collect();
        let (spans, deltas) = spans_and_deltas(&buckets);
        assert_eq!(
            spans,
            vec![
                dm::BucketSpan { offset: -2, length: 3 },
                dm::BucketSpan { offset: 2, length: 2 },
                dm::BucketSpan { offset: 5, length: 1 },
            ]
        );
        assert_eq!(deltas, vec![1, 2, 0, -2, 4, -3]);
        assert_eq!(expand(&spans, &deltas), buckets);
    }

    #[test]
    fn too_many_buckets_halve_the_resolution_and_keep_every_count() {
        let mut s = NativeState::default();
        // 1 to 2^30: 240 buckets at schema 3, 120 at schema 2.
        let values: Vec<f64> = (0..=240).map(|i| (f64::from(i) / 8.0).exp2()).collect();
        for v in &values {
            s.observe(*v);
        }
        assert_eq!(s.schema(), 2);
        assert!(s.positive.len() <= MAX_BUCKETS);
        assert_eq!(s.total(), values.len() as u64);
        // Every value is in the bucket that holds it at the lower schema.
        let mut want = Buckets::new();
        for v in &values {
            *want.entry(bucket_index(2, *v)).or_default() += 1;
        }
        assert_eq!(s.positive, want);
    }

    /// The same observations through the official client's native histogram
    /// (prometheus-client) give the same schema, zero bucket and buckets.
    #[test]
    fn buckets_agree_with_the_official_client() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for schema in [-4, -1, 0, 1, 3, 5, 8] {
            // Without a bucket limit, as the client's default.
            let mut ours = NativeState::with_limit(schema, usize::MAX);
            let theirs = Histogram::new_native(NativeHistogramConfig::with_schema(schema as i8));
            for n in 0..2_000 {
                // Goodput-like values over 8 decades, some exact powers of two, some zeros.
                let v = match n % 50 {
                    0 => 0.0,
                    1 => ((next() % 60) as f64 - 20.0).exp2(),
                    _ => 10f64.powf(3.0 + (next() % 8_000_000) as f64 / 1e6),
                };
                ours.observe(v);
                theirs.observe(v);
            }
            let mut registry = Registry::default();
            registry.register("t", "T", theirs);
            let family = prometheus_protobuf::encode(&registry).unwrap().remove(0);
            let theirs = family.metric[0].histogram.clone().unwrap();
            let ours_h = filled(&ours);
            assert_eq!(ours_h.schema, theirs.schema, "schema {schema}");
            assert_eq!(ours_h.zero_count, theirs.zero_count, "schema {schema}");
            assert_eq!(
                expand(&ours_h.positive_span, &ours_h.positive_delta),
                expand(&theirs.positive_span, &theirs.positive_delta),
                "schema {schema}"
            );
        }
    }
}
