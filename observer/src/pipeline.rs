//! From the kernel to metrics: closed TCP sessions from the ring buffer, UDP
//! flows ended by release or idle timeout, live throughput of open sessions at
//! every scrape, and the kernel's lost-data counters.
use std::{
    collections::HashSet,
    hash::Hash,
    mem::size_of,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, IterableMap, MapData, MapError, PerCpuArray, RingBuf},
};
use observer_common::{
    LOST_SOURCES as KERNEL_LOST_SOURCES, SessionRecord, SessionStart, UDP_FLOW_CONNECTED, UdpFlow, UdpFlowKey,
    UdpRelease,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};

use crate::{
    drops::DropCounters,
    enrich::Enricher,
    error::Error,
    iface_stats::InterfaceStats,
    live::LiveCounts,
    metrics::{LOST_SOURCES, Metrics},
    session::{Direction, IfaceFilter, Protocol, Session},
    session_log::SessionLog,
};

/// Settings of the pipeline, from the command line.
pub struct PipelineConfig {
    pub filter: IfaceFilter,
    pub min_session_bytes: u64,
    pub udp_idle_timeout: Duration,
    pub session_log: Option<SessionLog>,
    /// Interfaces selected with --iface, whose device counters are exported.
    pub ifaces: Vec<String>,
    pub enricher: Enricher,
}

/// The maps userspace reads, taken out of the loaded object.
pub struct KernelMaps {
    pub lost: PerCpuArray<MapData, u64>,
    pub open_sessions: BpfHashMap<MapData, u64, SessionStart>,
    pub udp_flows: BpfHashMap<MapData, UdpFlowKey, UdpFlow>,
    pub drops: DropCounters,
}

pub struct Pipeline {
    metrics: Arc<Metrics>,
    filter: IfaceFilter,
    min_session_bytes: u64,
    udp_idle_timeout: Duration,
    state: Mutex<State>,
}

/// Everything the tasks share; one lock, held briefly, so a TCP close, a UDP
/// release, an expiry pass and a scrape never count the same bytes twice.
struct State {
    maps: KernelMaps,
    lost_seen: [u64; KERNEL_LOST_SOURCES as usize],
    /// TCP sessions by (socket address, birth time): an address is reused by
    /// later sockets, the pair is not.
    tcp_live: LiveCounts<(u64, u64)>,
    /// UDP flows by (flow key, first datagram time), for the same reason.
    udp_live: LiveCounts<(UdpFlowKey, u64)>,
    session_log: Option<SessionLog>,
    iface_stats: InterfaceStats,
    enricher: Enricher,
}

