//! Support for the end-to-end tests (see `tests/tests/`).
//!
//! The observer's kernel programs see every network namespace, so each test
//! builds a private world: a fresh [`NetNs`] holding the observer
//! ([`ObserverProcess`], started with `--iface lo`), the traffic
//! ([`TcpServer`], [`transfer`], [`Haproxy`]) and the scraper ([`Scraper`],
//! ONE keep-alive connection, because every extra connection would itself be
//! an observed session). Everything is bounded in time and cleaned up on
//! drop, also when a test panics (logs are printed then).
//!
//! The tests need root (namespaces, BPF).
//!
//! Environment: `OBSERVER_BIN` names the binary under test (default
//! `target/release/observer`); `OBSERVER_TEST_PROBES=auto|fentry|kprobe|tracepoint`
//! appends `--probes <tier>` to every `observer run` an [`ObserverProcess`]
//! starts (unless the test passes `--probes` itself), which is how
//! `cargo xtask kernels` runs the same tests once per hook tier in qemu;
//! `OBSERVER_TEST_TIME_SCALE=N` stretches the tests' timing bounds N times
//! ([`scaled`]), which those software-emulated VMs need.

pub mod bpf;
pub mod cgroup;
pub mod fake_nvml;
pub mod haproxy;
pub mod http_client;
pub mod netns;
pub mod observer;
pub mod procfs;
pub mod prom;
pub mod prometheus_server;
pub mod refprog;
pub mod scrape;
pub mod session_log;
pub mod traffic;
pub mod util;
pub mod web;

#[cfg(test)]
mod selftest;

pub use bpf::{
    KernelLink, KernelMap, KernelProgram, kernel_links, kernel_links_named, kernel_programs, kernel_programs_named,
    pin_hash_map, program_of_fd, programs_of_process, wait_no_kernel_objects,
};
pub use cgroup::{TestCgroup, cgroup2_root};
pub use fake_nvml::FakeNvml;
pub use haproxy::{Haproxy, HaproxySession};
pub use http_client::{ProcStatus, connect_from, proc_status, timed_get, v4};
pub use netns::NetNs;
pub use observer::{
    ObserverProcess, Stopped, concern_hooked, forced_probes, observer_bin, run_observer_cli, run_observer_cli_in,
};
pub use procfs::{ThreadCaps, rss_bytes, set_thread_comm, thread_caps};
pub use prom::{Histogram, Metrics, Sample};
pub use prometheus_server::{
    PrometheusOptions, PrometheusServer, counter_rate, prometheus_bin, promtool_bin, promtool_check_metrics,
};
pub use scrape::{Response, Scraper};
pub use session_log::{ObservedSession, by_local, read_session_log, session_between, wait_sessions};
pub use traffic::{HEADER_LEN, ServerConn, TcpServer, TransferStats, transfer, transfer_in};
pub use util::{TempDir, is_root, run_with_timeout, scaled, time_scale, wait_until, workspace_root};
pub use web::{CurlAnswer, TlsWebConfig, WEB_PASSWORD, WEB_USER, curl};
