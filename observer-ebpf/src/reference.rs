//! Not the observer: the benchmark's reference tracer, a minimal tcplife-style
//! program that does one job per connection and nothing else, so that the
//! observer's per-connection cost has a peer measured beside it
//! (`cargo xtask bench`, short connections; loaded by
//! `observer/examples/reference_tracer.rs`). Its own object: the observer never
//! loads it.
//!
//! One program on tp_btf `sock:inet_sock_set_state`, as tcplife's: a TCP
//! socket's birth (leaving CLOSE, or LISTEN for a passive child) stores its
//! time in a hash keyed by the socket; its change to CLOSE looks that up,
//! reads the bytes acknowledged and received, adds the connection to an
//! in-kernel log2 histogram of lifetimes (count and bytes per bucket) and
//! deletes the entry. Other changes return before any read. Fields are read
//! the way the observer reads them (direct loads at offsets from the
//! kernel's BTF, `kernel.rs`), so the two differ only in the work done.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "core_intrinsics, which kernel.rs's atomic add needs")]
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "map keys and values go to helpers by address, as in session.rs"
)]

// Shared with the observer's object: the offsets it reads fields at, written
// by the loader. Most of it is unused here.
#[allow(dead_code)]
mod kernel;

use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::{HashMap, PerCpuArray},
    programs::BtfTracePointContext,
};
use observer_common::tcp_state;

use crate::kernel::{Btf, Mem, now_ns, offset};

/// Birth time by socket address; sized like the observer's session table.
#[map(name = "REF_BIRTH")]
static REF_BIRTH: HashMap<u64, u64> = HashMap::with_max_entries(65536, 0);

/// One log2 bucket of lifetimes (microseconds).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Bucket {
    pub connections: u64,
    pub bytes: u64,
}

const BUCKETS: u32 = 64;

/// Lifetimes' log2 histogram, per CPU as bpftrace's `hist()` keeps it.
#[map(name = "REF_LIFETIMES")]
static REF_LIFETIMES: PerCpuArray<Bucket> = PerCpuArray::with_max_entries(BUCKETS, 0);

const BPF_NOEXIST: u64 = 1;

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn ref_life_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    let key = sk as u64;
    if new == tcp_state::CLOSE {
        on_close(sk, key);
    } else if new != tcp_state::LISTEN
        && (old == tcp_state::CLOSE || old == tcp_state::LISTEN)
        && Btf::tcp(sk).is_some()
    {
        let _ = REF_BIRTH.insert(&key, &now_ns(), BPF_NOEXIST);
    }
    0
}

#[inline(always)]
fn on_close(sk: *const u8, key: u64) {
    // SAFETY: the value of a successful lookup, copied out at once.
    let Some(birth) = (unsafe { REF_BIRTH.get(&key) }).copied() else { return };
    let _ = REF_BIRTH.remove(&key);
    let Some(tp) = Btf::tcp(sk) else { return };
    let acked = Btf::read::<u64>(tp, offset!(tcp_bytes_acked)).unwrap_or(0);
    let received = Btf::read::<u64>(tp, offset!(tcp_bytes_received)).unwrap_or(0);
    let micros = now_ns().saturating_sub(birth) / 1000;
    if let Some(bucket) = REF_LIFETIMES.get_ptr_mut(log2(micros)) {
        // SAFETY: this CPU's slot of a per-CPU array, which only this
        // program writes, and not re-entered on this CPU meanwhile.
        let bucket = unsafe { &mut *bucket };
        bucket.connections += 1;
        bucket.bytes += acked + received;
    }
}

/// floor(log2(v)) + 1, 0 for 0: bpftrace's `hist()` bucket, without a loop.
#[inline(always)]
fn log2(mut v: u64) -> u32 {
    if v == 0 {
        return 0;
    }
    let mut r = 1;
    for shift in [32, 16, 8, 4, 2, 1] {
        if v >> shift != 0 {
            v >>= shift;
            r += shift;
        }
    }
    r
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: the one symbol named `LICENSE`, in the section the loader reads the
// program licence from.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
