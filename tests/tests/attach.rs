//! Every hook `observer check` chooses is attached by `observer run`, in the
//! tier `OBSERVER_TEST_PROBES` forces (`cargo xtask kernels` runs this once
//! per tier): an optional hook the kernel refuses at load or attach time is
//! only a warning in the log, and would otherwise pass unnoticed wherever no
//! test needs that concern.
use observer_tests::{NetNs, ObserverProcess, forced_probes, kernel_programs, run_observer_cli};

/// (concern, hook) of every `concern NAME (...): HOOK (chosen)` line.
fn chosen(report: &str) -> Vec<(String, String)> {
    report
        .lines()
        .filter_map(|l| {
            let (concern, rest) = l.strip_prefix("concern ")?.split_once(' ')?;
            let hook = rest.split_once("): ")?.1.strip_suffix(" (chosen)")?;
            Some((concern.to_owned(), hook.to_owned()))
        })
        .collect()
}

#[test]
fn every_hook_check_chooses_is_attached() {
    let forced = forced_probes();
    let mut args = vec!["check"];
    if let Some(tier) = forced.as_deref() {
        args.extend(["--probes", tier]);
    }
    let out = run_observer_cli(&args).unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{report}");
    let hooks = chosen(&report);
    assert!(hooks.iter().any(|(c, _)| c == "tcp_state"), "{report}");

    let ns = NetNs::new("attach").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo"]).unwrap();
    let m = observer.metrics().unwrap();
    for (concern, hook) in &hooks {
        assert_eq!(
            m.value_exact("observer_probe_info", &[("concern", concern), ("hook", hook)]),
            Some(1.0),
            "check chose {hook} for {concern}, run did not attach it\n{report}\n{}",
            observer.log()
        );
    }
    // What each attached program costs per run, for docs/kernels.md: its
    // size after verification (`cargo xtask kernels` runs tests with
    // --show-output, so this lands in each tier's result file).
    let mut programs = kernel_programs().unwrap();
    programs.retain(|p| {
        p.name.starts_with("obs_")
            && m.value_exact("observer_bpf_program_attached", &[("program", &p.name)]) == Some(1.0)
    });
    programs.sort_by(|a, b| a.name.cmp(&b.name));
    programs.dedup_by(|a, b| a.name == b.name);
    for p in &programs {
        let verified = p.verified_insns.map_or("-".to_owned(), |n| n.to_string());
        println!("program {}: {} instructions after verification, verifier walked {verified}", p.name, p.xlated_insns);
    }
    let attached = m.matching("observer_probe_info", &[]);
    assert_eq!(attached.len(), hooks.len(), "run attached hooks check did not choose: {attached:?}\n{report}");
    assert!(!observer.log().contains("not attached"), "{}", observer.log());
}

#[test]
fn chosen_lines_are_parsed() {
    let report = "tier kprobe: available\n\
                  concern tcp_state (required): kprobe/tcp_set_state (chosen)\n\
                  concern sock_calls (optional): none: tp_btf/sock_send_length: kernel has no tracepoint\n";
    assert_eq!(chosen(report), [("tcp_state".to_owned(), "kprobe/tcp_set_state".to_owned())]);
}
