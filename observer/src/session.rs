//! Closed TCP sessions as userspace sees them: decoded kernel records, the
//! goodput arithmetic, and the interface filter.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use observer_common::{
    AF_INET6, SESSION_ACTIVE_OPEN, SESSION_ADOPTED, SESSION_FIN_ACKED, SESSION_FIN_RECEIVED,
    SESSION_OWNER_KNOWN, SessionRecord,
};

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

#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Payload bytes the peer acknowledged: `tcp_sock.bytes_acked` less the
    /// SYN and FIN sequence numbers it counts.
    pub bytes_transmitted: u64,
    /// Payload bytes received in order: `tcp_sock.bytes_received` less a
    /// received FIN.
    pub bytes_received: u64,
    /// Close minus birth; `None` for sessions adopted mid-life (birth unseen).
    pub lifetime: Option<Duration>,
    /// Owning process (tgid, comm, cgroup id) when it was captured.
    pub owner: Option<Owner>,
    pub netns_ino: u32,
    /// Interface that delivered the session's packets, 0 if unknown.
    pub rx_ifindex: u32,
    /// Interface of the session's output route, 0 if unknown.
    pub tx_ifindex: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

impl Session {
    pub fn from_record(r: &SessionRecord) -> Self {
        let addr = |bytes: [u8; 16], port: u16| {
            let ip = if r.family == AF_INET6 {
                IpAddr::V6(Ipv6Addr::from(bytes))
            } else {
                IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
            };
            SocketAddr::new(ip, port)
        };
        let adopted = r.flags & SESSION_ADOPTED != 0 || r.birth_ns == 0;
        let lifetime = (!adopted).then(|| Duration::from_nanos(r.close_ns.saturating_sub(r.birth_ns)));
        let owner = (r.flags & SESSION_OWNER_KNOWN != 0).then(|| Owner {
            pid: r.pid,
            comm: String::from_utf8_lossy(r.comm.split(|&b| b == 0).next().unwrap_or_default()).into_owned(),
            cgroup_id: r.cgroup_id,
        });
        let flag = |f: u32| u64::from(r.flags & f != 0);
        // SYN and FIN each take one sequence number, which the kernel's byte
        // counters include once acknowledged (ours) or received (the peer's).
        let syn = flag(SESSION_ACTIVE_OPEN) & u64::from(r.bytes_acked > 0);
        Session {
            local: addr(r.local_addr, r.local_port),
            remote: addr(r.remote_addr, r.remote_port),
            bytes_transmitted: r.bytes_acked.saturating_sub(syn + flag(SESSION_FIN_ACKED)),
            bytes_received: r.bytes_received.saturating_sub(flag(SESSION_FIN_RECEIVED)),
            lifetime,
            owner,
            netns_ino: r.netns_ino,
            rx_ifindex: r.rx_ifindex,
            tx_ifindex: r.tx_ifindex,
        }
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
        let bytes = self.bytes(direction);
        let secs = self.lifetime?.as_secs_f64();
        (bytes >= floor && secs > 0.0).then(|| bytes as f64 / secs)
    }
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
        match &self.selected {
            None => true,
            Some((netns, set)) => {
                s.netns_ino == *netns && (set.contains(&s.rx_ifindex) || set.contains(&s.tx_ifindex))
            }
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
            birth_ns: 1_000_000_000,
            close_ns: 3_000_000_000,
            bytes_acked: 4_000_000,
            bytes_received: 500,
            cgroup_id: 42,
            netns_ino: 4026531840,
            rx_ifindex: 1,
            pid: 77,
            flags: SESSION_OWNER_KNOWN,
            family: AF_INET,
            local_port: 40000,
            remote_port: 443,
            _pad0: 0,
            tx_ifindex: 1,
            _pad1: 0,
            local_addr: local,
            remote_addr: remote,
            comm,
        }
    }

    #[test]
    fn decodes_addresses_owner_and_lifetime() {
        let s = Session::from_record(&record());
        assert_eq!(s.local, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(s.remote, "10.1.2.3:443".parse().unwrap());
        assert_eq!(s.lifetime, Some(Duration::from_secs(2)));
        assert_eq!(s.owner, Some(Owner { pid: 77, comm: "curl".into(), cgroup_id: 42 }));
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
    }

    #[test]
    fn syn_and_fin_sequence_numbers_are_not_payload() {
        let mut r = record();
        r.bytes_acked = 2_000_002;
        r.bytes_received = 12_346;
        r.flags |= SESSION_ACTIVE_OPEN | SESSION_FIN_ACKED | SESSION_FIN_RECEIVED;
        let s = Session::from_record(&r);
        assert_eq!((s.bytes_transmitted, s.bytes_received), (2_000_000, 12_345));
        // A connect that was never answered counted no SYN.
        r.bytes_acked = 0;
        r.bytes_received = 0;
        r.flags = SESSION_ACTIVE_OPEN;
        let s = Session::from_record(&r);
        assert_eq!((s.bytes_transmitted, s.bytes_received), (0, 0));
        // The passive side's counters start after the handshake.
        r.bytes_acked = 10;
        r.flags = 0;
        assert_eq!(Session::from_record(&r).bytes_transmitted, 10);
    }

    #[test]
    fn adopted_sessions_have_no_lifetime_and_no_goodput() {
        let mut r = record();
        r.flags = SESSION_ADOPTED;
        r.birth_ns = 0;
        let s = Session::from_record(&r);
        assert_eq!(s.lifetime, None);
        assert_eq!(s.owner, None);
        assert_eq!(s.goodput(Direction::Transmit, 1), None);
    }

    #[test]
    fn iface_filter_matches_namespace_and_index() {
        let s = Session::from_record(&record());
        assert!(IfaceFilter::all().accepts(&s));
        assert!(IfaceFilter::only(4026531840, [1]).accepts(&s));
        assert!(!IfaceFilter::only(4026531840, [2]).accepts(&s));
        let mut r = record();
        r.rx_ifindex = 0;
        r.tx_ifindex = 3;
        assert!(IfaceFilter::only(4026531840, [3]).accepts(&Session::from_record(&r)), "output interface counts too");
        assert!(!IfaceFilter::only(4026532000, [1]).accepts(&s), "same index, other namespace");
    }
}