impl Pipeline {
    pub fn new(metrics: Arc<Metrics>, config: PipelineConfig, maps: KernelMaps) -> Self {
        Pipeline {
            metrics,
            filter: config.filter,
            min_session_bytes: config.min_session_bytes,
            udp_idle_timeout: config.udp_idle_timeout,
            state: Mutex::new(State {
                maps,
                lost_seen: [0; KERNEL_LOST_SOURCES as usize],
                tcp_live: LiveCounts::default(),
                udp_live: LiveCounts::default(),
                session_log: config.session_log,
                iface_stats: InterfaceStats::new(config.ifaces),
                enricher: config.enricher,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough counters;
        // keep measuring rather than stop.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reads closed TCP sessions, a batch per wake-up, until `stop`; then
    /// reads what is left in the ring and returns.
    pub async fn run_tcp(&self, ring: RingBuf<MapData>, stop: Stop) -> Result<(), Error> {
        drain_until_stopped(ring, stop, |bytes| self.tcp_closed(bytes)).await
    }

    /// Reads UDP socket releases until `stop`, then what is left.
    pub async fn run_udp_releases(&self, ring: RingBuf<MapData>, stop: Stop) -> Result<(), Error> {
        drain_until_stopped(ring, stop, |bytes| match read_pod::<UdpRelease>(bytes) {
            Some(release) => self.udp_released(release),
            None => self.metrics.lost("session_record_malformed", 1),
        })
        .await
    }

    /// Ends idle UDP flows, checking a few times per timeout (at most once a
    /// second, at least every 100 ms), until `stop`. Flows still open then
    /// are not reported: they have not ended.
    pub async fn run_udp_expiry(&self, mut stop: Stop) -> Result<(), Error> {
        let period = (self.udp_idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.expire_udp(monotonic_ns()),
                _ = stop.stopped() => return Ok(()),
            }
        }
    }

    fn tcp_closed(&self, bytes: &[u8]) {
        let Some(record) = read_pod::<SessionRecord>(bytes) else {
            self.metrics.lost("session_record_malformed", 1);
            return;
        };
        let session = Session::from_record(&record);
        let mut state = self.state();
        let key = (record.sock, record.birth_ns);
        if !self.filter.accepts(&session) {
            state.tcp_live.finish(&key, 0, 0);
            self.metrics.record_ignored("iface");
            return;
        }
        let live = (
            session.bytes_transmitted.saturating_sub(record.live_base_tx),
            session.bytes_received.saturating_sub(record.live_base_rx),
        );
        let rest = state.tcp_live.finish(&key, live.0, live.1);
        self.add_live(Protocol::Tcp, rest);
        self.report(&mut state, &session);
    }

    fn udp_released(&self, release: UdpRelease) {
        let mut state = self.state();
        let flows = snapshot(&state.maps.udp_flows);
        for (key, flow) in flows.into_iter().filter(|(k, _)| k.sk == release.sk) {
            self.end_udp_flow(&mut state, &key, &flow, Some(release.release_ns));
        }
    }

    fn expire_udp(&self, now_ns: u64) {
        let timeout = self.udp_idle_timeout.as_nanos() as u64;
        let mut state = self.state();
        let flows = snapshot(&state.maps.udp_flows);
        for (key, flow) in flows {
            let idle = now_ns.saturating_sub(flow.last_ns) > timeout;
            if idle && flow.flags & UDP_FLOW_CONNECTED == 0 {
                self.end_udp_flow(&mut state, &key, &flow, None);
            }
        }
    }

    /// Deletes the flow from the kernel's table and reports it. The final
    /// values are read again after the delete decision, so a datagram counted
    /// between the snapshot and now is not lost.
    fn end_udp_flow(&self, state: &mut State, key: &UdpFlowKey, flow: &UdpFlow, end_ns: Option<u64>) {
        let last = state.maps.udp_flows.get(key, 0).unwrap_or(*flow);
        if let Err(e) = state.maps.udp_flows.remove(key)
            && !matches!(e, MapError::KeyNotFound)
        {
            tracing::warn!(error = %e, "cannot delete an ended UDP flow");
        }
        let session = Session::from_udp_flow(key, &last, end_ns);
        let live_key = (*key, last.first_ns);
        if !self.filter.accepts(&session) {
            state.udp_live.finish(&live_key, 0, 0);
            self.metrics.record_ignored("iface");
            return;
        }
        let rest = state.udp_live.finish(&live_key, last.bytes_tx, last.bytes_rx);
        self.add_live(Protocol::Udp, rest);
        self.report(state, &session);
    }

    fn report(&self, state: &mut State, session: &Session) {
        let labels = state.enricher.label(session, Instant::now(), |label| self.metrics.label_overflow(label));
        self.metrics.record(session, &labels, self.min_session_bytes);
        if let Some(log) = &mut state.session_log {
            log.write(session, &state.enricher.names(), &labels);
        }
    }

    fn add_live(&self, protocol: Protocol, (tx, rx): (u64, u64)) {
        self.metrics.add_live(protocol, Direction::Transmit, tx);
        self.metrics.add_live(protocol, Direction::Receive, rx);
    }

    /// Brings kernel-side counters into the metrics: called at every scrape.
    pub fn refresh(&self) {
        let mut state = self.state();
        self.sync_lost(&mut state);
        self.sweep_live(&mut state);
        state.maps.drops.sync(&self.filter, &self.metrics);
        state.iface_stats.sync(&self.metrics);
        for expired in state.enricher.expire(Instant::now()) {
            self.metrics.remove_session_series(&expired);
        }
    }

    fn sync_lost(&self, state: &mut State) {
        let State { maps, lost_seen, .. } = state;
        for (index, seen) in lost_seen.iter_mut().enumerate() {
            let Ok(values) = maps.lost.get(&(index as u32), 0) else { continue };
            let total: u64 = values.iter().sum();
            if total > *seen {
                self.metrics.lost(LOST_SOURCES[index], total - *seen);
                *seen = total;
            }
        }
    }

    /// Adds what open sessions moved since the last scrape.
    fn sweep_live(&self, state: &mut State) {
        let sessions = snapshot(&state.maps.open_sessions);
        let capacity = map_capacity(&state.maps.open_sessions);
        self.metrics.telemetry.map_usage("open_sessions", sessions.len(), capacity);
        let mut alive = HashSet::with_capacity(sessions.len());
        for (sk, s) in &sessions {
            let key = (*sk, s.birth_ns);
            alive.insert(key);
            if self.filter.accepts_interfaces(s.netns_ino, s.rx_ifindex, s.tx_ifindex) {
                let moved = (s.live_tx.saturating_sub(s.live_base_tx), s.live_rx.saturating_sub(s.live_base_rx));
                let delta = state.tcp_live.advance(&key, moved.0, moved.1);
                self.add_live(Protocol::Tcp, delta);
            }
        }
        state.tcp_live.retain(|k| alive.contains(k));

        let flows = snapshot(&state.maps.udp_flows);
        self.metrics.telemetry.map_usage("udp_flows", flows.len(), map_capacity(&state.maps.udp_flows));
        let mut alive = HashSet::with_capacity(flows.len());
        for (key, f) in &flows {
            let live_key = (*key, f.first_ns);
            alive.insert(live_key);
            if self.filter.accepts_namespace(f.netns_ino) {
                let delta = state.udp_live.advance(&live_key, f.bytes_tx, f.bytes_rx);
                self.add_live(Protocol::Udp, delta);
            }
        }
        state.udp_live.retain(|k| alive.contains(k));
    }
}

/// Tells the readers to finish: at shutdown, once the kernel programs are
/// detached, so that nothing is added to the rings after their last read.
#[derive(Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// The signal and the handle that raises it.
    pub fn new() -> (watch::Sender<bool>, Stop) {
        let (tx, rx) = watch::channel(false);
        (tx, Stop(rx))
    }

    /// Resolves once stop is raised (or its sender is gone).
    async fn stopped(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// How often the ring readers drain without a wake-up while records keep
/// coming. The kernel wakes the session reader only when its ring is a
/// quarter full (observer-ebpf's `on_close`), so in steady state records are
/// read in batches at this period: a burst of short connections costs one
/// wake-up per batch instead of one per session.
pub const RING_POLL: Duration = Duration::from_millis(25);
/// The longest period between drains: after drains that found nothing the
/// period doubles up to this, so an idle observer wakes a few times a second,
/// and the first session after a quiet spell is reported within it.
pub const RING_POLL_IDLE: Duration = Duration::from_millis(250);

/// Reads a ring buffer and hands each record to `handle`, on wake-ups and
/// every [`RING_POLL`] to [`RING_POLL_IDLE`], until `stop`; then reads what
/// is left and returns.
async fn drain_until_stopped(
    ring: RingBuf<MapData>,
    mut stop: Stop,
    mut handle: impl FnMut(&[u8]),
) -> Result<(), Error> {
    // SAFETY: the AsyncFd owns the ring buffer, so the descriptor stays open
    // for as long as it is registered.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| Error::Ring(e.into_parts().1))?;
    let mut period = RING_POLL;
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard.map_err(Error::Ring)?;
                // Readiness is cleared before draining, not after: a record
                // committed after the drain's last read wakes the fd, and
                // that wake must not be cleared away. Found by the benchmark:
                // a few sessions of each burst went uncounted.
                guard.clear_ready();
                drain(guard.get_inner_mut(), &mut handle);
                period = RING_POLL;
            }
            _ = tokio::time::sleep(period) => {
                let read = drain(fd.get_mut(), &mut handle);
                period = if read > 0 { RING_POLL } else { (period * 2).min(RING_POLL_IDLE) };
            }
            _ = stop.stopped() => {
                let _ = drain(fd.get_mut(), &mut handle);
                return Ok(());
            }
        }
    }
}

/// Hands every record in the ring to `handle`; returns how many there were.
fn drain(ring: &mut RingBuf<MapData>, handle: &mut impl FnMut(&[u8])) -> usize {
    let mut read = 0;
    while let Some(item) = ring.next() {
        handle(&item);
        read += 1;
    }
    read
}

fn read_pod<T: Pod>(bytes: &[u8]) -> Option<T> {
    // SAFETY: the length is checked; T is plain old data and read_unaligned
    // makes no alignment assumption about the ring's bytes.
    (bytes.len() >= size_of::<T>()).then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) })
}

/// A copy of a kernel hash map's entries. Keys deleted while we walk make the
/// kernel restart the walk, so keys are de-duplicated and the walk is bounded
/// by the map's capacity.
fn snapshot<K: Pod + Eq + Hash, V: Pod>(map: &BpfHashMap<MapData, K, V>) -> Vec<(K, V)> {
    let cap = map_capacity(map);
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for key in map.keys().take(2 * cap) {
        let Ok(key) = key else { break };
        if seen.insert(key)
            && let Ok(value) = map.get(&key, 0)
        {
            out.push((key, value));
        }
    }
    out
}

fn map_capacity<K: Pod, V: Pod>(map: &BpfHashMap<MapData, K, V>) -> usize {
    // The kernel's own answer; the declared default if it cannot say.
    map.map().info().map_or(65_536, |info| info.max_entries() as usize)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
