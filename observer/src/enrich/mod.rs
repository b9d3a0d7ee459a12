//! Session labels beyond direction and protocol: who owns a session
//! (process, container, pod, namespace) and where its peer is (network group,
//! country, service port). Each is opt-in, computed once per closed session
//! in userspace, and held to a cardinality budget; label sets not seen for
//! the series TTL leave the exposition. [`pods`] maps cgroups and processes
//! to Kubernetes pods, for these labels and for GPU processes.
//!
//! Layer: above kernel; below metrics, pipeline, gpu, server and cli.
pub mod budget;
pub mod geoip;
pub mod peers;
pub mod pods;
pub mod series;
pub mod workload;

use std::{
    ops::RangeInclusive,
    path::PathBuf,
    time::{Duration, Instant},
};

use budget::{Admitted, Budget};
use geoip::GeoIp;
use peers::{OTHER, PeerGroup, PeerGroups, ServicePorts};
use series::SeriesAges;
use workload::{Workload, Workloads};

use crate::session::Session;

/// A label a session can carry. The order here is the order of the labels
/// in every series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum SessionLabel {
    /// The owner process's name (the kernel's comm, at most 15 bytes).
    #[value(name = "comm")]
    Comm,
    /// The runtime's 64-hex container id, from the owner's cgroup.
    #[value(name = "container_id")]
    ContainerId,
    /// The Kubernetes pod UID, from the owner's cgroup.
    #[value(name = "pod_uid")]
    PodUid,
    /// The pod's name, from the kubelet's pod log directory.
    #[value(name = "pod")]
    Pod,
    /// The pod's namespace, from the kubelet's pod log directory.
    #[value(name = "namespace")]
    Namespace,
    /// The --peer-group the peer address is in; `loopback` or `other`.
    #[value(name = "peer_group")]
    PeerGroup,
    /// The peer's ISO 3166 country code from --geoip-db.
    #[value(name = "peer_country")]
    PeerCountry,
    /// The peer's port if a well-known (1-1023) or --service-port, else `other`.
    #[value(name = "peer_port")]
    PeerPort,
}

impl SessionLabel {
    pub const ALL: [SessionLabel; 8] = [
        Self::Comm,
        Self::ContainerId,
        Self::PodUid,
        Self::Pod,
        Self::Namespace,
        Self::PeerGroup,
        Self::PeerCountry,
        Self::PeerPort,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Comm => "comm",
            Self::ContainerId => "container_id",
            Self::PodUid => "pod_uid",
            Self::Pod => "pod",
            Self::Namespace => "namespace",
            Self::PeerGroup => "peer_group",
            Self::PeerCountry => "peer_country",
            Self::PeerPort => "peer_port",
        }
    }

    /// Distinct values admitted before folding into `other` (README's table).
    /// Sized for one node: a few hundred pods at most, every country, a
    /// hundred service ports.
    pub fn default_limit(self) -> usize {
        match self {
            Self::Comm => 200,
            Self::ContainerId | Self::PodUid | Self::Pod => 500,
            Self::Namespace => 100,
            Self::PeerGroup => 64,
            Self::PeerCountry => 250,
            Self::PeerPort => 100,
        }
    }

    fn is_workload(self) -> bool {
        matches!(self, Self::ContainerId | Self::PodUid | Self::Pod | Self::Namespace)
    }
}

/// Parses `--label-limit NAME=N`.
pub fn parse_label_limit(arg: &str) -> Result<(SessionLabel, usize), String> {
    let names = SessionLabel::ALL.map(SessionLabel::name).join(", ");
    let Some((name, n)) = arg.split_once('=') else {
        return Err(format!("`{arg}` is not NAME=N (for example peer_port=50)"));
    };
    let label = SessionLabel::ALL
        .into_iter()
        .find(|l| l.name() == name)
        .ok_or_else(|| format!("`{name}` is not a session label (one of {names})"))?;
    match n.parse::<usize>() {
        Ok(n) if n >= 1 => Ok((label, n)),
        _ => Err(format!("limit `{n}` of {name} is not a whole number of values, at least 1")),
    }
}

/// Default `--max-label-sets`. A label set costs up to about 170 series per
/// protocol (the goodput and duration histograms' buckets), so this bounds a
/// node's session series at a few hundred thousand in the worst case, while
/// leaving room for a few hundred pods times a few peer groups.
pub const DEFAULT_MAX_LABEL_SETS: usize = 1000;

