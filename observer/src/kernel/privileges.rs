//! Whether this process may load and attach BPF programs.
use std::fs;

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capabilities observer needs, for messages.
pub const NEEDED: &str = "CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN on kernels before 5.8), plus CAP_NET_ADMIN";

/// Effective capability set of this process, from /proc/self/status.
pub fn effective_caps() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t0\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name: x\n"), None);
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
}
