//! The HTTP endpoints: /metrics (Prometheus text format), /healthz, /readyz,
//! /api/v1/snapshot (JSON summary, see [`crate::server::snapshot`]), served by a hardened connection loop (see [`serve`]),
//! optionally over TLS and behind basic authentication (see [`web_config`]).
//! Data requests are bounded and share refreshes of the kernel tables (see
//! [`scrape`]); connection slots are shared fairly, with a reserve for the
//! health probes (see [`slots`]).
//!
//! Layer: above metrics and pipeline (a scrape asks the pipeline for live
//! bytes, then renders the metrics); below cli only.
use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use axum::{
    Router,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use tower_http::catch_panic::CatchPanicLayer;

use crate::{
    metrics::{Metrics, exposition::Format},
    pipeline::Pipeline,
};

mod conn;
pub mod scrape;
pub mod slots;
pub mod snapshot;
pub mod web_config;

pub use conn::{HEADER_READ_TIMEOUT, IDLE_TIMEOUT, MAX_HEADER_BYTES, WRITE_TIMEOUT, serve};
pub use slots::{EVICTABLE_AFTER, HEALTH_RESERVE, MAX_CONNECTIONS};

pub struct AppState {
    pub metrics: Arc<Metrics>,
    /// True once every required program is attached; false again at shutdown.
    pub ready: AtomicBool,
    /// Set once the kernel programs are loaded: each scrape refreshes
    /// kernel-side counters (lost data, live throughput) through it.
    pub pipeline: OnceLock<Arc<Pipeline>>,
    /// Users allowed on the data endpoints (`--web-config-file`); `None`:
    /// no authentication.
    pub auth: Option<Arc<web_config::BasicAuth>>,
}

/// What the handlers share: the application's state, and the bounds on
/// data requests.
struct Served {
    app: Arc<AppState>,
    gate: scrape::Gate,
    coalescer: scrape::Coalescer,
}

/// The endpoints. Only GET (and HEAD, which axum derives from GET) is routed:
/// other methods get 405 with an `Allow` header, unknown paths 404. With
/// basic authentication configured, the data endpoints require it; the health
/// endpoints do not (they tell nothing about the node, and the kubelet's
/// probes carry no credentials). The health endpoints answer at once, never
/// waiting for a refresh, a password check or a data slot.
pub fn router(state: Arc<AppState>) -> Router {
    let served =
        Arc::new(Served { app: state, gate: scrape::Gate::default(), coalescer: scrape::Coalescer::default() });
    let data = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/snapshot", get(snapshot))
        .route_layer(middleware::from_fn_with_state(served.clone(), authenticate))
        .route_layer(middleware::from_fn_with_state(served.clone(), data_slot));
    let health = Router::new()
        .route("/healthz", get(|| async { no_store("ok\n").into_response() }))
        .route("/readyz", get(readyz));
    hardened(data.merge(health).with_state(served))
}

/// 503 with Retry-After, counted by `reason`.
fn busy(served: &Served, reason: &'static str, close: bool) -> Response {
    served.app.metrics.telemetry.request_rejected(reason);
    let retry = (header::RETRY_AFTER, HeaderValue::from(scrape::RETRY_AFTER_SECONDS));
    let body = format!("busy ({reason}): try again later\n");
    if close {
        (StatusCode::SERVICE_UNAVAILABLE, [retry, (header::CONNECTION, HeaderValue::from_static("close"))], body)
            .into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, [retry], body).into_response()
    }
}

/// A data request on a connection admitted to the health reserve waits for a
/// data slot, or is answered 503 and the connection closed.
async fn data_slot(State(served): State<Arc<Served>>, request: Request, next: Next) -> Response {
    match request.extensions().get::<conn::HealthOnly>() {
        Some(health_only) if !health_only.promote(scrape::SCRAPE_WAIT).await => busy(&served, "health_only", true),
        _ => next.run(request).await,
    }
}

