//! `observer run`: validate, load, attach, serve, and shut down cleanly.
use std::{
    net::TcpListener as StdListener,
    sync::{Arc, OnceLock, atomic::Ordering},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, PerCpuArray, PerCpuHashMap, RingBuf};
use observer_common::Settings;
use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinSet,
};

use crate::{
    cli::{RunArgs, StateDirArg},
    enrich::{EnrichConfig, Enricher},
    error::Error,
    kernel::btf::KernelBtf,
    kernel::detect,
    kernel::diagnostics as kernel_diagnostics,
    kernel::loader,
    kernel::privileges,
    kernel::probes::{self, Concern, ProbeMode},
    kernel::state::{self as kernel_state, StateDir},
    metrics::Metrics,
    metrics::labels,
    metrics::telemetry,
    pipeline::drops::{self, DropCounters},
    pipeline::interfaces,
    pipeline::session_log::SessionLog,
    pipeline::{KernelMaps, Pipeline, PipelineConfig, Stop, StopSender},
    server::{AppState, router, serve, web_config},
};

pub async fn run(args: RunArgs) -> Result<(), Error> {
    // Everything the user can get wrong is checked before anything is loaded.
    labels::validate_set(&args.labels).map_err(Error::Usage)?;
    let caps = privileges::effective_caps()
        .ok_or_else(|| Error::Other("cannot read this process's capabilities from /proc/self/status".into()))?;
    privileges::check(caps).map_err(Error::Usage)?;
    let filter = interfaces::resolve(&args.ifaces).map_err(Error::Usage)?;
    let listener = StdListener::bind(args.listen).and_then(|l| l.set_nonblocking(true).map(|()| l)).map_err(|e| {
        Error::Usage(format!("cannot listen on {}: {e} (choose another address with --listen)", args.listen))
    })?;
    let web = match &args.web_config_file {
        Some(path) => web_config::load(path).map_err(Error::Usage)?,
        None => web_config::WebConfig::default(),
    };
    let session_log = match &args.session_log {
        Some(path) => Some(
            SessionLog::open(path)
                .map_err(|e| Error::Usage(format!("cannot open session log {}: {e}", path.display())))?,
        ),
        None => None,
    };

    let enricher = Enricher::new(EnrichConfig {
        labels: args.session_labels.clone(),
        peer_groups: args.peer_groups.clone(),
        service_ports: args.service_ports.clone(),
        geoip_db: args.geoip_db.clone(),
        limits: args.label_limits.clone(),
        max_label_sets: args.max_label_sets,
        series_ttl: args.series_ttl,
        pod_log_dir: args.pod_log_dir.clone(),
        cgroup_root: crate::kernel::cgroup::cgroup2_root(),
    })
    .map_err(Error::Usage)?;
    labels::validate_against(&args.labels, &enricher.names()).map_err(Error::Usage)?;
    let metrics = Arc::new(
        Metrics::new(args.labels.clone(), &enricher.names(), args.histograms)
            .map_err(|e| Error::Other(format!("metrics: {e}")))?,
    );
    // GPU statistics sample on their own thread and never delay a scrape;
    // `--gpu required` refuses to start (exit 2) when NVML cannot.
    let gpu = crate::gpu::Gpu::start(&args.gpu.config(), &args.pod_log_dir).map_err(Error::Usage)?;
    // Which pod holds each GPU, from the kubelet, on a thread of its own.
    let pod_resources = (args.gpu.mode != crate::gpu::GpuMode::Off)
        .then(|| crate::gpu::podresources::PodResources::start(&args.gpu.pod_resources_socket, args.gpu.interval));
    gpu.collector()
        .and_then(|c| match &pod_resources {
            Some(p) => c.with_pod_resources(p.latest()),
            None => Ok(c),
        })
        .and_then(|c| metrics.register(Box::new(c)))
        .map_err(|e| Error::Other(format!("GPU metrics: {e}")))?;
    let state = Arc::new(AppState {
        metrics: metrics.clone(),
        ready: false.into(),
        pipeline: OnceLock::new(),
        auth: web.auth.map(Arc::new),
    });
    // Serve /healthz at once; /readyz turns 200 when the programs are attached.
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| Error::Other(format!("listener: {e}")))?;
    let local = listener.local_addr().map_err(|e| Error::Other(format!("listener: {e}")))?;
    let scheme = if web.tls.is_some() { "https" } else { "http" };
    let server = tokio::spawn(serve(listener, router(state.clone()), web.tls));

    let disabled = args.kernel.disabled();
    if !disabled.concerns().is_empty() {
        let names: Vec<&str> = disabled.concerns().iter().map(|c| c.as_str()).collect();
        tracing::info!(
            concerns = %names.join(","),
            udp_sessions = disabled.measures_udp(),
            "switched off with --disable: nothing of theirs is loaded, their metrics are absent"
        );
    }
    let btf = KernelBtf::open(&args.kernel.btf)?;
    let settings = Settings {
        active_gap_ns: args.active_gap.as_nanos() as u64,
        skip_udp: u32::from(!disabled.measures_udp()),
        ..drops::settings(&btf)
    };
    // Held until the process exits: BPF run-time statistics stay on while
    // the observer runs, and the kernel restores the previous state then.
    let _bpf_stats = if args.bpf_stats {
        telemetry::enable_bpf_stats()
    } else {
        tracing::info!("BPF run-time statistics left as the kernel has them (--bpf-stats=false)");
        None
    };
    let diagnostics = kernel_diagnostics::wanted();
    // No UDP flow is ever added without UDP measured: its tables keep one entry.
    let max_udp_flows = if disabled.measures_udp() { args.max_udp_flows } else { 1 };
    let state_dir = open_state_dir(args.state_dir.as_ref(), args.max_sessions, max_udp_flows)?;
    for (reason, detail) in state_dir.iter().flat_map(|s| &s.discarded) {
        metrics.telemetry.state_discarded(*reason);
        tracing::warn!(
            reason = reason.as_str(),
            detail = %detail,
            "discarding pinned kernel state of another layout: sessions open across this restart lose their birth"
        );
    }
    let reused = state_dir.as_ref().is_some_and(|s| s.reused);
    if let Some(s) = &state_dir {
        tracing::info!(dir = %s.dir.display(), reused, "kernel tables pinned across restarts");
    }
    let mut kernel = loader::load(
        &btf,
        settings,
        args.max_sessions,
        max_udp_flows,
        diagnostics,
        state_dir.as_ref().map(|s| s.dir.as_path()),
    )?;
    // Read from now on, before any program runs; ends with the runtime.
    let _kernel_log = if diagnostics { kernel_diagnostics::start(&mut kernel.ebpf) } else { None };
    let fentry = kernel.probe_fentry();
    let facts = detect::kernel_facts(&btf, fentry);
    let plan = probes::select(&facts, args.kernel.probes, &disabled);
    if let Some(missing) = plan.missing_required().first() {
        return Err(Error::NoHook {
            concern: missing.concern.as_str(),
            why: missing.hook.clone().unwrap_err(),
            forced: args.kernel.probes != ProbeMode::Auto,
        });
    }
    // Take the maps out and start reading before attaching, so no record is
    // produced that nobody will read.
    let ebpf = &mut kernel.ebpf;
    let maps = KernelMaps {
        lost: take_map(ebpf, "LOST", PerCpuArray::try_from)?,
        open_sessions: take_map(ebpf, "OPEN_SESSIONS", BpfHashMap::try_from)?,
        udp_flows: take_map(ebpf, "UDP_FLOWS", BpfHashMap::try_from)?,
        udp_sockets: take_map(ebpf, "UDP_SOCKETS", BpfHashMap::try_from)?,
        drops: DropCounters::new(take_map(ebpf, "DROPS", PerCpuHashMap::try_from)?, &btf),
    };
    let sessions_ring = take_map(ebpf, "SESSIONS", RingBuf::try_from)?;
    let releases_ring = take_map(ebpf, "UDP_RELEASES", RingBuf::try_from)?;
    let config = PipelineConfig {
        filter,
        min_session_bytes: args.min_session_bytes,
        udp_idle_timeout: args.udp_idle_timeout,
        session_log,
        ifaces: args.ifaces.clone(),
        enricher,
    };
    let pipeline = Arc::new(Pipeline::new(metrics.clone(), config, maps));
    if reused {
        pipeline.prime_live();
    }
    let (stop_readers, stop) = Stop::new().map_err(Error::Ring)?;
    let mut readers = JoinSet::new();
    {
        let (p, s) = (pipeline.clone(), stop.clone());
        readers.spawn(p.run_tcp(sessions_ring, s));
        let (p, s) = (pipeline.clone(), stop.clone());
        readers.spawn(p.run_udp_releases(releases_ring, s));
        let p = pipeline.clone();
        readers.spawn(p.run_udp_expiry(stop));
    }
    let _ = state.pipeline.set(pipeline.clone());

    // Sessions that closed while no observer ran: swept once before the
    // programs attach (no program then updates an entry whose address a new
    // socket took meanwhile) and once after (closes in between).
    let mut socket_probe = if reused { attach_socket_probe(&mut kernel.ebpf) } else { None };
    if let Some(probe) = &mut socket_probe {
        sweep_gone(probe, &pipeline, "before attach");
    }
    let attached = kernel.attach(&plan)?;
    for (hook, result) in &attached {
        let Some(concern) = plan.choices.iter().find(|c| c.hook.as_ref().ok() == Some(hook)).map(|c| c.concern) else {
            continue;
        };
        match result {
            Ok(()) => {
                metrics.set_probe(concern, plan.disabled.label(*hook));
                tracing::info!(concern = concern.as_str(), hook = plan.disabled.label(*hook), "attached");
            }
            Err(why) => {
                tracing::warn!(concern = concern.as_str(), hook = plan.disabled.label(*hook), error = %why, "not attached")
            }
        }
    }
    for concern in plan.disabled.concerns() {
        metrics.set_probe_disabled(concern);
    }
    if plan.serves(Concern::TcpErrors)
        && let Some(limit) = drops::sent_resets_limit(&btf)
    {
        tracing::warn!(concern = "tcp_errors", "{limit}");
    }
    if plan.serves(Concern::Drops)
        && let Some(limit) = drops::drop_reason_limit(&btf)
    {
        tracing::warn!(concern = "drops", "{limit}");
    }
    for choice in plan.choices.iter().filter(|c| !c.disabled) {
        if let Err(why) = &choice.hook {
            tracing::warn!(concern = choice.concern.as_str(), reason = %why, "no hook for this concern; running without it");
        }
    }
    if let Some(mut probe) = socket_probe {
        sweep_gone(&mut probe, &pipeline, "after attach");
        probe.detach(&mut kernel.ebpf);
    }
    let attached_programs: Vec<&str> = attached
        .iter()
        .filter(|(_, result)| result.is_ok())
        .flat_map(|(hook, _)| plan.disabled.programs(*hook).map(|(name, _)| name))
        .collect();
    let mut programs = telemetry::program_entries(&kernel.ebpf, &attached_programs);
    // Attached for the start's sweep only (if at all): not one of the hooks.
    programs.retain(|p| p.name != kernel_state::SOCK_PROBE_PROGRAM);
    telemetry::BpfPrograms::new(programs)
        .and_then(|c| metrics.register(Box::new(c)))
        .map_err(|e| Error::Other(format!("BPF program metrics: {e}")))?;
    // The parsed kernel BTF (tens of MiB with both parsers) is needed only to
    // load and attach: free it, and hand the freed heap back to the system, so
    // the agent's resident memory is what it uses while running.
    drop(btf);
    kernel.release_btf();
    crate::pipeline::memory::release_free();
    give_up_capabilities()?;
    state.ready.store(true, Ordering::Release);
    println!("observer: serving metrics on {scheme}://{local}/metrics");
    tracing::info!(listen = %local, "ready");

    // A reader or server that dies would leave a process that looks healthy
    // but measures nothing: exit instead, so the supervisor restarts us.
    let mut server = server;
    tokio::select! {
        r = wait_for_shutdown() => r?,
        Some(r) = readers.join_next() => return Err(Error::Other(format!("a session reader stopped: {}", task_end(r)))),
        r = &mut server => return Err(Error::Other(format!("the metrics server stopped: {}", task_end(r.map(|r| r.map_err(Error::Server)))))),
    }
    shutdown(args.shutdown_timeout, &state, kernel, stop_readers, readers, &pipeline).await?;
    server.abort();
    Ok(())
}

