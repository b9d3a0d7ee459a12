//! Types shared by the kernel programs (`observer-ebpf`) and the loader (`observer`).
//!
//! Field order is ABI: the kernel writes these records byte for byte and userspace
//! reads them back with the same layout. Every struct is `#[repr(C)]`, has explicit
//! padding fields and a compile-time size assert, and holds no `bool` (a `u32` flag
//! word instead), so no hidden padding can differ between the two sides.
//! All integers are in host byte order unless a field says otherwise.
#![no_std]

/// Address family numbers as the kernel stores them in `sock_common.skc_family`.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
/// `IPPROTO_TCP`, as in `sock.sk_protocol`.
pub const IPPROTO_TCP: u16 = 6;

/// `SessionRecord::flags`: the session predates the observer (no birth was seen);
/// `birth_ns` is 0 and the lifetime is unknown.
pub const SESSION_ADOPTED: u32 = 1 << 0;
/// `SessionRecord::flags`: `pid`, `comm` and `cgroup_id` were captured in the
/// owning process's context (connect, accept, send or receive).
pub const SESSION_OWNER_KNOWN: u32 = 1 << 1;
/// This host opened the connection (born in SYN_SENT): `bytes_acked` then
/// counts the SYN's sequence number once the peer acknowledged it.
pub const SESSION_ACTIVE_OPEN: u32 = 1 << 2;
/// This host sent a FIN: the socket was in a state that follows one
/// (`tcp_state::fin_sent`) at a send or receive call or just before its close.
pub const SESSION_FIN_SENT: u32 = 1 << 3;
/// The FIN this host sent was acknowledged (`snd_una == write_seq` at close):
/// `bytes_acked` counts its sequence number.
pub const SESSION_FIN_ACKED: u32 = 1 << 4;
/// The peer's FIN was received (`SOCK_DONE`): `bytes_received` counts its
/// sequence number.
pub const SESSION_FIN_RECEIVED: u32 = 1 << 5;
/// The session's network namespace and interfaces were read (once, at its
/// first data call): later calls skip those reads.
pub const SESSION_PLACED: u32 = 1 << 6;
/// No kernel hook saw the session's close; its entry was found when the next
/// socket at the same address was born, and it is reported from what the
/// entry held: bytes and active time up to its last send or receive call, no
/// addresses, and `close_ns` that last call's time. Its true lifetime is
/// unknown, so it has no duration or goodput.
pub const SESSION_CLOSE_MISSED: u32 = 1 << 7;

/// One closed TCP session, written once at `TCP_CLOSE` into the `SESSIONS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// Kernel address of the socket: with `birth_ns`, identifies the session's
    /// entry in `OPEN_SESSIONS`, which userspace has been reading live.
    pub sock: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at birth or first sight; 0 when
    /// the session was never seen before its close.
    pub birth_ns: u64,
    /// `bpf_ktime_get_ns()` at the transition to TCP_CLOSE.
    pub close_ns: u64,
    /// Payload bytes the peer acknowledged: `tcp_sock.bytes_acked` less the
    /// SYN and FIN sequence numbers (see `payload_bytes`).
    pub bytes_acked: u64,
    /// Payload bytes received in order: `tcp_sock.bytes_received` less a
    /// received FIN.
    pub bytes_received: u64,
    /// cgroup v2 id of the owning process (0 when the owner is unknown).
    pub cgroup_id: u64,
    /// Receive active time: the sum of gaps between send/receive calls no
    /// longer than the active-gap threshold (0 without per-call hooks).
    pub active_ns: u64,
    /// Transmit busy time from the kernel's TCP chrono (the `tcpi_busy_time`
    /// of TCP_INFO): jiffies during which the socket had data to send.
    pub busy_jiffies: u64,
    /// `bpf_jiffies64()` at birth and close: with `birth_ns`/`close_ns` they
    /// convert `busy_jiffies` to time without knowing the kernel's HZ.
    pub birth_jiffies: u64,
    pub close_jiffies: u64,
    /// Payload bytes already counted as live throughput before close (the
    /// adoption baseline for adopted sessions), so the close adds the rest.
    pub live_base_tx: u64,
    pub live_base_rx: u64,
    /// Inode number of the socket's network namespace.
    pub netns_ino: u32,
    /// Interface index that delivered the socket's received packets
    /// (`sk_rx_dst_ifindex`), 0 when the kernel recorded none.
    pub rx_ifindex: u32,
    /// Owning process id (tgid), 0 when unknown.
    pub pid: u32,
    /// `SESSION_*` flags.
    pub flags: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
    pub _pad0: u16,
    /// Interface index of the socket's cached output route
    /// (`sk_dst_cache->dev->ifindex`), 0 when there is none.
    pub tx_ifindex: u32,
    /// Segments the session retransmitted (`tcp_sock.total_retrans` at close).
    pub retransmits: u32,
    /// Local address, network byte order; IPv4 in the first 4 bytes.
    pub local_addr: [u8; 16],
    /// Remote address, network byte order; IPv4 in the first 4 bytes.
    pub remote_addr: [u8; 16],
    /// Owning process's `comm`, NUL padded.
    pub comm: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SessionRecord>() == 176);
