//! `cargo xtask kernels`: Debian's current 5.10, 6.1 and 6.12 kernels booted in
//! qemu (software emulation), each running the host-built end-to-end tests
//! once per hook tier, `observer check` per tier and deliberately broken
//! starts; a report per kernel and tier, and README's kernel table.
//!
//! This machine's own kernel has no kprobes and refuses fentry, so these VMs
//! are where those tiers run at all. How Debian kernels boot here (and what
//! does not work) is recorded in ../shared/KERNELS.md.
//!
//! Layout under `<target>/kernels/`: `<name>/` the unpacked package, its
//! `vmlinux` and `initramfs.cpio` (reused while the meta package resolves to
//! the same version); `apt-<name>/` the package lists of a kernel from another
//! Debian release; `runs/<name>/` the guest's writable share with every
//! result file; `logs/<name>.console.log` the serial console; `report.md`.

mod bzimage;
mod cpio;
mod fetch;
pub mod guest;
mod host;
mod initramfs;
mod modules;
mod qemu;
mod report;
mod results;
mod rootfs;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::build::Arch;
use crate::{build, util};
use guest::{Run, TestBin};
use report::KernelReport;
use results::Check;

/// A kernel of the matrix.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// Short name: `--kernel` value, cache and log names.
    pub name: &'static str,
    pub label: &'static str,
    /// The meta package that names the current image package.
    pub meta: &'static str,
    /// Its version must start with this: a guard against a meta package that
    /// moved to another series (a newer Debian release on the host).
    pub series: &'static str,
    /// Forced tiers this kernel offers (Debian builds all three with kprobes,
    /// BTF and fentry trampolines); a tier `observer check` reports
    /// unavailable there is a failure, not a skip.
    pub tiers: &'static [&'static str],
    /// apt sources (sources.list lines) to resolve `meta` in, for a kernel of
    /// another Debian release than the host's; `None`: the host's own lists.
    pub sources: Option<&'static str>,
    /// The guest's architecture. Another than the host's boots under
    /// qemu's emulation of it with a root of its own (`rootfs`).
    pub arch: Arch,
}

impl Spec {
    /// Cache, work directory and log names: the kernel's name, with the
    /// architecture's for a guest of another than x86_64.
    pub fn key(&self) -> String {
        match self.arch {
            Arch::X86_64 => self.name.to_owned(),
            other => format!("{}-{}", self.name, other.debian()),
        }
    }

    /// Where the package lists of `sources` live: per kernel on x86 (one
    /// Debian release each), one set for every arm64 kernel and its root.
    fn apt_dir(&self, base: &Path) -> PathBuf {
        match self.arch {
            Arch::X86_64 => base.join(format!("apt-{}", self.name)),
            other => base.join(format!("apt-{}", other.debian())),
        }
    }
}

/// Debian 11 (bullseye), whose kernel is 5.10: its release and its security
/// updates, where the current kernel is.
const BULLSEYE: &str = "\
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
";

pub const KERNELS: [Spec; 3] = [
    Spec {
        name: "5.10",
        label: "Debian 5.10",
        meta: "linux-image-amd64",
        series: "5.10.",
        tiers: &guest::TIERS,
        sources: Some(BULLSEYE),
        arch: Arch::X86_64,
    },
    Spec {
        name: "6.1",
        label: "Debian 6.1",
        meta: "linux-image-amd64",
        series: "6.1.",
        tiers: &guest::TIERS,
        sources: None,
        arch: Arch::X86_64,
    },
    Spec {
        name: "6.12",
        label: "Debian 6.12",
        meta: "linux-image-6.12-amd64",
        series: "6.12.",
        tiers: &guest::TIERS,
        sources: None,
        arch: Arch::X86_64,
    },
];

/// Debian 12 (bookworm) for arm64, whose 6.1 and 6.12 kernels (6.12 in its
/// point releases, as on x86) and guest root come from these lists.
const BOOKWORM_ARM64: &str = "\
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bookworm-security main
";

