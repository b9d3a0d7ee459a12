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

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::wait_until;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_PROG_GET_NEXT_ID: libc::c_long = 11;
const BPF_MAP_GET_NEXT_ID: libc::c_long = 12;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;

/// Offsets into `struct bpf_prog_info` (include/uapi/linux/bpf.h); stable
/// UAPI, only ever extended at the end.
const PROG_INFO_TYPE: usize = 0;
const PROG_INFO_ID: usize = 4;
const PROG_INFO_XLATED_LEN: usize = 20;
const PROG_INFO_NAME: usize = 64;
/// BPF statistics (`kernel.bpf_stats_enabled`): time and runs (5.1+), runs
/// skipped for recursion (5.12+; zero before).
const PROG_INFO_RUN_TIME_NS: usize = 192;
const PROG_INFO_RUN_CNT: usize = 200;
const PROG_INFO_RECURSION_MISSES: usize = 208;
/// `verified_insns` (5.16+; zero before).
const PROG_INFO_VERIFIED_INSNS: usize = 216;
const OBJ_NAME_LEN: usize = 16;
/// Offsets into `struct bpf_link_info`.
const LINK_INFO_TYPE: usize = 0;
const LINK_INFO_ID: usize = 4;
const LINK_INFO_PROG_ID: usize = 8;
/// Offsets into `struct bpf_map_info`.
const MAP_INFO_KEY_SIZE: usize = 8;
const MAP_INFO_VALUE_SIZE: usize = 12;
const MAP_INFO_NAME: usize = 24;
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
    /// Instructions after the verifier's rewriting (`xlated_prog_len` / 8).
    pub xlated_insns: u32,
    /// Instructions the verifier walked to prove it safe, on kernels that
    /// say (5.16+).
    pub verified_insns: Option<u32>,
    /// BPF statistics, counted while they are on (the observer's `--bpf-stats`).
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub recursion_misses: u64,
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
    /// Element commands: the value (or next key) pointer.
    d: u64,
    _pad: [u64; 5],
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

/// A descriptor of the object with `id`, or `None` if it vanished between
/// listing and opening (normal while things are being unloaded).
fn fd_by_id(fd_cmd: libc::c_long, id: u32) -> Result<Option<OwnedFd>> {
    let mut attr = Attr { a: id, ..Default::default() };
    let fd = match bpf(fd_cmd, &mut attr) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => bail!("bpf GET_FD_BY_ID({id}): {e}"),
    };
    let Ok(raw) = i32::try_from(fd) else { bail!("bpf returned fd {fd}") };
    // SAFETY: the kernel just returned this fd to us; we own it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(raw) }))
}

/// Info struct bytes of the object behind `fd`.
fn fd_info(fd: BorrowedFd) -> Result<[u8; INFO_BUF]> {
    let mut buf = [0u8; INFO_BUF];
    let raw = fd.as_raw_fd() as u32;
    let mut attr = Attr { a: raw, b: INFO_BUF as u32, c: buf.as_mut_ptr() as u64, ..Default::default() };
    match bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) {
        Ok(_) => Ok(buf),
        Err(e) => bail!("bpf OBJ_GET_INFO_BY_FD: {e}"),
    }
}

/// Info struct bytes of the object with `id`, or `None` if it vanished.
fn info(fd_cmd: libc::c_long, id: u32) -> Result<Option<[u8; INFO_BUF]>> {
    fd_by_id(fd_cmd, id)?.map(|fd| fd_info(fd.as_fd())).transpose()
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(w)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(w)
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
            out.push(program_from_info(&b));
        }
    }
    Ok(out)
}

fn program_from_info(b: &[u8]) -> KernelProgram {
    KernelProgram {
        id: u32_at(b, PROG_INFO_ID),
        prog_type: u32_at(b, PROG_INFO_TYPE),
        name: name_at(b, PROG_INFO_NAME),
        xlated_insns: u32_at(b, PROG_INFO_XLATED_LEN) / 8,
        verified_insns: Some(u32_at(b, PROG_INFO_VERIFIED_INSNS)).filter(|&n| n > 0),
        run_time_ns: u64_at(b, PROG_INFO_RUN_TIME_NS),
        run_cnt: u64_at(b, PROG_INFO_RUN_CNT),
        recursion_misses: u64_at(b, PROG_INFO_RECURSION_MISSES),
    }
}

/// The program behind `fd` (one this process loaded), with its counters now.
pub fn program_of_fd(fd: BorrowedFd) -> Result<KernelProgram> {
    Ok(program_from_info(&fd_info(fd)?))
}

