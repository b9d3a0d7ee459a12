//! Which container and pod a session's owner runs in, from the cgroup id the
//! kernel recorded with the owner.
//!
//! The id is the inode number of the cgroup's directory in the cgroup v2
//! filesystem. [`CgroupIndex`] walks that tree to map ids to paths, and
//! [`crate::enrich::pods`] reads the pod UID and container id out of the path and the
//! pod's namespace and name out of the kubelet's pod log directory. Nothing
//! here blocks on anything but the in-memory cgroup and log directories; what
//! cannot be found is empty.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::enrich::pods::{self, CgroupPod, Resolver};

/// What a session's labels say about its workload; empty strings when unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Workload {
    pub container_id: String,
    pub pod_uid: String,
    pub pod: String,
    pub namespace: String,
}

/// Bounds one walk of the cgroup tree: a node has thousands of cgroups, not
/// millions; beyond this the walk stops and what it found is used.
const MAX_CGROUPS: usize = 200_000;

/// Cgroup id to what its path says about a pod (`None`: not in a pod).
///
/// When to walk: the kernel numbers cgroups in creation order (64-bit
/// kernfs ids, increasing), so an unknown id above the highest id the last
/// walk saw belongs to a cgroup created since, and is worth a walk; an
/// unknown id below it belonged to a cgroup already removed when we walked,
/// and no walk can find it. So walks follow cgroup creation, not session
/// rates, and a stream of sessions from removed cgroups costs nothing.
#[derive(Debug, Default)]
pub struct CgroupIndex {
    root: Option<PathBuf>,
    /// The last walk's cgroups.
    current: HashMap<u64, Option<CgroupPod>>,
    /// The walk before: cgroups removed since (a container that just ended)
    /// still name their sessions that close late, for one more walk.
    previous: HashMap<u64, Option<CgroupPod>>,
    /// Ids at or below this are known or gone.
    watermark: u64,
}

impl CgroupIndex {
    pub fn new(root: Option<PathBuf>) -> Self {
        CgroupIndex { root, ..Default::default() }
    }

    pub fn pod(&mut self, cgroup_id: u64) -> Option<&CgroupPod> {
        let known = self.current.contains_key(&cgroup_id) || self.previous.contains_key(&cgroup_id);
        if !known && cgroup_id > self.watermark {
            self.walk();
            // Not found even now (outside our view of the tree): never again.
            self.watermark = self.watermark.max(cgroup_id);
        }
        self.current.get(&cgroup_id).or_else(|| self.previous.get(&cgroup_id))?.as_ref()
    }

    fn walk(&mut self) {
        let Some(root) = &self.root else { return };
        let mut found = HashMap::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            if found.len() >= MAX_CGROUPS {
                tracing::warn!(limit = MAX_CGROUPS, "cgroup tree larger than expected; indexed part of it");
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else { continue };
            found.insert(meta.ino(), pods::parse_cgroup_path(&relative(root, &dir)));
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            stack.extend(entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()));
        }
        self.watermark = self.watermark.max(found.keys().copied().max().unwrap_or(0));
        self.previous = std::mem::replace(&mut self.current, found);
    }
}

/// `/kubepods/...` for a directory below the cgroup root.
fn relative(root: &Path, dir: &Path) -> String {
    format!("/{}", dir.strip_prefix(root).unwrap_or(dir).display())
}

/// Container and pod of cgroups, with pod names from the kubelet's log directory.
#[derive(Debug)]
pub struct Workloads {
    cgroups: CgroupIndex,
    names: Resolver,
}

impl Workloads {
    pub fn new(cgroup_root: Option<PathBuf>, pod_log_dir: &Path) -> Self {
        Workloads { cgroups: CgroupIndex::new(cgroup_root), names: Resolver::new(pod_log_dir) }
    }

    pub fn of_cgroup(&mut self, cgroup_id: u64) -> Workload {
        let Some(found) = self.cgroups.pod(cgroup_id).cloned() else { return Workload::default() };
        let named = self.names.pod_by_uid(&found.uid);
        Workload {
            container_id: found.container.map(|c| c.id).unwrap_or_default(),
            pod: named.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
            namespace: named.map(|p| p.namespace).unwrap_or_default(),
            pod_uid: found.uid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0d2b7f1e-3c4a-4b5d-9e6f-7a8b9c0d1e2f";
    const CID: &str = "4f9a1c2b3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";

    /// A directory tree standing in for a cgroup mount: the index only reads
    /// directory names and inode numbers, which any filesystem has. The
    /// end-to-end tests use real cgroups.
    #[test]
    fn maps_directory_inodes_to_pods_and_names() {
        let root = std::env::temp_dir().join(format!("observer-workload-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (cg, logs) = (root.join("cg"), root.join("logs"));
        let container = cg.join(format!("kubepods/burstable/pod{UID}/{CID}"));
        std::fs::create_dir_all(&container).unwrap();
        std::fs::create_dir_all(cg.join("system.slice")).unwrap();
        std::fs::create_dir_all(logs.join(format!("team-a_trainer-0_{UID}"))).unwrap();
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();

        let mut w = Workloads::new(Some(cg.clone()), &logs);
        assert_eq!(
            w.of_cgroup(ino(&container)),
            Workload {
                container_id: CID.into(),
                pod_uid: UID.into(),
                pod: "trainer-0".into(),
                namespace: "team-a".into()
            }
        );
        let pod_dir = cg.join(format!("kubepods/burstable/pod{UID}"));
        assert_eq!(w.of_cgroup(ino(&pod_dir)).container_id, "", "pod cgroup itself: no container");
        assert_eq!(w.of_cgroup(ino(&pod_dir)).pod_uid, UID);
        assert_eq!(w.of_cgroup(ino(&cg.join("system.slice"))), Workload::default());
        // Created after the last walk. A real cgroup would have a higher id
        // than any the walk saw; a temporary directory's inode need not, so
        // the watermark is lowered to stand for that.
        let later = cg.join(format!("kubepods/pod{UID}/{}", CID.replace('4', "5")));
        std::fs::create_dir_all(&later).unwrap();
        let removed = ino(&container);
        std::fs::remove_dir(&container).unwrap();
        w.cgroups.watermark = 0;
        assert_eq!(w.of_cgroup(ino(&later)).container_id, CID.replace('4', "5"));
        assert_eq!(w.of_cgroup(removed).container_id, CID, "removed: still known for one more walk");
        assert_eq!(w.of_cgroup(u64::MAX), Workload::default(), "unknown id");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
