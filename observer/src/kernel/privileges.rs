//! Capabilities: whether this process may load and attach BPF programs
//! ([`check`]), and giving every one of them up once it has ([`drop_after_attach`]).
//!
//! Loading and attaching need `CAP_BPF`, `CAP_PERFMON` and `CAP_NET_ADMIN`;
//! nothing after that does. The programs stay attached through descriptors
//! the process holds (links, perf events), and reading the maps, the ring
//! buffers and the programs' statistics through descriptors already open
//! needs no capability on kernels 5.19 and later. So once attached, every
//! thread's effective, permitted and inheritable sets are emptied, its
//! ambient set cleared, its bounding set cleared where `CAP_SETPCAP` allows,
//! and no_new_privs set: parsing HTTP, YAML, MaxMind files and running NVML's
//! library then happens without any privilege.
//!
//! Capabilities belong to threads on Linux, not to processes, and a thread
//! inherits its creator's. So every thread drops them itself: the async
//! runtime's workers and blocking threads and the GPU sampler when they
//! start ([`drop_in_this_thread`], before any of them has work), the main
//! thread, which loads and attaches, right after ([`drop_after_attach`]),
//! and threads started later inherit the empty sets. No signal is sent to
//! other threads (one inside NVML or a blocking call would delay it for
//! good); instead [`drop_after_attach`] reads every thread's sets back from
//! /proc/self/task and names any that still holds something.
//!
//! Before 5.19 the kernel checks `bpf_capable()` on every bpf() call while
//! `kernel.unprivileged_bpf_disabled` is set (the distributions' default),
//! map lookups on an open descriptor included (5.19 limited that check to
//! creating maps and loading programs; backports may differ). [`prepare`] finds out, with a
//! lookup on a map of its own made without effective capabilities, and on
//! such a kernel every thread keeps `CAP_BPF` (effective and permitted) and
//! nothing else.
use std::{fs, io, sync::OnceLock};

const CAP_SETPCAP: u32 = 8;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capabilities observer needs, for messages.
pub const NEEDED: &str = "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN on kernels before 5.8), plus CAP_NET_ADMIN";

/// Effective capability set of this process, from /proc/self/status.
pub fn effective_caps() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    parse_cap(&status, "CapEff")
}

/// A `Cap*:` line (hexadecimal mask) of a /proc status file.
fn parse_cap(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    u64::from_str_radix(line[field.len() + 1..].trim(), 16).ok()
}

/// `Err(message)` naming the missing capabilities when BPF loading would fail.
pub fn check(caps: u64) -> Result<(), String> {
    let has = |cap: u32| caps & (1u64 << cap) != 0;
    let bpf_ok = (has(CAP_BPF) && has(CAP_PERFMON)) || has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !bpf_ok {
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    if !has(CAP_NET_ADMIN) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "observer needs to load eBPF programs: run it as root or grant {NEEDED}; this process lacks {}",
            missing.join(", ")
        ))
    }
}

/// What every thread keeps once the programs are attached (a capability
/// mask): set by [`prepare`], read by every thread as it drops.
static KEEP: OnceLock<u64> = OnceLock::new();

/// Decides what the threads keep after attach (see the module comment) and
/// arms [`drop_in_this_thread`]. Call once, on the main thread, before any
/// other thread starts; returns the mask kept.
pub fn prepare() -> u64 {
    let keep = match map_reads_need_capability() {
        Ok(false) => 0,
        Ok(true) => {
            let permitted = current().map_or(0, |c| c.permitted);
            let bpf = if permitted & (1 << CAP_BPF) != 0 { CAP_BPF } else { CAP_SYS_ADMIN };
            1u64 << bpf
        }
        // No map of our own (no privilege at all: `run` is about to refuse
        // to start) or no way to lower this thread's set: keep nothing.
        Err(_) => 0,
    };
    *KEEP.get_or_init(|| keep)
}

/// Drops this thread's capabilities to what [`prepare`] decided; nothing
/// when it was not called (unit tests, `observer check`). For threads that
/// start before the programs are attached and never load or attach them.
pub fn drop_in_this_thread() {
    if let Some(keep) = KEEP.get()
        && let Err(e) = drop_thread(*keep)
    {
        tracing::warn!(error = %e, "cannot give up this thread's capabilities");
    }
}

