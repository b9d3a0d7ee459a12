//! Session labels: workload identity from real cgroups with kubelet-style
//! names, peer groups of real namespaces, countries from a MaxMind database
//! written here, and the cardinality budget and series TTL.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    process::Stdio,
    time::Duration,
};

use observer_tests::{
    HEADER_LEN, Metrics, NetNs, ObserverProcess, TcpServer, TempDir, TestCgroup, run_observer_cli, transfer,
};

const TIMEOUT: Duration = Duration::from_secs(15);

fn sessions(m: &Metrics, labels: &[(&str, &str)]) -> f64 {
    m.sum("observer_sessions_total", labels)
}

/// One workload: a cgroup path as a kubelet with this driver and runtime
/// names it, and whether the pod log directory names its pod.
struct Workload {
    layout: &'static str,
    uid: String,
    container_id: String,
    path: String,
    named: bool,
}

/// Makes a cgroup path from a pod UID and a container id.
type PathOf = fn(&str, &str) -> String;

fn workloads() -> Vec<Workload> {
    let layouts: [(&str, PathOf, bool); 6] = [
        (
            "systemd/containerd",
            |u, c| {
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{c}.scope",
                    u = u.replace('-', "_")
                )
            },
            true,
        ),
        (
            "systemd/cri-o",
            |u, c| {
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{c}.scope",
                    u = u.replace('-', "_")
                )
            },
            true,
        ),
        (
            "systemd/docker",
            |u, c| format!("kubepods.slice/kubepods-pod{u}.slice/docker-{c}.scope", u = u.replace('-', "_")),
            true,
        ),
        ("cgroupfs/containerd", |u, c| format!("kubepods/burstable/pod{u}/{c}"), true),
        ("cgroupfs/cri-o", |u, c| format!("kubepods/besteffort/pod{u}/crio-{c}"), true),
        // In a pod whose log directory is missing: UID known, name not.
        ("cgroupfs/docker (unnamed)", |u, c| format!("kubepods/pod{u}/{c}"), false),
    ];
    let pid = std::process::id();
    layouts
        .into_iter()
        .enumerate()
        .map(|(i, (layout, path, named))| {
            let uid = format!("{i:08x}-0000-4000-8000-{pid:012x}");
            let container_id = format!("{:064x}", (u128::from(pid) << 32) | (i as u128 + 1));
            Workload { layout, path: path(&uid, &container_id), uid, container_id, named }
        })
        .collect()
}

