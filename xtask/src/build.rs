//! The release build of the observer that `run`, `test` and `bench` use.

use std::path::PathBuf;

use anyhow::{Result, ensure};

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
