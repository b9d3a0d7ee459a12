//! What the running kernel offers, read from BTF and sysfs. The decision of
//! what to use is `probes::select`; the fentry tier can only be known by trying
//! to load a program, which `loader` does and hands in here.
use std::{collections::BTreeSet, path::Path};

use crate::{
    kernel::btf::{DEFAULT_BTF_PATH, KernelBtf},
    kernel::probes::{Concern, KernelFacts, Target, Tier},
};

/// perf's kprobe PMU: aya attaches kprobes through it. Absent when the kernel
/// was built without CONFIG_KPROBES.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

pub fn kernel_facts(btf: &KernelBtf, fentry: Result<(), String>) -> KernelFacts {
    let tracepoint = if Path::new(DEFAULT_BTF_PATH).exists() {
        Ok(())
    } else {
        // tp_btf attaches through the kernel's own BTF; a BTF file given with
        // --btf resolves offsets but cannot stand in for it.
        Err(format!("the kernel publishes no BTF at {} (tp_btf needs CONFIG_DEBUG_INFO_BTF)", DEFAULT_BTF_PATH))
    };
    let kprobe = if Path::new(KPROBE_PMU).exists() {
        Ok(())
    } else {
        Err(format!("the kernel has no kprobe support ({KPROBE_PMU} is missing: CONFIG_KPROBES is off)"))
    };
    let mut targets = BTreeSet::new();
    for concern in Concern::ALL {
        for hook in concern.candidates() {
            for (_, attach) in hook.programs() {
                let present = match attach.target() {
                    Target::Tracepoint(tp) => btf.has_btf_tracepoint(tp),
                    Target::Function(f) => btf.has_function(f),
                    Target::Cgroup2 => crate::kernel::cgroup::cgroup2_root().is_some(),
                };
                if present {
                    targets.insert(attach.target());
                }
            }
        }
    }
    KernelFacts { tiers: vec![(Tier::Fentry, fentry), (Tier::Kprobe, kprobe), (Tier::Tracepoint, tracepoint)], targets }
}
