//! `cargo xtask setup`: the idempotent machine set-up lives in scripts/setup.sh so that
//! it also works before any Rust code can be built; this only runs it.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util;

pub fn run() -> Result<()> {
    let root = util::root();
    let script = root.join("scripts/setup.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script).current_dir(&root);
    eprintln!("+ {}", util::show(&cmd));
    let status = cmd.status().with_context(|| format!("could not start bash to run {}", script.display()))?;
    if !status.success() {
        bail!(
            "machine set-up failed: {} exited with {status}; its messages above say which step \
             (Debian packages need root, bpf-linker needs crates.io)",
            script.display()
        );
    }
    Ok(())
}