/// Stops within `budget`: not ready, programs detached (nothing new reaches
/// the rings), the rings read to the end and the counters brought up to date
/// (the session log gets every session that closed before the detach). A
/// watchdog thread ends the process if any of it hangs past the budget.
async fn shutdown(
    budget: Duration,
    state: &AppState,
    kernel: loader::Kernel,
    stop_readers: StopSender,
    mut readers: JoinSet<Result<(), Error>>,
    pipeline: &Pipeline,
) -> Result<(), Error> {
    let started = Instant::now();
    std::thread::spawn(move || {
        std::thread::sleep(budget);
        tracing::error!(budget = ?budget, "shutdown took longer than --shutdown-timeout; exiting now, unfinished");
        std::process::exit(1);
    });
    state.ready.store(false, Ordering::Release);
    // Dropping the Ebpf detaches every link and unloads every program; the
    // maps taken out of it stay open for the readers.
    drop(kernel);
    let detached_ms = started.elapsed().as_millis() as u64;
    stop_readers.stop();
    let drained = tokio::time::timeout(budget.saturating_sub(started.elapsed()), async {
        while let Some(result) = readers.join_next().await {
            if let Ok(Err(e)) = result {
                tracing::warn!(error = %crate::kernel::loader::chain(&e), "a session reader failed while draining");
            }
        }
    })
    .await;
    if drained.is_err() {
        return Err(Error::Other(format!(
            "shutdown took longer than --shutdown-timeout {budget:?}: sessions still queued were not read"
        )));
    }
    pipeline.refresh();
    pipeline.close_session_log(budget.saturating_sub(started.elapsed()));
    tracing::info!(
        detached_ms,
        took_ms = started.elapsed().as_millis() as u64,
        "stopped; kernel programs detached, queued sessions read"
    );
    Ok(())
}

