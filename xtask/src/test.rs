//! `cargo xtask test`: everything CI checks, in order, stopping at the first failure.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use crate::{bench, build, kernels, setup, util};

pub struct TestArgs {
    pub skip_bench: bool,
    pub skip_kernels: bool,
    /// Leave out the arm64 guests that run after the x86 matrix.
    pub skip_arm64: bool,
    /// Extra arguments for the end-to-end test binary (a name filter, --nocapture, ...).
    pub filter: Vec<String>,
}

type StepFn<'a> = Box<dyn FnOnce() -> Result<()> + 'a>;

pub fn run(args: &TestArgs) -> Result<()> {
    // Checked up front: finding out at step 5, after the build and the unit tests, wastes
    // minutes.
    if !util::is_root() {
        bail!(
            "cargo xtask test runs privileged end-to-end tests (eBPF, network namespaces) and \
             must run as root: sudo -E cargo xtask test"
        );
    }

    let mut steps: Vec<(&str, StepFn)> = vec![
        ("setup", Box::new(setup::run)),
        ("fmt", Box::new(fmt)),
        ("release build", Box::new(|| build::observer_release().map(drop))),
        // The image's other architecture, cross-compiled with the commands deploy/Dockerfile's
        // build stage runs (scripts/build-observer.sh), checked to be that architecture's ELF.
        ("cross build", Box::new(|| build::observer_for(build::Arch::host().other()).map(drop))),
        ("clippy", Box::new(clippy)),
        ("kernel clippy", Box::new(kernel_clippy)),
        ("unit tests", Box::new(unit_tests)),
        ("end-to-end tests", Box::new(|| end_to_end(&args.filter))),
    ];
    if !args.skip_kernels {
        // The same end-to-end tests on Debian's 5.10, 6.1 and 6.12 in qemu, every
        // hook tier: the fentry and kprobe tiers run nowhere else. Then, from the same
        // queue of VMs, the arm64 guests (their binary is the cross build's), each as
        // soon as an x86 guest ends. Not on an arm64 host: there the matrix's guests
        // are arm64 already.
        let mut arches = vec![build::Arch::host()];
        if !args.skip_arm64 && build::Arch::host() == build::Arch::X86_64 {
            arches.push(build::Arch::Aarch64);
        }
        let name =
            if arches.len() > 1 { "kernel matrix (qemu; x86_64 and arm64 guests)" } else { "kernel matrix (qemu)" };
        steps.push((name, Box::new(move || kernel_matrix(arches))));
    }
    if !args.skip_bench {
        steps
            .push(("benchmark smoke", Box::new(|| bench::run(&bench::Options::smoke(), bench::Prepare::AlreadyBuilt))));
    }

    let total = steps.len();
    let started = Instant::now();
    let mut passed: Vec<(&str, Duration)> = Vec::new();
    for (i, (name, step)) in steps.into_iter().enumerate() {
        util::header(&format!("xtask test: step {}/{total}: {name}", i + 1));
        let t = Instant::now();
        if let Err(err) = step() {
            eprintln!();
            println!(
                "xtask test: FAILED at step {}/{total} ({name}) after {}; passed before it: {}",
                i + 1,
                secs(started.elapsed()),
                list(&passed)
            );
            return Err(err.context(format!("step {}/{total} ({name}) failed", i + 1)));
        }
        passed.push((name, t.elapsed()));
    }
    let skipped: String = [
        (args.skip_kernels, "kernel matrix", "--skip-kernels"),
        (args.skip_arm64 && !args.skip_kernels, "arm64 guests", "--skip-arm64"),
        (args.skip_bench, "benchmark smoke", "--skip-bench"),
    ]
    .iter()
    .filter(|(skip, ..)| *skip)
    .map(|(_, what, flag)| format!("; {what} skipped ({flag})"))
    .collect();
    eprintln!();
    println!("xtask test: all {total} steps passed in {}: {}{skipped}", secs(started.elapsed()), list(&passed));
    Ok(())
}

/// `cargo xtask kernels` with its defaults for guests of `arches`, from one queue of VMs.
fn kernel_matrix(arches: Vec<build::Arch>) -> Result<()> {
    kernels::run(&kernels::Options {
        arches,
        write_readme: false,
        kernels: Vec::new(),
        tests: Vec::new(),
        vm_timeout: Duration::from_secs(kernels::DEFAULT_VM_TIMEOUT_S),
        vcpus: 1,
    })
}

fn fmt() -> Result<()> {
    // Seconds, and a formatting slip is the most common CI failure: checked before the build.
    util::run_checked(util::cargo().args(["fmt", "--all", "--check"]), "rustfmt check (cargo fmt --all --check)")
}

fn clippy() -> Result<()> {
    // Default members only: observer-ebpf builds for the bpf target alone, through
    // observer's build script, which this run compiles (and lints) as usual.
    util::run_checked(util::cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]), "clippy")
}

/// Clippy on the kernel crate, which the userspace run above cannot reach: for the bpf
/// target with the pinned nightly and `core` built from rust-src, as observer's build
/// script builds it (aya-build). A check only: bpf-linker is not involved.
fn kernel_clippy() -> Result<()> {
    let target = if cfg!(target_endian = "big") { "bpfeb-unknown-none" } else { "bpfel-unknown-none" };
    let mut cmd = util::nightly_cargo()?;
    cmd.args(["clippy", "-p", "observer-ebpf", "--release", "--target", target, "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"]);
    util::run_checked(&mut cmd, "kernel clippy")
}

fn unit_tests() -> Result<()> {
    // --workspace ignores default-members, so the bpf-only crate is excluded by name; the
    // end-to-end crate has its own privileged step.
    util::run_checked(
        util::cargo().args(["test", "--workspace", "--exclude", "observer-tests", "--exclude", "observer-ebpf"]),
        "unit tests",
    )
}

fn end_to_end(filter: &[String]) -> Result<()> {
    ensure_tracefs();
    let bin = build::observer_bin();
    let mut cmd = util::cargo();
    cmd.args(["test", "-p", "observer-tests", "--", "--test-threads=1"])
        .args(filter)
        // The tests share one machine-wide kernel: one at a time keeps their eBPF
        // programs and namespaces from seeing each other's traffic.
        .env("OBSERVER_BIN", &bin);
    util::run_checked(&mut cmd, "end-to-end tests")
}

/// Classic tracepoints need tracefs; containers and minimal hosts often lack the mount.
fn ensure_tracefs() {
    let tracing = Path::new("/sys/kernel/tracing");
    if tracing.join("events").exists() {
        return;
    }
    let mut cmd = Command::new("mount");
    cmd.args(["-t", "tracefs", "nodev"]).arg(tracing);
    if let Err(err) = util::run_checked(&mut cmd, "mounting tracefs") {
        // Not fatal here: the tests that need tracepoints will say what is missing.
        eprintln!("xtask: warning: {err:#}");
    }
}

fn secs(d: Duration) -> String {
    format!("{:.0} s", d.as_secs_f64())
}

fn list(steps: &[(&str, Duration)]) -> String {
    if steps.is_empty() {
        return "none".to_owned();
    }
    steps.iter().map(|(name, d)| format!("{name} ({})", secs(*d))).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_list_reads_well() {
        assert_eq!(list(&[]), "none");
        assert_eq!(
            list(&[("setup", Duration::from_millis(1400)), ("clippy", Duration::from_secs(30))]),
            "setup (1 s), clippy (30 s)"
        );
    }
}
