//! Who holds the server's connection slots, and who gives one up when they
//! are all taken. A connection waiting for a request (silent since it was
//! accepted, sending its headers slowly, or idle between requests) for
//! [`EVICTABLE_AFTER`] or more can be closed to make room; one being served
//! or written to cannot. The room goes to the newcomer at the expense of the
//! peer (IP address) holding the most data slots, and never of a peer
//! holding fewer than the newcomer's own: so a client can fill free slots,
//! but when others want them it keeps no more than they do. When no slot can
//! be freed, the newcomer gets one of [`HEALTH_RESERVE`] slots kept for
//! /healthz and /readyz: a data request there waits for a data slot (and is
//! moved to it) or is answered 503.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// Connections served at once for any request ("data slots").
pub const MAX_CONNECTIONS: usize = 256;
/// Further connections admitted when every data slot is held and none can be
/// freed: they are answered on /healthz and /readyz only, so the kubelet's
/// probes get through whatever holds the data slots.
pub const HEALTH_RESERVE: usize = 16;
/// A connection waiting this long for a request may be closed to admit
/// another when the slots are full. A client sends its request within
/// milliseconds of connecting (a TLS handshake within a few round trips).
pub const EVICTABLE_AFTER: Duration = Duration::from_secs(1);

/// One connection's timeline, shared by its task, its stream and the slots:
/// instants as milliseconds since it was accepted, plus one (0: none).
pub struct ConnState {
    opened: Instant,
    /// When it began waiting for a request: accepted, or its last response
    /// handed to hyper. 0 while a request is being handled.
    waiting_since: AtomicU64,
    /// When the head being read began: the accept for the first request,
    /// the first byte for later ones on a kept-alive connection.
    head_since: AtomicU64,
    /// When the last response was handed to hyper to write (0: none yet, or
    /// a request is being handled).
    response_since: AtomicU64,
    /// When writing began to wait for the client to read (0: not waiting).
    write_blocked_since: AtomicU64,
    evicted: Notify,
}