const _: () = assert!(core::mem::align_of::<SessionRecord>() == 8);

/// What the kernel remembers about an open TCP session, keyed by socket address
/// in the `OPEN_SESSIONS` hash map, from birth to close. Userspace reads it to
/// advance live throughput (`observer_bytes_total`) while the session is open.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionStart {
    pub birth_ns: u64,
    pub cgroup_id: u64,
    /// Time of the last send or receive call (0: none yet).
    pub last_call_ns: u64,
    /// See `SessionRecord::active_ns`.
    pub active_ns: u64,
    /// Payload bytes transmitted / received so far, as of the last call.
    pub live_tx: u64,
    pub live_rx: u64,
    /// Payload counters when the session was first seen: 0 for sessions born
    /// under the observer; an adopted session's bytes before that are history,
    /// not live throughput.
    pub live_base_tx: u64,
    pub live_base_rx: u64,
    /// `bpf_jiffies64()` at birth or first sight.
    pub birth_jiffies: u64,
    pub pid: u32,
    /// `SESSION_*` flags.
    pub flags: u32,
    pub comm: [u8; 16],
    pub netns_ino: u32,
    pub rx_ifindex: u32,
    pub tx_ifindex: u32,
    /// What the send and receive calls learn about the session, one byte each
    /// (indexed by `session_mark`, 0 or 1), where `flags` holds what was known
    /// when the entry was made. Calls on two CPUs (threads sharing a socket)
    /// set these with plain byte stores, which cannot undo each other; setting
    /// bits of `flags` from both (a read, an or and a write of one word) could
    /// lose one. `all_flags` folds them into `SESSION_*` flags.
    pub marks: [u8; 4],
    /// Local port << 16 | remote port, read with the placement (the
    /// `PLACED` mark): who the socket at this address was, so that a start
    /// that reuses pinned tables can tell a new socket at the same address
    /// from the session's (`SockProbe`).
    pub ports: u32,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<SessionStart>() == 120);

impl SessionStart {
    /// Every field zero: the base of the kernel's entries (`..EMPTY`) and of
    /// userspace's test entries.
    pub const EMPTY: SessionStart = SessionStart {
        birth_ns: 0,
        cgroup_id: 0,
        last_call_ns: 0,
        active_ns: 0,
        live_tx: 0,
        live_rx: 0,
        live_base_tx: 0,
        live_base_rx: 0,
        birth_jiffies: 0,
        pid: 0,
        flags: 0,
        comm: [0; 16],
        netns_ino: 0,
        rx_ifindex: 0,
        tx_ifindex: 0,
        marks: [0; 4],
        ports: 0,
        _pad0: 0,
    };
}