/// Sends `bytes` to the test server from a bash process inside `cgroup` and
/// the namespace: bash connects (the session's owner), writes the server's
/// request header and the payload, and closes.
fn send_from_cgroup(ns: &NetNs, cgroup: &TestCgroup, server: SocketAddr, bytes: u64) {
    let header: String = bytes.to_be_bytes().iter().chain(&[0u8; 8]).map(|b| format!("\\x{b:02x}")).collect();
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} && printf '{header}' >&3 && head -c {bytes} /dev/zero >&3 && exec 3>&-",
        server.ip(),
        server.port()
    );
    let mut cmd = ns.command_setns("bash");
    cmd.args(["-c", &script]).stdin(Stdio::null());
    cgroup.run_inside(&mut cmd).unwrap();
    let out = observer_tests::run_with_timeout(&mut cmd, TIMEOUT).unwrap();
    assert!(out.status.success(), "client in {}: {}", cgroup.path().display(), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn sessions_carry_container_and_pod_of_their_owners_cgroup() {
    let ns = NetNs::new("workload").unwrap();
    let logs = TempDir::new("pod-logs").unwrap();
    let workloads = workloads();
    for w in workloads.iter().filter(|w| w.named) {
        std::fs::create_dir_all(logs.path().join(format!("team-{0}_trainer-{0}_{1}", &w.uid[..8], w.uid))).unwrap();
    }
    let mut observer = ObserverProcess::start(
        &ns,
        &[
            "--iface",
            "lo",
            "--session-label",
            "comm,container_id,pod_uid,pod,namespace",
            "--pod-log-dir",
            logs.path().to_str().unwrap(),
        ],
    )
    .unwrap();
    let server = TcpServer::start_in(&ns, "127.0.0.1:0".parse().unwrap()).unwrap();
    // Kept until the sessions are reported: the observer maps a cgroup id to
    // its path when the session closes, and a removed cgroup has no path.
    let mut cgroups = Vec::new();
    for (i, w) in workloads.iter().enumerate() {
        let cgroup = TestCgroup::create(&w.path).unwrap();
        send_from_cgroup(&ns, &cgroup, server.addr(), 100_000);
        server.wait_connections(i + 1, TIMEOUT).unwrap();
        cgroups.push(cgroup);
    }
    let m = observer.scrape_until("both ends of every connection", TIMEOUT, |m| {
        sessions(m, &[("protocol", "tcp")]) >= 2.0 * workloads.len() as f64
    });
    for w in &workloads {
        let (pod, namespace) = if w.named {
            (format!("trainer-{}", &w.uid[..8]), format!("team-{}", &w.uid[..8]))
        } else {
            Default::default()
        };
        let want = [
            ("comm", "bash"),
            ("container_id", w.container_id.as_str()),
            ("pod_uid", w.uid.as_str()),
            ("pod", pod.as_str()),
            ("namespace", namespace.as_str()),
            ("protocol", "tcp"),
        ];
        assert_eq!(sessions(&m, &want), 1.0, "{}: {want:?}\n{}", w.layout, m.raw());
        assert_eq!(
            m.sum("observer_session_bytes_total", &[("pod_uid", &w.uid), ("direction", "transmit")]),
            (HEADER_LEN + 100_000) as f64,
            "{}",
            w.layout
        );
    }
    // The server's ends belong to this test process: in no pod.
    let unlabelled = [("container_id", ""), ("pod_uid", ""), ("pod", ""), ("namespace", ""), ("protocol", "tcp")];
    assert_eq!(sessions(&m, &unlabelled), workloads.len() as f64, "{}", m.raw());
}

/// Two peer networks in their own namespaces, joined to the observer's by
/// veth pairs; a MaxMind database written here places them in two countries.
#[test]
fn peers_land_in_their_configured_group_and_country() {
    let obs = NetNs::new("peers").unwrap();
    let nets = [("a", "10.61.0", "DE"), ("b", "10.62.0", "JP")];
    let peers: Vec<NetNs> = nets.iter().map(|(tag, _, _)| NetNs::new(&format!("peer-{tag}")).unwrap()).collect();
    for ((tag, net, _), peer) in nets.iter().zip(&peers) {
        let (here, there) = (format!("obspg{tag}0"), format!("obspg{tag}1"));
        obs.ip(&["link", "add", &here, "type", "veth", "peer", "name", &there, "netns", peer.name()]).unwrap();
        obs.ip(&["addr", "add", &format!("{net}.1/24"), "dev", &here]).unwrap();
        obs.ip(&["link", "set", &here, "up"]).unwrap();
        peer.ip(&["addr", "add", &format!("{net}.2/24"), "dev", &there]).unwrap();
        peer.ip(&["link", "set", &there, "up"]).unwrap();
    }
    let tmp = TempDir::new("geoip").unwrap();
    let db = tmp.path().join("countries.mmdb");
    let mut writer = mmdb_writer::Writer::new("GeoLite2-Country");
    for (_, net, country) in &nets {
        let record = serde_json::json!({ "country": { "iso_code": country } });
        writer.insert(format!("{net}.0/24").parse::<ipnet::IpNet>().unwrap(), &record).unwrap();
    }
    std::fs::write(&db, writer.to_bytes().unwrap()).unwrap();

    let mut observer = ObserverProcess::start(
        &obs,
        &[
            "--iface",
            "lo",
            "--iface",
            "obspga0",
            "--iface",
            "obspgb0",
            "--peer-group",
            "10.61.0.0/16=cluster-a",
            "--peer-group",
            "10.62.0.0/16=cluster-b",
            "--geoip-db",
            db.to_str().unwrap(),
        ],
    )
    .unwrap();
    let servers: Vec<TcpServer> = nets
        .iter()
        .zip(&peers)
        .map(|((_, net, _), peer)| TcpServer::start_in(peer, format!("{net}.2:0").parse().unwrap()).unwrap())
        .collect();
    let local = TcpServer::start_in(&obs, "127.0.0.1:0".parse().unwrap()).unwrap();
    for (server, n) in servers.iter().zip([3, 2]) {
        for _ in 0..n {
            obs.run(|| transfer(server.addr(), 50_000, 50_000, None).unwrap());
        }
    }
    obs.run(|| transfer(local.addr(), 1_000, 1_000, None).unwrap());

    // Only the observer's namespace is watched: the peers' ends are not
    // sessions here; both ends of the loopback connection are.
    let m = observer.scrape_until("7 sessions", TIMEOUT, |m| sessions(m, &[]) >= 7.0);
    assert_eq!(sessions(&m, &[("peer_group", "cluster-a"), ("peer_country", "DE")]), 3.0, "{}", m.raw());
    assert_eq!(sessions(&m, &[("peer_group", "cluster-b"), ("peer_country", "JP")]), 2.0, "{}", m.raw());
    assert_eq!(sessions(&m, &[("peer_group", "loopback"), ("peer_country", "")]), 2.0, "{}", m.raw());
    assert_eq!(sessions(&m, &[]), 7.0, "{}", m.raw());
}

/// 500 connections to 500 distinct service ports against a budget of 50.
#[test]
fn peer_port_values_beyond_the_budget_fold_into_other_and_are_counted() {
    const PORTS: u16 = 500;
    const FIRST: u16 = 20_000;
    let ns = NetNs::new("budget").unwrap();
    let last = FIRST + PORTS - 1;
    let mut observer = ObserverProcess::start(
        &ns,
        &["--iface", "lo", "--service-port", &format!("{FIRST}-{last}"), "--label-limit", "peer_port=50"],
    )
    .unwrap();
    ns.run(|| {
        for port in FIRST..=last {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            let listener = std::net::TcpListener::bind(addr).unwrap();
            let client = std::net::TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            drop(client);
            drop(server);
        }
    });
    let want = 2.0 * f64::from(PORTS);
    let m = observer.scrape_until("both ends of 500 connections", TIMEOUT, |m| sessions(m, &[]) >= want);
    let values: BTreeSet<&str> = m
        .matching("observer_sessions_total", &[])
        .iter()
        .map(|s| s.labels.get("peer_port").map_or("", String::as_str))
        .collect();
    assert_eq!(values.len(), 51, "50 ports and `other`: {values:?}");
    assert!(values.contains("other"));
    assert!(values.iter().filter(|v| **v != "other").all(|v| (FIRST..=last).contains(&v.parse().unwrap())));
    // The servers' ends see ephemeral client ports: `other`, not overflows.
    assert_eq!(m.value("observer_label_overflow_total", &[("label", "peer_port")]), Some(450.0), "{}", m.raw());
    assert_eq!(sessions(&m, &[("peer_port", "other")]), 450.0 + f64::from(PORTS));
}

#[test]
fn label_sets_without_sessions_for_the_ttl_leave_the_exposition() {
    let ns = NetNs::new("ttl").unwrap();
    let mut observer =
        ObserverProcess::start(&ns, &["--iface", "lo", "--session-label", "peer_port", "--series-ttl", "2s"]).unwrap();
    let server = TcpServer::start_in(&ns, "127.0.0.1:0".parse().unwrap()).unwrap();
    ns.run(|| transfer(server.addr(), 1_000, 1_000, None).unwrap());
    observer.scrape_until("the session's series", TIMEOUT, |m| sessions(m, &[("peer_port", "other")]) == 2.0);
    // Not removed while it is younger than the TTL...
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sessions(&observer.metrics().unwrap(), &[("peer_port", "other")]), 2.0);
    // ...and gone once it is older (checked at every scrape).
    let m = observer
        .scrape_until("the series to expire", TIMEOUT, |m| m.matching("observer_sessions_total", &[]).is_empty());
    assert!(m.matching("observer_session_goodput_bytes_per_second_count", &[]).is_empty(), "{}", m.raw());
}

