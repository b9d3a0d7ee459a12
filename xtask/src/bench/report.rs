//! One on/off workload's section of BENCHMARKS.md: its rounds, summary, targets and programs.

use std::fmt::Write as _;

use super::baseline;
use super::progs::ProgStats;
use super::shortconn::{self, Findings};
use super::stats::{median, spread};
use super::workload::{PER_CALL_HOOKS, Workload};

/// The three measurements of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measurement {
    /// No observer.
    Off,
    /// `observer run --bpf-stats=false`, kernel statistics off: the observer as the
    /// DaemonSet runs it, with nothing else's cost in the figure.
    On,
    /// `observer run` with its default `--bpf-stats=true`: the kernel's statistics on,
    /// whose two clock reads per program run are charged to it. The programs' table
    /// comes from these.
    OnStats,
    /// Short connections only: the reference tracer (`shortconn::PeerRun`), without
    /// and with the kernel's statistics.
    Reference,
    ReferenceStats,
    /// Short connections only: the observer with every optional concern switched
    /// off (`shortconn::CLOSE_ONLY_DISABLE`), statistics on.
    CloseOnlyStats,
}

impl Measurement {
    pub fn label(self) -> &'static str {
        match self {
            Measurement::Off => "off",
            Measurement::On => "on",
            Measurement::OnStats => "on+stats",
            Measurement::Reference => "ref",
            Measurement::ReferenceStats => "ref+stats",
            Measurement::CloseOnlyStats => "close-only+stats",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    /// The order its measurements ran in (`Round::order`).
    pub order: Vec<Measurement>,
    /// The workload's figure (`Workload::figure`) of each measurement.
    pub off: f64,
    pub on: f64,
    pub on_stats: f64,
}

impl Round {
    /// Round `i`'s order: "on" in the middle, "off" and "on+stats" taking turns at the
    /// ends, so that over two rounds drift hits both ratios alike.
    pub fn order(i: u32) -> Vec<Measurement> {
        use Measurement::*;
        let order = vec![Off, On, OnStats];
        if i.is_multiple_of(2) { order } else { order.into_iter().rev().collect() }
    }

    /// Round `i`'s order with the short-connection workload's peers: every
    /// measurement's mean place over two rounds is the same (each round reverses
    /// the last), so drift hits "on" and "ref" against "off" alike.
    pub fn order_with_peers(i: u32) -> Vec<Measurement> {
        use Measurement::*;
        let order = vec![Off, On, Reference, OnStats, ReferenceStats, CloseOnlyStats];
        if i.is_multiple_of(2) { order } else { order.into_iter().rev().collect() }
    }

    pub fn ratio(&self) -> f64 {
        self.on / self.off
    }

    pub fn stats_ratio(&self) -> f64 {
        self.on_stats / self.off
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub arch: String,
    /// YYYY-MM-DD (UTC).
    pub date: String,
    /// 1-minute load average when the workload's rounds started and ended: other load
    /// shows up as spread.
    pub load: String,
    pub load_end: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub workload: Workload,
    pub rounds: Vec<Round>,
    pub seconds: u32,
    pub smoke: bool,
    /// Summed over all "on" runs.
    pub progs: Vec<ProgStats>,
    /// Whether iperf3 ran with `-A 0,1`.
    pub pinned: bool,
    pub machine: Machine,
    /// The short-connection workload's own figures.
    pub short: Option<Findings>,
    /// Empty tp_btf programs on the per-call hooks' tracepoints, run through the
    /// workload once with the observer off (baseline.rs).
    pub reference: Vec<ProgStats>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub median_off: f64,
    pub median_on: f64,
    /// Median of the per-round on/off ratios: each round's pair ran back to back, so
    /// this cancels slow drift best.
    pub ratio_of_rounds: f64,
    /// median(on) / median(off).
    pub ratio_of_medians: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
    pub median_on_stats: f64,
    /// Median of the per-round on+stats/off ratios.
    pub stats_ratio_of_rounds: f64,
}

impl Report {
    /// The observer's programs' run time summed over the "on+stats" measurements, as
    /// a share of the machine's CPU time over them; None without statistics.
    pub fn programs_cpu_share(&self) -> Option<f64> {
        let run_ns: u64 = self.progs.iter().map(|p| p.run_time_ns).sum();
        let cpu_ns = self.machine.cpus as f64 * self.rounds.len() as f64 * f64::from(self.seconds) * 1e9;
        (run_ns > 0 && cpu_ns > 0.0).then(|| run_ns as f64 / cpu_ns)
    }