/// Indexes of `SessionStart::marks`, each standing for one `SESSION_*` flag.
pub mod session_mark {
    /// `SESSION_FIN_SENT`.
    pub const FIN_SENT: usize = 0;
    /// `SESSION_OWNER_KNOWN`.
    pub const OWNER_KNOWN: usize = 1;
    /// `SESSION_PLACED`.
    pub const PLACED: usize = 2;
    /// Not a flag: the session's close record has been sent (or lost to a
    /// full ring, and counted). An entry with this mark is one the kernel
    /// could not delete after the record: Linux 5.10's hash table refuses a
    /// delete (EBUSY) when it interrupts an operation on the same lock slot
    /// on that CPU. Nothing counts it again: userspace skips it, the
    /// destruction hook deletes it, the next socket at its address replaces it.
    pub const REPORTED: usize = 3;
}

impl SessionStart {
    /// Whether the session's close was reported already (`session_mark::REPORTED`).
    #[inline(always)]
    pub fn reported(&self) -> bool {
        self.marks[session_mark::REPORTED] != 0
    }

    /// `flags` with the flags the calls marked since (`marks`).
    #[inline(always)]
    pub fn all_flags(&self) -> u32 {
        let mark = |i: usize, flag: u32| if self.marks[i] != 0 { flag } else { 0 };
        self.flags
            | mark(session_mark::FIN_SENT, SESSION_FIN_SENT)
            | mark(session_mark::OWNER_KNOWN, SESSION_OWNER_KNOWN)
            | mark(session_mark::PLACED, SESSION_PLACED)
    }
}

/// Byte offsets of the kernel structure fields the programs read, resolved by the
/// loader from the running kernel's BTF and written into the programs as a
/// load-time global (`OFFSETS`). Rust eBPF has no CO-RE relocations yet; this is
/// how the same object reads the right bytes on every kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct tcp_sock` -> `bytes_acked` (u64).
    pub tcp_bytes_acked: u32,
    /// `struct tcp_sock` -> `bytes_received` (u64).
    pub tcp_bytes_received: u32,
    /// `struct sock` -> `__sk_common.skc_family` (u16).
    pub skc_family: u32,
    /// `struct sock` -> `__sk_common.skc_state` (u8).
    pub skc_state: u32,
    /// `struct inet_sock` -> `inet_sport` (u16, network order local port;
    /// `skc_num` is already zeroed when the close is traced).
    pub inet_sport: u32,
    /// `struct sock` -> `__sk_common.skc_dport` (u16, network order).
    pub skc_dport: u32,
    /// `struct sock` -> `__sk_common.skc_rcv_saddr` (IPv4, network order).
    pub skc_rcv_saddr: u32,
    /// `struct sock` -> `__sk_common.skc_daddr` (IPv4, network order).
    pub skc_daddr: u32,
    /// `struct sock` -> `__sk_common.skc_v6_rcv_saddr` (16 bytes).
    pub skc_v6_rcv_saddr: u32,
    /// `struct sock` -> `__sk_common.skc_v6_daddr` (16 bytes).
    pub skc_v6_daddr: u32,
    /// `struct sock` -> `__sk_common.skc_net` (a `struct net *`).
    pub skc_net: u32,
    /// `struct net` -> `ns.inum` (u32).
    pub net_ns_inum: u32,
    /// `struct sock` -> `sk_rx_dst_ifindex` (or `inet_sock.rx_dst_ifindex` on
    /// older kernels), an int.
    pub rx_dst_ifindex: u32,
    /// `struct sock` -> `sk_protocol` (u16); 0 where the kernel keeps it in a
    /// bitfield (before 5.6). Read only by the per-call programs (6.3+).
    pub sk_protocol: u32,
    /// `struct sock` -> `sk_flags` (unsigned long).
    pub sk_flags: u32,
    /// Bit number of `SOCK_DONE` in `enum sock_flags` (set by `tcp_fin`).
    pub sock_done_bit: u32,
    /// Bit number of `SOCK_DEAD` in `enum sock_flags` (set when the socket
    /// is released by its last user: `sock_orphan`).
    pub sock_dead_bit: u32,
    /// `struct tcp_sock` -> `snd_una` (u32).
    pub tcp_snd_una: u32,
    /// `struct tcp_sock` -> `write_seq` (u32).
    pub tcp_write_seq: u32,
    /// `struct sock` -> `sk_dst_cache` (a `struct dst_entry *`).
    pub sk_dst_cache: u32,
    /// `struct dst_entry` -> `dev` (a `struct net_device *`).
    pub dst_dev: u32,
    /// `struct net_device` -> `ifindex` (int).
    pub netdev_ifindex: u32,
    /// `struct socket` -> `sk` (a `struct sock *`), for release hooks.
    pub socket_sk: u32,
    /// `struct tcp_sock` -> `chrono_start` (u32, jiffies).
    pub tcp_chrono_start: u32,
    /// `struct tcp_sock` -> `chrono_stat` (u32[3], jiffies per chrono type).
    pub tcp_chrono_stat: u32,
    /// `struct tcp_sock` -> `chrono_type`, a 2-bit field: the byte holding it
    /// and the shift of its lowest bit in that byte.
    pub tcp_chrono_type_byte: u32,
    pub tcp_chrono_type_shift: u32,
    /// `struct sk_buff` -> `dev` (a `struct net_device *`).
    pub skb_dev: u32,
    /// `struct sk_buff` -> `_skb_refdst` (a `struct dst_entry *` whose
    /// lowest bit is the SKB_DST_NOREF flag).
    pub skb_refdst: u32,
    /// `struct net_device` -> `nd_net.net` (a `struct net *`).
    pub netdev_net: u32,
    /// `struct tcp_sock` -> `total_retrans` (u32).
    pub tcp_total_retrans: u32,
    /// `struct tcp_sock` -> `tcp_clock_cache` (u64, ns of the monotonic
    /// clock): the socket's last clock reading, which TCP refreshes as it sends
    /// and as a receive call reads data, just before the per-call hooks run.
    pub tcp_clock_cache: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 128);

