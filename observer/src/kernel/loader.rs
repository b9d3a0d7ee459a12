//! Loading the kernel programs, probing the fentry tier, and attaching the
//! hooks `probes::select` chose.
use std::fs::File;

use aya::{
    Btf as AyaBtf, Ebpf, EbpfLoader, Endianness,
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSock, CgroupSockAddr, FEntry, FExit, KProbe, ProgramError},
};
use observer_common::Settings;

use crate::{
    error::Error,
    kernel::btf::KernelBtf,
    kernel::probes::{Attach, Concern, Hook, Plan},
};

/// The kernel programs, compiled by build.rs for the bpf target.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/observer"));

/// The program whose load tells whether this kernel runs fentry programs:
/// some kernels (and some VMs) have BTF and trampolines configured yet refuse
/// them at load time, so only a real load answers the question.
const FENTRY_PROBE: &str = "obs_state_fe";

/// A hook of the plan and whether it attached (`Err(reason)` if not).
pub type Attached = (Hook, Result<(), String>);

/// One program loaded by `Kernel::verify`: accepted, or the kernel's reason.
#[derive(Debug)]
pub struct Verified {
    pub concern: Concern,
    pub program: &'static str,
    pub result: Result<(), String>,
}

/// Lines of the verifier's log kept in a refusal's reason: its last ones,
/// where the verifier says what it refused and why.
const VERIFIER_LOG_TAIL: usize = 6;

/// A load error on one line: the error chain, with a verifier log cut to its
/// last lines (a full log runs to thousands).
fn verifier_reason(e: &ProgramError) -> String {
    if let ProgramError::LoadError { io_error, verifier_log } = e {
        let log = verifier_log.to_string();
        let lines: Vec<&str> = log.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(VERIFIER_LOG_TAIL)..].join(" | ");
        return format!("the kernel refused it: {io_error}; verifier: {tail}");
    }
    chain(e)
}

