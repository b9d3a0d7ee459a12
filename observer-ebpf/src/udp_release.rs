//! Socket release, which ends a UDP socket's flows. One program per tier.
use aya_ebpf::{
    macros::{cgroup_sock, fentry, kprobe},
    programs::{FEntryContext, ProbeContext, SockContext},
};

use observer_common::IPPROTO_UDP;

use crate::{
    kernel::{Btf, Mem, Probe, offset},
    udp::on_release,
};

/// cgroup `sock_release` on the root cgroup (cgroup v2, 5.9+): runs in
/// `inet_release` for every inet socket; its context is the socket itself.
#[cgroup_sock(sock_release)]
pub fn obs_release_cg(ctx: SockContext) -> i32 {
    // SAFETY: `ctx.sock` is the program's context, the `bpf_sock` the kernel
    // passes (never null); the verifier checks the field read and rewrites it
    // into a load from the socket itself.
    let protocol = unsafe { core::ptr::read_volatile(&(*ctx.sock).protocol) };
    if protocol == u32::from(IPPROTO_UDP) {
        on_release(ctx.sock as *const u8);
    }
    1
}

/// fentry `inet_release`: `int inet_release(struct socket *sock)`; also reached
/// from `inet6_release`.
#[fentry(function = "inet_release")]
pub fn obs_release_fe(ctx: FEntryContext) -> i32 {
    let sock: *const u8 = ctx.arg(0);
    if let Some(sk) = Btf::deref(sock, offset!(socket_sk))
        && is_udp::<Btf>(sk)
    {
        on_release(sk);
    }
    0
}

/// kprobe `inet_release`: same function as above.
#[kprobe]
pub fn obs_release_kp(ctx: ProbeContext) -> u32 {
    if let Some(sock) = ctx.arg::<*const u8>(0)
        && let Some(sk) = Probe::deref(sock, offset!(socket_sk))
        && is_udp::<Probe>(sk)
    {
        on_release(sk);
    }
    0
}

/// Only UDP sockets can have flows: every other socket (TCP above all) skips
/// the `UDP_SOCKETS` lookup, a hash-table miss at every release.
#[inline(always)]
fn is_udp<M: Mem>(sk: *const u8) -> bool {
    M::read::<u16>(sk, offset!(sk_protocol)) == Some(IPPROTO_UDP)
}