/// Index into the `LOST` per-CPU counter array: where a kernel program had to
/// drop data. Userspace exports each as `observer_events_lost_total{source}`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LostSource {
    /// The session ring buffer was full: a closed session's record was lost.
    SessionRingFull = 0,
    /// The open-session table was full: a new session's birth and owner were not
    /// kept (it is reported at close as adopted).
    SessionTableFull = 1,
    /// The UDP flow table was full: a datagram's bytes were not counted.
    UdpFlowTableFull = 2,
    /// The UDP release ring buffer was full: a released socket's flows end at
    /// their idle timeout instead (a connected socket's once userspace finds
    /// the socket gone from `UDP_SOCKETS`), at their last datagram.
    UdpReleaseRingFull = 3,
    /// The drop counter table was full: a drop (or retransmit, reset) of a
    /// new (reason, interface) pair was not counted.
    DropTableFull = 4,
    /// A datagram on an unconnected UDP socket whose peer no hook saw (a
    /// receive that did not ask for the source address): its bytes are not
    /// counted, there being no flow to count them in.
    UdpPeerUnknown = 5,
    /// A TCP session whose close no hook saw (the kernel's BPF recursion guard
    /// skipped both its state-change program and the socket-destroy hook, or
    /// in the kprobe tier, which has no destroy hook, the one state program):
    /// found when a new socket at the same address was born; its record is
    /// lost.
    SessionCloseMissed = 6,
    /// The table of UDP sockets with flows (`UDP_SOCKETS`) was full: a new
    /// flow's socket was not noted, so its release will not be reported; its
    /// flows end at the idle timeout instead, connected or not.
    UdpSocketTableFull = 7,
    /// kprobe tier: a UDP send or receive call whose return probe never ran (the
    /// kernel had no return-probe instance free: more tasks inside the
    /// function at once than its `maxactive`: one per possible CPU on kernels
    /// built without CONFIG_PREEMPTION, such as Debian's 5.10, else
    /// max(10, 2 x possible CPUs); or a BPF program was running on the CPU
    /// already). Found at the task's next call; the call's bytes are not
    /// counted. A TCP call's return missed is not counted here: TCP bytes
    /// come from the socket's own counters.
    SockCallReturnMissed = 8,
}
/// Number of `LostSource` values (the `LOST` array's length).
pub const LOST_SOURCES: u32 = 9;

