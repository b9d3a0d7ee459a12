//! NVIDIA GPU statistics through NVML, next to the network metrics.
//!
//! - [`nvml`]: loading the library and reading GPUs (through `nvml-wrapper`,
//!   which dlopens `libnvidia-ml.so.1` at run time: the build needs no
//!   NVIDIA files, and a node without GPUs just reports `observer_nvml_up 0`).
//! - [`sampler`]: the sampling thread, failures and backoff, pod mapping.
//! - [`snapshot`]: what one cycle saw, in base units.
//! - [`metrics`]: the Prometheus families, built from the latest snapshot.
//! - [`podresources`]: which pod holds each GPU (the kubelet's PodResources
//!   API), on a thread of its own; its labels join the families at scrape time.
//!
//! A scrape never waits on NVML: the sampler publishes a whole snapshot at
//! the end of each cycle and `/metrics` reads the latest one.
//!
//! Layer: a source beside the pipeline; imports enrich (pods) and kernel (its
//! thread gives up its capabilities as it starts) only. Its flags
//! are parsed by the command line (cli/gpu_flags.rs) and handed in as a
//! [`GpuConfig`].
pub mod metrics;
pub mod nvml;
pub mod podresources;
pub mod sampler;
pub mod snapshot;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::{RecvTimeoutError, sync_channel},
    },
    time::Duration,
};

pub use metrics::GpuCollector;
use snapshot::Snapshot;

/// `--gpu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuMode {
    /// No NVML at all; only `observer_nvml_up 0` is exported.
    Off,
    /// GPU statistics when NVML works; otherwise `observer_nvml_up 0` and
    /// retries in the background (a driver may be installed later).
    Auto,
    /// Refuse to start (exit 2) unless NVML initialises and reports at least
    /// one GPU; later failures are retried as in auto.
    Required,
}

pub const DEFAULT_INTERVAL: &str = "5s";
/// NVML refreshes utilisation every 1/6 s to 1 s; sampling faster only burns CPU.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// How long `--gpu required` waits for the first initialisation (nvmlInit
/// takes seconds on large nodes without persistence mode).
pub const REQUIRED_START_TIMEOUT: Duration = Duration::from_secs(60);

/// What `--gpu`, `--gpu-interval` and `--nvml-lib` asked for.
#[derive(Debug, Clone)]
pub struct GpuConfig {
    pub mode: GpuMode,
    /// Time between two samples, within [`MIN_INTERVAL`]..=[`MAX_INTERVAL`].
    pub interval: Duration,
    /// The NVML library to load instead of searching the loader's path.
    pub nvml_lib: Option<PathBuf>,
}

/// The latest snapshot, shared between the sampler and scrapes. The lock is
/// held only to swap or clone an `Arc`, never during an NVML call.
pub struct Shared {
    latest: Mutex<Arc<Snapshot>>,
}

impl Shared {
    pub fn new(s: Snapshot) -> Self {
        Shared { latest: Mutex::new(Arc::new(s)) }
    }

    pub fn latest(&self) -> Arc<Snapshot> {
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn publish(&self, s: Snapshot) {
        let new = Arc::new(s);
        let old = std::mem::replace(&mut *self.latest.lock().unwrap_or_else(|p| p.into_inner()), new);
        // Freed outside the lock.
        drop(old);
    }
}

/// The running GPU side. Dropping it asks the sampler to stop; nothing waits
/// for it (it may be inside a blocked NVML call).
pub struct Gpu {
    shared: Arc<Shared>,
    interval: Duration,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::Thread>,
}

impl Gpu {
    /// Starts sampling per `args`. `Err` only for `--gpu required` when NVML
    /// cannot start (the message says why), or when no thread can be started.
    pub fn start(args: &GpuConfig, pod_log_dir: &Path) -> Result<Gpu, String> {
        let shared = Arc::new(Shared::new(Snapshot::default()));
        let stop = Arc::new(AtomicBool::new(false));
        if args.mode == GpuMode::Off {
            tracing::info!("GPU statistics off (--gpu off); observer_nvml_up is 0");
            return Ok(Gpu { shared, interval: args.interval, stop, thread: None });
        }
        let (first, first_rx) = match args.mode {
            GpuMode::Required => {
                let (tx, rx) = sync_channel(1);
                (Some(tx), Some(rx))
            }
            _ => (None, None),
        };
        let cfg = sampler::Config {
            lib: args.nvml_lib.clone(),
            interval: args.interval,
            pod_log_dir: pod_log_dir.to_path_buf(),
            first,
        };
        let handle = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::Builder::new()
                .name("nvml-sampler".into())
                .spawn(move || {
                    // NVML never needs a capability; its own threads inherit these sets.
                    crate::kernel::privileges::drop_in_this_thread();
                    sampler::run(cfg, shared, stop)
                })
                .map_err(|e| format!("cannot start the GPU sampling thread: {e}"))?
        };
        if let Some(rx) = first_rx {
            match rx.recv_timeout(REQUIRED_START_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(why)) => return Err(format!("--gpu required, but NVML cannot start: {why}")),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "--gpu required, but NVML did not finish initialising within {REQUIRED_START_TIMEOUT:?}"
                    ));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("--gpu required, but the GPU sampling thread ended before NVML started".into());
                }
            }
        }
        Ok(Gpu { shared, interval: args.interval, stop, thread: Some(handle.thread().clone()) })
    }

    /// The collector serving this GPU side's snapshots.
    pub fn collector(&self) -> prometheus::Result<GpuCollector> {
        GpuCollector::new(self.shared.clone(), self.interval)
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = &self.thread {
            t.unpark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_exports_nvml_down_and_starts_no_thread() {
        let args = GpuConfig { mode: GpuMode::Off, interval: Duration::from_secs(5), nvml_lib: None };
        let gpu = Gpu::start(&args, Path::new("/nonexistent")).unwrap();
        assert!(gpu.thread.is_none());
        assert_eq!(*gpu.shared.latest(), Snapshot::default());
    }

    #[test]
    fn required_without_a_library_fails_with_the_reason() {
        let args = GpuConfig {
            mode: GpuMode::Required,
            interval: Duration::from_secs(5),
            nvml_lib: Some("/nonexistent/libnvidia-ml.so.1".into()),
        };
        let e = Gpu::start(&args, Path::new("/nonexistent")).err().unwrap();
        assert!(e.starts_with("--gpu required, but NVML cannot start: cannot load the NVML library"), "{e}");
    }

    #[test]
    fn auto_without_a_library_starts_and_reports_nvml_down() {
        let args = GpuConfig {
            mode: GpuMode::Auto,
            interval: Duration::from_secs(5),
            nvml_lib: Some("/nonexistent/libnvidia-ml.so.1".into()),
        };
        let gpu = Gpu::start(&args, Path::new("/nonexistent")).unwrap();
        assert!(!gpu.shared.latest().nvml_up);
    }
}
