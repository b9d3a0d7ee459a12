//! Turning the results into text: the summary printed after a run, the
//! markdown tables of README's "Kernel support" section, and the splice that
//! replaces that section between its markers.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};

use super::guest::{AUTO, Run};
use super::results::{Check, Collected, Outcome, Tested, VmEnd};

pub const BEGIN: &str = "<!-- kernels:begin -->";
pub const END: &str = "<!-- kernels:end -->";
/// The arm64 guests' tables (`cargo xtask kernels --arch arm64 --write-readme`).
pub const ARM64_BEGIN: &str = "<!-- kernels-arm64:begin -->";
pub const ARM64_END: &str = "<!-- kernels-arm64:end -->";

/// README's markers around the tables of guests of `arch`.
pub fn markers(arch: crate::build::Arch) -> (&'static str, &'static str) {
    match arch {
        crate::build::Arch::X86_64 => (BEGIN, END),
        crate::build::Arch::Aarch64 => (ARM64_BEGIN, ARM64_END),
    }
}

/// Concerns in the observer's order, for tables without any check to read
/// them from.
const CONCERNS: [&str; 4] = ["tcp_state", "tcp_owner", "sock_calls", "udp_release"];

/// One kernel's run.
#[derive(Clone, Debug)]
pub struct KernelReport {
    /// "Debian 6.1".
    pub label: String,
    /// The package and version booted.
    pub package: String,
    /// The forced tiers this kernel is expected to offer.
    pub tiers: Vec<&'static str>,
    pub vm: VmEnd,
    pub elapsed: Duration,
    pub console: PathBuf,
    /// The guest's work directory, with every result file.
    pub work: PathBuf,
    pub collected: Collected,
}

impl KernelReport {
    fn check(&self, tier: &str) -> Option<&Check> {
        self.collected.checks.iter().find(|(t, _)| t == tier).map(|(_, c)| c)
    }

    /// The guest's `uname -r`, as its `observer check` reported it.
    pub fn release(&self) -> &str {
        self.check(AUTO).map_or("?", |c| c.kernel.as_str())
    }

