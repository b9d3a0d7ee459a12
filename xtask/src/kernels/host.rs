//! The host tools the kernel matrix needs, installed through apt when missing,
//! so a fresh machine needs nothing beyond `cargo xtask kernels` (or
//! `cargo xtask test`). Fast when everything is there: a few file checks.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::build::Arch;
use crate::util;

/// (command, Debian package). busybox is checked separately: it must be the
/// static build.
const TOOLS: [(&str, &str); 5] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("modinfo", "kmod"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("unshare", "util-linux"),
];
const BUSYBOX_STATIC: &str = "busybox-static";
const BACKPORTS_SOURCES: &str = "/etc/apt/sources.list.d/observer-backports.sources";

/// `VERSION_CODENAME` from /etc/os-release.
pub fn codename(os_release: &str) -> Option<String> {
    os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}

/// Whether an apt sources file (one-line or deb822 format) enables `suite`.
pub fn sources_enable(text: &str, suite: &str) -> bool {
    text.lines().map(str::trim).filter(|l| !l.starts_with('#')).any(|l| {
        if let Some(suites) = l.strip_prefix("Suites:") {
            suites.split_whitespace().any(|s| s == suite)
        } else {
            (l.starts_with("deb ") || l.starts_with("deb [")) && l.split_whitespace().any(|w| w == suite)
        }
    })
}

/// qemu-system-x86 (and -arm) must match the installed qemu-utils' version; an
/// image whose qemu-utils comes from backports (as this project's does) blocks
/// the release's own qemu-system-x86.
pub fn needs_backports(qemu_utils_version: Option<&str>) -> bool {
    qemu_utils_version.is_some_and(|v| v.contains("~bpo"))
}

fn installed_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query").args(["-W", "-f=${Status}\t${Version}", package]).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, version) = text.split_once('\t')?;
    status.ends_with("install ok installed").then(|| version.to_owned())
}

fn backports_enabled(suite: &str) -> bool {
    let mut files = vec![Path::new("/etc/apt/sources.list").to_path_buf()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(
            dir.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources")),
        );
    }
    files.iter().any(|f| std::fs::read_to_string(f).is_ok_and(|t| sources_enable(&t, suite)))
}

/// qemu for guests of another architecture than x86_64.
const QEMU_ARM64: (&str, &str) = ("qemu-system-aarch64", "qemu-system-arm");

/// Installs what is missing for guests of `arch`.
pub fn ensure_tools(arch: Arch) -> Result<()> {
    let extra = (arch == Arch::Aarch64).then_some(QEMU_ARM64);
    let mut missing: Vec<&str> =
        TOOLS.iter().chain(&extra).filter(|(cmd, _)| util::find_in_path(cmd).is_none()).map(|(_, pkg)| *pkg).collect();
    if installed_version(BUSYBOX_STATIC).is_none() {
        missing.push(BUSYBOX_STATIC);
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask kernels: installing {}", missing.join(" "));
    let mut target_release = None;
    let is_qemu = |p: &&str| p.starts_with("qemu-system-");
    if missing.iter().any(is_qemu) && needs_backports(installed_version("qemu-utils").as_deref()) {
        let os = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
        let suite = format!("{}-backports", codename(&os).context("no VERSION_CODENAME in /etc/os-release")?);
        if !backports_enabled(&suite) {
            eprintln!("xtask kernels: adding {suite} to apt's sources ({BACKPORTS_SOURCES})");
            std::fs::write(
                BACKPORTS_SOURCES,
                format!(
                    "# Added by `cargo xtask kernels`: qemu-system-x86 must match the\n\
                     # backports qemu-utils this machine has.\n\
                     Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {suite}\nComponents: main\n\
                     Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
                ),
            )
            .with_context(|| format!("writing {BACKPORTS_SOURCES} (needs root)"))?;
        }
        target_release = Some(suite);
    }
    util::run_checked(Command::new("apt-get").args(["update", "-qq"]), "apt-get update")?;
    let install = |packages: &[&str], release: Option<&str>| {
        if packages.is_empty() {
            return Ok(());
        }
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(["install", "-y", "-qq", "--no-install-recommends"]);
        if let Some(r) = release {
            cmd.args(["-t", r]);
        }
        util::run_checked(cmd.args(packages), "installing the kernel matrix's tools")
    };
    let (qemu, rest): (Vec<&str>, Vec<&str>) = missing.iter().partition(|p| is_qemu(p));
    install(&rest, None)?;
    install(&qemu, target_release.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codename_from_os_release() {
        assert_eq!(codename("NAME=\"Debian\"\nVERSION_CODENAME=bookworm\n").as_deref(), Some("bookworm"));
        assert_eq!(codename("VERSION_CODENAME=\"trixie\"").as_deref(), Some("trixie"));
        assert_eq!(codename("ID=debian\n"), None);
    }

    #[test]
    fn sources_in_both_formats() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n";
        assert!(sources_enable(deb822, "bookworm-updates"));
        assert!(!sources_enable(deb822, "bookworm-backports"));
        assert!(sources_enable("deb http://deb.debian.org/debian bookworm-backports main\n", "bookworm-backports"));
        assert!(sources_enable("deb [arch=amd64] http://x/debian bookworm-backports main", "bookworm-backports"));
        assert!(!sources_enable("# deb http://x/debian bookworm-backports main\n", "bookworm-backports"));
        assert!(!sources_enable("# Suites: bookworm-backports\n", "bookworm-backports"));
    }

    #[test]
    fn backports_only_when_qemu_utils_is_from_backports() {
        assert!(needs_backports(Some("1:10.0.2+ds-2+deb13u1~bpo12+1")));
        assert!(!needs_backports(Some("1:7.2+dfsg-7+deb12u18+b3")));
        assert!(!needs_backports(None));
    }
}
