//! TCP state changes: session birth and close; socket destruction, which
//! ends a session whose close the state hook missed.
use aya_ebpf::{
    macros::{btf_tracepoint, fentry, kprobe},
    programs::{BtfTracePointContext, FEntryContext, ProbeContext},
};

use crate::{
    kernel::{Btf, Mem, Probe, offset},
    session::{on_destroy, on_state_change},
};

/// tp_btf `sock:inet_sock_set_state`:
/// `TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)`.
/// Fires for every TCP socket state change, including `inet_sk_set_state` on a
/// child socket created by the handshake (LISTEN -> SYN_RECV), which the
/// `tcp_set_state` hooks below never see. It also fires for other protocols
/// that use `inet_sk_set_state` (DCCP, SCTP), which `on_state_change` skips
/// (`Btf::tcp`).
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn obs_state_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    on_state_change::<Btf, true>(sk, old, new);
    0
}

/// tp_btf `tcp:tcp_destroy_sock`: `TP_PROTO(struct sock *sk)`, the first thing
/// `tcp_v4_destroy_sock` does (IPv6 sockets too), once per full TCP socket.
/// Runs with the tracepoint hook above as its backstop: a separate program has
/// its own recursion guard, so it runs where `obs_state_btf` was skipped.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn obs_destroy_btf(ctx: BtfTracePointContext) -> i32 {
    on_destroy::<Btf>(ctx.arg(0));
    0
}

/// fentry `tcp_v4_destroy_sock`: `void tcp_v4_destroy_sock(struct sock *sk)`
/// (`tcp_v6_destroy_sock` calls it), the fentry tier's backstop as above.
#[fentry(function = "tcp_v4_destroy_sock")]
pub fn obs_destroy_fe(ctx: FEntryContext) -> i32 {
    on_destroy::<Btf>(ctx.arg(0));
    0
}

/// fentry `tcp_set_state`: `void tcp_set_state(struct sock *sk, int state)`.
/// At entry `sk_state` still holds the old state.
#[fentry(function = "tcp_set_state")]
pub fn obs_state_fe(ctx: FEntryContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let new: i32 = ctx.arg(1);
    state_from_sock::<Btf>(sk, new);
    0
}

/// kprobe `tcp_set_state`: same prototype as the fentry hook above.
#[kprobe]
pub fn obs_state_kp(ctx: ProbeContext) -> u32 {
    let (Some(sk), Some(new)) = (ctx.arg::<*const u8>(0), ctx.arg::<i32>(1)) else {
        return 0;
    };
    state_from_sock::<Probe>(sk, new);
    0
}

#[inline(always)]
fn state_from_sock<M: Mem>(sk: *const u8, new: i32) {
    let Some(old) = M::read::<u8>(sk, offset!(skc_state)) else {
        return;
    };
    // `tcp_set_state` is not called for a child socket's birth.
    on_state_change::<M, false>(sk, old as i32, new);
}
