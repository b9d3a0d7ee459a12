//! `cargo xtask run`: build and start the observer in the foreground.

use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Result, bail};

use crate::{build, setup, util};

pub fn run(args: Vec<String>) -> Result<()> {
    // Decided before the build, so that a user who cannot run it finds out at once.
    let sudo = if util::is_root() {
        None
    } else if let Some(sudo) = util::find_in_path("sudo") {
        Some(sudo)
    } else {
        bail!(
            "the observer loads eBPF programs: run this as root, or give target/release/observer \
             the capabilities CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (setcap) and start it \
             directly; sudo is not installed"
        );
    };

    setup::run()?;
    // Built as the invoking user, before any sudo, so target/ stays theirs.
    let bin = build::observer_release()?;
    let args = if args.is_empty() { vec!["--iface".to_owned(), "lo".to_owned()] } else { args };

    let mut cmd = match sudo {
        None => Command::new(&bin),
        Some(sudo) => {
            eprintln!("xtask: not root; starting the observer through sudo -E");
            let mut cmd = Command::new(sudo);
            cmd.arg("-E").arg(&bin);
            cmd
        }
    };
    cmd.arg("run").args(&args);
    eprintln!("+ {}", util::show(&cmd));
    // exec replaces this process, so Ctrl-C and SIGTERM reach the observer (or sudo,
    // which relays them) directly and its exit status becomes ours.
    let err = cmd.exec();
    Err(anyhow::Error::new(err).context(format!("could not exec {}", util::show(&cmd))))
}