/// The arm64 guests' forced tier: the kprobe tier is the one whose programs
/// read registers (`PtRegs`), which differ per architecture; fentry and
/// tracepoint programs read the same BTF-typed context on both.
pub const ARM64_TIERS: [&str; 1] = ["kprobe"];

/// The end-to-end tests the arm64 guests run by default (every test is
/// slower there: qemu emulates another instruction set): TCP sessions with
/// exact bytes, UDP flows, drops (`auto` only, as on x86).
pub const ARM64_TESTS: [&str; 3] = ["drops", "tcp_sessions", "udp_sessions"];

pub const ARM64_KERNELS: [Spec; 2] = [
    Spec {
        name: "6.1",
        label: "Debian 6.1 arm64",
        meta: "linux-image-arm64",
        series: "6.1.",
        tiers: &ARM64_TIERS,
        sources: Some(BOOKWORM_ARM64),
        arch: Arch::Aarch64,
    },
    Spec {
        name: "6.12",
        label: "Debian 6.12 arm64",
        meta: "linux-image-6.12-arm64",
        series: "6.12.",
        tiers: &ARM64_TIERS,
        sources: Some(BOOKWORM_ARM64),
        arch: Arch::Aarch64,
    },
];

/// The kernels of the matrix for guests of `arch`.
pub fn kernels_of(arch: Arch) -> &'static [Spec] {
    match arch {
        Arch::X86_64 => &KERNELS,
        Arch::Aarch64 => &ARM64_KERNELS,
    }
}

/// VMs booted at once, one vCPU each. Every kernel at once, although the
/// machine has two cores: much of a guest's time goes to its tests' sleeps
/// and paced transfers, so three guests sharing two cores finish sooner than
/// two rounds would, and the tests' timing bounds are stretched for emulation.
const PARALLEL_VMS: usize = 3;

/// Guest memory: the tests' transfers and two observers fit well within it.
const MEMORY_MB: u32 = 2048;

pub struct Options {
    /// The guests' architectures: x86_64 (the host's), arm64, or both (one
    /// queue of VMs: see `run`).
    pub arches: Vec<Arch>,
    pub write_readme: bool,
    /// Names from `KERNELS`; empty for all.
    pub kernels: Vec<String>,
    /// End-to-end test binaries (tests/tests/<name>.rs) to run; empty for
    /// all (`ARM64_TESTS` on arm64). For iterating on one test: a partial run
    /// cannot write README.
    pub tests: Vec<String>,
    /// Bound on one VM's whole run.
    pub vm_timeout: Duration,
    /// Virtual CPUs per VM.
    pub vcpus: u32,
}

/// Debian 5.10's guest, the slowest, needs about 1,500-1,800 s of the three
/// VMs sharing two host CPUs; the bound is there to catch a hung guest.
pub const DEFAULT_VM_TIMEOUT_S: u64 = 2400;

