//! Send and receive calls of every socket: owner capture, active time and live
//! bytes of TCP sessions, and UDP flow accounting. One call per send or
//! receive, never per packet. Three tiers, one per-call function (`on_call`):
//!
//! - tracepoint (6.3+): tp_btf `sock:sock_send_length`/`sock_recv_length`, at
//!   the end of `sock_sendmsg_nosec`/`sock_recvmsg_nosec`;
//! - fentry: fexit on `inet_sendmsg`, `inet6_sendmsg`, `inet_recvmsg` and
//!   `inet6_recvmsg`, the functions those two call through the socket's ops
//!   for every TCP and UDP socket: the same calls, the same return value;
//! - kprobe: a kprobe at entry of the same four functions leaves the socket
//!   (and the receive flags) in `CALLS` under the task, for the kretprobe of
//!   the same call, which has the return value but no arguments. A TCP
//!   receive is taken at `tcp_cleanup_rbuf` instead, which `tcp_recvmsg` calls
//!   once it has copied the data: no return probe needed (5.10 often does not
//!   run a receive's return probe once the call slept).
//!
//! Why these functions and what they miss: docs/kernels.md, "sock_calls".
#![expect(clippy::needless_borrows_for_generic_args, reason = "map keys and values by reference, as in session.rs")]
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_tracepoint, fexit, kprobe, kretprobe, map},
    maps::LruHashMap,
    programs::{BtfTracePointContext, FExitContext, ProbeContext, RetProbeContext},
};
use observer_common::{IPPROTO_TCP, IPPROTO_UDP, LostSource};

use crate::{
    kernel::{Btf, Mem, Probe, offset, skip_udp},
    maps::{BPF_NOEXIST, count_lost},
    session::on_tcp_call,
    udp::on_udp_call,
};

/// `MSG_PEEK`: the data stays queued and will be read again; not counted.
const MSG_PEEK: i32 = 2;

/// One call per send or receive of every socket on the host: `sk` returned
/// `ret` (bytes, or a negative errno); `flags` are a receive's. A TCP socket
/// is typed as `struct tcp_sock` (`M::tcp`) for direct loads of its fields.
#[inline(always)]
fn on_call<M: Mem>(sk: *const u8, ret: i32, send: bool, flags: i32) {
    if sk.is_null() {
        return;
    }
    match M::read::<u16>(sk, offset!(sk_protocol)) {
        Some(IPPROTO_TCP) => {
            if let Some(tp) = M::tcp(sk) {
                on_tcp_call::<M>(sk, tp);
            }
        }
        // UDP flows not measured (`--disable udp_release` or `sock_calls`).
        Some(IPPROTO_UDP) if !skip_udp() => on_udp_call::<M>(sk, ret, send, send || flags & MSG_PEEK == 0),
        _ => {}
    }
}

/// tp_btf `sock:sock_send_length`: `TP_PROTO(struct sock *sk, int ret, int flags)`,
/// at the end of `sock_sendmsg`; `ret` is the bytes sent or a negative errno.
#[btf_tracepoint(function = "sock_send_length")]
pub fn obs_send(ctx: BtfTracePointContext) -> i32 {
    on_call::<Btf>(ctx.arg(0), ctx.arg(1), true, ctx.arg(2));
    0
}

/// tp_btf `sock:sock_recv_length`: same prototype, at the end of `sock_recvmsg`.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn obs_recv(ctx: BtfTracePointContext) -> i32 {
    on_call::<Btf>(ctx.arg(0), ctx.arg(1), false, ctx.arg(2));
    0
}

/// `sock->sk` of a BTF-typed `struct socket *`, null if it has none.
#[inline(always)]
fn sock_of(sock: *const u8) -> *const u8 {
    Btf::deref(sock, offset!(socket_sk)).unwrap_or(core::ptr::null())
}

/// fexit of `int inet_sendmsg(struct socket *sock, struct msghdr *msg, size_t size)`
/// (and of `inet6_sendmsg`, same prototype): the return value follows the
/// three arguments.
#[inline(always)]
fn sendmsg_exit(ctx: &FExitContext) {
    on_call::<Btf>(sock_of(ctx.arg(0)), ctx.arg(3), true, 0);
}

/// fexit of `int inet_recvmsg(struct socket *sock, struct msghdr *msg, size_t size,
/// int flags)` (and of `inet6_recvmsg`).
#[inline(always)]
fn recvmsg_exit(ctx: &FExitContext) {
    on_call::<Btf>(sock_of(ctx.arg(0)), ctx.arg(4), false, ctx.arg(3));
}

/// fexit `inet_sendmsg`: every send on an IPv4 TCP or UDP socket.
#[fexit(function = "inet_sendmsg")]
pub fn obs_send_fx4(ctx: FExitContext) -> i32 {
    sendmsg_exit(&ctx);
    0
}

