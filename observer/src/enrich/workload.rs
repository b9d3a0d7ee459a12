//! Which container and pod a session's owner runs in, from the cgroup id the
//! kernel recorded with the owner.
//!
//! The id is the inode number of the cgroup's directory in the cgroup v2
//! filesystem. [`CgroupIndex`] walks that tree to map ids to paths, and
//! [`crate::enrich::pods`] reads the pod UID and container id out of the path and the
//! pod's namespace and name out of the kubelet's pod log directory. Nothing
//! here blocks on anything but the in-memory cgroup and log directories, and
//! the walks of the cgroup tree run on a thread of their own; what cannot be
//! found is empty.
use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};

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

/// The longest rest between two walks: after a walk that took `d`, the next
/// one waits `d` (at most this), so cgroups created without pause cost the
/// walker half a core at most.
const MAX_REST: Duration = Duration::from_secs(1);

/// Cgroup id to what its path says about a pod (`None`: not in a pod).
///
/// When to walk: the kernel numbers cgroups in creation order (64-bit
/// kernfs ids, increasing), so an unknown id above the highest id the last
/// walk saw belongs to a cgroup created since, and is worth a walk; an
/// unknown id below it belonged to a cgroup already removed when we walked,
/// and no walk can find it. So walks follow cgroup creation, not session
/// rates, and a stream of sessions from removed cgroups costs nothing.
///
/// Walks run on a thread of their own, never in the caller's: a tenant
/// creating cgroups, or a large tree, must not hold up the ring reader that
/// asks. A lookup that needs a walk answers `Lookup::Pending` and asks for
/// one; the caller looks again once `walks` has moved on.
#[derive(Debug)]
pub struct CgroupIndex {
    root: Option<PathBuf>,
    shared: Arc<Shared>,
    /// Whether the walker thread was started (at the first walk asked for).
    walker: bool,
}

#[derive(Debug, Default)]
struct Shared {
    index: Mutex<Index>,
    /// Wakes the walker when a walk is asked for, or to stop.
    wake: Condvar,
    /// Walks done so far.
    walks: AtomicU64,
}

#[derive(Debug, Default)]
struct Index {
    /// The last walk's cgroups.
    current: HashMap<u64, Option<CgroupPod>>,
    /// The walk before: cgroups removed since (a container that just ended)
    /// still name their sessions that close late, for one more walk.
    previous: HashMap<u64, Option<CgroupPod>>,
    /// Ids at or below this are known or gone.
    watermark: u64,
    /// The highest id a walk was asked for; above `watermark` while one is
    /// due or under way.
    wanted: u64,
    /// Set when the index is dropped: the walker ends.
    stop: bool,
}

/// What the index says of a cgroup id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Known (`None`: not in a pod), or as known as it will get.
    Known(Option<CgroupPod>),
    /// A walk that may find it is due or under way.
    Pending,
}

impl CgroupIndex {
    pub fn new(root: Option<PathBuf>) -> Self {
        CgroupIndex { root, shared: Arc::default(), walker: false }
    }

    /// What the index knows of `cgroup_id`; asks for a walk when one may
    /// find it, and answers `Pending` until that walk is done. Never waits
    /// for a walk.
    pub fn pod(&mut self, cgroup_id: u64) -> Lookup {
        let Some(root) = &self.root else { return Lookup::Known(None) };
        let mut index = self.shared.index.lock();
        if let Some(found) = index.current.get(&cgroup_id).or_else(|| index.previous.get(&cgroup_id)) {
            return Lookup::Known(found.clone());
        }
        if cgroup_id <= index.watermark {
            return Lookup::Known(None);
        }
        if cgroup_id > index.wanted {
            index.wanted = cgroup_id;
            self.shared.wake.notify_one();
        }
        drop(index);
        if !self.walker {
            self.walker = true;
            let (root, shared) = (root.clone(), self.shared.clone());
            if let Err(e) = thread::Builder::new().name("cgroup-walk".into()).spawn(move || walker(&root, &shared)) {
                tracing::warn!(error = %e, "cannot start the cgroup walker; workload labels stay empty");
                self.root = None;
                return Lookup::Known(None);
            }
        }
        Lookup::Pending
    }

    /// Walks done so far: when it moves on, `Pending` lookups may be known.
    pub fn walks(&self) -> u64 {
        self.shared.walks.load(Ordering::Acquire)
    }
}

