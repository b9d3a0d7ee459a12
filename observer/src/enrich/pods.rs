//! Which Kubernetes pod a process (or a cgroup) belongs to.
//!
//! The kubelet puts every container in a cgroup below its pod's cgroup, and
//! names the pod's cgroup after the pod's UID. Two layouts exist, one per
//! kubelet cgroup driver:
//!
//! - systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/<container>.scope`,
//!   the UID's dashes written as underscores (systemd reserves `-` for nesting);
//!   Guaranteed pods sit directly under `kubepods.slice` (`kubepods-pod<uid>.slice`).
//! - cgroupfs: `/kubepods/burstable/pod<uid>/<container id>`, Guaranteed pods
//!   directly under `/kubepods`.
//!
//! The container's own cgroup is named by the runtime: `cri-containerd-<id>.scope`
//! (containerd), `crio-<id>.scope` (CRI-O; its monitor sits in
//! `crio-conmon-<id>.scope`), `docker-<id>.scope` (Docker / cri-dockerd)
//! with the systemd driver; the bare 64-hex id (containerd, Docker) or
//! `crio-<id>` with cgroupfs.
//!
//! The cgroup knows the pod's UID only. Its namespace and name come from the
//! kubelet's pod log directory, `/var/log/pods/<namespace>_<pod>_<uid>`, which
//! the kubelet creates for every pod it runs and which a node agent can mount
//! read-only (neither names nor namespaces may contain `_`).
//!
//! Parsing is pure (and unit-tested on real-looking lines); [`Resolver`] adds
//! the file reads and a cache of the log directory.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Where the kubelet keeps pod logs, one directory per pod.
pub const DEFAULT_POD_LOG_DIR: &str = "/var/log/pods";

/// Kubernetes quality-of-service class, which decides the pod cgroup's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// The container runtime that named a container's cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
}

/// A container cgroup inside a pod's cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Container {
    /// `None` for a bare 64-hex directory (cgroupfs driver), which containerd
    /// and Docker both use.
    pub runtime: Option<Runtime>,
    /// The runtime's 64-hex container id.
    pub id: String,
}

/// What a cgroup path says about the pod it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CgroupPod {
    /// Pod UID with dashes (`0d2b7f1e-...`), or the 32-hex UID of a static pod.
    pub uid: String,
    pub qos: QosClass,
    /// The container, when the path goes below the pod's cgroup into one
    /// (not for the pod cgroup itself, nor for CRI-O's conmon).
    pub container: Option<Container>,
}

/// A pod as the kubelet's log directory names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// Finds the pod in a cgroup path (the third field of a `/proc/<pid>/cgroup`
/// line). The pod segment may be anywhere in the path: inside a cgroup
/// namespace the path is relative (`/../../kubepods-...`), and nested setups
/// (kind) prefix it (`/kubelet.slice/kubelet-kubepods.slice/...`).
pub fn parse_cgroup_path(path: &str) -> Option<CgroupPod> {
    // A cgroup removed while a process still reports it.
    let path = path.trim_end().trim_end_matches(" (deleted)");
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    for (i, seg) in segments.iter().enumerate() {
        let up = |n: usize| i.checked_sub(n).map(|p| segments[p]);
        let Some((uid, qos)) = systemd_pod(seg).or_else(|| cgroupfs_pod(seg, up(1), up(2))) else {
            continue;
        };
        let container = segments.get(i + 1).and_then(|s| parse_container(s));
        return Some(CgroupPod { uid, qos, container });
    }
    None
}

/// Finds the pod in the text of `/proc/<pid>/cgroup`. The cgroup v2 line
/// (`0::/...`) is preferred; on hybrid hosts any v1 hierarchy that has the pod
/// (`memory`, `name=systemd`, ...) does as well.
pub fn parse_proc_cgroup(text: &str) -> Option<CgroupPod> {
    let paths = text.lines().filter_map(|line| {
        let mut f = line.splitn(3, ':');
        let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
        Some((id == "0" && controllers.is_empty(), path))
    });
    let (unified, v1): (Vec<_>, Vec<_>) = paths.partition(|(unified, _)| *unified);
    unified.into_iter().chain(v1).find_map(|(_, path)| parse_cgroup_path(path))
}

