//! Per-program kernel statistics of the observer's eBPF programs.
//!
//! With kernel.bpf_stats_enabled=1 the kernel counts, per program, how often it ran and
//! for how long. /proc/PID/fdinfo/FD of the observer's program fds shows both, for its
//! programs only (not those of another observer running beside it), without bpftool.
//!
//! fdinfo has no name. bpf(2) gives it by program id, cut to 15 bytes; the JIT's symbol
//! in /proc/kallsyms, `bpf_prog_<tag>_<name>`, has it whole but is keyed by tag, which
//! programs with identical code share (the observer's send and receive hooks do).
//! The bpf(2) name decides; kallsyms only completes a cut one.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, Result};

/// The fields of a program fd's fdinfo that the benchmark uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgFdInfo {
    pub prog_id: u32,
    pub tag: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    /// Runs the kernel skipped because the program was already running on that CPU
    /// (a tracepoint hit again from an interrupt while the program ran); 0 where the
    /// kernel does not count them (before 5.12).
    pub recursion_misses: u64,
}

/// One program's counters, named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgStats {
    pub name: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub recursion_misses: u64,
    /// Its size after the verifier's rewriting (bpf_prog_info's xlated_prog_len / 8),
    /// when bpf(2) told: a measure of the work it can do per run.
    pub xlated_insns: Option<u32>,
}

impl ProgStats {
    /// Mean run time in nanoseconds; None if it never ran.
    pub fn ns_per_run(&self) -> Option<f64> {
        (self.run_cnt > 0).then(|| self.run_time_ns as f64 / self.run_cnt as f64)
    }
}

/// Parses /proc/PID/fdinfo/FD of a bpf-prog fd; None for any other kind of fd.
pub fn parse_fdinfo(text: &str) -> Option<ProgFdInfo> {
    let mut fields: HashMap<&str, &str> = HashMap::new();
    for line in text.lines() {
        if let Some((key, value)) = line.split_once(':') {
            fields.insert(key.trim(), value.trim());
        }
    }
    Some(ProgFdInfo {
        prog_id: fields.get("prog_id")?.parse().ok()?,
        tag: fields.get("prog_tag")?.to_ascii_lowercase(),
        run_time_ns: fields.get("run_time_ns")?.parse().ok()?,
        run_cnt: fields.get("run_cnt")?.parse().ok()?,
        recursion_misses: fields.get("recursion_misses").and_then(|v| v.parse().ok()).unwrap_or(0),
    })
}

/// Program names by tag, from /proc/kallsyms lines such as
/// `ffffffffc0001234 t bpf_prog_6deef7357e7b4530_obs_state_btf\t[bpf]`.
pub fn parse_kallsyms(text: &str) -> HashMap<String, Vec<String>> {
    let mut names: HashMap<String, Vec<String>> = HashMap::new();
    for line in text.lines() {
        let Some(sym) = line.split_whitespace().nth(2) else {
            continue;
        };
        let Some(rest) = sym.strip_prefix("bpf_prog_") else {
            continue;
        };
        let Some((tag, name)) = rest.split_once('_') else {
            continue;
        };
        if tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()) && !name.is_empty() {
            let list = names.entry(tag.to_ascii_lowercase()).or_default();
            if !list.iter().any(|n| n == name) {
                list.push(name.to_owned());
            }
        }
    }
    names
}

/// A program's name from its bpf(2) name (None if unreadable) and the kallsyms names
/// of its tag.
pub fn resolve_name(short: Option<&str>, by_tag: &[String], prog_id: u32) -> String {
    match short.filter(|s| !s.is_empty()) {
        Some(short) => {
            let mut longer = by_tag.iter().filter(|n| n.starts_with(short));
            match (longer.next(), longer.next()) {
                (Some(full), None) => full.clone(),
                _ => short.to_owned(),
            }
        }
        None => match by_tag {
            [only] => only.clone(),
            _ => format!("prog {prog_id}"),
        },
    }
}

