//! Peers of unconnected UDP sockets (tracepoint tier): cgroup v2 sock_addr
//! hooks on the root cgroup see the destination of each sendmsg and the source
//! of each recvmsg that asks for it, and leave it in `PENDING_PEERS` for the
//! send/receive tracepoint of the same call (`sock_calls`), which has the
//! length. They never change the address and always allow the call.
use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_current_pid_tgid, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use observer_common::{AF_INET, AF_INET6, IPPROTO_UDP, PendingKey, PendingPeer};

use crate::{
    kernel::{Addr, addr_bytes},
    maps::{PENDING_PEERS, PENDING_SLOT, PendingSlot},
};

/// Allow the call: these hooks only watch.
const ALLOW: i32 = 1;

#[inline(always)]
fn remember(ctx: &SockAddrContext, family: u16) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr; fields are read one u32
    // at a time, the only access width the verifier accepts for them.
    unsafe {
        let a: *const bpf_sock_addr = ctx.sock_addr;
        if core::ptr::read_volatile(&(*a).protocol) != u32::from(IPPROTO_UDP) {
            return ALLOW;
        }
        let word = |i: usize| core::ptr::read_volatile(&(*a).user_ip6[i]);
        let addr: Addr = if family == AF_INET {
            [core::ptr::read_volatile(&(*a).user_ip4), 0, 0, 0]
        } else {
            [word(0), word(1), word(2), word(3)]
        };
        let mut peer = PendingPeer { addr: addr_bytes(addr), port: 0, family, _pad0: 0 };
        // user_port holds the __be16 port in its first two bytes.
        peer.port = u16::from_be(core::ptr::read_volatile(&(*a).user_port) as u16);
        let sk = core::ptr::read_volatile(&(*a).__bindgen_anon_1.sk) as u64;
        let key = PendingKey { sk, pid_tgid: bpf_get_current_pid_tgid() };
        if let Some(slot) = PENDING_SLOT.get_ptr_mut(0) {
            *slot = PendingSlot { key, peer };
        }
        // An LRU map makes room by evicting; an insert does not fail for space.
        let _ = PENDING_PEERS.insert(&key, &peer, 0);
    }
    ALLOW
}

/// cgroup `sendmsg4`: runs in `udp_sendmsg` for a send with a destination.
#[cgroup_sock_addr(sendmsg4)]
pub fn obs_sendmsg4(ctx: SockAddrContext) -> i32 {
    remember(&ctx, AF_INET)
}

/// cgroup `sendmsg6`: the same in `udpv6_sendmsg`.
#[cgroup_sock_addr(sendmsg6)]
pub fn obs_sendmsg6(ctx: SockAddrContext) -> i32 {
    remember(&ctx, AF_INET6)
}

/// cgroup `recvmsg4`: runs in `udp_recvmsg` when the caller asks for the
/// source address; the address fields hold that source.
#[cgroup_sock_addr(recvmsg4)]
pub fn obs_recvmsg4(ctx: SockAddrContext) -> i32 {
    remember(&ctx, AF_INET)
}

/// cgroup `recvmsg6`: the same in `udpv6_recvmsg`.
#[cgroup_sock_addr(recvmsg6)]
pub fn obs_recvmsg6(ctx: SockAddrContext) -> i32 {
    remember(&ctx, AF_INET6)
}