pub fn run(opts: &Options) -> Result<()> {
    ensure!(
        util::is_root(),
        "cargo xtask kernels installs packages and shares the host's root with the VMs: run it as root"
    );
    ensure!(!opts.write_readme || opts.tests.is_empty(), "--write-readme needs every test: leave out --test");
    ensure!(!opts.arches.is_empty(), "no guest architecture given");
    ensure!(
        opts.arches.iter().enumerate().all(|(i, a)| !opts.arches[..i].contains(a)),
        "--arch given twice for one architecture: its guests would share their work directories"
    );
    let started = Instant::now();
    let base = target_dir()?.join("kernels");
    for d in ["logs", "runs"] {
        std::fs::create_dir_all(base.join(d))?;
    }
    let groups = opts.arches.iter().map(|&arch| prepare_arch(arch, opts, &base)).collect::<Result<Vec<_>>>()?;
    let queue: Vec<&Prepared> = groups.iter().flat_map(|g| &g.prepared).collect();
    eprintln!("xtask kernels: prepared in {:.0} s; booting {} VMs", started.elapsed().as_secs_f64(), queue.len());

    // `vcpus` each (one by default: the host has two cores), at most
    // PARALLEL_VMS at once, from one queue: a guest of the next architecture
    // starts as soon as one of the previous ends, so the cores stay busy to
    // the end instead of idling while the slowest guest of a group finishes.
    let (booted, cpu_before) = (Instant::now(), children_cpu());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut reports: Vec<(usize, Result<KernelReport>)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..PARALLEL_VMS.min(queue.len()))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(p) = queue.get(i) else { return done };
                        done.push((i, boot(p, opts.vm_timeout, opts.vcpus)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec![(usize::MAX, Err(anyhow!("the VM thread panicked")))]))
            .collect()
    });
    reports.sort_by_key(|(i, _)| *i);
    let mut reports = reports.into_iter().map(|(_, r)| r).collect::<Result<Vec<_>>>()?.into_iter();
    // CPU time tells what the VMs cost apart from other load on the machine:
    // software emulation is CPU-bound, so on an idle machine it bounds their wall time.
    let vm_timing = format!(
        "VMs: {:.0} s wall, {:.0} s CPU (all VMs together)",
        booted.elapsed().as_secs_f64(),
        (children_cpu().saturating_sub(cpu_before)).as_secs_f64()
    );
    eprintln!("xtask kernels: {vm_timing}");

    // Each architecture's reports, in the queue's order.
    let grouped: Vec<(&ArchGroup, Vec<KernelReport>)> =
        groups.iter().map(|g| (g, reports.by_ref().take(g.prepared.len()).collect())).collect();
    let mut summary = String::new();
    for (g, r) in &grouped {
        summary += &report::summary(r, g.host_check.as_ref());
        summary += "\n";
    }
    summary += &format!("{vm_timing}\n");
    std::fs::write(base.join("report.md"), &summary)?;
    println!("\n{summary}");
    let failed: Vec<String> = grouped
        .iter()
        .flat_map(|(_, r)| r)
        .flat_map(|r| r.failures().into_iter().map(move |f| format!("{}: {f}", r.label)))
        .collect();
    for (_, r) in &grouped {
        show_failure_details(r);
    }
    println!(
        "xtask kernels: {} kernel(s) in {:.0} s; report: {}",
        queue.len(),
        started.elapsed().as_secs_f64(),
        base.join("report.md").display()
    );
    if !failed.is_empty() {
        bail!("the kernel matrix failed:\n  {}", failed.join("\n  "));
    }
    // README's tables describe a passing matrix: a failed run leaves them as they were.
    if opts.write_readme {
        let path = util::root().join("README.md");
        for (g, r) in &grouped {
            let readme = std::fs::read_to_string(&path)?;
            let section = report::readme_section(r, g.host_check.as_ref());
            std::fs::write(&path, report::splice(&readme, &section, report::markers(g.arch))?)?;
        }
        println!("xtask kernels: README.md's kernel tables rewritten");
    }
    Ok(())
}

/// One architecture's guests, ready to boot.
struct ArchGroup {
    arch: Arch,
    prepared: Vec<Prepared>,
    /// `observer check` on the host, for README's table: for the host's own
    /// architecture only.
    host_check: Option<Check>,
}

/// Builds (or finds built) what guests of `arch` run, and prepares each of
/// its selected kernels.
fn prepare_arch(arch: Arch, opts: &Options, base: &Path) -> Result<ArchGroup> {
    let specs = select(&opts.kernels, arch)?;
    host::ensure_tools(arch)?;
    let foreign = arch != Arch::host();
    let (observer, tests, root) = if foreign {
        // Cross-built (the image's commands), with only the tests the guests run.
        let names: Vec<String> = if opts.tests.is_empty() {
            ARM64_TESTS.iter().map(|t| t.to_string()).collect()
        } else {
            opts.tests.clone()
        };
        let observer = build::observer_for(arch)?;
        let tests = test_binaries(arch, &names)?;
        let spec = specs[0];
        let apt = fetch::Apt::private(&spec.apt_dir(base), spec.sources.unwrap_or_default(), Some(spec.arch.debian()))?;
        let root = rootfs::prepare(&apt, &base.join(format!("rootfs-{}", spec.arch.debian())))
            .context("preparing the guests' root")?;
        (observer, only(tests, &names)?, root)
    } else {
        (build::observer_release()?, only(test_binaries(arch, &[])?, &opts.tests)?, PathBuf::from("/"))
    };
    // One at a time: apt holds a lock, and preparing takes seconds.
    let prepared = specs
        .iter()
        .map(|s| prepare(s, base, &observer, &tests, &root).with_context(|| format!("preparing kernel {}", s.key())))
        .collect::<Result<Vec<_>>>()?;
    // The host runs only its own architecture's observer.
    let host_check = if foreign { None } else { host_check(&observer) };
    Ok(ArchGroup { arch, prepared, host_check })
}

