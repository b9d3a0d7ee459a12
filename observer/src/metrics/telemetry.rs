//! The observer's metrics about itself: its kernel programs' run counts and
//! run time (the kernel's BPF statistics), whether each is attached, how full
//! its kernel tables are, how long scrapes take, and the standard `process_*`
//! metrics. Operators need these to show that a node agent does not hurt the
//! node, and to see a table filling up before it drops data.
use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::Mutex,
    time::Duration,
};

use prometheus::{
    CounterVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

/// Scrape duration buckets, 1 ms to 10 s: a scrape normally takes a
/// millisecond or two; seconds mean a blocked lock or a huge table.
const SCRAPE_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Why the server refused a request (`observer_http_requests_rejected_total`).
pub const REJECT_REASONS: [&str; 4] = ["scrapes_in_flight", "scrape_wait", "auth_busy", "health_only"];

/// Table usage, scrape duration, refreshes and refused requests, updated by
/// the pipeline and the server.
pub struct SelfMetrics {
    map_entries: IntGaugeVec,
    map_capacity: IntGaugeVec,
    scrape_duration: Histogram,
    refreshes: IntCounter,
    refreshes_in_flight: IntGauge,
    rejected: IntCounterVec,
    state_discarded: IntCounterVec,
}

impl SelfMetrics {
    /// Creates and registers the families (and the process collector).
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let map_entries = IntGaugeVec::new(
            Opts::new(
                "observer_bpf_map_entries",
                "Entries in use in a kernel table, counted at the last scrape. map=open_sessions: open TCP sessions; map=udp_flows: UDP flows. When it reaches observer_bpf_map_capacity new entries are dropped (see observer_events_lost_total).",
            ),
            &["map"],
        )?;
        let map_capacity = IntGaugeVec::new(
            Opts::new("observer_bpf_map_capacity", "Maximum number of entries of a kernel table (max_entries)."),
            &["map"],
        )?;
        let scrape_duration = Histogram::with_opts(
            HistogramOpts::new(
                "observer_scrape_duration_seconds",
                "Time to answer /metrics (refreshing kernel-side counters and encoding), observed after each scrape, so the exposition shows the scrapes before it.",
            )
            .buckets(SCRAPE_BUCKETS.to_vec()),
        )?;
        let refreshes = IntCounter::new(
            "observer_scrape_refreshes_total",
            "Refreshes of kernel-side counters (table walks) run for scrapes. Concurrent scrapes share one, and a scrape reuses one begun less than 200 ms before it arrived, so this grows slower than observer_scrape_duration_seconds_count under many scrapers.",
        )?;
        let refreshes_in_flight = IntGauge::new(
            "observer_scrape_refreshes_in_flight",
            "Refreshes of kernel-side counters running now: 0 or 1 (they never overlap).",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "observer_http_requests_rejected_total",
                "Requests answered 503 with Retry-After instead of being served. reason=scrapes_in_flight: too many /metrics and snapshot requests already in flight; scrape_wait: waited too long for a turn; auth_busy: waited too long for a password check; health_only: a data request on a connection admitted only for health probes (every other slot held).",
            ),
            &["reason"],
        )?;
        for reason in REJECT_REASONS {
            rejected.with_label_values(&[reason]);
        }
        let state_discarded = IntCounterVec::new(
            Opts::new(
                "observer_state_discarded_total",
                "Pinned kernel state (--state-dir) this start found and discarded instead of reusing it, so sessions open across the restart lost their birth. reason=layout_version: left by an observer of another layout version; map_layout: a pinned table of another type, key or value size; capacity: a pinned table of another size than --max-sessions or --max-udp-flows.",
            ),
            &["reason"],
        )?;
        for reason in crate::kernel::state::Discard::ALL {
            state_discarded.with_label_values(&[reason.as_str()]);
        }
        registry.register(Box::new(map_entries.clone()))?;
        registry.register(Box::new(map_capacity.clone()))?;
        registry.register(Box::new(scrape_duration.clone()))?;
        registry.register(Box::new(refreshes.clone()))?;
        registry.register(Box::new(refreshes_in_flight.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(state_discarded.clone()))?;
        registry.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        Ok(SelfMetrics {
            map_entries,
            map_capacity,
            scrape_duration,
            refreshes,
            refreshes_in_flight,
            rejected,
            state_discarded,
        })
    }

    /// Records a kernel table's usage (called from the live sweep at scrape).
    pub fn map_usage(&self, map: &str, entries: usize, capacity: usize) {
        self.map_entries.with_label_values(&[map]).set(entries as i64);
        self.map_capacity.with_label_values(&[map]).set(capacity as i64);
    }

    pub fn observe_scrape(&self, took: Duration) {
        self.scrape_duration.observe(took.as_secs_f64());
    }

    /// A refresh of kernel-side counters starts: counted, and in flight
    /// until `refresh_ended`.
    pub fn refresh_started(&self) {
        self.refreshes.inc();
        self.refreshes_in_flight.inc();
    }

    pub fn refresh_ended(&self) {
        self.refreshes_in_flight.dec();
    }

    /// Pinned state was discarded at start, for `reason`.
    pub fn state_discarded(&self, reason: crate::kernel::state::Discard) {
        self.state_discarded.with_label_values(&[reason.as_str()]).inc();
    }

    /// A request was answered 503; `reason` is one of [`REJECT_REASONS`].
    pub fn request_rejected(&self, reason: &str) {
        self.rejected.with_label_values(&[reason]).inc();
    }
}

