//! Reading kernel memory at offsets resolved from the running kernel's BTF.
//!
//! Rust eBPF cannot emit CO-RE field relocations, so the loader resolves every
//! field offset the programs need and writes them into `OFFSETS` before loading.
//! A zero offset is never valid for the fields we read, and the loader refuses
//! to start when one is missing, so programs can trust these values. `.rodata`
//! is frozen before the programs load, so the verifier reads these offsets as
//! constants: that is what lets `Btf` load fields directly.
use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_jiffies64, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_skc_to_tcp_sock,
};
use observer_common::{KernelOffsets, Settings};

// SAFETY: no other symbol of the object is named `OFFSETS`; the loader finds
// this one by that name to write the offsets into it.
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: KernelOffsets = KernelOffsets {
    tcp_bytes_acked: 0,
    tcp_bytes_received: 0,
    skc_family: 0,
    skc_state: 0,
    inet_sport: 0,
    skc_dport: 0,
    skc_rcv_saddr: 0,
    skc_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_v6_daddr: 0,
    skc_net: 0,
    net_ns_inum: 0,
    rx_dst_ifindex: 0,
    sk_protocol: 0,
    sk_flags: 0,
    sock_done_bit: 0,
    sock_dead_bit: 0,
    tcp_snd_una: 0,
    tcp_write_seq: 0,
    sk_dst_cache: 0,
    dst_dev: 0,
    netdev_ifindex: 0,
    socket_sk: 0,
    tcp_chrono_start: 0,
    tcp_chrono_stat: 0,
    tcp_chrono_type_byte: 0,
    tcp_chrono_type_shift: 0,
    skb_dev: 0,
    skb_refdst: 0,
    netdev_net: 0,
    tcp_total_retrans: 0,
    tcp_clock_cache: 0,
};

/// Program settings the loader wrote (see `Settings`).
// SAFETY: the only symbol named `SETTINGS`, which the loader writes by name.
#[unsafe(no_mangle)]
static SETTINGS: Settings = Settings {
    active_gap_ns: 0,
    kfree_skb_args: 0,
    drop_reason_not_dropped: 0,
    drop_reason_consumed: 0,
    tcp_retransmit_args: 0,
    own_netns_ino: 0,
    skip_udp: 0,
};

#[inline(always)]
pub fn settings() -> Settings {
    // SAFETY: a reference to a static is a valid, aligned pointer to an
    // initialised `Settings`; volatile only so that the compiler reads what
    // the loader wrote instead of folding the placeholder zeros above.
    unsafe { core::ptr::read_volatile(&SETTINGS) }
}

/// Whether UDP sockets' calls are left alone (`Settings::skip_udp`). Read as
/// one field of the frozen `.rodata`, so the verifier knows it as a constant
/// and prunes the UDP path when it is set.
#[inline(always)]
pub fn skip_udp() -> bool {
    // SAFETY: as in `settings`, a field of a static.
    unsafe { core::ptr::read_volatile(&SETTINGS.skip_udp) != 0 }
}

/// One offset the loader wrote, as `offset!(skc_state)`. Read field by field
/// from the frozen `.rodata` map: the verifier then knows each value as a
/// constant, which direct loads (`Btf`) need, while a copy of the whole struct
/// on the stack would lose that for fields not 8-byte aligned. `read_volatile`
/// keeps the compiler from folding the placeholder zeros above into the code.
macro_rules! offset {
    ($field:ident) => {
        // SAFETY: a reference to a field of a static: valid, aligned and
        // initialised (volatile for the reason above).
        unsafe { core::ptr::read_volatile(&$crate::kernel::OFFSETS.$field) }
    };
}
pub(crate) use offset;

/// How a program reads kernel memory, chosen by its hook. tp_btf and fentry
/// arguments are BTF-typed pointers: the verifier lets a program load their
/// fields directly (`Btf`), a plain load that the JIT guards against faults,
/// instead of a helper call per field (`Probe`, about 45 ns each, measured in
/// BENCHMARKS.md). kprobe arguments are plain integers, which only
/// `bpf_probe_read_kernel` may follow.
pub trait Mem {
    /// Reads a `T` at `base + offset`; `None` if the read faults (`Probe`;
    /// a faulting direct load reads as zero instead). `T` must be one scalar
    /// field of the kernel struct at that place (or a pointer field, whole):
    /// that is all the verifier allows a direct load to touch.
    fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T>;

    /// `sk` as a base for `struct tcp_sock` fields (every offset stays relative
    /// to the socket); `None` if it is not a full TCP socket. A direct load
    /// beyond `struct sock` is refused unless the pointer is typed as the
    /// larger struct, which `bpf_skc_to_tcp_sock` gives.
    fn tcp(sk: *const u8) -> Option<*const u8>;