/// User plus system CPU time of this process's finished children.
fn children_cpu() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given; RUSAGE_CHILDREN is valid.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut u);
        u
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn select(names: &[String], arch: Arch) -> Result<Vec<Spec>> {
    let kernels = kernels_of(arch);
    if names.is_empty() {
        return Ok(kernels.to_vec());
    }
    names
        .iter()
        .map(|n| {
            kernels.iter().find(|s| s.name == n).copied().with_context(|| {
                let known: Vec<_> = kernels.iter().map(|s| s.name).collect();
                format!("unknown {} kernel {n:?}; known: {}", arch.debian(), known.join(", "))
            })
        })
        .collect()
}

/// The test binaries named in `names` (all when empty).
fn only(tests: Vec<TestBin>, names: &[String]) -> Result<Vec<TestBin>> {
    if let Some(unknown) = names.iter().find(|n| !tests.iter().any(|t| &&t.name == n)) {
        let known: Vec<&str> = tests.iter().map(|t| t.name.as_str()).collect();
        bail!("no end-to-end test binary {unknown:?}; known: {}", known.join(", "));
    }
    Ok(tests.into_iter().filter(|t| names.is_empty() || names.contains(&t.name)).collect())
}

/// Cargo's target directory as cargo itself resolves it (CARGO_TARGET_DIR,
/// config files), so the cache lands where CI's other build outputs are.
fn target_dir() -> Result<PathBuf> {
    let out = util::cargo()
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo metadata")?;
    ensure!(out.status.success(), "cargo metadata failed ({})", out.status);
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    meta["target_directory"].as_str().map(PathBuf::from).context("cargo metadata has no target_directory")
}

/// Builds the end-to-end test binaries (a no-op right after `cargo xtask
/// test`'s end-to-end step) and lists them: for `arch`, cross-compiled unless
/// it is the host's; only those named in `names` unless it is empty.
fn test_binaries(arch: Arch, names: &[String]) -> Result<Vec<TestBin>> {
    let mut cmd = util::cargo();
    cmd.args(["test", "-p", "observer-tests", "--no-run", "--message-format=json"]).stderr(Stdio::inherit());
    if arch != Arch::host() {
        cmd.args(["--target", arch.triple()]).envs(arch.cross_env());
    }
    for n in names {
        cmd.args(["--test", n]);
    }
    eprintln!("+ {}", util::show(&cmd));
    let out = cmd.output().context("running cargo test --no-run")?;
    ensure!(out.status.success(), "building the end-to-end tests failed ({})", out.status);
    let tests = parse_test_executables(&String::from_utf8_lossy(&out.stdout));
    ensure!(!tests.is_empty(), "cargo built no end-to-end test binaries");
    Ok(tests)
}

/// Integration-test executables in cargo's JSON messages.
pub fn parse_test_executables(json_lines: &str) -> Vec<TestBin> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| m["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test")))
        .filter_map(|m| {
            Some(TestBin { name: m["target"]["name"].as_str()?.to_owned(), path: m["executable"].as_str()?.into() })
        })
        .collect()
}

/// `observer check` on this host, for README's table; `None` if it could not run.
fn host_check(observer: &Path) -> Option<Check> {
    let out = Command::new(observer).arg("check").stderr(Stdio::null()).output().ok()?;
    Some(results::parse_check(&String::from_utf8_lossy(&out.stdout), out.status.code()))
}

struct Prepared {
    spec: Spec,
    /// The guest's root filesystem on the host.
    root: PathBuf,
    package: String,
    vmlinux: PathBuf,
    initramfs: PathBuf,
    work: PathBuf,
    console: PathBuf,
    pidfile: PathBuf,
    runs: Vec<Run>,
}

