//! The short-connection workload's own figures, beyond its on/off rate: sessions lost
//! at the highest rate, the ring buffer's zero-loss rate, the observer's CPU per
//! closed session and its memory at rest and with many connections open.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::connload::{self, CLIENT_THREADS, PAYLOAD_BYTES};
use super::scrape::{self, Scraper};
use super::stats::median;
use super::sys::{NetNs, Proc};

/// The observer counts both ends of a loopback connection.
pub const SESSIONS_PER_CONNECTION: f64 = 2.0;
/// Target: at least this many connections per second with the observer on.
pub const TARGET_RATE: f64 = 20_000.0;
/// Targets of the observer process: share of one core at 10,000 closed sessions per
/// second, and resident memory with `HOLD_CONNECTIONS` open.
pub const TARGET_CORE_SHARE: f64 = 0.02;
pub const TARGET_RSS_BYTES: u64 = 64 << 20;
pub const HOLD_CONNECTIONS: usize = 100_000;
/// `--max-sessions` of the run with connections held open: both ends of each, and room.
pub const HOLD_MAX_SESSIONS: u32 = 262_144;
/// How long after the generator stops the observer may take to report the last
/// sessions (records in the ring buffer, events being processed).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one "on" measurement showed beyond its rate.
#[derive(Debug, Clone, PartialEq)]
pub struct OnRun {
    pub run: connload::Run,
    /// Increase of `observer_sessions_total{protocol="tcp"}` over the run.
    pub sessions: f64,
    /// Increase of `observer_sessions_ignored_total` (closed sessions the `--iface lo`
    /// filter did not attribute to `lo`): seen, but not reported.
    pub ignored: f64,
    /// Increase of `observer_events_lost_total` (all sources), and of its
    /// `session_ring_full` source alone.
    pub events_lost: f64,
    pub ring_lost: f64,
    /// Increase of its `session_close_missed` source: sessions whose close no program
    /// saw, reported when their socket's address was reused (counted in `sessions`,
    /// so not lost, but reported late and without a lifetime).
    pub late_closes: f64,
    /// Observer process CPU seconds (user + system) from just before the run until
    /// its sessions were counted.
    pub cpu_seconds: f64,
    /// Observer resident memory once ready, before the run.
    pub rss_rest: u64,
    /// Whether it was an "on+stats" measurement (kernel BPF statistics on).
    pub statistics: bool,
}

impl OnRun {
    /// Sessions the observer should have counted and did not.
    pub fn sessions_lost(&self) -> f64 {
        (self.run.connections as f64 * SESSIONS_PER_CONNECTION - self.sessions - self.ignored).max(0.0)
    }
}

/// Runs the generator flat out with the observer running and reads what the observer
/// counted of it; `statistics` says whether it runs with the kernel's BPF statistics on.
pub fn measure_on(ns: &NetNs, observer: &Proc, listen: SocketAddr, seconds: u32, statistics: bool) -> Result<OnRun> {
    let pid = observer.pid();
    let mut scraper = Scraper::new(ns, listen);
    let rss_rest = scrape::rss_bytes(pid)?;
    let before = Counts::read(&mut scraper)?;
    let cpu_before = scrape::cpu_seconds(pid)?;
    let run = connload::run(ns, Duration::from_secs(seconds.into()), None)?;
    let expected = run.connections as f64 * SESSIONS_PER_CONNECTION;
    // Wait until every session is counted, or the count stops moving.
    let started = Instant::now();
    let mut last = before.clone();
    let mut still_since = Instant::now();
    let after = loop {
        thread::sleep(Duration::from_millis(100));
        let now = Counts::read(&mut scraper)?;
        let seen = now.sessions + now.ignored - before.sessions - before.ignored;
        if seen >= expected || started.elapsed() > SETTLE_TIMEOUT {
            break now;
        }
        if now != last {
            still_since = Instant::now();
            last = now;
        } else if still_since.elapsed() > Duration::from_secs(1) {
            break now;
        }
    };
    let cpu_seconds = scrape::cpu_seconds(pid)? - cpu_before;
    Ok(OnRun {
        run,
        sessions: after.sessions - before.sessions,
        ignored: after.ignored - before.ignored,
        events_lost: after.lost - before.lost,
        ring_lost: after.ring_lost - before.ring_lost,
        late_closes: after.missed - before.missed,
        cpu_seconds,
        rss_rest,
        statistics,
    })
}

