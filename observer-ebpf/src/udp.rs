//! UDP flows: per-call accounting of bytes by socket and peer, and release.
//!
//! A connected socket has one peer (its connected address); an unconnected
//! socket learns each datagram's peer from the cgroup sendmsg/recvmsg hook that
//! runs earlier in the same call (`PENDING_PEERS`).
use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns};
use observer_common::{LostSource, PendingKey, UDP_FLOW_CONNECTED, UdpFlow, UdpFlowKey, UdpRelease, tcp_state};

use crate::{
    kernel::{addresses, advance_active, netns_ino, offsets, read},
    maps::{PENDING_PEERS, UDP_FLOWS, UDP_RELEASES, UDP_SOCKETS, count_lost},
};

/// `bytes` moved on UDP socket `sk` (a send when `send`), in the caller's context.
#[inline(always)]
pub fn on_udp_call(sk: *const u8, bytes: u64, send: bool) {
    let off = offsets();
    let pid_tgid = bpf_get_current_pid_tgid();
    let pending_key = PendingKey { sk: sk as u64, pid_tgid };
    let state = read::<u8>(sk, off.skc_state).unwrap_or(0) as i32;
    let connected = state == tcp_state::ESTABLISHED;
    let (family, local, remote) = addresses(sk, &off);
    let mut key = UdpFlowKey { sk: sk as u64, peer_addr: remote, peer_port: 0, family, _pad0: 0 };
    if let Some(peer) = unsafe { PENDING_PEERS.get(&pending_key) }.copied() {
        let _ = PENDING_PEERS.remove(&pending_key);
        key.peer_addr = peer.addr;
        key.peer_port = peer.port;
        key.family = peer.family;
    } else if connected {
        key.peer_port = u16::from_be(read::<u16>(sk, off.skc_dport).unwrap_or(0));
    } else {
        // An unconnected socket whose peer no hook saw (no address given):
        // nothing to attribute the bytes to.
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(flow) = UDP_FLOWS.get_ptr_mut(&key) {
        let flow = unsafe { &mut *flow };
        advance_active(&mut flow.last_ns, &mut flow.active_ns, now);
        if send {
            flow.bytes_tx += bytes;
        } else {
            flow.bytes_rx += bytes;
        }
        return;
    }
    let flow = UdpFlow {
        first_ns: now,
        last_ns: now,
        active_ns: 0,
        bytes_tx: if send { bytes } else { 0 },
        bytes_rx: if send { 0 } else { bytes },
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid: (pid_tgid >> 32) as u32,
        flags: if connected { UDP_FLOW_CONNECTED } else { 0 },
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        netns_ino: netns_ino(sk, &off),
        local_port: u16::from_be(read::<u16>(sk, off.inet_sport).unwrap_or(0)),
        _pad0: 0,
        local_addr: local,
    };
    if UDP_FLOWS.insert(&key, &flow, 0).is_err() {
        count_lost(LostSource::UdpFlowTableFull);
        return;
    }
    let _ = UDP_SOCKETS.insert(&(sk as u64), &1, 0);
}

/// A socket is being released: if it had UDP flows, tell userspace to end them.
#[inline(always)]
pub fn on_release(sk: *const u8) {
    let key = sk as u64;
    if unsafe { UDP_SOCKETS.get(&key) }.is_none() {
        return;
    }
    let _ = UDP_SOCKETS.remove(&key);
    let event = UdpRelease { sk: key, release_ns: unsafe { bpf_ktime_get_ns() } };
    if UDP_RELEASES.output::<UdpRelease>(&event, 0).is_err() {
        count_lost(LostSource::UdpReleaseRingFull);
    }
}
