//! Live throughput bookkeeping: how much of each open session's byte count has
//! already been added to `observer_bytes_total`, so each scrape adds only the
//! growth and a session's end adds only the rest.
use std::{collections::HashMap, hash::Hash};

pub struct LiveCounts<K> {
    counted: HashMap<K, (u64, u64)>,
}

impl<K: Hash + Eq + Clone> Default for LiveCounts<K> {
    fn default() -> Self {
        Self { counted: HashMap::new() }
    }
}

impl<K: Hash + Eq + Clone> LiveCounts<K> {
    /// The session `key` has moved `(tx, rx)` so far: returns what was not yet
    /// counted. Counters never go back; a smaller value adds nothing.
    pub fn advance(&mut self, key: &K, tx: u64, rx: u64) -> (u64, u64) {
        let counted = self.counted.entry(key.clone()).or_insert((0, 0));
        let delta = (tx.saturating_sub(counted.0), rx.saturating_sub(counted.1));
        counted.0 = counted.0.max(tx);
        counted.1 = counted.1.max(rx);
        delta
    }

    /// The session ended with `(tx, rx)`: returns the rest and forgets it.
    pub fn finish(&mut self, key: &K, tx: u64, rx: u64) -> (u64, u64) {
        let delta = self.advance(key, tx, rx);
        self.counted.remove(key);
        delta
    }

    /// Forgets sessions that are gone without an end we saw (a lost record),
    /// so the bookkeeping cannot grow without bound.
    pub fn retain(&mut self, mut alive: impl FnMut(&K) -> bool) {
        self.counted.retain(|k, _| alive(k));
    }

    pub fn len(&self) -> usize {
        self.counted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counted.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_growth_once_and_the_rest_at_the_end() {
        let mut live = LiveCounts::default();
        assert_eq!(live.advance(&1, 100, 0), (100, 0));
        assert_eq!(live.advance(&1, 250, 40), (150, 40));
        assert_eq!(live.advance(&1, 250, 40), (0, 0), "no growth, nothing added");
        assert_eq!(live.finish(&1, 300, 40), (50, 0));
        assert!(live.is_empty());
        // A session never seen live adds everything at its end.
        assert_eq!(live.finish(&2, 7, 9), (7, 9));
    }

    #[test]
    fn counters_never_go_back() {
        let mut live = LiveCounts::default();
        live.advance(&1, 100, 100);
        assert_eq!(live.advance(&1, 90, 120), (0, 20));
        assert_eq!(live.finish(&1, 100, 120), (0, 0));
    }

    #[test]
    fn retain_drops_vanished_sessions() {
        let mut live = LiveCounts::default();
        live.advance(&1, 1, 1);
        live.advance(&2, 1, 1);
        live.retain(|k| *k == 2);
        assert_eq!(live.len(), 1);
        assert_eq!(live.advance(&2, 1, 1), (0, 0));
    }
}
