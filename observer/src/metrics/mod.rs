//! Prometheus metric families and how a closed session updates them.
//!
//! - this file: [`Metrics`], every session, drop and interface family and the
//!   arithmetic a closed session or a live delta goes through;
//! - [`families`]: counter and histogram families with their own text exposition;
//! - [`native`]: native histograms (`--histograms`) and their bucketing;
//! - [`exposition`]: text or protobuf, as the scrape's `Accept` header asks;
//! - [`labels`]: the operator's static labels;
//! - [`telemetry`]: the observer's metrics about itself.
//!
//! Bucket layouts are fixed and documented in docs/sessions.md. Label sets: the
//! observer's own (`direction`, `protocol`, ...), then on session families the
//! session labels the operator turned on (`crate::enrich`), then the
//! operator's static labels.
//!
//! Layer: above kernel and enrich (it names hooks and session labels); below
//! pipeline, gpu, server and cli.
pub mod exposition;
pub mod families;
pub mod labels;
pub mod native;
pub mod telemetry;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use prometheus::{GaugeVec, Opts, Registry, TextEncoder};

use crate::{
    kernel::probes::Concern,
    metrics::exposition::Format,
    metrics::families::{Counter, CounterFamily, Families, Histogram, HistogramFamily},
    metrics::labels::StaticLabel,
    metrics::native::HistogramMode,
    session::{Direction, Protocol, Session},
};

/// Goodput buckets: 1 kB/s to 100 GB/s, four per decade (x1, x1.78, x3.16,
/// x5.62): 33 bounds. A quarter decade keeps `histogram_quantile`'s linear
/// interpolation within about 30% anywhere in the range, with a bounded
/// number of series.
pub fn goodput_buckets() -> Vec<f64> {
    (0..=32).map(|i| round_sig(1e3 * 10f64.powf(f64::from(i) / 4.0))).collect()
}

/// Duration buckets: 1 ms to 1 day, 1-2.5-5 per decade up to 10,000 s, then
/// 1 h-ish steps are pointless: one last bound at 86,400 s.
pub fn duration_buckets() -> Vec<f64> {
    let mut b: Vec<f64> = (-3..=3).flat_map(|e| [1.0, 2.5, 5.0].map(|m| round_sig(m * 10f64.powi(e)))).collect();
    b.push(10_000.0);
    b.push(86_400.0);
    b
}

/// Rounds to 3 significant digits so bucket bounds print as readable numbers.
fn round_sig(x: f64) -> f64 {
    let scale = 10f64.powi(2 - x.log10().floor() as i32);
    (x * scale).round() / scale
}

/// Where the observer had to drop data; label values of `observer_events_lost_total`.
/// The kernel's `LostSource` indexes first, in order; then userspace's own.
pub const LOST_SOURCES: [&str; observer_common::LOST_SOURCES as usize + 3] = [
    "session_ring_full",
    "session_table_full",
    "udp_flow_table_full",
    "udp_release_ring_full",
    "drop_table_full",
    "udp_peer_unknown",
    "session_close_missed",
    "udp_socket_table_full",
    "sock_call_return_missed",
    "session_record_malformed",
    "session_log_line",
    "session_labels_behind",
];

/// HELP of `observer_drops_total`: what the common reasons mean.
const DROPS_HELP: &str = "Packets the kernel dropped, by drop reason (the running kernel's enum skb_drop_reason, lowercased, without the SKB_DROP_REASON_ prefix) and interface (the packet's device, \"\" when it had none or it is in another network namespace; with --iface only selected interfaces are reported). Common reasons: netfilter_drop: a firewall (nftables/iptables) rule dropped it; socket_rcvbuff: the receiving socket's buffer was full (the application reads too slowly); socket_backlog: the socket's backlog was full; no_socket: no socket listens on the destination port; tcp_invalid_sequence / tcp_old_data / tcp_ofo_drop: TCP segments outside the receive window, duplicates or out-of-order segments that did not fit; tcp_csum / udp_csum: bad checksums; pkt_too_small / pkt_too_big: malformed or oversized packets; qdisc_drop: a queueing discipline discarded it on transmit; neigh_failed / neigh_queuefull: the next hop's address could not be resolved; ip_noproto: no handler for the IP protocol; otherhost: addressed to another host; not_specified: the kernel gave no specific reason; unknown: this kernel reports no reasons (before 5.17) or one outside its enum. Freed packets that were not dropped (SKB_CONSUMED, SKB_NOT_DROPPED_YET) are not counted.";

