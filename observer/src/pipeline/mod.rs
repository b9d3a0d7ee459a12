//! From the kernel to metrics: closed TCP sessions from the ring buffer, UDP
//! flows ended by release or idle timeout, live throughput of open sessions at
//! every scrape, drops and interface counters, and the kernel's lost-data
//! counters. Each closed session is labelled by [`crate::enrich`] and recorded
//! in [`crate::metrics`].
//!
//! Layer: above kernel, enrich and metrics, which it drives; below gpu, server
//! and cli, which must not be imported from here.
pub mod drops;
pub mod iface_stats;
pub mod interfaces;
pub mod live;
pub mod memory;
pub mod session_log;

use std::{
    hash::Hash,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, RingBuf},
};
use observer_common::{
    LOST_SOURCES as KERNEL_LOST_SOURCES, SESSION_CLOSE_MISSED, SessionRecord, SessionStart, UDP_FLOW_CONNECTED,
    UdpFlow, UdpFlowKey, UdpRelease, UdpSocketFlows,
};
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::watch;

use crate::{
    enrich::Enricher,
    error::Error,
    kernel::{state::SocketProbe, table_copy},
    metrics::{LOST_SOURCES, Metrics},
    pipeline::drops::DropCounters,
    pipeline::iface_stats::InterfaceStats,
    pipeline::live::LiveCounts,
    pipeline::session_log::SessionLog,
    session::{Direction, IfaceFilter, Protocol, Session},
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
    /// Read only to find sockets whose release will never be reported.
    pub udp_sockets: BpfHashMap<MapData, u64, UdpSocketFlows>,
    pub drops: DropCounters,
}

pub struct Pipeline {
    metrics: Arc<Metrics>,
    filter: IfaceFilter,
    min_session_bytes: u64,
    udp_idle_timeout: Duration,
    /// The kernel's session and flow tables. Every operation on them (copy,
    /// lookup, take) goes through the map's descriptor and needs no lock:
    /// a scrape copies them while the readers keep reading.
    open_sessions: BpfHashMap<MapData, u64, SessionStart>,
    udp_flows: BpfHashMap<MapData, UdpFlowKey, UdpFlow>,
    udp_sockets: BpfHashMap<MapData, u64, UdpSocketFlows>,
    /// Lock order: `refresh`, then `udp`, then `state`; each held briefly
    /// except `refresh`, which no reader takes.
    refresh: Mutex<Refresh>,
    udp: Mutex<UdpLive>,
    state: Mutex<State>,
}

/// What only a scrape's refresh uses: held for a whole refresh, so two never
/// run at once, and taken by nothing else. The ring readers and the UDP expiry
/// never wait for it (a scrape used to walk the tables under the lock the UDP
/// release reader needed, and releases piled up in their ring meanwhile).
struct Refresh {
    lost: PerCpuArray<MapData, u64>,
    lost_seen: [u64; KERNEL_LOST_SOURCES as usize],
    drops: DropCounters,
    iface_stats: InterfaceStats,
}

/// What the UDP release reader, the UDP expiry and the scrape share; held for
/// one flow's end or a part of a scrape's copy, never for a copy of a table.
struct UdpLive {
    /// UDP flows by (flow key, first datagram time): a flow key is reused by
    /// later flows, the pair is not. A flow ended while a scrape's copy was
    /// being taken is left out of that copy (`LiveCounts::copy_started`), so
    /// a release, an expiry pass and a scrape never count the same bytes twice.
    live: LiveCounts<(UdpFlowKey, u64)>,
    /// When `expire_udp` last looked for idle connected flows whose socket is
    /// gone from `UDP_SOCKETS` (monotonic ns).
    orphans_checked_ns: u64,
}

