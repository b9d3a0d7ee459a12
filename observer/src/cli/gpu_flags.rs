//! The GPU flags (`--gpu`, `--gpu-interval`, `--nvml-lib`), checked here and
//! handed to [`crate::gpu`] as a [`GpuConfig`].
use std::{path::PathBuf, time::Duration};

use clap::Args;

use super::parse_duration;
use crate::gpu::{DEFAULT_INTERVAL, GpuConfig, GpuMode, MAX_INTERVAL, MIN_INTERVAL};

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
    /// The kubelet's PodResources API socket, which says which pod,
    /// namespace and container each GPU is allocated to (labels on the GPU
    /// series); refreshed every --gpu-interval. Missing: a warning, and
    /// observer_gpu_pod_resources_up 0.
    #[arg(long = "pod-resources-socket", value_name = "PATH", default_value = crate::gpu::podresources::DEFAULT_SOCKET)]
    pub pod_resources_socket: PathBuf,
}

/// `--gpu-interval`: the common duration syntax, within NVML's useful range.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
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
        // Debian's and Ubuntu's multiarch directory of this build's architecture
        // (/usr/lib/aarch64-linux-gnu on arm64 nodes: Grace, Graviton).
        return Err(format!(
            "the path is empty (give the driver's libnvidia-ml.so.1, e.g. /usr/lib/{}-linux-gnu/libnvidia-ml.so.1)",
            std::env::consts::ARCH
        ));
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

impl GpuArgs {
    pub fn config(&self) -> GpuConfig {
        GpuConfig { mode: self.mode, interval: self.interval, nvml_lib: self.nvml_lib.clone() }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
            ("5x", "not a duration"),
            ("5h", "longer than an hour"),
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
                _ => unreachable!(),
            })
        };
        let r = run(&[]).unwrap();
        assert_eq!((r.gpu.mode, r.gpu.interval, r.gpu.nvml_lib), (GpuMode::Auto, Duration::from_secs(5), None));
        assert_eq!(r.pod_log_dir, Path::new(crate::enrich::pods::DEFAULT_POD_LOG_DIR));
        assert_eq!(r.gpu.pod_resources_socket, Path::new("/var/lib/kubelet/pod-resources/kubelet.sock"));
        let r = run(&["--pod-resources-socket", "/k/kubelet.sock"]).unwrap();
        assert_eq!(r.gpu.pod_resources_socket, Path::new("/k/kubelet.sock"));
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
}
