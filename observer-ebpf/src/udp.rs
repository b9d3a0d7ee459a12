//! UDP flows: per-call accounting of bytes by socket and peer, and release.
//!
//! A connected socket has one peer (its connected address); an unconnected
//! socket learns each datagram's peer from the cgroup sendmsg/recvmsg hook that
//! runs earlier in the same call (`PENDING_PEERS`).
#![expect(clippy::needless_borrows_for_generic_args, reason = "map keys and values by reference, as in session.rs")]
use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use observer_common::{
    LostSource, PendingKey, PendingPeer, UDP_FLOW_CONNECTED, UdpFlow, UdpFlowKey, UdpRelease, UdpSocketFlows, tcp_state,
};

use crate::{
    diag,
    kernel::{
        Mem, Probe, add_shared, addr_bytes, addresses, advance_active, current_cgroup_id, current_comm, netns_ino,
        now_ns, offset, zeroed,
    },
    maps::{
        BPF_NOEXIST, EEXIST, NoRoom, PENDING_PEERS, PENDING_SLOT, UDP_FLOWS, UDP_RELEASES, UDP_RELEASES_RING_BYTES,
        UDP_SOCKETS, clear_no_room, count_lost, mark_no_room, no_room, wake_flags,
    },
};

/// A send or receive call on UDP socket `sk` that returned `ret` (bytes, or a
/// negative errno), in the caller's context. `counted`: whether its bytes
/// count (not a peek). Every call takes the peer its cgroup hook left, so a
/// call that moved nothing cannot leave it to a later one.
#[inline(always)]
pub fn on_udp_call<M: Mem>(sk: *const u8, ret: i32, send: bool, counted: bool) {
    let state = M::read::<u8>(sk, offset!(skc_state)).unwrap_or(0) as i32;
    let connected = state == tcp_state::ESTABLISHED;
    let pending = take_pending(sk as u64, connected);
    if ret <= 0 || !counted {
        return;
    }
    let bytes = ret as u64;
    let (family, local, remote) = addresses::<M>(sk);
    let mut key = UdpFlowKey { sk: sk as u64, peer_addr: addr_bytes(remote), peer_port: 0, family, _pad0: 0 };
    if let Some(peer) = pending {
        key.peer_addr = peer.addr;
        key.peer_port = peer.port;
        key.family = peer.family;
    } else if connected {
        key.peer_port = u16::from_be(M::read::<u16>(sk, offset!(skc_dport)).unwrap_or(0));
    } else {
        // An unconnected socket whose peer no hook saw (a receive that did
        // not ask for the source address): nothing to attribute the bytes to.
        count_lost(LostSource::UdpPeerUnknown);
        return;
    }
    let now = now_ns();
    if let Some(flow) = UDP_FLOWS.get_ptr_mut(&key) {
        count_call(flow, bytes, send, now);
        return;
    }
    if no_room(key.sk, now) == NoRoom::Waiting {
        // This socket's last new flow found the table full a moment ago:
        // counted then, not again at each call.
        return;
    }
    let mut flow = UdpFlow {
        first_ns: now,
        last_ns: now,
        active_ns: 0,
        bytes_tx: if send { bytes } else { 0 },
        bytes_rx: if send { 0 } else { bytes },
        cgroup_id: current_cgroup_id(),
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        flags: if connected { UDP_FLOW_CONNECTED } else { 0 },
        comm: [0; 16],
        netns_ino: netns_ino::<M>(sk),
        // In `struct inet_sock`, beyond `struct sock`, where a direct load
        // from a `struct sock` pointer may not reach; read once per flow.
        local_port: u16::from_be(Probe::read::<u16>(sk, offset!(inet_sport)).unwrap_or(0)),
        _pad0: 0,
        local_addr: addr_bytes(local),
    };
    current_comm(&mut flow.comm);
    // Only where no entry is: a call of the same socket and peer on another
    // CPU may create the flow between the lookup above and here, and
    // overwriting its entry would lose that call's bytes.
    match UDP_FLOWS.insert(&key, &flow, BPF_NOEXIST) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {
            // The other CPU's flow won: this call's bytes go into it.
            if let Some(winner) = UDP_FLOWS.get_ptr_mut(&key) {
                count_call(winner, bytes, send, now);
            }
            return;
        }
        Err(_) => {
            // Once per socket (`NO_ROOM`): a datagram of a socket that found
            // no room is not counted again until its retry finds room.
            if mark_no_room(key.sk, now) {
                count_lost(LostSource::UdpFlowTableFull);
                if diag::on() {
                    diag::udp_flow_table_full(flow.local_port, key.peer_port);
                }
            }
            return;
        }
    }
    note_flow(&key, flow.local_port);
}

/// One call's bytes into an existing flow, which calls on other CPUs (threads
/// or processes sharing the socket) may be updating at the same moment: every
/// counter is advanced atomically.
#[inline(always)]
fn count_call(flow: *mut UdpFlow, bytes: u64, send: bool, now: u64) {
    // SAFETY: `flow` is the value of a successful lookup (see `maps`, "Map
    // values"), valid for this program run; `&raw mut` takes the fields'
    // addresses without a reference that would claim exclusive access.
    let (last, active, tx, rx) = unsafe {
        (&raw mut (*flow).last_ns, &raw mut (*flow).active_ns, &raw mut (*flow).bytes_tx, &raw mut (*flow).bytes_rx)
    };
    advance_active(last, active, now);
    add_shared(if send { tx } else { rx }, bytes);
}

