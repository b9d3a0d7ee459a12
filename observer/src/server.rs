//! The HTTP endpoints: /metrics (Prometheus text format), /healthz, /readyz.
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{metrics::Metrics, pipeline::KernelLostCounters};

pub struct AppState {
    pub metrics: Arc<Metrics>,
    /// True once every required program is attached; false again at shutdown.
    pub ready: AtomicBool,
    pub kernel_lost: Mutex<Option<KernelLostCounters>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Ok(mut lost) = state.kernel_lost.lock() {
        if let Some(lost) = lost.as_mut() {
            lost.sync(&state.metrics);
        }
    }
    match state.metrics.encode() {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response(),
    }
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: kernel programs are not attached\n")
    }
}
