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
// SAFETY: the only symbol named `ACCEPT_RET_ARG`, which the loader writes by name.
#[unsafe(no_mangle)]
static ACCEPT_RET_ARG: u32 = 0;

/// fexit `inet_csk_accept`: `struct sock *inet_csk_accept(struct sock *sk, ...)`,
/// returns the accepted child socket, in the accepting process.
#[fexit(function = "inet_csk_accept")]
pub fn obs_owner_fexit(ctx: FExitContext) -> i32 {
    // SAFETY: a reference to a static is a valid, aligned pointer to an
    // initialised u32; volatile so the loader's value is read, not the zero.
    let n = unsafe { core::ptr::read_volatile(&ACCEPT_RET_ARG) } as usize;
    // 4 parameters is the most any kernel had. One function per index: arms
    // that differ only in the index are merged by LLVM into one load at a
    // computed offset, which the verifier refuses ("dereference of modified
    // ctx ptr", seen on 6.1 where the index is 4); a call's target is never
    // merged that way.
    let sk = match n {
        2 => ret_at_2(&ctx),
        3 => ret_at_3(&ctx),
        4 => ret_at_4(&ctx),
        _ => return 0,
    };
    if !sk.is_null() {
        claim_owner(sk);
    }
    0
}

#[inline(never)]
fn ret_at_2(ctx: &FExitContext) -> *const u8 {
    ctx.arg(2)
}

#[inline(never)]
fn ret_at_3(ctx: &FExitContext) -> *const u8 {
    ctx.arg(3)
}

#[inline(never)]
fn ret_at_4(ctx: &FExitContext) -> *const u8 {
    ctx.arg(4)
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
