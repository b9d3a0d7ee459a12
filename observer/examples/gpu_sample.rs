//! The observer's GPU side alone: NVML through the same sampler thread and
//! metric families that `observer run` serves, without the kernel programs.
//! For checking a node's NVIDIA driver where eBPF cannot run (a container
//! without `CAP_BPF`, a sandboxed kernel), and how this project checks the
//! NVML path on a real GPU.
//!
//! Usage: `gpu_sample [--gpu auto|required] [--gpu-interval D] [--nvml-lib PATH]
//! [--samples N]`: starts the sampler, then prints the GPU families in
//! Prometheus text once per interval, `--samples` times (default 3). With
//! `--gpu required` it exits 2 when NVML cannot start, as `observer run` does.
use std::{path::Path, process::ExitCode, time::Duration};

use clap::Parser;
use observer::{cli::gpu_flags::GpuArgs, enrich::pods::DEFAULT_POD_LOG_DIR, gpu::Gpu};
use prometheus::{Encoder, Registry, TextEncoder};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    gpu: GpuArgs,
    /// How many times to print the GPU families, one interval apart.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    samples: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Pods are named from the kubelet's log directory, where `observer run`
    // looks by default; a host without one maps no process to a pod.
    let gpu = match Gpu::start(&cli.gpu.config(), Path::new(DEFAULT_POD_LOG_DIR)) {
        Ok(gpu) => gpu,
        Err(why) => {
            eprintln!("gpu_sample: {why}");
            return ExitCode::from(2);
        }
    };
    let registry = Registry::new();
    let collector = match gpu.collector() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gpu_sample: cannot build the GPU metric families: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = registry.register(Box::new(collector)) {
        eprintln!("gpu_sample: cannot register the GPU metric families: {e}");
        return ExitCode::FAILURE;
    }
    let interval = cli.gpu.interval;
    for n in 1..=cli.samples {
        // The sampler publishes at the end of each cycle: wait one interval
        // (and a little) so each print shows a newer cycle than the last.
        std::thread::sleep(interval + Duration::from_millis(100));
        let mut text = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut text) {
            eprintln!("gpu_sample: cannot encode the GPU metric families: {e}");
            return ExitCode::FAILURE;
        }
        println!("# sample {n} of {}", cli.samples);
        print!("{}", String::from_utf8_lossy(&text));
    }
    ExitCode::SUCCESS
}
