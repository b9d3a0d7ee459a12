//! `observer check` on the running kernel.
use std::path::Path;

use observer_tests::run_observer_cli;

fn stdout(args: &[&str]) -> (String, i32) {
    let out = run_observer_cli(args).unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), out.status.code().unwrap_or(-1))
}

#[test]
fn check_names_the_chosen_hooks_and_why_other_tiers_are_unavailable() {
    let (report, code) = stdout(&["check"]);
    assert_eq!(code, 0, "{report}");
    // Every kernel this project supports has tp_btf; auto prefers it for state.
    assert!(
        report.contains("concern tcp_state (required): tp_btf/inet_sock_set_state+tcp_destroy_sock (chosen)"),
        "{report}"
    );
    assert!(report.contains("result: run would work"), "{report}");
    let tier = |name: &str| {
        report
            .lines()
            .find(|l| l.starts_with(&format!("tier {name}: ")))
            .unwrap_or_else(|| panic!("no {name} line: {report}"))
            .to_owned()
    };
    if Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
        assert_eq!(tier("kprobe"), "tier kprobe: available");
    } else {
        assert!(tier("kprobe").contains("unavailable: the kernel has no kprobe support"), "{report}");
        assert!(tier("kprobe").contains("CONFIG_KPROBES"), "{report}");
    }
    let fentry = tier("fentry");
    assert!(
        fentry == "tier fentry: available" || fentry.starts_with("tier fentry: unavailable: the kernel refused"),
        "{fentry}"
    );
    if fentry != "tier fentry: available" {
        // The reason is the kernel's own answer, not a guess.
        assert!(fentry.contains("os error"), "{fentry}");
        assert!(
            report.contains("concern tcp_owner (optional): tp_btf/sock_send_length+sock_recv_length (chosen)")
                || !Path::new("/sys/bus/event_source/devices/kprobe/type").exists()
                    && report.contains("concern tcp_owner (optional): none"),
            "{report}"
        );
    }
}

#[test]
fn check_fails_for_a_forced_tier_the_kernel_lacks() {
    let (report, _) = stdout(&["check"]);
    // The tcp_state hook of each tier, as `observer_probe_info{hook}` names it.
    for (tier, hook) in [("fentry", "fentry/tcp_set_state+tcp_v4_destroy_sock"), ("kprobe", "kprobe/tcp_set_state")] {
        if report.contains(&format!("tier {tier}: available")) {
            continue;
        }
        let (forced, code) = stdout(&["check", "--probes", tier]);
        assert_ne!(code, 0, "{forced}");
        assert!(
            forced.contains(&format!("concern tcp_state (required): none: {hook}: {tier} unavailable:")),
            "{forced}"
        );
        assert!(forced.contains("result: run cannot work here"), "{forced}");
    }
}

#[test]
fn check_without_btf_says_run_cannot_work() {
    let (report, code) = stdout(&["check", "--btf", "/nonexistent/vmlinux"]);
    assert_eq!(code, 1, "{report}");
    assert!(report.contains("btf: unavailable: cannot read kernel BTF from /nonexistent/vmlinux"), "{report}");
}

/// `check` loads every program `run` would load here and says what the
/// verifier answered for each: on a supported kernel, accepted, all of them.
#[test]
fn check_lists_every_program_with_the_verifiers_answer() {
    let (report, code) = stdout(&["check"]);
    assert_eq!(code, 0, "{report}");
    let programs: Vec<&str> = report.lines().filter(|l| l.starts_with("program ")).collect();
    eprintln!("{}", programs.join("\n"));
    // The chosen tcp_state hook's programs at least, whichever tier.
    assert!(programs.iter().any(|l| l.contains("(tcp_state): verifier accepted")), "{report}");
    for line in &programs {
        assert!(line.ends_with(": verifier accepted"), "{line}\n{report}");
    }
    // One line per program of every chosen hook: as many as the concerns
    // with a hook need (each has at least one program).
    let chosen = report.lines().filter(|l| l.starts_with("concern ") && l.ends_with("(chosen)")).count();
    let concerns_verified: std::collections::BTreeSet<&str> =
        programs.iter().filter_map(|l| l.split(['(', ')']).nth(1)).collect();
    assert_eq!(concerns_verified.len(), chosen, "{report}");
}
