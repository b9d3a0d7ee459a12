//! Reference eBPF programs of a few instructions, loaded with bpf(2) directly (no
//! object file, no compiler, no loader library) and attached where the observer's
//! hooks are: a BTF tracepoint (tp_btf), a kernel function's return (fexit), or a
//! kernel function's entry or return through the kprobe PMU (kprobe, kretprobe).
//! Timed by the kernel's BPF statistics like any program, they show what a program of
//! that attach type costs before it does anything.
//!
//! Shared by the end-to-end tests (`observer_tests::refprog`, used by
//! tests/tests/call_cost.rs) and the benchmark, which includes this file by path
//! (xtask/src/bench/baseline.rs): it uses std, libc, anyhow and btf-rs only.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};

pub const BPF_MAP_CREATE: libc::c_long = 0;
pub const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
const BPF_PROG_TYPE_TRACING: u32 = 26;
/// `enum bpf_attach_type`.
const BPF_TRACE_RAW_TP: u32 = 23;
const BPF_TRACE_FEXIT: u32 = 25;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// The kprobe PMU (`CONFIG_KPROBES`): its perf event type, and the bit of
/// `perf_event_attr.config` that makes a probe a return probe.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

/// One instruction: opcode, registers, offset, immediate.
pub const fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    op as u64 | ((dst as u64 | (src as u64) << 4) << 8) | ((off as u16 as u64) << 16) | ((imm as u32 as u64) << 32)
}
pub const MOV_R0_0: u64 = insn(0xb7, 0, 0, 0, 0);
pub const EXIT: u64 = insn(0x95, 0, 0, 0, 0);
/// A call of helper `helper` (include/uapi/linux/bpf.h).
pub const fn call(helper: i32) -> u64 {
    insn(0x85, 0, 0, 0, helper)
}
/// The empty program: what any program of an attach type costs.
pub const EMPTY: [u64; 2] = [MOV_R0_0, EXIT];

/// The BPF_PROG_LOAD members of union bpf_attr, up to `attach_btf_id`, with room
/// after it that must be zero.
#[repr(C)]
#[derive(Default)]
pub struct ProgLoadAttr {
    pub prog_type: u32,
    pub insn_cnt: u32,
    pub insns: u64,
    pub license: u64,
    pub log_level: u32,
    pub log_size: u32,
    pub log_buf: u64,
    pub kern_version: u32,
    pub prog_flags: u32,
    pub prog_name: [u8; 16],
    pub prog_ifindex: u32,
    pub expected_attach_type: u32,
    pub prog_btf_fd: u32,
    pub func_info_rec_size: u32,
    pub func_info: u64,
    pub func_info_cnt: u32,
    pub line_info_rec_size: u32,
    pub line_info: u64,
    pub line_info_cnt: u32,
    pub attach_btf_id: u32,
    pub tail: [u64; 4],
}

/// The BPF_RAW_TRACEPOINT_OPEN members of union bpf_attr.
#[repr(C)]
struct RawTpOpenAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

/// `struct perf_event_attr` up to `PERF_ATTR_SIZE_VER5` (112 bytes), the members a
/// probe needs named; the rest stays zero.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    _sample_to_flags: [u64; 4],
    _wakeup_bp_type: [u32; 2],
    /// `kprobe_func`: the function's name.
    config1: u64,
    /// `probe_offset`.
    config2: u64,
    _rest: [u64; 5],
}
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// bpf(2) with `attr`; the new fd it returns.
pub fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: attr is a fully initialised prefix of union bpf_attr for `cmd`, and every
    // pointer in it refers to memory that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Where a program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attach<'a> {
    /// The BTF tracepoint of this name (`sock_send_length`).
    TpBtf(&'a str),
    /// The return of this kernel function, through a BPF trampoline.
    FExit(&'a str),
    /// The entry of this kernel function, through the kprobe PMU.
    KProbe(&'a str),
    /// The return of this kernel function, through the kprobe PMU.
    KRetProbe(&'a str),
}

impl std::fmt::Display for Attach<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attach::TpBtf(t) => write!(f, "tp_btf/{t}"),
            Attach::FExit(t) => write!(f, "fexit/{t}"),
            Attach::KProbe(t) => write!(f, "kprobe/{t}"),
            Attach::KRetProbe(t) => write!(f, "kretprobe/{t}"),
        }
    }
}