/// The state directory `--state-dir` names, prepared (`kernel::state::prepare`),
/// or none: `''`, or the default where /sys/fs/bpf is not bpffs (said once).
fn open_state_dir(arg: Option<&StateDirArg>, max_sessions: u32, max_udp_flows: u32) -> Result<Option<StateDir>, Error> {
    let layouts = kernel_state::layouts(max_sessions, max_udp_flows);
    match arg {
        Some(StateDirArg::Off) => {
            tracing::info!("--state-dir '': no kernel state kept; sessions open at a restart lose their birth");
            Ok(None)
        }
        Some(StateDirArg::Dir(dir)) => kernel_state::prepare(dir, &layouts).map(Some),
        None => {
            let dir = std::path::Path::new(kernel_state::DEFAULT_STATE_DIR);
            let parent = dir.parent().unwrap_or(dir);
            if kernel_state::on_bpffs(parent) {
                kernel_state::prepare(dir, &layouts).map(Some)
            } else {
                tracing::warn!(
                    dir = %parent.display(),
                    "not a bpf filesystem: no kernel state kept across restarts (mount bpffs there, or set --state-dir)"
                );
                Ok(None)
            }
        }
    }
}

/// The socket probe for `Pipeline::sweep_gone`, attached on this thread,
/// which still holds the privileges to load it; `None` (logged) if it cannot
/// be: those sessions are then left to the close-missed path.
fn attach_socket_probe(ebpf: &mut aya::Ebpf) -> Option<kernel_state::SocketProbe> {
    match kernel_state::SocketProbe::attach(ebpf) {
        Ok(probe) => Some(probe),
        Err(why) => {
            tracing::warn!(error = %why, "cannot look for sessions that closed while no observer ran; they are reported when their address is reused");
            None
        }
    }
}

