//! TCP session life cycle, shared by every hook tier: birth on the first state
//! change, owner capture in process context, live payload counters and active
//! time at each data call, one record at TCP_CLOSE.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values go to helpers by address: a borrow hands over the one already on the stack, \
              while a value moved into `impl Borrow` is stored there again at each call (measured on this crate: \
              up to 34 more instructions per program)"
)]
use core::mem::MaybeUninit;

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use observer_common::{
    LostSource, SESSION_ACTIVE_OPEN, SESSION_ADOPTED, SESSION_CLOSE_MISSED, SESSION_FIN_ACKED, SESSION_FIN_RECEIVED,
    SESSION_FIN_SENT, SessionRecord, SessionStart, payload_bytes, session_mark, tcp_state,
};

use crate::{
    diag,
    kernel::{
        Mem, addr_bytes, addresses, advance_active, current_cgroup_id, current_comm, jiffies, netns_ino, now_ns,
        offset, ports, raise_shared, zeroed,
    },
    maps::{
        BPF_NOEXIST, EEXIST, NoRoom, OPEN_SESSIONS, SESSIONS, SESSIONS_RING_BYTES, clear_no_room, count_lost,
        mark_no_room, no_room, note_closed_here, take_closed_here, wake_flags,
    },
};

const EMPTY: SessionStart = SessionStart::EMPTY;

/// A zeroed `SessionStart` to fill, in `slot` (see `zeroed`).
#[inline(always)]
fn empty_start(slot: &mut MaybeUninit<SessionStart>) -> &mut SessionStart {
    // SAFETY: all-zero bytes are a valid `SessionStart` (plain integers and
    // byte arrays), `zeroed`'s one requirement.
    unsafe { zeroed(slot) }
}

/// Whether a change from `old` to `new` records anything. Most do not: of the
/// ten changes of a short loopback connection's two ends, only the two births
/// and the two closes do; the others return here, before any socket read or
/// hash lookup. The FINs this host sends are read from the state instead
/// (`tcp_state::fin_sent`, at each call and at the close).
/// `CHILD_BIRTHS`: the hook sees a passive socket's birth (LISTEN -> SYN_RECV,
/// which only the tracepoint sees); where it does not, that socket is born at
/// SYN_RECV -> ESTABLISHED. A socket first seen at another change (it predates
/// the observer, or its birth did not fit the table) is adopted at its first
/// send or receive call, or at its close.
#[inline(always)]
fn records<const CHILD_BIRTHS: bool>(old: i32, new: i32) -> bool {
    new == tcp_state::CLOSE
        // A listener is not a session; its children are.
        || (new != tcp_state::LISTEN && (old == tcp_state::CLOSE || old == tcp_state::LISTEN))
        || (!CHILD_BIRTHS && old == tcp_state::SYN_RECV)
}

/// The socket's TCP state.
#[inline(always)]
fn state_of<M: Mem>(sk: *const u8) -> i32 {
    M::read::<u8>(sk, offset!(skc_state)).unwrap_or(0) as i32
}

/// `SESSION_FIN_SENT` if a socket in `state` has sent its FIN.
#[inline(always)]
fn fin_sent_flag(state: i32) -> u32 {
    if tcp_state::fin_sent(state) { SESSION_FIN_SENT } else { 0 }
}