/// What every ended session needs; held briefly (one record, one flow, or
/// [`APPLY_PART`] sessions of a scrape's copy of the open ones).
struct State {
    /// TCP sessions by (socket address, birth time), for the same reason as
    /// `UdpLive::live`. The scrape copies the open sessions without this lock
    /// and applies the copy under it a part at a time
    /// (`LiveCounts::copy_started`), so a close read meanwhile is not counted
    /// twice.
    tcp_live: LiveCounts<(u64, u64)>,
    session_log: Option<SessionLog>,
    enricher: Enricher,
    /// Sessions whose labels wait for a walk of the cgroup tree
    /// (`Enricher::ready`), at most `MAX_WAITING`, and the walks done when
    /// they were last looked at.
    waiting: Vec<Session>,
    waiting_walks: u64,
}

impl Pipeline {
    pub fn new(metrics: Arc<Metrics>, config: PipelineConfig, maps: KernelMaps) -> Self {
        let KernelMaps { lost, open_sessions, udp_flows, udp_sockets, drops } = maps;
        Pipeline {
            metrics,
            filter: config.filter,
            min_session_bytes: config.min_session_bytes,
            udp_idle_timeout: config.udp_idle_timeout,
            open_sessions,
            udp_flows,
            udp_sockets,
            refresh: Mutex::new(Refresh {
                lost,
                lost_seen: [0; KERNEL_LOST_SOURCES as usize],
                drops,
                iface_stats: InterfaceStats::new(config.ifaces),
            }),
            udp: Mutex::new(UdpLive { live: LiveCounts::default(), orphans_checked_ns: 0 }),
            state: Mutex::new(State {
                tcp_live: LiveCounts::default(),
                session_log: config.session_log,
                enricher: config.enricher,
                waiting: Vec::new(),
                waiting_walks: 0,
            }),
        }
    }

    fn udp(&self) -> MutexGuard<'_, UdpLive> {
        self.udp.lock()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Reads closed TCP sessions, a batch per wake-up, until `stop`; then
    /// reads what is left in the ring and returns.
    pub async fn run_tcp(self: Arc<Self>, ring: RingBuf<MapData>, stop: Stop) -> Result<(), Error> {
        let after = self.clone();
        read_until_stopped(ring, stop, move |bytes| self.tcp_closed(bytes), move |last| after.after_batch(last)).await
    }

    /// Reads UDP socket releases until `stop`, then what is left.
    pub async fn run_udp_releases(self: Arc<Self>, ring: RingBuf<MapData>, stop: Stop) -> Result<(), Error> {
        let after = self.clone();
        read_until_stopped(
            ring,
            stop,
            move |bytes| match read_pod::<UdpRelease>(bytes) {
                Some(release) => self.udp_released(release),
                None => self.metrics.lost("session_record_malformed", 1),
            },
            move |last| after.after_batch(last),
        )
        .await
    }

    /// After each batch a ring reader handled (every `RING_POLL` to
    /// `RING_POLL_IDLE`): sessions whose labels waited for a walk that is
    /// done now are reported; at the `last` one, at shutdown, all of them,
    /// with what is known.
    fn after_batch(&self, last: bool) {
        let mut state = self.state();
        if last {
            let waiting = std::mem::take(&mut state.waiting);
            for session in &waiting {
                self.record(&mut state, session);
            }
        } else {
            self.report_waiting(&mut state);
        }
    }