impl Attach<'_> {
    fn is_kprobe(&self) -> bool {
        matches!(self, Attach::KProbe(_) | Attach::KRetProbe(_))
    }
}

/// The running kernel's BTF, read once (parsing it takes a while under emulation).
fn vmlinux() -> Result<&'static btf_rs::Btf> {
    static BTF: OnceLock<std::result::Result<btf_rs::Btf, String>> = OnceLock::new();
    BTF.get_or_init(|| btf_rs::Btf::from_file(VMLINUX_BTF).map_err(|e| format!("reading {VMLINUX_BTF}: {e}")))
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// The BTF id a tracing program names as its target: the tracepoint's
/// `btf_trace_<name>` typedef, or the function's FUNC.
fn target_btf_id(at: Attach) -> Result<u32> {
    let btf = vmlinux()?;
    let (name, want_func) = match at {
        Attach::TpBtf(t) => (format!("btf_trace_{t}"), false),
        Attach::FExit(f) => (f.to_owned(), true),
        Attach::KProbe(_) | Attach::KRetProbe(_) => bail!("{at} has no BTF target"),
    };
    let ids = btf.resolve_ids_by_name(&name).unwrap_or_default();
    ids.into_iter()
        .find(|&id| !want_func || matches!(btf.resolve_type_by_id(id), Ok(btf_rs::Type::Func(_))))
        .with_context(|| format!("the kernel's BTF has no {name}"))
}

/// A program loaded from a few instructions, attached (at one place, or at
/// several for a kprobe program) while it lives.
pub struct RefProg {
    name: String,
    insns: u32,
    prog: OwnedFd,
    links: Vec<OwnedFd>,
}

impl RefProg {
    /// Loads `insns` as a program of `at`'s attach type, named `name` (the kernel keeps
    /// 15 bytes of it), and attaches it at `at`.
    pub fn attach(name: &str, insns: &[u64], at: Attach) -> Result<Self> {
        let (prog_type, expected_attach_type, attach_btf_id) = match at {
            Attach::TpBtf(_) => (BPF_PROG_TYPE_TRACING, BPF_TRACE_RAW_TP, target_btf_id(at)?),
            Attach::FExit(_) => (BPF_PROG_TYPE_TRACING, BPF_TRACE_FEXIT, target_btf_id(at)?),
            Attach::KProbe(_) | Attach::KRetProbe(_) => (BPF_PROG_TYPE_KPROBE, 0, 0),
        };
        raise_memlock();
        let license = CString::new("GPL").expect("no NUL inside");
        let mut prog_name = [0u8; 16];
        let short = &name.as_bytes()[..name.len().min(15)];
        prog_name[..short.len()].copy_from_slice(short);
        let attr = ProgLoadAttr {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            expected_attach_type,
            attach_btf_id,
            ..ProgLoadAttr::default()
        };
        let prog = bpf(BPF_PROG_LOAD, &attr).with_context(|| format!("loading {name} for {at}"))?;
        let mut p = RefProg { name: name.to_owned(), insns: insns.len() as u32, prog, links: Vec::new() };
        p.link(at)?;
        Ok(p)
    }

    /// Attaches this kprobe program at one more place (a tracing program's place is
    /// fixed when it is loaded).
    pub fn also(&mut self, at: Attach) -> Result<()> {
        if !at.is_kprobe() {
            bail!("{}: only a kprobe program attaches at several places, not at {at}", self.name);
        }
        self.link(at)
    }