/// A TCP socket moved from `old` to `new`. Only the SYN_SENT transition is known
/// to run in the owning process (connect); other transitions may run in softirq,
/// where the current task is whoever was interrupted, so they record no owner.
/// Not a TCP socket (`M::tcp`): ignored.
#[inline(always)]
pub fn on_state_change<M: Mem, const CHILD_BIRTHS: bool>(sk: *const u8, old: i32, new: i32) {
    if !records::<CHILD_BIRTHS>(old, new) {
        return;
    }
    let key = sk as u64;
    let Some(tp) = M::tcp(sk) else { return };
    if new == tcp_state::CLOSE {
        // An entry left behind (its delete refused) is for the destruction
        // hook to delete: it must not take this close as handled.
        if !on_close::<M>(sk, tp, key, old) {
            note_closed_here(key);
        }
        return;
    }
    // A birth: the socket leaves CLOSE/LISTEN, or SYN_RECV where the hook does
    // not see a child's birth (`records` lets no other change through).
    let leaves_closed = old == tcp_state::CLOSE || old == tcp_state::LISTEN;
    if !leaves_closed && OPEN_SESSIONS.get_ptr(&key).is_some() {
        // SYN_RECV -> ESTABLISHED of a session already open.
        return;
    }
    let mut slot = MaybeUninit::uninit();
    let start = empty_start(&mut slot);
    start.birth_ns = now_ns();
    start.birth_jiffies = jiffies();
    if new == tcp_state::SYN_SENT {
        // connect(): the caller is the owner.
        fill_owner(start);
        start.flags |= SESSION_ACTIVE_OPEN;
    }
    // A socket leaving CLOSE or LISTEN inserts only where no entry is: one
    // hash operation, not a lookup and then an insert.
    let flags = if leaves_closed { BPF_NOEXIST } else { 0 };
    let inserted = match OPEN_SESSIONS.insert(&key, &*start, flags) {
        Err(e) if e == -EEXIST => {
            // The socket is new, so the entry under its address is an earlier
            // socket's whose close no hook saw (`on_destroy` also skipped, or
            // absent in the kprobe tier). Report that session from what its
            // entry holds, count it, and start afresh rather than let the new
            // session inherit its birth and owner.
            // SAFETY: the value of a successful lookup (see `maps`, "Map
            // values"); its socket is gone, so no hook writes it.
            if let Some(stale) = unsafe { OPEN_SESSIONS.get(&key) }
                && !stale.reported()
            {
                count_lost(LostSource::SessionCloseMissed);
                if diag::on() {
                    diag::session_close_missed(stale.pid, stale.live_tx, stale.live_rx);
                }
                report_missed_close(key, stale);
            }
            OPEN_SESSIONS.insert(&key, &*start, 0)
        }
        other => other,
    };
    if inserted.is_err() {
        // Counted here, once: the socket's calls then leave it untracked
        // without trying the table at each one (`NO_ROOM`).
        mark_no_room(key, start.birth_ns);
        count_lost(LostSource::SessionTableFull);
        if diag::on() {
            let (local, remote) = ports::<M>(tp);
            diag::session_table_full(local, remote, new);
        }
    }
}

/// Marks a session seen mid-life: what it moved before now is history, so it
/// becomes the baseline of its live throughput.
#[inline(always)]
fn adopt<M: Mem>(tp: *const u8, start: &mut SessionStart) {
    start.flags |= SESSION_ADOPTED;
    let (tx, rx, _) = current_payload::<M>(tp, start.flags);
    start.live_base_tx = tx;
    start.live_base_rx = rx;
    start.live_tx = tx;
    start.live_rx = rx;
}

/// Records the current task as the owner of an open session that has none yet.
/// Called only from hooks that run in process context (accept).
#[inline(always)]
pub fn claim_owner(sk: *const u8) {
    if let Some(start) = OPEN_SESSIONS.get_ptr_mut(sk as u64) {
        // SAFETY: the value of a successful lookup (see `maps`, "Map
        // values"); the accepted socket has no calls yet, and a close racing
        // on another CPU at worst leaves an owner in an entry it removed.
        let start = unsafe { &mut *start };
        if start.marks[session_mark::OWNER_KNOWN] == 0 {
            fill_owner(start);
        }
    }
}

