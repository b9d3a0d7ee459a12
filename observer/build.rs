//! Builds the kernel programs (`observer-ebpf`) for the bpf target with the
//! nightly pinned in the workspace manifest (`[workspace.metadata.toolchain]`),
//! through aya-build; the loader embeds the object.
//!
//! `AYA_BUILD_SKIP=1` (check-only jobs: clippy, check, docs) writes an empty
//! stand-in object instead, so those jobs need neither nightly nor bpf-linker.
//! A binary built that way refuses to load (see `loader::KERNEL_OBJECT`).
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // observer_build_info{commit}: the checkout's commit, when built from git.
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=OBSERVER_COMMIT={commit}");
    // Rebuild when the commit changes: HEAD, and the branch file it points at.
    let git = std::path::Path::new("../.git");
    if let Ok(head) = fs::read_to_string(git.join("HEAD")) {
        println!("cargo:rerun-if-changed={}", git.join("HEAD").display());
        if let Some(branch) = head.trim().strip_prefix("ref: ") {
            println!("cargo:rerun-if-changed={}", git.join(branch).display());
        }
    }
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        let out = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR not set")?);
        // Both objects: the observer's and the benchmark's reference tracer's.
        for object in ["observer", "reference"] {
            fs::write(out.join(object), []).context("writing the stand-in eBPF objects")?;
        }
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let nightly = metadata.workspace_metadata["toolchain"]["nightly"]
        .as_str()
        .ok_or_else(|| anyhow!("Cargo.toml has no [workspace.metadata.toolchain] nightly pin"))?
        .to_owned();
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "observer-ebpf")
        .ok_or_else(|| anyhow!("observer-ebpf package not found in the workspace"))?;
    let root = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [Package { name: ebpf.name.as_str(), root_dir: root.as_str(), ..Default::default() }],
        Toolchain::Custom(&nightly),
    )
}