/// `DropKey::kind`: what the kernel counted.
pub mod drop_kind {
    /// A packet freed by `kfree_skb` with a drop reason.
    pub const DROP: u32 = 0;
    /// A TCP segment retransmitted (`tcp:tcp_retransmit_skb`, success only).
    pub const TCP_RETRANSMIT: u32 = 1;
    /// A TCP reset sent (`tcp:tcp_send_reset`).
    pub const TCP_RESET_SENT: u32 = 2;
    /// A TCP reset received (`tcp:tcp_receive_reset`).
    pub const TCP_RESET_RECEIVED: u32 = 3;
}

/// `DropKey::reason` when the kernel gives no drop reason (before 5.17).
pub const DROP_REASON_UNKNOWN: u32 = u32::MAX;

/// Key of the per-CPU `DROPS` counter table: the kernel adds one per event,
/// userspace sums the CPUs at every scrape. Never one record per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DropKey {
    /// `drop_kind::*`.
    pub kind: u32,
    /// `enum skb_drop_reason` value (drops only; 0 otherwise).
    pub reason: u32,
    /// Interface index of the packet's device (or its route's device), 0 when
    /// unknown.
    pub ifindex: u32,
    /// Inode of that device's network namespace when it is the observer's
    /// own (`Settings::own_netns_ino`), 0 when unknown, else
    /// `DROP_NETNS_OTHER` with `ifindex` 0: interface indexes are per
    /// namespace, and those of other namespaces are never named, so the
    /// drops of every other namespace (a pod's) share one key per kind and
    /// reason. Keyed by their own inode, namespaces that come and go would
    /// each leave keys behind until the table filled.
    pub netns_ino: u32,
}

/// `DropKey::netns_ino` of a drop in a namespace other than the observer's.
pub const DROP_NETNS_OTHER: u32 = u32::MAX;
const _: () = assert!(core::mem::size_of::<DropKey>() == 16);

/// `sock.sk_protocol` of UDP sockets.
pub const IPPROTO_UDP: u16 = 17;

/// `UdpFlow::flags`: the socket was connected (one peer); the flow is one
/// session until release, never split by the idle timeout.
pub const UDP_FLOW_CONNECTED: u32 = 1 << 0;

/// One UDP flow: a socket and one remote peer. Key of `UDP_FLOWS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpFlowKey {
    /// Kernel address of the socket.
    pub sk: u64,
    /// Peer address, network byte order; IPv4 in the first 4 bytes.
    pub peer_addr: [u8; 16],
    pub peer_port: u16,
    pub family: u16,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<UdpFlowKey>() == 32);

/// Counters of one UDP flow, updated at every send and receive call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpFlow {
    pub first_ns: u64,
    pub last_ns: u64,
    pub active_ns: u64,
    pub bytes_tx: u64,
    pub bytes_rx: u64,
    pub cgroup_id: u64,
    pub pid: u32,
    /// `UDP_FLOW_*` flags.
    pub flags: u32,
    pub comm: [u8; 16],
    pub netns_ino: u32,
    pub local_port: u16,
    pub _pad0: u16,
    /// Local address, network byte order; IPv4 in the first 4 bytes.
    pub local_addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<UdpFlow>() == 96);

/// The flows a UDP socket has had, as the release needs them: value of
/// `UDP_SOCKETS`, one per socket with flows. Most sockets (a connected
/// client, a resolver's query) only ever have one flow, whose key is kept here
/// so that their release ends it by key instead of walking the flow table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpSocketFlows {
    /// Key of the socket's first flow.
    pub first: UdpFlowKey,
    /// Non-zero once the socket has had a flow with another key: its release
    /// must look for all of them.
    pub many: u32,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<UdpSocketFlows>() == 40);