/// Fetches the kernel (or finds it cached), writes the guest script and
/// builds the initramfs. `root` is the guest's root: `/`, or a root of its
/// architecture, where the binaries are copied into the work directory.
fn prepare(spec: &Spec, base: &Path, observer: &Path, tests: &[TestBin], root: &Path) -> Result<Prepared> {
    let dir = base.join(spec.key());
    let foreign = spec.arch != Arch::host();
    let apt = match spec.sources {
        Some(sources) => fetch::Apt::private(&spec.apt_dir(base), sources, foreign.then(|| spec.arch.debian()))?,
        None => fetch::Apt::host(),
    };
    let fetch = || -> Result<_> {
        let r = fetch::resolve(&apt, spec.meta)?;
        ensure!(
            r.version.starts_with(spec.series),
            "{} now resolves to {} {}, not a {}* kernel",
            spec.meta,
            r.package,
            r.version,
            spec.series
        );
        let u = fetch::fetch(&apt, &r, &dir, spec.arch == Arch::X86_64)?;
        Ok((r, u))
    };
    // Stale package lists name versions the mirror no longer has: refresh once.
    let (resolved, unpacked) = match fetch() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("xtask kernels: {e:#}; refreshing apt's package lists and retrying");
            apt.update()?;
            fetch()?
        }
    };

    let work = base.join("runs").join(spec.key());
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    std::fs::create_dir_all(&work)?;
    // A root of its own does not hold the host's build tree: the binaries go
    // into the work directory, mounted at its host path in the guest.
    let (observer, tests) = if root == Path::new("/") {
        (observer.to_owned(), tests.to_vec())
    } else {
        rootfs::add_mount_point(root, &work)?;
        let bin = work.join("bin");
        let tests = tests
            .iter()
            .map(|t| Ok(TestBin { name: t.name.clone(), path: rootfs::copy_in(&t.path, &bin)? }))
            .collect::<Result<Vec<_>>>()?;
        (rootfs::copy_in(observer, &bin)?, tests)
    };
    let runs = guest::plan(&tests, spec.tiers);
    let script_path = work.join("guest.sh");
    std::fs::write(&script_path, guest::script(&work, &observer, spec.tiers, &runs))?;

    let modules = modules::ModuleTree::open(&unpacked.modules)?.resolve(&modules::GUEST_MODULES)?;
    let names: Vec<String> = modules.iter().map(|(n, _)| n.clone()).collect();
    let module_bytes =
        modules.iter().map(|(n, p)| modules::read_module(p).map(|b| (n.clone(), b))).collect::<Result<Vec<_>>>()?;
    let busybox_path = if foreign {
        root.join("bin/busybox")
    } else {
        util::find_in_path("busybox").unwrap_or_else(|| "/bin/busybox".into())
    };
    let busybox = std::fs::read(&busybox_path).with_context(|| format!("reading {}", busybox_path.display()))?;
    let init = initramfs::init_script(&names, &work, &script_path);
    let archive = cpio::archive(&initramfs::entries(busybox, module_bytes, init)?);
    let initramfs = dir.join("initramfs.cpio");
    std::fs::write(&initramfs, archive)?;
    eprintln!(
        "xtask kernels: {}: {} {} (`{}`), modules: {}",
        spec.key(),
        resolved.package,
        resolved.version,
        unpacked.release,
        names.join(" ")
    );
    Ok(Prepared {
        spec: *spec,
        root: root.to_owned(),
        package: format!("{} {}", resolved.package, resolved.version),
        vmlinux: unpacked.vmlinux,
        initramfs,
        console: base.join("logs").join(format!("{}.console.log", spec.key())),
        pidfile: base.join("runs").join(format!("{}.qemu.pid", spec.key())),
        work,
        runs,
    })
}

