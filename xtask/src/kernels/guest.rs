//! What runs inside each VM: which end-to-end test binaries run in which tier,
//! and the shell script that runs them, `observer check` and the broken-hook
//! scenarios, writing every result into the work directory the host reads
//! afterwards (see `results`).

use std::path::{Path, PathBuf};

use super::initramfs::{MARK, sh_quote};

/// The forced tiers, as `--probes` spells them. `auto` runs first, then these.
pub const TIERS: [&str; 3] = ["fentry", "kprobe", "tracepoint"];
pub const AUTO: &str = "auto";

/// Bound on one test binary inside the guest: generous, since CPU-bound code
/// runs 5 to 20 times slower under software emulation.
pub const TEST_LIMIT_S: u32 = 300;

/// `OBSERVER_TEST_TIME_SCALE` in the guest: the tests stretch their timing
/// bounds (a lifetime's tolerance, the shutdown deadline) this many times;
/// exact assertions stay exact.
pub const TIME_SCALE: u32 = 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Once with `auto` and once per forced tier: tests that measure sessions.
    EveryTier,
    /// Once per kernel, with `auto`: tests that do not depend on the tier.
    OncePerKernel,
    /// Not run in the VMs: nothing in them depends on the kernel.
    HostOnly,
    /// Only in these forced tiers: measurements of what the host cannot run.
    OnlyIn(&'static [&'static str]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub scope: Scope,
    /// Concerns (`observer check` names) the test needs a hook for; in a tier
    /// that gives one of them no hook, the test is skipped, not failed.
    pub needs: &'static [&'static str],
}

const PER_TIER: Rule = Rule { scope: Scope::EveryTier, needs: &[] };

/// Test binaries (tests/tests/<name>.rs) that differ from the default, which is
/// "runs in every tier and needs only tcp_state": a new session test is run in
/// every tier without being listed here.
const RULES: &[(&str, Rule)] = &[
    ("check", Rule { scope: Scope::OncePerKernel, needs: &[] }),
    // Cgroup, pod and peer labels are userspace mappings of what the state
    // hook records at connect, whose owner capture haproxy's test checks in
    // every tier; once per kernel keeps the matrix under its time budget.
    ("session_labels", Rule { scope: Scope::OncePerKernel, needs: &[] }),
    // The label set cap: 18,000 connections through userspace's admission of
    // label sets, nothing of it the kernel's (session_labels covers the comm
    // it reads); about a minute per kernel under emulation.
    ("label_set_cap", Rule { scope: Scope::HostOnly, needs: &[] }),
    ("bad_input", Rule { scope: Scope::OncePerKernel, needs: &[] }),
    // The metrics server's TLS and basic auth, and the snapshot API's JSON:
    // userspace over sessions that tcp_sessions checks in every tier. Once per
    // kernel keeps three kernels' matrix within its time budget.
    ("web_config", Rule { scope: Scope::OncePerKernel, needs: &[] }),
    ("snapshot", Rule { scope: Scope::OncePerKernel, needs: &[] }),
    // The fake NVML library (with a fake kubelet for gpu_pods) and a real
    // Prometheus server: nothing in them depends on the kernel, and
    // Prometheus' median over a handful of sessions is too coarse for the
    // spread of goodputs under emulation.
    ("gpu", Rule { scope: Scope::HostOnly, needs: &[] }),
    ("gpu_pods", Rule { scope: Scope::HostOnly, needs: &[] }),
    ("prometheus", Rule { scope: Scope::HostOnly, needs: &[] }),
    // The metrics server under abuse and the deployment files: no kernel hook involved.
    ("http", Rule { scope: Scope::HostOnly, needs: &[] }),
    ("http_pressure", Rule { scope: Scope::HostOnly, needs: &[] }),
    // Capabilities are given up by userspace after attach, whatever the tier
    // (CAP_BPF kept before 5.19 is a kernel matter, once per kernel covers
    // it); what it measures afterwards includes a UDP flow.
    // Which programs a switched-off concern leaves unloaded: the plan is
    // userspace's, the program names per tier are `attach`'s to check.
    ("disable", Rule { scope: Scope::OncePerKernel, needs: &[] }),
    ("privileges", Rule { scope: Scope::OncePerKernel, needs: &["sock_calls", "udp_release"] }),
    ("deploy", Rule { scope: Scope::HostOnly, needs: &[] }),
    // Pinned tables across a restart, the socket probe's sweep and cleanup:
    // bpffs and the probe are the kernel's, the tier is not (UDP flows need
    // their hooks).
    ("restart", Rule { scope: Scope::OncePerKernel, needs: &["sock_calls", "udp_release"] }),
    // The drop and TCP error hooks are the tracepoint tier's only, which
    // `auto` takes for them on every kernel: the forced tier would repeat it.
    ("drops", Rule { scope: Scope::OncePerKernel, needs: &["drops", "tcp_errors"] }),
    // The session log's writer and its queue: userspace over UDP sessions,
    // which udp_sessions and concurrency count per tier; its 100,000 sessions
    // took about a minute of each kernel's VM.
    ("session_log_pipe", Rule { scope: Scope::HostOnly, needs: &["sock_calls", "udp_release"] }),
    // Asserts the owner of haproxy's accepted sockets.
    ("haproxy", Rule { scope: Scope::EveryTier, needs: &["tcp_owner"] }),
    // Asserts an open session in the table for the scrape connection, which
    // predates the programs: only sock_calls adopts it before its close.
    ("self_telemetry", Rule { scope: Scope::EveryTier, needs: &["sock_calls"] }),
    ("udp_sessions", Rule { scope: Scope::EveryTier, needs: &["sock_calls", "udp_release"] }),
    ("live_throughput", Rule { scope: Scope::EveryTier, needs: &["sock_calls"] }),
    // Every send and receive call, TCP and UDP: UDP flows end at release.
    ("sock_calls", Rule { scope: Scope::EveryTier, needs: &["sock_calls", "udp_release"] }),
    // Flows and live bytes under calls from several CPUs at once.
    ("concurrency", Rule { scope: Scope::EveryTier, needs: &["sock_calls", "udp_release"] }),
    // ns per run of the per-call programs next to empty ones of the same attach
    // type (docs/kernels.md): the tiers the host has neither trampolines nor
    // kprobes for; the tracepoint tier is measured on the host.
    ("call_cost", Rule { scope: Scope::OnlyIn(&["fentry", "kprobe"]), needs: &["sock_calls"] }),
];

