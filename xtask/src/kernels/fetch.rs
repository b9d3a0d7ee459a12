//! Debian kernels from the package registry: the meta package names the
//! current versioned image package (versioned names disappear after updates,
//! so they are never written down here); its `-unsigned` twin is downloaded
//! with `apt-get download` and unpacked with `dpkg -x` into the cache, which a
//! later run reuses as long as the meta package resolves to the same version.
//!
//! A kernel of the host's own Debian release resolves through the host's apt
//! lists; one of another release (Debian 11's 5.10) through package lists of
//! its own (`Apt::private`), so the host's apt sources stay as they are and
//! its packages never come from that release.

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

/// The package lists apt resolves and downloads from: the host's, or a
/// private set for one Debian release (`-o` options for every apt command).
pub struct Apt {
    options: Vec<String>,
}

impl Apt {
    /// The host's own sources and lists.
    pub fn host() -> Self {
        Self { options: Vec::new() }
    }

    /// Lists of `sources` (a sources.list text) only, kept in `dir`: its own
    /// sources file, lists and cache; the host's dpkg status is only read.
    /// `arch`: packages of that Debian architecture (`arm64`) instead of the host's.
    pub fn private(dir: &Path, sources: &str, arch: Option<&str>) -> Result<Self> {
        let lists = dir.join("lists");
        std::fs::create_dir_all(lists.join("partial"))?;
        let list = dir.join("sources.list");
        if std::fs::read_to_string(&list).ok().as_deref() != Some(sources) {
            std::fs::write(&list, sources)?;
            // Other sources: the lists held are stale.
            std::fs::remove_dir_all(&lists)?;
            std::fs::create_dir_all(lists.join("partial"))?;
        }
        let mut options = private_options(dir);
        if let Some(arch) = arch {
            options.push(format!("APT::Architecture={arch}"));
            options.push(format!("APT::Architectures={arch}"));
        }
        let apt = Self { options };
        let has_lists = std::fs::read_dir(&lists)?.filter_map(|e| e.ok()).any(|e| e.path().is_file());
        if !has_lists {
            apt.update()?;
        }
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for o in &self.options {
            cmd.args(["-o", o]);
        }
        cmd
    }

    /// `apt-get update` of these lists.
    pub fn update(&self) -> Result<()> {
        util::run_checked(self.command("apt-get").args(["update", "-qq"]), "apt-get update")
    }

    fn show(&self, package: &str) -> Result<String> {
        let out = self
            .command("apt-cache")
            .args(["show", "--no-all-versions", package])
            .output()
            .context("running apt-cache")?;
        if !out.status.success() {
            bail!("apt-cache show {package}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Apt {
    /// Downloads `packages` with every package they depend on, as if none were
    /// installed (an empty dpkg status of its own), into `dest`: the closure of a
    /// root filesystem of these lists' architecture. Returns the `.deb` files.
    pub fn download_closure(&self, packages: &[&str], dest: &Path) -> Result<Vec<PathBuf>> {
        let state = dest.join("state");
        std::fs::create_dir_all(dest.join("partial"))?;
        std::fs::create_dir_all(&state)?;
        std::fs::write(state.join("status"), "")?;
        let mut get = self.command("apt-get");
        get.args(["-o", &format!("Dir::State::status={}/status", state.display())])
            .args(["-o", &format!("Dir::Cache::archives={}", dest.display())])
            // Nothing is installed: the host's dpkg lock is not needed, nor its sandbox user.
            .args(["-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root", "-o", "APT::Install-Recommends=0"])
            .args(["install", "--download-only", "-y", "-qq"])
            .args(packages);
        util::run_checked(&mut get, "downloading the guest root's packages")?;
        let mut debs: Vec<PathBuf> = std::fs::read_dir(dest)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        debs.sort();
        ensure!(!debs.is_empty(), "apt-get left no .deb in {}", dest.display());
        Ok(debs)
    }
}

/// apt's `-o` options for lists of their own under `dir`.
fn private_options(dir: &Path) -> Vec<String> {
    let d = dir.display();
    vec![
        format!("Dir::Etc::SourceList={d}/sources.list"),
        // No drop-in sources (the host's), no preferences pinning the host's release.
        "Dir::Etc::SourceParts=/nonexistent".to_owned(),
        "Dir::Etc::Preferences=/nonexistent".to_owned(),
        "Dir::Etc::PreferencesParts=/nonexistent".to_owned(),
        format!("Dir::State::Lists={d}/lists"),
        format!("Dir::Cache={d}/cache"),
        "APT::Get::List-Cleanup=0".to_owned(),
    ]
}

/// Resolves `meta` (e.g. `linux-image-amd64`) to its `-unsigned` image
/// package through `apt`'s package lists.
pub fn resolve(apt: &Apt, meta: &str) -> Result<Resolved> {
    let depends = control_field(&apt.show(meta)?, "Depends").with_context(|| format!("{meta} has no Depends"))?;
    let image =
        image_dependency(&depends).with_context(|| format!("{meta} depends on no linux-image package: {depends}"))?;
    let package = format!("{image}-unsigned");
    let version =
        control_field(&apt.show(&package)?, "Version").with_context(|| format!("{package} has no Version"))?;
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
/// already holds that exact version. `bzimage`: the image is an x86 bzImage,
/// whose kernel is extracted for qemu; otherwise (arm64's gzip-compressed
/// `Image`, which qemu-system-aarch64 boots as it is) it is copied.
pub fn fetch(apt: &Apt, r: &Resolved, dir: &Path, bzimage: bool) -> Result<Unpacked> {
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
        let mut get = apt.command("apt-get");
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
        if bzimage {
            bzimage::extract_vmlinux(&vmlinuz, &vmlinux)?;
        } else {
            std::fs::copy(&vmlinuz, &vmlinux).with_context(|| format!("copying {}", vmlinuz.display()))?;
        }
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
    fn private_lists_leave_the_hosts_sources_out() {
        let o = private_options(Path::new("/t/kernels/apt-5.10"));
        assert!(o.contains(&"Dir::Etc::SourceList=/t/kernels/apt-5.10/sources.list".to_owned()), "{o:?}");
        assert!(o.contains(&"Dir::Etc::SourceParts=/nonexistent".to_owned()), "{o:?}");
        assert!(o.contains(&"Dir::State::Lists=/t/kernels/apt-5.10/lists".to_owned()), "{o:?}");
        assert!(Apt::host().options.is_empty());
    }

    #[test]
    fn stamp_names_package_and_version() {
        let r = Resolved { package: "linux-image-6.1.0-56-amd64-unsigned".into(), version: "6.1.192-2".into() };
        assert_eq!(r.stamp(), "linux-image-6.1.0-56-amd64-unsigned 6.1.192-2\n");
    }
}