/// `observer_probe_info`'s `hook` label of a concern switched off with `--disable`.
pub const PROBE_DISABLED: &str = "disabled";

pub struct Metrics {
    registry: Registry,
    static_labels: Vec<StaticLabel>,
    /// Whether session families carry session labels (`crate::enrich`).
    session_labelled: bool,
    label_overflow: Arc<CounterFamily>,
    goodput: Arc<HistogramFamily>,
    active_goodput: Arc<HistogramFamily>,
    duration: Arc<HistogramFamily>,
    /// `observer_bytes_total`'s four series by `Protocol::ALL` and
    /// `Direction::ALL` index: added to at every session end and scrape, so
    /// looked up once.
    live: [[Arc<Counter>; 2]; 2],
    sessions: Arc<CounterFamily>,
    session_bytes: Arc<CounterFamily>,
    ignored: Arc<CounterFamily>,
    events_lost: Arc<CounterFamily>,
    probe_info: GaugeVec,
    drops: Arc<CounterFamily>,
    tcp_retransmits: Arc<CounterFamily>,
    tcp_resets: Arc<CounterFamily>,
    /// observer_interface_{packets,bytes,drops}_total.
    interface: [Arc<CounterFamily>; 3],
    /// Every family above but `probe_info`: what a scrape writes first.
    families: Families,
    /// Length of the last exposition, to size the next one's buffer at once.
    encoded_len: AtomicUsize,
    /// Length of the last protobuf exposition, likewise.
    encoded_proto_len: AtomicUsize,
    /// Which buckets the session histograms expose (`--histograms`).
    histograms: HistogramMode,
    /// The observer's own health: table usage, scrape duration, process_*.
    pub telemetry: crate::metrics::telemetry::SelfMetrics,
    /// Handles of the session families' series by session label values, so
    /// a closed session costs one lookup instead of hashing its label values
    /// once per family and direction.
    series: Mutex<HashMap<Vec<String>, LabelSetSeries>>,
}

/// The series of one set of session label values, per protocol and
/// impaired value (index `protocol * 2 + impaired`), created at first use.
type LabelSetSeries = [Option<SessionSeries>; 4];

/// What one closed session updates.
struct SessionSeries {
    sessions: Arc<Counter>,
    duration: Arc<Histogram>,
    /// By `Direction::ALL` index, as the goodput pairs.
    bytes: [Arc<Counter>; 2],
    /// Created at the first observation, so sessions under the floor add no
    /// goodput series.
    goodput: [OnceLock<Arc<Histogram>>; 2],
    active_goodput: [OnceLock<Arc<Histogram>>; 2],
}