/// Records a new flow of its socket in `UDP_SOCKETS`: the first flow's key, or
/// that there is more than one. Once per flow, not per call. Inserting only
/// where no entry is makes two first flows racing on two CPUs end as one
/// first and `many`, never as two firsts of which one is forgotten.
#[inline(always)]
fn note_flow(key: &UdpFlowKey, local_port: u16) {
    let first = UdpSocketFlows { first: *key, many: 0, _pad0: 0 };
    let Err(e) = UDP_SOCKETS.insert(&key.sk, &first, BPF_NOEXIST) else {
        return;
    };
    if e != -EEXIST {
        // Full: this socket's release will not be reported. Userspace ends
        // its flows at the idle timeout, finding the socket absent here.
        count_lost(LostSource::UdpSocketTableFull);
        if diag::on() {
            diag::udp_socket_table_full(local_port, key.peer_port);
        }
    } else if let Some(known) = UDP_SOCKETS.get_ptr_mut(&key.sk) {
        // SAFETY: the value of a successful lookup (see `maps`, "Map
        // values"); a racing writer only sets `many` too.
        let known = unsafe { &mut *known };
        // The same key again: its flow ended (idle) and came back.
        if !same_peer(&known.first, key) {
            known.many = 1;
        }
    }
}

/// Whether two flow keys of one socket name the same peer. Field by field, the
/// address as two words: `==` on the structs compiles to a call to BPF's
/// byte-at-a-time `memcmp`.
#[inline(always)]
fn same_peer(a: &UdpFlowKey, b: &UdpFlowKey) -> bool {
    let words = |k: &UdpFlowKey| {
        let p = k.peer_addr.as_ptr().cast::<u64>();
        // SAFETY: 16 bytes at an 8-byte-aligned offset (asserted below).
        unsafe { (p.read(), p.add(1).read()) }
    };
    a.peer_port == b.peer_port && a.family == b.family && words(a) == words(b)
}
const _: () =
    assert!(core::mem::offset_of!(UdpFlowKey, peer_addr) % 8 == 0 && core::mem::align_of::<UdpFlowKey>() == 8);

/// The peer this call's cgroup hook left, if it left one: this CPU's
/// `PENDING_SLOT`, else (the task moved to another CPU in between) the
/// `PENDING_PEERS` table, which only an unconnected socket needs: a connected
/// one has its own peer.
#[inline(always)]
fn take_pending(sk: u64, connected: bool) -> Option<PendingPeer> {
    // SAFETY: this CPU's element of `PENDING_SLOT` from a successful lookup
    // (see `maps`, "Map values"); only a cgroup hook of this task, earlier in
    // the same call, writes it otherwise.
    let slot = unsafe { &mut *PENDING_SLOT.get_ptr_mut(0)? };
    if slot.key.sk != sk && connected {
        // The common case (a connected socket, no address named): decided
        // without the helper call below.
        return None;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if slot.key.sk == sk && slot.key.pid_tgid == pid_tgid {
        slot.key.sk = 0;
        let _ = PENDING_PEERS.remove(&PendingKey { sk, pid_tgid });
        return Some(slot.peer);
    }
    if connected {
        return None;
    }
    let key = PendingKey { sk, pid_tgid };
    // SAFETY: the value of a successful lookup (see `maps`, "Map values"),
    // copied at once; if evicted meanwhile, the copy holds another peer.
    let peer = unsafe { PENDING_PEERS.get(&key) }.copied()?;
    let _ = PENDING_PEERS.remove(&key);
    Some(peer)
}

/// A socket is being released: if it had UDP flows, tell userspace to end
/// them. A socket with one flow (most: a connected client, a resolver's
/// one-query socket) has that flow taken out of `UDP_FLOWS` here and carried
/// in the event, which spares userspace a system call per ended flow.
#[inline(always)]
pub fn on_release(sk: *const u8) {
    let key = sk as u64;
    // A mark of a flow that found no room must not outlive its socket: the
    // next socket at this address would not count its own.
    clear_no_room(key);
    // SAFETY: the value of a successful lookup (see `maps`, "Map values"),
    // copied at once; its socket is being released, so no call changes it.
    let Some(flows) = (unsafe { UDP_SOCKETS.get(&key) }).copied() else {
        return;
    };
    let _ = UDP_SOCKETS.remove(&key);
    // Ring full: the flows stay in the table, and userspace ends them once
    // idle, finding the socket gone from `UDP_SOCKETS`.
    let Some(mut entry) = UDP_RELEASES.reserve::<UdpRelease>(0) else {
        count_lost(LostSource::UdpReleaseRingFull);
        return;
    };
    // SAFETY: all-zero bytes are a valid `UdpRelease` (plain integers and byte
    // arrays), `zeroed`'s one requirement; the slot is ours until submit.
    let release = unsafe { zeroed(&mut *entry) };
    release.sk = key;
    release.release_ns = now_ns();
    release.flows = flows;
    if flows.many == 0
        // SAFETY: the value of a successful lookup (see `maps`, "Map values"),
        // copied at once below; its socket is being released.
        && let Some(flow) = unsafe { UDP_FLOWS.get(&flows.first) }
    {
        release.flow = *flow;
        // Only the delete that succeeds reports the flow: the idle expiry
        // may take the same flow out at the same moment, in which case it
        // reports it and this copy is dropped. No call can change the flow
        // between the copy and the delete: its socket is being released.
        release.taken = u32::from(UDP_FLOWS.remove(&flows.first).is_ok());
    }
    entry.submit(wake_flags(&UDP_RELEASES, UDP_RELEASES_RING_BYTES));
}