#[derive(Debug, Clone, PartialEq)]
struct Counts {
    sessions: f64,
    ignored: f64,
    lost: f64,
    ring_lost: f64,
    missed: f64,
}

impl Counts {
    fn read(scraper: &mut Scraper) -> Result<Self> {
        Ok(Self::read_from(&scraper.metrics()?))
    }

    fn read_from(text: &str) -> Self {
        let lost = "observer_events_lost_total";
        Counts {
            sessions: scrape::sample(text, "observer_sessions_total", &[("protocol", "tcp")]),
            ignored: scrape::sample(text, "observer_sessions_ignored_total", &[]),
            lost: scrape::sample(text, lost, &[]),
            ring_lost: scrape::sample(text, lost, &[("source", "session_ring_full")]),
            missed: missed_closes(text),
        }
    }
}

/// The observer with many connections open.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub connections: usize,
    /// `observer_bpf_map_entries{map="open_sessions"}` while they were open.
    pub open_sessions: f64,
    pub table_lost: f64,
    /// The highest VmRSS while two scrapes copied the table of open sessions.
    pub rss: u64,
    pub open_seconds: f64,
    pub close: MassClose,
}

/// The held connections closed at once while `/metrics` is scraped back to back.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MassClose {
    /// Increase of `observer_sessions_total{protocol="tcp"}` until the table emptied.
    pub sessions: f64,
    /// Increase of `observer_events_lost_total{source="session_ring_full"}`.
    pub ring_lost: f64,
    /// Held sessions still in the table at the end (its entries less those of
    /// other open connections: the scrapers'): closes no hook saw (counted in
    /// `session_close_missed` once their address is reused).
    pub left_open: f64,
    /// Seconds from the first close to the last record read.
    pub seconds: f64,
    /// Scrapes answered meanwhile, and the longest of them.
    pub scrapes: u32,
    pub longest_scrape: f64,
}

/// Opens `n` connections with the observer running (`--max-sessions
/// HOLD_MAX_SESSIONS`), scrapes once so that it walks its table of open sessions,
/// reads its resident memory, then closes them all at once while scraping.
pub fn measure_held(ns: &NetNs, observer: &Proc, listen: SocketAddr, n: usize) -> Result<Held> {
    let mut scraper = Scraper::new(ns, listen);
    let started = Instant::now();
    let xtask = std::env::current_exe().context("finding xtask's own executable")?;
    let held = connload::open_and_hold(ns, n, &xtask)?;
    let open_seconds = started.elapsed().as_secs_f64();
    // Twice: the first scrape may be the one that first sees them all. The
    // observer's memory peaks while a scrape copies its table (and returns
    // that copy after), so it is sampled all along.
    let sample_rss = |highest: &mut u64| -> Result<()> {
        *highest = (*highest).max(scrape::rss_bytes(observer.pid())?);
        thread::sleep(Duration::from_millis(2));
        Ok(())
    };
    let (text, highest) =
        alongside("the memory sampler", 0, sample_rss, || scraper.metrics().and_then(|_| scraper.metrics()));
    let (text, rss) = (text?, highest?.max(scrape::rss_bytes(observer.pid())?));
    let open_sessions = scrape::sample(&text, "observer_bpf_map_entries", &[("map", "open_sessions")]);
    let close = mass_close(ns, listen, &mut scraper, held, SESSIONS_PER_CONNECTION * n as f64)?;
    Ok(Held {
        connections: n,
        open_sessions,
        table_lost: scrape::sample(&text, "observer_events_lost_total", &[("source", "session_table_full")]),
        rss,
        open_seconds,
        close,
    })
}