async fn authenticate(State(served): State<Arc<Served>>, request: Request, next: Next) -> Response {
    let Some(auth) = served.app.auth.clone() else { return next.run(request).await };
    let header = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
    let allowed = match auth.cached(header.as_deref()) {
        web_config::Cached::Allowed => true,
        web_config::Cached::Malformed => false,
        web_config::Cached::Unknown => {
            let Some(turn) = auth.bcrypt_turn().await else { return busy(&served, "auth_busy", false) };
            // bcrypt takes tens of milliseconds by design: off the async
            // workers, holding the turn until it is done.
            tokio::task::spawn_blocking(move || {
                let _turn = turn;
                auth.allows(header.as_deref())
            })
            .await
            .unwrap_or(false)
        }
    };
    if allowed {
        next.run(request).await
    } else {
        let challenge = [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"observer\""))];
        (StatusCode::UNAUTHORIZED, challenge, "unauthorized\n").into_response()
    }
}

/// Layers every route gets: a panic in a handler answers 500 and the server
/// keeps serving (the connection and the process survive).
fn hardened(router: Router) -> Router {
    router.layer(CatchPanicLayer::new())
}

/// Health answers must never be served from a cache: a stale 200 would hide
/// a dead agent.
fn no_store(body: impl IntoResponse) -> impl IntoResponse {
    ([(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))], body)
}

async fn metrics(State(served): State<Arc<Served>>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let _turn = match served.gate.enter().await {
        Ok(turn) => turn,
        Err(refused) => return busy(&served, refused.reason(), false),
    };
    let state = &served.app;
    if let Some(pipeline) = state.pipeline.get().cloned() {
        // Walking the kernel's tables is blocking work (a system call per
        // entry, over a second with 200,000 open sessions): off the two async
        // workers, which keep answering other requests (/healthz) meanwhile;
        // shared by the scrapes that arrive while it runs.
        let metrics = state.metrics.clone();
        let refresh = move || {
            metrics.telemetry.refresh_started();
            pipeline.refresh();
            metrics.telemetry.refresh_ended();
        };
        served.coalescer.refresh(started, refresh).await;
    }
    // Text, or protobuf (native histograms) when the scraper prefers it.
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = state.metrics.negotiate(accept);
    let content_type = [(header::CONTENT_TYPE, format.content_type())];
    let response = match format {
        Format::Protobuf => (content_type, state.metrics.encode_protobuf()).into_response(),
        Format::Text => match state.metrics.encode() {
            Ok(body) => (content_type, body).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")).into_response(),
        },
    };
    state.metrics.telemetry.observe_scrape(started.elapsed());
    response
}