/// The programs process `pid` holds open (fdinfo's `prog_id`), with their
/// counters now: another process's programs of the same name stay out.
pub fn programs_of_process(pid: u32) -> Result<Vec<KernelProgram>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids: Vec<u32> = Vec::new();
    // An fd can close between listing and reading; such entries are skipped.
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))?.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let id = text.lines().find_map(|l| l.strip_prefix("prog_id:")).and_then(|v| v.trim().parse().ok());
        if let Some(id) = id.filter(|id| !ids.contains(id)) {
            ids.push(id);
        }
    }
    let mut out = Vec::new();
    for id in ids {
        if let Some(b) = info(BPF_PROG_GET_FD_BY_ID, id)? {
            out.push(program_from_info(&b));
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

/// A loaded hash map, opened by name, whose entries a test reads and writes
/// as raw bytes: to put the kernel tables into states that real traffic
/// reaches only by chance (a session whose close no hook saw).
pub struct KernelMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl KernelMap {
    /// The newest loaded map named `name` (kernel names are cut at 15 bytes).
    pub fn open(name: &str) -> Result<Self> {
        let name = &name[..name.len().min(OBJ_NAME_LEN - 1)];
        for id in ids(BPF_MAP_GET_NEXT_ID)?.into_iter().rev() {
            let Some(fd) = fd_by_id(BPF_MAP_GET_FD_BY_ID, id)? else { continue };
            let b = fd_info(fd.as_fd())?;
            if name_at(&b, MAP_INFO_NAME) == name {
                let (key_size, value_size) = (u32_at(&b, MAP_INFO_KEY_SIZE), u32_at(&b, MAP_INFO_VALUE_SIZE));
                return Ok(KernelMap { fd, key_size: key_size as usize, value_size: value_size as usize });
            }
        }
        bail!("no BPF map named {name} is loaded")
    }

    /// The element command's attributes: `key` (null: none) and the value
    /// or next-key buffer.
    fn attr(&self, key: Option<&[u8]>, value_or_next: *mut u8) -> Result<Attr> {
        if let Some(key) = key
            && key.len() != self.key_size
        {
            bail!("key of {} bytes for a map whose keys have {}", key.len(), self.key_size);
        }
        Ok(Attr {
            a: self.fd.as_raw_fd() as u32,
            c: key.map_or(0, |k| k.as_ptr() as u64),
            d: value_or_next as u64,
            ..Default::default()
        })
    }

    /// Every key, in the kernel's order (a bounded walk: a key deleted under
    /// it restarts the kernel's walk, so at most twice the map's entries).
    pub fn keys(&self) -> Result<Vec<Vec<u8>>> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        let mut next = vec![0u8; self.key_size];
        let mut cur: Option<Vec<u8>> = None;
        for _ in 0..2_000_000 {
            // No key: the walk starts at the first one.
            let mut attr = self.attr(cur.as_deref(), next.as_mut_ptr())?;
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {
                    if !keys.contains(&next) {
                        keys.push(next.clone());
                    }
                    cur = Some(next.clone());
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => bail!("bpf MAP_GET_NEXT_KEY: {e}"),
            }
        }
        bail!("the map walk did not end")
    }

    /// The value under `key`, if there is one.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.value_size];
        let mut attr = self.attr(Some(key), value.as_mut_ptr())?;
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => bail!("bpf MAP_LOOKUP_ELEM: {e}"),
        }
    }

    /// Creates or replaces the entry under `key`.
    pub fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        if value.len() != self.value_size {
            bail!("value of {} bytes for a map whose values have {}", value.len(), self.value_size);
        }
        let mut attr = self.attr(Some(key), value.as_ptr().cast_mut())?;
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ()).map_err(|e| anyhow::anyhow!("bpf MAP_UPDATE_ELEM: {e}"))
    }
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_HASH: u32 = 1;

/// Creates a hash map with these sizes and pins it at `path` (on bpffs): a
/// stand-in for a table another build of the observer left pinned.
pub fn pin_hash_map(path: &std::path::Path, key_size: u32, value_size: u32, max_entries: u32) -> Result<()> {
    let mut create = Attr {
        a: BPF_MAP_TYPE_HASH,
        b: key_size,
        c: u64::from(value_size) | (u64::from(max_entries) << 32),
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &mut create).context("bpf MAP_CREATE")?;
    // SAFETY: MAP_CREATE returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let ptr = c_path.as_ptr() as u64;
    let mut pin = Attr { a: ptr as u32, b: (ptr >> 32) as u32, c: fd.as_raw_fd() as u64, ..Default::default() };
    bpf(BPF_OBJ_PIN, &mut pin).with_context(|| format!("bpf OBJ_PIN {}", path.display()))?;
    Ok(())
}
