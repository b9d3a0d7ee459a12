//! Live throughput bookkeeping: how much of each open session's byte count has
//! already been added to `observer_bytes_total`, so each scrape adds only the
//! growth and a session's end adds only the rest.
use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
};

pub struct LiveCounts<K> {
    counted: HashMap<K, Counted>,
    /// Sessions ended since `copy_started`: a copy of the kernel's table
    /// taken without the lock that guards this (so that ends can be counted
    /// meanwhile) may still hold them, and must not count them again.
    ended_since_copy: Option<HashSet<K>>,
    /// Copies started so far; `Counted::seen` is the last one a session was in.
    copies: u64,
}

#[derive(Clone, Copy)]
struct Counted {
    tx: u64,
    rx: u64,
    seen: u64,
}

impl<K: Hash + Eq + Clone> Default for LiveCounts<K> {
    fn default() -> Self {
        Self { counted: HashMap::new(), ended_since_copy: None, copies: 0 }
    }
}

impl<K: Hash + Eq + Clone> LiveCounts<K> {
    /// The session `key` has moved `(tx, rx)` so far: returns what was not yet
    /// counted. Counters never go back; a smaller value adds nothing.
    pub fn advance(&mut self, key: &K, tx: u64, rx: u64) -> (u64, u64) {
        let seen = self.copies;
        let counted = self.counted.entry(key.clone()).or_insert(Counted { tx: 0, rx: 0, seen });
        let delta = (tx.saturating_sub(counted.tx), rx.saturating_sub(counted.rx));
        counted.tx = counted.tx.max(tx);
        counted.rx = counted.rx.max(rx);
        counted.seen = seen;
        delta
    }

    /// The session ended with `(tx, rx)`: returns the rest and forgets it.
    /// One removal, not an `advance` and then a removal: most short sessions
    /// end before any scrape counted them, and were never in the table.
    pub fn finish(&mut self, key: &K, tx: u64, rx: u64) -> (u64, u64) {
        let (counted_tx, counted_rx) = self.counted.remove(key).map_or((0, 0), |c| (c.tx, c.rx));
        let delta = (tx.saturating_sub(counted_tx), rx.saturating_sub(counted_rx));
        if let Some(ended) = &mut self.ended_since_copy {
            ended.insert(key.clone());
        }
        delta
    }

    /// A copy of the open sessions is about to be taken: sessions that end
    /// from now until `copy_applied` are left out of it.
    pub fn copy_started(&mut self) {
        self.ended_since_copy = Some(HashSet::new());
        self.copies += 1;
    }

    /// Applies part of that copy (all of it, or a part at a time with the
    /// lock released in between): `(key, Some((tx, rx)))` for a session whose
    /// bytes count, `(key, None)` for one open but not counted (another
    /// interface's). Returns the growth of the part's sessions.
    pub fn apply_copy_part(&mut self, part: &[(K, Option<(u64, u64)>)]) -> (u64, u64) {
        let mut total = (0, 0);
        for (key, moved) in part {
            if self.ended_since_copy.as_ref().is_some_and(|ended| ended.contains(key)) {
                continue;
            }
            match moved {
                Some((tx, rx)) => {
                    let delta = self.advance(key, *tx, *rx);
                    total = (total.0 + delta.0, total.1 + delta.1);
                }
                None => {
                    if let Some(counted) = self.counted.get_mut(key) {
                        counted.seen = self.copies;
                    }
                }
            }
        }
        total
    }

    /// Applies a whole copy under one hold of the lock: `copy_started`, the
    /// copy as one part, `copy_applied`.
    pub fn apply_copy(&mut self, open: &[(K, Option<(u64, u64)>)]) -> (u64, u64) {
        self.copy_started();
        let delta = self.apply_copy_part(open);
        self.copy_applied();
        delta
    }

    /// The copy is applied: forgets sessions that were in neither it nor the
    /// one before, gone without an end we saw (a lost record), so the
    /// bookkeeping cannot grow without bound. Not after one copy alone: a
    /// session missing from it may have closed just before, its record still
    /// on its way, and forgetting it would count its bytes again at the end.
    pub fn copy_applied(&mut self) {
        self.ended_since_copy = None;
        let copies = self.copies;
        self.counted.retain(|_, c| c.seen + 1 >= copies);
        // A table never shrinks by itself: after 200,000 sessions have come
        // and gone it would keep their room (10 MB) for good.
        if self.counted.capacity() > 4 * self.counted.len().max(1024) {
            self.counted.shrink_to_fit();
        }
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
    fn sessions_missing_from_two_copies_are_forgotten() {
        let mut live = LiveCounts::default();
        assert_eq!(live.apply_copy(&[(1, Some((1, 1))), (2, Some((1, 1))), (3, Some((1, 1)))]), (3, 3));
        // 1 has gone (its record may be on its way), 2 is open but on another
        // interface: kept, not counted.
        assert_eq!(live.apply_copy(&[(2, None), (3, Some((5, 1)))]), (4, 0));
        assert_eq!(live.len(), 3, "1 is kept for one copy");
        // 1's record arrives late: only its rest is added.
        assert_eq!(live.finish(&1, 10, 1), (9, 0));
        assert_eq!(live.apply_copy(&[(2, None)]), (0, 0));
        assert_eq!(live.len(), 2);
        assert_eq!(live.apply_copy(&[(2, None)]), (0, 0));
        assert_eq!(live.len(), 1, "3, in neither of the last two copies, is forgotten");
        assert_eq!(live.advance(&2, 1, 1), (0, 0));
    }

    #[test]
    fn a_session_ended_while_the_copy_was_taken_is_not_counted_again() {
        let mut live = LiveCounts::default();
        live.advance(&1, 100, 0);
        live.copy_started();
        // The copy saw 1 at 150 bytes; before it is applied, 1 ends at 200.
        assert_eq!(live.finish(&1, 200, 0), (100, 0));
        assert_eq!(live.apply_copy_part(&[(1, Some((150, 0)))]), (0, 0));
        assert_eq!(live.apply_copy_part(&[(2, Some((10, 0)))]), (10, 0));
        live.copy_applied();
        assert_eq!(live.len(), 1, "1 is not brought back");
        // Only until that copy: a later end of another session at the same
        // key counts in full.
        assert_eq!(live.finish(&1, 30, 0), (30, 0));
    }
}
