//! `cargo xtask bench`: loopback workloads with the observer on vs off (workload.rs):
//! TCP bulk, TCP small messages, UDP small datagrams (iperf3), short TCP connections
//! (xtask's own load generator, connload.rs, with figures of its own in shortconn.rs);
//! then the scrape latency with 10,000 series, text and protobuf (scrape_latency.rs), the
//! series a node costs, classic against native histograms (series_economy.rs), and the observer's
//! own footprint, idle and under a churn of sessions (footprint.rs).
//!
//! A run of every workload writes BENCHMARKS.md whole (doc.rs): the targets table,
//! judged from this run's figures, then each workload's section with its method in
//! brief (report.rs and the workloads' own files). The smoke form writes nothing.

mod baseline;
mod churn;
mod connload;
mod doc;
mod footprint;
mod iperf;
mod progs;
mod report;
mod scrape;
mod scrape_latency;
mod series_economy;
mod shortconn;
mod stats;
mod sys;
mod workload;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};

use crate::{build, setup, util};
pub use connload::hold_connections;
use progs::ProgStats;
use report::{Machine, Measurement, Report, Round};
use shortconn::Findings;
pub use shortconn::HOLD_CONNECTIONS;
use sys::{BpfStats, NetNs, Proc};
pub use workload::Selection;
use workload::Workload;

const NETNS_PREFIX: &str = "obs-bench-";
/// Ports inside the benchmark's own, fresh namespace, where nothing else listens.
const IPERF_PORT: u16 = 5201;
const OBSERVER_LISTEN: &str = "127.0.0.1:9464";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long past its own duration an iperf3 client may take before it is called stuck.
const CLIENT_SLACK: Duration = Duration::from_secs(30);

pub struct Options {
    pub rounds: u32,
    pub seconds: u32,
    /// Where to write the whole document; None prints the sections only.
    pub out: Option<PathBuf>,
    pub smoke: bool,
    pub workload: Selection,
    /// Connections held open while the observer's memory is measured.
    pub hold: usize,
    /// Whether the short-connection rounds also measure the reference tracer and
    /// close-only accounting.
    pub peers: bool,
}

impl Options {
    pub fn smoke() -> Self {
        Options { rounds: 1, seconds: 1, out: None, smoke: true, workload: Selection::All, hold: 1_000, peers: true }
    }
}

pub enum Prepare {
    SetupAndBuild,
    /// `cargo xtask test` has just done both.
    AlreadyBuilt,
}

