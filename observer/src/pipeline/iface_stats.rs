//! Traffic and drop counters of the interfaces selected with `--iface`, read
//! at every scrape from `/proc/thread-self/net/dev`: the kernel's own
//! per-device statistics, in the reading thread's network namespace (which
//! is the observer's; `/sys/class/net` would show the namespace that mounted
//! /sys instead).
use std::collections::HashMap;

use crate::metrics::Metrics;

const PROC_NET_DEV: &str = "/proc/thread-self/net/dev";

/// One interface's counters from a `/proc/net/dev` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DevCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    /// Packets the device (driver or core) dropped on receive: the `drop`
    /// column (`rx_dropped` + `rx_missed_errors`).
    pub rx_drops: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_drops: u64,
}

/// Parses `/proc/net/dev`. Columns after `name:` are receive bytes, packets,
/// errs, drop, fifo, frame, compressed, multicast, then transmit bytes,
/// packets, errs, drop, fifo, colls, carrier, compressed.
pub fn parse_proc_net_dev(text: &str) -> HashMap<String, DevCounters> {
    let mut out = HashMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else { continue };
        let v: Vec<u64> = rest.split_whitespace().filter_map(|f| f.parse().ok()).collect();
        if v.len() < 16 {
            continue;
        }
        out.insert(
            name.trim().to_owned(),
            DevCounters {
                rx_bytes: v[0],
                rx_packets: v[1],
                rx_drops: v[3],
                tx_bytes: v[8],
                tx_packets: v[9],
                tx_drops: v[11],
            },
        );
    }
    out
}

/// The selected interfaces and what was already added to the metrics.
pub struct InterfaceStats {
    names: Vec<String>,
    seen: HashMap<String, DevCounters>,
}

impl InterfaceStats {
    pub fn new(names: Vec<String>) -> Self {
        Self { names, seen: HashMap::new() }
    }

    /// Adds each selected interface's growth since the last scrape. The first
    /// read counts everything since the interface was created, so the
    /// counters match the kernel's; an interface recreated (counters
    /// restarted) starts over from its new values.
    pub fn sync(&mut self, metrics: &Metrics) {
        if self.names.is_empty() {
            return;
        }
        let Ok(text) = std::fs::read_to_string(PROC_NET_DEV) else { return };
        let now = parse_proc_net_dev(&text);
        let qdisc = qdisc_drops().unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read qdisc statistics; interface drops exclude qdisc drops");
            HashMap::new()
        });
        for name in &self.names {
            let Some(cur) = now.get(name) else { continue };
            // Packets a qdisc dropped never reached the device: they count as
            // the interface's transmit drops, so drops / (drops + packets) is
            // the share of what the host tried to send.
            let mut cur = *cur;
            cur.tx_drops +=
                crate::pipeline::interfaces::index_of(name).and_then(|i| qdisc.get(&i)).copied().unwrap_or(0);
            let cur = &cur;
            let prev = self.seen.get(name).copied().unwrap_or_default();
            let d = |c: u64, p: u64| if c >= p { c - p } else { c };
            let rx =
                [d(cur.rx_packets, prev.rx_packets), d(cur.rx_bytes, prev.rx_bytes), d(cur.rx_drops, prev.rx_drops)];
            let tx =
                [d(cur.tx_packets, prev.tx_packets), d(cur.tx_bytes, prev.tx_bytes), d(cur.tx_drops, prev.tx_drops)];
            metrics.add_interface(name, "receive", rx);
            metrics.add_interface(name, "transmit", tx);
            self.seen.insert(name.clone(), *cur);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernel_format() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo: 109896351   84207    0    3    0     0          0         0 109896352   84208    0    4    0     0       0          0\n  \
eth0:1 2 0 5 0 0 0 0 3 4 0 6 0 0 0 0\n";
        let m = parse_proc_net_dev(text);
        assert_eq!(
            m["lo"],
            DevCounters {
                rx_bytes: 109896351,
                rx_packets: 84207,
                rx_drops: 3,
                tx_bytes: 109896352,
                tx_packets: 84208,
                tx_drops: 4
            }
        );
        assert_eq!(m["eth0"].rx_drops, 5);
        assert_eq!(m["eth0"].tx_packets, 4);
    }

    #[test]
    fn this_threads_namespace_has_loopback() {
        let text = std::fs::read_to_string(PROC_NET_DEV).unwrap();
        assert!(parse_proc_net_dev(&text).contains_key("lo"));
    }
}

