//! Maps shared by the programs. Sizes here are defaults; the loader overrides
//! them from the command line (`EbpfLoader::set_max_entries`). The session and
//! flow tables and the rings are pinned across restarts (observer's
//! `kernel/state.rs`): a change to their types or values needs
//! `STATE_LAYOUT_VERSION` bumped.
//!
//! Map values and soundness: a successful lookup returns a pointer into the
//! map's element memory, valid and aligned for the rest of the program run.
//! Every map here is preallocated (hash and LRU maps without
//! `BPF_F_NO_PREALLOC`, arrays), so element memory is never freed while a
//! program holds it. What the pointer does not promise is exclusivity: another
//! CPU may update the element, or delete it and reuse the memory for another
//! key, meanwhile. The programs accept that: a race can cost a counter an
//! increment or put a reused entry's values into one record, and no access
//! ever leaves the element. The `SAFETY` comments at each lookup refer to this.
#![expect(clippy::needless_borrows_for_generic_args, reason = "map keys and values by reference, as in session.rs")]
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use observer_common::{
    LOST_SOURCES, LostSource, PendingKey, PendingPeer, SessionStart, SockProbe, UdpFlow, UdpFlowKey, UdpSocketFlows,
};
pub use observer_common::{SESSIONS_RING_BYTES, UDP_RELEASES_RING_BYTES};

/// `bpf_map_update_elem` flag: fail with `EEXIST` if the key is present.
pub const BPF_NOEXIST: u64 = aya_ebpf::bindings::BPF_NOEXIST as u64;
/// The error (negated) of an insert with `BPF_NOEXIST` where the key is present.
pub const EEXIST: i32 = 17;

/// Open TCP sessions, keyed by the kernel address of their `struct sock`.
/// Preallocated (flags 0): kprobe and tracepoint programs on kernels before 6.1
/// may only use preallocated hash maps.
#[map(name = "OPEN_SESSIONS")]
pub static OPEN_SESSIONS: HashMap<u64, SessionStart> = HashMap::with_max_entries(65536, 0);

/// Closed-session records (`SessionRecord`) for userspace.
#[map(name = "SESSIONS")]
pub static SESSIONS: RingBuf = RingBuf::with_byte_size(SESSIONS_RING_BYTES, 0);

/// Data the programs had to drop, per `LostSource`.
#[map(name = "LOST")]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOST_SOURCES, 0);

/// The socket whose change to TCP_CLOSE this CPU's state program handled
/// last, since this CPU's last socket destruction: the destruction that
/// follows such a close (in the same call chain, `tcp_done`, on the same
/// CPU) then knows its session ended and skips the `OPEN_SESSIONS` lookup,
/// a miss every time, that its backstop otherwise costs every socket
/// (`session::on_destroy`). Every destruction empties it.
#[map(name = "CLOSED_HERE")]
pub static CLOSED_HERE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Notes that the state program handled `sk`'s close on this CPU.
#[inline(always)]
pub fn note_closed_here(sk: u64) {
    if let Some(slot) = CLOSED_HERE.get_ptr_mut(0) {
        // SAFETY: this CPU's element of a per-CPU array from a successful
        // lookup (see "Map values" above); no other CPU writes it.
        unsafe { *slot = sk };
    }
}

/// Whether `sk`'s close was the last one this CPU's state program handled
/// since this CPU's last destruction; empties the slot either way.
#[inline(always)]
pub fn take_closed_here(sk: u64) -> bool {
    let Some(slot) = CLOSED_HERE.get_ptr_mut(0) else { return false };
    // SAFETY: as in `note_closed_here`.
    unsafe {
        let closed = *slot == sk;
        *slot = 0;
        closed
    }
}

#[inline(always)]
pub fn count_lost(source: LostSource) {
    if let Some(slot) = LOST.get_ptr_mut(source as u32) {
        // SAFETY: this CPU's element of `LOST` from a successful lookup (see
        // "Map values" above). No other CPU writes this CPU's copy; a program
        // nested on this CPU (an interrupt) could at worst lose one count.
        unsafe { *slot += 1 };
    }
}

/// Sockets whose session (`OPEN_SESSIONS`) or new UDP flow (`UDP_FLOWS`)
/// found its table full, with the time of that attempt (ns, the caller's
/// clock). Their calls skip the insert for `NO_ROOM_RETRY_NS` after it, so a
/// full table costs a call on such a socket one lookup here instead of building
/// a value and failing to insert it, and the loss is counted once per socket
/// (when its mark is made), not once per call. LRU: with more such sockets
/// than it holds, the oldest marks go and their sockets count again.
#[map(name = "NO_ROOM")]
pub static NO_ROOM: LruHashMap<u64, u64> = LruHashMap::with_max_entries(16384, 0);

/// How long a socket marked in `NO_ROOM` waits before it tries its table again
/// (which may have room by then).
const NO_ROOM_RETRY_NS: u64 = 1_000_000_000;

