//! The release build of the observer that `run`, `test` and `bench` use, and its cross
//! build for another architecture (`cargo xtask build --target aarch64`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::util;

/// Builds `observer` in release mode and returns the binary's path.
///
/// observer's build script compiles the eBPF crate with the nightly toolchain, so
/// scripts/setup.sh must have run first.
pub fn observer_release() -> Result<PathBuf> {
    util::run_checked(util::cargo().args(["build", "--release", "-p", "observer"]), "release build of observer")?;
    let bin = observer_bin();
    ensure!(bin.is_file(), "the release build succeeded but {} is missing", bin.display());
    Ok(bin)
}

pub fn observer_bin() -> PathBuf {
    util::target_dir().join("release").join("observer")
}

/// Builds observer's `reference_tracer` example (the benchmark's reference tracer) in
/// release mode and returns its path.
pub fn reference_tracer() -> Result<PathBuf> {
    util::run_checked(
        util::cargo().args(["build", "--release", "-p", "observer", "--example", "reference_tracer"]),
        "release build of the reference tracer",
    )?;
    let bin = util::target_dir().join("release").join("examples").join("reference_tracer");
    ensure!(bin.is_file(), "the release build succeeded but {} is missing", bin.display());
    Ok(bin)
}

/// An architecture the observer is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// x86_64 (Debian's and Docker's amd64).
    #[value(name = "x86_64", alias = "amd64")]
    X86_64,
    /// 64-bit Arm (Debian's and Docker's arm64): Grace, Graviton.
    #[value(name = "aarch64", alias = "arm64")]
    Aarch64,
}

impl Arch {
    /// The machine xtask runs on.
    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") { Self::Aarch64 } else { Self::X86_64 }
    }

    /// The image's other architecture.
    pub fn other(self) -> Self {
        match self {
            Self::X86_64 => Self::Aarch64,
            Self::Aarch64 => Self::X86_64,
        }
    }

    /// Rust's target triple.
    pub fn triple(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-unknown-linux-gnu",
            Self::Aarch64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// Debian's (and Docker's `TARGETARCH`) name.
    pub fn debian(self) -> &'static str {
        match self {
            Self::X86_64 => "amd64",
            Self::Aarch64 => "arm64",
        }
    }

    /// The GNU triple: the cross compiler's prefix, the multiarch library directory.
    pub fn gnu(self) -> &'static str {
        match self {
            Self::X86_64 => "x86_64-linux-gnu",
            Self::Aarch64 => "aarch64-linux-gnu",
        }
    }

    /// ELF's `e_machine` of this architecture's executables.
    fn elf_machine(self) -> u16 {
        match self {
            Self::X86_64 => 62,
            Self::Aarch64 => 183,
        }
    }

    /// The environment a cargo build for this target needs when it is not the host:
    /// cargo's linker and the cc crate's C compiler and archiver (ring; the tests' fake
    /// NVML), the cross toolchain scripts/setup.sh installs.
    pub fn cross_env(self) -> Vec<(String, String)> {
        if self == Self::host() {
            return Vec::new();
        }
        let (upper, lower) = (self.triple().to_uppercase().replace('-', "_"), self.triple().replace('-', "_"));
        vec![
            (format!("CARGO_TARGET_{upper}_LINKER"), format!("{}-gcc", self.gnu())),
            (format!("CC_{lower}"), format!("{}-gcc", self.gnu())),
            (format!("AR_{lower}"), format!("{}-ar", self.gnu())),
        ]
    }
}

/// The release observer for `arch`, cross-compiled unless it is the host's, through
/// scripts/build-observer.sh: the very commands deploy/Dockerfile's build stage runs for
/// the image of that architecture. Returns the binary's path, checked to be an
/// executable of that architecture (what `file` says).
pub fn observer_for(arch: Arch) -> Result<PathBuf> {
    if arch == Arch::host() {
        return observer_release();
    }
    let script = util::root().join("scripts/build-observer.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(arch.debian()).current_dir(util::root()).env_remove("AYA_BUILD_SKIP");
    util::run_checked(&mut cmd, &format!("{} build of observer ({})", arch.debian(), script.display()))?;
    let bin = util::target_dir().join(arch.triple()).join("release").join("observer");
    check_elf(&bin, arch)?;
    Ok(bin)
}

/// Fails unless `path` is a 64-bit little-endian ELF executable for `arch`.
pub fn check_elf(path: &Path, arch: Arch) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let machine = elf_machine(&bytes).with_context(|| format!("{} is not a 64-bit ELF file", path.display()))?;
    ensure!(
        machine == arch.elf_machine(),
        "{} is an ELF file for machine {machine}, not {:?} ({})",
        path.display(),
        arch,
        arch.elf_machine()
    );
    Ok(())
}

/// `e_machine` of a 64-bit little-endian ELF file.
fn elf_machine(elf: &[u8]) -> Option<u16> {
    (elf.len() >= 64 && elf.starts_with(b"\x7fELF") && elf[4] == 2 && elf[5] == 1)
        .then(|| u16::from_le_bytes([elf[18], elf[19]]))
}

/// `cargo xtask build [--target ARCH]`: the release observer, for another architecture
/// with its kernel programs built for it.
pub fn run(arch: Arch) -> Result<()> {
    let started = std::time::Instant::now();
    let bin = observer_for(arch)?;
    println!(
        "xtask build: {} observer ({}) in {:.0} s: {}",
        arch.debian(),
        arch.triple(),
        started.elapsed().as_secs_f64(),
        bin.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_machine_of_this_executable_is_the_hosts() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_machine(&me), Some(Arch::host().elf_machine()));
        assert_eq!(elf_machine(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn cross_environment_names_the_gnu_toolchain() {
        let other = Arch::host().other();
        assert!(Arch::host().cross_env().is_empty());
        let env = other.cross_env();
        let upper = other.triple().to_uppercase().replace('-', "_");
        assert!(env.contains(&(format!("CARGO_TARGET_{upper}_LINKER"), format!("{}-gcc", other.gnu()))), "{env:?}");
        assert_eq!(Arch::Aarch64.triple(), "aarch64-unknown-linux-gnu");
        assert_eq!(Arch::Aarch64.debian(), "arm64");
    }
}
