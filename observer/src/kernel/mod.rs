//! The kernel side, seen from userspace: what the running kernel offers (BTF,
//! hooks, cgroup v2), which hook serves each concern, loading and attaching the
//! programs of `observer-ebpf`, and copying their hash tables.
//!
//! Layer: the lowest. Imports nothing of this crate but [`crate::error`] and
//! [`crate::session`]'s types; every layer above may import it.
pub mod btf;
pub mod cgroup;
pub mod detect;
pub mod diagnostics;
pub mod loader;
pub mod privileges;
pub mod probes;
pub mod state;
pub mod table_copy;