/// fexit `inet6_sendmsg`: every send on an IPv6 socket (v4-mapped included).
#[fexit(function = "inet6_sendmsg")]
pub fn obs_send_fx6(ctx: FExitContext) -> i32 {
    sendmsg_exit(&ctx);
    0
}

/// fexit `inet_recvmsg`.
#[fexit(function = "inet_recvmsg")]
pub fn obs_recv_fx4(ctx: FExitContext) -> i32 {
    recvmsg_exit(&ctx);
    0
}

/// fexit `inet6_recvmsg`.
#[fexit(function = "inet6_recvmsg")]
pub fn obs_recv_fx6(ctx: FExitContext) -> i32 {
    recvmsg_exit(&ctx);
    0
}

/// What the kprobe at a call's entry leaves for its kretprobe.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CallArgs {
    /// `sock->sk`.
    sk: u64,
    /// A receive's flags (the fourth argument); a send's fourth register
    /// holds nothing of ours and is never read.
    flags: i32,
    /// `sk->sk_protocol` at entry.
    protocol: u16,
    _pad0: u16,
}

/// The socket of each task's send or receive call in progress (kprobe tier),
/// keyed by `pid_tgid`. LRU: an entry whose kretprobe never ran (the kernel
/// was out of return-probe instances, see docs/kernels.md) is overwritten by
/// the task's next call or evicted, never left to fill the table. A task
/// blocked in a receive holds its entry meanwhile.
#[map(name = "CALLS")]
static CALLS: LruHashMap<u64, CallArgs> = LruHashMap::with_max_entries(16384, 0);

/// kprobe at entry of `inet_sendmsg`, `inet6_sendmsg`, `inet_recvmsg` and
/// `inet6_recvmsg` (one program, four attachments): first argument the
/// `struct socket`, a receive's fourth its flags.
#[kprobe]
pub fn obs_call_kp(ctx: ProbeContext) -> u32 {
    let Some(sk) = ctx.arg::<*const u8>(0).and_then(|sock| Probe::deref(sock, offset!(socket_sk))) else {
        return 0;
    };
    let protocol = Probe::read::<u16>(sk, offset!(sk_protocol)).unwrap_or(0);
    let args = CallArgs { sk: sk as u64, flags: ctx.arg::<i32>(3).unwrap_or(0), protocol, _pad0: 0 };
    let task = bpf_get_current_pid_tgid();
    // An entry of this task's still there: its previous call's return probe
    // never ran. A UDP call's bytes are lost with it: counted. A TCP call's
    // are not (TCP bytes come from the socket's counters, receives from
    // `obs_rbuf_kp`), so neither is it. Then overwritten. An LRU map makes
    // room by evicting; an insert does not fail for space.
    if CALLS.insert(&task, &args, BPF_NOEXIST).is_err() {
        // SAFETY: the value of a successful lookup, copied at once; only
        // this task writes its own key.
        if (unsafe { CALLS.get(&task) }).is_some_and(|stale| stale.protocol == IPPROTO_UDP) {
            count_lost(LostSource::SockCallReturnMissed);
        }
        let _ = CALLS.insert(&task, &args, 0);
    }
    0
}

/// The kretprobes' part: the call's arguments from its entry, taken out.
#[inline(always)]
fn call_return(ctx: &RetProbeContext, send: bool) {
    let key = bpf_get_current_pid_tgid();
    // SAFETY: the value of a successful lookup (see `maps`, "Map values"),
    // copied at once; only this task writes its own key.
    let Some(args) = (unsafe { CALLS.get(&key) }).copied() else {
        return;
    };
    let _ = CALLS.remove(&key);
    let sk = args.sk as *const u8;
    if !send && args.protocol == IPPROTO_TCP {
        // Seen at `tcp_cleanup_rbuf` (`obs_rbuf_kp`).
        return;
    }
    let ret: i32 = ctx.ret();
    on_call::<Probe>(sk, ret, send, args.flags);
}

/// kretprobe of `inet_sendmsg` and `inet6_sendmsg`.
#[kretprobe]
pub fn obs_send_kret(ctx: RetProbeContext) -> u32 {
    call_return(&ctx, true);
    0
}

/// kretprobe of `inet_recvmsg` and `inet6_recvmsg`: UDP receives.
#[kretprobe]
pub fn obs_recv_kret(ctx: RetProbeContext) -> u32 {
    call_return(&ctx, false);
    0
}

/// kprobe `tcp_cleanup_rbuf`: `void tcp_cleanup_rbuf(struct sock *sk, int copied)`,
/// at the end of every TCP receive (`tcp_recvmsg`, also `tcp_read_sock`), after
/// the data was copied: the socket's counters as the call leaves them.
#[kprobe]
pub fn obs_rbuf_kp(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<*const u8>(0) {
        on_call::<Probe>(sk, ctx.arg::<i32>(1).unwrap_or(0), false, 0);
    }
    0
}
