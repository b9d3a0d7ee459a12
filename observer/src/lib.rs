//! observer: per-session network goodput measured from the kernel with eBPF,
//! served as Prometheus metrics. See README.md for the design and metrics.
pub mod btf;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod detect;
pub mod drops;
pub mod enrich;
pub mod error;
pub mod gpu;
pub mod iface_stats;
pub mod interfaces;
pub mod labels;
pub mod live;
pub mod loader;
pub mod metrics;
pub mod pipeline;
pub mod pods;
pub mod privileges;
pub mod probes;
pub mod run;
pub mod server;
pub mod session;
pub mod session_log;
pub mod telemetry;