#[test]
fn bad_label_options_are_refused_with_exit_2() {
    for (args, needle) in [
        (&["--peer-group", "10.0.0.0/33=x"][..], "not a CIDR network"),
        (&["--peer-group", "10.1.0.0/8=x"][..], "host bits set"),
        (&["--geoip-db", "/nonexistent/GeoLite2-Country.mmdb"][..], "cannot read --geoip-db"),
        (&["--geoip-db", "/etc/hostname"][..], "not a MaxMind database"),
        (&["--session-label", "peer_country"][..], "needs a MaxMind database"),
        (&["--session-label", "pid"][..], "invalid value"),
        (&["--label-limit", "pod=5"][..], "not an enabled session label"),
        (&["--session-label", "comm", "--label", "comm=x"][..], "name of a session label"),
    ] {
        let mut argv = vec!["run", "--listen", "127.0.0.1:0"];
        argv.extend_from_slice(args);
        let out = run_observer_cli(&argv).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

/// The same options from a configuration file: the three mistakes.
#[test]
fn bad_label_settings_in_a_configuration_file_are_refused_with_exit_2() {
    let tmp = TempDir::new("label-config").unwrap();
    for (name, text, needle) in [
        (
            "unknown-key.toml",
            "session-labels = [\"comm\"]\n",
            "unknown key `session-labels` (did you mean `session-label`?)",
        ),
        ("bad-cidr.toml", "peer-group = [\"10.0.0.0/33=cluster\"]\n", "key `peer-group`"),
        (
            "missing-db.toml",
            "geoip-db = \"/nonexistent/GeoLite2-Country.mmdb\"\n",
            "cannot read --geoip-db /nonexistent",
        ),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = run_observer_cli(&["run", "--listen", "127.0.0.1:0", "--config", path.to_str().unwrap()]).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(stderr.contains(needle), "{name}: {stderr}");
        if name == "bad-cidr.toml" {
            assert!(stderr.contains("not a CIDR network"), "{stderr}");
        }
    }
    // And a good one reaches the program: labels on, values from the file.
    let good = tmp.path().join("good.toml");
    std::fs::write(&good, "session-label = [\"peer_port\"]\nlabel-limit = [\"peer_port=7\"]\n").unwrap();
    let ns = NetNs::new("label-config").unwrap();
    let mut observer = ObserverProcess::start(&ns, &["--iface", "lo", "--config", good.to_str().unwrap()]).unwrap();
    let m = observer.metrics().unwrap();
    assert_eq!(m.value("observer_label_overflow_total", &[("label", "peer_port")]), Some(0.0), "{}", m.raw());
}