/// A UDP socket that had flows was released: written to `UDP_RELEASES`, with
/// what `UDP_SOCKETS` held for it and, for a socket with one flow, that flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpRelease {
    pub sk: u64,
    pub release_ns: u64,
    pub flows: UdpSocketFlows,
    /// The socket's one flow (`flows.first`), which the release took out of
    /// `UDP_FLOWS`, when `taken` is non-zero (otherwise meaningless).
    /// Userspace then reports it with no map access of its own.
    pub flow: UdpFlow,
    /// Non-zero when `flow` holds the flow: the release's delete of it
    /// succeeded, so no one else (the idle expiry) ended it.
    pub taken: u32,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<UdpRelease>() == 160);

/// A peer address seen by a cgroup sendmsg/recvmsg hook, for the send/receive
/// tracepoint that follows in the same call. Value of `PENDING_PEERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingPeer {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub _pad0: u32,
}
const _: () = assert!(core::mem::size_of::<PendingPeer>() == 24);

/// Key of `PENDING_PEERS`: the socket and the calling thread, so two threads
/// sending on one socket cannot swap each other's peers.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingKey {
    pub sk: u64,
    pub pid_tgid: u64,
}

/// Load-time settings of the programs (global `SETTINGS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Gaps between data calls up to this long count as active time.
    pub active_gap_ns: u64,
    /// Parameters of the `kfree_skb` tracepoint in this kernel: 2 before
    /// drop reasons existed (5.17), 3 or 4 after. The verifier refuses reads
    /// past the last one, and prunes the branch this constant rules out.
    pub kfree_skb_args: u32,
    /// `SKB_NOT_DROPPED_YET` and `SKB_CONSUMED` from this kernel's BTF: not
    /// real drops, skipped in the kernel (u32::MAX when absent).
    pub drop_reason_not_dropped: u32,
    pub drop_reason_consumed: u32,
    /// Parameters of `tcp:tcp_retransmit_skb` (3 from 6.13: an error code).
    pub tcp_retransmit_args: u32,
    /// Inode of the observer's own network namespace: drops in any other one
    /// are counted under `DROP_NETNS_OTHER` (see `DropKey::netns_ino`).
    pub own_netns_ino: u32,
    /// Nonzero: send and receive calls on UDP sockets are not measured (no
    /// UDP flows), because `--disable` switched off `udp_release`, which
    /// ends them (see `Disabled` in observer's kernel/probes.rs).
    pub skip_udp: u32,
}
const _: () = assert!(core::mem::size_of::<Settings>() == 32);

/// Payload bytes from the kernel's TCP sequence counters: `bytes_acked` counts
/// an acknowledged SYN this host sent and an acknowledged FIN, `bytes_received`
/// a received FIN. Returns (transmitted, received).
#[inline(always)]
pub fn payload_bytes(bytes_acked: u64, bytes_received: u64, flags: u32) -> (u64, u64) {
    let flag = |f: u32| (flags & f != 0) as u64;
    let syn = flag(SESSION_ACTIVE_OPEN) & (bytes_acked > 0) as u64;
    (
        bytes_acked.saturating_sub(syn + flag(SESSION_FIN_ACKED)),
        bytes_received.saturating_sub(flag(SESSION_FIN_RECEIVED)),
    )
}

/// TCP states, as in the kernel's `include/net/tcp_states.h` (stable UAPI-like values).
pub mod tcp_state {
    /// Also the state of a connected UDP socket.
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const SYN_RECV: i32 = 3;
    pub const FIN_WAIT1: i32 = 4;
    pub const FIN_WAIT2: i32 = 5;
    pub const TIME_WAIT: i32 = 6;
    pub const CLOSE: i32 = 7;
    pub const CLOSE_WAIT: i32 = 8;
    pub const LAST_ACK: i32 = 9;
    pub const LISTEN: i32 = 10;
    pub const CLOSING: i32 = 11;

    const fn states(list: &[i32]) -> u32 {
        let mut mask = 0;
        let mut i = 0;
        while i < list.len() {
            mask |= 1 << list[i];
            i += 1;
        }
        mask
    }

    #[inline(always)]
    const fn one_of(mask: u32, state: i32) -> bool {
        0 <= state && state < 32 && mask & (1 << state) != 0
    }

