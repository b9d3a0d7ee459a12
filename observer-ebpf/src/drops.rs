//! Packet drops with the kernel's drop reason, TCP retransmits and resets:
//! counted here, per (kind, reason, interface, namespace), in a per-CPU hash
//! map that userspace sums at every scrape. Never one event per packet, so a
//! drop flood costs a map update per packet and nothing in userspace.
use aya_ebpf::{
    macros::{btf_tracepoint, map},
    maps::PerCpuHashMap,
    programs::BtfTracePointContext,
};
use observer_common::{DROP_NETNS_OTHER, DROP_REASON_UNKNOWN, DropKey, LostSource, drop_kind};

use crate::{
    diag,
    kernel::{Btf, Mem, Probe, netns_ino, offset, settings},
    maps::{BPF_NOEXIST, EEXIST, count_lost},
};

/// Counters by `DropKey`. The key space stays small under namespace churn:
/// every namespace but the observer's shares one key per kind and reason
/// (`key`); keys of the observer's interfaces that are gone are deleted by
/// userspace once it has read them. Userspace keeps per-key totals to add
/// deltas. Preallocated (flags 0) like the other hash maps, for older kernels.
#[map(name = "DROPS")]
pub static DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn count(key: &DropKey) {
    if let Some(slot) = DROPS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of `key` from a successful lookup (see
        // `maps`, "Map values"). No other CPU writes this CPU's copy; a
        // program nested on this CPU at worst loses one count.
        unsafe { *slot += 1 };
        return;
    }
    match DROPS.insert(key, 1u64, BPF_NOEXIST) {
        Ok(()) => {}
        // Another CPU created the entry between our lookup and insert: it
        // now exists, and this CPU's slot of it is zero.
        Err(e) if e == -EEXIST => {
            if let Some(slot) = DROPS.get_ptr_mut(key) {
                // SAFETY: as above, the value a successful lookup returned.
                unsafe { *slot += 1 };
            }
        }
        Err(_) => {
            count_lost(LostSource::DropTableFull);
            if diag::on() {
                diag::drop_table_full(key.kind, key.reason, key.ifindex);
            }
        }
    }
}

/// The key of a drop of `kind` and `reason` at (ifindex, netns inode): a
/// namespace other than the observer's is folded into `DROP_NETNS_OTHER`.
#[inline(always)]
fn key(kind: u32, reason: u32, (ifindex, netns_ino): (u32, u32)) -> DropKey {
    if netns_ino != 0 && netns_ino != settings().own_netns_ino {
        return DropKey { kind, reason, ifindex: 0, netns_ino: DROP_NETNS_OTHER };
    }
    DropKey { kind, reason, ifindex, netns_ino }
}

/// (ifindex, netns inode) of a network device, zeros when unreadable. `M`:
/// `Btf` for a device pointer loaded from a BTF-typed argument's fields,
/// `Probe` for one found through a plain integer (see `skb_device`).
#[inline(always)]
fn device<M: Mem>(dev: Option<*const u8>) -> (u32, u32) {
    let Some(dev) = dev else { return (0, 0) };
    let ifindex = M::read::<u32>(dev, offset!(netdev_ifindex)).unwrap_or(0);
    let netns =
        M::deref(dev, offset!(netdev_net)).and_then(|net| M::read::<u32>(net, offset!(net_ns_inum))).unwrap_or(0);
    (ifindex, netns)
}

/// The device of a packet: `skb->dev` (set on receive, and on transmit once
/// routed), else the device of its route (`skb_dst(skb)->dev`), which is how
/// a packet dropped on output before `dev` is set still gets an interface.
/// `skb` is a tp_btf argument: its fields are direct loads (`Btf`), a helper
/// call each saved at every drop; the route is a tagged integer, which only
/// `Probe` may follow.
#[inline(always)]
fn skb_device(skb: *const u8) -> (u32, u32) {
    if let Some(dev) = Btf::deref(skb, offset!(skb_dev)) {
        return device::<Btf>(Some(dev));
    }
    // The lowest bit of _skb_refdst is SKB_DST_NOREF, not address.
    let dst = Btf::read::<u64>(skb, offset!(skb_refdst)).unwrap_or(0) & !1;
    if dst == 0 {
        return (0, 0);
    }
    device::<Probe>(Probe::deref(dst as *const u8, offset!(dst_dev)))
}

/// The device of a socket's cached route, with the socket's namespace when
/// there is no route. `sk` is a tp_btf argument (`Btf`).
#[inline(always)]
fn sock_device(sk: *const u8) -> (u32, u32) {
    let dev = Btf::deref(sk, offset!(sk_dst_cache)).and_then(|dst| Btf::deref(dst, offset!(dst_dev)));
    match device::<Btf>(dev) {
        (0, _) => (0, netns_ino::<Btf>(sk)),
        found => found,
    }
}

/// tp_btf `skb:kfree_skb`. 6.18: `TP_PROTO(struct sk_buff *skb, void
/// *location, enum skb_drop_reason reason, struct sock *rx_sk)`; 5.17+ has
/// the first three, older kernels only the first two (then the reason is
/// unknown). `SKB_NOT_DROPPED_YET` and `SKB_CONSUMED` are skipped here: they
/// mark a packet freed after normal use, not a drop (`consume_skb` has its
/// own tracepoint, but some paths free through kfree_skb with these values).
#[btf_tracepoint(function = "kfree_skb")]
pub fn obs_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    let set = settings();
    let skb: *const u8 = ctx.arg(0);
    let reason = if set.kfree_skb_args >= 3 {
        let reason: u32 = ctx.arg(2);
        if reason == set.drop_reason_not_dropped || reason == set.drop_reason_consumed {
            return 0;
        }
        reason
    } else {
        DROP_REASON_UNKNOWN
    };
    if skb.is_null() {
        return 0;
    }
    count(&key(drop_kind::DROP, reason, skb_device(skb)));
    0
}

/// tp_btf `tcp:tcp_retransmit_skb`: `TP_PROTO(const struct sock *sk, const
/// struct sk_buff *skb[, int err])`. From 6.13 it also fires for failed
/// attempts (err != 0), which sent nothing and are not counted.
#[btf_tracepoint(function = "tcp_retransmit_skb")]
pub fn obs_tcp_retrans(ctx: BtfTracePointContext) -> i32 {
    if settings().tcp_retransmit_args >= 3 {
        let err: i32 = ctx.arg(2);
        if err != 0 {
            return 0;
        }
    }
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    count(&key(drop_kind::TCP_RETRANSMIT, 0, sock_device(sk)));
    0
}

/// tp_btf `tcp:tcp_send_reset`: `TP_PROTO(const struct sock *sk, const struct
/// sk_buff *skb[, enum sk_rst_reason reason])`. `skb` is the packet answered
/// with the reset (NULL for an active reset), `sk` NULL when no socket
/// matched it (a connection to a closed port).
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn obs_tcp_rst_tx(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let skb: *const u8 = ctx.arg(1);
    let place = if !skb.is_null() {
        skb_device(skb)
    } else if !sk.is_null() {
        sock_device(sk)
    } else {
        (0, 0)
    };
    count(&key(drop_kind::TCP_RESET_SENT, 0, place));
    0
}

/// tp_btf `tcp:tcp_receive_reset`: `TP_PROTO(struct sock *sk)`.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn obs_tcp_rst_rx(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    count(&key(drop_kind::TCP_RESET_RECEIVED, 0, sock_device(sk)));
    0
}