    /// Everything that went wrong; empty when the kernel passed.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let log = self.console.display();
        match self.vm {
            VmEnd::Exited(_) if self.collected.done => {}
            VmEnd::Exited(rc) => f.push(format!("the guest script stopped early (status {rc}); console log: {log}")),
            VmEnd::Panicked => f.push(format!("the guest kernel panicked; console log: {log}")),
            VmEnd::TimedOut => f.push(format!("the VM hung and was killed at its timeout; console log: {log}")),
            VmEnd::Died => f.push(format!("the VM stopped without reporting a status; console log: {log}")),
        }
        match self.check(AUTO) {
            Some(c) if c.exit == Some(0) && c.works => {}
            Some(c) => f.push(format!("observer check: run would not work here (exit {:?})", c.exit)),
            None => f.push("observer check: no report".into()),
        }
        for tier in &self.tiers {
            match self.check(tier).and_then(|c| c.tier(tier)) {
                Some(Ok(())) => {}
                Some(Err(why)) => f.push(format!("tier {tier}: observer check says it is unavailable: {why}")),
                None => f.push(format!("tier {tier}: no observer check report")),
            }
        }
        for Tested { run, outcome, .. } in &self.collected.tests {
            match outcome {
                Outcome::Failed { failed, exit, timed_out, .. } => {
                    let how = if *timed_out {
                        "timed out".to_owned()
                    } else if failed.is_empty() {
                        format!("exit {exit:?}")
                    } else {
                        format!("failed: {}", failed.join(", "))
                    };
                    f.push(format!("tier {}: {}: {how}", run.tier, run.test));
                }
                Outcome::Missing => f.push(format!("tier {}: {}: never ran", run.tier, run.test)),
                Outcome::Passed { .. } | Outcome::Skipped(_) => {}
            }
        }
        for (b, verdict) in &self.collected.broken {
            if let Err(why) = verdict {
                f.push(format!("broken hook {} ({}): {why}", b.name, b.what));
            }
        }
        f
    }

    /// The README cell for `tier`.
    fn tier_cell(&self, tier: &str) -> String {
        // A tier the kernel's guest does not force: arm64's run `auto` and `kprobe` only.
        if tier != AUTO && !self.tiers.contains(&tier) {
            return "not run".into();
        }
        let outcomes: Vec<(&Run, &Outcome)> =
            self.collected.tests.iter().filter(|t| t.run.tier == tier).map(|t| (&t.run, &t.outcome)).collect();
        if outcomes.is_empty() {
            return "no tests".into();
        }
        let passed: u32 = outcomes
            .iter()
            .map(|(_, o)| match o {
                Outcome::Passed { passed } | Outcome::Failed { passed, .. } => *passed,
                _ => 0,
            })
            .sum();
        let names = |pred: fn(&Outcome) -> bool| {
            outcomes.iter().filter(|(_, o)| pred(o)).map(|(r, _)| r.test.as_str()).collect::<Vec<_>>()
        };
        let ran = names(|o| matches!(o, Outcome::Passed { .. }));
        let failed = names(Outcome::is_failure);
        let skipped = names(|o| matches!(o, Outcome::Skipped(_)));
        let retried: Vec<&str> = self
            .collected
            .tests
            .iter()
            .filter(|t| t.run.tier == tier && t.first.is_some() && !t.outcome.is_failure())
            .map(|t| t.run.test.as_str())
            .collect();
        let mut detail = ran.join(", ");
        if !retried.is_empty() {
            let _ = write!(detail, "; on a second run: {}", retried.join(", "));
        }
        let mut cell = format!("{passed} passed");
        if !detail.is_empty() {
            let _ = write!(cell, " ({detail})");
        }
        if !failed.is_empty() {
            let _ = write!(cell, "; **failed**: {}", failed.join(", "));
        }
        if !skipped.is_empty() {
            let _ = write!(cell, "; skipped (no hook): {}", skipped.join(", "));
        }
        cell
    }

    fn broken_cell(&self) -> String {
        let b = &self.collected.broken;
        let ok = b.iter().filter(|(_, v)| v.is_ok()).count();
        let bad: Vec<&str> = b.iter().filter(|(_, v)| v.is_err()).map(|(b, _)| b.name).collect();
        if bad.is_empty() {
            format!("{ok}/{} refused with check's reason", b.len())
        } else {
            format!("**failed**: {}", bad.join(", "))
        }
    }
}

fn concerns_of<'a>(checks: impl IntoIterator<Item = &'a Check>) -> Vec<String> {
    checks
        .into_iter()
        .find(|c| !c.concerns.is_empty())
        .map(|c| c.concerns.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_else(|| CONCERNS.iter().map(|s| s.to_string()).collect())
}

fn hook_cell(check: Option<&Check>, concern: &str) -> String {
    match check.and_then(|c| c.hook(concern)) {
        Some(Ok(hook)) => format!("`{hook}`"),
        Some(Err(_)) => "none".into(),
        None => "?".into(),
    }
}

/// README's section: hooks chosen per kernel (auto), then tests per tier.
/// `host` is the build host's own `observer check`, if it ran.
pub fn readme_section(kernels: &[KernelReport], host: Option<&Check>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<!-- generated by `cargo xtask kernels --write-readme` (xtask/src/kernels/report.rs); do not edit -->"
    );
    let concerns = concerns_of(kernels.iter().filter_map(|k| k.check(AUTO)).chain(host));
    let _ = writeln!(s, "Hooks that `observer check` chooses (`--probes auto`):\n");
    let _ = writeln!(s, "| kernel | {} | how known |", concerns.join(" | "));
    let _ = writeln!(s, "|{}", " --- |".repeat(concerns.len() + 2));
    for k in kernels {
        let cells: Vec<String> = concerns.iter().map(|c| hook_cell(k.check(AUTO), c)).collect();
        let _ = writeln!(
            s,
            "| {} (`{}`, {}) | {} | qemu, `cargo xtask kernels` |",
            k.label,
            k.release(),
            k.package,
            cells.join(" | ")
        );
    }
    if let Some(h) = host {
        let cells: Vec<String> = concerns.iter().map(|c| hook_cell(Some(h), c)).collect();
        let unavailable: Vec<&str> = h.tiers.iter().filter(|(_, r)| r.is_err()).map(|(t, _)| t.as_str()).collect();
        let note =
            if unavailable.is_empty() { String::new() } else { format!("; unavailable: {}", unavailable.join(", ")) };
        let _ = writeln!(
            s,
            "| `{}` (the build host{note}) | {} | `observer check` on the host; sessions tested by `cargo xtask test` |",
            h.kernel,
            cells.join(" | ")
        );
    }
    // What a chosen hook misses on a kernel, as its `observer check` says.
    let limited = kernels.iter().filter_map(|k| Some((k.label.as_str(), k.check(AUTO)?)));
    let limited = limited.chain(host.map(|h| ("the build host", h)));
    for (label, check) in limited {
        for (concern, what) in &check.limits {
            let _ = writeln!(s, "\n{label}, `{concern}`: {what}.");
        }
    }
    let _ = writeln!(
        s,
        "\nEnd-to-end tests in qemu, per tier (`--probes` forced on every observer a test starts; \
         test cases passed; a test is skipped where the tier has no hook for a concern it needs), and \
         deliberately broken starts (`observer run` must refuse with `observer check`'s reason, not crash):\n"
    );
    let tiers = [AUTO, "fentry", "kprobe", "tracepoint"];
    let _ = writeln!(s, "| kernel | {} | broken hooks |", tiers.join(" | "));
    let _ = writeln!(s, "|{}", " --- |".repeat(tiers.len() + 2));
    for k in kernels {
        let cells: Vec<String> = tiers.iter().map(|t| k.tier_cell(t)).collect();
        let _ = writeln!(s, "| {} | {} | {} |", k.label, cells.join(" | "), k.broken_cell());
    }
    s
}

