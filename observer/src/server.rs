//! The HTTP endpoints: /metrics (Prometheus text format), /healthz, /readyz.
use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{metrics::Metrics, pipeline::Pipeline};

pub struct AppState {
    pub metrics: Arc<Metrics>,
    /// True once every required program is attached; false again at shutdown.
    pub ready: AtomicBool,
    /// Set once the kernel programs are loaded: each scrape refreshes
    /// kernel-side counters (lost data, live throughput) through it.
    pub pipeline: OnceLock<Arc<Pipeline>>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Some(pipeline) = state.pipeline.get() {
        pipeline.refresh();
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

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use tower::ServiceExt as _;

    use super::*;

    async fn get(state: &Arc<AppState>, path: &str) -> (StatusCode, String) {
        let response = router(state.clone()).oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readyz_is_503_until_ready_and_healthz_always_200() {
        let metrics = Arc::new(Metrics::new(Vec::new()).unwrap());
        let state = Arc::new(AppState { metrics, ready: false.into(), pipeline: OnceLock::new() });
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get(&state, "/healthz").await.0, StatusCode::OK);
        state.ready.store(true, Ordering::Release);
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::OK);
        let (status, body) = get(&state, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("# TYPE observer_session_goodput_bytes_per_second histogram"), "{body}");
        assert_eq!(get(&state, "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