    /// Ends idle UDP flows, checking four times per timeout (every 100 ms to
    /// 5 s), until `stop`. Flows still open then are not reported: they have
    /// not ended. Each check copies the whole flow table (about 5 ms of CPU
    /// per 10,000 flows on the benchmark's VM), so at the default 30 s it runs
    /// every 5 s rather than every second; a flow then ends up to a quarter of
    /// the timeout late, which its reported lifetime (first to last datagram)
    /// does not show.
    pub async fn run_udp_expiry(self: Arc<Self>, mut stop: Stop) -> Result<(), Error> {
        let period = (self.udp_idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // Copies the flow table (milliseconds per 10,000
                    // flows): off the async workers.
                    let pipeline = self.clone();
                    let _ = tokio::task::spawn_blocking(move || pipeline.expire_udp(monotonic_ns())).await;
                }
                _ = stop.stopped() => return Ok(()),
            }
        }
    }

    fn tcp_closed(&self, bytes: &[u8]) {
        match read_pod::<SessionRecord>(bytes) {
            Some(record) => self.tcp_record(&record),
            None => self.metrics.lost("session_record_malformed", 1),
        }
    }

    fn tcp_record(&self, record: &SessionRecord) {
        let session = Session::from_record(record);
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
        let end = Some(release.release_ns);
        if release.taken != 0 {
            // The socket's one flow, which the kernel took out of its table
            // at the release. Walking the flow table instead cost a copy of
            // every flow per release: with a resolver's thousands of one-query
            // sockets per second beside tens of thousands of flows, more than
            // the reader could ever do.
            self.report_udp_flow(&release.flows.first, &release.flow, end);
        } else if release.flows.many != 0 {
            let keys = table_copy::copy_as(&self.udp_flows, |key, _| Some(key));
            for key in keys.iter().filter(|k| k.sk == release.sk) {
                self.end_udp_flow(key, end);
            }
        }
        // One flow, not taken: it had ended already (idle), or the expiry
        // took it out as the release ran and reported it.
    }

    /// Ends unconnected flows idle for longer than the timeout. A connected
    /// flow lasts until its socket's release, however quiet; but a release
    /// the observer will never hear of (its ring was full, or its socket was
    /// left out of a full `UDP_SOCKETS`) would keep it in the table for good.
    /// So, once per timeout, an idle connected flow whose socket is not in
    /// `UDP_SOCKETS` ends too: one lookup per such flow, not per pass, for a
    /// node with many quiet long-lived sockets.
    fn expire_udp(&self, now_ns: u64) {
        let timeout = self.udp_idle_timeout.as_nanos() as u64;
        let check_orphans = {
            let mut udp = self.udp();
            let due = now_ns.saturating_sub(udp.orphans_checked_ns) >= timeout;
            if due {
                udp.orphans_checked_ns = now_ns;
            }
            due
        };
        let flows = table_copy::copy(&self.udp_flows);
        for (key, flow) in flows {
            if now_ns.saturating_sub(flow.last_ns) <= timeout {
                continue;
            }
            let ended = flow.flags & UDP_FLOW_CONNECTED == 0
                || (check_orphans && matches!(self.udp_sockets.get(&key.sk, 0), Err(MapError::KeyNotFound)));
            if ended {
                self.end_udp_flow(&key, None);
            }
        }
    }

    /// Takes the flow out of the kernel's table and reports it, with its
    /// values as the delete found them, so a datagram counted since a copy of
    /// the table was made is not lost. A flow no longer in the table is not
    /// reported: whoever took it out (a release, the expiry) did. The take
    /// is atomic in the kernel, so two enders never both get the flow.
    fn end_udp_flow(&self, key: &UdpFlowKey, end_ns: Option<u64>) {
        match table_copy::take(&self.udp_flows, key) {
            Ok(Some(last)) => self.report_udp_flow(key, &last, end_ns),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot take an ended UDP flow out of the kernel's table"),
        }
    }

    /// Reports a UDP flow taken out of the kernel's table.
    fn report_udp_flow(&self, key: &UdpFlowKey, last: &UdpFlow, end_ns: Option<u64>) {
        let session = Session::from_udp_flow(key, last, end_ns);
        let live_key = (*key, last.first_ns);
        if !self.filter.accepts(&session) {
            self.udp().live.finish(&live_key, 0, 0);
            self.metrics.record_ignored("iface");
            return;
        }
        let rest = self.udp().live.finish(&live_key, last.bytes_tx, last.bytes_rx);
        self.add_live(Protocol::Udp, rest);
        self.report(&mut self.state(), &session);
    }

    /// Labels and records a session, unless its labels wait for a walk of
    /// the cgroup tree (a cgroup created since the last one): then it waits,
    /// off the reader's path, and is recorded once the walk is done. With
    /// `MAX_WAITING` sessions waiting already, it is recorded at once
    /// without its workload labels, and counted.
    fn report(&self, state: &mut State, session: &Session) {
        self.report_waiting(state);
        if state.enricher.ready(session) {
            self.record(state, session);
        } else if state.waiting.len() < MAX_WAITING {
            state.waiting.push(session.clone());
        } else {
            self.metrics.lost("session_labels_behind", 1);
            self.record(state, session);
        }
    }

    /// Records the waiting sessions a walk done since the last look has
    /// made ready.
    fn report_waiting(&self, state: &mut State) {
        let walks = state.enricher.walks();
        if state.waiting.is_empty() || walks == state.waiting_walks {
            return;
        }
        state.waiting_walks = walks;
        let waiting = std::mem::take(&mut state.waiting);
        for session in waiting {
            if state.enricher.ready(&session) {
                self.record(state, &session);
            } else {
                state.waiting.push(session);
            }
        }
    }

    fn record(&self, state: &mut State, session: &Session) {
        let labels = state.enricher.label(session, Instant::now(), |label| self.metrics.label_overflow(label));
        self.metrics.record(session, &labels, self.min_session_bytes);
        if let Some(log) = &state.session_log {
            log.write(session, &state.enricher.names(), &labels);
        }
    }

    fn add_live(&self, protocol: Protocol, (tx, rx): (u64, u64)) {
        self.metrics.add_live(protocol, Direction::Transmit, tx);
        self.metrics.add_live(protocol, Direction::Receive, rx);
    }

    /// Brings kernel-side counters into the metrics: called at every scrape
    /// that does not reuse a recent refresh (`server::scrape`). One at a time
    /// (a second waits for the first); the ring readers and the UDP expiry
    /// never wait for a whole refresh, only for the brief holds of its parts.
    pub fn refresh(&self) {
        let mut refresh = self.refresh.lock();
        self.sync_lost(&mut refresh);
        self.sweep_tcp(true);
        self.sweep_udp(true);
        let Refresh { drops, iface_stats, .. } = &mut *refresh;
        drops.sync(&self.filter, &self.metrics);
        iface_stats.sync(&self.metrics);
        drop(refresh);
        let mut state = self.state();
        self.report_waiting(&mut state);
        if let Some(lost) = state.session_log.as_ref().map(SessionLog::take_lost).filter(|&n| n > 0) {
            self.metrics.lost("session_log_line", lost);
        }
        for expired in state.enricher.expire(Instant::now()) {
            self.metrics.remove_session_series(&expired);
        }
    }

    /// At shutdown, after the last `refresh`: the session log's writer
    /// writes what is queued, waited for at most `wait`.
    pub fn close_session_log(&self, wait: Duration) {
        let Some(log) = self.state().session_log.take() else { return };
        if !log.close(wait) {
            tracing::warn!(?wait, "the session log's writer did not finish in time; its queued lines are lost");
        }
    }

    fn sync_lost(&self, refresh: &mut Refresh) {
        let Refresh { lost, lost_seen, .. } = refresh;
        for (index, seen) in lost_seen.iter_mut().enumerate() {
            let Ok(values) = lost.get(&(index as u32), 0) else { continue };
            let total: u64 = values.iter().sum();
            if total > *seen {
                self.metrics.lost(LOST_SOURCES[index], total - *seen);
                *seen = total;
            }
        }
    }

    /// Adds what open TCP sessions moved since the last scrape. The table is
    /// copied without `state`'s lock, which the session reader takes for every
    /// record: a copy of 200,000 sessions made under it kept the reader away
    /// from its ring for over a second, and a burst of closes meanwhile
    /// overflowed the ring (found with 100,000 connections closed at once
    /// while /metrics was scraped: 125,641 of 200,000 records lost).
    ///
    /// `count`: false at a start that reuses pinned tables (`prime_live`).
    fn sweep_tcp(&self, count: bool) {
        self.state().tcp_live.copy_started();
        let mut reported = 0;
        let open = table_copy::copy_as(&self.open_sessions, |sk, s| {
            if s.reported() {
                // Ended, its bytes in its record: not an open session. The
                // kernel deletes it (see `session_mark::REPORTED`); a delete
                // from here could take a new session's entry at the same key.
                reported += 1;
                return None;
            }
            let counted = self.filter.accepts_interfaces(s.netns_ino, s.rx_ifindex, s.tx_ifindex);
            let moved = (s.live_tx.saturating_sub(s.live_base_tx), s.live_rx.saturating_sub(s.live_base_rx));
            Some(((sk, s.birth_ns), counted.then_some(moved)))
        });
        let capacity = table_copy::map_capacity(&self.open_sessions);
        self.metrics.telemetry.map_usage("open_sessions", open.len() + reported, capacity);
        let delta = apply_in_parts(&open, &self.state, |state| &mut state.tcp_live);
        if count {
            self.add_live(Protocol::Tcp, delta);
        }
        if open.len() >= LARGE_COPY {
            // The copy is freed when this returns.
            drop(open);
            crate::pipeline::memory::release_free();
        }
    }

    /// Adds what open UDP flows moved since the last scrape: copied without
    /// the lock the release reader and the expiry take to end a flow, then
    /// applied a part at a time, like the TCP sessions.
    fn sweep_udp(&self, count: bool) {
        self.udp().live.copy_started();
        let open = table_copy::copy_as(&self.udp_flows, |key, f| {
            let counted = self.filter.accepts_namespace(f.netns_ino);
            Some(((key, f.first_ns), counted.then_some((f.bytes_tx, f.bytes_rx))))
        });
        self.metrics.telemetry.map_usage("udp_flows", open.len(), table_copy::map_capacity(&self.udp_flows));
        let delta = apply_in_parts(&open, &self.udp, |udp| &mut udp.live);
        if count {
            self.add_live(Protocol::Udp, delta);
        }
    }

    /// At a start that reuses pinned tables, before any scrape: what the
    /// sessions and flows open now moved under the previous process is taken
    /// as counted, so `observer_bytes_total` counts only what they move from
    /// now on (the previous process counted the rest), as for adopted ones.
    pub fn prime_live(&self) {
        self.sweep_tcp(false);
        self.sweep_udp(false);
    }

    /// At a start that reuses pinned tables, once the programs are attached:
    /// ends the sessions and flows whose socket closed while no observer ran
    /// (no program saw it), each once. A TCP session is reported as a close
    /// no hook saw (`session_close_missed`: bytes and active time up to its
    /// last call, no lifetime); a released UDP socket's flows end at their
    /// last datagram. Entries are taken out of the tables atomically, so a
    /// session that the attached programs end meanwhile is not reported twice.
    pub fn sweep_gone(&self, probe: &mut SocketProbe) -> Result<Swept, String> {
        let mut swept = Swept::default();
        let entries = table_copy::copy(&self.open_sessions);
        let sks: Vec<u64> = entries.iter().map(|(sk, _)| *sk).collect();
        for ((sk, start), facts) in entries.iter().zip(probe.probe(&sks)?) {
            // Reported at its close already (`session_mark::REPORTED`).
            if start.reported() || !facts.tcp_gone(start) {
                continue;
            }
            if let Ok(Some(start)) = table_copy::take(&self.open_sessions, sk) {
                self.metrics.lost("session_close_missed", 1);
                self.tcp_record(&missed_close_record(*sk, &start));
                swept.tcp += 1;
            }
        }
        let flows = table_copy::copy_as(&self.udp_flows, |key, flow| Some((key, flow.local_port)));
        let local_ports: std::collections::HashMap<u64, u16> = flows.iter().map(|(k, port)| (k.sk, *port)).collect();
        let sockets = table_copy::copy_as(&self.udp_sockets, |sk, _| Some(sk));
        let facts = probe.probe(&sockets)?;
        let gone: std::collections::HashSet<u64> = sockets
            .iter()
            .zip(facts)
            .filter(|(sk, f)| f.udp_gone(local_ports.get(sk).copied().unwrap_or(0)))
            .map(|(sk, _)| *sk)
            .collect();
        if !gone.is_empty() {
            for (key, _) in flows.iter().filter(|(k, _)| gone.contains(&k.sk)) {
                if let Ok(Some(last)) = table_copy::take(&self.udp_flows, key) {
                    self.report_udp_flow(key, &last, None);
                    swept.udp += 1;
                }
            }
            for sk in &gone {
                let _ = table_copy::take(&self.udp_sockets, sk);
            }
        }
        Ok(swept)
    }
}