/// `readme` with the text between the markers replaced by `section`.
pub fn splice(readme: &str, section: &str, (begin, end): (&str, &str)) -> Result<String> {
    let (Some(b), Some(e)) = (readme.find(begin), readme.find(end)) else {
        bail!("README.md lacks the markers {begin} and {end} around the generated kernel table");
    };
    if e < b {
        bail!("README.md has {end} before {begin}");
    }
    let head = &readme[..b + begin.len()];
    let tail = &readme[e..];
    Ok(format!("{head}\n{}\n{tail}", section.trim_end()))
}

/// The full text printed after a run (and kept in target/kernels/report.md):
/// per kernel, what each tier's check chose, every test's outcome, the
/// broken-hook verdicts and the failures.
pub fn summary(kernels: &[KernelReport], host: Option<&Check>) -> String {
    let mut s = String::new();
    for k in kernels {
        let _ = writeln!(s, "## {} ({}, `{}`)\n", k.label, k.package, k.release());
        let _ = writeln!(
            s,
            "VM: {:?} after {:.0} s; console log: {}\n",
            k.vm,
            k.elapsed.as_secs_f64(),
            k.console.display()
        );
        let concerns = concerns_of(k.collected.checks.iter().map(|(_, c)| c));
        let _ = writeln!(s, "| check | tier available | {} | result |", concerns.join(" | "));
        let _ = writeln!(s, "|{}", " --- |".repeat(concerns.len() + 3));
        for (tier, c) in &k.collected.checks {
            let avail = match c.tier(tier) {
                _ if tier == AUTO => "-".to_owned(),
                Some(Ok(())) => "yes".to_owned(),
                Some(Err(why)) => format!("no: {}", why.chars().take(120).collect::<String>()),
                None => "?".to_owned(),
            };
            let cells: Vec<String> = concerns.iter().map(|n| hook_cell(Some(c), n)).collect();
            let result = if c.works { "run would work" } else { "run cannot work" };
            let _ =
                writeln!(s, "| `--probes {tier}` | {avail} | {} | {result} (exit {:?}) |", cells.join(" | "), c.exit);
        }
        let _ = writeln!(s, "\n| tier | test | outcome | seconds |\n| --- | --- | --- | --- |");
        for Tested { run, outcome: o, secs, first } in &k.collected.tests {
            let outcome = match o {
                Outcome::Passed { passed } => format!("passed ({passed})"),
                Outcome::Failed { passed, failed, exit, timed_out } => format!(
                    "**FAILED** ({passed} passed; failed: {}; exit {exit:?}{})",
                    failed.join(", "),
                    if *timed_out { ", timed out" } else { "" }
                ),
                Outcome::Skipped(why) => format!("skipped: {why}"),
                Outcome::Missing => "**never ran**".into(),
            };
            let outcome = match first {
                Some(Outcome::Failed { failed, exit, .. }) => {
                    format!("{outcome}; first run failed ({}; exit {exit:?})", failed.join(", "))
                }
                _ => outcome,
            };
            let secs = secs.map_or("?".to_owned(), |s| s.to_string());
            let _ = writeln!(s, "| {} | {} | {outcome} | {secs} |", run.tier, run.test);
        }
        let _ = writeln!(s);
        for (b, verdict) in &k.collected.broken {
            match verdict {
                Ok(msg) => {
                    let _ = writeln!(s, "- broken hook {} ({}): refused: `{msg}`", b.name, b.what);
                }
                Err(why) => {
                    let _ = writeln!(s, "- broken hook {} ({}): **FAILED**: {why}", b.name, b.what);
                }
            }
        }
        let failures = k.failures();
        if failures.is_empty() {
            let _ = writeln!(s, "\nresult: **pass**\n");
        } else {
            let _ = writeln!(s, "\nresult: **FAIL**");
            for f in failures {
                let _ = writeln!(s, "- {f}");
            }
            let _ = writeln!(s);
        }
    }
    let _ = writeln!(s, "## Tables (README)\n\n{}", readme_section(kernels, host));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::guest::BROKEN;
    use crate::kernels::results::parse_check;

    const CHECK: &str = "kernel: 6.12.117+deb12-amd64
tier fentry: available
tier kprobe: available
tier tracepoint: available
concern tcp_state (required): tp_btf/inet_sock_set_state (chosen)
concern tcp_owner (optional): fexit/inet_csk_accept (chosen)
concern sock_calls (optional): none: no fentry hook exists for this
result: run would work
";

    fn run(tier: &'static str, test: &str) -> Run {
        Run { tier, test: test.into(), path: format!("/t/{test}").into(), needs: &[] }
    }

    fn kernel(tests: Vec<(Run, Outcome)>, broken_ok: bool) -> KernelReport {
        let tests =
            tests.into_iter().map(|(run, outcome)| Tested { run, outcome, secs: Some(3), first: None }).collect();
        let checks = [AUTO, "fentry", "kprobe", "tracepoint"]
            .iter()
            .map(|t| (t.to_string(), parse_check(CHECK, Some(0))))
            .collect();
        let broken = BROKEN
            .iter()
            .map(|b| (*b, if broken_ok { Ok("observer: error: ...".to_owned()) } else { Err("exited 101".to_owned()) }))
            .collect();
        KernelReport {
            label: "Debian 6.12".into(),
            package: "linux-image-6.12.117+deb12-amd64-unsigned 6.12.117-1~deb12u1".into(),
            tiers: vec!["fentry", "kprobe", "tracepoint"],
            vm: VmEnd::Exited(0),
            elapsed: Duration::from_secs(90),
            console: "/t/logs/6.12.console.log".into(),
            work: "/t/runs/6.12".into(),
            collected: Collected { checks, tests, broken, done: true },
        }
    }

    #[test]
    fn a_clean_kernel_has_no_failures_and_fills_both_tables() {
        let k = kernel(
            vec![
                (run(AUTO, "tcp_sessions"), Outcome::Passed { passed: 1 }),
                (run(AUTO, "check"), Outcome::Passed { passed: 3 }),
                (run("kprobe", "tcp_sessions"), Outcome::Passed { passed: 1 }),
                (run("kprobe", "udp_sessions"), Outcome::Skipped("no sock_calls hook".into())),
            ],
            true,
        );
        assert!(k.failures().is_empty(), "{:?}", k.failures());
        let host = parse_check(
            "kernel: 6.18.44\ntier fentry: unavailable: EPERM\ntier kprobe: unavailable: no\ntier tracepoint: available\nconcern tcp_state (required): tp_btf/inet_sock_set_state (chosen)\n",
            Some(0),
        );
        let s = readme_section(&[k], Some(&host));
        assert!(!s.contains("`tcp_errors`"), "no limit line: {s}");
        assert!(
            s.contains(
                "| kernel | tcp_state | tcp_owner | sock_calls | how known |\n| --- | --- | --- | --- | --- |\n"
            ),
            "{s}"
        );
        assert!(s.contains("| Debian 6.12 (`6.12.117+deb12-amd64`, linux-image-6.12.117+deb12-amd64-unsigned 6.12.117-1~deb12u1) | `tp_btf/inet_sock_set_state` | `fexit/inet_csk_accept` | none | qemu, `cargo xtask kernels` |"), "{s}");
        assert!(
            s.contains(
                "| `6.18.44` (the build host; unavailable: fentry, kprobe) | `tp_btf/inet_sock_set_state` | ? | ? |"
            ),
            "{s}"
        );
        assert!(s.contains("| Debian 6.12 | 4 passed (tcp_sessions, check) | no tests | 1 passed (tcp_sessions); skipped (no hook): udp_sessions | no tests | 2/2 refused with check's reason |"), "{s}");
    }

    #[test]
    fn failures_name_the_tier_the_test_and_the_cases() {
        let mut k = kernel(
            vec![
                (
                    run("fentry", "haproxy"),
                    Outcome::Failed { passed: 0, failed: vec!["relay".into()], exit: Some(101), timed_out: false },
                ),
                (
                    run("kprobe", "burst"),
                    Outcome::Failed { passed: 0, failed: vec![], exit: Some(124), timed_out: true },
                ),
                (run("tracepoint", "burst"), Outcome::Missing),
            ],
            false,
        );
        k.vm = VmEnd::TimedOut;
        k.collected.checks[1].1.tiers[0].1 = Err("the kernel refused: stack too large".into());
        let f = k.failures();
        assert!(f[0].contains("hung") && f[0].contains("/t/logs/6.12.console.log"), "{f:?}");
        for needle in [
            "tier fentry: observer check says it is unavailable: the kernel refused: stack too large",
            "tier fentry: haproxy: failed: relay",
            "tier kprobe: burst: timed out",
            "tier tracepoint: burst: never ran",
            "broken hook no-kprobes",
        ] {
            assert!(f.iter().any(|l| l.contains(needle)), "{needle} in {f:?}");
        }
        let s = readme_section(&[k], None);
        assert!(s.contains("0 passed; **failed**: haproxy"), "{s}");
        assert!(s.contains("**failed**: no-kprobes, no-btf |"), "{s}");
    }

    #[test]
    fn a_pass_on_the_second_run_is_shown_not_failed() {
        let mut k = kernel(vec![(run("fentry", "haproxy"), Outcome::Passed { passed: 1 })], true);
        k.collected.tests[0].first =
            Some(Outcome::Failed { passed: 0, failed: vec!["relay".into()], exit: Some(101), timed_out: false });
        assert!(k.failures().is_empty(), "{:?}", k.failures());
        assert_eq!(k.tier_cell("fentry"), "1 passed (haproxy; on a second run: haproxy)");
        assert!(
            summary(&[k], None)
                .contains("| fentry | haproxy | passed (1); first run failed (relay; exit Some(101)) | 3 |")
        );
    }

    #[test]
    fn limits_follow_the_hooks_table() {
        let mut k = kernel(vec![], true);
        k.collected.checks[0].1.limits.push(("tcp_errors".into(), "closed-port resets are not counted as sent".into()));
        let s = readme_section(&[k], None);
        assert!(s.contains("\n\nDebian 6.12, `tcp_errors`: closed-port resets are not counted as sent.\n"), "{s}");
    }

    #[test]
    fn splice_replaces_only_between_markers() {
        let readme = format!("# t\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n");
        let x86 = markers(crate::build::Arch::X86_64);
        let out = splice(&readme, "new table\n", x86).unwrap();
        assert_eq!(out, format!("# t\n\nbefore\n{BEGIN}\nnew table\n{END}\nafter\n"));
        assert_eq!(splice(&out, "new table", x86).unwrap(), out, "idempotent");
        assert!(splice("no markers", "x", x86).is_err());
        assert!(splice(&format!("{END}\n{BEGIN}"), "x", x86).is_err());
        // The arm64 tables have markers of their own: the x86 ones stay.
        let both = format!("{out}{ARM64_BEGIN}\n{ARM64_END}\n");
        let arm = splice(&both, "arm64 table", markers(crate::build::Arch::Aarch64)).unwrap();
        assert_eq!(arm, format!("{out}{ARM64_BEGIN}\narm64 table\n{ARM64_END}\n"));
    }
}