/// Keeps the programs named `prefix*` (`obs_` for the observer's; and unnamed
/// ones: they belong to the process read, so they are ours), in name order.
pub fn select(named: Vec<(String, ProgFdInfo, Option<u32>)>, prefix: &str) -> Vec<ProgStats> {
    let mut out: Vec<ProgStats> = named
        .into_iter()
        .filter(|(name, _, _)| name.starts_with(prefix) || name.starts_with("prog "))
        .map(|(name, info, xlated_insns)| ProgStats {
            name,
            run_time_ns: info.run_time_ns,
            run_cnt: info.run_cnt,
            recursion_misses: info.recursion_misses,
            xlated_insns,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Adds `more` into `totals`, by name.
pub fn accumulate(totals: &mut Vec<ProgStats>, more: &[ProgStats]) {
    for p in more {
        match totals.iter_mut().find(|t| t.name == p.name) {
            Some(t) => {
                t.run_time_ns += p.run_time_ns;
                t.run_cnt += p.run_cnt;
                t.recursion_misses += p.recursion_misses;
            }
            None => totals.push(p.clone()),
        }
    }
    totals.sort_by(|a, b| a.name.cmp(&b.name));
}

/// The `obs_*` programs held open by process `pid`, with their counters now.
pub fn read_for_pid(pid: u32) -> Result<Vec<ProgStats>> {
    read_for_pid_named(pid, "obs_")
}

/// The programs named `prefix*` held open by process `pid`, with their counters now.
pub fn read_for_pid_named(pid: u32, prefix: &str) -> Result<Vec<ProgStats>> {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let fd_dir = proc_dir.join("fd");
    let mut infos = Vec::new();
    // A program fd can close between listing and reading; such entries are skipped.
    for entry in fs::read_dir(&fd_dir).with_context(|| format!("listing {}", fd_dir.display()))? {
        let Ok(entry) = entry else { continue };
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        if target.as_os_str() != "anon_inode:bpf-prog" {
            continue;
        }
        let Ok(text) = fs::read_to_string(proc_dir.join("fdinfo").join(entry.file_name())) else {
            continue;
        };
        if let Some(info) = parse_fdinfo(&text) {
            // One program can be open on several fds.
            if !infos.iter().any(|i: &ProgFdInfo| i.prog_id == info.prog_id) {
                infos.push(info);
            }
        }
    }
    let kallsyms = parse_kallsyms(&fs::read_to_string("/proc/kallsyms").unwrap_or_default());
    let named = infos
        .into_iter()
        .map(|info| {
            let bpf_info = bpf_prog_info(info.prog_id).ok();
            let short = bpf_info.as_ref().map(|(name, _)| name.as_str());
            let by_tag = kallsyms.get(&info.tag).map_or(&[][..], Vec::as_slice);
            let insns = bpf_info.as_ref().map(|(_, insns)| *insns);
            (resolve_name(short, by_tag, info.prog_id), info, insns)
        })
        .collect();
    Ok(select(named, prefix))
}

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `name` is bytes 64..80 of struct bpf_prog_info, `xlated_prog_len` bytes 20..24;
/// the kernel fills only the prefix asked for.
const INFO_NAME: std::ops::Range<usize> = 64..80;
const INFO_XLATED_LEN: std::ops::Range<usize> = 20..24;

/// The `prog_id` member of union bpf_attr for BPF_PROG_GET_FD_BY_ID.
#[repr(C)]
struct GetFdByIdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The `info` member of union bpf_attr for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct GetInfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// A program's name as bpf(2) reports it (at most 15 bytes), and its instructions
/// after verification.
fn bpf_prog_info(prog_id: u32) -> io::Result<(String, u32)> {
    let attr = GetFdByIdAttr { prog_id, next_id: 0, open_flags: 0 };
    // SAFETY: attr is a valid, fully initialised prefix of union bpf_attr for this
    // command, and the size passed is its size.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_PROG_GET_FD_BY_ID, &attr as *const GetFdByIdAttr, size_of::<GetFdByIdAttr>())
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new fd to us; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let mut info = [0u8; INFO_NAME.end];
    let attr =
        GetInfoAttr { bpf_fd: fd.as_raw_fd() as u32, info_len: info.len() as u32, info: info.as_mut_ptr() as u64 };
    // SAFETY: attr is a valid prefix of union bpf_attr; the kernel writes at most
    // info_len bytes into `info`, which outlives the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &attr as *const GetInfoAttr, size_of::<GetInfoAttr>())
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let xlated_len = u32::from_ne_bytes(info[INFO_XLATED_LEN].try_into().expect("4 bytes"));
    Ok((name_from_info(&info), xlated_len / 8))
}

/// The NUL-terminated name in a bpf_prog_info prefix.
fn name_from_info(info: &[u8]) -> String {
    let raw = info.get(INFO_NAME).unwrap_or_default();
    let len = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..len]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FDINFO: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2085\n\
        prog_type:\t26\nprog_jited:\t1\nprog_tag:\t6DEEF7357E7B4530\nmemlock:\t4096\n\
        prog_id:\t40\nrun_time_ns:\t123456\nrun_cnt:\t789\nrecursion_misses:\t0\n\
        verified_insns:\t57\n";

    #[test]
    fn parses_prog_fdinfo() {
        assert_eq!(
            parse_fdinfo(FDINFO),
            Some(ProgFdInfo {
                prog_id: 40,
                tag: "6deef7357e7b4530".into(),
                run_time_ns: 123456,
                run_cnt: 789,
                recursion_misses: 0,
            })
        );
    }

    #[test]
    fn other_fdinfo_is_not_a_program() {
        let map = "pos:\t0\nflags:\t02000002\nmap_type:\t1\nkey_size:\t4\nmap_id:\t7\n";
        assert_eq!(parse_fdinfo(map), None);
        assert_eq!(parse_fdinfo(""), None);
    }

    #[test]
    fn names_come_from_kallsyms() {
        let kallsyms = "ffffffff81000000 T _text\n\
            ffffffff812414b8 t bpf_prog_test_run_skb.cold\n\
            ffffffffc0001234 t bpf_prog_6deef7357e7b4530_obs_state_btf\t[bpf]\n\
            ffffffffc0005678 t bpf_prog_00112233445566aa_sd_devices\t[bpf]\n\
            ffffffffc0009999 t bpf_prog_0011\t[bpf]\n\
            0000000000000000 t bpf_prog_aabbccddeeff0011_obs_owner_send\t[bpf]\n\
            0000000000000000 t bpf_prog_aabbccddeeff0011_obs_owner_recv\t[bpf]\n\
            ffffffffc0001234 t bpf_prog_6deef7357e7b4530_obs_state_btf\t[bpf]\n";
        let names = parse_kallsyms(kallsyms);
        assert_eq!(names.len(), 3);
        assert_eq!(names["6deef7357e7b4530"], ["obs_state_btf"]);
        assert_eq!(names["aabbccddeeff0011"], ["obs_owner_send", "obs_owner_recv"]);
    }

    #[test]
    fn bpf_name_decides_and_kallsyms_completes_it() {
        let shared = ["obs_owner_send".to_owned(), "obs_owner_recv".to_owned()];
        assert_eq!(resolve_name(Some("obs_owner_recv"), &shared, 7), "obs_owner_recv");
        let long = ["obs_a_rather_long_name".to_owned()];
        assert_eq!(resolve_name(Some("obs_a_rather_lo"), &long, 7), "obs_a_rather_long_name");
        assert_eq!(resolve_name(Some("obs_x"), &[], 7), "obs_x");
        assert_eq!(resolve_name(None, &long, 7), "obs_a_rather_long_name");
        assert_eq!(resolve_name(None, &shared, 7), "prog 7");
        assert_eq!(resolve_name(Some(""), &[], 7), "prog 7");
    }

    #[test]
    fn name_from_prog_info_prefix() {
        let mut info = [0u8; 80];
        info[64..72].copy_from_slice(b"obs_fake");
        assert_eq!(name_from_info(&info), "obs_fake");
        info[64..80].copy_from_slice(b"obs_owner_fexit_");
        assert_eq!(name_from_info(&info), "obs_owner_fexit_");
        assert_eq!(name_from_info(&[0u8; 10]), "");
    }

    #[test]
    fn selects_observer_programs() {
        let info = |prog_id, run_time_ns, run_cnt| ProgFdInfo {
            prog_id,
            tag: String::new(),
            run_time_ns,
            run_cnt,
            recursion_misses: 0,
        };
        let got = select(
            vec![
                ("obs_owner_send".into(), info(2, 10, 1), None),
                ("obs_state_fe".into(), info(1, 500, 5), None),
                ("other".into(), info(3, 7, 7), None),
                ("prog 4".into(), info(4, 0, 0), None),
            ],
            "obs_",
        );
        let got: Vec<(&str, u64, u64)> = got.iter().map(|p| (p.name.as_str(), p.run_cnt, p.run_time_ns)).collect();
        assert_eq!(got, [("obs_owner_send", 1, 10), ("obs_state_fe", 5, 500), ("prog 4", 0, 0)]);
    }

    #[test]
    fn accumulates_by_name() {
        let p = |name: &str, t, c| ProgStats {
            name: name.into(),
            run_time_ns: t,
            run_cnt: c,
            recursion_misses: 0,
            xlated_insns: None,
        };
        let mut totals = Vec::new();
        accumulate(&mut totals, &[p("obs_b", 10, 1), p("obs_a", 20, 2)]);
        accumulate(&mut totals, &[p("obs_a", 5, 1), p("obs_c", 1, 1)]);
        assert_eq!(totals, [p("obs_a", 25, 3), p("obs_b", 10, 1), p("obs_c", 1, 1)]);
    }

    /// Loads `r0 = 0; exit` as a socket filter named `name`; None without privileges.
    fn load_trivial_prog(name: &str) -> Option<OwnedFd> {
        use crate::bench::baseline::refprog::{BPF_PROG_LOAD, ProgLoadAttr, bpf};
        const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
        // mov64 r0, 0 (opcode 0xb7); exit (0x95).
        let insns: [u64; 2] = [0xb7, 0x95];
        let license = c"GPL";
        let mut prog_name = [0u8; 16];
        prog_name[..name.len()].copy_from_slice(name.as_bytes());
        let attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name,
            ..ProgLoadAttr::default()
        };
        bpf(BPF_PROG_LOAD, &attr).ok()
    }

    #[test]
    fn reads_programs_held_by_a_process() {
        let Some(_prog) = load_trivial_prog("obs_xtask_test") else {
            eprintln!("skipped: loading an eBPF program needs root or CAP_BPF");
            return;
        };
        let progs = read_for_pid(std::process::id()).unwrap();
        assert!(progs.iter().any(|p| p.name == "obs_xtask_test" && p.run_cnt == 0), "{progs:?}");
    }
}