    /// Whether a socket in `state` has sent its FIN (queued it: `write_seq`
    /// counts it). Only `tcp_close_state()` leaves ESTABLISHED, SYN_RECV or
    /// CLOSE_WAIT for FIN_WAIT1 or LAST_ACK, and always with a FIN; every
    /// later state but CLOSE follows from those. So the kernel programs read
    /// the FIN from the state at each call and at the close (its old state)
    /// instead of recording the two transitions: a state program that returns
    /// at once there costs a short connection two fewer table lookups.
    #[inline(always)]
    pub const fn fin_sent(state: i32) -> bool {
        one_of(states(&[FIN_WAIT1, FIN_WAIT2, CLOSING, TIME_WAIT, LAST_ACK]), state)
    }

    /// Whether a socket in `state` is a connection that will still pass
    /// through CLOSE, where the state program ends its session: the states
    /// in which a data call may adopt a connection the observer has no entry
    /// for. Not CLOSE itself (a call on a closed socket would leave an entry
    /// that no close removes) nor the handshake's (births, seen as such).
    #[inline(always)]
    pub const fn adoptable(state: i32) -> bool {
        one_of(states(&[ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING]), state)
    }
}

/// Version of the layout of the kernel tables kept across restarts (pinned in
/// bpffs under `--state-dir`, in a directory `v<STATE_LAYOUT_VERSION>`):
/// `OPEN_SESSIONS` (`u64` -> `SessionStart`), `UDP_FLOWS` (`UdpFlowKey` ->
/// `UdpFlow`), `UDP_SOCKETS` (`u64` -> `UdpSocketFlows`) and the rings
/// `SESSIONS` (`SessionRecord`) and `UDP_RELEASES` (`UdpRelease`). A new
/// process reuses only tables of its own version, so bump this whenever one
/// of those structs changes, in size or in meaning (a field reordered, a flag
/// renumbered), or a table changes type; the test `pinned_layout_is_versioned`
/// fails on a size change until it is bumped.
pub const STATE_LAYOUT_VERSION: u32 = 1;

/// Ring sizes in bytes (their `max_entries`): `SESSIONS` holds about 23,000
/// records, `UDP_RELEASES` about 6,000 releases.
pub const SESSIONS_RING_BYTES: u32 = 4 << 20;
pub const UDP_RELEASES_RING_BYTES: u32 = 1 << 20;

/// Sockets one run of the socket probe (`SockProbe`) looks at.
pub const SOCK_PROBE_SLOTS: usize = 64;

/// The socket probe's one entry (`SOCK_PROBE`): userspace fills `sk` and
/// `count` and arms it with its thread id; a program on that thread's next
/// rename of itself (`task:task_rename`) reads each socket's state, family,
/// `SOCK_DEAD` flag and ports and disarms it (`tid` 0). Used once, at a start that
/// reuses pinned tables, to find entries whose socket closed while no observer
/// ran.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockProbe {
    /// Thread id that armed the probe; 0 once the program has answered.
    pub tid: u32,
    /// Sockets in `sk` to look at (at most `SOCK_PROBE_SLOTS`).
    pub count: u32,
    /// Kernel addresses of the sockets (`struct sock *`).
    pub sk: [u64; SOCK_PROBE_SLOTS],
    /// `skc_family` of each, 0 where unreadable.
    pub family: [u16; SOCK_PROBE_SLOTS],
    /// `skc_state` of each.
    pub state: [u8; SOCK_PROBE_SLOTS],
    /// Non-zero where `SOCK_DEAD` is set (the socket was released).
    pub dead: [u8; SOCK_PROBE_SLOTS],
    /// Non-zero where every read succeeded.
    pub read: [u8; SOCK_PROBE_SLOTS],
    /// Local port << 16 | remote port of each (as `SessionStart::ports`).
    pub ports: [u32; SOCK_PROBE_SLOTS],
}
const _: () = assert!(core::mem::size_of::<SockProbe>() == 8 + 8 * 64 + 2 * 64 + 3 * 64 + 4 * 64);