/// Packets dropped by each interface's root queueing discipline (queue full,
/// rate limit, policing), by interface index: `tc -s qdisc`'s "dropped", from
/// an RTM_GETQDISC netlink dump in the observer's network namespace. Child
/// qdiscs are not added: a root qdisc's statistics already include them.
pub fn qdisc_drops() -> std::io::Result<HashMap<u32, u64>> {
    const RTM_NEWQDISC: u16 = 36;
    const RTM_GETQDISC: u16 = 38;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const TC_H_ROOT: u32 = 0xFFFF_FFFF;
    const TCA_STATS: u16 = 3;
    const TCA_STATS2: u16 = 7;
    const TCA_STATS_QUEUE: u16 = 3;
    const NLMSG_HDR: usize = 16;
    const TCMSG: usize = 20;

    // SAFETY: plain socket syscalls on a descriptor this function owns and
    // closes (OwnedFd); buffers are sized and bounds are checked below.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let mut req = [0u8; NLMSG_HDR + TCMSG];
    req[0..4].copy_from_slice(&((NLMSG_HDR + TCMSG) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETQDISC.to_ne_bytes());
    req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDR] = libc::AF_UNSPEC as u8;
    if unsafe { libc::send(raw, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let data = &buf[..n as usize];
        let mut off = 0;
        while off + NLMSG_HDR <= data.len() {
            let len = u32_at(data, off) as usize;
            let kind = u16_at(data, off + 4);
            if len < NLMSG_HDR || off + len > data.len() {
                return Err(std::io::Error::other("malformed netlink message in a qdisc dump"));
            }
            match kind {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let errno = data.get(off + NLMSG_HDR..off + NLMSG_HDR + 4).map_or(0, |b| u32_at(b, 0) as i32);
                    return Err(std::io::Error::from_raw_os_error(-errno));
                }
                RTM_NEWQDISC if len >= NLMSG_HDR + TCMSG => {
                    let msg = &data[off..off + len];
                    let ifindex = u32_at(msg, NLMSG_HDR + 4);
                    let parent = u32_at(msg, NLMSG_HDR + 12);
                    if parent == TC_H_ROOT {
                        let attrs = &msg[NLMSG_HDR + TCMSG..];
                        if let Some(drops) = drops_attr(attrs, TCA_STATS2, TCA_STATS_QUEUE, TCA_STATS) {
                            *out.entry(ifindex).or_insert(0) += drops;
                        }
                    }
                }
                _ => {}
            }
            off += (len + 3) & !3;
        }
    }
}

/// The drop count of a qdisc's attributes: `TCA_STATS2` > `TCA_STATS_QUEUE`
/// (`struct gnet_stats_queue`, drops at byte 8), else the legacy `TCA_STATS`
/// (`struct tc_stats`, drops at byte 12).
fn drops_attr(attrs: &[u8], stats2: u16, queue: u16, legacy: u16) -> Option<u64> {
    let mut legacy_drops = None;
    for (kind, value) in rtattrs(attrs) {
        if kind == stats2 {
            for (inner, v) in rtattrs(value) {
                if inner == queue && v.len() >= 12 {
                    return Some(u64::from(u32::from_ne_bytes([v[8], v[9], v[10], v[11]])));
                }
            }
        } else if kind == legacy && value.len() >= 16 {
            legacy_drops = Some(u64::from(u32::from_ne_bytes([value[12], value[13], value[14], value[15]])));
        }
    }
    legacy_drops
}

/// (type, payload) of each netlink attribute in `b` (nested flag cleared).
fn rtattrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

#[cfg(test)]
mod qdisc_tests {
    #[test]
    fn qdisc_dump_of_this_namespace_succeeds() {
        // Every namespace has at least loopback's (noqueue) root qdisc.
        let drops = super::qdisc_drops().unwrap();
        assert!(drops.values().all(|&d| d < u64::MAX));
    }
}