/// A send or receive call on a TCP socket, in the calling process: claims the
/// owner, advances active time and the live payload counters, and notes a
/// FIN sent (from the state). A connection that predates the observer is
/// adopted here at its first call. `tp` is `sk` as `M::tcp` gave it.
///
/// Threads (or processes) sharing the socket call this on several CPUs at
/// once, outside the socket's lock: what two calls may both change is
/// changed so that neither undoes the other (`marks`, `advance_active`,
/// `raise_shared`); the owner and placement fields take one of the values
/// written, which are the same but for the thread's name.
#[inline(always)]
pub fn on_tcp_call<M: Mem>(sk: *const u8, tp: *const u8) {
    let key = sk as u64;
    let Some(start) = OPEN_SESSIONS.get_ptr_mut(&key) else {
        adopt_at_call::<M>(tp, key);
        return;
    };
    // SAFETY: the value of a successful lookup (see `maps`, "Map values").
    // Calls on other CPUs update it meanwhile, each only in the ways
    // described above.
    let start = unsafe { &mut *start };
    if start.all_flags() & SESSION_FIN_SENT == 0 && tcp_state::fin_sent(state_of::<M>(tp)) {
        set_mark(start, session_mark::FIN_SENT);
    }
    if start.marks[session_mark::OWNER_KNOWN] == 0 {
        fill_owner(start);
    }
    advance_active(&raw mut start.last_call_ns, &raw mut start.active_ns, call_time::<M>(tp));
    let (tx, rx, _) = current_payload::<M>(tp, start.all_flags());
    raise_shared(&raw mut start.live_tx, tx);
    raise_shared(&raw mut start.live_rx, rx);
    // Once per session: these are for the --iface filter of live bytes, and
    // the close record reads them again anyway. Re-reading them at every call
    // (the receive interface of an active opener stays 0) costs a pointer
    // chase per send and receive.
    if start.marks[session_mark::PLACED] == 0 {
        start.netns_ino = netns_ino::<M>(tp);
        start.rx_ifindex = M::read::<u32>(tp, offset!(rx_dst_ifindex)).unwrap_or(0);
        start.tx_ifindex = tx_ifindex::<M>(tp);
        let (local, remote) = ports::<M>(tp);
        start.ports = u32::from(local) << 16 | u32::from(remote);
        set_mark(start, session_mark::PLACED);
    }
}

/// A call on a TCP socket with no entry: adopts the connection if it is one
/// (open before the observer started, or born while the table was full). A
/// socket whose session found no room is left alone until its retry
/// (`NO_ROOM`): one lookup per call, not a record built and refused each time,
/// and its loss counted once.
#[inline(always)]
fn adopt_at_call<M: Mem>(tp: *const u8, key: u64) {
    let state = state_of::<M>(tp);
    if !tcp_state::adoptable(state) {
        if state != tcp_state::CLOSE && diag::on() {
            let (local, remote) = ports::<M>(tp);
            diag::unexpected_state(local, remote, state);
        }
        return;
    }
    let clock = call_time::<M>(tp);
    let mark = no_room(key, clock);
    if mark == NoRoom::Waiting {
        return;
    }
    let now = now_ns();
    let mut slot = MaybeUninit::uninit();
    let start = empty_start(&mut slot);
    start.birth_ns = now;
    start.birth_jiffies = jiffies();
    start.flags = fin_sent_flag(state);
    adopt::<M>(tp, start);
    fill_owner(start);
    start.last_call_ns = now;
    // Only where no entry is: a call on another CPU may adopt the socket at
    // the same moment, and its entry (maybe already updated) wins.
    let inserted = OPEN_SESSIONS.insert(&key, start, BPF_NOEXIST);
    let first_loss = match inserted {
        Ok(()) => {
            if mark == NoRoom::Retry {
                clear_no_room(key);
            }
            false
        }
        Err(e) if e == -EEXIST => return,
        Err(_) => mark_no_room(key, clock),
    };
    if first_loss {
        count_lost(LostSource::SessionTableFull);
    }
    if diag::on() {
        let (local, remote) = ports::<M>(tp);
        match inserted {
            Ok(()) => diag::adopted(local, remote, state),
            Err(_) if first_loss => diag::session_table_full(local, remote, state),
            Err(_) => {}
        }
    }
}

/// The time of a call on `tp`: the clock reading TCP itself just took for
/// this socket (`tcp_clock_cache`, refreshed by the send and by the receive
/// call before their tracepoints run; a send that only queued data leaves
/// the previous packet's time, within an RTT): the same clock as
/// `bpf_ktime_get_ns()`, which costs as much again as the rest of a call.
#[inline(always)]
fn call_time<M: Mem>(tp: *const u8) -> u64 {
    M::read::<u64>(tp, offset!(tcp_clock_cache)).unwrap_or(0)
}