/// What `NO_ROOM` says of a socket not in its table.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NoRoom {
    /// No mark: try the table (most sockets; one failed lookup, only on the
    /// path of a socket the table does not hold).
    None,
    /// Its table was full less than `NO_ROOM_RETRY_NS` ago: leave the socket
    /// untracked for this call, at the cost of this one lookup.
    Waiting,
    /// Marked longer ago: try again; the mark is cleared if it now fits.
    Retry,
}

/// `sk`'s mark in `NO_ROOM` as of `now`.
#[inline(always)]
pub fn no_room(sk: u64, now: u64) -> NoRoom {
    // SAFETY: the value of a successful lookup (see "Map values"), copied at once.
    match unsafe { NO_ROOM.get(&sk) } {
        None => NoRoom::None,
        Some(&since) if now.wrapping_sub(since) < NO_ROOM_RETRY_NS => NoRoom::Waiting,
        Some(_) => NoRoom::Retry,
    }
}

/// `sk`'s insert found its table full at `now`: marks it (or renews its mark).
/// Returns whether the socket had no mark, i.e. whether this loss is the
/// socket's first and is to be counted.
#[inline(always)]
pub fn mark_no_room(sk: u64, now: u64) -> bool {
    // An LRU map makes room by evicting: an insert does not fail for space.
    // BPF_NOEXIST: of two CPUs marking one socket at once, one counts.
    match NO_ROOM.insert(&sk, &now, BPF_NOEXIST) {
        Ok(()) => true,
        Err(_) => {
            if let Some(since) = NO_ROOM.get_ptr_mut(&sk) {
                // SAFETY: the value of a successful lookup (see "Map values");
                // a racing writer stores a time as close.
                unsafe { *since = now };
            }
            false
        }
    }
}

/// `sk` has an entry in its table now, or is gone: a mark it may have would
/// only delay the next socket at its address. Called where that is rare
/// (a retry that found room, the close of an untracked session).
#[inline(always)]
pub fn clear_no_room(sk: u64) {
    let _ = NO_ROOM.remove(&sk);
}

/// UDP flows (a socket and one peer), updated at every data call; userspace
/// ends them at release or after the idle timeout and deletes them.
#[map(name = "UDP_FLOWS")]
pub static UDP_FLOWS: HashMap<UdpFlowKey, UdpFlow> = HashMap::with_max_entries(65536, 0);

/// UDP sockets that have flows, so a release is only reported for those,
/// with their first flow's key (`UdpSocketFlows`).
#[map(name = "UDP_SOCKETS")]
pub static UDP_SOCKETS: HashMap<u64, UdpSocketFlows> = HashMap::with_max_entries(65536, 0);

/// Released UDP sockets (`UdpRelease`) for userspace to end their flows.
#[map(name = "UDP_RELEASES")]
pub static UDP_RELEASES: RingBuf = RingBuf::with_byte_size(UDP_RELEASES_RING_BYTES, 0);

/// The socket probe (`SockProbe`, program `obs_sock_probe`): one entry.
#[map(name = "SOCK_PROBE")]
pub static SOCK_PROBE: Array<SockProbe> = Array::with_max_entries(1, 0);

/// `bpf_ringbuf_submit`/`output` flags and `bpf_ringbuf_query` selector (uapi bpf.h).
const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// The flags for a record just written to `ring` of `ring_bytes`: wake its
/// reader only once a quarter of the ring is unread. Below that, records wait
/// for the reader's own timer (`observer::pipeline::RING_POLL`, up to
/// `RING_POLL_IDLE` when quiet), so a burst costs userspace one wake-up per
/// batch instead of one per record (a wake-up per UDP release was a third of
/// the observer's CPU under a churn of short UDP sockets).
#[inline(always)]
pub fn wake_flags(ring: &RingBuf, ring_bytes: u32) -> u64 {
    if ring.query(BPF_RB_AVAIL_DATA) >= u64::from(ring_bytes / 4) { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP }
}

/// Peer of the datagram being sent or received, from the cgroup sendmsg /
/// recvmsg hook, for the tracepoint that follows in the same call when it
/// runs on another CPU (`PENDING_SLOT` serves the rest). LRU: an entry whose
/// call never reached the tracepoint's accounting (a failed send) is evicted
/// by newer ones instead of filling the table.
#[map(name = "PENDING_PEERS")]
pub static PENDING_PEERS: LruHashMap<PendingKey, PendingPeer> = LruHashMap::with_max_entries(16384, 0);

/// The last peer a cgroup hook saw on this CPU, with its key. The hook and
/// the tracepoint of one call run on the same CPU unless the task migrated in
/// between, so the tracepoint looks here first: most UDP calls name no address
/// (connected sockets, receives that do not ask for the source), and for them
/// this per-CPU read replaces a hash lookup in `PENDING_PEERS`.
#[map(name = "PENDING_SLOT")]
pub static PENDING_SLOT: PerCpuArray<PendingSlot> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingSlot {
    pub key: PendingKey,
    pub peer: PendingPeer,
}
