//! The cardinality budget: each session label admits at most a configured
//! number of distinct values; later values fold into `other` (counted by the
//! caller in `observer_label_overflow_total`). A value not seen for the
//! series TTL gives its place back, as its series leave the exposition then.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::peers::OTHER;

#[derive(Debug)]
pub struct Budget {
    limit: usize,
    seen: HashMap<String, Instant>,
}

/// What [`Budget::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admitted {
    /// The value itself (already counted, within the limit, or a value that
    /// costs nothing: empty or `other`).
    Value(String),
    /// Over the limit: report `other` instead and count the overflow.
    Folded,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Budget { limit, seen: HashMap::new() }
    }

    pub fn admit(&mut self, value: String, now: Instant) -> Admitted {
        if value.is_empty() || value == OTHER {
            return Admitted::Value(value);
        }
        if let Some(last) = self.seen.get_mut(&value) {
            *last = now;
            return Admitted::Value(value);
        }
        if self.seen.len() >= self.limit {
            return Admitted::Folded;
        }
        self.seen.insert(value.clone(), now);
        Admitted::Value(value)
    }

    /// Forgets values last seen more than `ttl` before `now`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        self.seen.retain(|_, last| now.saturating_duration_since(*last) <= ttl);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_then_folds_and_frees_places_after_the_ttl() {
        let t0 = Instant::now();
        let mut b = Budget::new(2);
        assert_eq!(b.admit("a".into(), t0), Admitted::Value("a".into()));
        assert_eq!(b.admit("b".into(), t0), Admitted::Value("b".into()));
        assert_eq!(b.admit("c".into(), t0), Admitted::Folded);
        assert_eq!(b.admit("a".into(), t0 + Duration::from_secs(5)), Admitted::Value("a".into()), "known value");
        assert_eq!(b.admit(String::new(), t0), Admitted::Value(String::new()), "empty costs nothing");
        assert_eq!(b.admit(OTHER.into(), t0), Admitted::Value(OTHER.into()), "other costs nothing");
        assert_eq!(b.len(), 2);
        // b was last seen at t0, a at t0+5s: only b expires.
        b.expire(t0 + Duration::from_secs(12), Duration::from_secs(10));
        assert_eq!(b.len(), 1);
        assert_eq!(b.admit("c".into(), t0 + Duration::from_secs(12)), Admitted::Value("c".into()));
    }
}