/// Sets one of a session's `marks` (see `SessionStart::marks`): a byte store
/// of its own, which a call on another CPU setting another mark cannot undo.
#[inline(always)]
fn set_mark(start: &mut SessionStart, mark: usize) {
    // SAFETY: a byte of `start.marks` (`mark` is one of `session_mark`'s
    // indexes, below 4); volatile so the store stays one byte wide and is not
    // merged with a read of its neighbours.
    unsafe { start.marks.as_mut_ptr().add(mark & 3).write_volatile(1) };
}

#[inline(always)]
fn fill_owner(start: &mut SessionStart) {
    start.pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    start.cgroup_id = current_cgroup_id();
    current_comm(&mut start.comm);
    set_mark(start, session_mark::OWNER_KNOWN);
}

/// FIN facts only the kernel can see now, as `SESSION_FIN_*` flags.
#[inline(always)]
fn fin_flags<M: Mem>(tp: *const u8, flags: u32) -> u32 {
    let mut out = 0;
    if flags & SESSION_FIN_SENT != 0 {
        let una = M::read::<u32>(tp, offset!(tcp_snd_una));
        if una.is_some() && una == M::read::<u32>(tp, offset!(tcp_write_seq)) {
            out |= SESSION_FIN_ACKED;
        }
    }
    let sk_flags = M::read::<u64>(tp, offset!(sk_flags)).unwrap_or(0);
    if sk_flags & (1u64 << (offset!(sock_done_bit) & 63)) != 0 {
        out |= SESSION_FIN_RECEIVED;
    }
    out
}

/// Payload bytes (transmitted, received) of the socket right now, and
/// `flags` with the FINs it has sent and received so far, which those
/// figures exclude.
#[inline(always)]
fn current_payload<M: Mem>(tp: *const u8, flags: u32) -> (u64, u64, u32) {
    let flags = flags | fin_flags::<M>(tp, flags);
    let acked = M::read::<u64>(tp, offset!(tcp_bytes_acked)).unwrap_or(0);
    let received = M::read::<u64>(tp, offset!(tcp_bytes_received)).unwrap_or(0);
    let (tx, rx) = payload_bytes(acked, received, flags);
    (tx, rx, flags)
}

/// The kernel's TCP chrono total (busy, receive-window limited, send-buffer
/// limited): time with data to send, as TCP_INFO's `tcpi_busy_time` adds it up,
/// including the chrono still running. The chrono type is a bitfield (a whole
/// byte from 6.18): its byte is read whole, which the verifier allows as a
/// direct load since the byte holds nothing but bitfields (`btf_struct_walk`:
/// a load that starts at a bitfield's first byte and covers its last).
#[inline(always)]
fn busy_jiffies<M: Mem>(tp: *const u8, now_jiffies: u64) -> u64 {
    // Three reads at constant offsets, not a loop: a direct load's offset
    // must be known to the verifier.
    let stat = offset!(tcp_chrono_stat);
    let mut total = u64::from(M::read::<u32>(tp, stat).unwrap_or(0));
    total += u64::from(M::read::<u32>(tp, stat + 4).unwrap_or(0));
    total += u64::from(M::read::<u32>(tp, stat + 8).unwrap_or(0));
    let chrono_type =
        M::read::<u8>(tp, offset!(tcp_chrono_type_byte)).unwrap_or(0) >> (offset!(tcp_chrono_type_shift) & 7) & 3;
    if chrono_type != 0 {
        let start = M::read::<u32>(tp, offset!(tcp_chrono_start)).unwrap_or(0);
        total += u64::from((now_jiffies as u32).wrapping_sub(start));
    }
    total
}

#[inline(always)]
fn tx_ifindex<M: Mem>(sk: *const u8) -> u32 {
    M::deref(sk, offset!(sk_dst_cache))
        .and_then(|dst| M::deref(dst, offset!(dst_dev)))
        .and_then(|dev| M::read::<u32>(dev, offset!(netdev_ifindex)))
        .unwrap_or(0)
}

