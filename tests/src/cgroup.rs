//! Real cgroup v2 directories made by a test, with kubelet-style names, and
//! commands started inside them.
//!
//! Every cgroup lives below a test-owned prefix directory in the cgroup v2
//! root (`observer-test-<pid>-<n>/`), so a test never touches a real
//! `kubepods` tree; the observer finds the pod segment anywhere in a path,
//! as it must for nested kubelets (kind). Dropping a [`TestCgroup`] removes
//! the directories it made, deepest first (a cgroup can only be removed once
//! its processes are gone: wait for them first).
use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Context, Result, bail};

/// statfs magic of the cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cgroup v2 mount: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones.
pub fn cgroup2_root() -> Result<PathBuf> {
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let c = CString::new(candidate)?;
        // SAFETY: statfs writes into the zeroed struct we own.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC {
            return Ok(PathBuf::from(candidate));
        }
    }
    bail!("no cgroup v2 filesystem at /sys/fs/cgroup or /sys/fs/cgroup/unified")
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
pub struct TestCgroup {
    /// The prefix directory this test owns.
    prefix: PathBuf,
    leaf: PathBuf,
}

impl TestCgroup {
    /// Makes `<root>/observer-test-<pid>-<n>/<path>`; `path` is relative
    /// (`kubepods.slice/.../cri-containerd-<id>.scope`).
    pub fn create(path: &str) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = cgroup2_root()?.join(format!("observer-test-{}-{n}", std::process::id()));
        let leaf = prefix.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(&leaf).with_context(|| format!("creating cgroup {}", leaf.display()))?;
        Ok(TestCgroup { prefix, leaf })
    }

    pub fn path(&self) -> &Path {
        &self.leaf
    }

    /// Makes `cmd`'s process join this cgroup before it execs, so everything
    /// it does (its connections included) belongs to the cgroup.
    pub fn run_inside(&self, cmd: &mut Command) -> Result<()> {
        let procs = CString::new(self.leaf.join("cgroup.procs").as_os_str().as_bytes())?;
        // SAFETY: open/write/close only, all async-signal-safe; the path was
        // allocated before fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0": the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 { Err(err) } else { Ok(()) }
            });
        }
        Ok(())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let mut dir = self.leaf.as_path();
        loop {
            if let Err(e) = std::fs::remove_dir(dir) {
                eprintln!("warning: cannot remove cgroup {}: {e}", dir.display());
                return;
            }
            if dir == self.prefix {
                return;
            }
            match dir.parent() {
                Some(parent) => dir = parent,
                None => return,
            }
        }
    }
}