/// Turns on the kernel's BPF run-time statistics (the switch behind
/// `kernel.bpf_stats_enabled`, whose sysctl value is left alone) for as long
/// as the returned descriptor is open. The kernel counts holders, so the
/// previous state returns by itself when the observer exits, however it exits. `None` (logged) on kernels before 5.8 or without the privilege:
/// run counts then stay at whatever the sysctl gives.
pub fn enable_bpf_stats() -> Option<OwnedFd> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(e) => {
            tracing::warn!(error = %e, "cannot enable BPF run-time statistics; observer_bpf_program_run* stay at zero unless kernel.bpf_stats_enabled is set");
            None
        }
    }
}

/// One of our programs: its name in the object, a descriptor of it once
/// loaded (its statistics are read through it, which needs no capability,
/// unlike looking programs up by id), and whether it is attached.
#[derive(Debug)]
pub struct ProgramEntry {
    pub name: String,
    pub fd: Option<OwnedFd>,
    pub attached: bool,
}

/// Per program: attached state, run count, run time and skipped runs, read
/// from the kernel at every scrape.
pub struct BpfPrograms {
    programs: Vec<ProgramEntry>,
    run_seconds: CounterVec,
    runs: IntCounterVec,
    recursion_misses: IntCounterVec,
    attached: IntGaugeVec,
    /// Last statistics seen per program name: the counters advance by the
    /// difference.
    last: Mutex<HashMap<String, ProgramStats>>,
}

impl BpfPrograms {
    pub fn new(programs: Vec<ProgramEntry>) -> prometheus::Result<Self> {
        let run_seconds = CounterVec::new(
            Opts::new(
                "observer_bpf_program_run_seconds_total",
                "Time the kernel spent running this program (BPF statistics, run_time_ns), counted while the observer runs; rate() is the share of a CPU it costs.",
            ),
            &["program"],
        )?;
        let runs = IntCounterVec::new(
            Opts::new(
                "observer_bpf_program_runs_total",
                "Times the kernel ran this program (BPF statistics, run_cnt).",
            ),
            &["program"],
        )?;
        let recursion_misses = IntCounterVec::new(
            Opts::new(
                "observer_bpf_program_recursion_misses_total",
                "Times the kernel skipped this program because it was already running on that CPU (the hook was hit again from an interrupt; the kernel's recursion_misses, 5.12+). Each is an event the observer did not see: for obs_state_* a session's birth or close (a missed close leaves its session unreported), for obs_send/obs_recv a call's bytes and active time, for obs_kfree_skb a drop. Data loss inside the observer itself is in observer_events_lost_total.",
            ),
            &["program"],
        )?;
        let attached = IntGaugeVec::new(
            Opts::new(
                "observer_bpf_program_attached",
                "1 when the program is attached to its hook, 0 when it is part of the object but not attached (its concern uses another hook or none).",
            ),
            &["program"],
        )?;
        for p in &programs {
            attached.with_label_values(&[&p.name]).set(i64::from(p.attached));
            if p.fd.is_some() {
                run_seconds.with_label_values(&[&p.name]);
                runs.with_label_values(&[&p.name]);
                recursion_misses.with_label_values(&[&p.name]);
            }
        }
        Ok(BpfPrograms { programs, run_seconds, runs, recursion_misses, attached, last: Mutex::new(HashMap::new()) })
    }

