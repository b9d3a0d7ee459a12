//! Closed sessions as userspace sees them: decoded kernel records (TCP) and
//! ended flows (UDP), the goodput arithmetic, and the interface filter.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use observer_common::{
    AF_INET6, SESSION_ADOPTED, SESSION_CLOSE_MISSED, SESSION_OWNER_KNOWN, SessionRecord, UDP_FLOW_CONNECTED, UdpFlow,
    UdpFlowKey,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Direction of a byte count, seen from the host the observer runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Receive,
    Transmit,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Receive, Direction::Transmit];

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Receive => "receive",
            Direction::Transmit => "transmit",
        }
    }
}

// Both `ALL`s list the variants in declaration order, so `value as usize` is
// a value's index in them (`Metrics::add_live`).
const _: () = assert!(
    Protocol::ALL[0] as usize == 0
        && Protocol::ALL[1] as usize == 1
        && Direction::ALL[0] as usize == 0
        && Direction::ALL[1] as usize == 1
);

#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    pub protocol: Protocol,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// TCP: payload bytes the peer acknowledged. UDP: bytes sent.
    pub bytes_transmitted: u64,
    /// TCP: payload bytes received in order. UDP: bytes received.
    pub bytes_received: u64,
    /// End minus birth; `None` for TCP sessions adopted mid-life (birth unseen).
    pub lifetime: Option<Duration>,
    /// Time during which data moved out: TCP, the kernel's busy chrono (data
    /// waiting to be sent or acknowledged); UDP, as `active_receive`. `None`
    /// when not measured or zero.
    pub active_transmit: Option<Duration>,
    /// Time during which data moved in: gaps between send/receive calls no
    /// longer than `--active-gap`. `None` when not measured (no per-call hook)
    /// or zero (a single call).
    pub active_receive: Option<Duration>,
    /// Owning process (tgid, comm, cgroup id) when it was captured.
    pub owner: Option<Owner>,
    pub netns_ino: u32,
    /// Interface that delivered the session's packets, 0 if unknown.
    pub rx_ifindex: u32,
    /// Interface of the session's output route, 0 if unknown.
    pub tx_ifindex: u32,
    /// TCP segments the session retransmitted (0 for UDP, where the kernel
    /// keeps no such count).
    pub retransmits: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

fn socket_addr(family: u16, bytes: [u8; 16], port: u16) -> SocketAddr {
    let ip = if family == AF_INET6 {
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    };
    SocketAddr::new(ip, port)
}

