//! The reference point for the per-call hooks' cost: an empty tp_btf program (two
//! instructions, `r0 = 0; exit`) attached to the same tracepoints and timed by the
//! same kernel BPF statistics. What it costs per run is what any tp_btf program
//! costs here before doing anything: the trampoline into the program and the two
//! clock reads of the statistics themselves, which a VM may make expensive.
//!
//! Loaded with bpf(2) directly: a two-instruction program needs no object file, no
//! compiler and no loader library.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result};

use super::progs::{ProgStats, parse_fdinfo};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_RAW_TP: u32 = 23;
/// `r0 = 0` (BPF_ALU64 | BPF_MOV | BPF_K) and `exit` (BPF_JMP | BPF_EXIT).
const EMPTY_PROGRAM: [u64; 2] = [0xb7, 0x95];
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The BPF_PROG_LOAD members of union bpf_attr, up to `attach_btf_id`, with room
/// after it that must be zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    tail: [u64; 4],
}

/// The BPF_RAW_TRACEPOINT_OPEN members of union bpf_attr.
#[repr(C)]
struct RawTpOpenAttr {
    name: u64,
    prog_fd: u32,
    _pad: u32,
}

/// An empty program attached to a tracepoint while it lives.
pub struct EmptyProg {
    name: String,
    prog: OwnedFd,
    _link: OwnedFd,
}

impl EmptyProg {
    /// Loads and attaches one to tp_btf `tracepoint` (e.g. `sock_send_length`); its
    /// statistics are reported under `name`.
    pub fn attach(tracepoint: &str, name: &str) -> Result<Self> {
        let btf = btf_rs::Btf::from_file(VMLINUX_BTF)
            .with_context(|| format!("reading {VMLINUX_BTF}"))?;
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
            insn_cnt: EMPTY_PROGRAM.len() as u32,
            insns: EMPTY_PROGRAM.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            expected_attach_type: BPF_TRACE_RAW_TP,
            attach_btf_id: btf_id,
            ..ProgLoadAttr::default()
        };
        let prog = bpf(BPF_PROG_LOAD, &attr)
            .with_context(|| format!("loading an empty tp_btf program for {tracepoint}"))?;
        let attr = RawTpOpenAttr {
            name: 0,
            prog_fd: prog.as_raw_fd() as u32,
            _pad: 0,
        };
        let link = bpf(BPF_RAW_TRACEPOINT_OPEN, &attr)
            .with_context(|| format!("attaching an empty program to {tracepoint}"))?;
        Ok(EmptyProg {
            name: name.to_owned(),
            prog,
            _link: link,
        })
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
            xlated_insns: Some(EMPTY_PROGRAM.len() as u32),
        })
    }
}

/// bpf(2) with `attr`; the new fd it returns.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<OwnedFd> {
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
    }
}