/// Reports the session's end and deletes its entry. Returns whether the
/// entry is left (`session_mark::REPORTED`): its delete was refused.
#[inline(always)]
fn on_close<M: Mem>(sk: *const u8, tp: *const u8, key: u64, old: i32) -> bool {
    // A reference into the map, not a copy: the record is filled from it
    // before the entry is removed. Copies of the 100-byte start took the
    // programs' stack to 488 bytes, which with the memset/memcpy subprograms
    // exceeds 512 on verifiers that round each frame up to 32 bytes (6.1).
    // SAFETY: the value of a successful lookup (see `maps`, "Map values");
    // the socket is closing, so no call writes the entry now.
    let mut start = unsafe { OPEN_SESSIONS.get_ptr_mut(&key).map(|p| &mut *p) };
    match &mut start {
        // A listener or a socket that never connected: not a session.
        None if old == tcp_state::LISTEN || old == tcp_state::CLOSE => return false,
        // Its session may have found no room: the mark goes with the socket.
        None => clear_no_room(key),
        // Before the record goes: should the delete below be refused, a copy
        // of the table must not count the entry as an open session (its
        // bytes are in the record), whenever it is taken.
        Some(start) => set_mark(start, session_mark::REPORTED),
    }
    let start = start.map(|s| &*s);
    match SESSIONS.reserve::<SessionRecord>(0) {
        Some(mut entry) => {
            // SAFETY: a reserved ring-buffer slot, ours alone until submit,
            // sized and aligned for a `SessionRecord` (plain integers);
            // `fill_record` writes every field before submit.
            fill_record::<M>(unsafe { &mut *entry.as_mut_ptr() }, sk, tp, start, old);
            entry.submit(wake_flags(&SESSIONS, SESSIONS_RING_BYTES));
        }
        None => count_lost(LostSource::SessionRingFull),
    }
    start.is_some() && OPEN_SESSIONS.remove(&key).is_err()
}

/// Emits the record of a session whose close no hook saw, from its entry
/// alone: the socket at `key` is already another one. Bytes and active time
/// are those of its last send or receive call (`on_tcp_call`), when it ended
/// is unknown (`SESSION_CLOSE_MISSED`).
#[inline(always)]
fn report_missed_close(key: u64, s: &SessionStart) {
    let Some(mut entry) = SESSIONS.reserve::<SessionRecord>(0) else {
        count_lost(LostSource::SessionRingFull);
        return;
    };
    // SAFETY: a reserved ring-buffer slot, ours alone until submit, sized and
    // aligned for a `SessionRecord` (plain integers); every field is written
    // below before submit.
    let r = unsafe { &mut *entry.as_mut_ptr() };
    fill_from_start(r, key, s);
    r.close_ns = if s.last_call_ns > s.birth_ns { s.last_call_ns } else { s.birth_ns };
    r.bytes_acked = s.live_tx;
    r.bytes_received = s.live_rx;
    r.busy_jiffies = 0;
    r.close_jiffies = s.birth_jiffies;
    r.netns_ino = s.netns_ino;
    r.rx_ifindex = s.rx_ifindex;
    r.tx_ifindex = s.tx_ifindex;
    r.flags = s.all_flags() | SESSION_CLOSE_MISSED;
    r.retransmits = 0;
    // The addresses were the socket's, which is now another one's.
    r.family = 0;
    r.local_port = 0;
    r.remote_port = 0;
    r._pad0 = 0;
    r.local_addr = [0; 16];
    r.remote_addr = [0; 16];
    entry.submit(wake_flags(&SESSIONS, SESSIONS_RING_BYTES));
}

