//! Reading back what a guest left in its work directory and its console log,
//! and judging it: parsers here are pure and unit-tested; `collect` does the
//! file reading.

use std::path::Path;

use super::guest::{self, BROKEN, Broken, DONE, Run};
use super::initramfs::MARK;

/// `observer check` output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Check {
    /// `kernel:` line (the guest's `uname -r`).
    pub kernel: String,
    /// Per tier: available, or why not.
    pub tiers: Vec<(String, Result<(), String>)>,
    /// Per concern, in the observer's order: the chosen hook, or why none.
    pub concerns: Vec<(String, Result<String, String>)>,
    /// (concern, what its hook misses on this kernel): `limit` lines.
    pub limits: Vec<(String, String)>,
    /// `result: run would work`.
    pub works: bool,
    pub exit: Option<i32>,
    pub text: String,
}

impl Check {
    pub fn tier(&self, tier: &str) -> Option<&Result<(), String>> {
        self.tiers.iter().find(|(t, _)| t == tier).map(|(_, r)| r)
    }

    pub fn hook(&self, concern: &str) -> Option<&Result<String, String>> {
        self.concerns.iter().find(|(c, _)| c == concern).map(|(_, r)| r)
    }
}

/// Parses `observer check`'s report. Reasons that span lines (a verifier
/// log) keep their first line only: the whole text stays in `text`.
pub fn parse_check(text: &str, exit: Option<i32>) -> Check {
    let mut c = Check { exit, text: text.to_owned(), ..Check::default() };
    for line in text.lines() {
        if let Some(k) = line.strip_prefix("kernel: ") {
            c.kernel = k.trim().to_owned();
        } else if let Some(rest) = line.strip_prefix("tier ")
            && let Some((tier, status)) = rest.split_once(": ")
        {
            let r = match status.strip_prefix("unavailable: ") {
                Some(why) => Err(why.to_owned()),
                None if status == "available" => Ok(()),
                None => Err(status.to_owned()),
            };
            c.tiers.push((tier.to_owned(), r));
        } else if let Some(rest) = line.strip_prefix("concern ")
            && let Some((concern, rest)) = rest.split_once(' ')
            && let Some((_, choice)) = rest.split_once("): ")
        {
            let r = match choice.strip_suffix(" (chosen)") {
                Some(hook) => Ok(hook.to_owned()),
                None => Err(choice.strip_prefix("none: ").unwrap_or(choice).to_owned()),
            };
            c.concerns.push((concern.to_owned(), r));
        } else if let Some((concern, what)) = line.strip_prefix("limit ").and_then(|l| l.split_once(": ")) {
            c.limits.push((concern.to_owned(), what.to_owned()));
        } else if let Some(r) = line.strip_prefix("result: ") {
            c.works = r.starts_with("run would work");
        }
    }
    c
}

/// How one test binary run went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Passed {
        passed: u32,
    },
    Failed {
        passed: u32,
        failed: Vec<String>,
        exit: Option<i32>,
        timed_out: bool,
    },
    /// Not run: the tier gives a concern the test needs no hook.
    Skipped(String),
    /// Never ran: the VM stopped before it.
    Missing,
}

impl Outcome {
    pub fn is_failure(&self) -> bool {
        matches!(self, Outcome::Failed { .. } | Outcome::Missing)
    }
}

/// Judges a libtest run from its output and exit status.
pub fn parse_test(log: &str, exit: Option<i32>) -> Outcome {
    let mut passed = 0;
    let mut failed = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 3 passed; 0 failed; ..." or "FAILED. 2 passed; 1 failed; ..."
            passed += rest
                .split(['.', ';'])
                .find_map(|part| part.trim().strip_suffix(" passed"))
                .and_then(|n| n.trim().parse::<u32>().ok())
                .unwrap_or(0);
        } else if let Some(name) = line.strip_prefix("test ").and_then(|l| l.strip_suffix(" ... FAILED")) {
            failed.push(name.to_owned());
        }
    }
    match exit {
        Some(0) => Outcome::Passed { passed },
        _ => Outcome::Failed {
            passed,
            failed,
            exit,
            // timeout(1): 124 after TERM, 137 after the KILL that -k sends.
            timed_out: matches!(exit, Some(124 | 137)),
        },
    }
}

