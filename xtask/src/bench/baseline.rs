//! Reference points for the per-call hooks' cost: tiny tp_btf programs attached to
//! the same tracepoints and timed by the same kernel BPF statistics, each doing one
//! of the things a hook does per call. The empty one (`r0 = 0; exit`) costs what any
//! tp_btf program costs here before doing anything: the trampoline into the program
//! and the two clock reads of the statistics themselves, which a VM may make
//! expensive. The others add one helper call each: a clock read, one
//! `bpf_probe_read_kernel` of 8 bytes, one hash-map lookup keyed by the socket.
//!
//! Loaded with bpf(2) directly: programs of a few instructions need no object file,
//! no compiler and no loader library.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

use super::progs::{ProgStats, parse_fdinfo};

const BPF_MAP_CREATE: libc::c_long = 0;
pub(super) const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;
const BPF_MAP_TYPE_HASH: u32 = 1;
/// Helper ids (include/uapi/linux/bpf.h).
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_KTIME_GET_NS: i32 = 5;
const HELPER_PROBE_READ_KERNEL: i32 = 113;
/// The observer's table of open sessions: 8-byte key, 112-byte value, preallocated.
const LOOKUP_MAP: (u32, u32, u32) = (8, 112, 65_536);

/// One instruction: opcode, registers, offset, immediate.
const fn insn(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    op as u64 | ((dst as u64 | (src as u64) << 4) << 8) | ((off as u16 as u64) << 16) | ((imm as u32 as u64) << 32)
}
const MOV_R0_0: u64 = insn(0xb7, 0, 0, 0, 0);
const EXIT: u64 = insn(0x95, 0, 0, 0, 0);
/// `r3 = *(u64 *)(r1 + 0)`: the tracepoint's first argument, the socket.
const LOAD_SK_R3: u64 = insn(0x79, 3, 1, 0, 0);
const fn call(helper: i32) -> u64 {
    insn(0x85, 0, 0, 0, helper)
}

/// The reference programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference {
    Empty,
    ClockRead,
    ProbeRead,
    MapLookup,
}

impl Reference {
    /// Name (the statistics' and bpf(2)'s) and what it does, for the report.
    pub fn describe(self) -> (&'static str, &'static str) {
        match self {
            Reference::Empty => ("empty", "nothing (`r0 = 0; exit`)"),
            Reference::ClockRead => ("ktime", "one `bpf_ktime_get_ns()`"),
            Reference::ProbeRead => ("probe_read", "one `bpf_probe_read_kernel()` of 8 bytes"),
            Reference::MapLookup => (
                "map_lookup",
                "one lookup (a miss) keyed by the socket's address in a preallocated hash map shaped like `OPEN_SESSIONS`",
            ),
        }
    }

    /// Its instructions; `map_fd` is the map a lookup uses.
    fn program(self, map_fd: i32) -> Vec<u64> {
        match self {
            Reference::Empty => vec![MOV_R0_0, EXIT],
            Reference::ClockRead => vec![call(HELPER_KTIME_GET_NS), MOV_R0_0, EXIT],
            Reference::ProbeRead => vec![
                LOAD_SK_R3,
                insn(0xbf, 1, 10, 0, 0), // r1 = r10
                insn(0x07, 1, 0, 0, -8), // r1 += -8: an 8-byte stack slot
                insn(0xb7, 2, 0, 0, 8),  // r2 = 8
                call(HELPER_PROBE_READ_KERNEL),
                MOV_R0_0,
                EXIT,
            ],
            Reference::MapLookup => vec![
                LOAD_SK_R3,
                insn(0x7b, 10, 3, -8, 0),    // *(u64 *)(r10 - 8) = r3: the key
                insn(0x18, 1, 1, 0, map_fd), // r1 = map (BPF_PSEUDO_MAP_FD), 2 slots
                0,
                insn(0xbf, 2, 10, 0, 0), // r2 = r10
                insn(0x07, 2, 0, 0, -8), // r2 += -8
                call(HELPER_MAP_LOOKUP_ELEM),
                MOV_R0_0,
                EXIT,
            ],
        }
    }
}

pub const REFERENCES: [Reference; 4] =
    [Reference::Empty, Reference::ClockRead, Reference::ProbeRead, Reference::MapLookup];

/// The BPF_MAP_CREATE members of union bpf_attr.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    _rest: [u32; 11],
}
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The BPF_PROG_LOAD members of union bpf_attr, up to `attach_btf_id`, with room
/// after it that must be zero.
#[repr(C)]
#[derive(Default)]
pub(super) struct ProgLoadAttr {
    pub(super) prog_type: u32,
    pub(super) insn_cnt: u32,
    pub(super) insns: u64,
    pub(super) license: u64,
    pub(super) log_level: u32,
    pub(super) log_size: u32,
    pub(super) log_buf: u64,
    pub(super) kern_version: u32,
    pub(super) prog_flags: u32,
    pub(super) prog_name: [u8; 16],
    pub(super) prog_ifindex: u32,
    pub(super) expected_attach_type: u32,
    pub(super) prog_btf_fd: u32,
    pub(super) func_info_rec_size: u32,
    pub(super) func_info: u64,
    pub(super) func_info_cnt: u32,
    pub(super) line_info_rec_size: u32,
    pub(super) line_info: u64,
    pub(super) line_info_cnt: u32,
    pub(super) attach_btf_id: u32,
    pub(super) tail: [u64; 4],
}

