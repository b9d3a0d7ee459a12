//! Owner capture for sessions the kernel created on its own (the passive side:
//! the child socket is born in softirq, where the current task is whoever was
//! interrupted). These hooks run in the owning process's context. The
//! tracepoint tier captures owners at each send and receive (`sock_calls`).
use aya_ebpf::{
    macros::{fexit, kretprobe},
    programs::{FExitContext, RetProbeContext},
};

use crate::session::claim_owner;

/// Index of `inet_csk_accept`'s return value among fexit's arguments: the number
/// of parameters, which changed in 6.10 (`(sk, arg)` instead of
/// `(sk, flags, err, kern)`). Written by the loader from the running kernel's BTF.
#[unsafe(no_mangle)]
static ACCEPT_RET_ARG: u32 = 0;

/// fexit `inet_csk_accept`: `struct sock *inet_csk_accept(struct sock *sk, ...)`,
/// returns the accepted child socket, in the accepting process.
#[fexit(function = "inet_csk_accept")]
pub fn obs_owner_fexit(ctx: FExitContext) -> i32 {
    let n = unsafe { core::ptr::read_volatile(&ACCEPT_RET_ARG) } as usize;
    // The verifier wants a bounded index; 4 parameters is the most any kernel had.
    let sk: *const u8 = match n {
        2 => ctx.arg(2),
        3 => ctx.arg(3),
        4 => ctx.arg(4),
        _ => return 0,
    };
    if !sk.is_null() {
        claim_owner(sk);
    }
    0
}

/// kretprobe `inet_csk_accept`: same function as above.
#[kretprobe]
pub fn obs_owner_kret(ctx: RetProbeContext) -> u32 {
    let sk: *const u8 = ctx.ret();
    if !sk.is_null() {
        claim_owner(sk);
    }
    0
}