/// Sessions and flows `Pipeline::sweep_gone` ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub tcp: u64,
    pub udp: u64,
}

/// The record of a session whose close no program saw, from its entry alone,
/// as the kernel programs make it at the next birth at its address
/// (observer-ebpf's `report_missed_close`): bytes and active time of its last
/// call, that call's time as its end, no addresses, no lifetime.
fn missed_close_record(sock: u64, s: &SessionStart) -> SessionRecord {
    SessionRecord {
        sock,
        birth_ns: s.birth_ns,
        close_ns: s.last_call_ns.max(s.birth_ns),
        bytes_acked: s.live_tx,
        bytes_received: s.live_rx,
        cgroup_id: s.cgroup_id,
        active_ns: s.active_ns,
        busy_jiffies: 0,
        birth_jiffies: s.birth_jiffies,
        close_jiffies: s.birth_jiffies,
        live_base_tx: s.live_base_tx,
        live_base_rx: s.live_base_rx,
        netns_ino: s.netns_ino,
        rx_ifindex: s.rx_ifindex,
        pid: s.pid,
        flags: s.all_flags() | SESSION_CLOSE_MISSED,
        family: 0,
        local_port: 0,
        remote_port: 0,
        _pad0: 0,
        tx_ifindex: s.tx_ifindex,
        retransmits: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
        comm: s.comm,
    }
}