    pub fn summary(&self) -> Option<Summary> {
        let off: Vec<f64> = self.rounds.iter().map(|r| r.off).collect();
        let on: Vec<f64> = self.rounds.iter().map(|r| r.on).collect();
        let on_stats: Vec<f64> = self.rounds.iter().map(|r| r.on_stats).collect();
        let ratios: Vec<f64> = self.rounds.iter().map(Round::ratio).collect();
        let stats_ratios: Vec<f64> = self.rounds.iter().map(Round::stats_ratio).collect();
        let (ratio_min, ratio_max) = spread(&ratios)?;
        let median_off = median(&off)?;
        let median_on = median(&on)?;
        Some(Summary {
            median_off,
            median_on,
            ratio_of_rounds: median(&ratios)?,
            ratio_of_medians: median_on / median_off,
            ratio_min,
            ratio_max,
            median_on_stats: median(&on_stats)?,
            stats_ratio_of_rounds: median(&stats_ratios)?,
        })
    }

    /// ns per run of a program over the "on+stats" measurements; None if it did not run.
    pub fn ns_per_run(&self, name: &str) -> Option<f64> {
        self.progs.iter().find(|p| p.name == name)?.ns_per_run()
    }

    /// The whole section, heading included, ending in a newline.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_markdown(&mut s);
        s
    }

    /// The on/off target: the median of the per-round ratios at least the workload's
    /// `target_ratio` (None without rounds).
    pub fn ratio_met(&self) -> Option<bool> {
        Some(self.summary()?.ratio_of_rounds >= self.workload.target_ratio())
    }

    /// ns per run of each of `PER_CALL_HOOKS`, all of them, where they all ran.
    pub fn hook_ns(&self) -> Option<Vec<f64>> {
        PER_CALL_HOOKS.iter().map(|h| self.ns_per_run(h)).collect()
    }

    /// The per-call target: every hook at most `target_hook_ns`; None where the
    /// workload has no such target or a hook did not run.
    pub fn hooks_met(&self) -> Option<bool> {
        let bar = self.workload.target_hook_ns()?;
        Some(self.hook_ns()?.iter().all(|&ns| ns <= bar))
    }

    /// ns per run of the empty reference program on `hook`'s tracepoint.
    fn empty_ns(&self, hook: &str) -> Option<f64> {
        let empty = format!("empty_{}", hook.trim_start_matches("obs_"));
        self.reference.iter().find(|r| r.name == empty).and_then(ProgStats::ns_per_run)
    }

    /// Kernel programs' run time per connection over the "on+stats" measurements
    /// (short connections only).
    pub fn kernel_ns_per_connection(&self) -> Option<f64> {
        let short = self.short.as_ref()?;
        let connections: u64 = short.on_runs.iter().filter(|r| r.statistics).map(|r| r.run.connections).sum();
        let run_ns: u64 = self.progs.iter().map(|p| p.run_time_ns).sum();
        (connections > 0 && run_ns > 0).then(|| run_ns as f64 / connections as f64)
    }

    /// A few lines that read the figures: what the programs' share predicts, and
    /// where the per-call cost stands against an empty program's.
    fn interpretation(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let (Some(share), Some(sum)) = (self.programs_cpu_share(), self.summary()) {
            lines.push(format!(
                "The programs ran {:.2}% of the CPUs' time, which on CPUs the workload keeps busy predicts \
                 an on/off ratio near {:.3}; the rounds spread {:.3}–{:.3}: single 5-second measurements \
                 on a small VM move by tens of percent either way, so the programs' share is the steadier \
                 figure.",
                share * 100.0,
                1.0 - share,
                sum.ratio_min,
                sum.ratio_max
            ));
        }
        if let Some(per_conn) = self.kernel_ns_per_connection() {
            lines.push(format!(
                "Kernel programs per connection: {:.2} µs (both ends, with statistics).",
                per_conn / 1e3
            ));
        }
        if self.workload.target_hook_ns().is_some() {
            let above: Vec<String> = PER_CALL_HOOKS
                .iter()
                .filter_map(|h| {
                    Some(format!(
                        "`{h}` {:.0} ns above an empty program's {:.0}",
                        self.ns_per_run(h)? - self.empty_ns(h)?,
                        self.empty_ns(h)?
                    ))
                })
                .collect();
            if !above.is_empty() {
                lines.push(format!(
                    "Per call: {}; the empty program (dispatch and the statistics' own clock reads) \
                     is the floor any hook pays here.",
                    above.join(", ")
                ));
            }
        }
        lines
    }