/// The socket is being destroyed, after its change to TCP_CLOSE. Its session
/// normally ended at that change; an entry still open means the state program
/// was skipped there: the kernel skips a program that an interrupt re-enters
/// on the same CPU (counted in its `recursion_misses`), which happens under
/// heavy connection churn when a softirq closes a socket while a process's
/// state change is being handled. The session ends here instead, with what
/// the socket still holds. A socket whose close the state program just
/// handled on this CPU costs nothing more (`take_closed_here`); any other one
/// lookup, a miss unless its close was skipped.
#[inline(always)]
pub fn on_destroy<M: Mem>(sk: *const u8) {
    let key = sk as u64;
    if take_closed_here(key) {
        return;
    }
    let Some(start) = OPEN_SESSIONS.get_ptr(&key) else { return };
    // SAFETY: the value of a successful lookup (see `maps`, "Map values").
    if unsafe { (*start).reported() } {
        // Reported at its close, whose delete was refused: delete it now.
        let _ = OPEN_SESSIONS.remove(&key);
        return;
    }
    let Some(tp) = M::tcp(sk) else { return };
    on_close::<M>(sk, tp, key, tcp_state::CLOSE);
}

/// `r.comm = s.comm`, 8 bytes at a time: the array assignment
/// compiles to a call to BPF's byte-at-a-time `memmove`, about 100
/// instructions at every close. Only for these two `comm` fields, asserted
/// below to be 8-byte aligned.
#[inline(always)]
fn copy_comm(r: &mut SessionRecord, s: &SessionStart) {
    let (d, s) = (r.comm.as_mut_ptr().cast::<u64>(), s.comm.as_ptr().cast::<u64>());
    // SAFETY: both arrays are 16 bytes at 8-byte-aligned addresses (asserted
    // below), so two u64 reads and writes stay inside them, aligned.
    unsafe {
        d.write(s.read());
        d.add(1).write(s.add(1).read());
    }
}
const _: () = assert!(
    core::mem::offset_of!(SessionStart, comm) % 8 == 0
        && core::mem::offset_of!(SessionRecord, comm) % 8 == 0
        && core::mem::align_of::<SessionStart>() == 8
        && core::mem::align_of::<SessionRecord>() == 8
);

/// The fields of a record that come from the session's start, whichever
/// way it ended: at its close (`fill_record`) or found stale
/// (`report_missed_close`).
#[inline(always)]
fn fill_from_start(r: &mut SessionRecord, sock: u64, s: &SessionStart) {
    r.sock = sock;
    r.birth_ns = s.birth_ns;
    r.birth_jiffies = s.birth_jiffies;
    r.cgroup_id = s.cgroup_id;
    r.pid = s.pid;
    copy_comm(r, s);
    r.active_ns = s.active_ns;
    r.live_base_tx = s.live_base_tx;
    r.live_base_rx = s.live_base_rx;
}

/// What a session seen only at its close starts from.
static ADOPTED_START: SessionStart = SessionStart { flags: SESSION_ADOPTED, ..EMPTY };

/// Fills every field of `r`, the record of a session closing now.
#[inline(always)]
fn fill_record<M: Mem>(r: &mut SessionRecord, sk: *const u8, tp: *const u8, start: Option<&SessionStart>, old: i32) {
    let s = start.unwrap_or(&ADOPTED_START);
    fill_from_start(r, sk as u64, s);
    r.close_ns = now_ns();
    r.close_jiffies = jiffies();
    r.busy_jiffies = busy_jiffies::<M>(tp, r.close_jiffies);
    // The state before CLOSE tells whether a FIN was sent; the destroy
    // backstop, which knows no old state, relies on one seen at a call.
    let (tx, rx, flags) = current_payload::<M>(tp, s.all_flags() | fin_sent_flag(old));
    r.flags = flags;
    r.bytes_acked = tx;
    r.bytes_received = rx;
    r.rx_ifindex = M::read::<u32>(tp, offset!(rx_dst_ifindex)).unwrap_or(0);
    r.tx_ifindex = tx_ifindex::<M>(tp);
    r.retransmits = M::read::<u32>(tp, offset!(tcp_total_retrans)).unwrap_or(0);
    r.netns_ino = netns_ino::<M>(tp);
    let (family, local, remote) = addresses::<M>(tp);
    r.family = family;
    r.local_addr = addr_bytes(local);
    r.remote_addr = addr_bytes(remote);
    (r.local_port, r.remote_port) = ports::<M>(tp);
    r._pad0 = 0;
}