impl Metrics {
    /// `session_labels`: names of the session labels, in value order;
    /// `histograms`: which buckets the session histograms expose.
    pub fn new(
        static_labels: Vec<StaticLabel>,
        session_labels: &[&'static str],
        histograms: HistogramMode,
    ) -> prometheus::Result<Self> {
        let registry = Registry::new();
        let mut families = Families::default();
        let names = |base: &[&'static str]| -> Vec<String> {
            base.iter().map(|s| s.to_string()).chain(static_labels.iter().map(|l| l.key.clone())).collect()
        };
        let session_names = |base: &[&'static str]| -> Vec<String> {
            let with_session: Vec<&'static str> = base.iter().chain(session_labels).copied().collect();
            names(&with_session)
        };
        let dir_proto = names(&["direction", "protocol"]);
        let session_dir_proto = session_names(&["direction", "protocol"]);
        let goodput_labels = session_names(&["direction", "protocol", "impaired"]);
        let session_proto = session_names(&["protocol"]);

        let goodput = families.histogram(
            "observer_session_goodput_bytes_per_second",
            "Goodput of closed sessions: bytes moved in one direction divided by the session's lifetime in seconds, one observation per direction that moved at least --min-session-bytes. direction=receive: bytes received in order; direction=transmit: bytes acknowledged by the peer. impaired=true: the session retransmitted at least one segment (loss or heavy delay on its path), impaired=false: it did not (UDP sessions are always false).",
            &goodput_labels,
            goodput_buckets(),
            histograms,
        )?;
        let active_goodput = families.histogram(
            "observer_session_active_goodput_bytes_per_second",
            "Goodput of closed sessions over their active time: bytes moved in one direction divided by the time during which data moved in that direction. direction=transmit (TCP): the kernel's busy time, while data waited to be sent or acknowledged; direction=receive and UDP: gaps between send/receive calls up to --active-gap, longer gaps being idle. Same floor and labels as observer_session_goodput_bytes_per_second; sessions whose active time is unknown or zero, or adopted mid-life, are not observed.",
            &goodput_labels,
            goodput_buckets(),
            histograms,
        )?;
        let live_bytes = families.counter(
            "observer_bytes_total",
            "Payload bytes moved by sessions, counted while they are open (at every scrape) and at their end, so rate() shows a long transfer's throughput while it runs. TCP: acknowledged (transmit) and received in order (receive); UDP: datagram bytes sent and received. Sessions adopted mid-life count from first sight.",
            &dir_proto,
        )?;
        let duration = families.histogram(
            "observer_session_duration_seconds",
            "Lifetime of closed sessions (first state change to close), whatever they moved. Sessions adopted mid-life are not observed (their birth is unknown).",
            &session_proto,
            duration_buckets(),
            histograms,
        )?;
        let sessions = families.counter(
            "observer_sessions_total",
            "Closed sessions (TCP connections, UDP flows), over the goodput floor or not, including TCP sessions adopted mid-life.",
            &session_proto,
        )?;
        let session_bytes = families.counter(
            "observer_session_bytes_total",
            "Bytes moved by closed sessions. direction=receive: received in order; direction=transmit: acknowledged by the peer (retransmissions excluded).",
            &session_dir_proto,
        )?;
        let ignored = families.counter(
            "observer_sessions_ignored_total",
            "Closed sessions deliberately not reported. reason=iface: their packets did not arrive through an interface selected with --iface.",
            &["reason".to_string()],
        )?;
        let events_lost = families.counter(
            "observer_events_lost_total",
            "Data the observer had to drop. source=session_ring_full: closed TCP session records lost because the kernel-to-userspace ring buffer was full; source=session_table_full: TCP sessions not tracked from birth because the open-session table was full (reported at close as adopted); source=udp_flow_table_full: UDP sockets whose new flow found the flow table full, once per socket (the datagrams of flows that found no room are not counted; the socket tries again at most once a second); source=udp_release_ring_full: UDP socket releases not seen (their flows end at the idle timeout instead, a connected socket's once the observer finds the socket gone, within two timeouts); source=drop_table_full: drops, retransmits or resets of a new (reason, interface) pair not counted because the kernel's drop table was full; source=udp_peer_unknown: UDP datagrams not counted because their socket is unconnected and the call did not ask for the peer's address; source=session_close_missed: TCP sessions whose close no kernel hook saw (both the state-change program and the socket-destroy hook missed it, or the kprobe tier's one program), found when the next socket at the same address was born and reported then from their table entry: bytes up to their last call, no lifetime (so no duration or goodput), no addresses; source=udp_socket_table_full: new UDP flows whose socket found no room in the kernel's table of sockets with flows, sized by --max-udp-flows (that socket's release will not be seen, so its flows, connected or not, end at the idle timeout); source=sock_call_return_missed: kprobe tier only: UDP send and receive calls whose return probe the kernel did not run (more tasks inside the function at once than its return-probe instances: one per possible CPU on kernels built without CONFIG_PREEMPTION, such as Debian's 5.10), found at the task's next call; their bytes are not counted; source=session_record_malformed: records userspace could not decode; source=session_log_line: --session-log lines not written, because the log's writer was behind (its queue of 32,768 lines full: a slow disk, a pipe nobody reads) or its write failed (the sessions are in the metrics all the same); source=session_labels_behind: sessions labelled without their workload labels (container, pod, namespace) because 8,192 sessions were already waiting for the walk of the cgroup tree that would name theirs.",
            &["source".to_string()],
        )?;
        let probe_info = GaugeVec::new(
            Opts::new(
                "observer_probe_info",
                "Kernel hook attached for each concern (value 1); hook=\"disabled\" (value 0) for a concern switched off with --disable, no series for one the kernel offers no hook for. concern=tcp_state: TCP session birth and close; concern=tcp_owner: owner process of accepted sessions; concern=sock_calls: every send and receive (UDP flows, live TCP bytes, active time); concern=udp_release: socket release, which ends UDP flows; concern=drops: packet drops with the kernel's reason; concern=tcp_errors: TCP retransmits and resets.",
            ),
            &["concern", "hook"],
        )?;
        let drops = families.counter("observer_drops_total", DROPS_HELP, &names(&["reason", "iface"]))?;
        let tcp_retransmits = families.counter(
            "observer_tcp_retransmits_total",
            "TCP segments retransmitted (tcp:tcp_retransmit_skb, successful attempts), by the interface of the connection's route. A rising rate means loss or heavy delay on the path.",
            &names(&["iface"]),
        )?;
        let tcp_resets = families.counter(
            "observer_tcp_resets_total",
            "TCP resets. direction=sent: this host answered or aborted a connection with a RST (e.g. a connection attempt to a closed port); direction=received: a peer reset a connection (or refused one). iface: the interface of the packet answered, or of the connection's route.",
            &names(&["direction", "iface"]),
        )?;
        let iface_dir = names(&["iface", "direction"]);
        let interface = [
            ("observer_interface_packets_total", "Packets the interface delivered (direction=receive) or sent (direction=transmit), from the kernel's device statistics; only interfaces selected with --iface."),
            ("observer_interface_bytes_total", "Bytes the interface received or sent, from the kernel's device statistics; only interfaces selected with --iface."),
            ("observer_interface_drops_total", "Packets the interface itself dropped (the device's rx_dropped/tx_dropped: no buffer, queue full, unsupported protocol; direction=transmit also counts the drops of its root queueing discipline, as tc -s qdisc shows them), from the kernel's device statistics; only interfaces selected with --iface. Drop ratio: rate(drops) / (rate(drops) + rate(packets)). Drops further up the stack are in observer_drops_total."),
        ]
        .map(|(name, help)| families.counter(name, help, &iface_dir));
        let [a, b, c] = interface;
        let interface = [a?, b?, c?];
        let label_overflow = families.counter(
            "observer_label_overflow_total",
            "Closed sessions whose session labels were reported as \"other\". label=<a session label>: its value, because the label already had its budget of distinct values (--label-limit); label=label_set: every label, because --max-label-sets distinct label sets were already exported (such a session counts only here). A value or set gives its place back when its series are removed after --series-ttl without sessions.",
            &["label".to_string()],
        )?;
        let set_overflow = (!session_labels.is_empty()).then_some(crate::enrich::LABEL_SET_OVERFLOW);
        for label in session_labels.iter().copied().chain(set_overflow) {
            label_overflow.with_label_values(&[label]);
        }
        let build_info = GaugeVec::new(
            Opts::new("observer_build_info", "Build of the running observer (value 1)."),
            &["version", "commit"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), option_env!("OBSERVER_COMMIT").unwrap_or("unknown")])
            .set(1.0);
        for source in LOST_SOURCES {
            events_lost.with_label_values(&[source]);
        }
        ignored.with_label_values(&["iface"]);

        registry.register(Box::new(probe_info.clone()))?;
        registry.register(Box::new(build_info))?;
        let telemetry = crate::metrics::telemetry::SelfMetrics::new(&registry)?;

        let static_values: Vec<&str> = static_labels.iter().map(|l| l.value.as_str()).collect();
        let live = Protocol::ALL.map(|p| {
            Direction::ALL.map(|d| {
                let values: Vec<&str> =
                    [d.as_str(), p.as_str()].into_iter().chain(static_values.iter().copied()).collect();
                live_bytes.with_label_values(&values)
            })
        });

        let m = Metrics {
            registry,
            static_labels,
            session_labelled: !session_labels.is_empty(),
            label_overflow,
            goodput,
            active_goodput,
            duration,
            live,
            sessions,
            session_bytes,
            ignored,
            events_lost,
            probe_info,
            drops,
            tcp_retransmits,
            tcp_resets,
            interface,
            families,
            encoded_len: AtomicUsize::new(0),
            encoded_proto_len: AtomicUsize::new(0),
            histograms,
            telemetry,
            series: Mutex::new(HashMap::new()),
        };
        // Series exist from the start, so rate() and dashboards see zeros
        // instead of absent series before the first session closes (the live
        // byte counters' above). With session labels, which values will exist
        // is not known yet.
        if !m.session_labelled {
            m.each_session_series(&[], |family, values| family.touch(values));
        }
        Ok(m)
    }