/// Applies a scrape's copy of open sessions or flows to the `LiveCounts` that
/// `live` picks out of what `lock` guards, [`APPLY_PART`] entries per hold of
/// the lock, and returns the bytes moved since the last scrape. The lock is
/// handed fairly to a waiting ring reader between parts: 200,000 sessions
/// applied in one go kept the session reader from its ring for 90 ms.
fn apply_in_parts<T, K: Hash + Eq + Clone>(
    open: &[(K, Option<(u64, u64)>)],
    lock: &Mutex<T>,
    live: impl Fn(&mut T) -> &mut LiveCounts<K>,
) -> (u64, u64) {
    let mut delta = (0, 0);
    for part in open.chunks(APPLY_PART) {
        let mut guard = lock.lock();
        let d = live(&mut guard).apply_copy_part(part);
        MutexGuard::unlock_fair(guard);
        delta = (delta.0 + d.0, delta.1 + d.1);
    }
    live(&mut lock.lock()).copy_applied();
    delta
}

/// Tells the readers to finish: at shutdown, once the kernel programs are
/// detached, so that nothing is added to the rings after their last read.
#[derive(Clone)]
pub struct Stop {
    rx: watch::Receiver<bool>,
    /// Readable once stop is raised or its sender dropped: the reader threads
    /// wait on it beside their ring, so they end at once, not at their next
    /// timeout (up to `RING_POLL_IDLE`).
    wake: Arc<OwnedFd>,
}

