//! When each set of session label values was last reported, so that sets
//! not seen for the TTL leave the exposition (a pod that ended, a peer that
//! went away) instead of being served forever.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

#[derive(Debug, Default)]
pub struct SeriesAges {
    last_seen: HashMap<Vec<String>, Instant>,
}

impl SeriesAges {
    pub fn touch(&mut self, values: &[String], now: Instant) {
        match self.last_seen.get_mut(values) {
            Some(last) => *last = now,
            None => {
                self.last_seen.insert(values.to_vec(), now);
            }
        }
    }

    /// Removes and returns the sets last seen more than `ttl` before `now`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> Vec<Vec<String>> {
        let old: Vec<Vec<String>> = self
            .last_seen
            .iter()
            .filter(|(_, last)| now.saturating_duration_since(**last) > ttl)
            .map(|(values, _)| values.clone())
            .collect();
        for values in &old {
            self.last_seen.remove(values);
        }
        old
    }

    pub fn contains(&self, values: &[String]) -> bool {
        self.last_seen.contains_key(values)
    }

    pub fn len(&self) -> usize {
        self.last_seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_only_sets_older_than_the_ttl() {
        let t0 = Instant::now();
        let mut s = SeriesAges::default();
        let a = vec!["a".to_string()];
        let b = vec!["b".to_string()];
        s.touch(&a, t0);
        s.touch(&b, t0);
        s.touch(&a, t0 + Duration::from_secs(8));
        assert_eq!(s.expire(t0 + Duration::from_secs(11), Duration::from_secs(10)), vec![b]);
        assert_eq!(s.len(), 1);
        assert!(s.expire(t0 + Duration::from_secs(11), Duration::from_secs(10)).is_empty());
    }
}