/// `<namespace>_<pod>_<uid>`, the kubelet's name for a pod's log directory.
pub fn parse_pod_log_dir_name(name: &str) -> Option<Pod> {
    let mut f = name.split('_');
    let (namespace, pod, uid) = (f.next()?, f.next()?, f.next()?);
    if f.next().is_some() || namespace.is_empty() || pod.is_empty() {
        return None;
    }
    let uid = normalize_uid(uid)?;
    Some(Pod { namespace: namespace.to_string(), name: pod.to_string(), uid })
}

/// `kubepods-besteffort-pod<uid>.slice`, `kubepods-pod<uid>.slice`, and the
/// same under a prefix (`kubelet-kubepods-...` in kind).
fn systemd_pod(seg: &str) -> Option<(String, QosClass)> {
    let stem = seg.strip_suffix(".slice")?;
    let at = stem.rfind("-pod")?;
    let (prefix, uid) = (&stem[..at], &stem[at + "-pod".len()..]);
    if !prefix.split('-').any(|p| p == "kubepods") {
        return None;
    }
    let qos = match prefix.rsplit('-').next() {
        Some("besteffort") => QosClass::BestEffort,
        Some("burstable") => QosClass::Burstable,
        _ => QosClass::Guaranteed,
    };
    Some((normalize_uid(uid)?, qos))
}

/// `pod<uid>` below `kubepods`, `kubepods/burstable` or `kubepods/besteffort`.
fn cgroupfs_pod(seg: &str, parent: Option<&str>, grandparent: Option<&str>) -> Option<(String, QosClass)> {
    let uid = normalize_uid(seg.strip_prefix("pod")?)?;
    let qos = match (grandparent, parent?) {
        (_, "kubepods") => QosClass::Guaranteed,
        (Some("kubepods"), "besteffort") => QosClass::BestEffort,
        (Some("kubepods"), "burstable") => QosClass::Burstable,
        _ => return None,
    };
    Some((uid, qos))
}

fn parse_container(seg: &str) -> Option<Container> {
    let (runtime, id) = if let Some(scope) = seg.strip_suffix(".scope") {
        if scope.starts_with("crio-conmon-") {
            // CRI-O's monitor process: in the pod, but not a container.
            return None;
        }
        if let Some(id) = scope.strip_prefix("cri-containerd-") {
            (Some(Runtime::Containerd), id)
        } else if let Some(id) = scope.strip_prefix("crio-") {
            (Some(Runtime::CriO), id)
        } else if let Some(id) = scope.strip_prefix("docker-") {
            (Some(Runtime::Docker), id)
        } else {
            return None;
        }
    } else if let Some(id) = seg.strip_prefix("crio-") {
        (Some(Runtime::CriO), id)
    } else {
        (None, seg)
    };
    (id.len() == 64 && is_lower_hex(id)).then(|| Container { runtime, id: id.to_string() })
}