    /// Label values: the given ones followed by the static labels' values.
    fn values<'a>(&'a self, base: &[&'a str]) -> Vec<&'a str> {
        self.session_values(base, &[])
    }

    /// Label values of a session family: the given ones, the session labels'
    /// values, the static labels' values.
    fn session_values<'a>(&'a self, base: &[&'a str], session: &'a [String]) -> Vec<&'a str> {
        base.iter()
            .copied()
            .chain(session.iter().map(String::as_str))
            .chain(self.static_labels.iter().map(|l| l.value.as_str()))
            .collect()
    }

    /// Calls `f` with every session family's series for one set of session
    /// label values: every protocol, direction and impaired value.
    fn each_session_series(&self, session: &[String], mut f: impl FnMut(SessionFamily<'_>, &[&str])) {
        for p in Protocol::ALL.map(Protocol::as_str) {
            f(SessionFamily::Histogram(&self.duration), &self.session_values(&[p], session));
            f(SessionFamily::Counter(&self.sessions), &self.session_values(&[p], session));
            for d in Direction::ALL.map(Direction::as_str) {
                f(SessionFamily::Counter(&self.session_bytes), &self.session_values(&[d, p], session));
                for family in [&self.goodput, &self.active_goodput] {
                    for impaired in ["false", "true"] {
                        f(SessionFamily::Histogram(family), &self.session_values(&[d, p, impaired], session));
                    }
                }
            }
        }
    }

    /// Removes every series of one set of session label values (expired by
    /// the series TTL).
    pub fn remove_session_series(&self, session: &[String]) {
        self.series.lock().unwrap_or_else(|p| p.into_inner()).remove(session);
        // Not every combination was ever created: a missing one is no error.
        self.each_session_series(session, |family, values| family.remove(values));
    }

    pub fn label_overflow(&self, label: &str) {
        self.label_overflow.with_label_values(&[label]).inc();
    }

    /// Serves another collector's families with these (the GPU snapshot).
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) -> prometheus::Result<()> {
        self.registry.register(collector)
    }

