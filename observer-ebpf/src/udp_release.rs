//! Socket release, which ends a UDP socket's flows. One program per tier.
use aya_ebpf::{
    macros::{cgroup_sock, fentry, kprobe},
    programs::{FEntryContext, ProbeContext, SockContext},
};

use crate::{
    kernel::{Btf, Mem, Probe, offset},
    udp::on_release,
};

/// cgroup `sock_release` on the root cgroup (cgroup v2, 5.9+): runs in
/// `inet_release` for every inet socket; its context is the socket itself.
#[cgroup_sock(sock_release)]
pub fn obs_release_cg(ctx: SockContext) -> i32 {
    on_release(ctx.sock as *const u8);
    1
}

/// fentry `inet_release`: `int inet_release(struct socket *sock)`; also reached
/// from `inet6_release`.
#[fentry(function = "inet_release")]
pub fn obs_release_fe(ctx: FEntryContext) -> i32 {
    let sock: *const u8 = ctx.arg(0);
    if let Some(sk) = Btf::deref(sock, offset!(socket_sk)) {
        on_release(sk);
    }
    0
}

/// kprobe `inet_release`: same function as above.
#[kprobe]
pub fn obs_release_kp(ctx: ProbeContext) -> u32 {
    if let Some(sock) = ctx.arg::<*const u8>(0)
        && let Some(sk) = Probe::deref(sock, offset!(socket_sk))
    {
        on_release(sk);
    }
    0
}
