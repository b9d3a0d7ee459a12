//! The benchmark's markdown report and its place in BENCHMARKS.md.

use std::fmt::Write as _;

use super::progs::ProgStats;
use super::stats::{median, spread};

pub const HEADING: &str = "## TCP bulk throughput (iperf3, loopback)";
/// The acceptance bar: throughput with the observer on, relative to off.
pub const TARGET_RATIO: f64 = 0.99;

#[derive(Debug, Clone, PartialEq)]
pub struct Round {
    /// Whether "on" ran before "off" in this round.
    pub on_first: bool,
    pub off_bps: f64,
    pub on_bps: f64,
}

impl Round {
    pub fn ratio(&self) -> f64 {
        self.on_bps / self.off_bps
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    pub cpus: usize,
    pub kernel: String,
    pub arch: String,
    /// YYYY-MM-DD (UTC).
    pub date: String,
    /// 1-minute load average when the run started: other load shows up as spread.
    pub load: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub rounds: Vec<Round>,
    pub seconds: u32,
    pub smoke: bool,
    /// Summed over all "on" runs.
    pub progs: Vec<ProgStats>,
    /// Whether iperf3 ran with `-A 0,1`.
    pub pinned: bool,
    pub machine: Machine,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub median_off_bps: f64,
    pub median_on_bps: f64,
    /// Median of the per-round on/off ratios: each round's pair ran back to back, so
    /// this cancels slow drift best.
    pub ratio_of_rounds: f64,
    /// median(on) / median(off).
    pub ratio_of_medians: f64,
    pub ratio_min: f64,
    pub ratio_max: f64,
}

impl Report {
    pub fn summary(&self) -> Option<Summary> {
        let off: Vec<f64> = self.rounds.iter().map(|r| r.off_bps).collect();
        let on: Vec<f64> = self.rounds.iter().map(|r| r.on_bps).collect();
        let ratios: Vec<f64> = self.rounds.iter().map(Round::ratio).collect();
        let (ratio_min, ratio_max) = spread(&ratios)?;
        let median_off_bps = median(&off)?;
        let median_on_bps = median(&on)?;
        Some(Summary {
            median_off_bps,
            median_on_bps,
            ratio_of_rounds: median(&ratios)?,
            ratio_of_medians: median_on_bps / median_off_bps,
            ratio_min,
            ratio_max,
        })
    }

    /// The whole section, heading included, ending in a newline.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_markdown(&mut s);
        s
    }

