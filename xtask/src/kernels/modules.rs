//! Kernel modules the guest's init must load before it can mount the host's
//! root over virtio-9p, resolved from the unpacked kernel package.
//!
//! Dependencies come from `modinfo -F depends` on each module file, not from
//! `depmod`: depmod over 6.12's xz-compressed module tree costs seconds, and
//! the handful of modules needed here have a handful of dependencies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::bzimage::{self, Compression};

/// What the guest's init loads: the PCI transport for virtio devices, the 9p
/// transport over virtio and the 9p filesystem (to mount the host's root),
/// then what the tests use that Debian builds as modules: nftables and its
/// `numgen` expression, the `tbf` qdisc (`drops`) and veth pairs. The guest cannot load modules on demand (its root is the
/// host's, whose /lib/modules is for another kernel), so add a module here
/// when a test needs one; dependencies follow, soft dependencies do not:
/// crc32c_generic is libcrc32c's (nf_tables') `softdep pre: crc32c`, which
/// names an algorithm, not a module.
pub const GUEST_MODULES: [&str; 8] =
    ["virtio_pci", "9pnet_virtio", "9p", "crc32c_generic", "nf_tables", "nft_numgen", "sch_tbf", "veth"];

/// `modinfo`'s and the kernel's spelling: dashes and underscores are the same.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a file name (`9pnet_virtio.ko.xz` -> `9pnet_virtio`).
pub fn module_name(file_name: &str) -> Option<String> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().find_map(|ext| file_name.strip_suffix(ext)).map(normalize)
}

/// `modinfo -F depends` output: a comma-separated list, empty for none.
pub fn parse_depends(out: &str) -> Vec<String> {
    out.trim().split(',').map(str::trim).filter(|s| !s.is_empty()).map(normalize).collect()
}

/// `modules.builtin`: one `kernel/.../name.ko` path per built-in module.
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines().filter_map(|l| l.trim().rsplit('/').next()).filter_map(module_name).collect()
}