    /// `observer_probe_info{concern, hook}` 1: `hook` (its label, from
    /// `Disabled::label`) attached for `concern`.
    pub fn set_probe(&self, concern: Concern, hook: &str) {
        self.probe_info.with_label_values(&[concern.as_str(), hook]).set(1.0);
    }

    /// `observer_probe_info{concern, hook="disabled"}` 0: `concern` switched
    /// off with `--disable`. A concern the kernel offers no hook for has no
    /// series at all.
    pub fn set_probe_disabled(&self, concern: Concern) {
        self.probe_info.with_label_values(&[concern.as_str(), PROBE_DISABLED]).set(0.0);
    }

    pub fn record_ignored(&self, reason: &str) {
        self.ignored.with_label_values(&[reason]).inc();
    }

    /// Accounts one closed session, with its session label values (in the
    /// order given to [`Metrics::new`]).
    pub fn record(&self, s: &Session, session_labels: &[String], min_session_bytes: u64) {
        let mut cache = self.series.lock().unwrap_or_else(|p| p.into_inner());
        // One hash of the label values per session; a new label set is
        // recorded first and then kept.
        match cache.get_mut(session_labels) {
            Some(by_kind) => self.record_in(by_kind, s, session_labels, min_session_bytes),
            None => {
                let mut by_kind = LabelSetSeries::default();
                self.record_in(&mut by_kind, s, session_labels, min_session_bytes);
                cache.insert(session_labels.to_vec(), by_kind);
            }
        }
    }

    fn record_in(&self, by_kind: &mut LabelSetSeries, s: &Session, session_labels: &[String], min_session_bytes: u64) {
        let slot = match s.protocol {
            Protocol::Tcp => 0,
            Protocol::Udp => 2,
        } + usize::from(s.impaired());
        let series = by_kind[slot].get_or_insert_with(|| self.session_series(s, session_labels));
        series.sessions.inc();
        if let Some(lifetime) = s.lifetime {
            series.duration.observe(lifetime.as_secs_f64());
        }
        for (i, d) in Direction::ALL.into_iter().enumerate() {
            series.bytes[i].inc_by(s.bytes(d));
            let goodput_labels = || {
                let impaired = if s.impaired() { "true" } else { "false" };
                self.session_values(&[d.as_str(), s.protocol.as_str(), impaired], session_labels)
            };
            if let Some(g) = s.goodput(d, min_session_bytes) {
                series.goodput[i].get_or_init(|| self.goodput.with_label_values(&goodput_labels())).observe(g);
            }
            if let Some(g) = s.active_goodput(d, min_session_bytes) {
                series.active_goodput[i]
                    .get_or_init(|| self.active_goodput.with_label_values(&goodput_labels()))
                    .observe(g);
            }
        }
    }

