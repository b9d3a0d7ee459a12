//! Packet drops, TCP retransmits and resets: the kernel counts them per
//! (kind, reason, interface, namespace) in the per-CPU `DROPS` table; this
//! module names them from the running kernel's BTF and adds what each key
//! gained since the previous scrape to the counters.
use std::{collections::HashMap, ffi::CStr, fs, os::unix::fs::MetadataExt};

use aya::maps::{IterableMap, MapData, PerCpuHashMap};
use observer_common::{DROP_REASON_UNKNOWN, DropKey, Settings, drop_kind};

use crate::{kernel::btf::KernelBtf, metrics::Metrics, session::IfaceFilter};

/// The enum whose enumerators name drop reasons (5.17+).
const REASON_ENUM: &str = "skb_drop_reason";
const REASON_PREFIX: &str = "SKB_DROP_REASON_";

/// The drop-related load-time settings, from the running kernel's BTF.
/// Missing pieces (older kernels) give values the programs treat as absent.
pub fn settings(btf: &KernelBtf) -> Settings {
    let reason = |name: &str| btf.enum_value(REASON_ENUM, name).unwrap_or(u32::MAX);
    Settings {
        kfree_skb_args: btf.tracepoint_params("kfree_skb").map_or(0, |n| n as u32),
        drop_reason_not_dropped: reason("SKB_NOT_DROPPED_YET"),
        drop_reason_consumed: reason("SKB_CONSUMED"),
        tcp_retransmit_args: btf.tracepoint_params("tcp_retransmit_skb").map_or(0, |n| n as u32),
        own_netns_ino: own_netns_ino(),
        ..Settings::default()
    }
}

/// Inode of the observer's network namespace (0 if unreadable): the kernel
/// keys drops by interface only there, and userspace names only its interfaces.
fn own_netns_ino() -> u32 {
    fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino() as u32)
}

/// Whether this kernel's `tcp:tcp_send_reset` tracepoint also fires for
/// resets sent without a full socket: answers to a segment no socket matched
/// (a connection attempt to a closed port) and resets from TIME_WAIT. Until
/// the tracepoint became an event of its own in 2024 (its BTF record
/// `trace_event_raw_tcp_send_reset`: Debian's 6.12 has it, 6.1 does not), it belonged to the `tcp_event_sk_skb`
/// class, which reads the socket, and the kernel called it only when it had a
/// full one: those resets went out untraced, and no tracepoint sees them.
pub fn socketless_resets_traced(btf: &KernelBtf) -> bool {
    btf.has_type("trace_event_raw_tcp_send_reset")
}

/// What `observer_tcp_resets_total{direction="sent"}` leaves out on this
/// kernel, for `observer check` and the start-up log; `None` when nothing.
pub fn sent_resets_limit(btf: &KernelBtf) -> Option<&'static str> {
    (!socketless_resets_traced(btf)).then_some(
        "this kernel's tcp:tcp_send_reset fires only for resets sent by a full socket (kernels before 2024): resets \
         answering a segment no socket matched (a closed port) or sent from TIME_WAIT are not counted as sent",
    )
}

/// What `observer_drops_total` leaves out on this kernel, for `observer
/// check` and the start-up log; `None` when nothing.
pub fn drop_reason_limit(btf: &KernelBtf) -> Option<&'static str> {
    btf.tracepoint_params("kfree_skb").is_ok_and(|n| n < 3).then_some(
        "this kernel's skb:kfree_skb carries no drop reason (kernels before 5.17): every drop is counted with \
         reason=\"unknown\"",
    )
}

/// Label value of a reason enumerator: `SKB_DROP_REASON_NETFILTER_DROP` ->
/// `netfilter_drop`.
pub fn reason_label(enumerator: &str) -> String {
    enumerator.strip_prefix(REASON_PREFIX).unwrap_or(enumerator).to_ascii_lowercase()
}

/// Reason names by value, from the running kernel (never a compiled-in
/// table: values are renumbered between kernel versions).
pub fn reason_names(btf: &KernelBtf) -> HashMap<u32, String> {
    btf.enum_members(REASON_ENUM)
        .map(|members| members.into_iter().map(|(v, name)| (v, reason_label(&name))).collect())
        .unwrap_or_default()
}

/// What the kernel counted, read at every scrape.
pub struct DropCounters {
    map: PerCpuHashMap<MapData, DropKey, u64>,
    /// Per-key totals already added to the metrics.
    seen: HashMap<DropKey, u64>,
    reasons: HashMap<u32, String>,
    /// The observer's own network namespace: interface indexes of other
    /// namespaces cannot be named here (the kernel folds them, see
    /// `DropKey::netns_ino`).
    own_netns: u32,
}