pub struct Kernel {
    pub ebpf: Ebpf,
    pub btf: AyaBtf,
    /// Programs loaded while probing, kept so they are not loaded twice.
    probed: Vec<&'static str>,
    /// Programs attached so far, with where: two hooks may share programs,
    /// and one kprobe program may be attached to several functions.
    attached: Vec<(&'static str, Attach)>,
}

/// Loads the object with the running kernel's field offsets written into it.
/// Maps are created, `OPEN_SESSIONS` with `max_sessions` entries and the two
/// UDP tables with `max_udp_flows`; programs are loaded only when attached or
/// probed. `diagnostics`: whether the programs log rare events
/// (`kernel::diagnostics`). `pins`: the directory where the tables kept
/// across restarts are pinned (`kernel::state`, already checked: a table
/// pinned there is reused as it is), or none.
pub fn load(
    btf: &KernelBtf,
    settings: Settings,
    max_sessions: u32,
    max_udp_flows: u32,
    diagnostics: bool,
    pins: Option<&std::path::Path>,
) -> Result<Kernel, Error> {
    if KERNEL_OBJECT.is_empty() {
        return Err(Error::NoKernelObject);
    }
    let offsets = btf.kernel_offsets()?;
    // 0 when the kernel has no inet_csk_accept in BTF: the fexit hook then
    // cannot be chosen (its target is missing) and the value is never read.
    let accept_params = btf.function_params("inet_csk_accept").map_or(0, |n| n as u32);
    let aya_btf = AyaBtf::parse_file(btf.path(), Endianness::default())
        .map_err(|e| Error::Other(format!("parsing kernel BTF {} for the loader: {e}", btf.path().display())))?;
    let log_diagnostics = u32::from(diagnostics);
    let mut loader = EbpfLoader::new();
    loader
        .btf(Some(&aya_btf))
        .override_global("OFFSETS", &offsets, true)
        .override_global("ACCEPT_RET_ARG", &accept_params, true)
        .override_global("SETTINGS", &settings, true)
        .override_global("LOG_DIAGNOSTICS", &log_diagnostics, true)
        .map_max_entries("OPEN_SESSIONS", max_sessions)
        // One entry per open socket that has had a flow: sized like the flows.
        .map_max_entries("UDP_FLOWS", max_udp_flows)
        .map_max_entries("UDP_SOCKETS", max_udp_flows);
    if let Some(dir) = pins {
        for layout in crate::kernel::state::layouts(max_sessions, max_udp_flows) {
            loader.map_pin_path(layout.name, dir.join(layout.name));
        }
    }
    if !diagnostics {
        // Nothing writes aya-log's ring then: one page (its least) instead of 128 KiB.
        loader.map_max_entries("AYA_LOGS", page_size());
    }
    let ebpf = loader.load(KERNEL_OBJECT).map_err(Error::Load)?;
    Ok(Kernel { ebpf, btf: aya_btf, probed: Vec::new(), attached: Vec::new() })
}

impl Kernel {
    /// Tries to load an fentry program, and on arm64 to attach it for a moment:
    /// `Err(reason)` if the kernel refuses either. Loading is not enough there: arm64
    /// kernels before 6.4 (Debian 12's 6.1) verify fentry programs but cannot attach them
    /// (no ftrace direct calls, so no BPF trampoline: ENOTSUPP, 524), and `auto` must then
    /// take the kprobe tier. Not on x86, where trampolines came with fentry (5.5): a
    /// tracing program once detached cannot be attached again before 5.11 or so (Debian
    /// 11's 5.10 answers ENOENT), and the probe is the state program the tier attaches.
    pub fn probe_fentry(&mut self) -> Result<(), String> {
        let result = self.load_program(FENTRY_PROBE, Attach::FEntry("tcp_set_state"));
        if let Err(e) = result {
            return Err(format!("the kernel refused to load a test fentry program on tcp_set_state: {}", chain(&e)));
        }
        self.probed.push(FENTRY_PROBE);
        if !cfg!(target_arch = "aarch64") {
            return Ok(());
        }
        let attached = self.ebpf.program_mut(FENTRY_PROBE).ok_or(ProgramError::UnexpectedProgramType).and_then(|p| {
            let p = <&mut FEntry>::try_from(p)?;
            let link = p.attach()?;
            p.detach(link)
        });
        attached
            .map_err(|e| format!("the kernel refused to attach a test fentry program on tcp_set_state: {}", chain(&e)))
    }

    /// Attaches every hook of the plan (the programs `plan.disabled` leaves
    /// it, see `Disabled::programs`). A required concern's failure is an
    /// error; an optional one is logged and left out (returned as `Err`).
    pub fn attach(&mut self, plan: &Plan) -> Result<Vec<Attached>, Error> {
        let mut attached = Vec::new();
        for choice in &plan.choices {
            let Ok(hook) = choice.hook else { continue };
            let result = plan
                .disabled
                .programs(hook)
                .try_for_each(|(name, how)| self.attach_program(name, how).map_err(|e| (name, e)));
            match result {
                Ok(()) => attached.push((hook, Ok(()))),
                Err((program, source)) if choice.concern.required() => {
                    return Err(Error::Program { program, source });
                }
                Err((program, source)) => {
                    let why = format!("{program}: {}", chain(&source));
                    tracing::warn!(concern = choice.concern.as_str(), hook = plan.disabled.label(hook), error = %why, "optional hook not attached; continuing without it");
                    attached.push((hook, Err(why)));
                }
            }
        }
        // A probe program that was not chosen should not stay loaded.
        for name in std::mem::take(&mut self.probed) {
            let chosen = plan.hooks().any(|h| plan.disabled.programs(h).any(|(n, _)| n == name));
            if !chosen && let Some(Ok(p)) = self.ebpf.program_mut(name).map(<&mut FEntry>::try_from) {
                let _ = p.unload();
            }
        }
        Ok(attached)
    }