/// How the VM ended, from its console log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest script ran and the VM powered off; the script's status.
    Exited(i32),
    Panicked,
    /// Killed by the host's timeout.
    TimedOut,
    /// Stopped without an exit line (qemu failed, init died...).
    Died,
}

pub fn vm_end(console: &str, timed_out: bool) -> VmEnd {
    if console.contains("Kernel panic - not syncing") {
        return VmEnd::Panicked;
    }
    let exit = console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(MARK))
        .filter_map(|l| l.trim().strip_prefix("exit "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back();
    match (exit, timed_out) {
        (Some(rc), _) => VmEnd::Exited(rc),
        (None, true) => VmEnd::TimedOut,
        (None, false) => VmEnd::Died,
    }
}

/// The reason `observer check` gives for not being able to run, first line.
pub fn refusal_reason(check: &str) -> Option<&str> {
    check.lines().find_map(|l| {
        l.strip_prefix("btf: unavailable: ").or_else(|| l.strip_prefix("concern tcp_state (required): none: "))
    })
}

/// A broken-hook scenario passes when check refuses (exit 1) with a reason,
/// and run exits with the expected status, says the same, and does not panic.
/// `Ok` carries run's error line.
pub fn judge_broken(
    b: &Broken,
    check: &str,
    check_rc: Option<i32>,
    run: &str,
    run_rc: Option<i32>,
) -> Result<String, String> {
    if check_rc != Some(1) {
        return Err(format!("observer check {} exited {check_rc:?}, not 1", b.args.join(" ")));
    }
    let Some(reason) = refusal_reason(check) else {
        return Err(
            "observer check gave no reason (no `btf: unavailable` or `concern tcp_state (required): none` line)".into(),
        );
    };
    if run.contains("panicked") {
        return Err("observer run panicked".into());
    }
    if run_rc != Some(b.run_exit) {
        return Err(format!("observer run {} exited {run_rc:?}, not {}", b.args.join(" "), b.run_exit));
    }
    let Some(error) = run.lines().find(|l| l.contains(reason)) else {
        return Err(format!("observer run's message does not contain check's reason {reason:?}"));
    };
    Ok(error.trim().to_owned())
}

/// One test binary's run in one tier.
#[derive(Clone, Debug)]
pub struct Tested {
    pub run: Run,
    pub outcome: Outcome,
    /// Wall-clock seconds inside the guest, the retry included.
    pub secs: Option<u64>,
    /// The first attempt, when it failed and the test was run once more.
    pub first: Option<Outcome>,
}

/// Everything one guest reported.
#[derive(Clone, Debug)]
pub struct Collected {
    /// (tier, report): `auto` and every forced tier, in order.
    pub checks: Vec<(String, Check)>,
    pub tests: Vec<Tested>,
    pub broken: Vec<(Broken, Result<String, String>)>,
    /// The guest script reached its end.
    pub done: bool,
}

fn read(path: &Path) -> Option<String> {
    std::fs::read(path).ok().map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// `path` with `suffix` appended to its file name.
fn with_suffix(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    p.into()
}

fn read_rc(path: &Path) -> Option<i32> {
    read(&with_suffix(path, ".rc")).and_then(|s| s.trim().parse().ok())
}

pub fn collect(work: &Path, tiers: &[&str], runs: &[Run]) -> Collected {
    let checks = std::iter::once(guest::AUTO)
        .chain(tiers.iter().copied())
        .filter_map(|tier| {
            let path = work.join(guest::check_file(tier));
            read(&path).map(|text| (tier.to_owned(), parse_check(&text, read_rc(&path))))
        })
        .collect();
    let tests = runs
        .iter()
        .map(|r| {
            let path = work.join(guest::test_file(r.tier, &r.test));
            let outcome = if let Some(why) = read(&with_suffix(&path, ".skip")) {
                Outcome::Skipped(why.trim().to_owned())
            } else {
                match (read(&path), read_rc(&path)) {
                    (Some(log), rc @ Some(_)) => parse_test(&log, rc),
                    // Started but no status: the VM stopped during the run.
                    (Some(log), None) => match parse_test(&log, None) {
                        Outcome::Failed { passed, failed, .. } => {
                            Outcome::Failed { passed, failed, exit: None, timed_out: true }
                        }
                        other => other,
                    },
                    (None, _) => Outcome::Missing,
                }
            };
            let secs = read(&with_suffix(&path, ".secs")).and_then(|s| s.trim().parse().ok());
            let first_path = with_suffix(&path, ".first");
            let first = read(&first_path).map(|log| parse_test(&log, read_rc(&first_path)));
            Tested { run: r.clone(), outcome, secs, first }
        })
        .collect();
    let broken = BROKEN
        .iter()
        .map(|b| {
            let check = work.join(guest::broken_file(b.name, "check"));
            let run = work.join(guest::broken_file(b.name, "run"));
            let verdict = match (read(&check), read(&run)) {
                (Some(c), Some(r)) => judge_broken(b, &c, read_rc(&check), &r, read_rc(&run)),
                _ => Err("not run".to_owned()),
            };
            (*b, verdict)
        })
        .collect();
    Collected { checks, tests, broken, done: work.join(DONE).exists() }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECK_61: &str = "\
kernel: 6.1.0-56-amd64
privileges: ok
btf: /sys/kernel/btf/vmlinux
offsets: ok (tcp_sock.bytes_acked at 1496, tcp_sock.bytes_received at 1448, sock.sk_rx_dst_ifindex at 144)
tier fentry: unavailable: the kernel refused to load a test fentry program on tcp_set_state: the BPF_PROG_LOAD syscall returned Permission denied (os error 13). Verifier output: combined stack size of 2 calls is 544. Too large
verification time 518281 usec
stack depth 488+0
: Permission denied (os error 13)
tier kprobe: available
tier tracepoint: available
concern tcp_state (required): tp_btf/inet_sock_set_state (chosen)
concern tcp_owner (optional): kretprobe/inet_csk_accept (chosen)
concern sock_calls (optional): none: tp_btf/sock_send_length+sock_recv_length+cgroup/sendmsg+recvmsg: kernel has no tracepoint sock:sock_send_length
concern udp_release (optional): cgroup/sock_release (chosen)
limit tcp_errors: resets answering a closed port are not counted as sent
result: run would work
";

    #[test]
    fn check_report_is_parsed_per_tier_and_concern() {
        let c = parse_check(CHECK_61, Some(0));
        assert_eq!(c.kernel, "6.1.0-56-amd64");
        assert!(c.works);
        assert_eq!(c.tier("kprobe"), Some(&Ok(())));
        let fentry = c.tier("fentry").unwrap().clone().unwrap_err();
        assert!(fentry.starts_with("the kernel refused") && fentry.ends_with("Too large"), "{fentry}");
        assert_eq!(c.hook("tcp_state"), Some(&Ok("tp_btf/inet_sock_set_state".to_owned())));
        assert_eq!(c.hook("tcp_owner"), Some(&Ok("kretprobe/inet_csk_accept".to_owned())));
        let none = c.hook("sock_calls").unwrap().clone().unwrap_err();
        assert!(none.ends_with("kernel has no tracepoint sock:sock_send_length"), "{none}");
        assert_eq!(
            c.concerns.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["tcp_state", "tcp_owner", "sock_calls", "udp_release"]
        );
        assert_eq!(
            c.limits,
            [("tcp_errors".to_owned(), "resets answering a closed port are not counted as sent".to_owned())]
        );
        assert!(!parse_check("result: run cannot work here\n", Some(1)).works);
    }

    #[test]
    fn test_logs_are_judged_by_status_with_counts_and_names() {
        let ok = "running 2 tests\ntest a ... ok\ntest b ... ok\n\ntest result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 4.34s\n";
        assert_eq!(parse_test(ok, Some(0)), Outcome::Passed { passed: 2 });
        let bad = "test a ... ok\ntest b ... FAILED\n\nfailures:\n    b\n\ntest result: FAILED. 1 passed; 1 failed; 0 ignored\n";
        assert_eq!(
            parse_test(bad, Some(101)),
            Outcome::Failed { passed: 1, failed: vec!["b".into()], exit: Some(101), timed_out: false }
        );
        match parse_test("test a ... ", Some(124)) {
            Outcome::Failed { timed_out: true, passed: 0, .. } => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn vm_end_from_console() {
        assert_eq!(
            vm_end(
                "[ 1.0] boot\r\nobserver-vm: booted 6.1\r\nobserver-vm: exit 0\r\n[ 9.1] reboot: Power down\r\n",
                false
            ),
            VmEnd::Exited(0)
        );
        assert_eq!(
            vm_end("observer-vm: init: mounting the host root over 9p\nobserver-vm: exit 125\n", false),
            VmEnd::Exited(125)
        );
        assert_eq!(vm_end("Kernel panic - not syncing: Attempted to kill init!\n", false), VmEnd::Panicked);
        assert_eq!(vm_end("observer-vm: tier kprobe: burst\n", true), VmEnd::TimedOut);
        assert_eq!(vm_end("qemu-system-x86_64: -fsdev ...: error\n", false), VmEnd::Died);
    }

    const KPROBE_CHECK: &str = "tier kprobe: unavailable: the kernel has no kprobe support (/sys/bus/event_source/devices/kprobe/type is missing: CONFIG_KPROBES is off)
concern tcp_state (required): none: kprobe/tcp_set_state: kprobe unavailable: the kernel has no kprobe support (/sys/bus/event_source/devices/kprobe/type is missing: CONFIG_KPROBES is off)
result: run cannot work here
";
    const KPROBE_RUN: &str = "WARN GPU statistics unavailable
observer: error: no usable kernel hook for tcp_state: kprobe/tcp_set_state: kprobe unavailable: the kernel has no kprobe support (/sys/bus/event_source/devices/kprobe/type is missing: CONFIG_KPROBES is off)
";

    #[test]
    fn broken_hooks_must_be_refused_with_checks_reason() {
        let b = &BROKEN[0];
        let ok = judge_broken(b, KPROBE_CHECK, Some(1), KPROBE_RUN, Some(2)).unwrap();
        assert!(ok.starts_with("observer: error: no usable kernel hook for tcp_state: kprobe/tcp_set_state"), "{ok}");
        assert!(judge_broken(b, KPROBE_CHECK, Some(1), KPROBE_RUN, Some(101)).unwrap_err().contains("not 2"));
        assert!(judge_broken(b, KPROBE_CHECK, Some(0), KPROBE_RUN, Some(2)).unwrap_err().contains("not 1"));
        let panic = "thread 'main' panicked at src/loader.rs:1:1\n";
        assert!(judge_broken(b, KPROBE_CHECK, Some(1), panic, Some(2)).unwrap_err().contains("panicked"));
        let other = "observer: error: something else\n";
        assert!(judge_broken(b, KPROBE_CHECK, Some(1), other, Some(2)).unwrap_err().contains("does not contain"));
        // A run that started instead of refusing is killed by timeout(1): 124.
        assert!(judge_broken(b, KPROBE_CHECK, Some(1), "", Some(124)).is_err());

        let btf_check = "btf: unavailable: cannot read kernel BTF from /nonexistent/vmlinux: i/o error\nresult: run cannot work here\n";
        let btf_run = "observer: error: cannot read kernel BTF from /nonexistent/vmlinux: i/o error: more\n";
        assert!(judge_broken(&BROKEN[1], btf_check, Some(1), btf_run, Some(1)).is_ok());
    }
}
