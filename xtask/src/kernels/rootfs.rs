//! The guest root of an architecture other than the host's (arm64): the x86
//! guests chroot into the host's own root over virtio-9p, which an arm64 guest
//! cannot run. Instead a small Debian root of that architecture is unpacked
//! from the package registry (the packages below and everything they depend
//! on, resolved by apt against package lists of that architecture) and shared
//! read-only in the host root's place; the cross-built observer and test
//! binaries reach the guest through the writable work directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use super::fetch::Apt;
use crate::util;

/// What the guest script and the tests run: a shell and the coreutils the
/// script uses (`timeout`, `date`, `chroot`), `unshare` and `mount` (the
/// broken-hook starts), `ip`/`tc` (network namespaces, veth, qdiscs), `nft`
/// (the drops test), and the C runtime the Rust binaries link against.
/// busybox-static is the initramfs' /init, as on x86.
pub const PACKAGES: [&str; 11] = [
    "libc6",
    "libgcc-s1",
    "dash",
    "coreutils",
    "grep",
    "sed",
    "util-linux",
    "mount",
    "iproute2",
    "nftables",
    "busybox-static",
];

/// Directories the guest's /init mounts over or the tests write to: mount
/// points must exist in a read-only root.
const MOUNT_POINTS: [&str; 9] = ["proc", "sys", "dev", "tmp", "run", "root", "var/tmp", "etc", "newroot"];

/// What Debian's base-files would link: `ip netns` keeps its namespaces in
/// /run/netns, which the tests open as /var/run/netns.
const LINKS: [(&str, &str); 2] = [("var/run", "/run"), ("var/lock", "/run/lock")];

/// The unpacked root under `dir/root`, reused while the downloaded package set
/// is the same. Returns its path.
pub fn prepare(apt: &Apt, dir: &Path) -> Result<PathBuf> {
    let debs = apt.download_closure(&PACKAGES, &dir.join("debs"))?;
    let root = dir.join("root");
    let stamp = dir.join("packages");
    let want: String =
        debs.iter().filter_map(|p| p.file_name()).map(|n| format!("{}\n", n.to_string_lossy())).collect();
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) && root.is_dir() {
        eprintln!("xtask kernels: guest root of {} packages cached in {}", debs.len(), root.display());
        finish(&root)?;
        return Ok(root);
    }
    if root.exists() {
        std::fs::remove_dir_all(&root).with_context(|| format!("clearing {}", root.display()))?;
    }
    std::fs::create_dir_all(&root)?;
    for deb in &debs {
        util::run_checked(Command::new("dpkg").arg("-x").arg(deb).arg(&root), "unpacking a guest root package")?;
    }
    finish(&root)?;
    ensure!(root.join("bin/busybox").is_file(), "busybox-static left no bin/busybox in {}", root.display());
    std::fs::write(&stamp, want)?;
    eprintln!("xtask kernels: guest root of {} packages unpacked in {}", debs.len(), root.display());
    Ok(root)
}

/// What maintainer scripts and base-files would add to the unpacked packages: mount
/// points, links, the few /etc files. Idempotent, so a cached root gets what a newer
/// xtask adds.
fn finish(root: &Path) -> Result<()> {
    for d in MOUNT_POINTS {
        std::fs::create_dir_all(root.join(d))?;
    }
    for (link, target) in LINKS.iter().chain(&[("bin/sh", "dash")]) {
        let path = root.join(link);
        if std::fs::symlink_metadata(&path).is_err() {
            std::os::unix::fs::symlink(target, &path).with_context(|| format!("linking {}", path.display()))?;
        }
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(root.join("etc/group"), "root:x:0:\n")?;
    std::fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n::1 localhost\n")?;
    Ok(())
}

/// Makes `work` (the host's path of the guest's writable share) a mount point
/// in `root`, so the guest mounts it at the same path as on x86 and the
/// binaries copied there keep their host paths.
pub fn add_mount_point(root: &Path, work: &Path) -> Result<()> {
    let inside = root.join(work.strip_prefix("/").unwrap_or(work));
    std::fs::create_dir_all(&inside).with_context(|| format!("creating {}", inside.display()))
}

/// Copies `bin` into `dir`, returning the copy's path.
pub fn copy_in(bin: &Path, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let to = dir.join(bin.file_name().context("a binary without a file name")?);
    std::fs::copy(bin, &to).with_context(|| format!("copying {} to {}", bin.display(), to.display()))?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_directory_becomes_a_mount_point_under_the_root() {
        let dir = std::env::temp_dir().join(format!("xtask-rootfs-test-{}", std::process::id()));
        add_mount_point(&dir, Path::new("/w/target/kernels/runs/6.1-arm64")).unwrap();
        assert!(dir.join("w/target/kernels/runs/6.1-arm64").is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(PACKAGES.contains(&"busybox-static") && PACKAGES.contains(&"nftables"));
    }
}