pub fn rule(test: &str) -> Rule {
    RULES.iter().find(|(n, _)| *n == test).map_or(PER_TIER, |(_, r)| *r)
}

/// An end-to-end test executable, as cargo built it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestBin {
    pub name: String,
    pub path: PathBuf,
}

/// One test binary run in one tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    pub tier: &'static str,
    pub test: String,
    pub path: PathBuf,
    pub needs: &'static [&'static str],
}

/// Every run for a kernel offering `tiers`: `auto` first (all but host-only
/// tests), then each forced tier (the per-tier tests).
pub fn plan(tests: &[TestBin], tiers: &[&'static str]) -> Vec<Run> {
    let mut tests = tests.to_vec();
    tests.sort_by(|a, b| a.name.cmp(&b.name));
    let mut runs = Vec::new();
    for tier in std::iter::once(AUTO).chain(tiers.iter().copied()) {
        for t in &tests {
            let r = rule(&t.name);
            let runs_here = match r.scope {
                Scope::EveryTier => true,
                Scope::OncePerKernel => tier == AUTO,
                Scope::HostOnly => false,
                Scope::OnlyIn(tiers) => tiers.contains(&tier),
            };
            if runs_here {
                runs.push(Run { tier, test: t.name.clone(), path: t.path.clone(), needs: r.needs });
            }
        }
    }
    runs
}

/// A start that must fail: `observer check` and `observer run` with these
/// arguments, after `setup` in a private mount namespace. `run` must exit with
/// `run_exit`, saying what `check` says, without a panic.
#[derive(Clone, Copy, Debug)]
pub struct Broken {
    pub name: &'static str,
    pub what: &'static str,
    pub setup: &'static str,
    pub args: &'static [&'static str],
    pub run_exit: i32,
}

pub const BROKEN: [Broken; 2] = [
    Broken {
        name: "no-kprobes",
        what: "`--probes kprobe` on a kernel without kprobes (the kprobe PMU hidden from the observer)",
        // sysfs' kprobe entry is a symlink to /sys/devices/kprobe; the mount lands there.
        setup: "mount -t tmpfs none /sys/bus/event_source/devices/kprobe",
        args: &["--probes", "kprobe"],
        run_exit: 2,
    },
    Broken {
        name: "no-btf",
        what: "`--btf /nonexistent/vmlinux`",
        setup: "true",
        args: &["--btf", "/nonexistent/vmlinux"],
        run_exit: 1,
    },
];

/// Where the guest puts things, relative to the work directory.
pub fn check_file(tier: &str) -> String {
    format!("check-{tier}.txt")
}
pub fn test_file(tier: &str, test: &str) -> String {
    format!("tests/{tier}/{test}")
}
pub fn broken_file(name: &str, cmd: &str) -> String {
    format!("broken/{name}.{cmd}")
}
pub const DONE: &str = "done";

