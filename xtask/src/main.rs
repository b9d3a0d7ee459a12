//! Developer and CI automation for observer: `cargo xtask <command>`.

mod bench;
mod build;
mod kernels;
mod run;
mod setup;
mod test;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", about = "observer's developer and CI tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prepare this machine: nightly rust-src, bpf-linker, Debian packages (scripts/setup.sh).
    Setup,
    /// Build the release observer, for another architecture with `--target` (cross-compiled
    /// from this machine, kernel programs included; the image build's commands).
    Build {
        /// Architecture to build for (aarch64 = arm64, x86_64 = amd64). Default: this machine's.
        #[arg(long, value_enum)]
        target: Option<build::Arch>,
    },
    /// Set up, build the release observer and run it (as root, through sudo -E if needed).
    Run {
        /// Arguments for `observer run` (default: --iface lo).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The whole test suite as CI runs it: setup, rustfmt check, build, clippy (userspace and
    /// kernel crate), unit, end-to-end, kernel matrix (qemu), bench smoke.
    Test {
        /// Leave out the benchmark smoke run (the last step).
        #[arg(long)]
        skip_bench: bool,
        /// Leave out the kernel matrix in qemu (`cargo xtask kernels`, several minutes).
        #[arg(long)]
        skip_kernels: bool,
        /// Leave out the arm64 guests (`cargo xtask kernels --arch arm64`: Debian's arm64 6.1
        /// and 6.12 under qemu-system-aarch64, drops, tcp_sessions, udp_sessions in the auto
        /// and kprobe tiers), which otherwise run after the x86 matrix (`--skip-kernels` leaves
        /// out both).
        #[arg(long)]
        skip_arm64: bool,
        /// Passed to the end-to-end test binary after `--test-threads=1` (a test-name filter).
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Boot Debian's 5.10, 6.1 and 6.12 kernels in qemu and run the end-to-end tests there in every
    /// hook tier (fentry, kprobe, tracepoint, auto), with `observer check` per tier.
    Kernels {
        /// Rewrite README's kernel tables (between its kernels:begin/end markers) from the results.
        #[arg(long)]
        write_readme: bool,
        /// The guests' architecture: x86_64 (5.10, 6.1, 6.12; every test, every tier) or arm64
        /// (6.1, 6.12 under qemu-system-aarch64; cross-built observer and tests: drops,
        /// tcp_sessions, udp_sessions in the auto and kprobe tiers). Repeatable: both run from
        /// one queue of VMs, as `cargo xtask test` runs them.
        #[arg(long = "arch", value_enum, default_values = ["x86_64"])]
        arch: Vec<build::Arch>,
        /// Only this kernel (5.10, 6.1, 6.12; arm64: 6.1, 6.12); repeatable. Default: all.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Only this end-to-end test binary (tests/tests/<NAME>.rs); repeatable. Default: all
        /// (arm64: drops, tcp_sessions, udp_sessions).
        #[arg(long = "test", value_name = "NAME")]
        tests: Vec<String>,
        /// Bound on one VM's whole run, in seconds.
        #[arg(long, default_value_t = kernels::DEFAULT_VM_TIMEOUT_S)]
        vm_timeout: u64,
        /// Virtual CPUs per VM. Default 1: the VMs run side by side on the host's cores. More
        /// for tests of concurrent calls on several CPUs (e.g. `--vcpus 4 --kernel 6.12 --test
        /// concurrency`), at the cost of slower emulation per vCPU.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        vcpus: u32,
    },
    /// iperf3 over loopback (TCP bulk, TCP and UDP small messages) with the observer on vs off,
    /// then the observer's own CPU and memory, idle and under 10k closed sessions per second.
    Bench {
        /// Every workload, one round of one second, no file written: checks that the benchmark
        /// still works.
        #[arg(long, conflicts_with_all = ["rounds", "seconds", "out", "workload"])]
        smoke: bool,
        /// The workload to run; each writes its own section.
        #[arg(long, value_enum, default_value_t = bench::Selection::All)]
        workload: bench::Selection,
        /// Rounds; each runs one "off", one "on" and one "on+stats" measurement (short-conn:
        /// also the reference tracer without and with statistics, and close-only accounting).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        rounds: u32,
        /// Seconds per iperf3 measurement.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
        seconds: u32,
        /// Where to write the whole document: the targets table, then each section measured.
        /// Default: BENCHMARKS.md at the workspace root for `--workload all`; for one workload,
        /// no file (its section is printed).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Internal, for `bench`: open COUNT connections to 127.0.0.1:PORT, print "ready", and
    /// keep them open until stdin closes.
    #[command(hide = true)]
    HoldConnections {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: usize,
        /// Index of the first connection (picks the source addresses).
        #[arg(long, default_value_t = 0)]
        first: usize,
    },
}

fn main() -> ExitCode {
    match dispatch(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // The cause chain, without the backtrace that anyhow's Debug adds when CI sets
            // RUST_BACKTRACE: the failing command's own output is the useful part.
            eprintln!("xtask: error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Setup => setup::run(),
        Command::Build { target } => build::run(target.unwrap_or_else(build::Arch::host)),
        Command::Run { args } => run::run(args),
        Command::Test { skip_bench, skip_kernels, skip_arm64, filter } => {
            test::run(&test::TestArgs { skip_bench, skip_kernels, skip_arm64, filter })
        }
        Command::Kernels { arch, write_readme, kernels: names, tests, vm_timeout, vcpus } => {
            kernels::run(&kernels::Options {
                arches: arch,
                write_readme,
                kernels: names,
                tests,
                vm_timeout: std::time::Duration::from_secs(vm_timeout),
                vcpus,
            })
        }
        Command::Bench { smoke, workload, rounds, seconds, out } => {
            let opts = if smoke {
                bench::Options::smoke()
            } else {
                bench::Options {
                    rounds,
                    seconds,
                    out: bench_out(workload, out),
                    smoke: false,
                    workload,
                    hold: bench::HOLD_CONNECTIONS,
                    peers: true,
                }
            };
            bench::run(&opts, bench::Prepare::SetupAndBuild)
        }
        Command::HoldConnections { port, count, first } => bench::hold_connections(port, count, first),
    }
}

/// Where `cargo xtask bench` writes: `--out`, else BENCHMARKS.md for a run of every
/// workload; a run of one workload must not replace the whole file with its section.
fn bench_out(workload: bench::Selection, out: Option<PathBuf>) -> Option<PathBuf> {
    out.or_else(|| (workload == bench::Selection::All).then(|| util::root().join("BENCHMARKS.md")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from(std::iter::once("xtask").chain(args.iter().copied())).unwrap().command
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_takes_observer_arguments_with_or_without_separator() {
        for argv in [&["run", "--", "--iface", "eth0"][..], &["run", "--iface", "eth0"][..]] {
            match parse(argv) {
                Command::Run { args } => assert_eq!(args, ["--iface", "eth0"]),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(parse(&["run"]), Command::Run { args } if args.is_empty()));
    }

    #[test]
    fn test_takes_flag_and_filter() {
        match parse(&["test", "--skip-bench", "--", "tcp_state", "--nocapture"]) {
            Command::Test { skip_bench, skip_kernels, skip_arm64, filter } => {
                assert!(skip_bench && !skip_kernels && !skip_arm64);
                assert_eq!(filter, ["tcp_state", "--nocapture"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse(&["test", "--skip-kernels"]), Command::Test { skip_kernels: true, .. }));
        assert!(matches!(parse(&["test", "--skip-arm64"]), Command::Test { skip_arm64: true, .. }));
        assert!(Cli::try_parse_from(["xtask", "test", "--arm64"]).is_err());
    }

    #[test]
    fn kernels_flags() {
        match parse(&["kernels", "--write-readme", "--kernel", "6.1", "--kernel", "6.12", "--test", "drops"]) {
            Command::Kernels { arch, write_readme, kernels, tests, vm_timeout, vcpus } => {
                assert_eq!(arch, [build::Arch::X86_64]);
                assert!(write_readme);
                assert_eq!(kernels, ["6.1", "6.12"]);
                assert_eq!(tests, ["drops"]);
                assert_eq!(vm_timeout, kernels::DEFAULT_VM_TIMEOUT_S);
                assert_eq!(vcpus, 1);
            }
            other => panic!("{other:?}"),
        }
        match parse(&["kernels", "--arch", "arm64"]) {
            Command::Kernels { arch, .. } => assert_eq!(arch, [build::Arch::Aarch64]),
            other => panic!("{other:?}"),
        }
        match parse(&["kernels", "--arch", "x86_64", "--arch", "arm64"]) {
            Command::Kernels { arch, .. } => assert_eq!(arch, [build::Arch::X86_64, build::Arch::Aarch64]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn build_takes_a_target_architecture() {
        assert!(matches!(parse(&["build"]), Command::Build { target: None }));
        for (arg, arch) in
            [("aarch64", build::Arch::Aarch64), ("arm64", build::Arch::Aarch64), ("amd64", build::Arch::X86_64)]
        {
            assert!(matches!(parse(&["build", "--target", arg]), Command::Build { target: Some(a) } if a == arch));
        }
        assert!(Cli::try_parse_from(["xtask", "build", "--target", "riscv64"]).is_err());
    }

    #[test]
    fn bench_defaults() {
        match parse(&["bench"]) {
            Command::Bench { smoke, workload, rounds, seconds, out } => {
                assert!(!smoke);
                assert_eq!(workload, bench::Selection::All);
                assert_eq!((rounds, seconds), (5, 5));
                assert!(out.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["xtask", "bench", "--rounds", "0"]).is_err());
        assert!(Cli::try_parse_from(["xtask", "bench", "--smoke", "--rounds", "3"]).is_err());
        assert!(matches!(
            parse(&["bench", "--workload", "tcp-small"]),
            Command::Bench { workload: bench::Selection::TcpSmall, .. }
        ));
        assert!(Cli::try_parse_from(["xtask", "bench", "--workload", "tcp"]).is_err());
        assert_eq!(bench_out(bench::Selection::All, None), Some(util::root().join("BENCHMARKS.md")));
        assert_eq!(bench_out(bench::Selection::Bulk, None), None);
        let mine = PathBuf::from("/tmp/b.md");
        assert_eq!(bench_out(bench::Selection::Bulk, Some(mine.clone())), Some(mine));
    }
}