/// Closes the held connections (`closing` sessions) at once (their helpers
/// exit, then the listener with the server ends closes) while a second scraper
/// scrapes back to back: each scrape copies the table of open sessions, and
/// the session reader must keep emptying its ring meanwhile. Returns when every
/// closing session is counted, lost or left in the table, or after
/// `SETTLE_TIMEOUT`.
fn mass_close(
    ns: &NetNs,
    listen: SocketAddr,
    scraper: &mut Scraper,
    held: connload::Held,
    closing: f64,
) -> Result<MassClose> {
    let mut second = Scraper::new(ns, listen);
    let text = scraper.metrics()?;
    let before = Counts::read_from(&text);
    let missed_before = missed_closes(&text);
    // Both scrapers' connections (two sessions each) stay open.
    let others = scrape::sample(&text, "observer_bpf_map_entries", &[("map", "open_sessions")]) - closing;
    let scrape_once = |(count, longest): &mut (u32, f64)| -> Result<()> {
        let t = Instant::now();
        second.metrics()?;
        *longest = longest.max(t.elapsed().as_secs_f64());
        *count += 1;
        Ok(())
    };
    let started = Instant::now();
    let (close, scrapes) = alongside("the scraping thread", (0, 0.0), scrape_once, || {
        drop(held);
        settle(scraper, &before, closing, others, started)
    });
    let (mut close, (scrapes, longest_scrape)) = (close?, scrapes?);
    close.scrapes = scrapes;
    close.longest_scrape = longest_scrape;
    // A missed close found meanwhile was counted as a session, and is not still open.
    close.sessions -= missed_closes(&scraper.metrics()?) - missed_before;
    Ok(close)
}

/// Runs `main` while another thread repeats `step` on `state` until `main`
/// returns, and gives back both; a failed step ends the repetition with its
/// error. `what` names that thread should it panic.
fn alongside<S: Send, T>(
    what: &str,
    mut state: S,
    mut step: impl FnMut(&mut S) -> Result<()> + Send,
    main: impl FnOnce() -> T,
) -> (T, Result<S>) {
    let stop = AtomicBool::new(false);
    thread::scope(|s| {
        let repeating = s.spawn(|| -> Result<S> {
            while !stop.load(Ordering::Relaxed) {
                step(&mut state)?;
            }
            Ok(state)
        });
        let out = main();
        stop.store(true, Ordering::Relaxed);
        (out, repeating.join().map_err(|_| anyhow::anyhow!("{what} panicked")).and_then(|r| r))
    })
}

/// Waits until the records of the closed sessions are read: the table's entries
/// stop falling and the sessions counted stop rising, with every closing
/// session counted, lost or left; `others` are the table's other entries.
fn settle(scraper: &mut Scraper, before: &Counts, closing: f64, others: f64, started: Instant) -> Result<MassClose> {
    let mut last = (f64::NAN, f64::NAN);
    let mut seconds = 0.0;
    loop {
        thread::sleep(Duration::from_millis(500));
        let text = scraper.metrics()?;
        let now = Counts::read_from(&text);
        let left_open = scrape::sample(&text, "observer_bpf_map_entries", &[("map", "open_sessions")]) - others;
        let (sessions, ring_lost) = (now.sessions - before.sessions, now.ring_lost - before.ring_lost);
        let changed = (sessions, left_open) != last;
        if changed {
            seconds = started.elapsed().as_secs_f64();
        }
        let complete = !changed && sessions + ring_lost + left_open >= closing;
        if complete || started.elapsed() > SETTLE_TIMEOUT {
            return Ok(MassClose { sessions, ring_lost, left_open, seconds, ..Default::default() });
        }
        last = (sessions, left_open);
    }
}

fn missed_closes(text: &str) -> f64 {
    scrape::sample(text, "observer_events_lost_total", &[("source", "session_close_missed")])
}

/// Target: the observer's on/off ratio at least the reference tracer's less this, in
/// the same rounds (issue 28), and at least `TARGET_PEER_RATIO`.
pub const TARGET_RATIO_BELOW_REFERENCE: f64 = 0.01;
pub const TARGET_PEER_RATIO: f64 = 0.95;
/// Targets: kernel time per connection of the observer (default concerns) and of
/// close-only accounting, at most these multiples of the reference tracer's.
pub const TARGET_NS_VS_REFERENCE: f64 = 1.5;
pub const TARGET_CLOSE_ONLY_VS_REFERENCE: f64 = 1.1;
/// `observer run --disable` of every optional concern: close-only accounting.
pub const CLOSE_ONLY_DISABLE: &str = "tcp_owner,sock_calls,udp_release,drops,tcp_errors";