/// The modules to load, dependencies first, for `roots`. Built-in modules
/// are left out (their dependencies are built in too). `deps(name)` gives a
/// module's dependencies, or `None` when the kernel has no such module file.
pub fn load_order(
    roots: &[&str],
    builtin: &BTreeSet<String>,
    mut deps: impl FnMut(&str) -> Result<Option<Vec<String>>>,
) -> Result<Vec<String>> {
    fn visit(
        name: &str,
        builtin: &BTreeSet<String>,
        deps: &mut dyn FnMut(&str) -> Result<Option<Vec<String>>>,
        path: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        if builtin.contains(name) || order.iter().any(|m| m == name) {
            return Ok(());
        }
        if path.iter().any(|m| m == name) {
            bail!("module dependency cycle: {} -> {name}", path.join(" -> "));
        }
        let Some(ds) = deps(name)? else {
            bail!("the kernel has module {name} neither built in nor as a file");
        };
        path.push(name.to_owned());
        for d in ds {
            visit(&d, builtin, deps, path, order)?;
        }
        path.pop();
        order.push(name.to_owned());
        Ok(())
    }
    let mut order = Vec::new();
    for root in roots {
        visit(&normalize(root), builtin, &mut deps, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

/// The module tree of an unpacked kernel package (`lib/modules/<release>`).
pub struct ModuleTree {
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

impl ModuleTree {
    pub fn open(dir: &Path) -> Result<Self> {
        let builtin_path = dir.join("modules.builtin");
        let builtin =
            std::fs::read_to_string(&builtin_path).with_context(|| format!("reading {}", builtin_path.display()))?;
        let mut files = BTreeMap::new();
        let mut stack = vec![dir.join("kernel")];
        while let Some(d) = stack.pop() {
            for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                } else if let Some(name) = entry.file_name().to_str().and_then(module_name) {
                    files.insert(name, path);
                }
            }
        }
        Ok(Self { files, builtin: parse_builtin(&builtin) })
    }

    /// (name, file) of every module to load for `roots`, dependencies first.
    pub fn resolve(&self, roots: &[&str]) -> Result<Vec<(String, PathBuf)>> {
        let order = load_order(roots, &self.builtin, |name| {
            let Some(file) = self.files.get(name) else { return Ok(None) };
            let out = Command::new("modinfo")
                .args(["-F", "depends"])
                .arg(file)
                .output()
                .context("running modinfo (package kmod)")?;
            if !out.status.success() {
                bail!("modinfo {} failed: {}", file.display(), String::from_utf8_lossy(&out.stderr).trim());
            }
            Ok(Some(parse_depends(&String::from_utf8_lossy(&out.stdout))))
        })?;
        Ok(order.into_iter().map(|n| (n.clone(), self.files[&n].clone())).collect())
    }
}

/// A module file's bytes, decompressed: busybox's insmod takes plain ELF.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if data.starts_with(b"\x7fELF") {
        return Ok(data);
    }
    match Compression::detect(&data) {
        Some(c) => bzimage::decompress(c, &data).with_context(|| format!("decompressing {}", path.display())),
        None => bail!("{} is neither ELF nor compressed in a known format", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_files_and_lists() {
        assert_eq!(module_name("9pnet_virtio.ko.xz").as_deref(), Some("9pnet_virtio"));
        assert_eq!(module_name("virtio-rng.ko").as_deref(), Some("virtio_rng"));
        assert_eq!(module_name("modules.builtin"), None);
        assert_eq!(parse_depends("virtio,9pnet,virtio_ring\n"), ["virtio", "9pnet", "virtio_ring"]);
        assert!(parse_depends("\n").is_empty());
        let b = parse_builtin("kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/virtio/virtio.ko\n");
        assert_eq!(b.into_iter().collect::<Vec<_>>(), ["virtio", "virtio_pci"]);
    }

    const NINE_P: [&str; 3] = ["virtio_pci", "9pnet_virtio", "9p"];

    #[test]
    fn the_guest_modules_start_with_the_9p_ones() {
        assert_eq!(GUEST_MODULES[..3], NINE_P);
    }

    fn graph(edges: &[(&str, &[&str])]) -> impl FnMut(&str) -> Result<Option<Vec<String>>> {
        let map: BTreeMap<String, Vec<String>> =
            edges.iter().map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect())).collect();
        move |name| Ok(map.get(name).cloned())
    }

    #[test]
    fn dependencies_load_first_and_once() {
        // Debian 6.1: everything is a module.
        let deps = graph(&[
            ("virtio_pci", &["virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"]),
            ("virtio", &["virtio_ring"]),
            ("virtio_ring", &[]),
            ("virtio_pci_modern_dev", &[]),
            ("virtio_pci_legacy_dev", &[]),
            ("9pnet_virtio", &["virtio", "9pnet", "virtio_ring"]),
            ("9pnet", &[]),
            ("9p", &["9pnet", "fscache", "netfs"]),
            ("fscache", &["netfs"]),
            ("netfs", &[]),
        ]);
        let order = load_order(&NINE_P, &BTreeSet::new(), deps).unwrap();
        assert_eq!(
            order,
            [
                "virtio_ring",
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio",
                "virtio_pci",
                "9pnet",
                "9pnet_virtio",
                "netfs",
                "fscache",
                "9p"
            ]
        );
    }

    #[test]
    fn builtin_modules_are_skipped() {
        // Debian 6.12: virtio is built in, 9p is not.
        let builtin = parse_builtin("kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/virtio/virtio.ko\n");
        let deps =
            graph(&[("9pnet_virtio", &["9pnet"]), ("9pnet", &["netfs"]), ("9p", &["netfs", "9pnet"]), ("netfs", &[])]);
        assert_eq!(load_order(&NINE_P, &builtin, deps).unwrap(), ["netfs", "9pnet", "9pnet_virtio", "9p"]);
    }

    #[test]
    fn missing_modules_and_cycles_are_errors() {
        let err = load_order(&["9p"], &BTreeSet::new(), graph(&[("9p", &["netfs"])])).unwrap_err();
        assert!(err.to_string().contains("netfs neither built in nor as a file"), "{err}");
        let err = load_order(&["a"], &BTreeSet::new(), graph(&[("a", &["b"]), ("b", &["a"])])).unwrap_err();
        assert!(err.to_string().contains("cycle: a -> b -> a"), "{err}");
    }
}
