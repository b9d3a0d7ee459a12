//! `observer run`: validate, load, attach, serve, and shut down cleanly.
use std::{
    future::IntoFuture,
    net::TcpListener as StdListener,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Instant,
};

use aya::maps::{PerCpuArray, RingBuf};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    btf::KernelBtf,
    cli::RunArgs,
    detect, interfaces, labels,
    error::Error,
    loader,
    metrics::Metrics,
    pipeline::{KernelLostCounters, Pipeline},
    privileges,
    probes::{self, ProbeMode},
    server::{AppState, router},
    session_log::SessionLog,
};

pub async fn run(args: RunArgs) -> Result<(), Error> {
    // Everything the user can get wrong is checked before anything is loaded.
    labels::validate_set(&args.labels).map_err(Error::Usage)?;
    let caps = privileges::effective_caps()
        .ok_or_else(|| Error::Other("cannot read this process's capabilities from /proc/self/status".into()))?;
    privileges::check(caps).map_err(Error::Usage)?;
    let filter = interfaces::resolve(&args.ifaces).map_err(Error::Usage)?;
    let listener = StdListener::bind(args.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| Error::Usage(format!("cannot listen on {}: {e} (choose another address with --listen)", args.listen)))?;
    let session_log = match &args.session_log {
        Some(path) => Some(Mutex::new(SessionLog::open(path).map_err(|e| {
            Error::Usage(format!("cannot open session log {}: {e}", path.display()))
        })?)),
        None => None,
    };

    let metrics = Arc::new(Metrics::new(args.labels.clone()).map_err(|e| Error::Other(format!("metrics: {e}")))?);
    let state = Arc::new(AppState { metrics: metrics.clone(), ready: false.into(), kernel_lost: Mutex::new(None) });
    // Serve /healthz at once; /readyz turns 200 when the programs are attached.
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| Error::Other(format!("listener: {e}")))?;
    let local = listener.local_addr().map_err(|e| Error::Other(format!("listener: {e}")))?;
    let server = tokio::spawn(axum::serve(listener, router(state.clone())).into_future());

    let btf = KernelBtf::open(&args.kernel.btf)?;
    let mut kernel = loader::load(&btf)?;
    let fentry = kernel.probe_fentry();
    let facts = detect::kernel_facts(&btf, fentry);
    let plan = probes::select(&facts, args.kernel.probes);
    if let Some(missing) = plan.missing_required().first() {
        return Err(Error::NoHook {
            concern: missing.concern.as_str(),
            why: missing.hook.clone().unwrap_err(),
            forced: args.kernel.probes != ProbeMode::Auto,
        });
    }
    // Take the maps out before attaching, so no record is produced that
    // nobody will read.
    let ring = RingBuf::try_from(kernel.ebpf.take_map("SESSIONS").ok_or_else(|| missing_map("SESSIONS"))?)
        .map_err(|e| Error::Other(format!("map SESSIONS: {e}")))?;
    let lost = PerCpuArray::try_from(kernel.ebpf.take_map("LOST").ok_or_else(|| missing_map("LOST"))?)
        .map_err(|e| Error::Other(format!("map LOST: {e}")))?;
    let pipeline = Arc::new(Pipeline { metrics: metrics.clone(), filter, min_session_bytes: args.min_session_bytes, session_log });
    let reader = {
        let pipeline = pipeline.clone();
        tokio::spawn(async move { pipeline.run(ring).await })
    };

    let attached = kernel.attach(&plan)?;
    for (hook, result) in &attached {
        let concern = plan.choices.iter().find(|c| c.hook.as_ref().ok() == Some(hook)).map_or("", |c| c.concern.as_str());
        match result {
            Ok(()) => {
                metrics.set_probe(concern, *hook);
                tracing::info!(concern, hook = hook.describe(), "attached");
            }
            Err(why) => tracing::warn!(concern, hook = hook.describe(), error = %why, "not attached"),
        }
    }
    for choice in &plan.choices {
        if let Err(why) = &choice.hook {
            tracing::warn!(concern = choice.concern.as_str(), reason = %why, "no hook for this concern; running without it");
        }
    }
    if let Ok(mut slot) = state.kernel_lost.lock() {
        *slot = Some(KernelLostCounters::new(lost));
    }
    state.ready.store(true, Ordering::Release);
    println!("observer: serving metrics on http://{local}/metrics");
    tracing::info!(listen = %local, "ready");

    // A reader or server that dies would leave a process that looks healthy
    // but measures nothing: exit instead, so the supervisor restarts us.
    let mut reader = reader;
    let mut server = server;
    tokio::select! {
        r = wait_for_shutdown() => r?,
        r = &mut reader => return Err(Error::Other(format!("the session reader stopped: {}", task_end(r)))),
        r = &mut server => return Err(Error::Other(format!("the metrics server stopped: {}", task_end(r.map(|r| r.map_err(Error::Ring)))))),
    }
    let started = Instant::now();
    state.ready.store(false, Ordering::Release);
    reader.abort();
    // Dropping the Ebpf detaches every link and unloads every program.
    drop(kernel);
    server.abort();
    tracing::info!(took_ms = started.elapsed().as_millis() as u64, "stopped; kernel programs detached");
    Ok(())
}

fn task_end(r: Result<Result<(), Error>, tokio::task::JoinError>) -> String {
    match r {
        Ok(Ok(())) => "it returned".into(),
        Ok(Err(e)) => crate::loader::chain(&e),
        Err(e) => e.to_string(),
    }
}

fn missing_map(name: &str) -> Error {
    Error::Other(format!("the kernel object has no map {name}; the binary and its kernel programs do not match"))
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