/// What [`drop_after_attach`] found.
#[derive(Debug)]
pub struct Dropped {
    pub threads: usize,
    /// Names of the capabilities kept ("" for none).
    pub kept: String,
    /// Threads that still hold more than that: `name (tid): CapEff ...`.
    pub holding: Vec<String>,
}

/// Drops the calling thread's capabilities (the one that loaded and
/// attached), then reads every thread's sets back. `Err` only when this
/// thread's own drop failed.
pub fn drop_after_attach() -> Result<Dropped, String> {
    let keep = *KEEP.get_or_init(|| 0);
    drop_thread(keep).map_err(|e| format!("cannot give up the capabilities of the main thread: {e}"))?;
    let mut threads = 0;
    let mut holding = Vec::new();
    for entry in fs::read_dir("/proc/self/task").map_err(|e| format!("/proc/self/task: {e}"))?.flatten() {
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else { continue };
        threads += 1;
        let field = |f| parse_cap(&status, f).unwrap_or(u64::MAX);
        let (eff, prm, inh, amb) = (field("CapEff"), field("CapPrm"), field("CapInh"), field("CapAmb"));
        if eff & !keep != 0 || prm & !keep != 0 || inh != 0 || amb != 0 {
            let name = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or_default().trim().to_string();
            holding.push(format!(
                "{name} ({}): CapEff {eff:016x} CapPrm {prm:016x} CapInh {inh:016x} CapAmb {amb:016x}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    Ok(Dropped { threads, kept: names(keep), holding })
}

/// `CAP_BPF` style names of a mask, comma separated.
fn names(mask: u64) -> String {
    let name = |cap: u32| match cap {
        CAP_SYS_ADMIN => "CAP_SYS_ADMIN".to_string(),
        CAP_BPF => "CAP_BPF".to_string(),
        n => format!("capability {n}"),
    };
    (0..64).filter(|c| mask & (1 << c) != 0).map(name).collect::<Vec<_>>().join(", ")
}

// The capability system calls, version 3 (64-bit sets, two 32-bit halves).
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    /// 0: the calling thread.
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Caps {
    effective: u64,
    permitted: u64,
    inheritable: u64,
}

/// The calling thread's sets.
fn current() -> io::Result<Caps> {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData (version 3) into the array we own.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok(Caps {
        effective: join(|d| d.effective),
        permitted: join(|d| d.permitted),
        inheritable: join(|d| d.inheritable),
    })
}

/// Sets the calling thread's sets (only ever lowering them).
fn set(caps: Caps) -> io::Result<()> {
    let mut header = CapHeader { version: CAP_VERSION_3, pid: 0 };
    let half = |m: u64, i: u32| (m >> (32 * i)) as u32;
    let data = [0, 1].map(|i| CapData {
        effective: half(caps.effective, i),
        permitted: half(caps.permitted, i),
        inheritable: half(caps.inheritable, i),
    });
    // SAFETY: capset reads the header and two CapData we own.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn prctl(option: libc::c_int, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the prctl options used here take integer arguments only.
    match unsafe { libc::prctl(option, arg, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong) } {
        -1 => Err(io::Error::last_os_error()),
        r => Ok(r),
    }
}

/// Securebits set where `CAP_SETPCAP` allows: uid 0 gains no capabilities
/// by exec, and none can be raised into the ambient set (both locked).
const SECUREBITS: libc::c_ulong = (libc::SECBIT_NOROOT
    | libc::SECBIT_NOROOT_LOCKED
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE
    | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED) as libc::c_ulong;

/// Gives up the calling thread's capabilities but `keep`: securebits and the
/// bounding set first (they need `CAP_SETPCAP`, skipped without it), then
/// the ambient set, no_new_privs, and last the effective, permitted and
/// inheritable sets.
fn drop_thread(keep: u64) -> io::Result<()> {
    let caps = current()?;
    if caps.effective & (1 << CAP_SETPCAP) != 0 {
        let bits = prctl(libc::PR_GET_SECUREBITS, 0)? as libc::c_ulong;
        prctl(libc::PR_SET_SECUREBITS, bits | SECUREBITS)?;
        for cap in 0..64 {
            // EINVAL past the kernel's last capability.
            if prctl(libc::PR_CAPBSET_DROP, cap).is_err() {
                break;
            }
        }
    }
    // EINVAL before 4.3, which has no ambient set.
    let _ = prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong);
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1)?;
    let kept = caps.permitted & keep;
    set(Caps { effective: kept, permitted: kept, inheritable: 0 })
}

// bpf(2), just enough for the probe below.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zeroed 128-byte bpf_attr we own, filled for `cmd`.
    match unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr) as u32) } {
        -1 => Err(io::Error::last_os_error()),
        r => Ok(r),
    }
}

