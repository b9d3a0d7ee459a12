//! Send and receive calls of every socket (tracepoint tier, kernel 6.3+):
//! owner capture, active time and live bytes of TCP sessions, and UDP flow
//! accounting. One call per send or receive, never per packet.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use observer_common::{IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    kernel::{Btf, Mem, offset},
    session::on_tcp_call,
    udp::on_udp_call,
};

/// `MSG_PEEK`: the data stays queued and will be read again; not counted.
const MSG_PEEK: i32 = 2;

/// One call per send or receive of every socket on the host. A TCP socket is
/// typed as `struct tcp_sock` (`Btf::tcp`) for direct loads of its fields.
#[inline(always)]
fn on_call(ctx: &BtfTracePointContext, send: bool) {
    let sk: *const u8 = ctx.arg(0);
    let ret: i32 = ctx.arg(1);
    let flags: i32 = ctx.arg(2);
    if sk.is_null() {
        return;
    }
    match Btf::read::<u16>(sk, offset!(sk_protocol)) {
        Some(IPPROTO_TCP) => {
            if let Some(tp) = Btf::tcp(sk) {
                on_tcp_call::<Btf>(sk, tp);
            }
        }
        Some(IPPROTO_UDP) => on_udp_call::<Btf>(sk, ret, send, send || flags & MSG_PEEK == 0),
        _ => {}
    }
}

/// tp_btf `sock:sock_send_length`: `TP_PROTO(struct sock *sk, int ret, int flags)`,
/// at the end of `sock_sendmsg`; `ret` is the bytes sent or a negative errno.
#[btf_tracepoint(function = "sock_send_length")]
pub fn obs_send(ctx: BtfTracePointContext) -> i32 {
    on_call(&ctx, true);
    0
}

/// tp_btf `sock:sock_recv_length`: same prototype, at the end of `sock_recvmsg`.
#[btf_tracepoint(function = "sock_recv_length")]
pub fn obs_recv(ctx: BtfTracePointContext) -> i32 {
    on_call(&ctx, false);
    0
}
