//! Reading kernel memory at offsets resolved from the running kernel's BTF.
//!
//! Rust eBPF cannot emit CO-RE field relocations, so the loader resolves every
//! field offset the programs need and writes them into `OFFSETS` before loading.
//! A zero offset is never valid for the fields we read, and the loader refuses
//! to start when one is missing, so programs can trust these values.
use aya_ebpf::helpers::bpf_probe_read_kernel;
use observer_common::{KernelOffsets, Settings};

#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
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
};

/// Program settings the loader wrote (see `Settings`).
#[unsafe(no_mangle)]
static SETTINGS: Settings = Settings {
    active_gap_ns: 0,
    kfree_skb_args: 0,
    drop_reason_not_dropped: 0,
    drop_reason_consumed: 0,
    tcp_retransmit_args: 0,
};

#[inline(always)]
pub fn settings() -> Settings {
    unsafe { core::ptr::read_volatile(&SETTINGS) }
}

/// The offsets the loader wrote. `read_volatile` keeps the compiler from
/// folding the placeholder zeros above into the code.
#[inline(always)]
pub fn offsets() -> KernelOffsets {
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// Reads a `T` at `base + offset` in kernel memory; `None` if the read faults.
#[inline(always)]
pub fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T).ok() }
}

/// Follows a pointer field: `*(base + offset)` as an address, `None` if null
/// or unreadable.
#[inline(always)]
pub fn deref(base: *const u8, offset: u32) -> Option<*const u8> {
    match read::<u64>(base, offset) {
        Some(0) | None => None,
        Some(p) => Some(p as *const u8),
    }
}

/// Local and remote address of a socket as 16-byte arrays (IPv4 in the first
/// 4 bytes) with the family: the layout every record uses.
#[inline(always)]
pub fn addresses(sk: *const u8, off: &KernelOffsets) -> (u16, [u8; 16], [u8; 16]) {
    let family = read::<u16>(sk, off.skc_family).unwrap_or(0);
    let mut local = [0u8; 16];
    let mut remote = [0u8; 16];
    if family == observer_common::AF_INET6 {
        local = read::<[u8; 16]>(sk, off.skc_v6_rcv_saddr).unwrap_or([0; 16]);
        remote = read::<[u8; 16]>(sk, off.skc_v6_daddr).unwrap_or([0; 16]);
    } else {
        local[..4].copy_from_slice(&read::<[u8; 4]>(sk, off.skc_rcv_saddr).unwrap_or([0; 4]));
        remote[..4].copy_from_slice(&read::<[u8; 4]>(sk, off.skc_daddr).unwrap_or([0; 4]));
    }
    (family, local, remote)
}

/// Inode of the socket's network namespace, 0 if unreadable.
#[inline(always)]
pub fn netns_ino(sk: *const u8, off: &KernelOffsets) -> u32 {
    deref(sk, off.skc_net).and_then(|net| read::<u32>(net, off.net_ns_inum)).unwrap_or(0)
}

/// Adds the time since the previous data call to `active` when the gap is
/// short enough to count as the same burst of activity.
#[inline(always)]
pub fn advance_active(last: &mut u64, active: &mut u64, now: u64) {
    let gap = now.saturating_sub(*last);
    if *last != 0 && gap <= settings().active_gap_ns {
        *active += gap;
    }
    *last = now;
}
