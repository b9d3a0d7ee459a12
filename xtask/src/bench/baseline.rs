//! Reference points for the per-call hooks' cost: tiny tp_btf programs attached to
//! the same tracepoints and timed by the same kernel BPF statistics, each doing one
//! of the things a hook does per call. The empty one (`r0 = 0; exit`) costs what any
//! tp_btf program costs here before doing anything: the trampoline into the program
//! and the two clock reads of the statistics themselves, which a VM may make
//! expensive. The others add one helper call each: a clock read, one
//! `bpf_probe_read_kernel` of 8 bytes, one hash-map lookup keyed by the socket.
//!
//! Loaded with bpf(2) directly (`refprog`, shared with the end-to-end tests, whose
//! tests/tests/call_cost.rs puts empty programs beside every tier's per-call hooks).

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};

use anyhow::{Context, Result};

use super::progs::{ProgStats, parse_fdinfo};

/// Shared with the tests, which use all of it; the benchmark attaches to tp_btf only.
#[allow(dead_code)]
#[path = "../../../tests/src/refprog.rs"]
pub(super) mod refprog;

use refprog::{Attach, BPF_MAP_CREATE, EXIT, MOV_R0_0, bpf, call, insn};

const BPF_MAP_TYPE_HASH: u32 = 1;
/// Helper ids (include/uapi/linux/bpf.h).
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_KTIME_GET_NS: i32 = 5;
const HELPER_PROBE_READ_KERNEL: i32 = 113;
/// The observer's table of open sessions: 8-byte key, 120-byte value (observer-common's
/// SessionStart), preallocated.
const LOOKUP_MAP: (u32, u32, u32) = (8, 120, 65_536);

/// `r3 = *(u64 *)(r1 + 0)`: the tracepoint's first argument, the socket.
const LOAD_SK_R3: u64 = insn(0x79, 3, 1, 0, 0);

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
            Reference::Empty => refprog::EMPTY.to_vec(),
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

/// A reference program attached to a tracepoint while it lives.
pub struct RefProg {
    prog: refprog::RefProg,
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
        let prog = refprog::RefProg::attach(name, &program, Attach::TpBtf(tracepoint))
            .with_context(|| format!("the {} reference program", which.describe().0))?;
        Ok(RefProg { prog, _map: map })
    }

    /// Its run count and run time so far.
    pub fn stats(&self) -> Result<ProgStats> {
        let path = format!("/proc/self/fdinfo/{}", self.prog.fd().as_raw_fd());
        let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let info = parse_fdinfo(&text).with_context(|| format!("{path} is not a program's"))?;
        Ok(ProgStats {
            name: self.prog.name().to_owned(),
            run_time_ns: info.run_time_ns,
            run_cnt: info.run_cnt,
            recursion_misses: info.recursion_misses,
            xlated_insns: Some(self.prog.insns()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_attr_layout_matches_the_kernel() {
        assert_eq!(size_of::<MapCreateAttr>(), 64);
    }

    #[test]
    fn reference_programs_end_in_exit() {
        for r in REFERENCES {
            let p = r.program(3);
            assert_eq!(p[p.len() - 2..], [MOV_R0_0, EXIT], "{r:?}");
        }
        assert_eq!(Reference::Empty.program(3), refprog::EMPTY);
    }
}