/// Whether reading a map through an open descriptor needs a capability here:
/// a one-entry array made with this thread's capabilities, looked up with its
/// effective set emptied for the call (the permitted set, untouched, gives it
/// back right after).
fn map_reads_need_capability() -> io::Result<bool> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut attr = [0u64; 16];
    // map_type, key_size; value_size, max_entries.
    attr[0] = u64::from(BPF_MAP_TYPE_ARRAY) | (4 << 32);
    attr[1] = 4 | (1 << 32);
    let fd = bpf(BPF_MAP_CREATE, &mut attr)?;
    // SAFETY: BPF_MAP_CREATE returned a new descriptor that nothing else owns.
    let map = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let before = current()?;
    set(Caps { effective: 0, ..before })?;
    let (key, mut value) = (0u32, 0u32);
    let mut attr = [0u64; 16];
    attr[0] = map.as_raw_fd() as u64;
    attr[1] = &key as *const u32 as u64;
    attr[2] = &mut value as *mut u32 as u64;
    let lookup = bpf(BPF_MAP_LOOKUP_ELEM, &mut attr);
    set(before)?;
    match lookup {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(true),
        // Anything else: keep the capability rather than break the reads.
        Err(_) => Ok(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_lines() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n";
        assert_eq!(parse_cap(status, "CapEff"), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap(status, "CapInh"), Some(0));
        assert_eq!(parse_cap("Name: x\n", "CapEff"), None);
    }

    #[test]
    fn root_sys_admin_and_fine_grained_sets_pass() {
        assert!(check(0x1ff_ffff_ffff).is_ok());
        assert!(check(1 << CAP_SYS_ADMIN).is_ok());
        assert!(check((1 << CAP_BPF) | (1 << CAP_PERFMON) | (1 << CAP_NET_ADMIN)).is_ok());
    }

    #[test]
    fn missing_capabilities_are_named() {
        let msg = check(0).unwrap_err();
        assert!(msg.contains("lacks CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN"), "{msg}");
        let msg = check((1 << CAP_BPF) | (1 << CAP_NET_ADMIN)).unwrap_err();
        assert!(msg.ends_with("lacks CAP_PERFMON"), "{msg}");
    }

    #[test]
    fn kept_capabilities_are_named() {
        assert_eq!(names(0), "");
        assert_eq!(names(1 << CAP_BPF), "CAP_BPF");
        assert_eq!(names((1 << CAP_SYS_ADMIN) | (1 << CAP_BPF)), "CAP_SYS_ADMIN, CAP_BPF");
    }

    /// Dropping in a thread of its own leaves the other threads alone
    /// (capabilities are per thread) and takes everything, ambient and
    /// inheritable included; threads it starts inherit the empty sets.
    #[test]
    fn a_thread_drops_its_own_sets_and_its_children_inherit_them() {
        std::thread::spawn(|| {
            drop_thread(0).unwrap();
            assert_eq!(current().unwrap(), Caps { effective: 0, permitted: 0, inheritable: 0 });
            assert_eq!(prctl(libc::PR_GET_NO_NEW_PRIVS, 0).unwrap(), 1);
            let child = std::thread::spawn(|| (current().unwrap(), prctl(libc::PR_GET_NO_NEW_PRIVS, 0).unwrap()));
            assert_eq!(child.join().unwrap(), (Caps { effective: 0, permitted: 0, inheritable: 0 }, 1));
        })
        .join()
        .unwrap();
    }
}