/// The script /init runs in the chroot (the host's root, read-only, with
/// tmpfs on /tmp and /run). Each result is a file `<name>` with its exit
/// status in `<name>.rc`; progress lines go to the console.
pub fn script(work: &Path, observer: &Path, tiers: &[&'static str], runs: &[Run]) -> String {
    let mut s = format!(
        r#"#!/bin/sh
# Run inside the VM, chrooted into the host's root; generated by
# `cargo xtask kernels` (xtask/src/kernels/guest.rs).
W={work}
OBS={obs}
export W OBS PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8
export RUST_BACKTRACE=1 OBSERVER_BIN="$OBS" OBSERVER_TEST_TIME_SCALE={scale}
# Three runs of the concurrency test's UDP exactness per tier, not the host's
# ten: each takes seconds under emulation, in four tiers of three kernels.
export OBSERVER_TEST_CONCURRENCY_RUNS=3
unset OBSERVER_TEST_PROBES
cd /tmp
say() {{ echo "{MARK} $*"; }}
mkdir -p "$W/broken" || exit 1

# check NAME ARGS...: `observer check ARGS` into check-NAME.txt.
check() {{
  name=$1; shift
  timeout -k 5 120 "$OBS" check "$@" > "$W/check-$name.txt" 2>&1
  echo $? > "$W/check-$name.txt.rc"
}}
# chosen TIER CONCERN: whether `observer check` in TIER gives CONCERN a hook.
chosen() {{ grep -q "^concern $2 ([a-z]*): .* (chosen)\$" "$W/check-$1.txt"; }}
# t TIER TEST BINARY CONCERNS...: one test binary with TIER forced on every observer it starts.
t() {{
  tier=$1 test=$2 bin=$3; shift 3
  out="$W/tests/$tier/$test"
  mkdir -p "$W/tests/$tier"
  for c in "$@"; do
    if ! chosen "$tier" "$c"; then
      echo "observer check --probes $tier gives $c no hook" > "$out.skip"
      say "tier $tier: $test: skipped (no $c hook)"
      return
    fi
  done
  say "tier $tier: $test"
  t0=$(date +%s)
  OBSERVER_TEST_PROBES=$tier timeout -k 10 {limit} "$bin" --test-threads=1 --show-output > "$out" 2>&1
  rc=$?
  # Once more after a failure that was not a timeout: emulation stretches
  # timings 5 to 20 times, and the first attempt is kept and reported.
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ]; then
    mv "$out" "$out.first"
    echo $rc > "$out.first.rc"
    say "tier $tier: $test: exit $rc; running it once more"
    OBSERVER_TEST_PROBES=$tier timeout -k 10 {limit} "$bin" --test-threads=1 --show-output > "$out" 2>&1
    rc=$?
  fi
  echo $(( $(date +%s) - t0 )) > "$out.secs"
  echo $rc > "$out.rc"
  say "tier $tier: $test: exit $rc after $(cat "$out.secs") s"
}}

say "observer check"
check {AUTO}
"#,
        work = sh_quote(&work.to_string_lossy()),
        obs = sh_quote(&observer.to_string_lossy()),
        limit = TEST_LIMIT_S,
        scale = TIME_SCALE,
    );
    for tier in tiers {
        s.push_str(&format!("check {tier} --probes {tier}\n"));
    }
    s.push_str("\n# Tests.\n");
    for r in runs {
        let mut line = format!("t {} {} {}", r.tier, r.test, sh_quote(&r.path.to_string_lossy()));
        for c in r.needs {
            line.push(' ');
            line.push_str(c);
        }
        s.push_str(&line);
        s.push('\n');
    }
    s.push_str("\n# Deliberately broken hooks: a clear refusal, never a crash.\nsay \"broken hooks\"\n");
    for b in BROKEN {
        // Inside the single-quoted `sh -c` text: the arguments are plain words (unit-tested).
        let args = b.args.join(" ");
        let (check, run) = (broken_file(b.name, "check"), broken_file(b.name, "run"));
        // A private mount namespace keeps the set-up from leaking into later steps.
        s.push_str(&format!(
            r#"unshare -m --propagation private /bin/sh -c '
{setup} || echo "set-up failed: {setup}" >> "$W/{check}"
timeout -k 5 120 "$OBS" check {args} >> "$W/{check}" 2>&1; echo $? > "$W/{check}.rc"
timeout -k 5 60 "$OBS" run --listen 127.0.0.1:0 {args} > "$W/{run}" 2>&1; echo $? > "$W/{run}.rc"
'
"#,
            setup = b.setup,
        ));
    }
    s.push_str(&format!("touch \"$W/{DONE}\"\nsay \"guest script done\"\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bins(names: &[&str]) -> Vec<TestBin> {
        names.iter().map(|n| TestBin { name: n.to_string(), path: format!("/t/{n}-0123").into() }).collect()
    }

    fn runs_in<'a>(plan: &'a [Run], tier: &str) -> Vec<&'a str> {
        plan.iter().filter(|r| r.tier == tier).map(|r| r.test.as_str()).collect()
    }

    #[test]
    fn auto_runs_all_but_host_only_tests_and_forced_tiers_run_session_tests() {
        let tests = bins(&["tcp_sessions", "gpu", "check", "burst", "udp_sessions", "bad_input", "new_session_test"]);
        let p = plan(&tests, &TIERS);
        assert_eq!(
            runs_in(&p, AUTO),
            ["bad_input", "burst", "check", "new_session_test", "tcp_sessions", "udp_sessions"]
        );
        for tier in TIERS {
            assert_eq!(runs_in(&p, tier), ["burst", "new_session_test", "tcp_sessions", "udp_sessions"], "{tier}");
        }
        assert_eq!(p[0].tier, AUTO, "auto first");
        let udp = p.iter().find(|r| r.test == "udp_sessions").unwrap();
        assert_eq!(udp.needs, ["sock_calls", "udp_release"]);
        assert_eq!(p.iter().find(|r| r.test == "burst").unwrap().path, Path::new("/t/burst-0123"));
    }

    #[test]
    fn a_test_for_some_tiers_runs_in_those_only() {
        let p = plan(&bins(&["call_cost", "tcp_sessions"]), &TIERS);
        let cost: Vec<&str> = p.iter().filter(|r| r.test == "call_cost").map(|r| r.tier).collect();
        assert_eq!(cost, ["fentry", "kprobe"]);
        assert_eq!(p.iter().find(|r| r.test == "call_cost").unwrap().needs, ["sock_calls"]);
        let p = plan(&bins(&["call_cost"]), &["kprobe", "tracepoint"]);
        assert_eq!(p.iter().map(|r| r.tier).collect::<Vec<_>>(), ["kprobe"]);
    }

    #[test]
    fn a_kernel_without_a_tier_does_not_run_it() {
        let p = plan(&bins(&["tcp_sessions"]), &["kprobe", "tracepoint"]);
        assert!(runs_in(&p, "fentry").is_empty());
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn script_checks_every_tier_runs_every_test_and_the_broken_hooks() {
        let p = plan(&bins(&["tcp_sessions", "udp_sessions"]), &TIERS);
        let s = script(Path::new("/w/6.1"), Path::new("/target/release/observer"), &TIERS, &p);
        assert!(s.contains("W='/w/6.1'\nOBS='/target/release/observer'\n"));
        assert!(s.contains(" OBSERVER_BIN=\"$OBS\" OBSERVER_TEST_TIME_SCALE=10\n"));
        assert!(s.contains("export OBSERVER_TEST_CONCURRENCY_RUNS=3\n"));
        assert!(s.contains("\ncheck auto\ncheck fentry --probes fentry\ncheck kprobe --probes kprobe\ncheck tracepoint --probes tracepoint\n"));
        assert!(s.contains("\nt kprobe tcp_sessions '/t/tcp_sessions-0123'\n"));
        assert!(s.contains("\nt fentry udp_sessions '/t/udp_sessions-0123' sock_calls udp_release\n"));
        assert!(s.contains(r#"OBSERVER_TEST_PROBES=$tier timeout -k 10 300 "$bin" --test-threads=1 --show-output"#));
        assert!(s.contains("mount -t tmpfs none /sys/bus/event_source/devices/kprobe ||"));
        assert!(s.contains(r#""$OBS" run --listen 127.0.0.1:0 --probes kprobe > "$W/broken/no-kprobes.run""#));
        assert!(s.contains(r#""$OBS" check --btf /nonexistent/vmlinux >> "$W/broken/no-btf.check""#));
        assert!(s.trim_end().ends_with("say \"guest script done\""));
        // The broken-hook scenarios go unquoted into single-quoted `sh -c` text.
        for b in BROKEN {
            assert!(!b.setup.contains('\''), "{}", b.setup);
            let plain = |a: &&str| a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            assert!(b.args.iter().all(plain), "{:?}", b.args);
        }
    }
}
