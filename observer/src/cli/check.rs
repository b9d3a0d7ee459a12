//! `observer check`: what `run` would attach on this kernel, or why it could not.
use std::fmt::Write as _;

use observer_common::Settings;

use crate::{
    cli::KernelArgs,
    kernel::btf::KernelBtf,
    kernel::detect,
    kernel::diagnostics as kernel_diagnostics,
    kernel::loader,
    kernel::privileges,
    kernel::probes::{self, Concern, KernelFacts, Tier},
    pipeline::drops,
};

/// The report and whether `run` would work.
pub fn check(args: &KernelArgs) -> (String, bool) {
    let mut out = String::new();
    let disabled = args.disabled();
    let mut ok = true;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(out, "kernel: {}", release.trim());

    let privileged = match privileges::effective_caps().map(privileges::check) {
        Some(Ok(())) => {
            let _ = writeln!(out, "privileges: ok");
            true
        }
        Some(Err(why)) => {
            let _ = writeln!(out, "privileges: missing: {why}");
            false
        }
        None => {
            let _ = writeln!(out, "privileges: unknown: cannot read /proc/self/status");
            false
        }
    };
    ok &= privileged;

    let btf = match KernelBtf::open(&args.btf) {
        Ok(btf) => {
            let _ = writeln!(out, "btf: {}", btf.path().display());
            btf
        }
        Err(e) => {
            let _ = writeln!(out, "btf: unavailable: {e}");
            let _ = writeln!(out, "result: run cannot work here (every hook needs kernel BTF for structure offsets)");
            return (out, false);
        }
    };
    match btf.kernel_offsets() {
        Ok(o) => {
            let _ = writeln!(
                out,
                "offsets: ok (tcp_sock.bytes_acked at {}, tcp_sock.bytes_received at {}, sock.sk_rx_dst_ifindex at {})",
                o.tcp_bytes_acked, o.tcp_bytes_received, o.rx_dst_ifindex
            );
        }
        Err(e) => {
            let _ = writeln!(out, "offsets: missing: {e}");
            ok = false;
        }
    }

    // fentry is only known by loading a program, which needs privileges;
    // so is what the verifier says of the others. Loaded as `run` loads them
    // (settings, table sizes, the diagnostics switch this log filter gives).
    let mut kernel = if !privileged {
        Err("loading a program needs the privileges above".to_string())
    } else {
        loader::load(
            &btf,
            Settings { skip_udp: u32::from(!disabled.measures_udp()), ..drops::settings(&btf) },
            crate::cli::DEFAULT_MAX_SESSIONS,
            crate::cli::DEFAULT_MAX_UDP_FLOWS,
            kernel_diagnostics::wanted(),
            None,
        )
        .map_err(|e| loader::chain(&e))
    };
    let fentry = match &mut kernel {
        Ok(kernel) => kernel.probe_fentry(),
        Err(why) => Err(format!("not probed: {why}")),
    };
    let facts = detect::kernel_facts(&btf, fentry);
    write_tiers(&mut out, &facts);

    let plan = probes::select(&facts, args.probes, &disabled);
    for choice in &plan.choices {
        let need = if choice.concern.required() { "required" } else { "optional" };
        match &choice.hook {
            Ok(hook) => {
                let _ =
                    writeln!(out, "concern {} ({need}): {} (chosen)", choice.concern.as_str(), disabled.label(*hook));
            }
            Err(why) if choice.disabled => {
                let _ = writeln!(out, "concern {} ({need}): disabled: {why}", choice.concern.as_str());
            }
            Err(why) => {
                let _ = writeln!(out, "concern {} ({need}): none: {why}", choice.concern.as_str());
            }
        }
    }
    ok &= write_verified(&mut out, kernel.as_mut().map(|k| k.verify(&plan)).map_err(|why| &*why));
    // A hook that attaches but sees less on this kernel than on newer ones.
    if plan.serves(Concern::TcpErrors)
        && let Some(limit) = drops::sent_resets_limit(&btf)
    {
        let _ = writeln!(out, "limit tcp_errors: {limit}");
    }
    if plan.serves(Concern::Drops)
        && let Some(limit) = drops::drop_reason_limit(&btf)
    {
        let _ = writeln!(out, "limit drops: {limit}");
    }
    ok &= plan.missing_required().is_empty();
    let _ = writeln!(out, "result: {}", if ok { "run would work" } else { "run cannot work here" });
    (out, ok)
}

/// One line per program of the chosen hooks with the verifier's answer;
/// false if a required concern's program was refused (`run` would stop).
fn write_verified(out: &mut String, verified: Result<Vec<loader::Verified>, &String>) -> bool {
    let verified = match verified {
        Ok(verified) => verified,
        Err(why) => {
            let _ = writeln!(out, "programs: not verified: {why}");
            return false;
        }
    };
    let mut ok = true;
    for v in &verified {
        let concern = v.concern.as_str();
        let _ = match &v.result {
            Ok(()) => writeln!(out, "program {} ({concern}): verifier accepted", v.program),
            Err(why) => {
                ok &= !v.concern.required();
                writeln!(out, "program {} ({concern}): verifier refused: {why}", v.program)
            }
        };
    }
    ok
}

fn write_tiers(out: &mut String, facts: &KernelFacts) {
    for tier in Tier::ALL {
        let status = facts.tiers.iter().find(|(t, _)| *t == tier).map(|(_, r)| r.clone());
        let _ = match status {
            Some(Ok(())) => writeln!(out, "tier {}: available", tier.as_str()),
            Some(Err(why)) => writeln!(out, "tier {}: unavailable: {why}", tier.as_str()),
            None => writeln!(out, "tier {}: not probed", tier.as_str()),
        };
    }
}