    /// Follows a pointer field: `*(base + offset)` as an address, `None` if
    /// null or unreadable.
    #[inline(always)]
    fn deref(base: *const u8, offset: u32) -> Option<*const u8> {
        match Self::read::<*const u8>(base, offset) {
            Some(p) if !p.is_null() => Some(p),
            _ => None,
        }
    }
}

/// `bpf_probe_read_kernel` for every field: works on any address.
pub enum Probe {}

impl Mem for Probe {
    #[inline(always)]
    fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
        // SAFETY: `bpf_probe_read_kernel` copies into a value of our own and
        // fails (`None`) instead of faulting when the address is unreadable,
        // so any `base` is sound; `offset` is a field offset of `base`'s
        // struct from the running kernel's BTF, so the sum stays inside it.
        unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T).ok() }
    }

    #[inline(always)]
    fn tcp(sk: *const u8) -> Option<*const u8> {
        Some(sk)
    }
}

/// Direct loads from BTF-typed pointers (tp_btf and fentry arguments, and
/// pointers loaded from their fields).
pub enum Btf {}

impl Mem for Btf {
    #[inline(always)]
    fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
        // SAFETY: `base` is a BTF-typed kernel pointer (a tp_btf or fentry
        // argument, or a pointer loaded from one's fields) and `offset` one of
        // its struct's fields (BTF, above). The verifier checks the load
        // against that type and the JIT turns a faulting one into a read of
        // zero, so it cannot fault; volatile keeps it one load of `T`'s width.
        Some(unsafe { core::ptr::read_volatile(base.add(offset as usize) as *const T) })
    }

    #[inline(always)]
    fn tcp(sk: *const u8) -> Option<*const u8> {
        // SAFETY: the helper takes a BTF-typed socket pointer (the verifier
        // checks that `sk` is one) and returns NULL unless it is a full TCP
        // socket.
        let tp = unsafe { bpf_skc_to_tcp_sock(sk as *mut _) } as *const u8;
        if tp.is_null() { None } else { Some(tp) }
    }
}

/// An IPv4 or IPv6 address as four 32-bit words in memory order: the 16-byte
/// layout every record uses (`addr_bytes`), IPv4 in the first word. Words, not
/// bytes, while a program works on it: LLVM splits a `[u8; 16]` assembled in
/// pieces into sixteen one-byte values, spilled and reassembled one by one, and
/// zeroes the rest of one with a call to a byte-at-a-time `memset` (BPF has no
/// faster one); that cost every UDP call and every session close.
pub type Addr = [u32; 4];

/// `addr` in a record's `[u8; 16]` field.
#[inline(always)]
pub fn addr_bytes(addr: Addr) -> [u8; 16] {
    // SAFETY: both are 16 plain bytes; every bit pattern is valid for each.
    unsafe { core::mem::transmute::<Addr, [u8; 16]>(addr) }
}

/// Local and remote address of a socket (`Addr`) with the family. IPv6
/// addresses are read with `Probe` in every tier: a direct load must stay
/// within one field, and the verifiers of the kernels we support differ on
/// 8-byte loads from `in6_addr`'s byte array.
#[inline(always)]
pub fn addresses<M: Mem>(sk: *const u8) -> (u16, Addr, Addr) {
    let family = M::read::<u16>(sk, offset!(skc_family)).unwrap_or(0);
    if family == observer_common::AF_INET6 {
        let local = Probe::read::<Addr>(sk, offset!(skc_v6_rcv_saddr)).unwrap_or([0; 4]);
        let remote = Probe::read::<Addr>(sk, offset!(skc_v6_daddr)).unwrap_or([0; 4]);
        return (family, local, remote);
    }
    let local = M::read::<u32>(sk, offset!(skc_rcv_saddr)).unwrap_or(0);
    let remote = M::read::<u32>(sk, offset!(skc_daddr)).unwrap_or(0);
    (family, [local, 0, 0, 0], [remote, 0, 0, 0])
}

/// The current task's name, written into `comm` in place (all zero if the
/// kernel cannot tell: the helper fills every byte either way). aya's
/// `bpf_get_current_comm` zeroes a buffer of its own first, which compiles to a
/// call to BPF's byte-at-a-time `memset`.
#[inline(always)]
pub fn current_comm(comm: &mut [u8; 16]) {
    // SAFETY: the helper writes at most 16 bytes to a buffer that holds 16.
    unsafe { aya_ebpf::helpers::generated::bpf_get_current_comm(comm.as_mut_ptr().cast(), 16) };
}

