//! NVIDIA GPU statistics through NVML, next to the network metrics.
//!
//! - [`nvml`]: loading the library and reading GPUs (through `nvml-wrapper`,
//!   which dlopens `libnvidia-ml.so.1` at run time: the build needs no
//!   NVIDIA files, and a node without GPUs just reports `observer_nvml_up 0`).
//! - [`sampler`]: the sampling thread, failures and backoff, pod mapping.
//! - [`snapshot`]: what one cycle saw, in base units.
//! - [`metrics`]: the Prometheus families, built from the latest snapshot.
//!
//! A scrape never waits on NVML: the sampler publishes a whole snapshot at
//! the end of each cycle and `/metrics` reads the latest one.
pub mod metrics;
pub mod nvml;
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

use clap::Args;

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

#[derive(Debug, Clone, Args)]
pub struct GpuArgs {
    /// GPU statistics through NVML: off, auto (when a library and driver are
    /// found; retried in the background) or required (exit 2 unless NVML
    /// starts and reports a GPU).
    #[arg(long = "gpu", value_enum, value_name = "MODE", default_value_t = GpuMode::Auto)]
    pub mode: GpuMode,
    /// Time between two GPU samples, e.g. 5s, 500ms, 1m.
    #[arg(long = "gpu-interval", value_name = "DURATION", default_value = DEFAULT_INTERVAL, value_parser = parse_interval)]
    pub interval: Duration,
    /// NVML library to load instead of libnvidia-ml.so.1 (then libnvidia-ml.so)
    /// from the loader's search path, e.g. the host driver's copy mounted into
    /// the container.
    #[arg(long = "nvml-lib", value_name = "PATH", value_parser = parse_lib)]
    pub nvml_lib: Option<PathBuf>,
}

/// `--gpu-interval`: the common duration syntax, within NVML's useful range.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = crate::cli::parse_duration(s)?;
    if d < MIN_INTERVAL {
        return Err(format!("`{s}` is shorter than {MIN_INTERVAL:?}: NVML refreshes its readings no faster"));
    }
    if d > MAX_INTERVAL {
        return Err(format!("`{s}` is longer than an hour"));
    }
    Ok(d)
}

fn parse_lib(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err(
            "the path is empty (give the driver's libnvidia-ml.so.1, e.g. /usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1)"
                .into(),
        );
    }
    // A bare name would be searched for by the loader, which is what leaving
    // the flag out already does; a path is what the flag is for.
    if !s.contains('/') {
        return Err(format!(
            "`{s}` is not a path; give one with a directory (e.g. ./{s}), or leave --nvml-lib out to search the loader's path"
        ));
    }
    Ok(PathBuf::from(s))
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
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::Thread>,
}

impl Gpu {
    /// Starts sampling per `args`. `Err` only for `--gpu required` when NVML
    /// cannot start (the message says why), or when no thread can be started.
    pub fn start(args: &GpuArgs, pod_log_dir: &Path) -> Result<Gpu, String> {
        let shared = Arc::new(Shared::new(Snapshot::default()));
        let stop = Arc::new(AtomicBool::new(false));
        if args.mode == GpuMode::Off {
            tracing::info!("GPU statistics off (--gpu off); observer_nvml_up is 0");
            return Ok(Gpu { shared, stop, thread: None });
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
                .spawn(move || sampler::run(cfg, shared, stop))
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
        Ok(Gpu { shared, stop, thread: Some(handle.thread().clone()) })
    }

    /// The collector serving this GPU side's snapshots.
    pub fn collector(&self) -> prometheus::Result<GpuCollector> {
        GpuCollector::new(self.shared.clone())
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
    fn intervals() {
        assert_eq!(parse_interval("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_interval("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_interval("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_interval("2m"), Ok(Duration::from_secs(120)));
        for (bad, needle) in [
            ("5", "no unit"),
            ("fast", "not a duration"),
            ("5h", "unknown unit `h`"),
            ("10ms", "shorter than 100ms"),
            ("-1s", "not a duration"),
            ("2000m", "longer than an hour"),
        ] {
            let e = parse_interval(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn flags_and_defaults() {
        use clap::Parser as _;

        use crate::cli::{Cli, Command};
        let run = |args: &[&str]| {
            let argv = ["observer", "run"].iter().chain(args).copied();
            Cli::try_parse_from(argv).map(|c| match c.command {
                Command::Run(r) => r,
                Command::Check(_) => unreachable!(),
            })
        };
        let r = run(&[]).unwrap();
        assert_eq!((r.gpu.mode, r.gpu.interval, r.gpu.nvml_lib), (GpuMode::Auto, Duration::from_secs(5), None));
        assert_eq!(r.pod_log_dir, Path::new(crate::pods::DEFAULT_POD_LOG_DIR));
        let r = run(&[
            "--gpu",
            "required",
            "--gpu-interval",
            "250ms",
            "--nvml-lib",
            "/x/libnvidia-ml.so.1",
            "--pod-log-dir",
            "/p",
        ])
        .unwrap();
        assert_eq!(r.gpu.mode, GpuMode::Required);
        assert_eq!(r.gpu.interval, Duration::from_millis(250));
        assert_eq!(r.gpu.nvml_lib.as_deref(), Some(Path::new("/x/libnvidia-ml.so.1")));
        assert_eq!(r.pod_log_dir, Path::new("/p"));
        for (args, needle) in [
            (&["--gpu", "maybe"][..], "possible values: off, auto, required"),
            (&["--gpu-interval", "5"][..], "has no unit"),
        ] {
            let e = run(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn lib_paths() {
        assert!(parse_lib("/usr/lib/libnvidia-ml.so.1").is_ok());
        assert!(parse_lib("").unwrap_err().contains("empty"));
        assert!(parse_lib("libnvidia-ml.so.1").unwrap_err().contains("not a path"));
    }

    #[test]
    fn off_exports_nvml_down_and_starts_no_thread() {
        let args = GpuArgs { mode: GpuMode::Off, interval: Duration::from_secs(5), nvml_lib: None };
        let gpu = Gpu::start(&args, Path::new("/nonexistent")).unwrap();
        assert!(gpu.thread.is_none());
        assert_eq!(*gpu.shared.latest(), Snapshot::default());
    }

    #[test]
    fn required_without_a_library_fails_with_the_reason() {
        let args = GpuArgs {
            mode: GpuMode::Required,
            interval: Duration::from_secs(5),
            nvml_lib: Some("/nonexistent/libnvidia-ml.so.1".into()),
        };
        let e = Gpu::start(&args, Path::new("/nonexistent")).err().unwrap();
        assert!(e.starts_with("--gpu required, but NVML cannot start: cannot load the NVML library"), "{e}");
    }

    #[test]
    fn auto_without_a_library_starts_and_reports_nvml_down() {
        let args = GpuArgs {
            mode: GpuMode::Auto,
            interval: Duration::from_secs(5),
            nvml_lib: Some("/nonexistent/libnvidia-ml.so.1".into()),
        };
        let gpu = Gpu::start(&args, Path::new("/nonexistent")).unwrap();
        assert!(!gpu.shared.latest().nvml_up);
    }
}
