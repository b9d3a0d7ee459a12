//! Reading kernel memory at offsets resolved from the running kernel's BTF.
//!
//! Rust eBPF cannot emit CO-RE field relocations, so the loader resolves every
//! field offset the programs need and writes them into `OFFSETS` before loading.
//! A zero offset is never valid for the fields we read, and the loader refuses
//! to start when one is missing, so programs can trust these values.
use aya_ebpf::helpers::bpf_probe_read_kernel;
use observer_common::KernelOffsets;

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
    _pad0: 0,
};

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