/// Zeroes `slot` in place, 8 bytes at a time with volatile stores, which LLVM
/// may not merge into a `memset`, and hands it back initialised: a zeroed
/// struct built the plain way compiles to a call to BPF's byte-at-a-time
/// `memset` (LLVM's BPF backend expands copies inline but not fills), about
/// 400 instructions for a `SessionStart` at every session birth. In place, as
/// moving the result out would let LLVM turn the copy back into fills.
///
/// # Safety
/// All-zero bytes must be a valid `T` (plain integers and arrays of them).
#[inline(always)]
pub unsafe fn zeroed<T>(slot: &mut core::mem::MaybeUninit<T>) -> &mut T {
    const { assert!(core::mem::size_of::<T>().is_multiple_of(8) && core::mem::align_of::<T>() >= 8) };
    let words = slot.as_mut_ptr().cast::<u64>();
    for i in 0..core::mem::size_of::<T>() / 8 {
        // SAFETY: within `slot`, aligned (asserted above).
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: every byte is written; the caller vouches that zero is valid.
    unsafe { slot.assume_init_mut() }
}

/// `bpf_ktime_get_ns()`: nanoseconds since boot (CLOCK_MONOTONIC).
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: a helper that takes no arguments and reads only the clock.
    unsafe { bpf_ktime_get_ns() }
}

/// `bpf_jiffies64()`: the kernel's jiffies, the clock of TCP's chrono fields.
#[inline(always)]
pub fn jiffies() -> u64 {
    // SAFETY: a helper that takes no arguments and reads only the clock.
    unsafe { bpf_jiffies64() }
}

/// `bpf_get_current_cgroup_id()`: the cgroup v2 id of the current task.
#[inline(always)]
pub fn current_cgroup_id() -> u64 {
    // SAFETY: a helper that takes no arguments and reads only the current task.
    unsafe { bpf_get_current_cgroup_id() }
}

/// Local and remote port of a socket, in host order (0 if unreadable).
#[inline(always)]
pub fn ports<M: Mem>(sk: *const u8) -> (u16, u16) {
    let port = |offset| u16::from_be(M::read::<u16>(sk, offset).unwrap_or(0));
    (port(offset!(inet_sport)), port(offset!(skc_dport)))
}

/// Inode of the socket's network namespace, 0 if unreadable.
#[inline(always)]
pub fn netns_ino<M: Mem>(sk: *const u8) -> u32 {
    M::deref(sk, offset!(skc_net)).and_then(|net| M::read::<u32>(net, offset!(net_ns_inum))).unwrap_or(0)
}

/// Adds `n` to a counter in a map value that calls on other CPUs may update
/// at the same moment (two threads or processes sharing one socket), as one
/// atomic add: neither CPU's increment is lost. The sum is not fetched, so this
/// is BPF's plain atomic add (`lock *(u64 *)(r + off) += n`, `BPF_XADD`), which
/// every kernel's verifier accepts; the fetching forms (and atomic and, or,
/// exchange) need 5.12, and a 5.10 verifier refuses a program that holds one
/// anywhere, even in a branch it would prune.
#[inline(always)]
pub fn add_shared(counter: *mut u64, n: u64) {
    // SAFETY: `counter` points into the value of a successful map lookup (see
    // `maps`, "Map values"): valid for the program run and 8-byte aligned (a
    // u64 field of a repr(C) value whose alignment is 8). Every writer of it
    // that may run concurrently goes through this atomic add.
    // `AtomicU64::fetch_add` does not exist for a target without
    // compare-and-swap, which BPF before 5.12 is; the intrinsic is the
    // atomic add itself, and its result (the fetch) is left unused.
    unsafe { core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(counter, n) };
}

/// Raises a value in a map value that calls on other CPUs may write at the
/// same moment to `new`, if `new` is larger: a later reading never goes back
/// to an older one. Without compare-and-swap (5.12) two writers racing here
/// can still leave the smaller of their two values until the next call.
#[inline(always)]
pub fn raise_shared(value: *mut u64, new: u64) {
    // SAFETY: as in `add_shared`; a plain aligned load and store of a u64,
    // each one instruction, so no reader sees half of a write.
    unsafe {
        if new > value.read_volatile() {
            value.write_volatile(new);
        }
    }
}

/// Adds the time since the previous data call to `active` when the gap is
/// short enough to count as the same burst of activity; `last` becomes `now`.
/// Both live in a map value that calls on other CPUs update at the same
/// moment: the add is atomic (`add_shared`) and `last` only moves forward, so
/// a call that finds a later one already recorded adds nothing. Two calls that
/// read the same `last` in the few instructions before either stores both
/// count their gap from it: without an atomic exchange (5.12) that overlap,
/// at most one active gap per such race, is the one inexactness left.
#[inline(always)]
pub fn advance_active(last: *mut u64, active: *mut u64, now: u64) {
    // SAFETY: as in `add_shared`; plain aligned u64 load and store.
    let prev = unsafe { last.read_volatile() };
    if now <= prev {
        return;
    }
    // SAFETY: as above.
    unsafe { last.write_volatile(now) };
    if prev != 0 && now - prev <= settings().active_gap_ns {
        add_shared(active, now - prev);
    }
}