    fn link(&mut self, at: Attach) -> Result<()> {
        let link = match at {
            Attach::TpBtf(_) | Attach::FExit(_) => {
                let attr = RawTpOpenAttr { name: 0, prog_fd: self.prog.as_raw_fd() as u32, _pad: 0 };
                bpf(BPF_RAW_TRACEPOINT_OPEN, &attr).map_err(anyhow::Error::from)
            }
            Attach::KProbe(f) => kprobe(self.prog.as_fd(), f, false),
            Attach::KRetProbe(f) => kprobe(self.prog.as_fd(), f, true),
        };
        self.links.push(link.with_context(|| format!("attaching {} at {at}", self.name))?);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its instructions as loaded.
    pub fn insns(&self) -> u32 {
        self.insns
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.prog.as_fd()
    }
}

/// Before 5.11 a program's memory counts against `RLIMIT_MEMLOCK`, shared by every
/// process of the user: with an observer's tables loaded, the default limit makes
/// the kernel refuse a load with EPERM. Lifted as libbpf does; a no-op later.
fn raise_memlock() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads the struct, which lives across the call. Without the
    // privilege it fails, and the load then says why.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// A perf event of the kprobe PMU on `func` (its return if `ret`), running `prog`.
fn kprobe(prog: BorrowedFd, func: &str, ret: bool) -> Result<OwnedFd> {
    let kind: u32 = read_pmu("type")?.trim().parse().context("the kprobe PMU's type")?;
    let mut config = 0;
    if ret {
        // "config:0"
        let format = read_pmu("format/retprobe")?;
        let bit: u32 = format
            .trim()
            .strip_prefix("config:")
            .and_then(|b| b.parse().ok())
            .with_context(|| format!("{KPROBE_PMU}/format/retprobe says {format:?}, not config:<bit>"))?;
        config = 1u64 << bit;
    }
    let func = CString::new(func).context("a function name without NUL")?;
    let attr = PerfEventAttr {
        kind,
        size: size_of::<PerfEventAttr>() as u32,
        config,
        config1: func.as_ptr() as u64,
        ..PerfEventAttr::default()
    };
    // Any task (-1) on CPU 0: a kprobe's BPF program runs on every CPU whichever
    // CPU its event names.
    // SAFETY: attr is a valid perf_event_attr of the size it states, and the name it
    // points at outlives the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_perf_event_open, &attr as *const PerfEventAttr, -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("perf_event_open");
    }
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    let event = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    for (request, arg) in [(PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()), (PERF_EVENT_IOC_ENABLE, 0)] {
        // SAFETY: both requests take an int argument, and the event fd is ours.
        if unsafe { libc::ioctl(event.as_raw_fd(), request as _, arg) } < 0 {
            return Err(io::Error::last_os_error()).context("ioctl on the perf event");
        }
    }
    Ok(event)
}

fn read_pmu(file: &str) -> Result<String> {
    let path = format!("{KPROBE_PMU}/{file}");
    std::fs::read_to_string(&path).with_context(|| format!("reading {path} (CONFIG_KPROBES)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layouts_match_the_kernel() {
        // Offsets of union bpf_attr's BPF_PROG_LOAD members (include/uapi/linux/bpf.h).
        let a = ProgLoadAttr::default();
        let base = &a as *const _ as usize;
        assert_eq!(&a.prog_name as *const _ as usize - base, 48);
        assert_eq!(&a.expected_attach_type as *const _ as usize - base, 68);
        assert_eq!(&a.func_info as *const _ as usize - base, 80);
        assert_eq!(&a.line_info as *const _ as usize - base, 96);
        assert_eq!(&a.attach_btf_id as *const _ as usize - base, 108);
        assert_eq!(size_of::<RawTpOpenAttr>(), 16);
        // include/uapi/linux/perf_event.h: PERF_ATTR_SIZE_VER5, config1 at 56.
        let p = PerfEventAttr::default();
        let base = &p as *const _ as usize;
        assert_eq!(size_of::<PerfEventAttr>(), 112);
        assert_eq!(&p.config1 as *const _ as usize - base, 56);
        assert_eq!(&p.config2 as *const _ as usize - base, 64);
    }

    #[test]
    fn instruction_encoding() {
        // Bytes as the kernel reads them: opcode, dst | src << 4, off (le), imm (le).
        assert_eq!(insn(0x79, 3, 1, 0, 0).to_le_bytes(), [0x79, 0x13, 0, 0, 0, 0, 0, 0]);
        assert_eq!(insn(0x7b, 10, 3, -8, 0).to_le_bytes(), [0x7b, 0x3a, 0xf8, 0xff, 0, 0, 0, 0]);
        assert_eq!(insn(0x07, 1, 0, 0, -8).to_le_bytes(), [0x07, 0x01, 0, 0, 0xf8, 0xff, 0xff, 0xff]);
        assert_eq!(call(113).to_le_bytes(), [0x85, 0, 0, 0, 113, 0, 0, 0]);
        assert_eq!(EMPTY, [0xb7, 0x95]);
    }

    #[test]
    fn places_are_named_as_the_observer_names_hooks() {
        assert_eq!(Attach::TpBtf("sock_send_length").to_string(), "tp_btf/sock_send_length");
        assert_eq!(Attach::KRetProbe("inet_recvmsg").to_string(), "kretprobe/inet_recvmsg");
        assert!(Attach::KProbe("x").is_kprobe() && !Attach::FExit("x").is_kprobe());
    }
}
