//! Small helpers shared by the commands.

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail, ensure};

/// The workspace root: xtask lives one level below it.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask has a parent directory").to_path_buf()
}

/// Cargo's target directory, honouring CARGO_TARGET_DIR as cargo itself does.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() { dir } else { env::current_dir().map(|cwd| cwd.join(&dir)).unwrap_or(dir) }
        }
        _ => root().join("target"),
    }
}

/// A cargo command in the workspace root.
///
/// Uses the cargo that runs xtask (CARGO), so nested builds use the same toolchain.
/// AYA_BUILD_SKIP is removed: a developer may export it for quick checks, but a
/// binary built with it has no eBPF programs and every later step would be meaningless.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root()).env_remove("AYA_BUILD_SKIP");
    cmd
}

/// The nightly toolchain the kernel crate (observer-ebpf) is verified with, as
/// rustup names it: `[workspace.metadata.toolchain] nightly` in the workspace
/// Cargo.toml, the one place it is pinned (scripts/setup.sh installs it,
/// observer's build script builds with it).
pub fn pinned_nightly() -> Result<String> {
    let manifest = root().join("Cargo.toml");
    let text = fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
    nightly_pin(&text).with_context(|| manifest.display().to_string())
}

fn nightly_pin(manifest: &str) -> Result<String> {
    let table: toml::Table = manifest.parse()?;
    let pin = table.get("workspace").and_then(|w| w.get("metadata")).and_then(|m| m.get("toolchain"));
    pin.and_then(|t| t.get("nightly"))
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no [workspace.metadata.toolchain] nightly pin"))
}

/// A cargo command of the pinned nightly (`pinned_nightly`) in the workspace root, for
/// the kernel crate: through `rustup run`, as aya-build builds it, since the cargo that
/// runs xtask is the stable one itself, not rustup's proxy that `+toolchain` needs.
/// RUSTC and RUSTC_WORKSPACE_WRAPPER are removed so that the nightly's own rustc runs.
pub fn nightly_cargo() -> Result<Command> {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", &pinned_nightly()?, "cargo"]).current_dir(root());
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "AYA_BUILD_SKIP"] {
        cmd.env_remove(key);
    }
    Ok(cmd)
}

/// Runs `cmd` with inherited stdio, failing with `what` in the message when it fails.
pub fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    eprintln!("+ {}", show(cmd));
    let status = cmd.status().with_context(|| format!("{what}: could not start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Builds and runs observer's example `name` (release build) with `args`; its stdout.
pub fn observer_example_output(name: &str, args: &[&str]) -> Result<String> {
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "--release", "-p", "observer", "--example", name, "--"]).args(args);
    eprintln!("+ {}", show(&cmd));
    let out = cmd.output().with_context(|| format!("running `{}`", show(&cmd)))?;
    ensure!(
        out.status.success(),
        "the {name} example failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A shell-like rendering of a command for logs.
pub fn show(cmd: &Command) -> String {
    let envs =
        cmd.get_envs().filter_map(|(k, v)| v.map(|v| format!("{}={}", k.to_string_lossy(), v.to_string_lossy())));
    let words = std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(quote);
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

fn quote(word: &OsStr) -> String {
    let s = word.to_string_lossy();
    let plain = !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain { s.into_owned() } else { format!("'{}'", s.replace('\'', r"'\''")) }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Looks `name` up in PATH, as a shell would.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path).map(|dir| dir.join(name)).find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// A visible step header, so a long CI log can be scanned by eye.
pub fn header(title: &str) {
    let rule = "=".repeat(72);
    eprintln!("\n{rule}\n== {title}\n{rule}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_holds_the_workspace_manifest_dir_of_xtask() {
        assert!(root().join("xtask").join("Cargo.toml").is_file());
    }

    #[test]
    fn show_quotes_only_what_needs_it() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--", "a b", "it's"]).env("X", "1");
        assert_eq!(show(&cmd), r"X=1 cargo test -- 'a b' 'it'\''s'");
    }

    #[test]
    fn reads_the_nightly_pin() {
        assert!(pinned_nightly().unwrap().starts_with("nightly-"));
        let manifest = "[workspace.metadata.toolchain]\nnightly = \"nightly-2026-05-20\"\n";
        assert_eq!(nightly_pin(manifest).unwrap(), "nightly-2026-05-20");
        assert!(nightly_pin("[workspace]\nmembers = []\n").is_err());
    }

    #[test]
    fn finds_sh_in_path() {
        assert!(find_in_path("sh").is_some());
        assert!(find_in_path("no-such-program-xtask").is_none());
    }
}