/// Reads the histograms as they are: sessions are accounted when they close,
/// so there is no kernel state to refresh first (unlike `/metrics`).
async fn snapshot(State(served): State<Arc<Served>>) -> Response {
    let _turn = match served.gate.enter().await {
        Ok(turn) => turn,
        Err(refused) => return busy(&served, refused.reason(), false),
    };
    let body = crate::server::snapshot::build(&served.app.metrics.gather()).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn readyz(State(served): State<Arc<Served>>) -> Response {
    if served.app.ready.load(Ordering::Acquire) {
        no_store((StatusCode::OK, "ready\n")).into_response()
    } else {
        no_store((StatusCode::SERVICE_UNAVAILABLE, "not ready: kernel programs are not attached\n")).into_response()
    }
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::Request};
    use tower::ServiceExt as _;

    use super::*;

    async fn call(router: Router, method: &str, path: &str) -> Response {
        router.oneshot(Request::builder().method(method).uri(path).body(Body::empty()).unwrap()).await.unwrap()
    }

    async fn get(state: &Arc<AppState>, path: &str) -> (StatusCode, String) {
        let response = call(router(state.clone()), "GET", path).await;
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    fn state() -> Arc<AppState> {
        let metrics = Arc::new(Metrics::new(Vec::new(), &[], crate::metrics::native::HistogramMode::Both).unwrap());
        Arc::new(AppState { metrics, ready: false.into(), pipeline: OnceLock::new(), auth: None })
    }

    #[tokio::test]
    async fn readyz_is_503_until_ready_and_healthz_always_200() {
        let state = state();
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(get(&state, "/healthz").await.0, StatusCode::OK);
        state.ready.store(true, Ordering::Release);
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::OK);
        let (status, body) = get(&state, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("# TYPE observer_session_goodput_bytes_per_second histogram"), "{body}");
        assert_eq!(get(&state, "/nope").await.0, StatusCode::NOT_FOUND);
        // The first scrape's duration shows in the second.
        let (_, body) = get(&state, "/metrics").await;
        assert!(body.contains("observer_scrape_duration_seconds_count 1"), "{body}");
        let (status, body) = get(&state, "/api/v1/snapshot").await;
        assert_eq!(status, StatusCode::OK);
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        // Pre-created series: every (direction, protocol, impaired), empty.
        let goodput = doc["goodput"]["observer_session_goodput_bytes_per_second"].as_array().unwrap();
        assert_eq!(goodput.len(), 8, "{body}");
        assert!(goodput.iter().all(|s| s["count"] == 0 && s["p50"].is_null()), "{body}");
        assert_eq!(doc["sessions_total"].as_array().unwrap().len(), 2, "{body}");
    }

    #[tokio::test]
    async fn only_get_and_head_and_health_is_not_cached() {
        let state = state();
        for path in ["/healthz", "/readyz"] {
            let r = call(router(state.clone()), "GET", path).await;
            assert_eq!(r.headers().get(header::CACHE_CONTROL).unwrap(), "no-store", "{path}");
        }
        for path in ["/metrics", "/api/v1/snapshot"] {
            assert_eq!(call(router(state.clone()), "HEAD", path).await.status(), StatusCode::OK);
            for method in ["POST", "PUT", "DELETE", "PATCH"] {
                let r = call(router(state.clone()), method, path).await;
                assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
                let allow = r.headers().get(header::ALLOW).expect("Allow header").to_str().unwrap().to_string();
                assert!(allow.contains("GET") && allow.contains("HEAD"), "{method} {path}: Allow: {allow}");
            }
        }
    }

    #[tokio::test]
    async fn basic_auth_guards_data_endpoints_not_health() {
        let web = std::env::temp_dir().join(format!("observer-auth-{}.yml", std::process::id()));
        let hash = bcrypt::hash("secret", 4).unwrap();
        std::fs::write(&web, format!("basic_auth_users:\n  alice: '{hash}'\n")).unwrap();
        let auth = web_config::load(&web).unwrap().auth.map(Arc::new);
        std::fs::remove_file(&web).unwrap();
        let metrics = Arc::new(Metrics::new(Vec::new(), &[], crate::metrics::native::HistogramMode::Both).unwrap());
        let state = Arc::new(AppState { metrics, ready: true.into(), pipeline: OnceLock::new(), auth });
        let with = |user_password: &str, path: &str| {
            use base64::Engine as _;
            let value = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_password));
            Request::builder().uri(path).header(header::AUTHORIZATION, value).body(Body::empty()).unwrap()
        };
        for path in ["/metrics", "/api/v1/snapshot"] {
            let r = call(router(state.clone()), "GET", path).await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
            assert_eq!(r.headers().get(header::WWW_AUTHENTICATE).unwrap(), "Basic realm=\"observer\"");
            let r = router(state.clone()).oneshot(with("alice:wrong", path)).await.unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
            let r = router(state.clone()).oneshot(with("alice:secret", path)).await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
        }
        for path in ["/healthz", "/readyz"] {
            assert_eq!(call(router(state.clone()), "GET", path).await.status(), StatusCode::OK, "{path}");
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500() {
        async fn boom() -> &'static str {
            panic!("handler panic (expected in this test)")
        }
        let router = hardened(Router::new().route("/boom", axum::routing::get(boom)));
        assert_eq!(call(router.clone(), "GET", "/boom").await.status(), StatusCode::INTERNAL_SERVER_ERROR);
        // The same router (and, in the server, the connection) still serves.
        assert_eq!(call(router, "GET", "/boom").await.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