pub fn run(opts: &Options, prepare: Prepare) -> Result<()> {
    let started = Instant::now();
    if !util::is_root() {
        bail!(
            "the benchmark needs root (network namespace, kernel.bpf_stats_enabled, eBPF \
             programs): sudo -E cargo xtask bench"
        );
    }
    let bin = match prepare {
        Prepare::SetupAndBuild => {
            setup::run()?;
            build::observer_release()?
        }
        Prepare::AlreadyBuilt => build::observer_bin(),
    };
    ensure!(bin.is_file(), "{} is missing", bin.display());
    let iperf3 = util::find_in_path("iperf3").context("iperf3 is not installed (scripts/setup.sh installs it)")?;

    sys::catch_interrupts();
    sys::sweep_stale_netns(NETNS_PREFIX);
    let logs = util::target_dir().join("xtask-bench");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let observer_log = logs.join("observer.log");
    fs::write(&observer_log, "").with_context(|| format!("creating {}", observer_log.display()))?;

    // Declared first so that it is dropped last, after the processes inside it.
    let ns = NetNs::create(&format!("{NETNS_PREFIX}{}", std::process::id()))?;
    // Statistics are switched on only where a measurement needs them ("on+stats" by the
    // observer itself, the reference programs by `BpfStats`); "on" must run without.
    let stats_stash = logs.join("bpf_stats_enabled.orig");
    BpfStats::restore_stale(&stats_stash)?;
    if BpfStats::on()? {
        eprintln!(
            "xtask: warning: kernel.bpf_stats_enabled is 1 on this host: the \"on\" measurements \
             pay the statistics' clock reads too"
        );
    }
    let mut server = {
        let mut cmd = ns.command(&iperf3);
        cmd.args(["-s", "-B", "127.0.0.1", "-p", &IPERF_PORT.to_string()]);
        Proc::spawn(cmd, "iperf3 server", Some(&logs.join("iperf3-server.log")))?
    };
    sys::wait_listening(&mut server, IPERF_PORT, Duration::from_secs(10))?;
    let workloads = opts.workload.workloads();
    let _conn_server = if workloads.contains(&Workload::ShortConn) {
        connload::widen_port_range(&ns)?;
        Some(connload::Server::start(&ns)?)
    } else {
        None
    };

    let reference_tracer =
        if opts.peers && workloads.contains(&Workload::ShortConn) { Some(build::reference_tracer()?) } else { None };
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let bench = Bench {
        ns: &ns,
        observer: &bin,
        observer_log: &observer_log,
        iperf3: &iperf3,
        client_json: logs.join("iperf3-client.json"),
        stats_stash,
        seconds: opts.seconds,
        pin: cpus >= 2,
        peers: opts.peers,
        reference_tracer: reference_tracer.as_deref(),
    };
    let mut reports = Vec::new();
    // Each section as printed, in the order measured.
    let mut sections = Vec::new();
    for workload in workloads {
        eprintln!("xtask bench: workload {}", workload.name());
        let machine = machine();
        if let Ok(load) = machine.load.parse::<f64>()
            && load > machine.cpus as f64 / 2.0
        {
            eprintln!(
                "xtask: warning: load average {load} on {} CPUs: other work will show up as \
                 spread and bias in the results",
                machine.cpus
            );
        }
        let mut report = bench.workload(workload, opts, &machine)?;
        report.machine.load_end = load_average();
        let section = report.markdown();
        println!("\n{section}");
        sections.push(section);
        reports.push(report);
    }
    server.stop(Duration::from_secs(5))?;
    let scrape = if opts.workload.scrape() {
        eprintln!("xtask bench: scrape latency");
        let mut machine = machine();
        let scrape = scrape_latency::measure(if opts.smoke { 20 } else { 500 })?;
        machine.load_end = load_average();
        let section = scrape.markdown(&machine, opts.smoke);
        println!("\n{section}");
        sections.push(section);
        eprintln!("xtask bench: series economy");
        let section = series_economy::measure()?.markdown();
        println!("\n{section}");
        sections.push(section);
        Some(scrape)
    } else {
        None
    };
    let footprint = if matches!(opts.workload, Selection::All | Selection::Footprint) {
        let footprint = bench.footprint(opts)?;
        let section = footprint.markdown();
        println!("\n{section}");
        sections.push(section);
        Some(footprint)
    } else {
        None
    };

    if let Some(out) = &opts.out {
        let run = doc::Run {
            machine: &machine(),
            reports: &reports,
            scrape: scrape.as_ref(),
            footprint: footprint.as_ref(),
            elapsed: started.elapsed(),
        };
        let text = run.markdown(&sections);
        fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
        println!("\n{}", doc::targets_table(&run.targets()));
        eprintln!(
            "xtask bench: wrote {} ({} lines) in {:.0} s",
            out.display(),
            text.lines().count(),
            started.elapsed().as_secs_f64()
        );
    }

    if opts.smoke {
        for report in &reports {
            for (i, r) in report.rounds.iter().enumerate() {
                ensure!(
                    r.off > 0.0 && r.on > 0.0 && r.on_stats > 0.0,
                    "benchmark smoke: {} round {} measured nothing (off {}, on {}, on+stats {})",
                    report.workload.name(),
                    i + 1,
                    r.off,
                    r.on,
                    r.on_stats
                );
            }
        }
        if let Some(scrape) = &scrape {
            for one in [&scrape.text, &scrape.protobuf] {
                ensure!(
                    one.series > 0 && one.p50_ms > 0.0,
                    "benchmark smoke: the scrape measurement produced nothing ({scrape:?})"
                );
            }
        }
        println!(
            "xtask bench: smoke run ok: {} measured with the observer off, on and on with \
             statistics; scrape latency measured",
            reports.iter().map(|r| r.workload.name()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

struct Bench<'a> {
    ns: &'a NetNs,
    observer: &'a Path,
    observer_log: &'a Path,
    iperf3: &'a Path,
    client_json: PathBuf,
    /// Where `BpfStats` keeps the switch's previous value while it is on.
    stats_stash: PathBuf,
    seconds: u32,
    pin: bool,
    /// Whether the short-connection rounds measure the peers (`Round::order_with_peers`).
    peers: bool,
    /// The reference tracer's binary, where built.
    reference_tracer: Option<&'a Path>,
}

impl Bench<'_> {
    /// All rounds of one workload.
    fn workload(&self, workload: Workload, opts: &Options, machine: &Machine) -> Result<Report> {
        let mut rounds = Vec::new();
        let mut progs: Vec<ProgStats> = Vec::new();
        let mut short = (workload == Workload::ShortConn).then(|| Findings { hold: opts.hold, ..Findings::default() });
        let unit = workload.display_unit();
        for i in 0..opts.rounds {
            let order = if short.is_some() && self.peers { Round::order_with_peers(i) } else { Round::order(i) };
            let (mut off, mut on, mut on_stats) = (0.0, 0.0, 0.0);
            for &measurement in &order {
                sys::check_interrupted()?;
                match measurement {
                    Measurement::Off => {
                        off = self.measure(workload)?;
                        continue;
                    }
                    Measurement::Reference | Measurement::ReferenceStats => {
                        let peer =
                            self.measure_reference_tracer(i as usize, measurement == Measurement::ReferenceStats)?;
                        if let Some(short) = short.as_mut() {
                            short.reference_runs.push(peer);
                        }
                        continue;
                    }
                    Measurement::CloseOnlyStats => {
                        let peer = self.measure_close_only(i as usize)?;
                        if let Some(short) = short.as_mut() {
                            short.close_only_runs.push(peer);
                        }
                        continue;
                    }
                    Measurement::On | Measurement::OnStats => {}
                }
                let statistics = measurement == Measurement::OnStats;
                let (figure, counted, on_run) = self.measure_on(workload, statistics)?;
                if statistics {
                    on_stats = figure;
                    progs::accumulate(&mut progs, &counted);
                } else {
                    on = figure;
                }
                if let (Some(short), Some(on_run)) = (short.as_mut(), on_run) {
                    short.on_runs.push(on_run);
                }
            }
            let round = Round { order, off, on, on_stats };
            eprintln!(
                "xtask bench: {} round {}/{}: off {} {unit}, on {} {unit}, on+stats {} {unit}, on/off {:.3}, \
                 on+stats/off {:.3}",
                workload.name(),
                i + 1,
                opts.rounds,
                workload.show(off),
                workload.show(on),
                workload.show(on_stats),
                round.ratio(),
                round.stats_ratio()
            );
            rounds.push(round);
        }
        if let Some(short) = short.as_mut() {
            sys::check_interrupted()?;
            short.held = Some(self.measure_held(opts.hold)?);
        }
        let reference = if workload.target_hook_ns().is_some() {
            sys::check_interrupted()?;
            self.measure_reference(workload)?
        } else {
            Vec::new()
        };
        Ok(Report {
            workload,
            rounds,
            seconds: opts.seconds,
            smoke: opts.smoke,
            progs,
            pinned: self.pin,
            machine: machine.clone(),
            short,
            reference,
        })
    }

    /// One run of the workload in the namespace; its figure.
    fn measure(&self, workload: Workload) -> Result<f64> {
        if workload == Workload::ShortConn {
            let secs = Duration::from_secs(self.seconds.into());
            return Ok(connload::run(self.ns, secs, None)?.rate());
        }
        self.measure_iperf(workload)
    }

    /// One iperf3 client run in the namespace; the workload's figure.
    fn measure_iperf(&self, workload: Workload) -> Result<f64> {
        // The JSON goes to a file: a pipe read only after exit could fill up and stall
        // iperf3 on long runs.
        let json_file =
            fs::File::create(&self.client_json).with_context(|| format!("creating {}", self.client_json.display()))?;
        let mut cmd = self.ns.command(self.iperf3);
        cmd.args(["-c", "127.0.0.1", "-p", &IPERF_PORT.to_string()])
            .args(["-t", &self.seconds.to_string(), "-J"])
            .args(workload.client_args())
            .stdout(json_file);
        if self.pin {
            // Client on CPU 0, server on CPU 1: unpinned, the scheduler moving them around
            // spreads the results far more than the effect being measured.
            cmd.args(["-A", "0,1"]);
        }
        eprintln!("+ {}", util::show(&cmd));
        let mut child = cmd.spawn().with_context(|| format!("starting `{}`", util::show(&cmd)))?;
        let limit = Duration::from_secs(self.seconds.into()) + CLIENT_SLACK;
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("iperf3 client did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // A Ctrl-C reaches iperf3 too; say so rather than report its error.
        sys::check_interrupted()?;
        let json =
            fs::read_to_string(&self.client_json).with_context(|| format!("reading {}", self.client_json.display()))?;
        let figure = workload
            .figure(&json)
            .with_context(|| format!("iperf3 client ({status}), output in {}", self.client_json.display()))?;
        ensure!(status.success(), "iperf3 client failed ({status})");
        Ok(figure)
    }

    /// A measurement with the observer running: start it, wait for /readyz, measure,
    /// read its programs' counters, stop it. With `statistics`, the observer keeps the
    /// kernel's BPF statistics on (its default) and the counters count; without, it
    /// runs with `--bpf-stats=false`.
    fn measure_on(
        &self,
        workload: Workload,
        statistics: bool,
    ) -> Result<(f64, Vec<ProgStats>, Option<shortconn::OnRun>)> {
        let observer = self.start_observer(if statistics { &[] } else { &["--bpf-stats=false"] })?;
        let (figure, on_run) = if workload == Workload::ShortConn {
            let on_run = shortconn::measure_on(self.ns, &observer, listen_addr(), self.seconds, statistics)?;
            (on_run.run.rate(), Some(on_run))
        } else {
            (self.measure(workload)?, None)
        };
        let counted = progs::read_for_pid(observer.pid())?;
        self.stop_observer(observer)?;
        Ok((figure, counted, on_run))
    }

    /// One short-connection run with the reference tracer attached
    /// (`observer/examples/reference_tracer.rs`) instead of the observer, with or
    /// without the kernel's BPF statistics.
    fn measure_reference_tracer(&self, round: usize, statistics: bool) -> Result<shortconn::PeerRun> {
        let bin = self.reference_tracer.context("the reference tracer was not built")?;
        let log = self.observer_log.with_file_name("reference_tracer.log");
        fs::write(&log, "").with_context(|| format!("creating {}", log.display()))?;
        let mut tracer = Proc::spawn(self.ns.command(bin), "reference tracer", Some(&log))?;
        let started = Instant::now();
        while !fs::read_to_string(&log).unwrap_or_default().contains("ready") {
            if let Some(status) = tracer.exited()? {
                bail!("the reference tracer exited ({status}) before it was ready\n{}", tracer.log_tail(20));
            }
            ensure!(started.elapsed() < READY_TIMEOUT, "the reference tracer was not ready within {READY_TIMEOUT:?}");
            sys::check_interrupted()?;
            std::thread::sleep(Duration::from_millis(100));
        }
        let stats = statistics.then(|| BpfStats::enable(&self.stats_stash)).transpose()?;
        let run = connload::run(self.ns, Duration::from_secs(self.seconds.into()), None)?;
        drop(stats);
        let progs = progs::read_for_pid_named(tracer.pid(), "ref_")?;
        ensure!(
            progs.iter().any(|p| p.run_cnt > 0) || !statistics,
            "the reference tracer's program did not run ({progs:?})"
        );
        self.stop_observer(tracer)?;
        let run_ns = if statistics { progs.iter().map(|p| p.run_time_ns).sum() } else { 0 };
        eprintln!(
            "xtask bench: reference tracer{}: {:.0} conn/s{}",
            if statistics { " with statistics" } else { "" },
            run.rate(),
            if statistics {
                format!(", {:.0} ns per connection", run_ns as f64 / run.connections.max(1) as f64)
            } else {
                String::new()
            }
        );
        Ok(shortconn::PeerRun { round, run, statistics, run_ns })
    }

    /// One short-connection run of the observer with every optional concern
    /// switched off (close-only accounting), statistics on.
    fn measure_close_only(&self, round: usize) -> Result<shortconn::PeerRun> {
        let observer = self.start_observer(&["--disable", shortconn::CLOSE_ONLY_DISABLE])?;
        let on_run = shortconn::measure_on(self.ns, &observer, listen_addr(), self.seconds, true)?;
        let progs = progs::read_for_pid(observer.pid())?;
        self.stop_observer(observer)?;
        let run_ns = progs.iter().map(|p| p.run_time_ns).sum();
        eprintln!(
            "xtask bench: close-only accounting: {:.0} conn/s, {:.0} ns per connection, {:.0} sessions lost",
            on_run.run.rate(),
            run_ns as f64 / on_run.run.connections.max(1) as f64,
            on_run.sessions_lost()
        );
        Ok(shortconn::PeerRun { round, run: on_run.run, statistics: true, run_ns })
    }

    /// The observer's memory with `n` connections open.
    fn measure_held(&self, n: usize) -> Result<shortconn::Held> {
        let max = shortconn::HOLD_MAX_SESSIONS.to_string();
        let observer = self.start_observer(&["--max-sessions", &max])?;
        let held = shortconn::measure_held(self.ns, &observer, listen_addr(), n)?;
        eprintln!(
            "xtask bench: {n} connections open (in {:.1} s): observer RSS {:.1} MiB, {} open sessions",
            held.open_seconds,
            held.rss as f64 / f64::from(1 << 20),
            held.open_sessions
        );
        self.stop_observer(observer)?;
        Ok(held)
    }

    /// One run of the workload with the observer off and the reference programs
    /// (baseline.rs) on the per-call hooks' tracepoints: what a tp_btf program costs
    /// here before it does anything, and what each kind of step of a hook adds.
    fn measure_reference(&self, workload: Workload) -> Result<Vec<ProgStats>> {
        // Each reference on the send tracepoint; the empty one on receive too.
        let mut refs = Vec::new();
        for r in baseline::REFERENCES {
            let name = format!("{}_send", r.describe().0);
            refs.push(baseline::RefProg::attach(r, "sock_send_length", &name)?);
        }
        let empty = baseline::Reference::Empty;
        let name = format!("{}_recv", empty.describe().0);
        refs.push(baseline::RefProg::attach(empty, "sock_recv_length", &name)?);
        let stats = BpfStats::enable(&self.stats_stash)?;
        self.measure(workload)?;
        drop(stats);
        let stats = refs.iter().map(baseline::RefProg::stats).collect::<Result<Vec<_>>>()?;
        for p in &stats {
            eprintln!(
                "xtask bench: reference {}: {} runs, {:.0} ns per run",
                p.name,
                p.run_cnt,
                p.ns_per_run().unwrap_or(0.0)
            );
        }
        Ok(stats)
    }

    /// `observer run --iface lo` in the namespace, ready on /readyz. No
    /// pinned state: each round starts from empty tables, not the last one's.
    fn start_observer(&self, extra: &[&str]) -> Result<Proc> {
        let mut cmd = self.ns.command(self.observer);
        cmd.args(["run", "--iface", "lo", "--listen", OBSERVER_LISTEN, "--state-dir", ""]).args(extra);
        let mut observer = Proc::spawn(cmd, "observer", Some(self.observer_log))?;
        self.wait_ready(&mut observer)?;
        Ok(observer)
    }

    fn stop_observer(&self, mut observer: Proc) -> Result<()> {
        if let Some(status) = observer.exited()? {
            bail!("the observer exited ({status}) during the measurement\n{}", observer.log_tail(20));
        }
        let status = observer.stop(Duration::from_secs(10))?;
        if !status.success() {
            eprintln!("xtask: warning: the observer exited with {status} after SIGTERM");
        }
        Ok(())
    }

    /// The observer's own footprint (footprint.rs).
    fn footprint(&self, opts: &Options) -> Result<footprint::Footprint> {
        let durations = if opts.smoke { footprint::Durations::smoke() } else { footprint::Durations::full() };
        let measured = footprint::measure(self, &durations)?;
        ensure!(
            measured.sessions_per_sec > 0.0 && measured.udp_sessions_per_sec > 0.0 && measured.idle.rss_mib > 0.0,
            "footprint: nothing measured ({} TCP sessions/s, {} UDP sessions/s, {} MiB)",
            measured.sessions_per_sec,
            measured.udp_sessions_per_sec,
            measured.idle.rss_mib
        );
        Ok(measured)
    }

    fn wait_ready(&self, observer: &mut Proc) -> Result<()> {
        let addr = listen_addr();
        let agent = scrape::agent();
        let started = Instant::now();
        loop {
            if let Some(status) = observer.exited()? {
                bail!("the observer exited ({status}) before it was ready\n{}", observer.log_tail(20));
            }
            let last = match self.ns.run_in(|| scrape::get(&agent, addr, "/readyz"))?.map(|(status, _)| status) {
                Ok(200) => {
                    eprintln!("xtask bench: observer ready after {:.1} s", started.elapsed().as_secs_f64());
                    return Ok(());
                }
                Ok(code) => format!("GET /readyz answered {code}"),
                Err(err) => format!("GET /readyz: {err:#}"),
            };
            if started.elapsed() >= READY_TIMEOUT {
                bail!("the observer was not ready within {READY_TIMEOUT:?} ({last})\n{}", observer.log_tail(20));
            }
            sys::check_interrupted()?;
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn listen_addr() -> SocketAddr {
    OBSERVER_LISTEN.parse().expect("a valid socket address")
}

fn machine() -> Machine {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned()),
        arch: std::env::consts::ARCH.to_owned(),
        date: report::utc_date(now),
        load: load_average(),
        load_end: "unknown".to_owned(),
    }
}

/// The 1-minute load average.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observer_address_parses() {
        OBSERVER_LISTEN.parse::<SocketAddr>().unwrap();
    }
}
