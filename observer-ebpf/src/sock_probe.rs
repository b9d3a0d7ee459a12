//! The socket probe: whether sockets at given kernel addresses still exist.
//! Run once, at a start that reuses pinned tables (observer's
//! `kernel/state.rs`), on entries whose socket may have closed while no
//! observer ran; attached only for that sweep.
use aya_ebpf::{helpers::bpf_get_current_pid_tgid, macros::raw_tracepoint, programs::RawTracePointContext};
use observer_common::SOCK_PROBE_SLOTS;

use crate::{
    kernel::{Mem, Probe, offset, ports},
    maps::SOCK_PROBE,
};

/// raw tracepoint `task:task_rename`: fires when a thread renames itself
/// (`prctl(PR_SET_NAME)`), which userspace does to run the probe. Every other
/// rename on the host, while attached, costs one array lookup.
#[raw_tracepoint(tracepoint = "task_rename")]
pub fn obs_sock_probe(_ctx: RawTracePointContext) -> i32 {
    let Some(probe) = SOCK_PROBE.get_ptr_mut(0) else { return 0 };
    // SAFETY: the value of a successful lookup (see `maps`, "Map values");
    // only the thread that armed it (checked below) writes it meanwhile.
    let probe = unsafe { &mut *probe };
    let tid = bpf_get_current_pid_tgid() as u32;
    if probe.tid == 0 || probe.tid != tid {
        return 0;
    }
    let count = probe.count as usize;
    for i in 0..SOCK_PROBE_SLOTS {
        if i >= count {
            break;
        }
        // Any address: a socket freed since may be anything now, and
        // `bpf_probe_read_kernel` fails instead of faulting.
        let sk = probe.sk[i] as *const u8;
        let family = Probe::read::<u16>(sk, offset!(skc_family));
        let state = Probe::read::<u8>(sk, offset!(skc_state));
        let flags = Probe::read::<u64>(sk, offset!(sk_flags));
        probe.family[i] = family.unwrap_or(0);
        probe.state[i] = state.unwrap_or(0);
        probe.dead[i] = u8::from(flags.unwrap_or(0) & (1u64 << (offset!(sock_dead_bit) & 63)) != 0);
        probe.read[i] = u8::from(family.is_some() && state.is_some() && flags.is_some());
        let (local, remote) = ports::<Probe>(sk);
        probe.ports[i] = u32::from(local) << 16 | u32::from(remote);
    }
    probe.tid = 0;
    0
}