    fn write_markdown(&self, s: &mut String) -> std::fmt::Result {
        let n = self.rounds.len();
        let secs = self.seconds;
        let (pin, pin_why) = if self.pinned {
            (
                " -A 0,1",
                " `-A 0,1` pins the client to CPU 0 and the server to CPU 1, so that runs \
                 do not differ by where the scheduler happened to put them.",
            )
        } else {
            ("", "")
        };
        writeln!(s, "{HEADING}\n")?;
        writeln!(
            s,
            "What a running observer costs TCP bulk throughput. \
             Target: throughput with the observer on is at least {TARGET_RATIO} of off \
             (median of the per-round on/off ratios)."
        )?;
        if self.smoke {
            writeln!(
                s,
                "\n**Smoke run** (`cargo xtask bench --smoke`, {n} round of {secs} s): checks \
                 that the benchmark works; its numbers are not a measurement."
            )?;
        }
        writeln!(s)?;
        writeln!(
            s,
            "Method (`cargo xtask bench --rounds {n} --seconds {secs}`): a network namespace \
             of its own with only `lo` up; one `iperf3 -s` on 127.0.0.1 in it; each \
             measurement is `iperf3 -c 127.0.0.1 -t {secs} -J{pin}` in that namespace, and \
             its figure is `end.sum_received.bits_per_second`.{pin_why} \"On\" measurements \
             run while \
             `observer run --iface lo` (release build) runs in the same namespace: started \
             before the measurement, ready on `/readyz`, stopped with SIGTERM after it. \
             \"Off\" measurements run without it. Each round has one of each, back to back, \
             and rounds alternate which goes first, so drift hits both alike. Kernel BPF \
             statistics (`kernel.bpf_stats_enabled=1`) are on throughout, to count the \
             observer's program runs; their clock reads are charged to \"on\", so the ratio \
             is slightly pessimistic."
        )?;
        writeln!(s)?;
        let m = &self.machine;
        writeln!(
            s,
            "Machine: {} CPUs, Linux {} ({}), load average {} at the start. Date: {}.",
            m.cpus, m.kernel, m.arch, m.load, m.date
        )?;

        writeln!(s)?;
        writeln!(s, "| round | order | off (Gbit/s) | on (Gbit/s) | on/off |")?;
        writeln!(s, "|---:|---|---:|---:|---:|")?;
        for (i, r) in self.rounds.iter().enumerate() {
            let order = if r.on_first { "on, off" } else { "off, on" };
            writeln!(
                s,
                "| {} | {order} | {} | {} | {:.3} |",
                i + 1,
                gbit(r.off_bps),
                gbit(r.on_bps),
                r.ratio()
            )?;
        }

        if let Some(sum) = self.summary() {
            let verdict = if self.smoke {
                "not judged (smoke run)"
            } else if sum.ratio_of_rounds >= TARGET_RATIO {
                "met"
            } else {
                "NOT met"
            };
            writeln!(s)?;
            writeln!(s, "| summary | value |")?;
            writeln!(s, "|---|---:|")?;
            writeln!(s, "| median off | {} Gbit/s |", gbit(sum.median_off_bps))?;
            writeln!(s, "| median on | {} Gbit/s |", gbit(sum.median_on_bps))?;
            writeln!(
                s,
                "| on/off, median of per-round ratios | {:.3} |",
                sum.ratio_of_rounds
            )?;
            writeln!(
                s,
                "| on/off, median on / median off | {:.3} |",
                sum.ratio_of_medians
            )?;
            writeln!(
                s,
                "| on/off spread over rounds (min–max) | {:.3}–{:.3} |",
                sum.ratio_min, sum.ratio_max
            )?;
            writeln!(s, "| target on/off ≥ {TARGET_RATIO} | {verdict} |")?;
        }

        writeln!(s)?;
        if self.progs.is_empty() {
            writeln!(
                s,
                "No `obs_*` eBPF program statistics could be read from the observer process."
            )?;
        } else {
            writeln!(
                s,
                "eBPF programs, kernel statistics summed over the \"on\" measurements \
                 (machine-wide: they count every event on the host, not only iperf3's):\n"
            )?;
            writeln!(s, "| program | invocations | ns per invocation |")?;
            writeln!(s, "|---|---:|---:|")?;
            for p in &self.progs {
                let per = if p.run_cnt == 0 {
                    "–".to_owned()
                } else {
                    format!("{:.0}", p.run_time_ns as f64 / p.run_cnt as f64)
                };
                writeln!(s, "| `{}` | {} | {per} |", p.name, p.run_cnt)?;
            }
        }
        Ok(())
    }
}

fn gbit(bps: f64) -> String {
    format!("{:.2}", bps / 1e9)
}