fn comm(bytes: &[u8; 16]) -> String {
    String::from_utf8_lossy(bytes.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
}

/// Converts the chrono's jiffies to time with the session's own clock pair:
/// `elapsed_jiffies` ticked during `lifetime`, so no kernel HZ is needed. A
/// session shorter than a tick was busy for at most its lifetime.
fn busy_time(busy_jiffies: u64, elapsed_jiffies: u64, lifetime: Duration) -> Option<Duration> {
    if busy_jiffies == 0 {
        return None;
    }
    if elapsed_jiffies == 0 {
        return Some(lifetime);
    }
    let ns = u128::from(busy_jiffies) * lifetime.as_nanos() / u128::from(elapsed_jiffies);
    Some(Duration::from_nanos(ns.min(lifetime.as_nanos()) as u64))
}

fn nonzero(ns: u64) -> Option<Duration> {
    (ns > 0).then(|| Duration::from_nanos(ns))
}

impl Session {
    /// A closed TCP session. The kernel already removed SYN and FIN sequence
    /// numbers from the byte counts (`observer_common::payload_bytes`).
    pub fn from_record(r: &SessionRecord) -> Self {
        // Adopted: born before the observer. Close missed: ended at an unknown
        // time after its last call. Either way the lifetime is unknown.
        let adopted = r.flags & SESSION_ADOPTED != 0 || r.birth_ns == 0;
        let close_missed = r.flags & SESSION_CLOSE_MISSED != 0;
        let lifetime = (!adopted && !close_missed).then(|| Duration::from_nanos(r.close_ns.saturating_sub(r.birth_ns)));
        Session {
            protocol: Protocol::Tcp,
            local: socket_addr(r.family, r.local_addr, r.local_port),
            remote: socket_addr(r.family, r.remote_addr, r.remote_port),
            bytes_transmitted: r.bytes_acked,
            bytes_received: r.bytes_received,
            lifetime,
            active_transmit: lifetime
                .and_then(|l| busy_time(r.busy_jiffies, r.close_jiffies.saturating_sub(r.birth_jiffies), l)),
            active_receive: nonzero(r.active_ns),
            owner: (r.flags & SESSION_OWNER_KNOWN != 0).then(|| Owner {
                pid: r.pid,
                comm: comm(&r.comm),
                cgroup_id: r.cgroup_id,
            }),
            netns_ino: r.netns_ino,
            rx_ifindex: r.rx_ifindex,
            tx_ifindex: r.tx_ifindex,
            retransmits: r.retransmits,
        }
    }

    /// An ended UDP flow. A connected socket's session lasts from its first
    /// call to its release (`end_ns`); an unconnected socket's flow with one
    /// peer lasts from its first to its last datagram, so the idle timeout
    /// that ended it does not dilute its goodput.
    pub fn from_udp_flow(key: &UdpFlowKey, flow: &UdpFlow, end_ns: Option<u64>) -> Self {
        let end = match end_ns {
            Some(end) if flow.flags & UDP_FLOW_CONNECTED != 0 => end.max(flow.last_ns),
            _ => flow.last_ns,
        };
        Session {
            protocol: Protocol::Udp,
            local: socket_addr(key.family, flow.local_addr, flow.local_port),
            remote: socket_addr(key.family, key.peer_addr, key.peer_port),
            bytes_transmitted: flow.bytes_tx,
            bytes_received: flow.bytes_rx,
            lifetime: Some(Duration::from_nanos(end.saturating_sub(flow.first_ns))),
            active_transmit: nonzero(flow.active_ns),
            active_receive: nonzero(flow.active_ns),
            owner: Some(Owner { pid: flow.pid, comm: comm(&flow.comm), cgroup_id: flow.cgroup_id }),
            netns_ino: flow.netns_ino,
            rx_ifindex: 0,
            tx_ifindex: 0,
            retransmits: 0,
        }
    }

    /// Whether the session saw loss on its path: any retransmitted segment.
    /// Label `impaired` of the goodput histograms.
    pub fn impaired(&self) -> bool {
        self.retransmits > 0
    }

    pub fn bytes(&self, direction: Direction) -> u64 {
        match direction {
            Direction::Receive => self.bytes_received,
            Direction::Transmit => self.bytes_transmitted,
        }
    }

    /// Bytes per second of lifetime in `direction`, when that direction moved
    /// at least `floor` bytes and the lifetime is known and non-zero.
    pub fn goodput(&self, direction: Direction, floor: u64) -> Option<f64> {
        rate(self.bytes(direction), floor, self.lifetime)
    }

    pub fn active(&self, direction: Direction) -> Option<Duration> {
        match direction {
            Direction::Receive => self.active_receive,
            Direction::Transmit => self.active_transmit,
        }
    }

    /// Bytes per second of active time, with the same floor.
    pub fn active_goodput(&self, direction: Direction, floor: u64) -> Option<f64> {
        rate(self.bytes(direction), floor, self.active(direction))
    }
}

fn rate(bytes: u64, floor: u64, time: Option<Duration>) -> Option<f64> {
    let secs = time?.as_secs_f64();
    (bytes >= floor && secs > 0.0).then(|| bytes as f64 / secs)
}

/// `--iface`: which sessions to report. Interface indexes are per network
/// namespace, so a selection is bound to the observer's own namespace.
#[derive(Clone, Debug, Default)]
pub struct IfaceFilter {
    selected: Option<(u32, BTreeSet<u32>)>,
}

impl IfaceFilter {
    pub fn all() -> Self {
        Self::default()
    }

    pub fn only(netns_ino: u32, ifindexes: impl IntoIterator<Item = u32>) -> Self {
        Self { selected: Some((netns_ino, ifindexes.into_iter().collect())) }
    }

    pub fn accepts(&self, s: &Session) -> bool {
        match s.protocol {
            Protocol::Tcp => self.accepts_interfaces(s.netns_ino, s.rx_ifindex, s.tx_ifindex),
            Protocol::Udp => self.accepts_namespace(s.netns_ino),
        }
    }

    /// A TCP session: its receive or its output interface is selected.
    pub fn accepts_interfaces(&self, netns_ino: u32, rx_ifindex: u32, tx_ifindex: u32) -> bool {
        match &self.selected {
            None => true,
            Some((netns, set)) => netns_ino == *netns && (set.contains(&rx_ifindex) || set.contains(&tx_ifindex)),
        }
    }

    /// A UDP flow: the kernel records no interface for an unconnected socket's
    /// datagrams, so flows are kept when they are in the selected interfaces'
    /// network namespace.
    pub fn accepts_namespace(&self, netns_ino: u32) -> bool {
        match &self.selected {
            None => true,
            Some((netns, _)) => netns_ino == *netns,
        }
    }
}

#[cfg(test)]
mod tests {
    use observer_common::AF_INET;

    use super::*;

    fn record() -> SessionRecord {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let mut local = [0u8; 16];
        local[..4].copy_from_slice(&[127, 0, 0, 1]);
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&[10, 1, 2, 3]);
        SessionRecord {
            sock: 0xffff_8880_0000_1000,
            birth_ns: 1_000_000_000,
            close_ns: 3_000_000_000,
            bytes_acked: 4_000_000,
            bytes_received: 500,
            cgroup_id: 42,
            active_ns: 500_000_000,
            // 250 ticks over the 2 s lifetime (HZ 125 for the test): 25 ticks = 0.2 s.
            busy_jiffies: 25,
            birth_jiffies: 1_000,
            close_jiffies: 1_250,
            live_base_tx: 0,
            live_base_rx: 0,
            netns_ino: 4026531840,
            rx_ifindex: 1,
            pid: 77,
            flags: SESSION_OWNER_KNOWN,
            family: AF_INET,
            local_port: 40000,
            remote_port: 443,
            _pad0: 0,
            tx_ifindex: 1,
            retransmits: 0,
            local_addr: local,
            remote_addr: remote,
            comm,
        }
    }

    #[test]
    fn decodes_addresses_owner_lifetime_and_active_time() {
        let s = Session::from_record(&record());
        assert_eq!(s.protocol, Protocol::Tcp);
        assert_eq!(s.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(s.remote, "10.1.2.3:443".parse().unwrap());
        assert_eq!(s.lifetime, Some(Duration::from_secs(2)));
        assert_eq!(s.active_receive, Some(Duration::from_millis(500)));
        assert_eq!(s.active_transmit, Some(Duration::from_millis(200)));
        assert_eq!(s.owner, Some(Owner { pid: 77, comm: "curl".into(), cgroup_id: 42 }));
    }

    #[test]
    fn busy_jiffies_convert_with_the_sessions_own_clock() {
        let l = Duration::from_secs(4);
        assert_eq!(busy_time(0, 1000, l), None);
        assert_eq!(busy_time(250, 1000, l), Some(Duration::from_secs(1)));
        assert_eq!(busy_time(1, 0, Duration::from_millis(3)), Some(Duration::from_millis(3)), "under one tick");
        assert_eq!(busy_time(1200, 1000, l), Some(l), "never more than the lifetime");
    }

    #[test]
    fn decodes_ipv6() {
        let mut r = record();
        r.family = AF_INET6;
        r.remote_addr = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(Session::from_record(&r).remote, "[::1]:443".parse().unwrap());
    }

    #[test]
    fn goodput_is_bytes_over_lifetime_above_the_floor_only() {
        let s = Session::from_record(&record());
        assert_eq!(s.goodput(Direction::Transmit, 1_000_000), Some(2_000_000.0));
        assert_eq!(s.goodput(Direction::Transmit, 4_000_000), Some(2_000_000.0), "floor is inclusive");
        assert_eq!(s.goodput(Direction::Transmit, 4_000_001), None);
        assert_eq!(s.goodput(Direction::Receive, 1_000_000), None);
        assert_eq!(s.active_goodput(Direction::Transmit, 1_000_000), Some(20_000_000.0));
        assert_eq!(s.active_goodput(Direction::Receive, 100), Some(1_000.0));
    }

    #[test]
    fn adopted_sessions_have_no_lifetime_and_no_goodput() {
        let mut r = record();
        r.flags = SESSION_ADOPTED;
        let s = Session::from_record(&r);
        assert_eq!(s.lifetime, None);
        assert_eq!(s.owner, None);
        assert_eq!(s.goodput(Direction::Transmit, 1), None);
        r.flags = 0;
        r.birth_ns = 0;
        assert_eq!(Session::from_record(&r).lifetime, None, "never seen before close");
    }

    #[test]
    fn sessions_whose_close_was_missed_keep_bytes_and_owner_but_no_lifetime() {
        let mut r = record();
        r.flags |= SESSION_CLOSE_MISSED;
        let s = Session::from_record(&r);
        assert_eq!(s.lifetime, None);
        assert_eq!(s.active_transmit, None, "busy time needs the lifetime");
        assert_eq!(s.goodput(Direction::Transmit, 1), None);
        assert_eq!(s.bytes(Direction::Transmit), r.bytes_acked);
        assert_eq!(s.bytes(Direction::Receive), r.bytes_received);
        assert_eq!(s.owner, Some(Owner { pid: 77, comm: "curl".into(), cgroup_id: 42 }));
        assert_eq!(s.active_goodput(Direction::Receive, 100), Some(1_000.0), "bytes and active time of the same calls");
    }

    fn flow(flags: u32) -> (UdpFlowKey, UdpFlow) {
        let mut peer = [0u8; 16];
        peer[..4].copy_from_slice(&[127, 0, 0, 1]);
        let key = UdpFlowKey { sk: 1, peer_addr: peer, peer_port: 5000, family: AF_INET, _pad0: 0 };
        let flow = UdpFlow {
            first_ns: 10_000_000_000,
            last_ns: 12_000_000_000,
            active_ns: 0,
            bytes_tx: 100,
            bytes_rx: 3_000_000,
            cgroup_id: 9,
            pid: 5,
            flags,
            comm: [b'x'; 16],
            netns_ino: 7,
            local_port: 53,
            _pad0: 0,
            local_addr: peer,
        };
        (key, flow)
    }

    #[test]
    fn udp_flows_last_to_their_last_datagram_or_release_when_connected() {
        let (key, unconnected) = flow(0);
        let s = Session::from_udp_flow(&key, &unconnected, Some(40_000_000_000));
        assert_eq!(s.protocol, Protocol::Udp);
        assert_eq!(s.lifetime, Some(Duration::from_secs(2)), "release does not stretch a peer's flow");
        assert_eq!(s.remote, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(s.local, "127.0.0.1:53".parse().unwrap());
        assert_eq!(s.goodput(Direction::Receive, 1_000_000), Some(1_500_000.0));
        assert_eq!((s.active_receive, s.active_transmit), (None, None));
        let (key, connected) = flow(UDP_FLOW_CONNECTED);
        let s = Session::from_udp_flow(&key, &connected, Some(14_000_000_000));
        assert_eq!(s.lifetime, Some(Duration::from_secs(4)), "first use to release");
    }

    #[test]
    fn iface_filter_matches_namespace_and_index() {
        let s = Session::from_record(&record());
        assert!(IfaceFilter::all().accepts(&s));
        assert!(IfaceFilter::only(4026531840, [1]).accepts(&s));
        assert!(!IfaceFilter::only(4026531840, [2]).accepts(&s));
        assert!(!IfaceFilter::only(4026532000, [1]).accepts(&s), "same index, other namespace");
        let mut r = record();
        r.rx_ifindex = 0;
        r.tx_ifindex = 3;
        assert!(IfaceFilter::only(4026531840, [3]).accepts(&Session::from_record(&r)), "output interface counts too");
        let (key, f) = flow(0);
        let udp = Session::from_udp_flow(&key, &f, None);
        assert!(IfaceFilter::only(7, [1]).accepts(&udp));
        assert!(!IfaceFilter::only(8, [1]).accepts(&udp));
    }
}
