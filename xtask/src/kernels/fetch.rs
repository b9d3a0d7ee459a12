//! Debian kernels from the package registry: the meta package names the
//! current versioned image package (versioned names disappear after updates,
//! so they are never written down here); its `-unsigned` twin is downloaded
//! with `apt-get download` and unpacked with `dpkg -x` into the cache, which a
//! later run reuses as long as the meta package resolves to the same version.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use super::bzimage;
use crate::util;

/// The image package a meta package currently stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// `linux-image-6.1.0-56-amd64-unsigned`.
    pub package: String,
    /// `6.1.192-2`.
    pub version: String,
}

impl Resolved {
    /// What the cache remembers it holds.
    pub fn stamp(&self) -> String {
        format!("{} {}\n", self.package, self.version)
    }
}

/// The value of `field` in the first paragraph of a Debian control text.
pub fn control_field(text: &str, field: &str) -> Option<String> {
    let mut value: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            break; // end of the first paragraph
        }
        if let Some(v) = value.as_mut() {
            if line.starts_with([' ', '\t']) {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            break;
        }
        if let Some((name, v)) = line.split_once(':')
            && name == field
        {
            value = Some(v.trim().to_owned());
        }
    }
    value
}

/// The `linux-image-*` package in a `Depends` value.
pub fn image_dependency(depends: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|name| name.starts_with("linux-image-"))
        .map(str::to_owned)
}

fn apt_show(package: &str) -> Result<String> {
    let out =
        Command::new("apt-cache").args(["show", "--no-all-versions", package]).output().context("running apt-cache")?;
    if !out.status.success() {
        bail!("apt-cache show {package}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Resolves `meta` (e.g. `linux-image-amd64`) to its `-unsigned` image
/// package through apt's package lists.
pub fn resolve(meta: &str) -> Result<Resolved> {
    let depends = control_field(&apt_show(meta)?, "Depends").with_context(|| format!("{meta} has no Depends"))?;
    let image =
        image_dependency(&depends).with_context(|| format!("{meta} depends on no linux-image package: {depends}"))?;
    let package = format!("{image}-unsigned");
    let version =
        control_field(&apt_show(&package)?, "Version").with_context(|| format!("{package} has no Version"))?;
    Ok(Resolved { package, version })
}

/// An unpacked kernel package in the cache.
pub struct Unpacked {
    pub vmlinux: PathBuf,
    /// `lib/modules/<release>`.
    pub modules: PathBuf,
    /// The kernel's own release string (`uname -r`).
    pub release: String,
}

const STAMP: &str = "package";

/// The kernel of `r` in `dir`, downloaded and unpacked unless the cache
/// already holds that exact version.
pub fn fetch(r: &Resolved, dir: &Path) -> Result<Unpacked> {
    let root = dir.join("root");
    let vmlinux = dir.join("vmlinux");
    let cached = std::fs::read_to_string(dir.join(STAMP)).is_ok_and(|s| s == r.stamp());
    if cached {
        eprintln!("xtask kernels: {} {} cached in {}", r.package, r.version, dir.display());
    } else {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        let dl = dir.join("download");
        std::fs::create_dir_all(&dl)?;
        let mut get = Command::new("apt-get");
        // The sandbox user (_apt) cannot write into a root-owned target dir.
        get.args(["download", "-q", "-o", "APT::Sandbox::User=root"])
            .arg(format!("{}={}", r.package, r.version))
            .current_dir(&dl);
        util::run_checked(&mut get, "downloading the kernel package")?;
        let deb = std::fs::read_dir(&dl)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        util::run_checked(Command::new("dpkg").arg("-x").arg(&deb).arg(&root), "unpacking the kernel package")?;
        std::fs::remove_dir_all(&dl)?;
        let vmlinuz = single_entry(&root.join("boot"), "vmlinuz-")?;
        bzimage::extract_vmlinux(&vmlinuz, &vmlinux)?;
        // Written last: an interrupted fetch is redone.
        std::fs::write(dir.join(STAMP), r.stamp())?;
    }
    let modules = single_entry(&root.join("lib/modules"), "")?;
    let release = modules.file_name().unwrap().to_string_lossy().into_owned();
    ensure!(vmlinux.is_file(), "{} is missing", vmlinux.display());
    Ok(Unpacked { vmlinux, modules, release })
}

/// The one entry of `dir` whose name starts with `prefix`.
fn single_entry(dir: &Path, prefix: &str) -> Result<PathBuf> {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        _ => bail!("expected one {prefix}* in {}, found {found:?}", dir.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = "Package: linux-image-amd64
Source: linux-signed-amd64 (6.1.192+2)
Version: 6.1.192-2
Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)
Description: Linux for 64-bit PCs (meta-package)
 This package depends on the latest Linux kernel.

Package: linux-image-amd64
Version: 6.1.176-1
Depends: linux-image-6.1.0-48-amd64 (= 6.1.176-1)
";

    #[test]
    fn meta_package_names_the_image_of_its_candidate() {
        let depends = control_field(META, "Depends").unwrap();
        assert_eq!(image_dependency(&depends).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        assert_eq!(control_field(META, "Version").as_deref(), Some("6.1.192-2"));
        assert_eq!(
            control_field(META, "Description").as_deref(),
            Some("Linux for 64-bit PCs (meta-package) This package depends on the latest Linux kernel.")
        );
        assert_eq!(control_field(META, "Conflicts"), None);
    }

    #[test]
    fn image_among_other_dependencies() {
        assert_eq!(
            image_dependency(
                "kmod, linux-base (>= 4.3~), linux-image-6.12.117+deb12-amd64 (= 6.12.117-1~deb12u1) | foo"
            )
            .as_deref(),
            Some("linux-image-6.12.117+deb12-amd64")
        );
        assert_eq!(image_dependency("kmod, initramfs-tools"), None);
    }

    #[test]
    fn stamp_names_package_and_version() {
        let r = Resolved { package: "linux-image-6.1.0-56-amd64-unsigned".into(), version: "6.1.192-2".into() };
        assert_eq!(r.stamp(), "linux-image-6.1.0-56-amd64-unsigned 6.1.192-2\n");
    }
}
