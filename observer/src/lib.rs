//! observer: per-session network goodput measured from the kernel with eBPF,
//! served as Prometheus metrics. README.md says what it measures; docs/ how.
//!
//! The modules follow the data, bottom to top; each imports only those above
//! it in this list (and the two shared files), never one below:
//!
//! ```text
//! kernel hooks (observer-ebpf) -> maps, ring buffers
//!   kernel/    BTF facts, hook selection, loading and attaching, table copies
//!   enrich/    session labels: owner (process, container, pod), peer, country
//!   metrics/   the families a session updates, static labels, self-telemetry
//!   pipeline/  ring readers and scrapes: kernel records -> enrich -> metrics
//!   gpu/       NVML sampling, its own families
//!   server/    HTTP: /metrics, /healthz, /readyz, /api/v1/snapshot
//!   cli/       command line, configuration, `run` and `check`, logging
//! ```
//!
//! Shared by every layer: [`session`] (a closed session, its goodput, the
//! interface filter) and [`error`] (one error type and its exit codes).
pub mod error;
pub mod session;

pub mod kernel;

pub mod enrich;

pub mod metrics;

pub mod pipeline;

pub mod gpu;

pub mod server;

pub mod cli;
