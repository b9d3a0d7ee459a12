//! Diagnostics the kernel programs log (observer-ebpf's `diag`): rare events,
//! each the first time it happens (a kernel table full, a session whose close
//! no hook saw, a connection adopted mid-life, a TCP call in a state no
//! session is in), as debug records of target `observer_ebpf` in the
//! observer's own log, with their fields (table, ports, state, ...).
//!
//! A load-time switch: the programs write them only when the loader set their
//! `LOG_DIAGNOSTICS` global, which it does when the log filter shows those
//! records (`--log-level debug` or `trace`, or a directive such as
//! `info,observer_ebpf=debug`). Off, the global is a constant the verifier
//! prunes the logging branches on, and aya-log's ring shrinks to one page.
use aya::Ebpf;
use aya_log::EbpfLogger;
use tokio::{io::Interest, io::unix::AsyncFd, task::JoinHandle};

/// The target of the programs' records (observer-ebpf's `diag::TARGET`).
pub const TARGET: &str = "observer_ebpf";

/// Whether the installed log filter shows the programs' records: the switch
/// the loader passes to them. Asked after the logger is installed.
pub fn wanted() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::DEBUG)
}

/// Copies the programs' records into the log (through the `log` crate, which
/// the log subscriber bridges) on a task of its own. A failure is a warning:
/// the observer runs on without them.
pub fn start(ebpf: &mut Ebpf) -> Option<JoinHandle<()>> {
    let logger = EbpfLogger::init(ebpf).map_err(|e| e.to_string()).and_then(|logger| {
        // SAFETY: the logger owns its ring map's descriptor for as long as it
        // lives, and `as_raw_fd` always returns that one.
        unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }.map_err(|e| e.to_string())
    });
    let mut logger = match logger {
        Ok(logger) => logger,
        Err(error) => {
            tracing::warn!(%error, "kernel diagnostics: cannot read the programs' log; running without it");
            return None;
        }
    };
    tracing::debug!("kernel diagnostics on: the programs log rare events (target {TARGET})");
    Some(tokio::spawn(async move {
        loop {
            match logger.readable_mut().await {
                Ok(mut ready) => {
                    ready.get_inner_mut().flush();
                    ready.clear_ready();
                }
                Err(error) => {
                    tracing::warn!(%error, "kernel diagnostics: reading the programs' log failed; stopped");
                    return;
                }
            }
        }
    }))
}