impl Drop for CgroupIndex {
    fn drop(&mut self) {
        self.shared.index.lock().stop = true;
        self.shared.wake.notify_one();
    }
}

/// The walker thread: walks whenever a walk is wanted, until stopped.
fn walker(root: &Path, shared: &Shared) {
    loop {
        let target = {
            let mut index = shared.index.lock();
            shared.wake.wait_while(&mut index, |i| !i.stop && i.wanted <= i.watermark);
            if index.stop {
                return;
            }
            index.wanted
        };
        let started = Instant::now();
        let found = walk(root);
        let took = started.elapsed();
        {
            let mut index = shared.index.lock();
            // Not found even now (outside our view of the tree): never again.
            index.watermark = index.watermark.max(found.keys().copied().max().unwrap_or(0)).max(target);
            index.previous = std::mem::replace(&mut index.current, found);
        }
        shared.walks.fetch_add(1, Ordering::Release);
        thread::sleep(took.min(MAX_REST));
    }
}

/// Every cgroup below `root`, up to `MAX_CGROUPS`.
fn walk(root: &Path) -> HashMap<u64, Option<CgroupPod>> {
    let mut found = HashMap::new();
    let mut stack = vec![root.to_path_buf()];
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
    found
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

    /// The workload of `cgroup_id`; `None` while a walk of the cgroup tree
    /// that may find it is under way (see `CgroupIndex`).
    pub fn of_cgroup(&mut self, cgroup_id: u64) -> Option<Workload> {
        let found = match self.cgroups.pod(cgroup_id) {
            Lookup::Pending => return None,
            Lookup::Known(None) => return Some(Workload::default()),
            Lookup::Known(Some(found)) => found,
        };
        let named = self.names.pod_by_uid(&found.uid);
        Some(Workload {
            container_id: found.container.map(|c| c.id).unwrap_or_default(),
            pod: named.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
            namespace: named.map(|p| p.namespace).unwrap_or_default(),
            pod_uid: found.uid,
        })
    }

    /// Whether the workload of `cgroup_id` is known now (asking for a walk
    /// if one may find it).
    pub fn ready(&mut self, cgroup_id: u64) -> bool {
        self.cgroups.pod(cgroup_id) != Lookup::Pending
    }

    /// Walks of the cgroup tree done so far (see `CgroupIndex::walks`).
    pub fn walks(&self) -> u64 {
        self.cgroups.walks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workload of `id` once the walks it needs are done.
    fn resolve(w: &mut Workloads, id: u64) -> Workload {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(found) = w.of_cgroup(id) {
                return found;
            }
            assert!(Instant::now() < deadline, "no walk answered for {id}");
            thread::sleep(Duration::from_millis(5));
        }
    }

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
        // The first lookup needs a walk: it answers at once, and the walk
        // runs on the walker's thread.
        assert_eq!(w.of_cgroup(ino(&container)), None, "pending, not waited for");
        assert_eq!(
            resolve(&mut w, ino(&container)),
            Workload {
                container_id: CID.into(),
                pod_uid: UID.into(),
                pod: "trainer-0".into(),
                namespace: "team-a".into()
            }
        );
        let pod_dir = cg.join(format!("kubepods/burstable/pod{UID}"));
        assert_eq!(resolve(&mut w, ino(&pod_dir)).container_id, "", "pod cgroup itself: no container");
        assert_eq!(resolve(&mut w, ino(&pod_dir)).pod_uid, UID);
        assert_eq!(resolve(&mut w, ino(&cg.join("system.slice"))), Workload::default());
        // Created after the last walk. A real cgroup would have a higher id
        // than any the walk saw; a temporary directory's inode need not, so
        // the watermark is lowered to stand for that.
        let later = cg.join(format!("kubepods/pod{UID}/{}", CID.replace('4', "5")));
        std::fs::create_dir_all(&later).unwrap();
        let removed = ino(&container);
        std::fs::remove_dir(&container).unwrap();
        let mut index = w.cgroups.shared.index.lock();
        (index.watermark, index.wanted) = (0, 0);
        drop(index);
        assert_eq!(resolve(&mut w, ino(&later)).container_id, CID.replace('4', "5"));
        assert_eq!(resolve(&mut w, removed).container_id, CID, "removed: still known for one more walk");
        assert_eq!(resolve(&mut w, u64::MAX), Workload::default(), "unknown id");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
