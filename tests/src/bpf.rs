//! What BPF programs and links are loaded in the kernel, to prove the
//! observer leaves nothing behind when it exits.
//!
//! Uses the bpf(2) ID-iteration commands directly rather than bpftool, which
//! is not installed on the test machines and would be one more package. Two
//! kernel facts shape the API:
//! - program names are truncated to 15 bytes (`BPF_OBJ_NAME_LEN` is 16 with
//!   the NUL), so compare prefixes, not full Rust function names;
//! - links have no name; they are matched through their program's name.
//!
//! Freeing a program after its last reference goes is deferred (RCU work),
//! so right after the observer exits its programs may still be listed for a
//! moment: use [`wait_no_kernel_objects`] instead of checking once.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Result, bail};

use crate::util::wait_until;

const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;

/// Offsets into `struct bpf_prog_info` (include/uapi/linux/bpf.h); stable
/// UAPI, only ever extended at the end.
const PROG_INFO_TYPE: usize = 0;
const PROG_INFO_ID: usize = 4;
const PROG_INFO_NAME: usize = 64;
const OBJ_NAME_LEN: usize = 16;
/// Offsets into `struct bpf_link_info`.
const LINK_INFO_TYPE: usize = 0;
const LINK_INFO_ID: usize = 4;
const LINK_INFO_PROG_ID: usize = 8;
/// Larger than both info structs on any current kernel; the kernel copies
/// min(ours, its) bytes and requires our extra bytes to be zero, which they are.
const INFO_BUF: usize = 512;

/// A loaded BPF program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelProgram {
    pub id: u32,
    /// `enum bpf_prog_type` value.
    pub prog_type: u32,
    /// At most 15 bytes (kernel truncation).
    pub name: String,
}

/// A BPF link (an attachment that owns a program reference).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelLink {
    pub id: u32,
    /// `enum bpf_link_type` value (e.g. 2 = tracing/fentry, 7 = perf event
    /// (kprobe, tracepoint), 1 = raw tracepoint).
    pub link_type: u32,
    pub prog_id: u32,
    /// Name of `prog_id`, if it could be read.
    pub prog_name: Option<String>,
}

/// `bpf_attr` as used by GET_NEXT_ID / GET_FD_BY_ID (first three u32s)
/// and OBJ_GET_INFO_BY_FD (fd, len, pointer); zero-padded like the kernel
/// expects for unused trailing fields.
#[repr(C, align(8))]
#[derive(Default)]
struct Attr {
    a: u32,
    b: u32,
    c: u64,
    _pad: [u64; 6],
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised, suitably sized bpf_attr for
    // these commands; the kernel reads/writes only within `size`, and any
    // pointer inside it (info buffer) is set by the caller to a live buffer.
    let r =
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, std::mem::size_of::<Attr>() as libc::c_uint) };
    if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r) }
}

/// IDs of all objects of one kind (programs or links), in ID order.
fn ids(next_cmd: libc::c_long) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    let mut start = 0u32;
    // Bounded: IDs strictly increase and there are at most 2^31 of them.
    loop {
        let mut attr = Attr { a: start, ..Default::default() };
        match bpf(next_cmd, &mut attr) {
            Ok(_) => {
                if attr.b <= start {
                    bail!("bpf GET_NEXT_ID did not advance ({start} -> {})", attr.b);
                }
                start = attr.b;
                out.push(start);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                bail!("bpf(2) needs CAP_SYS_ADMIN: {e}")
            }
            Err(e) => bail!("bpf GET_NEXT_ID: {e}"),
        }
    }
}

/// Info struct bytes of the object with `id`, or `None` if it vanished
/// between listing and opening (normal while things are being unloaded).
fn info(fd_cmd: libc::c_long, id: u32) -> Result<Option<[u8; INFO_BUF]>> {
    let mut attr = Attr { a: id, ..Default::default() };
    let fd = match bpf(fd_cmd, &mut attr) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => bail!("bpf GET_FD_BY_ID({id}): {e}"),
    };
    let Ok(raw) = i32::try_from(fd) else { bail!("bpf returned fd {fd}") };
    // SAFETY: the kernel just returned this fd to us; we own it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut buf = [0u8; INFO_BUF];
    let mut attr = Attr { a: raw as u32, b: INFO_BUF as u32, c: buf.as_mut_ptr() as u64, ..Default::default() };
    let r = bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr);
    drop(fd);
    match r {
        Ok(_) => Ok(Some(buf)),
        Err(e) => bail!("bpf OBJ_GET_INFO_BY_FD({id}): {e}"),
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(w)
}

fn name_at(b: &[u8], off: usize) -> String {
    let raw = &b[off..off + OBJ_NAME_LEN];
    let end = raw.iter().position(|&c| c == 0).unwrap_or(OBJ_NAME_LEN);
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// All loaded BPF programs.
pub fn kernel_programs() -> Result<Vec<KernelProgram>> {
    let mut out = Vec::new();
    for id in ids(BPF_PROG_GET_NEXT_ID)? {
        if let Some(b) = info(BPF_PROG_GET_FD_BY_ID, id)? {
            out.push(KernelProgram {
                id: u32_at(&b, PROG_INFO_ID),
                prog_type: u32_at(&b, PROG_INFO_TYPE),
                name: name_at(&b, PROG_INFO_NAME),
            });
        }
    }
    Ok(out)
}

/// Names of loaded programs starting with `prefix` (e.g. `"obs_"`).
pub fn kernel_programs_named(prefix: &str) -> Result<Vec<String>> {
    Ok(kernel_programs()?.into_iter().filter(|p| p.name.starts_with(prefix)).map(|p| p.name).collect())
}

/// All BPF links.
pub fn kernel_links() -> Result<Vec<KernelLink>> {
    let progs = kernel_programs()?;
    let mut out = Vec::new();
    for id in ids(BPF_LINK_GET_NEXT_ID)? {
        if let Some(b) = info(BPF_LINK_GET_FD_BY_ID, id)? {
            let prog_id = u32_at(&b, LINK_INFO_PROG_ID);
            out.push(KernelLink {
                id: u32_at(&b, LINK_INFO_ID),
                link_type: u32_at(&b, LINK_INFO_TYPE),
                prog_id,
                prog_name: progs.iter().find(|p| p.id == prog_id).map(|p| p.name.clone()),
            });
        }
    }
    Ok(out)
}

/// Links whose program's name starts with `prefix`.
pub fn kernel_links_named(prefix: &str) -> Result<Vec<KernelLink>> {
    Ok(kernel_links()?.into_iter().filter(|l| l.prog_name.as_deref().is_some_and(|n| n.starts_with(prefix))).collect())
}

/// Waits (bounded) until no program and no link named with `prefix` is
/// left; the error lists what remains.
pub fn wait_no_kernel_objects(prefix: &str, timeout: Duration) -> Result<()> {
    let r = wait_until(
        &format!("BPF programs and links named {prefix}* to be gone"),
        timeout,
        Duration::from_millis(50),
        || Ok((kernel_programs_named(prefix)?.is_empty() && kernel_links_named(prefix)?.is_empty()).then_some(())),
    );
    if let Err(e) = r {
        bail!(
            "{e:#}; still loaded: programs {:?}, links {:?}",
            kernel_programs_named(prefix).unwrap_or_default(),
            kernel_links_named(prefix).unwrap_or_default()
        );
    }
    Ok(())
}