    /// Reads our programs' statistics through their descriptors.
    fn refresh(&self) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        for p in &self.programs {
            let Some(now) = p.fd.as_ref().and_then(|fd| program_stats(fd.as_fd().as_raw_fd())) else { continue };
            let prev = last.insert(p.name.clone(), now).unwrap_or_default();
            let run_ns = now.run_time_ns.saturating_sub(prev.run_time_ns);
            self.run_seconds.with_label_values(&[&p.name]).inc_by(Duration::from_nanos(run_ns).as_secs_f64());
            self.runs.with_label_values(&[&p.name]).inc_by(now.run_count.saturating_sub(prev.run_count));
            self.recursion_misses
                .with_label_values(&[&p.name])
                .inc_by(now.recursion_misses.saturating_sub(prev.recursion_misses));
        }
    }
}

impl Collector for BpfPrograms {
    fn desc(&self) -> Vec<&Desc> {
        [self.run_seconds.desc(), self.runs.desc(), self.recursion_misses.desc(), self.attached.desc()].concat()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.refresh();
        [self.run_seconds.collect(), self.runs.collect(), self.recursion_misses.collect(), self.attached.collect()]
            .concat()
    }
}

/// A program's run time, run count and skipped runs, as the kernel prints
/// them in its descriptor's fdinfo (`recursion_misses` from 5.12).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ProgramStats {
    run_time_ns: u64,
    run_count: u64,
    recursion_misses: u64,
}

fn program_stats(fd: i32) -> Option<ProgramStats> {
    parse_program_stats(&std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?)
}

fn parse_program_stats(fdinfo: &str) -> Option<ProgramStats> {
    let field =
        |name: &str| fdinfo.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse::<u64>().ok());
    Some(ProgramStats {
        run_time_ns: field("run_time_ns")?,
        run_count: field("run_cnt")?,
        recursion_misses: field("recursion_misses").unwrap_or(0),
    })
}

/// Our programs as loaded in `ebpf`, with the names of those attached.
pub fn program_entries(ebpf: &aya::Ebpf, attached: &[&str]) -> Vec<ProgramEntry> {
    let mut entries: Vec<ProgramEntry> = ebpf
        .programs()
        .map(|(name, program)| ProgramEntry {
            name: name.to_string(),
            fd: program.fd().ok().and_then(|fd| fd.as_fd().try_clone_to_owned().ok()),
            attached: attached.contains(&name),
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_metrics_export_tables_scrapes_and_process() {
        let registry = Registry::new();
        let m = SelfMetrics::new(&registry).unwrap();
        m.map_usage("open_sessions", 3, 65_536);
        m.observe_scrape(Duration::from_millis(2));
        let programs = vec![
            ProgramEntry { name: "obs_state_tp".into(), fd: None, attached: true },
            ProgramEntry { name: "obs_state_fe".into(), fd: None, attached: false },
        ];
        registry.register(Box::new(BpfPrograms::new(programs).unwrap())).unwrap();
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &registry.gather(), &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        for line in [
            r#"observer_bpf_map_entries{map="open_sessions"} 3"#,
            r#"observer_bpf_map_capacity{map="open_sessions"} 65536"#,
            "observer_scrape_duration_seconds_count 1",
            "observer_scrape_refreshes_total 0",
            "observer_scrape_refreshes_in_flight 0",
            r#"observer_http_requests_rejected_total{reason="scrape_wait"} 0"#,
            r#"observer_bpf_program_attached{program="obs_state_tp"} 1"#,
            r#"observer_bpf_program_attached{program="obs_state_fe"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
    }

    #[test]
    fn program_statistics_from_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000000\nprog_type:\t26\nrun_time_ns:\t5\nrun_cnt:\t1\nrecursion_misses:\t226\nverified_insns:\t1459\n";
        assert_eq!(
            parse_program_stats(fdinfo),
            Some(ProgramStats { run_time_ns: 5, run_count: 1, recursion_misses: 226 })
        );
        let before_5_12 = "pos:\t0\nrun_time_ns:\t7\nrun_cnt:\t2\n";
        assert_eq!(
            parse_program_stats(before_5_12),
            Some(ProgramStats { run_time_ns: 7, run_count: 2, recursion_misses: 0 })
        );
        assert_eq!(parse_program_stats("pos:\t0\n"), None);
    }
}
