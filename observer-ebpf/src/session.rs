//! TCP session life cycle, shared by every hook tier: birth on the first state
//! change, owner capture in process context, one record at TCP_CLOSE.
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
};
use observer_common::{
    AF_INET, AF_INET6, LostSource, SESSION_ACTIVE_OPEN, SESSION_ADOPTED, SESSION_FIN_ACKED,
    SESSION_FIN_RECEIVED, SESSION_FIN_SENT, SESSION_OWNER_KNOWN, SessionRecord, SessionStart,
    tcp_state,
};

use crate::{
    kernel::{deref, offsets, read},
    maps::{OPEN_SESSIONS, SESSIONS, count_lost},
};

/// A TCP socket moved from `old` to `new`. Only the SYN_SENT transition is known
/// to run in the owning process (connect); other transitions may run in softirq,
/// where the current task is whoever was interrupted, so they record no owner.
#[inline(always)]
pub fn on_state_change(sk: *const u8, old: i32, new: i32) {
    let key = sk as u64;
    if new == tcp_state::CLOSE {
        on_close(sk, key, old);
        return;
    }
    if new == tcp_state::LISTEN {
        // A listener is not a session; its children are.
        return;
    }
    if let Some(start) = OPEN_SESSIONS.get_ptr_mut(&key) {
        // Only tcp_close_state() enters these two states, and always with a FIN.
        if new == tcp_state::FIN_WAIT1 || new == tcp_state::LAST_ACK {
            unsafe { (*start).flags |= SESSION_FIN_SENT };
        }
        return;
    }
    // A session is born when it leaves CLOSE/LISTEN or its handshake states.
    // Any other first sight is a connection that predates the observer.
    let born_here = matches!(
        old,
        tcp_state::CLOSE | tcp_state::LISTEN | tcp_state::SYN_SENT | tcp_state::SYN_RECV
    );
    let mut start = SessionStart {
        birth_ns: unsafe { bpf_ktime_get_ns() },
        cgroup_id: 0,
        pid: 0,
        flags: if born_here { 0 } else { SESSION_ADOPTED },
        comm: [0; 16],
    };
    if new == tcp_state::SYN_SENT {
        // connect(): the caller is the owner.
        fill_owner(&mut start);
        start.flags |= SESSION_ACTIVE_OPEN;
    }
    if new == tcp_state::FIN_WAIT1 || new == tcp_state::LAST_ACK {
        start.flags |= SESSION_FIN_SENT;
    }
    if OPEN_SESSIONS.insert(&key, &start, 0).is_err() {
        count_lost(LostSource::SessionTableFull);
    }
}

/// Records the current task as the owner of an open session that has none yet.
/// Called only from hooks that run in process context (accept, send, receive).
#[inline(always)]
pub fn claim_owner(sk: *const u8) {
    let key = sk as u64;
    if let Some(start) = OPEN_SESSIONS.get_ptr_mut(&key) {
        let start = unsafe { &mut *start };
        if start.flags & SESSION_OWNER_KNOWN == 0 {
            fill_owner(start);
        }
    }
}

#[inline(always)]
fn fill_owner(start: &mut SessionStart) {
    start.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    start.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    start.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    start.flags |= SESSION_OWNER_KNOWN;
}

#[inline(always)]
fn on_close(sk: *const u8, key: u64, old: i32) {
    let start = unsafe { OPEN_SESSIONS.get(&key) }.copied();
    if start.is_some() {
        let _ = OPEN_SESSIONS.remove(&key);
    } else if old == tcp_state::LISTEN || old == tcp_state::CLOSE {
        // A listener or a socket that never connected: not a session.
        return;
    }
    let Some(mut entry) = SESSIONS.reserve::<SessionRecord>(0) else {
        count_lost(LostSource::SessionRingFull);
        return;
    };
    let record = entry.as_mut_ptr();
    // SAFETY: `record` points at a reserved, exclusively owned ring-buffer slot
    // of the right size; every field is written before submit.
    unsafe { fill_record(&mut *record, sk, start) };
    entry.submit(0);
}

#[inline(always)]
unsafe fn fill_record(r: &mut SessionRecord, sk: *const u8, start: Option<SessionStart>) {
    let off = offsets();
    let close_ns = unsafe { bpf_ktime_get_ns() };
    match start {
        Some(s) => {
            r.birth_ns = s.birth_ns;
            r.cgroup_id = s.cgroup_id;
            r.pid = s.pid;
            r.flags = s.flags;
            r.comm = s.comm;
        }
        None => {
            r.birth_ns = 0;
            r.cgroup_id = 0;
            r.pid = 0;
            r.flags = SESSION_ADOPTED;
            r.comm = [0; 16];
        }
    }
    r.close_ns = close_ns;
    r.bytes_acked = read::<u64>(sk, off.tcp_bytes_acked).unwrap_or(0);
    r.bytes_received = read::<u64>(sk, off.tcp_bytes_received).unwrap_or(0);
    // The FIN corrections are facts only the kernel can see at this moment;
    // userspace subtracts them from the byte counts (see SESSION_FIN_*).
    if r.flags & SESSION_FIN_SENT != 0 {
        let una = read::<u32>(sk, off.tcp_snd_una);
        if una.is_some() && una == read::<u32>(sk, off.tcp_write_seq) {
            r.flags |= SESSION_FIN_ACKED;
        }
    }
    let sk_flags = read::<u64>(sk, off.sk_flags).unwrap_or(0);
    if sk_flags & (1u64 << (off.sock_done_bit & 63)) != 0 {
        r.flags |= SESSION_FIN_RECEIVED;
    }
    r.rx_ifindex = read::<u32>(sk, off.rx_dst_ifindex).unwrap_or(0);
    r.tx_ifindex = deref(sk, off.sk_dst_cache)
        .and_then(|dst| deref(dst, off.dst_dev))
        .and_then(|dev| read::<u32>(dev, off.netdev_ifindex))
        .unwrap_or(0);
    r._pad1 = 0;
    r.netns_ino = deref(sk, off.skc_net)
        .and_then(|net| read::<u32>(net, off.net_ns_inum))
        .unwrap_or(0);
    let family = read::<u16>(sk, off.skc_family).unwrap_or(0);
    r.family = family;
    r.local_port = u16::from_be(read::<u16>(sk, off.inet_sport).unwrap_or(0));
    r.remote_port = u16::from_be(read::<u16>(sk, off.skc_dport).unwrap_or(0));
    r._pad0 = 0;
    r.local_addr = [0; 16];
    r.remote_addr = [0; 16];
    if family == AF_INET6 {
        r.local_addr = read::<[u8; 16]>(sk, off.skc_v6_rcv_saddr).unwrap_or([0; 16]);
        r.remote_addr = read::<[u8; 16]>(sk, off.skc_v6_daddr).unwrap_or([0; 16]);
    } else if family == AF_INET {
        let local = read::<[u8; 4]>(sk, off.skc_rcv_saddr).unwrap_or([0; 4]);
        let remote = read::<[u8; 4]>(sk, off.skc_daddr).unwrap_or([0; 4]);
        r.local_addr[..4].copy_from_slice(&local);
        r.remote_addr[..4].copy_from_slice(&remote);
    }
}