/// A peer of the observer measured in the same rounds as "off" and "on": the
/// reference tracer (`observer/examples/reference_tracer.rs`), with or without the
/// kernel's BPF statistics, or the observer with every optional concern switched
/// off (close-only accounting, statistics on).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRun {
    /// Index of its round.
    pub round: usize,
    pub run: connload::Run,
    pub statistics: bool,
    /// Its programs' run time over the run (0 without statistics).
    pub run_ns: u64,
}

/// Programs' run time per connection over the runs with statistics.
pub fn ns_per_connection(runs: &[PeerRun]) -> Option<f64> {
    let stats = || runs.iter().filter(|r| r.statistics);
    let connections: u64 = stats().map(|r| r.run.connections).sum();
    let run_ns: u64 = stats().map(|r| r.run_ns).sum();
    (connections > 0 && run_ns > 0).then(|| run_ns as f64 / connections as f64)
}

/// The short-connection workload's findings, for its section of the report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Findings {
    /// Connections held open in the memory measurement.
    pub hold: usize,
    pub on_runs: Vec<OnRun>,
    pub held: Option<Held>,
    /// The reference tracer's runs ("ref" and "ref+stats"), in the same rounds.
    pub reference_runs: Vec<PeerRun>,
    /// The observer's runs with every optional concern off ("close-only+stats").
    pub close_only_runs: Vec<PeerRun>,
}

const MIB: f64 = 1024.0 * 1024.0;

impl Findings {
    /// The reference tracer's on/off ratio per round (its run without statistics
    /// over the round's "off"), `offs` being each round's "off" rate.
    pub fn reference_ratios(&self, offs: &[f64]) -> Vec<f64> {
        self.reference_runs
            .iter()
            .filter(|r| !r.statistics)
            .filter_map(|r| offs.get(r.round).filter(|&&off| off > 0.0).map(|off| r.run.rate() / off))
            .collect()
    }

