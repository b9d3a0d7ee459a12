//! Peers of unconnected UDP sockets (every `sock_calls` tier): cgroup v2
//! sock_addr hooks on the root cgroup see the destination of each sendmsg and
//! the source of each recvmsg that asks for it, and leave it in `PENDING_PEERS`
//! for the send/receive hook that ends the same call (`sock_calls`: tracepoint,
//! fexit or kretprobe), which has the length. They never change the address and always allow the call.
#![expect(clippy::needless_borrows_for_generic_args, reason = "map keys and values by reference, as in session.rs")]
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
    let a: *const bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `a` is the program's context, the `bpf_sock_addr` the kernel
    // passes (never null); the verifier checks each field read and rewrites
    // it into a load from the kernel's own structure. Read one u32 at a time,
    // the only access width it accepts for these fields.
    if unsafe { core::ptr::read_volatile(&(*a).protocol) } != u32::from(IPPROTO_UDP) {
        return ALLOW;
    }
    // SAFETY: as above, fields of the context, one u32 each.
    let (addr, user_port, sk) = unsafe {
        let word = |i: usize| core::ptr::read_volatile(&(*a).user_ip6[i]);
        let addr: Addr = if family == AF_INET {
            [core::ptr::read_volatile(&(*a).user_ip4), 0, 0, 0]
        } else {
            [word(0), word(1), word(2), word(3)]
        };
        (addr, core::ptr::read_volatile(&(*a).user_port), core::ptr::read_volatile(&(*a).__bindgen_anon_1.sk) as u64)
    };
    // user_port holds the __be16 port in its first two bytes.
    let peer = PendingPeer { addr: addr_bytes(addr), port: u16::from_be(user_port as u16), family, _pad0: 0 };
    let key = PendingKey { sk, pid_tgid: bpf_get_current_pid_tgid() };
    if let Some(slot) = PENDING_SLOT.get_ptr_mut(0) {
        // SAFETY: this CPU's element of `PENDING_SLOT` from a successful
        // lookup (see `maps`, "Map values"); these hooks run in the calling
        // process, where no other program on this CPU writes it meanwhile.
        unsafe { *slot = PendingSlot { key, peer } };
    }
    // An LRU map makes room by evicting; an insert does not fail for space.
    let _ = PENDING_PEERS.insert(&key, &peer, 0);
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