    fn write_markdown(&self, s: &mut String) -> std::fmt::Result {
        let w = self.workload;
        let n = self.rounds.len();
        let secs = self.seconds;
        let unit = w.display_unit();
        let target = w.target_ratio();
        let pin = if self.pinned { " -A 0,1" } else { "" };
        let args: String = w.client_args().iter().map(|a| format!(" {a}")).collect();
        writeln!(s, "{}\n", w.heading())?;
        writeln!(s, "{}", w.intro())?;
        if self.smoke {
            writeln!(
                s,
                "\n**Smoke run** (`cargo xtask bench --smoke`, {n} round of {secs} s): checks \
                 that the benchmark works; its numbers are not a measurement."
            )?;
        }
        writeln!(s)?;
        let setup = match &self.short {
            Some(short) => shortconn::method(secs, short.hold),
            None => format!(
                "Each measurement is `iperf3 -c 127.0.0.1 -t {secs} -J{args}{pin}`{}; {}",
                if self.pinned { " (client on CPU 0, server on CPU 1)" } else { "" },
                w.figure_method()
            ),
        };
        let m = &self.machine;
        writeln!(
            s,
            "`cargo xtask bench --workload {} --rounds {n} --seconds {secs}`, in a network namespace of its own \
             with only `lo` up. {setup} Each round measures \"off\" (no observer), \"on\" (`observer run \
             --iface lo --bpf-stats=false`, as deployed: the targets judge this one) and \"on+stats\" (kernel \
             BPF statistics on, which give the programs' table), back to back, \"on\" in the middle. Load \
             average {} at the start, {} at the end.",
            w.name(),
            m.load,
            m.load_end,
        )?;
        writeln!(s)?;
        writeln!(s, "| round | order | off ({unit}) | on ({unit}) | on+stats ({unit}) | on/off | on+stats/off |")?;
        writeln!(s, "|---:|---|---:|---:|---:|---:|---:|")?;
        for (i, r) in self.rounds.iter().enumerate() {
            let order = r.order.iter().map(|m| m.label()).collect::<Vec<_>>().join(", ");
            writeln!(
                s,
                "| {} | {order} | {} | {} | {} | {:.3} | {:.3} |",
                i + 1,
                w.show(r.off),
                w.show(r.on),
                w.show(r.on_stats),
                r.ratio(),
                r.stats_ratio()
            )?;
        }

        if let Some(sum) = self.summary() {
            let verdict = |met: bool| {
                if self.smoke {
                    "not judged (smoke run)"
                } else if met {
                    "met"
                } else {
                    "NOT met"
                }
            };
            writeln!(s)?;
            writeln!(s, "| summary | value |")?;
            writeln!(s, "|---|---:|")?;
            writeln!(s, "| median off | {} {unit} |", w.show(sum.median_off))?;
            writeln!(s, "| median on | {} {unit} |", w.show(sum.median_on))?;
            writeln!(s, "| on/off, median of per-round ratios | {:.3} |", sum.ratio_of_rounds)?;
            writeln!(s, "| on/off, median on / median off | {:.3} |", sum.ratio_of_medians)?;
            writeln!(s, "| on/off spread over rounds (min–max) | {:.3}–{:.3} |", sum.ratio_min, sum.ratio_max)?;
            writeln!(s, "| target on/off ≥ {target} | {} |", verdict(self.ratio_met() == Some(true)))?;
            writeln!(s, "| median on+stats | {} {unit} |", w.show(sum.median_on_stats))?;
            writeln!(s, "| on+stats/off, median of per-round ratios | {:.3} |", sum.stats_ratio_of_rounds)?;
            if let Some(share) = self.programs_cpu_share() {
                // What the programs take from the workload, far steadier than the
                // ratio: the slowdown they can explain on CPUs the workload keeps busy.
                writeln!(
                    s,
                    "| `obs_*` programs' run time during the \"on+stats\" measurements, share of all CPUs' time ({} CPUs × {} × {} s) | {:.2}% |",
                    self.machine.cpus,
                    self.rounds.len(),
                    self.seconds,
                    share * 100.0
                )?;
            }
            if let Some(bar) = w.target_hook_ns() {
                for h in PER_CALL_HOOKS {
                    let ns = self.ns_per_run(h).map_or_else(|| "did not run".to_owned(), |ns| format!("{ns:.0}"));
                    writeln!(s, "| ns per `{h}` run | {ns} |")?;
                }
                // What the observer's own code adds: the hook minus an empty program on
                // the same tracepoint (`obs_send` -> `empty_send`), which is the
                // trampoline and the statistics' clock reads that any program pays.
                for h in PER_CALL_HOOKS {
                    if let (Some(ns), Some(floor)) = (self.ns_per_run(h), self.empty_ns(h)) {
                        let empty = format!("empty_{}", h.trim_start_matches("obs_"));
                        writeln!(s, "| ns per `{h}` run above the empty program's (`{empty}`) | {:.0} |", ns - floor)?;
                    }
                }
                for r in &self.reference {
                    let ns = r.ns_per_run().map_or_else(|| "did not run".to_owned(), |ns| format!("{ns:.0}"));
                    let what = baseline::REFERENCES
                        .iter()
                        .map(|r| r.describe())
                        .find(|(prefix, _)| r.name.starts_with(prefix))
                        .map_or("", |(_, what)| what);
                    writeln!(
                        s,
                        "| reference, observer off, same workload and tracepoint: ns per run of `{}`, a tp_btf program doing {what} | {ns} |",
                        r.name
                    )?;
                }
                let judged = match self.hooks_met() {
                    None => "not judged (not all of them ran)",
                    Some(met) => verdict(met),
                };
                let names = PER_CALL_HOOKS.map(|h| format!("`{h}`")).join(", ");
                writeln!(s, "| target ≤ {bar} ns per run of {names} | {judged} |")?;
            }
            if let Some(short) = &self.short {
                short.write_markdown(s, verdict)?;
                let offs: Vec<f64> = self.rounds.iter().map(|r| r.off).collect();
                short.write_peers(s, &offs, sum.ratio_of_rounds, self.kernel_ns_per_connection(), verdict)?;
            }
        }

        let lines = self.interpretation();
        if !lines.is_empty() && !self.smoke {
            writeln!(s)?;
            writeln!(s, "{}", lines.join(" "))?;
        }

        writeln!(s)?;
        if self.progs.is_empty() {
            writeln!(s, "No `obs_*` eBPF program statistics could be read from the observer process.")?;
        } else {
            writeln!(
                s,
                "eBPF programs over the \"on+stats\" measurements (kernel statistics, machine-wide). \
                 Runs skipped: the kernel did not run the program because it was already running on \
                 that CPU (hit again from an interrupt):\n"
            )?;
            writeln!(
                s,
                "| program | invocations | ns per invocation | instructions (after verification) | runs skipped (recursion) |"
            )?;
            writeln!(s, "|---|---:|---:|---:|---:|")?;
            for p in &self.progs {
                let per = self.ns_per_run(&p.name).map_or_else(|| "–".to_owned(), |ns| format!("{ns:.0}"));
                let insns = p.xlated_insns.map_or_else(|| "–".to_owned(), |n| n.to_string());
                writeln!(s, "| `{}` | {} | {per} | {insns} | {} |", p.name, p.run_cnt, p.recursion_misses)?;
            }
        }
        Ok(())
    }
}

/// YYYY-MM-DD for a Unix time, in UTC (Howard Hinnant's days-to-civil algorithm).
pub fn utc_date(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            cpus: 2,
            kernel: "6.18.0".into(),
            arch: "x86_64".into(),
            date: "2025-01-02".into(),
            load: "0.05".into(),
            load_end: "0.10".into(),
        }
    }

    /// Round `i` (0-based), its "on+stats" figure 0.98 of "on".
    fn round(i: u32, off: f64, on: f64) -> Round {
        Round { order: Round::order(i), off: off * 1e9, on: on * 1e9, on_stats: on * 0.98e9 }
    }

    fn prog(name: &str, run_time_ns: u64, run_cnt: u64) -> ProgStats {
        ProgStats { name: name.into(), run_time_ns, run_cnt, recursion_misses: 0, xlated_insns: None }
    }

    #[test]
    fn summary_math() {
        let report = Report {
            workload: Workload::Bulk,
            rounds: vec![round(0, 40.0, 39.6), round(1, 50.0, 50.0), round(2, 42.0, 41.16)],
            seconds: 5,
            smoke: false,
            progs: vec![],
            pinned: false,
            machine: machine(),
            short: None,
            reference: vec![],
        };
        let s = report.summary().unwrap();
        assert_eq!(s.median_off, 42e9);
        assert!((s.median_on - 41.16e9).abs() < 1.0);
        assert!((s.ratio_of_rounds - 0.99).abs() < 1e-12);
        assert!((s.ratio_of_medians - 0.98).abs() < 1e-12);
        assert!((s.ratio_min - 0.98).abs() < 1e-12);
        assert!((s.ratio_max - 1.0).abs() < 1e-12);
        assert!((s.median_on_stats - 0.98 * 41.16e9).abs() < 1.0);
        assert!((s.stats_ratio_of_rounds - 0.98 * 0.99).abs() < 1e-12);
        assert!(Report { rounds: vec![], ..report }.summary().is_none());
    }

    #[test]
    fn markdown_has_rounds_summary_and_programs() {
        let report = Report {
            workload: Workload::Bulk,
            rounds: vec![round(0, 40.0, 39.8), round(1, 41.0, 40.0)],
            seconds: 5,
            smoke: false,
            progs: vec![prog("obs_state_btf", 12_000, 100), prog("obs_state_kp", 0, 0)],
            pinned: true,
            machine: machine(),
            short: None,
            reference: vec![],
        };
        let md = report.markdown();
        assert!(md.starts_with(Workload::Bulk.heading()), "{md}");
        assert!(md.contains("| 1 | off, on, on+stats | 40.00 | 39.80 | 39.00 | 0.995 | 0.975 |"), "{md}");
        assert!(md.contains("| 2 | on+stats, on, off | 41.00 | 40.00 | 39.20 | 0.976 | 0.956 |"), "{md}");
        assert!(md.contains("| on+stats/off, median of per-round ratios | 0.966 |"), "{md}");
        assert!(md.contains("| median off | 40.50 Gbit/s |"), "{md}");
        assert!(md.contains("| on/off spread over rounds (min–max) | 0.976–0.995 |"), "{md}");
        assert!(md.contains("| target on/off ≥ 0.99 | NOT met |"), "{md}");
        assert!(md.contains("| `obs_state_btf` | 100 | 120 | – | 0 |"), "{md}");
        assert!(md.contains("| `obs_state_kp` | 0 | – | – | 0 |"), "{md}");
        // 0.2 s of programs over 2 CPUs × 2 rounds × 5 s.
        let mut busy = report.clone();
        busy.progs[0].run_time_ns = 200_000_000;
        let md_busy = busy.markdown();
        assert!(md_busy.contains("share of all CPUs' time (2 CPUs × 2 × 5 s) | 1.00% |"), "{md_busy}");
        assert!(Report { progs: vec![], ..busy }.programs_cpu_share().is_none());
        assert!(md.contains("Load average 0.05 at the start, 0.10 at the end."), "{md}");
        // The programs' share (1%) predicts the ratio; the spread is the rounds'.
        assert!(md_busy.contains("predicts an on/off ratio near 0.990; the rounds spread 0.976–0.995"), "{md_busy}");
        assert!(!md.contains("Smoke"));
        assert!(md.contains("`iperf3 -c 127.0.0.1 -t 5 -J -A 0,1`"), "{md}");
        assert!(md.contains("`cargo xtask bench --workload bulk --rounds 2"), "{md}");
        assert!(!md.contains("obs_send"), "{md}");
    }

    #[test]
    fn small_message_markdown_judges_hooks() {
        let msgs =
            |off: f64, on: f64| Round { order: Round::order(0), off: off * 1e3, on: on * 1e3, on_stats: on * 1e3 };
        let mut report = Report {
            workload: Workload::TcpSmall,
            rounds: vec![msgs(400.0, 392.0), msgs(410.0, 402.0)],
            seconds: 5,
            smoke: false,
            progs: vec![prog("obs_recv", 4_500, 100), prog("obs_send", 5_000, 100), prog("obs_state_btf", 3_000, 10)],
            pinned: false,
            machine: machine(),
            short: None,
            reference: vec![prog("empty_send", 3_000, 100)],
        };
        let md = report.markdown();
        assert!(md.starts_with("## TCP small messages"), "{md}");
        assert!(md.contains("| ns per `obs_send` run above the empty program's (`empty_send`) | 20 |"), "{md}");
        assert!(!md.contains("above the empty program's (`empty_recv`)"), "no empty_recv reference ran: {md}");
        assert!(md.contains("| off (k msg/s) | on (k msg/s) |"), "{md}");
        assert!(md.contains("| 1 | off, on, on+stats | 400.0 | 392.0 | 392.0 | 0.980 | 0.980 |"), "{md}");
        assert!(md.contains("| median off | 405.0 k msg/s |"), "{md}");
        assert!(md.contains("| target on/off ≥ 0.97 | met |"), "{md}");
        assert!(md.contains("| ns per `obs_send` run | 50 |"), "{md}");
        assert!(md.contains("| ns per `obs_recv` run | 45 |"), "{md}");
        assert!(md.contains("| target ≤ 50 ns per run of `obs_send`, `obs_recv` | met |"), "{md}");
        assert_eq!(report.hooks_met(), Some(true));
        assert!(md.contains("`obs_send` 20 ns above an empty program's 30"), "{md}");
        assert!(md.contains("`iperf3 -c 127.0.0.1 -t 5 -J -l 1024 -N`"), "{md}");
        assert!(md.contains("/ 8192"), "{md}");

        report.progs[0].run_time_ns = 10_100;
        let md = report.markdown();
        assert!(md.contains("`obs_recv` | NOT met |"), "{md}");
        assert_eq!(report.hooks_met(), Some(false), "101 ns > 50");
        report.progs.remove(0);
        let md = report.markdown();
        assert!(md.contains("| ns per `obs_recv` run | did not run |"), "{md}");
        assert!(md.contains("| not judged (not all of them ran) |"), "{md}");
        assert_eq!(report.hooks_met(), None);

        report.workload = Workload::UdpSmall;
        let md = report.markdown();
        assert!(md.starts_with("## UDP small datagrams"), "{md}");
        assert!(md.contains("`iperf3 -c 127.0.0.1 -t 5 -J -u -b 0 -l 1024`"), "{md}");
        assert!(md.contains("`end.sum_received.lost_packets`"), "{md}");
        assert!(md.contains("| ns per `obs_send` run | 50 |"), "{md}");
        assert!(md.contains("| `obs_send` | 100 | 50 | – | 0 |"), "{md}");
    }

    #[test]
    fn smoke_markdown_says_so_and_does_not_judge() {
        let report = Report {
            workload: Workload::Bulk,
            rounds: vec![round(0, 40.0, 20.0)],
            seconds: 1,
            smoke: true,
            progs: vec![],
            pinned: false,
            machine: machine(),
            short: None,
            reference: vec![],
        };
        let md = report.markdown();
        assert!(md.contains("**Smoke run**"), "{md}");
        assert!(md.contains("not judged (smoke run)"), "{md}");
        assert!(md.contains("No `obs_*` eBPF program statistics"), "{md}");
    }

    /// With the peers, every measurement's mean place over two rounds is the same.
    #[test]
    fn peers_take_turns_like_the_rest() {
        for order in [Round::order_with_peers(0), Round::order_with_peers(1)] {
            assert_eq!(order.len(), 6);
        }
        let place = |m| (0..2).map(|i| Round::order_with_peers(i).iter().position(|&o| o == m).unwrap()).sum::<usize>();
        for m in Round::order_with_peers(0) {
            assert_eq!(place(m), 5, "{m:?}");
        }
        assert_eq!(Round::order(1), [Measurement::OnStats, Measurement::On, Measurement::Off]);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_735_689_599), "2024-12-31");
        assert_eq!(utc_date(1_735_689_600), "2025-01-01");
    }
}