/// The BPF_RAW_TRACEPOINT_OPEN members of union bpf_attr.
#[repr(C)]
struct RawTpOpenAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

/// A reference program attached to a tracepoint while it lives.
pub struct RefProg {
    name: String,
    insns: u32,
    prog: OwnedFd,
    _link: OwnedFd,
    _map: Option<OwnedFd>,
}

impl RefProg {
    /// Loads and attaches `which` to tp_btf `tracepoint` (e.g. `sock_send_length`);
    /// its statistics are reported under `name`.
    pub fn attach(which: Reference, tracepoint: &str, name: &str) -> Result<Self> {
        let map = match which {
            Reference::MapLookup => {
                let (key_size, value_size, max_entries) = LOOKUP_MAP;
                let attr = MapCreateAttr {
                    map_type: BPF_MAP_TYPE_HASH,
                    key_size,
                    value_size,
                    max_entries,
                    map_flags: 0,
                    _rest: [0; 11],
                };
                Some(bpf(BPF_MAP_CREATE, &attr).context("creating a hash map for the lookup reference")?)
            }
            _ => None,
        };
        let program = which.program(map.as_ref().map_or(-1, |m| m.as_raw_fd()));
        let btf = btf_rs::Btf::from_file(VMLINUX_BTF).with_context(|| format!("reading {VMLINUX_BTF}"))?;
        let target = format!("btf_trace_{tracepoint}");
        let btf_id = *btf
            .resolve_ids_by_name(&target)
            .ok()
            .and_then(|ids| ids.first().copied())
            .as_ref()
            .with_context(|| format!("the kernel's BTF has no {target}"))?;
        let license = CString::new("GPL").expect("no NUL inside");
        let mut prog_name = [0u8; 16];
        let short = &name.as_bytes()[..name.len().min(15)];
        prog_name[..short.len()].copy_from_slice(short);
        let attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_TRACING,
            insn_cnt: program.len() as u32,
            insns: program.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            expected_attach_type: BPF_TRACE_RAW_TP,
            attach_btf_id: btf_id,
            ..ProgLoadAttr::default()
        };
        let what = which.describe().0;
        let prog = bpf(BPF_PROG_LOAD, &attr)
            .with_context(|| format!("loading the {what} reference program for {tracepoint}"))?;
        let attr = RawTpOpenAttr { name: 0, prog_fd: prog.as_raw_fd() as u32, _pad: 0 };
        let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &attr)
            .with_context(|| format!("attaching the {what} reference program to {tracepoint}"))?;
        Ok(RefProg { name: name.to_owned(), insns: program.len() as u32, prog, _link: link, _map: map })
    }

    /// Its run count and run time so far.
    pub fn stats(&self) -> Result<ProgStats> {
        let path = format!("/proc/self/fdinfo/{}", self.prog.as_raw_fd());
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let info = parse_fdinfo(&text).with_context(|| format!("{path} is not a program's"))?;
        Ok(ProgStats {
            name: self.name.clone(),
            run_time_ns: info.run_time_ns,
            run_cnt: info.run_cnt,
            recursion_misses: info.recursion_misses,
            xlated_insns: Some(self.insns),
        })
    }
}

/// bpf(2) with `attr`; the new fd it returns.
pub(super) fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
    // SAFETY: attr is a fully initialised prefix of union bpf_attr for `cmd`, and every
    // pointer in it refers to memory that outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const T, size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_layout_matches_the_kernel() {
        // Offsets of union bpf_attr's BPF_PROG_LOAD members (include/uapi/linux/bpf.h).
        let a = ProgLoadAttr::default();
        let base = &a as *const _ as usize;
        assert_eq!(&a.prog_name as *const _ as usize - base, 48);
        assert_eq!(&a.expected_attach_type as *const _ as usize - base, 68);
        assert_eq!(&a.func_info as *const _ as usize - base, 80);
        assert_eq!(&a.line_info as *const _ as usize - base, 96);
        assert_eq!(&a.attach_btf_id as *const _ as usize - base, 108);
        assert_eq!(size_of::<RawTpOpenAttr>(), 16);
        assert_eq!(size_of::<MapCreateAttr>(), 64);
    }

    #[test]
    fn instruction_encoding() {
        // Bytes as the kernel reads them: opcode, dst | src << 4, off (le), imm (le).
        assert_eq!(insn(0x79, 3, 1, 0, 0).to_le_bytes(), [0x79, 0x13, 0, 0, 0, 0, 0, 0]);
        assert_eq!(insn(0x7b, 10, 3, -8, 0).to_le_bytes(), [0x7b, 0x3a, 0xf8, 0xff, 0, 0, 0, 0]);
        assert_eq!(insn(0x07, 1, 0, 0, -8).to_le_bytes(), [0x07, 0x01, 0, 0, 0xf8, 0xff, 0xff, 0xff]);
        assert_eq!(call(113).to_le_bytes(), [0x85, 0, 0, 0, 113, 0, 0, 0]);
        assert_eq!([MOV_R0_0, EXIT], [0xb7, 0x95]);
    }
}