impl ConnState {
    pub fn new(opened: Instant) -> Self {
        ConnState {
            opened,
            waiting_since: AtomicU64::new(1),
            head_since: AtomicU64::new(1),
            response_since: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(0),
            evicted: Notify::new(),
        }
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.opened).as_millis() as u64 + 1
    }

    fn since(&self, mark: &AtomicU64, now: Instant) -> Option<Duration> {
        match mark.load(Ordering::Relaxed) {
            0 => None,
            at => Some(Duration::from_millis(self.ms(now).saturating_sub(at))),
        }
    }

    /// Request bytes arrived: a later request's head starts its deadline.
    pub fn bytes_read(&self, now: Instant) {
        let _ = self.head_since.compare_exchange(0, self.ms(now), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A request's head is parsed: it is being handled.
    pub fn head_parsed(&self) {
        self.head_since.store(0, Ordering::Relaxed);
        self.waiting_since.store(0, Ordering::Relaxed);
        self.response_since.store(0, Ordering::Relaxed);
    }

    /// The response is handed to hyper: the write deadline starts, and the
    /// connection waits for its next request.
    pub fn responded(&self, now: Instant) {
        let at = self.ms(now);
        self.response_since.store(at, Ordering::Relaxed);
        self.waiting_since.store(at, Ordering::Relaxed);
    }

    /// A write had to wait for the client (`true`) or went through (`false`).
    pub fn write_blocked(&self, blocked: bool, now: Instant) {
        if blocked {
            let _ = self.write_blocked_since.compare_exchange(0, self.ms(now), Ordering::Relaxed, Ordering::Relaxed);
        } else {
            self.write_blocked_since.store(0, Ordering::Relaxed);
        }
    }

    /// The request head is not complete `limit` after it began.
    pub fn head_overdue(&self, limit: Duration, now: Instant) -> bool {
        self.since(&self.head_since, now).is_some_and(|d| d > limit)
    }

    /// The last response is not written `limit` after it was ready and the
    /// client is not reading it.
    pub fn write_overdue(&self, limit: Duration, now: Instant) -> bool {
        self.since(&self.write_blocked_since, now).is_some()
            && self.since(&self.response_since, now).is_some_and(|d| d > limit)
    }

    /// Waiting for a request, with nothing left to write, for at least `after`.
    fn evictable(&self, after: Duration, now: Instant) -> bool {
        self.write_blocked_since.load(Ordering::Relaxed) == 0
            && self.since(&self.waiting_since, now).is_some_and(|d| d >= after)
    }

    /// Resolves once the slots closed this connection to admit another.
    pub async fn evicted(&self) {
        self.evicted.notified().await
    }
}

struct Entry {
    peer: IpAddr,
    health_only: bool,
    /// A health-only connection whose data request waits for a data slot:
    /// a slot given back goes to it before any newcomer.
    wants_data: bool,
    conn: Arc<ConnState>,
}

/// The slots and their holders, by admission order (oldest first).
pub struct Slots {
    capacity: usize,
    reserve: usize,
    evictable_after: Duration,
    next_id: u64,
    entries: BTreeMap<u64, Entry>,
}

/// A connection let in: its id, and whether it may only ask for health.
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted {
    pub id: u64,
    pub health_only: bool,
}

impl Default for Slots {
    fn default() -> Self {
        Slots::new(MAX_CONNECTIONS, HEALTH_RESERVE, EVICTABLE_AFTER)
    }
}

impl Slots {
    pub fn new(capacity: usize, reserve: usize, evictable_after: Duration) -> Self {
        Slots { capacity, reserve, evictable_after, next_id: 0, entries: BTreeMap::new() }
    }

    fn count(&self, health_only: bool) -> usize {
        self.entries.values().filter(|e| e.health_only == health_only).count()
    }

    /// Data slots taken, counting those promised to waiting health-only
    /// connections.
    fn data_held(&self) -> usize {
        self.entries.values().filter(|e| !e.health_only || e.wants_data).count()
    }

    /// Whether a connection accepted now would be turned away: every slot,
    /// reserve included, held, and none of them can be freed yet. The accept
    /// loop then leaves connections in the listen backlog.
    pub fn stuck(&self, now: Instant) -> bool {
        self.entries.len() >= self.capacity + self.reserve
            && !self.entries.values().any(|e| e.conn.evictable(self.evictable_after, now))
    }

    /// Lets a connection from `peer` in, closing another to make room if
    /// needed (see the module's rules); `None`: no room (close it).
    pub fn admit(&mut self, peer: IpAddr, conn: Arc<ConnState>, now: Instant) -> Option<Admitted> {
        let health_only = if self.data_held() < self.capacity || self.evict_for(peer, now) {
            false
        } else if self.count(true) < self.reserve || self.evict_oldest_health_only(now) {
            true
        } else {
            return None;
        };
        let id = self.next_id;
        self.next_id += 1;
        self.entries.insert(id, Entry { peer, health_only, wants_data: false, conn });
        Some(Admitted { id, health_only })
    }

    /// Moves a health-only connection to a data slot, freeing one if the
    /// rules allow; false if none can be had now.
    pub fn promote(&mut self, id: u64, now: Instant) -> bool {
        let Some(peer) = self.entries.get(&id).filter(|e| e.health_only).map(|e| e.peer) else {
            return self.entries.contains_key(&id);
        };
        let promoted = self.count(false) < self.capacity || self.evict_for(peer, now);
        // (Its own `wants_data` counts in `data_held`, not here.)
        let entry = self.entries.get_mut(&id).expect("checked above");
        entry.health_only = !promoted;
        entry.wants_data = !promoted;
        promoted
    }

    /// The connection ended (or was closed by the slots already). A data slot
    /// given back goes to the oldest health-only connection waiting for one.
    pub fn release(&mut self, id: u64) {
        let freed = self.entries.remove(&id).is_some_and(|e| !e.health_only);
        if let Some(waiting) = self.entries.values_mut().find(|e| e.wants_data).filter(|_| freed) {
            waiting.health_only = false;
            waiting.wants_data = false;
        }
    }

    /// Closes a data connection for a newcomer from `peer`: a waiting one of
    /// the peer holding the most data slots among those holding more than
    /// `peer` does, or `peer`'s own; the oldest of that peer's. False if
    /// there is none.
    fn evict_for(&mut self, peer: IpAddr, now: Instant) -> bool {
        let mut held: HashMap<IpAddr, usize> = HashMap::new();
        for e in self.entries.values().filter(|e| !e.health_only) {
            *held.entry(e.peer).or_default() += 1;
        }
        let own = held.get(&peer).copied().unwrap_or(0);
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| !e.health_only && (e.peer == peer || held[&e.peer] > own))
            .filter(|(_, e)| e.conn.evictable(self.evictable_after, now))
            // The most slots held first; among one peer's, the oldest
            // (smallest id; `min_by_key` keeps the first of equals).
            .min_by_key(|(id, e)| (std::cmp::Reverse(held[&e.peer]), **id))
            .map(|(id, _)| *id);
        victim.is_some_and(|id| self.evict(id))
    }

    fn evict_oldest_health_only(&mut self, now: Instant) -> bool {
        let victim = self
            .entries
            .iter()
            .find(|(_, e)| e.health_only && e.conn.evictable(self.evictable_after, now))
            .map(|(id, _)| *id);
        victim.is_some_and(|id| self.evict(id))
    }

    fn evict(&mut self, id: u64) -> bool {
        let entry = self.entries.remove(&id).expect("a present id");
        tracing::debug!(peer = %entry.peer, "metrics server: closing a waiting connection to admit another");
        entry.conn.evicted.notify_one();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const C: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 3));

    fn conn(at: Instant) -> Arc<ConnState> {
        Arc::new(ConnState::new(at))
    }

    fn held(slots: &Slots, peer: IpAddr) -> usize {
        slots.entries.values().filter(|e| e.peer == peer && !e.health_only).count()
    }

    #[test]
    fn a_client_keeps_no_more_than_others_once_they_want_slots() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_secs(2);
        let mut slots = Slots::new(8, 2, Duration::from_secs(1));
        // A alone fills every data slot with silent connections.
        let a: Vec<_> = (0..8).map(|_| slots.admit(A, conn(t0), t0).unwrap()).collect();
        assert!(a.iter().all(|s| !s.health_only));
        // B and C arrive: A's oldest waiting connections give way.
        for (n, peer) in [B, C, B, C, B, C].into_iter().enumerate() {
            let admitted = slots.admit(peer, conn(later), later).unwrap();
            assert!(!admitted.health_only, "newcomer {n} got a data slot");
        }
        assert_eq!((held(&slots, A), held(&slots, B), held(&slots, C)), (2, 3, 3));
        assert!(!slots.entries.contains_key(&a[0].id) && slots.entries.contains_key(&a[7].id), "oldest first");
        // B now holds the most: another B replaces B's own oldest (once
        // waiting long enough), never A's or C's.
        let much_later = later + Duration::from_secs(2);
        slots.admit(B, conn(much_later), much_later).unwrap();
        assert_eq!((held(&slots, A), held(&slots, B), held(&slots, C)), (2, 3, 3));
        // A, holding fewer, takes from the largest holders.
        slots.admit(A, conn(much_later), much_later).unwrap();
        assert_eq!(held(&slots, A), 3);
        assert_eq!(held(&slots, B) + held(&slots, C), 5);
    }

    #[test]
    fn busy_or_fresh_connections_are_not_closed_and_health_has_a_reserve() {
        let t0 = Instant::now();
        let mut slots = Slots::new(4, 2, Duration::from_secs(1));
        // A holds every data slot with requests being handled (or written).
        let conns: Vec<_> = (0..4).map(|_| conn(t0)).collect();
        for c in &conns {
            slots.admit(A, c.clone(), t0).unwrap();
            c.head_parsed();
        }
        let soon = t0 + Duration::from_secs(5);
        conns[0].responded(t0);
        conns[0].write_blocked(true, t0);
        // B gets a health-only slot; so does the next; then nothing.
        let b = slots.admit(B, conn(soon), soon).unwrap();
        assert!(b.health_only);
        assert!(slots.admit(B, conn(soon), soon).unwrap().health_only);
        assert!(slots.stuck(soon), "reserve connections are fresh");
        assert_eq!(slots.admit(C, conn(soon), soon), None);
        // A silent reserve connection gives way after the threshold.
        let later = soon + Duration::from_secs(1);
        let c = slots.admit(C, conn(later), later).unwrap();
        assert!(c.health_only);
        assert!(!slots.entries.contains_key(&b.id));
        // One of A's requests is answered and written: the connection waits
        // for another request, and a health-only one moves to its slot.
        conns[1].responded(later);
        assert!(!slots.promote(c.id, later), "A's connection only just went idle");
        assert!(slots.promote(c.id, later + Duration::from_secs(1)));
        assert_eq!(held(&slots, C), 1);
        assert_eq!(held(&slots, A), 3);
        // A freed slot is taken without closing anyone.
        slots.release(c.id);
        let d = slots.admit(C, conn(later), later).unwrap();
        assert!(!d.health_only);
        // Full again, with a health-only connection waiting for a data slot:
        // the next slot given back goes to it, not to a newcomer.
        let e = slots.admit(C, conn(later), later).unwrap();
        assert!(e.health_only);
        assert!(!slots.promote(e.id, later), "every data connection is busy or fresh");
        slots.release(d.id);
        assert!(slots.admit(B, conn(later), later).unwrap().health_only, "the freed slot is promised");
        assert!(slots.promote(e.id, later), "and given to the waiting one");
        assert_eq!(held(&slots, C), 1);
    }

    #[test]
    fn deadlines_run_from_accept_then_from_the_first_byte_and_writes_have_one() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        let c = ConnState::new(t0);
        let limit = Duration::from_secs(10);
        // Silent since accept: overdue 10 s after it, bytes or not.
        c.bytes_read(at(9_000));
        assert!(!c.head_overdue(limit, at(9_500)));
        assert!(c.head_overdue(limit, at(10_100)));
        c.head_parsed();
        assert!(!c.head_overdue(Duration::ZERO, at(60_000)), "request parsed");
        c.responded(at(11_000));
        // Idle between requests: no head deadline until the next byte.
        assert!(!c.head_overdue(limit, at(100_000)));
        c.bytes_read(at(100_000));
        assert!(c.head_overdue(limit, at(110_100)));
        assert!(!c.write_overdue(limit, at(30_000)), "written out");
        // A response the client does not read: overdue 10 s after it was ready.
        c.head_parsed();
        c.responded(at(120_000));
        c.write_blocked(true, at(120_001));
        assert!(!c.write_overdue(limit, at(129_000)));
        assert!(c.write_overdue(limit, at(130_100)));
        c.write_blocked(false, at(130_200));
        assert!(!c.write_overdue(limit, at(130_300)), "the client read it");
    }
}
