//! Live throughput bookkeeping: how much of each open session's byte count has
//! already been added to `observer_bytes_total`, so each scrape adds only the
//! growth and a session's end adds only the rest.
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

pub struct LiveCounts<K> {
    counted: HashMap<K, (u64, u64)>,
    /// Sessions ended since `snapshot_started`: a copy of the kernel's table
    /// taken without the lock that guards this (so that ends can be counted
    /// meanwhile) may still hold them, and must not count them again.
    ended_since_snapshot: Option<HashSet<K>>,
}

impl<K: Hash + Eq + Clone> Default for LiveCounts<K> {
    fn default() -> Self {
        Self { counted: HashMap::new(), ended_since_snapshot: None }
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
        if let Some(ended) = &mut self.ended_since_snapshot {
            ended.insert(key.clone());
        }
        delta
    }

    /// A copy of the open sessions is about to be taken: sessions that end
    /// from now until `apply_snapshot` are left out of it.
    pub fn snapshot_started(&mut self) {
        self.ended_since_snapshot = Some(HashSet::new());
    }

    /// Applies a copy of the open sessions: `(key, Some((tx, rx)))` for one
    /// whose bytes count, `(key, None)` for one open but not counted (another
    /// interface's). Returns the growth of them all, and forgets sessions not
    /// in the copy: gone without an end we saw (a lost record), so the
    /// bookkeeping cannot grow without bound.
    pub fn apply_snapshot(&mut self, open: impl IntoIterator<Item = (K, Option<(u64, u64)>)>) -> (u64, u64) {
        let ended = self.ended_since_snapshot.take().unwrap_or_default();
        let mut alive = HashSet::new();
        let mut total = (0, 0);
        for (key, moved) in open {
            if ended.contains(&key) {
                continue;
            }
            if let Some((tx, rx)) = moved {
                let delta = self.advance(&key, tx, rx);
                total = (total.0 + delta.0, total.1 + delta.1);
            }
            alive.insert(key);
        }
        self.counted.retain(|k, _| alive.contains(k));
        total
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
    fn a_snapshot_forgets_vanished_sessions() {
        let mut live = LiveCounts::default();
        live.advance(&1, 1, 1);
        live.advance(&2, 1, 1);
        live.advance(&3, 1, 1);
        // 2 is open but on another interface: kept, not counted.
        assert_eq!(live.apply_snapshot([(2, None), (3, Some((5, 1)))]), (4, 0));
        assert_eq!(live.len(), 2);
        assert_eq!(live.advance(&2, 1, 1), (0, 0));
    }

    #[test]
    fn a_session_ended_while_the_snapshot_was_taken_is_not_counted_again() {
        let mut live = LiveCounts::default();
        live.advance(&1, 100, 0);
        live.snapshot_started();
        // The copy saw 1 at 150 bytes; before it is applied, 1 ends at 200.
        assert_eq!(live.finish(&1, 200, 0), (100, 0));
        assert_eq!(live.apply_snapshot([(1, Some((150, 0))), (2, Some((10, 0)))]), (10, 0));
        assert_eq!(live.len(), 1, "1 is not brought back");
        // Only until that snapshot: a later end of another session at the
        // same key counts in full.
        assert_eq!(live.finish(&1, 30, 0), (30, 0));
    }
}