    fn session_series(&self, s: &Session, session_labels: &[String]) -> SessionSeries {
        let protocol = s.protocol.as_str();
        let proto_labels = self.session_values(&[protocol], session_labels);
        let bytes = Direction::ALL.map(|d| {
            self.session_bytes.with_label_values(&self.session_values(&[d.as_str(), protocol], session_labels))
        });
        SessionSeries {
            sessions: self.sessions.with_label_values(&proto_labels),
            duration: self.duration.with_label_values(&proto_labels),
            bytes,
            goodput: Default::default(),
            active_goodput: Default::default(),
        }
    }

    /// Adds live throughput (`observer_bytes_total`).
    pub fn add_live(&self, protocol: Protocol, direction: Direction, bytes: u64) {
        if bytes > 0 {
            // In `ALL` order, which is the variants' (`crate::session`).
            self.live[protocol as usize][direction as usize].inc_by(bytes);
        }
    }

    pub fn add_drops(&self, reason: &str, iface: &str, n: u64) {
        self.drops.with_label_values(&self.values(&[reason, iface])).inc_by(n);
    }

    pub fn add_tcp_retransmits(&self, iface: &str, n: u64) {
        self.tcp_retransmits.with_label_values(&self.values(&[iface])).inc_by(n);
    }

    pub fn add_tcp_resets(&self, direction: &str, iface: &str, n: u64) {
        self.tcp_resets.with_label_values(&self.values(&[direction, iface])).inc_by(n);
    }

    /// Adds an interface's (packets, bytes, drops) growth in one direction.
    pub fn add_interface(&self, iface: &str, direction: &str, deltas: [u64; 3]) {
        for (family, n) in self.interface.iter().zip(deltas) {
            family.with_label_values(&self.values(&[iface, direction])).inc_by(n);
        }
    }

    pub fn lost(&self, source: &str, n: u64) {
        self.events_lost.with_label_values(&[source]).inc_by(n);
    }

    /// Every family's current values, sorted by name, as a registry gathers
    /// them: what `/api/v1/snapshot` reads.
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.registry.gather();
        families.extend(self.families.to_protos());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        families
    }

    /// The exposition in Prometheus text format 0.0.4: the observer's own
    /// families written straight from their series, then the registry's.
    pub fn encode(&self) -> Result<String, prometheus::Error> {
        let mut text = String::with_capacity(self.encoded_len.load(Ordering::Relaxed) + 4096);
        self.families.write_text(&mut text);
        TextEncoder::new().encode_utf8(&self.registry.gather(), &mut text)?;
        self.encoded_len.store(text.len(), Ordering::Relaxed);
        Ok(text)
    }

    /// The format a scrape with this `Accept` header gets: text always with
    /// `--histograms classic` (the exposition as it was before native
    /// histograms), else what the header prefers.
    pub fn negotiate(&self, accept: Option<&str>) -> Format {
        match self.histograms {
            HistogramMode::Classic => Format::Text,
            _ => crate::metrics::exposition::negotiate(accept),
        }
    }

    /// The exposition in the protobuf format: every family of the text
    /// exposition, in the same order, the session histograms with their
    /// native buckets.
    pub fn encode_protobuf(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.encoded_proto_len.load(Ordering::Relaxed) + 4096);
        self.families.write_protobuf(&mut body);
        let registry = self.registry.gather();
        crate::metrics::exposition::encode_delimited(
            registry.iter().map(crate::metrics::exposition::from_registry),
            &mut body,
        );
        self.encoded_proto_len.store(body.len(), Ordering::Relaxed);
        body
    }
}