    /// The peers' part of the section: the reference tracer's ratio beside the
    /// observer's (`observer_ratio`, median of rounds), and the kernel time per
    /// connection of the observer (`observer_ns`), the reference and close-only
    /// accounting, with the targets of issue 28.
    pub fn write_peers(
        &self,
        s: &mut String,
        offs: &[f64],
        observer_ratio: f64,
        observer_ns: Option<f64>,
        verdict: impl Fn(bool) -> &'static str,
    ) -> std::fmt::Result {
        if self.reference_runs.is_empty() && self.close_only_runs.is_empty() {
            return Ok(());
        }
        writeln!(
            s,
            "
Peers in the same rounds: \"ref\" is the reference tracer (`observer/examples/reference_tracer.rs`, \
             kernel side `observer-ebpf/src/reference.rs`: a minimal tcplife on tp_btf `inet_sock_set_state`, a birth \
             hash keyed by the socket, bytes and lifetime read at close into an in-kernel log2 histogram, the \
             entry deleted), without and with BPF statistics (\"ref\", \"ref+stats\"); \"close-only+stats\" is \
             `observer run --disable {CLOSE_ONLY_DISABLE}` with statistics: close-only accounting. Kernel time \
             per connection is the programs' run time over the connections of the runs with statistics.\n"
        )?;
        writeln!(s, "| round | ref (conn/s) | ref/off | ref+stats (conn/s) | close-only+stats (conn/s) |")?;
        writeln!(s, "|---:|---:|---:|---:|---:|")?;
        let rounds =
            self.reference_runs.iter().chain(&self.close_only_runs).map(|r| r.round).max().map_or(0, |m| m + 1);
        for i in 0..rounds {
            let find =
                |runs: &[PeerRun], stats: bool| runs.iter().find(|r| r.round == i && r.statistics == stats).cloned();
            let rate =
                |r: &Option<PeerRun>| r.as_ref().map_or_else(|| "–".to_owned(), |r| format!("{:.0}", r.run.rate()));
            let reference = find(&self.reference_runs, false);
            let ratio = match (&reference, offs.get(i)) {
                (Some(r), Some(&off)) if off > 0.0 => format!("{:.3}", r.run.rate() / off),
                _ => "–".to_owned(),
            };
            writeln!(
                s,
                "| {} | {} | {ratio} | {} | {} |",
                i + 1,
                rate(&reference),
                rate(&find(&self.reference_runs, true)),
                rate(&find(&self.close_only_runs, true)),
            )?;
        }
        writeln!(s)?;
        writeln!(s, "| peer figure | value | target | |")?;
        writeln!(s, "|---|---:|---|---|")?;
        let ratios = self.reference_ratios(offs);
        if let (Some(reference), Some((lo, hi))) = (median(&ratios), super::stats::spread(&ratios)) {
            let bar = (reference - TARGET_RATIO_BELOW_REFERENCE).max(TARGET_PEER_RATIO);
            writeln!(
                s,
                "| on/off: observer {observer_ratio:.3}; reference tracer {reference:.3} (rounds {lo:.3}–{hi:.3}) | {:+.3} | observer ≥ reference − {TARGET_RATIO_BELOW_REFERENCE} and ≥ {TARGET_PEER_RATIO} | {} |",
                observer_ratio - reference,
                verdict(observer_ratio >= bar)
            )?;
        }
        let reference_ns = ns_per_connection(&self.reference_runs);
        let close_only_ns = ns_per_connection(&self.close_only_runs);
        let show = |ns: Option<f64>| ns.map_or_else(|| "–".to_owned(), |ns| format!("{ns:.0} ns"));
        writeln!(
            s,
            "| kernel time per connection: observer (default concerns); reference tracer; close-only accounting | {}; {}; {} | | |",
            show(observer_ns),
            show(reference_ns),
            show(close_only_ns)
        )?;
        if let Some(reference) = reference_ns {
            for (what, ns, bar) in [
                ("observer (default concerns)", observer_ns, TARGET_NS_VS_REFERENCE),
                ("close-only accounting", close_only_ns, TARGET_CLOSE_ONLY_VS_REFERENCE),
            ] {
                if let Some(ns) = ns {
                    writeln!(
                        s,
                        "| kernel time per connection, {what} / reference tracer's | {:.2} × | ≤ {bar} × | {} |",
                        ns / reference,
                        verdict(ns <= bar * reference)
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Observer CPU seconds per 100,000 closed sessions, over all "on" runs.
    pub fn cpu_per_100k_sessions(&self) -> Option<f64> {
        let cpu: f64 = self.on_runs.iter().map(|r| r.cpu_seconds).sum();
        let sessions: f64 = self.on_runs.iter().map(|r| r.sessions).sum();
        (sessions > 0.0).then(|| cpu / sessions * 100_000.0)
    }

    /// Highest rate of an "on" run whose ring buffer lost no record (sessions missed
    /// for other reasons are in `sessions_lost`).
    pub fn zero_loss_rate(&self) -> Option<f64> {
        self.on_runs.iter().filter(|r| r.ring_lost == 0.0).map(|r| r.run.rate()).max_by(f64::total_cmp)
    }

    /// Sessions lost over all "on" runs (2 × connections − counted − ignored).
    pub fn sessions_lost(&self) -> f64 {
        self.on_runs.iter().map(OnRun::sessions_lost).sum()
    }

    /// Events lost over all "on" runs, less the late-reported closes (which were
    /// counted): records lost to a full ring or table and the like.
    pub fn events_lost(&self) -> f64 {
        self.on_runs.iter().map(|r| r.events_lost - r.late_closes).sum()
    }

    pub fn late_closes(&self) -> f64 {
        self.on_runs.iter().map(|r| r.late_closes).sum()
    }

    /// The highest rate of an "on" run.
    pub fn top_rate(&self) -> f64 {
        self.on_runs.iter().map(|r| r.run.rate()).fold(0.0, f64::max)
    }

    /// The target "no session lost at the highest rate": every session counted, no
    /// event lost (a close no program saw, reported late, is counted), at a rate of
    /// at least `TARGET_RATE`.
    pub fn none_lost(&self) -> bool {
        self.sessions_lost() == 0.0 && self.events_lost() == 0.0 && self.top_rate() >= TARGET_RATE
    }

    /// The observer's share of one core at 10,000 closed sessions per second, from its
    /// CPU per session.
    pub fn core_share_at_10k(&self) -> Option<f64> {
        self.cpu_per_100k_sessions().map(|cpu| cpu / 100_000.0 * 10_000.0)
    }

    /// Markdown: per-run table, then the figures with their targets.
    pub fn write_markdown(&self, s: &mut String, verdict: impl Fn(bool) -> &'static str) -> std::fmt::Result {
        writeln!(
            s,
            "\nEach \"on\" and \"on+stats\" run: sessions counted are the increase of \
             `observer_sessions_total{{protocol=\"tcp\"}}` over the run (a loopback connection is two); \
             lost = 2 × connections − counted − ignored (not on `lo`); events lost are \
             `observer_events_lost_total`, of them late closes (`session_close_missed`: a close no \
             program saw, counted when its address is reused); CPU and memory are the observer \
             process's.\n"
        )?;
        writeln!(
            s,
            "| \"on\" run | BPF statistics | connections | failed | conn/s | sessions counted | ignored (iface) | sessions lost | \
             events lost (late closes) | observer CPU (s) | RSS at rest (MiB) |"
        )?;
        writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        for (i, r) in self.on_runs.iter().enumerate() {
            writeln!(
                s,
                "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} ({:.0}) | {:.2} | {:.1} |",
                i + 1,
                if r.statistics { "on" } else { "off" },
                r.run.connections,
                r.run.failed,
                r.run.rate(),
                r.sessions,
                r.ignored,
                r.sessions_lost(),
                r.events_lost,
                r.late_closes,
                r.cpu_seconds,
                r.rss_rest as f64 / MIB
            )?;
        }
        let rates: Vec<f64> = self.on_runs.iter().map(|r| r.run.rate()).collect();
        writeln!(s)?;
        writeln!(s, "| figure | value | target | |")?;
        writeln!(s, "|---|---:|---|---|")?;
        writeln!(
            s,
            "| sessions lost; events lost; closes reported late, all \"on\" runs, highest rate {:.0} conn/s | {:.0}; {:.0}; {:.0} | 0 lost at ≥ {TARGET_RATE:.0} conn/s | {} |",
            self.top_rate(),
            self.sessions_lost(),
            self.events_lost(),
            self.late_closes(),
            verdict(self.none_lost())
        )?;
        match self.zero_loss_rate() {
            Some(rate) => writeln!(
                s,
                "| ring buffer: highest closed-session rate with zero loss | {:.0} sessions/s ({rate:.0} conn/s) | | no run lost a ring-buffer record: the generator was the limit |",
                rate * SESSIONS_PER_CONNECTION
            )?,
            None => writeln!(
                s,
                "| ring buffer: highest closed-session rate with zero loss | below {:.0} sessions/s | | every run lost ring-buffer records |",
                rates.iter().copied().fold(f64::INFINITY, f64::min) * SESSIONS_PER_CONNECTION
            )?,
        }
        if let (Some(cpu), Some(share)) = (self.cpu_per_100k_sessions(), self.core_share_at_10k()) {
            writeln!(s, "| observer CPU per 100,000 closed sessions | {cpu:.3} s | | |")?;
            writeln!(
                s,
                "| observer CPU at 10,000 sessions/s (from the line above) | {:.2}% of a core | < {:.0}% | {} |",
                share * 100.0,
                TARGET_CORE_SHARE * 100.0,
                verdict(share < TARGET_CORE_SHARE)
            )?;
        }
        let rest: Vec<f64> = self.on_runs.iter().map(|r| r.rss_rest as f64).collect();
        if let Some(rest) = median(&rest) {
            writeln!(s, "| observer RSS at rest (median of runs) | {:.1} MiB | | |", rest / MIB)?;
        }
        if let Some(h) = &self.held {
            writeln!(
                s,
                "| observer RSS with {} connections open ({:.0} sessions in its table, {:.0} lost to a full table; the highest while two scrapes copied the table) | {:.1} MiB | < {:.0} MiB | {} |",
                h.connections,
                h.open_sessions,
                h.table_lost,
                h.rss as f64 / MIB,
                TARGET_RSS_BYTES / (1 << 20),
                verdict(h.rss_met())
            )?;
            let c = &h.close;
            writeln!(
                s,
                "| the {} connections closed at once while /metrics was scraped ({} scrapes, longest {:.2} s): sessions counted in {:.1} s, records lost to a full ring, closes missed (left in the table) | {:.0}; {:.0}; {:.0} | 0 lost | {} |",
                h.connections,
                c.scrapes,
                c.longest_scrape,
                c.seconds,
                c.sessions,
                c.ring_lost,
                c.left_open,
                verdict(c.ring_lost == 0.0)
            )?;
        }
        Ok(())
    }
}

impl Held {
    /// The target: resident memory below `TARGET_RSS_BYTES` with the connections open.
    pub fn rss_met(&self) -> bool {
        self.rss < TARGET_RSS_BYTES
    }
}

/// How the workload runs; part of the method line.
pub fn method(seconds: u32, hold: usize) -> String {
    format!(
        "xtask's own generator (`xtask/src/bench/connload.rs`: {CLIENT_THREADS} client threads for \
         {seconds} s, each connection sends {PAYLOAD_BYTES} bytes to a server on 127.0.0.1 that \
         closes first) makes as many connections as it can; its figure is connections per second. \
         Then, with the observer on, {hold} connections are opened and held (its highest VmRSS \
         while two scrapes copy its table is the memory figure) and closed at once while \
         `/metrics` is scraped back to back."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_run(connections: u64, sessions: f64, ring_lost: f64, cpu: f64) -> OnRun {
        OnRun {
            run: connload::Run { connections, failed: 0, seconds: 1.0 },
            sessions,
            ignored: 0.0,
            events_lost: ring_lost,
            ring_lost,
            late_closes: 0.0,
            cpu_seconds: cpu,
            rss_rest: 10 << 20,
            statistics: false,
        }
    }

    #[test]
    fn lost_sessions_cpu_and_zero_loss_rate() {
        let f = Findings {
            hold: 1000,
            on_runs: vec![
                on_run(20_000, 40_000.0, 0.0, 0.1),
                on_run(25_000, 49_990.0, 10.0, 0.2),
                OnRun { statistics: true, ..on_run(22_000, 44_000.0, 0.0, 0.0) },
            ],
            ..Findings::default()
        };
        assert_eq!(f.on_runs[0].sessions_lost(), 0.0);
        assert_eq!(f.on_runs[1].sessions_lost(), 10.0);
        let cpu = f.cpu_per_100k_sessions().unwrap();
        assert!((cpu - 0.3 / 133_990.0 * 1e5).abs() < 1e-9, "{cpu}");
        assert_eq!(f.zero_loss_rate(), Some(22_000.0));
        let mut md = String::new();
        f.write_markdown(&mut md, |met| if met { "met" } else { "NOT met" }).unwrap();
        assert!(md.contains("| 2 | off | 25000 | 0 | 25000 | 49990 | 0 | 10 | 10 (0) | 0.20 | 10.0 |"), "{md}");
        assert!(md.contains("| 3 | on | 22000 | 0 |"), "{md}");
        assert!(md.contains("| 10; 10; 0 | 0 lost at ≥ 20000 conn/s | NOT met |"), "{md}");
        assert!(md.contains("| 44000 sessions/s (22000 conn/s) |"), "{md}");
        assert!(Findings::default().cpu_per_100k_sessions().is_none());
        assert!(!f.none_lost());
    }

    /// A close no program saw is counted, late: not a loss. Any other event lost is,
    /// and so is a top rate under the target's.
    #[test]
    fn late_closes_are_not_losses() {
        let late = OnRun { events_lost: 2.0, late_closes: 2.0, ..on_run(25_000, 50_000.0, 0.0, 0.1) };
        let f = Findings {
            hold: 0,
            on_runs: vec![late.clone(), on_run(21_000, 42_000.0, 0.0, 0.1)],
            ..Findings::default()
        };
        assert_eq!((f.sessions_lost(), f.events_lost(), f.late_closes(), f.top_rate()), (0.0, 0.0, 2.0, 25_000.0));
        assert!(f.none_lost());
        let mut md = String::new();
        f.write_markdown(&mut md, |met| if met { "met" } else { "NOT met" }).unwrap();
        assert!(md.contains("highest rate 25000 conn/s | 0; 0; 2 | 0 lost at ≥ 20000 conn/s | met |"), "{md}");
        let table_full = OnRun { events_lost: 3.0, ..late.clone() };
        assert!(!Findings { on_runs: vec![table_full], ..f.clone() }.none_lost());
        let slow = OnRun { run: connload::Run { connections: 19_999, failed: 0, seconds: 1.0 }, ..late };
        assert!(!Findings { on_runs: vec![OnRun { sessions: 39_998.0, ..slow }], ..f }.none_lost());
    }

    fn peer(round: usize, connections: u64, statistics: bool, run_ns: u64) -> PeerRun {
        PeerRun { round, run: connload::Run { connections, failed: 0, seconds: 1.0 }, statistics, run_ns }
    }

    /// The reference's ratio is its run without statistics over the same round's
    /// "off"; kernel time per connection comes from the runs with statistics.
    #[test]
    fn peers_ratios_and_kernel_time_per_connection() {
        let f = Findings {
            reference_runs: vec![
                peer(0, 19_000, false, 0),
                peer(0, 18_000, true, 36_000_000),
                peer(1, 21_000, false, 0),
                peer(1, 22_000, true, 44_000_000),
            ],
            close_only_runs: vec![peer(0, 20_000, true, 44_000_000), peer(1, 20_000, true, 44_000_000)],
            ..Findings::default()
        };
        let offs = [20_000.0, 20_000.0];
        assert_eq!(f.reference_ratios(&offs), [0.95, 1.05]);
        assert_eq!(ns_per_connection(&f.reference_runs), Some(2_000.0));
        assert_eq!(ns_per_connection(&f.close_only_runs), Some(2_200.0));
        assert_eq!(ns_per_connection(&f.reference_runs[..1]), None, "no run with statistics");
        let mut md = String::new();
        f.write_peers(&mut md, &offs, 0.99, Some(3_100.0), |met| if met { "met" } else { "NOT met" }).unwrap();
        assert!(md.contains("| 1 | 19000 | 0.950 | 18000 | 20000 |"), "{md}");
        // Median of 0.95 and 1.05: 1.0; the observer's 0.99 is within 0.01 of it.
        assert!(md.contains("reference tracer 1.000 (rounds 0.950–1.050) | -0.010 |"), "{md}");
        assert!(md.contains("| 3100 ns; 2000 ns; 2200 ns |"), "{md}");
        assert!(md.contains("observer (default concerns) / reference tracer's | 1.55 × | ≤ 1.5 × | NOT met |"), "{md}");
        assert!(md.contains("close-only accounting / reference tracer's | 1.10 × | ≤ 1.1 × | met |"), "{md}");
        let mut none = String::new();
        Findings::default().write_peers(&mut none, &offs, 1.0, None, |_| "").unwrap();
        assert!(none.is_empty(), "{none}");
    }

    #[test]
    fn a_mass_close_is_judged_by_records_lost() {
        let held = |ring_lost| Held {
            connections: 100,
            open_sessions: 200.0,
            table_lost: 0.0,
            rss: 40 << 20,
            open_seconds: 1.0,
            close: MassClose {
                sessions: 200.0 - ring_lost,
                ring_lost,
                left_open: 0.0,
                seconds: 1.5,
                scrapes: 7,
                longest_scrape: 0.25,
            },
        };
        let md = |ring_lost| {
            let f = Findings { hold: 100, held: Some(held(ring_lost)), ..Findings::default() };
            let mut md = String::new();
            f.write_markdown(&mut md, |met| if met { "met" } else { "NOT met" }).unwrap();
            md
        };
        let ok = md(0.0);
        assert!(ok.contains("closed at once while /metrics was scraped (7 scrapes, longest 0.25 s)"), "{ok}");
        assert!(ok.contains("| 200; 0; 0 | 0 lost | met |"), "{ok}");
        assert!(md(3.0).contains("| 197; 3; 0 | 0 lost | NOT met |"));
    }
}
