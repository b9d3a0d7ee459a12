//! Where a session's peer is: a configured network group (`--peer-group
//! CIDR=NAME`) and its port folded to service ports (`--service-port`).
use std::{net::IpAddr, ops::RangeInclusive};

use ipnet::IpNet;

/// Value of `peer_group` for loopback peers, unless a configured group
/// covers them.
pub const LOOPBACK: &str = "loopback";
/// Value of `peer_group` for peers no group covers, and of `peer_port` for
/// ports that are not service ports.
pub const OTHER: &str = "other";

/// Ports below this are IANA's well-known (system) ports: always reported
/// as themselves. Anything above is a service port only when configured,
/// since a Linux host's ephemeral range (32768-60999) sits in the same space.
const WELL_KNOWN: RangeInclusive<u16> = 1..=1023;

/// One `--peer-group CIDR=NAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerGroup {
    pub net: IpNet,
    pub name: String,
}

/// Parses `10.0.0.0/8=cluster`; errors say what is wrong and what is right.
pub fn parse_peer_group(arg: &str) -> Result<PeerGroup, String> {
    let example = "for example 10.0.0.0/8=cluster or fd00::/8=cluster";
    let Some((cidr, name)) = arg.split_once('=') else {
        return Err(format!("`{arg}` is not CIDR=NAME ({example})"));
    };
    let net: IpNet = cidr.parse().map_err(|_| format!("`{cidr}` is not a CIDR network ({example})"))?;
    if net.trunc() != net {
        return Err(format!("`{cidr}` has host bits set: the network is {} ({example})", net.trunc()));
    }
    if name.is_empty() {
        return Err(format!("group `{cidr}` has an empty name ({example})"));
    }
    Ok(PeerGroup { net, name: name.to_owned() })
}

/// The configured groups, most specific first: the longest prefix wins.
#[derive(Clone, Debug, Default)]
pub struct PeerGroups(Vec<PeerGroup>);

impl PeerGroups {
    pub fn new(mut groups: Vec<PeerGroup>) -> Self {
        groups.sort_by_key(|g| std::cmp::Reverse(g.net.prefix_len()));
        PeerGroups(groups)
    }

    /// The group of a peer address. IPv4 peers of dual-stack sockets arrive
    /// as IPv4-mapped IPv6 (`::ffff:10.1.2.3`) and match IPv4 groups.
    pub fn group(&self, ip: IpAddr) -> &str {
        let ip = ip.to_canonical();
        match self.0.iter().find(|g| g.net.contains(&ip)) {
            Some(g) => &g.name,
            None if ip.is_loopback() => LOOPBACK,
            None => OTHER,
        }
    }
}

/// Parses `--service-port 8080` or a range `20000-20499`.
pub fn parse_service_ports(arg: &str) -> Result<RangeInclusive<u16>, String> {
    let port = |s: &str| -> Result<u16, String> {
        match s.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("`{s}` is not a port (1-65535; a range is FIRST-LAST, e.g. 8000-8099)")),
            Ok(p) => Ok(p),
        }
    };
    let range = match arg.split_once('-') {
        Some((first, last)) => port(first)?..=port(last)?,
        None => port(arg)?..=port(arg)?,
    };
    if range.is_empty() {
        return Err(format!("`{arg}`: the range ends before it starts (FIRST-LAST, e.g. 8000-8099)"));
    }
    Ok(range)
}

/// Folds peer ports: well-known and configured service ports are reported
/// as their number, everything else (ephemeral client ports) as `other`.
#[derive(Clone, Debug, Default)]
pub struct ServicePorts(Vec<RangeInclusive<u16>>);

impl ServicePorts {
    pub fn new(ranges: Vec<RangeInclusive<u16>>) -> Self {
        ServicePorts(ranges)
    }

    pub fn fold(&self, port: u16) -> String {
        if WELL_KNOWN.contains(&port) || self.0.iter().any(|r| r.contains(&port)) {
            port.to_string()
        } else {
            OTHER.to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(args: &[&str]) -> PeerGroups {
        PeerGroups::new(args.iter().map(|a| parse_peer_group(a).unwrap()).collect())
    }

    #[test]
    fn longest_prefix_wins_and_loopback_and_other() {
        let g = groups(&["10.0.0.0/8=cluster", "10.20.0.0/16=storage", "fd00::/8=cluster6"]);
        assert_eq!(g.group("10.1.2.3".parse().unwrap()), "cluster");
        assert_eq!(g.group("10.20.9.9".parse().unwrap()), "storage");
        assert_eq!(g.group("fd00::1".parse().unwrap()), "cluster6");
        assert_eq!(g.group("::ffff:10.20.1.1".parse().unwrap()), "storage", "IPv4-mapped");
        assert_eq!(g.group("127.0.0.1".parse().unwrap()), LOOPBACK);
        assert_eq!(g.group("::1".parse().unwrap()), LOOPBACK);
        assert_eq!(g.group("192.0.2.1".parse().unwrap()), OTHER);
        // A configured group may claim loopback.
        assert_eq!(groups(&["127.0.0.0/8=local"]).group("127.0.0.2".parse().unwrap()), "local");
    }

    #[test]
    fn bad_groups_are_refused_with_the_reason() {
        assert!(parse_peer_group("10.0.0.0/8").unwrap_err().contains("not CIDR=NAME"));
        assert!(parse_peer_group("10.0.0.0/33=x").unwrap_err().contains("not a CIDR network"));
        assert!(parse_peer_group("cluster=10.0.0.0/8").unwrap_err().contains("not a CIDR network"));
        assert!(parse_peer_group("10.1.0.0/8=x").unwrap_err().contains("network is 10.0.0.0/8"));
        assert!(parse_peer_group("10.0.0.0/8=").unwrap_err().contains("empty name"));
    }

    #[test]
    fn ports_fold_to_well_known_and_configured() {
        let p =
            ServicePorts::new(vec![parse_service_ports("8080").unwrap(), parse_service_ports("20000-20009").unwrap()]);
        assert_eq!(p.fold(443), "443");
        assert_eq!(p.fold(8080), "8080");
        assert_eq!(p.fold(20005), "20005");
        assert_eq!(p.fold(20010), OTHER);
        assert_eq!(p.fold(45123), OTHER);
        assert_eq!(p.fold(0), OTHER);
    }

    #[test]
    fn bad_ports_are_refused() {
        for (arg, needle) in
            [("0", "not a port"), ("70000", "not a port"), ("http", "not a port"), ("9-1", "ends before")]
        {
            assert!(parse_service_ports(arg).unwrap_err().contains(needle), "{arg}");
        }
    }
}