/// A session family, for operations on all of them at once.
enum SessionFamily<'a> {
    Histogram(&'a HistogramFamily),
    Counter(&'a CounterFamily),
}

impl SessionFamily<'_> {
    fn touch(&self, values: &[&str]) {
        match self {
            SessionFamily::Histogram(h) => drop(h.with_label_values(values)),
            SessionFamily::Counter(c) => drop(c.with_label_values(values)),
        }
    }

    fn remove(&self, values: &[&str]) {
        match self {
            SessionFamily::Histogram(h) => h.remove(values),
            SessionFamily::Counter(c) => c.remove(values),
        };
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::labels::parse_label;

    #[test]
    fn goodput_buckets_span_1kb_to_100gb_four_per_decade() {
        let b = goodput_buckets();
        assert_eq!(b.len(), 33);
        assert_eq!(b[0], 1e3);
        assert_eq!(b[4], 1e4);
        assert_eq!(b[1], 1780.0);
        assert_eq!(*b.last().unwrap(), 1e11);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn duration_buckets_are_increasing_from_1ms_to_a_day() {
        let b = duration_buckets();
        assert_eq!(b[0], 0.001);
        assert_eq!(&b[..4], &[0.001, 0.0025, 0.005, 0.01]);
        assert_eq!(*b.last().unwrap(), 86_400.0);
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }

    fn session(tx: u64, rx: u64, secs: Option<u64>) -> Session {
        Session {
            protocol: Protocol::Tcp,
            active_transmit: None,
            active_receive: None,
            local: "127.0.0.1:1".parse().unwrap(),
            remote: "127.0.0.1:2".parse().unwrap(),
            bytes_transmitted: tx,
            bytes_received: rx,
            lifetime: secs.map(Duration::from_secs),
            owner: None,
            netns_ino: 0,
            rx_ifindex: 1,
            tx_ifindex: 1,
            retransmits: 0,
        }
    }

    #[test]
    fn records_sessions_with_static_labels_and_the_floor() {
        let m = Metrics::new(vec![parse_label("region=eu").unwrap()], &[], HistogramMode::Both).unwrap();
        m.record(&session(4_000_000, 10, Some(2)), &[], 1_000_000);
        m.record(&session(100, 100, Some(1)), &[], 1_000_000);
        m.record(&session(5_000_000, 0, None), &[], 1_000_000);
        let text = m.encode().unwrap();
        let has = |line: &str| text.lines().any(|l| l == line);
        assert!(has(r#"observer_sessions_total{protocol="tcp",region="eu"} 3"#), "{text}");
        assert!(
            has(r#"observer_session_bytes_total{direction="transmit",protocol="tcp",region="eu"} 9000100"#),
            "{text}"
        );
        assert!(
            has(
                r#"observer_session_goodput_bytes_per_second_count{direction="transmit",impaired="false",protocol="tcp",region="eu"} 1"#
            ),
            "{text}"
        );
        assert!(
            has(
                r#"observer_session_goodput_bytes_per_second_sum{direction="transmit",impaired="false",protocol="tcp",region="eu"} 2000000"#
            ),
            "{text}"
        );
        assert!(
            has(
                r#"observer_session_goodput_bytes_per_second_count{direction="receive",impaired="false",protocol="tcp",region="eu"} 0"#
            ),
            "below the floor: {text}"
        );
        assert!(
            has(r#"observer_session_duration_seconds_count{protocol="tcp",region="eu"} 2"#),
            "adopted session has no duration: {text}"
        );
    }

    /// The text of every mode but `native` is the classic exposition, byte
    /// for byte; protobuf carries every family, the session histograms with
    /// native buckets.
    #[test]
    fn histogram_modes_in_text_and_protobuf() {
        use prometheus_client::encoding::prometheus_protobuf::prometheus_data_model as dm;
        use prost::Message as _;

        let modes = [HistogramMode::Classic, HistogramMode::Both, HistogramMode::Native];
        let metrics = modes.map(|mode| Metrics::new(vec![parse_label("region=eu").unwrap()], &[], mode).unwrap());
        for m in &metrics {
            m.record(&session(4_000_000, 10, Some(2)), &[], 1_000_000);
            m.add_drops("no_socket", "lo", 3);
        }
        // process_* moves between two encodes.
        let text = |m: &Metrics| -> String {
            m.encode().unwrap().lines().filter(|l| !l.contains("process_")).map(|l| format!("{l}\n")).collect()
        };
        let [classic, both, native] = metrics.each_ref().map(text);
        assert_eq!(classic, both);
        let series = r#"direction="transmit",impaired="false",protocol="tcp",region="eu""#;
        assert!(
            classic
                .contains(&format!("observer_session_goodput_bytes_per_second_bucket{{{series},le=\"3160000\"}} 1\n"))
        );
        assert!(
            native.contains(&format!("observer_session_goodput_bytes_per_second_bucket{{{series},le=\"+Inf\"}} 1\n"))
        );
        assert!(native.contains(&format!("observer_session_goodput_bytes_per_second_count{{{series}}} 1\n")));
        assert!(!native.contains("le=\"3160000\""), "{native}");
        // Native only changes the session histograms.
        let others = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !["goodput_bytes_per_second", "duration_seconds"].iter().any(|h| l.contains(h)))
                .map(String::from)
                .collect()
        };
        assert_eq!(others(&classic), others(&native));

        let protobuf = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited";
        assert_eq!(metrics[0].negotiate(Some(protobuf)), Format::Text, "classic: always text");
        assert_eq!(metrics[1].negotiate(Some(protobuf)), Format::Protobuf);
        assert_eq!(metrics[1].negotiate(Some("text/plain;version=0.0.4")), Format::Text);
        for (m, classic_buckets) in [(&metrics[1], 33), (&metrics[2], 0)] {
            let body = m.encode_protobuf();
            let mut read = &body[..];
            let mut families = Vec::new();
            while !read.is_empty() {
                families.push(dm::MetricFamily::decode_length_delimited(&mut read).unwrap());
            }
            // The same families as the text, in the same order.
            let names: Vec<&str> = families.iter().map(|f| f.name.as_str()).collect();
            let text_names: Vec<&str> =
                classic.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next()).collect();
            let without_process: Vec<&str> = names.iter().copied().filter(|n| !n.starts_with("process_")).collect();
            assert_eq!(without_process, text_names);
            let goodput = families.iter().find(|f| f.name == "observer_session_goodput_bytes_per_second").unwrap();
            assert_eq!(goodput.r#type, dm::MetricType::Histogram as i32);
            let transmit = goodput
                .metric
                .iter()
                .find(|m| m.label.iter().any(|l| l.value == "transmit") && m.label.iter().any(|l| l.value == "false"))
                .and_then(|m| m.histogram.as_ref())
                .unwrap();
            assert_eq!((transmit.sample_count, transmit.sample_sum), (1, 2e6));
            assert_eq!(transmit.bucket.len(), classic_buckets);
            assert_eq!((transmit.schema, transmit.zero_count), (native::SCHEMA, 0));
            // 2e6 B/s: bucket ceil(log2(2e6) * 8) = 168.
            let index = native::bucket_index(native::SCHEMA, 2e6);
            assert_eq!(index, 168);
            assert_eq!(transmit.positive_span, vec![dm::BucketSpan { offset: index, length: 1 }]);
            assert_eq!(transmit.positive_delta, vec![1]);
            let drops = families.iter().find(|f| f.name == "observer_drops_total").unwrap();
            assert_eq!(drops.metric[0].counter.as_ref().unwrap().value, 3.0);
        }
    }

    #[test]
    fn session_labels_sit_between_own_and_static_labels_and_expired_sets_leave() {
        let m =
            Metrics::new(vec![parse_label("region=eu").unwrap()], &["comm", "peer_port"], HistogramMode::Both).unwrap();
        let text = m.encode().unwrap();
        assert!(!text.contains("observer_sessions_total{"), "no series before a session: {text}");
        assert!(text.contains(r#"observer_label_overflow_total{label="peer_port"} 0"#), "{text}");
        assert!(text.contains(r#"observer_label_overflow_total{label="label_set"} 0"#), "{text}");
        let curl = vec!["curl".to_string(), "443".to_string()];
        m.record(&session(2_000_000, 0, Some(1)), &curl, 1_000_000);
        m.record(&session(10, 0, Some(1)), &["wget".to_string(), "other".to_string()], 1_000_000);
        m.label_overflow("peer_port");
        let text = m.encode().unwrap();
        let has = |text: &str, line: &str| text.lines().any(|l| l == line);
        assert!(
            has(&text, r#"observer_sessions_total{comm="curl",peer_port="443",protocol="tcp",region="eu"} 1"#),
            "{text}"
        );
        assert!(has(&text, r#"observer_label_overflow_total{label="peer_port"} 1"#), "{text}");
        assert!(has(
            &text,
            r#"observer_session_goodput_bytes_per_second_count{comm="curl",direction="transmit",impaired="false",peer_port="443",protocol="tcp",region="eu"} 1"#
        ));
        m.remove_session_series(&curl);
        let text = m.encode().unwrap();
        assert!(!text.contains(r#"comm="curl""#), "{text}");
        assert!(
            has(&text, r#"observer_sessions_total{comm="wget",peer_port="other",protocol="tcp",region="eu"} 1"#),
            "{text}"
        );
    }
}