/// A pod UID in its canonical form: a UUID (8-4-4-4-12, dashes; systemd's
/// underscores turned back into dashes) or the 32-hex hash the kubelet gives
/// static pods.
fn normalize_uid(raw: &str) -> Option<String> {
    let uid = raw.replace('_', "-").to_ascii_lowercase();
    let groups: Vec<&str> = uid.split('-').collect();
    let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    let ok = (lens == [8, 4, 4, 4, 12] || lens == [32]) && groups.iter().all(|g| is_lower_hex(g));
    ok.then_some(uid)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What [`Resolver`] found for a process or cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodLookup {
    Pod(Pod),
    /// In a pod's cgroup, but the pod log directory has no entry for its UID
    /// (log directory not mounted, or the pod just started or ended).
    UnnamedPod {
        uid: String,
    },
    /// Not in a Kubernetes pod (a host process, or a runtime other than the
    /// kubelet's).
    NotInPod,
    /// The process exited, or its cgroup file cannot be read (no `hostPID`).
    NoProcess,
}

/// Maps processes and cgroups to pods: reads `/proc/<pid>/cgroup` on every
/// call (a PID may be reused, a cached answer could be wrong), and caches the
/// pod log directory (UID -> namespace and name), rescanning it when a UID is
/// missing, at most once per `rescan_after`.
#[derive(Debug)]
pub struct Resolver {
    proc_root: PathBuf,
    log_dir: PathBuf,
    names: HashMap<String, Pod>,
    last_scan: Option<Instant>,
    rescan_after: Duration,
    /// The last scan's error, so a missing mount is reported once, not per call.
    pub scan_error: Option<String>,
}

impl Resolver {
    pub fn new(log_dir: impl Into<PathBuf>) -> Self {
        Resolver {
            proc_root: PathBuf::from("/proc"),
            log_dir: log_dir.into(),
            names: HashMap::new(),
            last_scan: None,
            rescan_after: Duration::from_secs(1),
            scan_error: None,
        }
    }

    /// Reads processes from another procfs mount (tests; a host `/proc`
    /// mounted elsewhere).
    pub fn with_proc_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.proc_root = root.into();
        self
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    pub fn pod_of_pid(&mut self, pid: u32) -> PodLookup {
        match std::fs::read_to_string(self.proc_root.join(pid.to_string()).join("cgroup")) {
            Ok(text) => self.named(parse_proc_cgroup(&text)),
            Err(_) => PodLookup::NoProcess,
        }
    }

    pub fn pod_of_cgroup_path(&mut self, path: &str) -> PodLookup {
        self.named(parse_cgroup_path(path))
    }

    /// Namespace and name of the pod with this UID, from the log directory.
    pub fn pod_by_uid(&mut self, uid: &str) -> Option<Pod> {
        if let Some(pod) = self.names.get(uid) {
            return Some(pod.clone());
        }
        let due = self.last_scan.is_none_or(|t| t.elapsed() >= self.rescan_after);
        if due {
            self.rescan();
        }
        self.names.get(uid).cloned()
    }

    fn named(&mut self, found: Option<CgroupPod>) -> PodLookup {
        match found {
            None => PodLookup::NotInPod,
            Some(cg) => match self.pod_by_uid(&cg.uid) {
                Some(pod) => PodLookup::Pod(pod),
                None => PodLookup::UnnamedPod { uid: cg.uid },
            },
        }
    }

    /// Replaces the cache with the directory's current entries, so pods that
    /// ended drop out.
    fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        match std::fs::read_dir(&self.log_dir) {
            Ok(entries) => {
                self.names = entries
                    .filter_map(|e| parse_pod_log_dir_name(e.ok()?.file_name().to_str()?))
                    .map(|p| (p.uid.clone(), p))
                    .collect();
                self.scan_error = None;
            }
            Err(e) => self.scan_error = Some(format!("cannot read pod log directory {}: {e}", self.log_dir.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d2b7f1e-3c4a-4b5d-9e6f-7a8b9c0d1e2f";
    const UID_: &str = "0d2b7f1e_3c4a_4b5d_9e6f_7a8b9c0d1e2f";
    const CID: &str = "4f9a1c2b3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";

    fn pod(qos: QosClass, runtime: Option<Runtime>) -> Option<CgroupPod> {
        Some(CgroupPod { uid: UID.into(), qos, container: Some(Container { runtime, id: CID.into() }) })
    }

    #[test]
    fn systemd_driver_each_runtime_and_qos() {
        use QosClass::*;
        use Runtime::*;
        for (path, want) in [
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                pod(BestEffort, Some(Containerd)),
            ),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope"),
                pod(Burstable, Some(CriO)),
            ),
            (format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope"), pod(Guaranteed, Some(Docker))),
            // kind and other nested kubelets prefix every name.
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
                ),
                pod(BestEffort, Some(Containerd)),
            ),
            // Seen from inside a cgroup namespace.
            (
                format!("/../../kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"),
                pod(Burstable, Some(Containerd)),
            ),
        ] {
            assert_eq!(parse_cgroup_path(&path), want, "{path}");
        }
    }

    #[test]
    fn cgroupfs_driver_each_runtime_and_qos() {
        use QosClass::*;
        for (path, want) in [
            (format!("/kubepods/besteffort/pod{UID}/{CID}"), pod(BestEffort, None)),
            (format!("/kubepods/burstable/pod{UID}/crio-{CID}"), pod(Burstable, Some(Runtime::CriO))),
            (format!("/kubepods/pod{UID}/{CID}"), pod(Guaranteed, None)),
        ] {
            assert_eq!(parse_cgroup_path(&path), want, "{path}");
        }
    }

    #[test]
    fn pod_cgroup_without_container_conmon_and_static_pods() {
        let p =
            parse_cgroup_path(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"))
                .unwrap();
        assert_eq!((p.uid.as_str(), p.qos, p.container), (UID, QosClass::Burstable, None));
        let p =
            parse_cgroup_path(&format!("/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{CID}.scope")).unwrap();
        assert_eq!(p.container, None, "conmon is in the pod but is not a container");
        // Static pods: the UID is a 32-hex hash of the manifest.
        let p = parse_cgroup_path("/kubepods/burstable/pod6a5e0c2a3f1d4b7c8e9f0a1b2c3d4e5f/x").unwrap();
        assert_eq!(p.uid, "6a5e0c2a3f1d4b7c8e9f0a1b2c3d4e5f");
        assert_eq!(parse_cgroup_path(&format!("/kubepods/pod{UID}/{CID} (deleted)")).unwrap().uid, UID);
    }

    #[test]
    fn not_pods() {
        for path in [
            "/",
            "/user.slice/user-1000.slice/session-3.scope",
            "/system.slice/containerd.service",
            "/system.slice/docker-4f9a1c2b.scope",
            // Names that merely look alike.
            "/kubepods.slice/kubepods-besteffort.slice",
            "/kubepods/burstable",
            "/kubepods/burstable/podnot-a-uid/abc",
            "/other/besteffort/pod0d2b7f1e-3c4a-4b5d-9e6f-7a8b9c0d1e2f",
            "/system.slice/foo-pod0d2b7f1e_3c4a_4b5d_9e6f_7a8b9c0d1e2f.slice",
        ] {
            assert_eq!(parse_cgroup_path(path), None, "{path}");
        }
    }

    #[test]
    fn proc_cgroup_files_v2_and_hybrid() {
        let v2 = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope\n"
        );
        assert_eq!(parse_proc_cgroup(&v2).unwrap().uid, UID);
        // Hybrid host (this project's CI): v1 hierarchies first, v2 last.
        let hybrid = format!("12:memory:/kubepods/burstable/pod{UID}/{CID}\n9:name=systemd:/\n1:cpu:/\n0::/\n");
        let p = parse_proc_cgroup(&hybrid).unwrap();
        assert_eq!((p.uid.as_str(), p.qos), (UID, QosClass::Burstable));
        assert_eq!(parse_proc_cgroup("9:name=systemd:/\n0::/user.slice\n"), None);
        assert_eq!(parse_proc_cgroup(""), None);
        assert_eq!(parse_proc_cgroup("garbage without colons"), None);
    }

    #[test]
    fn pod_log_dir_names() {
        assert_eq!(
            parse_pod_log_dir_name(&format!("kube-system_nvidia-dcgm-abcde_{UID}")),
            Some(Pod { namespace: "kube-system".into(), name: "nvidia-dcgm-abcde".into(), uid: UID.into() })
        );
        assert_eq!(parse_pod_log_dir_name("ns_pod"), None);
        assert_eq!(parse_pod_log_dir_name(&format!("ns_pod_{UID}_extra")), None);
        assert_eq!(parse_pod_log_dir_name("ns_pod_not-a-uid"), None);
        assert_eq!(parse_pod_log_dir_name(&format!("_pod_{UID}")), None);
    }

    #[test]
    fn resolver_maps_pids_and_rescans_on_a_missing_uid() {
        let root = std::env::temp_dir().join(format!("observer-pods-test-{}", std::process::id()));
        let (proc_root, logs) = (root.join("proc"), root.join("pods"));
        let _ = std::fs::remove_dir_all(&root);
        for (pid, text) in [
            ("100", format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope\n")),
            ("200", "0::/system.slice/sshd.service\n".to_string()),
        ] {
            std::fs::create_dir_all(proc_root.join(pid)).unwrap();
            std::fs::write(proc_root.join(pid).join("cgroup"), text).unwrap();
        }
        let mut r = Resolver::new(&logs).with_proc_root(&proc_root);
        r.rescan_after = Duration::ZERO;
        assert_eq!(r.pod_of_pid(100), PodLookup::UnnamedPod { uid: UID.into() });
        assert!(r.scan_error.as_deref().unwrap().contains("cannot read pod log directory"));
        std::fs::create_dir_all(logs.join(format!("team-a_trainer-0_{UID}"))).unwrap();
        let want = Pod { namespace: "team-a".into(), name: "trainer-0".into(), uid: UID.into() };
        assert_eq!(r.pod_of_pid(100), PodLookup::Pod(want.clone()));
        assert_eq!(r.scan_error, None);
        assert_eq!(r.pod_of_pid(200), PodLookup::NotInPod);
        assert_eq!(r.pod_of_pid(300), PodLookup::NoProcess);
        assert_eq!(r.pod_of_cgroup_path(&format!("/kubepods/pod{UID}/{CID}")), PodLookup::Pod(want));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
