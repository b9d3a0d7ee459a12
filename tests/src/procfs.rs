//! What /proc says about the observer process under test: every thread's
//! capability sets, its resident memory.
use std::fs;

use anyhow::{Context, Result};

/// One thread's capability sets and no_new_privs, from
/// `/proc/<pid>/task/<tid>/status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadCaps {
    pub tid: u32,
    pub name: String,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
    pub bounding: u64,
    pub no_new_privs: bool,
}

/// Every thread of `pid`.
pub fn thread_caps(pid: u32) -> Result<Vec<ThreadCaps>> {
    let mut threads = Vec::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task")).context("listing the observer's threads")? {
        let entry = entry?;
        let Ok(status) = fs::read_to_string(entry.path().join("status")) else { continue };
        let field = |name: &str| {
            status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim).unwrap_or_default()
        };
        let mask = |name: &str| u64::from_str_radix(field(name), 16).with_context(|| format!("{name} in {status}"));
        threads.push(ThreadCaps {
            tid: entry.file_name().to_string_lossy().parse()?,
            name: field("Name").to_string(),
            effective: mask("CapEff")?,
            permitted: mask("CapPrm")?,
            inheritable: mask("CapInh")?,
            ambient: mask("CapAmb")?,
            bounding: mask("CapBnd")?,
            no_new_privs: field("NoNewPrivs") == "1",
        });
    }
    Ok(threads)
}

/// Resident memory of `pid`, in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("VmRSS")?;
    Ok(kib * 1024)
}

/// Sets the calling thread's comm (what the kernel records as a session
/// owner's name), at most 15 bytes: `prctl(PR_SET_NAME)`.
pub fn set_thread_comm(name: &str) -> Result<()> {
    let c = std::ffi::CString::new(name)?;
    anyhow::ensure!(name.len() <= 15, "comm {name:?} is longer than 15 bytes");
    // SAFETY: PR_SET_NAME reads a NUL-terminated string we own.
    if unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}
