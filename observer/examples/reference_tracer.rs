//! The benchmark's reference tracer (`observer-ebpf/src/reference.rs`): a minimal
//! tcplife-style program that `cargo xtask bench` runs beside "off" and the observer
//! in the short-connection workload, as the peer of the observer's per-connection
//! cost. Not part of the observer.
//!
//! Loads the reference object with the running kernel's field offsets (resolved as
//! the observer resolves them), attaches its one program to tp_btf
//! `sock:inet_sock_set_state`, prints `ready` and runs until killed (SIGTERM): the
//! program stays attached while this process holds it. The kernel's BPF statistics
//! of its program (`ref_life_state`) are read from this process's fds.
use std::path::Path;

use anyhow::{Context, Result, ensure};
use aya::{Btf, EbpfLoader, programs::BtfTracePoint};
use observer::kernel::btf::{DEFAULT_BTF_PATH, KernelBtf};

/// Built by observer's build script beside the observer's own object.
static REFERENCE_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/reference"));

const PROGRAM: &str = "ref_life_state";

fn main() -> Result<()> {
    ensure!(!REFERENCE_OBJECT.is_empty(), "built with AYA_BUILD_SKIP=1: no reference object to load");
    let btf = KernelBtf::open(Path::new(DEFAULT_BTF_PATH)).context("reading the kernel's BTF")?;
    let offsets = btf.kernel_offsets().context("resolving field offsets")?;
    let aya_btf = Btf::from_sys_fs().context("parsing the kernel's BTF for the loader")?;
    let mut ebpf = EbpfLoader::new()
        .btf(Some(&aya_btf))
        .override_global("OFFSETS", &offsets, true)
        .load(REFERENCE_OBJECT)
        .context("loading the reference object")?;
    let program: &mut BtfTracePoint =
        ebpf.program_mut(PROGRAM).context("the reference object has no ref_life_state")?.try_into()?;
    program.load("inet_sock_set_state", &aya_btf).context("loading ref_life_state")?;
    program.attach().context("attaching ref_life_state")?;
    println!("ready");
    loop {
        std::thread::park();
    }
}