impl DropCounters {
    pub fn new(map: PerCpuHashMap<MapData, DropKey, u64>, btf: &KernelBtf) -> Self {
        Self { map, seen: HashMap::new(), reasons: reason_names(btf), own_netns: own_netns_ino() }
    }

    /// Adds every key's growth since the last call to the metrics. Keys whose
    /// interface is not selected with --iface are tracked but not reported.
    /// A key of an interface that is gone is deleted once read, with its
    /// total here: interfaces come and go with pods (a veth per pod on the
    /// host), and their keys would otherwise fill the table. What it counted
    /// is exported already, and the counters stay monotonic: a new interface
    /// that reuses the index starts a new key from zero.
    pub fn sync(&mut self, filter: &IfaceFilter, metrics: &Metrics) {
        // Bounded walk: a key space larger than the table cannot exist.
        let capacity = self.map.map().info().map_or(4096, |info| info.max_entries() as usize);
        let keys: Vec<DropKey> = self.map.keys().take(2 * capacity).filter_map(Result::ok).collect();
        let mut entries = keys.len();
        for key in keys {
            let Ok(values) = self.map.get(&key, 0) else { continue };
            let total: u64 = values.iter().sum();
            let seen = self.seen.entry(key).or_insert(0);
            let delta = total.saturating_sub(*seen);
            *seen = total;
            if delta == 0 {
                // Only an idle key can be a gone interface's. A drop counted
                // between the read above and the delete would be lost: the
                // interface is gone, so none is expected.
                if self.interface_gone(&key) && self.map.remove(&key).is_ok() {
                    self.seen.remove(&key);
                    entries -= 1;
                }
                continue;
            }
            if !filter.accepts_interfaces(key.netns_ino, key.ifindex, key.ifindex) {
                continue;
            }
            let iface = self.iface_name(&key);
            match key.kind {
                drop_kind::DROP => metrics.add_drops(&self.reason(key.reason), &iface, delta),
                drop_kind::TCP_RETRANSMIT => metrics.add_tcp_retransmits(&iface, delta),
                drop_kind::TCP_RESET_SENT => metrics.add_tcp_resets("sent", &iface, delta),
                drop_kind::TCP_RESET_RECEIVED => metrics.add_tcp_resets("received", &iface, delta),
                _ => {}
            }
        }
        metrics.telemetry.map_usage("drops", entries, capacity);
    }

    /// Whether `key` names an interface of the observer's namespace that no
    /// longer exists.
    fn interface_gone(&self, key: &DropKey) -> bool {
        key.ifindex != 0 && key.netns_ino == self.own_netns && index_to_name(key.ifindex).is_none()
    }

    fn reason(&self, value: u32) -> String {
        if value == DROP_REASON_UNKNOWN {
            return "unknown".into();
        }
        // A value this kernel's enum does not name (a subsystem's own
        // reasons, e.g. mac80211 or openvswitch, live in the high bits).
        self.reasons.get(&value).cloned().unwrap_or_else(|| "unknown".into())
    }

    /// The interface's name in the observer's namespace; "" when the packet
    /// had no device, or its device lives in another namespace (a pod).
    fn iface_name(&self, key: &DropKey) -> String {
        if key.ifindex == 0 || key.netns_ino != self.own_netns {
            return String::new();
        }
        index_to_name(key.ifindex).unwrap_or_default()
    }
}

fn index_to_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_labels_drop_the_prefix_and_lowercase() {
        assert_eq!(reason_label("SKB_DROP_REASON_NETFILTER_DROP"), "netfilter_drop");
        assert_eq!(reason_label("SKB_DROP_REASON_TCP_INVALID_SEQUENCE"), "tcp_invalid_sequence");
        assert_eq!(reason_label("SKB_CONSUMED"), "skb_consumed");
    }

    #[test]
    fn loopback_is_named() {
        assert_eq!(index_to_name(1).as_deref(), Some("lo"));
        assert_eq!(index_to_name(0), None);
    }

    #[test]
    fn reasons_come_from_this_kernel() {
        let Ok(btf) = KernelBtf::open(std::path::Path::new(crate::kernel::btf::DEFAULT_BTF_PATH)) else { return };
        let names = reason_names(&btf);
        assert!(names.values().any(|n| n == "netfilter_drop"), "{names:?}");
        assert!(names.values().any(|n| n == "socket_rcvbuff"), "{names:?}");
        let s = settings(&btf);
        assert!(s.kfree_skb_args >= 3);
        assert_eq!(s.drop_reason_not_dropped, 0);
        assert_ne!(s.drop_reason_consumed, u32::MAX);
        // The reason argument came with or after the change that made the
        // tracepoint trace resets without a socket.
        if btf.tracepoint_params("tcp_send_reset").is_ok_and(|n| n >= 3) {
            assert!(socketless_resets_traced(&btf));
            assert_eq!(sent_resets_limit(&btf), None);
        }
    }
}