/// `observer_label_overflow_total{label}` of sessions whose whole label set
/// was refused by the `--max-label-sets` cap (the session labels' own names
/// are the other values).
pub const LABEL_SET_OVERFLOW: &str = "label_set";

/// Everything the labels are computed from, from the command line.
#[derive(Debug)]
pub struct EnrichConfig {
    pub labels: Vec<SessionLabel>,
    pub peer_groups: Vec<PeerGroup>,
    pub service_ports: Vec<RangeInclusive<u16>>,
    pub geoip_db: Option<PathBuf>,
    pub limits: Vec<(SessionLabel, usize)>,
    /// Most distinct label sets exported at once; further sets are reported
    /// as all `other` (which is never refused).
    pub max_label_sets: usize,
    pub series_ttl: Duration,
    pub pod_log_dir: PathBuf,
    pub cgroup_root: Option<PathBuf>,
}

impl Default for EnrichConfig {
    fn default() -> Self {
        EnrichConfig {
            labels: Vec::new(),
            peer_groups: Vec::new(),
            service_ports: Vec::new(),
            geoip_db: None,
            limits: Vec::new(),
            max_label_sets: DEFAULT_MAX_LABEL_SETS,
            series_ttl: Duration::ZERO,
            pod_log_dir: PathBuf::new(),
            cgroup_root: None,
        }
    }
}

/// Computes the session labels of closed sessions.
#[derive(Debug)]
pub struct Enricher {
    labels: Vec<SessionLabel>,
    /// One per label, in the same order.
    budgets: Vec<Budget>,
    peer_groups: PeerGroups,
    service_ports: ServicePorts,
    geoip: Option<GeoIp>,
    /// Only when a workload label is on: it reads the cgroup tree.
    workloads: Option<Workloads>,
    series: SeriesAges,
    max_label_sets: usize,
    /// Every label `other`: where sessions beyond `max_label_sets` go.
    all_other: Vec<String>,
    series_ttl: Duration,
}

impl Enricher {
    /// Checks the configuration as a whole; errors are usage errors. Giving
    /// groups, ports or a database turns their label on.
    pub fn new(config: EnrichConfig) -> Result<Self, String> {
        let mut labels = config.labels;
        labels.extend((!config.peer_groups.is_empty()).then_some(SessionLabel::PeerGroup));
        labels.extend((!config.service_ports.is_empty()).then_some(SessionLabel::PeerPort));
        labels.extend(config.geoip_db.is_some().then_some(SessionLabel::PeerCountry));
        labels.sort();
        labels.dedup();
        let geoip = match &config.geoip_db {
            Some(path) => Some(GeoIp::open(path)?),
            None if labels.contains(&SessionLabel::PeerCountry) => {
                return Err("session label peer_country needs a MaxMind database: give --geoip-db PATH".into());
            }
            None => None,
        };
        let mut budgets: Vec<Budget> = labels.iter().map(|l| Budget::new(l.default_limit())).collect();
        for (label, limit) in &config.limits {
            let Some(i) = labels.iter().position(|l| l == label) else {
                return Err(format!(
                    "--label-limit {}={limit}: {} is not an enabled session label (enable it with --session-label {})",
                    label.name(),
                    label.name(),
                    label.name()
                ));
            };
            budgets[i] = Budget::new(*limit);
        }
        let workloads =
            labels.iter().any(|l| l.is_workload()).then(|| Workloads::new(config.cgroup_root, &config.pod_log_dir));
        Ok(Enricher {
            budgets,
            peer_groups: PeerGroups::new(config.peer_groups),
            service_ports: ServicePorts::new(config.service_ports),
            geoip,
            workloads,
            series: SeriesAges::default(),
            max_label_sets: config.max_label_sets,
            all_other: vec![OTHER.to_owned(); labels.len()],
            labels,
            series_ttl: config.series_ttl,
        })
    }