/// `aya::Pod`: aya copies these to and from maps and rings as raw bytes, which
/// is sound for a type whose every byte pattern is a valid value and which has
/// no padding bytes (they would be read uninitialised). Each type below is
/// `repr(C)` of integers and integer arrays with any padding spelled out as
/// `_pad` fields; the size asserted next to its definition fails the build if
/// a field added later leaves a gap.
#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C), only integer and byte-array fields, explicit padding, size asserted.
    unsafe impl aya::Pod for SessionRecord {}
    // SAFETY: repr(C), only integer and byte-array fields, explicit padding, size asserted.
    unsafe impl aya::Pod for SessionStart {}
    // SAFETY: repr(C), only u32 fields, size asserted.
    unsafe impl aya::Pod for KernelOffsets {}
    // SAFETY: repr(C), integer and byte-array fields, explicit padding, size asserted.
    unsafe impl aya::Pod for UdpFlowKey {}
    // SAFETY: repr(C), integer and byte-array fields, explicit padding, size asserted.
    unsafe impl aya::Pod for UdpFlow {}
    // SAFETY: repr(C), integer and byte-array fields, explicit padding, size asserted.
    unsafe impl aya::Pod for UdpRelease {}
    // SAFETY: repr(C), a flow key, a u32 and explicit padding, size asserted.
    unsafe impl aya::Pod for UdpSocketFlows {}
    // SAFETY: repr(C), a u64 and six u32s (one of them explicit padding), size asserted.
    unsafe impl aya::Pod for Settings {}
    // SAFETY: repr(C), four u32 fields, size asserted.
    unsafe impl aya::Pod for DropKey {}
    // SAFETY: repr(C), integers and integer arrays without gaps, size asserted.
    unsafe impl aya::Pod for SockProbe {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syn_and_fin_sequence_numbers_are_not_payload() {
        let all = SESSION_ACTIVE_OPEN | SESSION_FIN_ACKED | SESSION_FIN_RECEIVED;
        assert_eq!(payload_bytes(2_000_002, 12_346, all), (2_000_000, 12_345));
        // A connect that was never answered counted no SYN.
        assert_eq!(payload_bytes(0, 0, SESSION_ACTIVE_OPEN), (0, 0));
        // The passive side's counters start after the handshake.
        assert_eq!(payload_bytes(10, 7, 0), (10, 7));
        // Mid-session (no FIN yet), an active opener's SYN is already counted.
        assert_eq!(payload_bytes(101, 50, SESSION_ACTIVE_OPEN), (100, 50));
    }

    /// The sizes of what is pinned across restarts, as of
    /// `STATE_LAYOUT_VERSION`. A struct that changed size fails here: bump
    /// the version and write the new sizes (and a struct whose fields changed
    /// meaning at the same size needs the bump all the same).
    #[test]
    fn pinned_layout_is_versioned() {
        use core::mem::size_of;
        let sizes = [
            size_of::<SessionStart>(),
            size_of::<UdpFlowKey>(),
            size_of::<UdpFlow>(),
            size_of::<UdpSocketFlows>(),
            size_of::<SessionRecord>(),
            size_of::<UdpRelease>(),
        ];
        let layouts: &[(u32, [usize; 6])] = &[(1, [120, 32, 96, 40, 176, 160])];
        let (version, expected) = layouts[layouts.len() - 1];
        assert_eq!(
            (STATE_LAYOUT_VERSION, sizes),
            (version, expected),
            "a pinned struct changed: bump STATE_LAYOUT_VERSION and add its sizes here"
        );
        assert_eq!((SESSIONS_RING_BYTES, UDP_RELEASES_RING_BYTES), (4 << 20, 1 << 20));
    }

    #[test]
    fn the_fin_is_read_from_the_states_that_follow_it() {
        use tcp_state::*;
        let sent = [FIN_WAIT1, FIN_WAIT2, CLOSING, TIME_WAIT, LAST_ACK];
        for state in -1..40 {
            assert_eq!(fin_sent(state), sent.contains(&state), "state {state}");
        }
        // A connection's whole life, as the state program sees it.
        let open = [ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT, LAST_ACK, CLOSING];
        for state in -1..40 {
            assert_eq!(adoptable(state), open.contains(&state), "state {state}");
        }
    }
}