/// Ends what closed while no observer ran (`Pipeline::sweep_gone`); `when`
/// names the pass in the log.
fn sweep_gone(probe: &mut kernel_state::SocketProbe, pipeline: &Pipeline, when: &'static str) {
    let started = Instant::now();
    match pipeline.sweep_gone(probe) {
        Ok(swept) => tracing::info!(
            pass = when,
            tcp = swept.tcp,
            udp = swept.udp,
            took_ms = started.elapsed().as_millis() as u64,
            "sessions that closed while no observer ran: reported"
        ),
        Err(why) => tracing::warn!(error = %why, "sweep of sessions that closed while no observer ran failed"),
    }
}

/// Everything is loaded, attached and open: from here on no thread holds a
/// capability (kernel/privileges.rs says how, and what a kernel before 5.19
/// keeps).
fn give_up_capabilities() -> Result<(), Error> {
    let dropped = privileges::drop_after_attach().map_err(Error::Other)?;
    for thread in &dropped.holding {
        tracing::warn!(thread = %thread, "a thread still holds capabilities after attach");
    }
    if dropped.kept.is_empty() {
        tracing::info!(threads = dropped.threads, "capabilities given up in every thread; no_new_privs set");
    } else {
        tracing::info!(
            threads = dropped.threads,
            kept = %dropped.kept,
            "capabilities given up in every thread but the one this kernel checks on every map read; no_new_privs set"
        );
    }
    Ok(())
}

fn task_end(r: Result<Result<(), Error>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => "it returned".into(),
        Ok(Err(e)) => crate::kernel::loader::chain(&e),
        Err(e) => e.to_string(),
    }
}

/// Takes map `name` out of the object as the typed map `convert` makes.
fn take_map<M, E: std::fmt::Display>(
    ebpf: &mut aya::Ebpf,
    name: &str,
    convert: impl FnOnce(aya::maps::Map) -> Result<M, E>,
) -> Result<M, Error> {
    let map = ebpf.take_map(name).ok_or_else(|| {
        Error::Other(format!("the kernel object has no map {name}; the binary and its kernel programs do not match"))
    })?;
    convert(map).map_err(|e| Error::Other(format!("map {name}: {e}")))
}

async fn wait_for_shutdown() -> Result<(), Error> {
    let mut term = signal(SignalKind::terminate()).map_err(|e| Error::Other(format!("SIGTERM handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| Error::Other(format!("SIGINT handler: {e}")))?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    Ok(())
}