    /// Label names, in series order.
    pub fn names(&self) -> Vec<&'static str> {
        self.labels.iter().map(|l| l.name()).collect()
    }

    /// Whether `s` can be labelled now: false while a walk of the cgroup tree
    /// that may name its owner's workload is due or under way (this asks for
    /// it). The walk never runs in the caller's thread; the caller labels the
    /// session later, once [`Enricher::walks`] has moved on.
    pub fn ready(&mut self, s: &Session) -> bool {
        match (&mut self.workloads, &s.owner) {
            (Some(w), Some(owner)) => w.ready(owner.cgroup_id),
            _ => true,
        }
    }

    /// Walks of the cgroup tree done so far (0 without workload labels).
    pub fn walks(&self) -> u64 {
        self.workloads.as_ref().map_or(0, Workloads::walks)
    }

    /// The session's label values, in [`Enricher::names`] order, each within
    /// its budget, the set within the label set cap; `overflow` is called
    /// with the name of each label whose value was folded into `other`, or
    /// once with [`LABEL_SET_OVERFLOW`] when the whole set was (all `other`).
    pub fn label(&mut self, s: &Session, now: Instant, mut overflow: impl FnMut(&'static str)) -> Vec<String> {
        if self.labels.is_empty() {
            return Vec::new();
        }
        let workload = match (&mut self.workloads, &s.owner) {
            // Still pending: labelled without it (see `ready`).
            (Some(w), Some(owner)) => w.of_cgroup(owner.cgroup_id).unwrap_or_default(),
            _ => Workload::default(),
        };
        // Each value against its label's budget first, taking no place yet:
        // if the set is refused, its values are not exported either.
        let mut values = Vec::with_capacity(self.labels.len());
        let mut folded = Vec::new();
        for (i, label) in self.labels.iter().enumerate() {
            let raw = match label {
                SessionLabel::Comm => s.owner.as_ref().map(|o| o.comm.clone()).unwrap_or_default(),
                SessionLabel::ContainerId => workload.container_id.clone(),
                SessionLabel::PodUid => workload.pod_uid.clone(),
                SessionLabel::Pod => workload.pod.clone(),
                SessionLabel::Namespace => workload.namespace.clone(),
                SessionLabel::PeerGroup => self.peer_groups.group(s.remote.ip()).to_owned(),
                SessionLabel::PeerCountry => {
                    self.geoip.as_ref().and_then(|g| g.country(s.remote.ip())).unwrap_or_default()
                }
                SessionLabel::PeerPort => self.service_ports.fold(s.remote.port()),
            };
            values.push(match self.budgets[i].check(raw) {
                Admitted::Value(v) => v,
                Admitted::Folded => {
                    folded.push(label.name());
                    OTHER.to_owned()
                }
            });
        }
        if !self.set_admitted(&values) {
            overflow(LABEL_SET_OVERFLOW);
            self.series.touch(&self.all_other, now);
            return self.all_other.clone();
        }
        for (budget, value) in self.budgets.iter_mut().zip(&values) {
            budget.commit(value, now);
        }
        folded.into_iter().for_each(&mut overflow);
        self.series.touch(&values, now);
        values
    }

    /// Whether `values` is exported: a set already exported, the all-`other`
    /// set, or a new one while fewer than `max_label_sets` others are.
    fn set_admitted(&self, values: &[String]) -> bool {
        if *values == *self.all_other || self.series.contains(values) {
            return true;
        }
        let others = self.series.len() - usize::from(self.series.contains(&self.all_other));
        others < self.max_label_sets
    }

    /// Label sets not seen for the series TTL, forgotten here (their budget
    /// places freed) and to be removed from the exposition by the caller.
    pub fn expire(&mut self, now: Instant) -> Vec<Vec<String>> {
        if self.labels.is_empty() {
            return Vec::new();
        }
        for budget in &mut self.budgets {
            budget.expire(now, self.series_ttl);
        }
        self.series.expire(now, self.series_ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{Owner, Protocol};

    fn session(remote: &str, comm: &str) -> Session {
        Session {
            protocol: Protocol::Tcp,
            local: "10.0.0.1:40000".parse().unwrap(),
            remote: remote.parse().unwrap(),
            bytes_transmitted: 0,
            bytes_received: 0,
            lifetime: None,
            active_transmit: None,
            active_receive: None,
            owner: Some(Owner { pid: 1, comm: comm.into(), cgroup_id: 0 }),
            netns_ino: 0,
            rx_ifindex: 0,
            tx_ifindex: 0,
            retransmits: 0,
        }
    }

    fn config(labels: &[SessionLabel]) -> EnrichConfig {
        EnrichConfig { labels: labels.to_vec(), series_ttl: Duration::from_secs(60), ..Default::default() }
    }

    #[test]
    fn flags_turn_labels_on_in_canonical_order() {
        let mut c = config(&[SessionLabel::PeerPort, SessionLabel::Comm]);
        c.peer_groups = vec![peers::parse_peer_group("10.0.0.0/8=cluster").unwrap()];
        let e = Enricher::new(c).unwrap();
        assert_eq!(e.names(), ["comm", "peer_group", "peer_port"]);
        assert!(Enricher::new(config(&[])).unwrap().names().is_empty());
    }

    #[test]
    fn inconsistent_configurations_are_refused() {
        let err = Enricher::new(config(&[SessionLabel::PeerCountry])).unwrap_err();
        assert!(err.contains("--geoip-db"), "{err}");
        let mut c = config(&[SessionLabel::Comm]);
        c.limits = vec![(SessionLabel::Pod, 3)];
        assert!(Enricher::new(c).unwrap_err().contains("not an enabled session label"));
        let mut c = config(&[]);
        c.geoip_db = Some("/nonexistent/GeoLite2-Country.mmdb".into());
        assert!(Enricher::new(c).unwrap_err().contains("cannot read --geoip-db /nonexistent"));
    }

    #[test]
    fn values_and_budget_overflow() {
        let mut c = config(&[SessionLabel::Comm, SessionLabel::PeerPort]);
        c.service_ports = vec![peers::parse_service_ports("20000-20099").unwrap()];
        c.limits = vec![(SessionLabel::PeerPort, 2)];
        let mut e = Enricher::new(c).unwrap();
        let now = Instant::now();
        let mut overflowed = Vec::new();
        let mut label =
            |e: &mut Enricher, remote: &str| e.label(&session(remote, "nginx"), now, |l| overflowed.push(l));
        assert_eq!(label(&mut e, "10.0.0.2:20000"), ["nginx", "20000"]);
        assert_eq!(label(&mut e, "10.0.0.2:20001"), ["nginx", "20001"]);
        assert_eq!(label(&mut e, "10.0.0.2:20002"), ["nginx", "other"]);
        assert_eq!(label(&mut e, "10.0.0.2:45000"), ["nginx", "other"], "ephemeral: other, not an overflow");
        assert_eq!(overflowed, ["peer_port"]);
        assert!(e.expire(now).is_empty());
        assert_eq!(e.expire(now + Duration::from_secs(61)).len(), 3);
    }

    #[test]
    fn label_sets_beyond_the_cap_are_all_other_and_take_no_budget() {
        let mut c = config(&[SessionLabel::Comm, SessionLabel::PeerPort]);
        c.service_ports = vec![peers::parse_service_ports("20000-20099").unwrap()];
        c.max_label_sets = 2;
        c.limits = vec![(SessionLabel::Comm, 3)];
        let mut e = Enricher::new(c).unwrap();
        let t0 = Instant::now();
        let label = |e: &mut Enricher, comm: &str, remote: &str, at: Instant| {
            let mut overflowed = Vec::new();
            let values = e.label(&session(remote, comm), at, |l| overflowed.push(l));
            (values, overflowed)
        };
        let set = |values: [&str; 2]| values.map(String::from).to_vec();
        let none: Vec<&str> = Vec::new();
        assert_eq!(label(&mut e, "a", "10.0.0.2:20000", t0), (set(["a", "20000"]), none.clone()));
        assert_eq!(label(&mut e, "b", "10.0.0.2:20000", t0), (set(["b", "20000"]), none.clone()));
        assert_eq!(label(&mut e, "a", "10.0.0.2:20000", t0).0, ["a", "20000"], "a set already exported");
        let refused = (set(["other", "other"]), vec![LABEL_SET_OVERFLOW]);
        assert_eq!(label(&mut e, "c", "10.0.0.2:20000", t0), refused, "a third set");
        assert_eq!(label(&mut e, "a", "10.0.0.2:20001", t0), refused, "known values, new set");
        assert_eq!(label(&mut e, "x", "10.0.0.2:45000", t0), refused);
        assert_eq!(e.budgets[0].len(), 2, "refused sets take no place in the comm budget: a and b only");
        // An expired set frees its place for a new one.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(label(&mut e, "b", "10.0.0.2:20000", later - Duration::from_secs(30)).0, ["b", "20000"]);
        assert_eq!(e.expire(later).len(), 2, "(a, 20000) and the all-other set");
        assert_eq!(label(&mut e, "c", "10.0.0.2:20000", later), (set(["c", "20000"]), none));
        assert_eq!(label(&mut e, "d", "10.0.0.2:20000", later), refused);
    }

    #[test]
    fn label_limits_parse() {
        assert_eq!(parse_label_limit("peer_port=50"), Ok((SessionLabel::PeerPort, 50)));
        assert!(parse_label_limit("peer_port").unwrap_err().contains("not NAME=N"));
        assert!(parse_label_limit("port=5").unwrap_err().contains("not a session label"));
        assert!(parse_label_limit("pod=0").unwrap_err().contains("at least 1"));
    }
}
