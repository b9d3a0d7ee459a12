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

    /// Admits `value` and notes it seen at `now`, or folds it.
    pub fn admit(&mut self, value: String, now: Instant) -> Admitted {
        let admitted = self.check(value);
        if let Admitted::Value(v) = &admitted {
            self.commit(v, now);
        }
        admitted
    }

    /// What [`Budget::admit`] would decide, without taking a place: a
    /// session whose whole label set is then refused (the label set cap)
    /// must not use up places of values that are never exported.
    pub fn check(&self, value: String) -> Admitted {
        if free(&value) || self.seen.contains_key(&value) || self.seen.len() < self.limit {
            Admitted::Value(value)
        } else {
            Admitted::Folded
        }
    }

    /// Notes a value [`Budget::check`] admitted as seen at `now`.
    pub fn commit(&mut self, value: &str, now: Instant) {
        if free(value) {
            return;
        }
        match self.seen.get_mut(value) {
            Some(last) => *last = now,
            None => {
                self.seen.insert(value.to_owned(), now);
            }
        }
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

/// Values that cost nothing: empty and `other`.
fn free(value: &str) -> bool {
    value.is_empty() || value == OTHER
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

    #[test]
    fn a_check_takes_no_place_until_committed() {
        let t0 = Instant::now();
        let mut b = Budget::new(1);
        assert_eq!(b.check("a".into()), Admitted::Value("a".into()));
        assert_eq!(b.check("b".into()), Admitted::Value("b".into()), "nothing taken yet");
        b.commit("b", t0);
        assert_eq!(b.check("a".into()), Admitted::Folded);
        assert_eq!(b.check("b".into()), Admitted::Value("b".into()));
        b.commit(OTHER, t0);
        assert_eq!(b.len(), 1);
    }
}