/// Raises `Stop`; dropping it without raising ends the readers too (an early
/// error return), since the runtime waits for its blocking threads before the
/// process can exit.
pub struct StopSender {
    tx: watch::Sender<bool>,
    wake: Arc<OwnedFd>,
}

impl Stop {
    /// The signal and the handle that raises it.
    pub fn new() -> std::io::Result<(StopSender, Stop)> {
        // SAFETY: eventfd has no preconditions; a descriptor it returns is ours.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let (tx, rx) = watch::channel(false);
        Ok((StopSender { tx, wake: wake.clone() }, Stop { rx, wake }))
    }

    /// Whether stop is raised or its sender is gone.
    fn is_stopped(&self) -> bool {
        *self.rx.borrow() || self.rx.has_changed().is_err()
    }

    /// Resolves once stop is raised (or its sender is gone).
    async fn stopped(&mut self) {
        let _ = self.rx.wait_for(|stop| *stop).await;
    }
}

impl StopSender {
    pub fn stop(self) {
        let _ = self.tx.send(true);
        // Drop wakes the reader threads.
    }
}

impl Drop for StopSender {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write from a buffer we own to our eventfd; it only
        // fails if the counter would overflow, which one write cannot do.
        unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// A copy of this many open sessions or more is given back to the system
/// once applied: 400 kB and up, and a few milliseconds to give back.
const LARGE_COPY: usize = 10_000;

/// Sessions of a scrape's copy applied per hold of the state lock.
const APPLY_PART: usize = 1024;

/// Sessions that may wait for a walk of the cgroup tree (`Pipeline::report`):
/// a few seconds of a busy node's new containers' sessions.
const MAX_WAITING: usize = 8192;

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

/// Reads a ring buffer on a thread of its own (tokio's blocking pool) and
/// hands each record to `handle`, on wake-ups and every [`RING_POLL`] to
/// [`RING_POLL_IDLE`], until `stop`; then reads what is left and returns.
/// Not an async task: one on the two async workers waited whenever those
/// were busy or blocked (a scrape walking 200,000 open sessions), and a
/// burst of closes overflowed its ring meanwhile.
/// `after` runs after each drain, with `true` after the last one.
async fn read_until_stopped(
    ring: RingBuf<MapData>,
    stop: Stop,
    handle: impl FnMut(&[u8]) + Send + 'static,
    after: impl FnMut(bool) + Send + 'static,
) -> Result<(), Error> {
    tokio::task::spawn_blocking(move || read_on_this_thread(ring, stop, handle, after))
        .await
        .map_err(|e| Error::Ring(std::io::Error::other(e)))?
}

fn read_on_this_thread(
    mut ring: RingBuf<MapData>,
    stop: Stop,
    mut handle: impl FnMut(&[u8]),
    mut after: impl FnMut(bool),
) -> Result<(), Error> {
    let mut period = RING_POLL;
    loop {
        if stop.is_stopped() {
            drain(&mut ring, &mut handle);
            after(true);
            return Ok(());
        }
        let woken = wait_readable(ring.as_fd(), stop.wake.as_fd(), period).map_err(Error::Ring)?;
        let read = drain(&mut ring, &mut handle);
        after(false);
        period = if woken || read > 0 { RING_POLL } else { (period * 2).min(RING_POLL_IDLE) };
    }
}

/// Waits until the ring has records, `stop` is readable or `timeout` passes;
/// true if either woke it. The ring's poll is level-triggered (unread data),
/// so a record committed while the previous drain ran is seen here, not lost
/// in a cleared wake-up.
fn wait_readable(ring: BorrowedFd<'_>, stop: BorrowedFd<'_>, timeout: Duration) -> std::io::Result<bool> {
    let mut fds = [ring, stop].map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: two pollfds we own, for descriptors that outlive the call.
    match unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) } {
        n if n >= 0 => Ok(n > 0),
        _ => match std::io::Error::last_os_error() {
            e if e.kind() == std::io::ErrorKind::Interrupted => Ok(false),
            e => Err(e),
        },
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

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the readers' wait would be woken now.
    fn woken(stop: &Stop) -> bool {
        let mut pfd = libc::pollfd { fd: stop.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd we own; a zero timeout returns at once.
        (unsafe { libc::poll(&mut pfd, 1, 0) }) == 1
    }

    #[test]
    fn a_reader_stops_when_told_or_when_nobody_can_tell_it_any_more() {
        let (tx, stop) = Stop::new().unwrap();
        assert!(!stop.is_stopped() && !woken(&stop));
        tx.stop();
        assert!(stop.is_stopped() && woken(&stop), "told: ends, and at once");
        // An early error return drops the sender without raising stop: the
        // reader threads must end all the same, or the process cannot exit.
        let (tx, stop) = Stop::new().unwrap();
        drop(tx);
        assert!(stop.is_stopped() && woken(&stop));
    }
}