/// Replaces the level-2 section that starts with `heading` (up to the next level-2
/// heading) with `section`, or appends `section` if there is none.
pub fn replace_section(doc: &str, heading: &str, section: &str) -> String {
    let section = section.trim_end_matches('\n');
    let lines: Vec<&str> = doc.lines().collect();
    let start = lines.iter().position(|l| l.trim_end() == heading);
    let Some(start) = start else {
        let body = doc.trim_end_matches('\n');
        return if body.is_empty() {
            format!("# Benchmarks\n\n{section}\n")
        } else {
            format!("{body}\n\n{section}\n")
        };
    };
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.starts_with("## "))
        .map_or(lines.len(), |i| start + 1 + i);
    let mut out: Vec<&str> = lines[..start].to_vec();
    out.push(section);
    if end < lines.len() {
        out.push("");
        out.extend(&lines[end..]);
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
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
        }
    }

    fn round(on_first: bool, off: f64, on: f64) -> Round {
        Round {
            on_first,
            off_bps: off * 1e9,
            on_bps: on * 1e9,
        }
    }

    #[test]
    fn summary_math() {
        let report = Report {
            rounds: vec![
                round(false, 40.0, 39.6),
                round(true, 50.0, 50.0),
                round(false, 42.0, 41.16),
            ],
            seconds: 5,
            smoke: false,
            progs: vec![],
            pinned: false,
            machine: machine(),
        };
        let s = report.summary().unwrap();
        assert_eq!(s.median_off_bps, 42e9);
        assert!((s.median_on_bps - 41.16e9).abs() < 1.0);
        assert!((s.ratio_of_rounds - 0.99).abs() < 1e-12);
        assert!((s.ratio_of_medians - 0.98).abs() < 1e-12);
        assert!((s.ratio_min - 0.98).abs() < 1e-12);
        assert!((s.ratio_max - 1.0).abs() < 1e-12);
        assert!(
            Report {
                rounds: vec![],
                ..report
            }
            .summary()
            .is_none()
        );
    }

    #[test]
    fn markdown_has_rounds_summary_and_programs() {
        let report = Report {
            rounds: vec![round(false, 40.0, 39.8), round(true, 41.0, 40.0)],
            seconds: 5,
            smoke: false,
            progs: vec![
                ProgStats {
                    name: "obs_state_btf".into(),
                    run_time_ns: 12_000,
                    run_cnt: 100,
                },
                ProgStats {
                    name: "obs_state_kp".into(),
                    run_time_ns: 0,
                    run_cnt: 0,
                },
            ],
            pinned: true,
            machine: machine(),
        };
        let md = report.markdown();
        assert!(md.starts_with(HEADING), "{md}");
        assert!(
            md.contains("| 1 | off, on | 40.00 | 39.80 | 0.995 |"),
            "{md}"
        );
        assert!(
            md.contains("| 2 | on, off | 41.00 | 40.00 | 0.976 |"),
            "{md}"
        );
        assert!(md.contains("| median off | 40.50 Gbit/s |"), "{md}");
        assert!(
            md.contains("| on/off spread over rounds (min–max) | 0.976–0.995 |"),
            "{md}"
        );
        assert!(md.contains("| target on/off ≥ 0.99 | NOT met |"), "{md}");
        assert!(md.contains("| `obs_state_btf` | 100 | 120 |"), "{md}");
        assert!(md.contains("| `obs_state_kp` | 0 | – |"), "{md}");
        assert!(md.contains(
            "Machine: 2 CPUs, Linux 6.18.0 (x86_64), load average 0.05 at the start. \
             Date: 2025-01-02."
        ));
        assert!(!md.contains("Smoke"));
        assert!(md.contains("`iperf3 -c 127.0.0.1 -t 5 -J -A 0,1`"), "{md}");
    }

    #[test]
    fn smoke_markdown_says_so_and_does_not_judge() {
        let report = Report {
            rounds: vec![round(false, 40.0, 20.0)],
            seconds: 1,
            smoke: true,
            progs: vec![],
            pinned: false,
            machine: machine(),
        };
        let md = report.markdown();
        assert!(md.contains("**Smoke run**"), "{md}");
        assert!(md.contains("not judged (smoke run)"), "{md}");
        assert!(md.contains("No `obs_*` eBPF program statistics"), "{md}");
    }

    const NEW: &str = "## TCP bulk throughput (iperf3, loopback)\n\nnew body\n";

    #[test]
    fn replaces_existing_section_only() {
        let doc = "# Benchmarks\n\nintro\n\n\
            ## TCP bulk throughput (iperf3, loopback)\n\nold body\n### detail\nold\n\n\
            ## Latency\n\nkept\n";
        assert_eq!(
            replace_section(doc, HEADING, NEW),
            "# Benchmarks\n\nintro\n\n\
             ## TCP bulk throughput (iperf3, loopback)\n\nnew body\n\n\
             ## Latency\n\nkept\n"
        );
    }

    #[test]
    fn replaces_last_section() {
        let doc = "# B\n\n## Other\n\nx\n\n## TCP bulk throughput (iperf3, loopback)\n\nold\n";
        assert_eq!(
            replace_section(doc, HEADING, NEW),
            "# B\n\n## Other\n\nx\n\n## TCP bulk throughput (iperf3, loopback)\n\nnew body\n"
        );
    }

    #[test]
    fn appends_when_absent_and_creates_when_empty() {
        assert_eq!(
            replace_section("# B\n\n## Other\n\nx\n", HEADING, NEW),
            "# B\n\n## Other\n\nx\n\n## TCP bulk throughput (iperf3, loopback)\n\nnew body\n"
        );
        assert_eq!(
            replace_section("", HEADING, NEW),
            "# Benchmarks\n\n## TCP bulk throughput (iperf3, loopback)\n\nnew body\n"
        );
    }

    #[test]
    fn replacing_twice_is_stable() {
        let once = replace_section("# B\n\n## Z\n\nz\n", HEADING, NEW);
        assert_eq!(replace_section(&once, HEADING, NEW), once);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400), "2000-02-29");
        assert_eq!(utc_date(1_735_689_599), "2024-12-31");
        assert_eq!(utc_date(1_735_689_600), "2025-01-01");
    }
}