    /// Loads every program of the plan's hooks without attaching any: the
    /// kernel's verifier accepts or refuses each one as `run` would load it.
    /// One result per program, in plan order (a program two hooks share is
    /// listed once), with the verifier's reason for a refusal.
    pub fn verify(&mut self, plan: &Plan) -> Vec<Verified> {
        let mut results: Vec<Verified> = Vec::new();
        for choice in &plan.choices {
            let Ok(hook) = choice.hook else { continue };
            for (name, how) in plan.disabled.programs(hook) {
                if results.iter().any(|v| v.program == name) {
                    continue;
                }
                let result = if self.probed.contains(&name) {
                    Ok(())
                } else {
                    self.load_program(name, how).map_err(|e| verifier_reason(&e))
                };
                if result.is_ok() && !self.probed.contains(&name) {
                    self.probed.push(name);
                }
                results.push(Verified { concern: choice.concern, program: name, result });
            }
        }
        results
    }

    /// Frees the parsed kernel BTF once every program is attached: loading a
    /// program needs it, running does not.
    pub fn release_btf(&mut self) {
        self.btf = AyaBtf::new();
    }

    fn load_program(&mut self, name: &'static str, how: Attach) -> Result<(), ProgramError> {
        let btf = &self.btf;
        let program = self.ebpf.program_mut(name).ok_or(ProgramError::UnexpectedProgramType)?;
        match how {
            Attach::BtfTracepoint(tp) => <&mut BtfTracePoint>::try_from(program)?.load(tp, btf),
            Attach::FEntry(f) => <&mut FEntry>::try_from(program)?.load(f, btf),
            Attach::FExit(f) => <&mut FExit>::try_from(program)?.load(f, btf),
            Attach::KProbe(_) | Attach::KRetProbe(_) => <&mut KProbe>::try_from(program)?.load(),
            Attach::CgroupSockAddr => <&mut CgroupSockAddr>::try_from(program)?.load(),
            Attach::CgroupSock => <&mut CgroupSock>::try_from(program)?.load(),
        }
    }

    fn attach_program(&mut self, name: &'static str, how: Attach) -> Result<(), ProgramError> {
        if self.attached.contains(&(name, how)) {
            return Ok(());
        }
        if !self.probed.contains(&name) && !self.attached.iter().any(|(n, _)| *n == name) {
            self.load_program(name, how)?;
        }
        let program = self.ebpf.program_mut(name).ok_or(ProgramError::UnexpectedProgramType)?;
        match how {
            Attach::BtfTracepoint(_) => <&mut BtfTracePoint>::try_from(program)?.attach().map(drop),
            Attach::FEntry(_) => <&mut FEntry>::try_from(program)?.attach().map(drop),
            Attach::FExit(_) => <&mut FExit>::try_from(program)?.attach().map(drop),
            Attach::KProbe(f) | Attach::KRetProbe(f) => <&mut KProbe>::try_from(program)?.attach(f, 0).map(drop),
            // aya attaches through bpf_link (5.7+), where the kernel refuses
            // any mode flag and a link always runs beside other agents'
            // programs (a CNI, a service mesh); hence the default mode.
            Attach::CgroupSockAddr => {
                <&mut CgroupSockAddr>::try_from(program)?.attach(cgroup_root()?, CgroupAttachMode::default()).map(drop)
            }
            Attach::CgroupSock => {
                <&mut CgroupSock>::try_from(program)?.attach(cgroup_root()?, CgroupAttachMode::default()).map(drop)
            }
        }?;
        self.attached.push((name, how));
        Ok(())
    }
}

fn page_size() -> u32 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).ok().filter(|s| s.is_power_of_two()).unwrap_or(4096)
}

fn cgroup_root() -> Result<File, ProgramError> {
    let root = crate::kernel::cgroup::cgroup2_root()
        .ok_or_else(|| ProgramError::IOError(std::io::Error::other("no cgroup v2 hierarchy is mounted")))?;
    File::open(&root).map_err(ProgramError::IOError)
}

/// An error and its causes on one line, for logs and `observer check`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