fn boot(p: &Prepared, timeout: Duration, vcpus: u32) -> Result<KernelReport> {
    let vm = qemu::Vm {
        arch: p.spec.arch,
        root: &p.root,
        vcpus,
        vmlinux: &p.vmlinux,
        initramfs: &p.initramfs,
        work: &p.work,
        memory_mb: MEMORY_MB,
        timeout,
        pidfile: &p.pidfile,
    };
    let key = p.spec.key();
    eprintln!("[{key}] booting {} (console: {})", p.package, p.console.display());
    let ended = qemu::run(&vm, &p.console, &key)?;
    let console = String::from_utf8_lossy(&std::fs::read(&p.console)?).into_owned();
    let vm_end = results::vm_end(&console, ended.timed_out);
    eprintln!("[{key}] VM ended after {:.0} s: {vm_end:?}", ended.elapsed.as_secs_f64());
    Ok(KernelReport {
        label: p.spec.label.to_owned(),
        package: p.package.clone(),
        tiers: p.spec.tiers.to_vec(),
        vm: vm_end,
        elapsed: ended.elapsed,
        console: p.console.clone(),
        work: p.work.clone(),
        collected: results::collect(&p.work, p.spec.tiers, &p.runs),
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The end of the console log of a VM that did not finish, and of each
/// failed test's output: CI logs then show the cause without the files.
fn show_failure_details(reports: &[KernelReport]) {
    for r in reports {
        if !matches!(r.vm, results::VmEnd::Exited(_)) || !r.collected.done {
            let console =
                std::fs::read(&r.console).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            println!("----- {}: last lines of {} -----\n{}\n-----", r.label, r.console.display(), tail(&console, 60));
        }
        for results::Tested { run, outcome, .. } in &r.collected.tests {
            if outcome.is_failure() {
                let path = r.work.join(guest::test_file(run.tier, &run.test));
                let log = std::fs::read(&path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
                println!(
                    "----- {}: tier {}: {}: last lines of {} -----\n{}\n-----",
                    r.label,
                    run.tier,
                    run.test,
                    path.display(),
                    tail(&log, 40)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_executables_from_cargo_messages() {
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"observer_tests"},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["test"],"name":"tcp_sessions"},"executable":"/t/debug/deps/tcp_sessions-0a1b"}
{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"observer_tests"},"executable":"/t/debug/deps/observer_tests-99"}
{"reason":"build-finished","success":true}
not json
"#;
        assert_eq!(
            parse_test_executables(json),
            [TestBin { name: "tcp_sessions".into(), path: "/t/debug/deps/tcp_sessions-0a1b".into() }]
        );
    }

    #[test]
    fn tests_are_selected_by_name() {
        let bins = || ["drops", "tcp_sessions"].map(|n| TestBin { name: n.into(), path: n.into() }).to_vec();
        assert_eq!(only(bins(), &[]).unwrap().len(), 2);
        assert_eq!(only(bins(), &["drops".into()]).unwrap(), [bins()[0].clone()]);
        assert!(only(bins(), &["nope".into()]).unwrap_err().to_string().contains("known: drops, tcp_sessions"));
    }

    #[test]
    fn kernels_are_selected_by_name() {
        let x86 = Arch::X86_64;
        assert_eq!(select(&[], x86).unwrap().len(), KERNELS.len());
        assert_eq!(select(&["6.12".into()], x86).unwrap()[0].meta, "linux-image-6.12-amd64");
        assert_eq!(select(&["5.10".into()], x86).unwrap()[0].sources, Some(BULLSEYE));
        assert!(select(&["4.19".into()], x86).unwrap_err().to_string().contains("known: 5.10, 6.1, 6.12"));
        let arm = select(&["6.12".into()], Arch::Aarch64).unwrap();
        assert_eq!((arm[0].meta, arm[0].key()), ("linux-image-6.12-arm64", "6.12-arm64".to_owned()));
        assert_eq!(select(&[], Arch::Aarch64).unwrap().len(), 2);
        assert!(select(&["5.10".into()], Arch::Aarch64).unwrap_err().to_string().contains("known: 6.1, 6.12"));
        assert_eq!(KERNELS[1].key(), "6.1");
        assert_ne!(KERNELS[1].apt_dir(Path::new("/k")), ARM64_KERNELS[1].apt_dir(Path::new("/k")));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
