//! The metrics server's accept loop, hardened for a node agent that must not
//! be knocked over by a misbehaving client: a bound on concurrent
//! connections, a deadline for a request's headers (and for the TLS
//! handshake), an idle timeout between requests and a small header size
//! limit. `axum::serve` exposes none of these, so connections are driven by
//! hyper's HTTP/1 server directly.
use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{Router, body::Body};
use hyper::{Request, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::Semaphore,
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

/// A request's headers must be complete this long after their first byte;
/// a slow-headers client (one byte a second) is cut off then.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection with no request for this long is closed. Longer
/// than any usual scrape interval (Prometheus keeps its connection open
/// between scrapes, and every reconnection is a TCP session the observer
/// would itself report).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Request line plus headers; a scrape needs a few hundred bytes. Larger
/// requests are answered 431. (8 KiB is also hyper's smallest read buffer.)
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Connections served at once; further ones wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// How often a connection's header deadline is checked.
const CHECK_PERIOD: Duration = Duration::from_millis(250);

/// Serves `app` on `listener`, over TLS when `tls` is given, until the task
/// is cancelled (dropping it drops every connection), or returns an error if
/// accepting fails for good.
pub async fn serve(listener: TcpListener, app: Router, tls: Option<TlsAcceptor>) -> io::Result<()> {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper's header timer starts as soon as it waits for a request, so on a
    // keep-alive connection it is the idle timeout; the per-request header
    // deadline is enforced by `Clock` below.
    http.timer(TokioTimer::new()).header_read_timeout(IDLE_TIMEOUT).max_buf_size(MAX_HEADER_BYTES);
    let mut connections = JoinSet::new();
    loop {
        // Reap finished connection tasks so the set stays as small as the
        // number of live connections.
        while connections.try_join_next().is_some() {}
        let permit = limit.clone().acquire_owned().await.map_err(io::Error::other)?;
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors or a connection reset before accept:
            // transient, so pause briefly instead of spinning or exiting.
            Err(e) => {
                tracing::warn!(error = %e, "metrics server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let http = http.clone();
        let app = app.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            match tls {
                None => serve_connection(http, stream, app).await,
                // The handshake runs in the connection's task, so a slow one
                // holds no one else up; it gets the headers' deadline. A
                // plain-HTTP client fails it and is disconnected.
                Some(tls) => match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(stream)) => serve_connection(http, stream, app).await,
                    Ok(Err(e)) => tracing::debug!(error = %e, "metrics server: TLS handshake failed"),
                    Err(_) => tracing::debug!("metrics server: TLS handshake too slow; closing the connection"),
                },
            }
            drop(permit);
        });
    }
}

async fn serve_connection<S>(http: hyper::server::conn::http1::Builder, stream: S, app: Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let clock = Arc::new(Clock::new());
    let io = TokioIo::new(Tracked { inner: stream, clock: clock.clone() });
    let service = {
        let clock = clock.clone();
        service_fn(move |request: Request<Incoming>| {
            // Headers are parsed once the service is called.
            clock.headers_done();
            app.clone().oneshot(request.map(Body::new))
        })
    };
    let conn = http.serve_connection(io, service);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(CHECK_PERIOD);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "metrics server: connection ended with an error");
                }
                return;
            }
            _ = tick.tick() => {
                if clock.headers_overdue(HEADER_READ_TIMEOUT) {
                    tracing::debug!("metrics server: request headers too slow; closing the connection");
                    return;
                }
            }
        }
    }
}

/// When the current request's first byte arrived, in milliseconds since the
/// connection opened (0: no request in progress).
struct Clock {
    opened: Instant,
    request_started_ms: AtomicU64,
}

impl Clock {
    fn new() -> Self {
        Clock { opened: Instant::now(), request_started_ms: AtomicU64::new(0) }
    }

    fn now_ms(&self) -> u64 {
        // +1 so that a byte in the first millisecond is not read as "none".
        self.opened.elapsed().as_millis() as u64 + 1
    }

    fn bytes_read(&self) {
        let _ = self.request_started_ms.compare_exchange(0, self.now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    fn headers_done(&self) {
        self.request_started_ms.store(0, Ordering::Relaxed);
    }

    fn headers_overdue(&self, limit: Duration) -> bool {
        let started = self.request_started_ms.load(Ordering::Relaxed);
        started != 0 && self.now_ms().saturating_sub(started) > limit.as_millis() as u64
    }
}

/// The connection's stream (TCP or TLS), telling the clock when request
/// bytes arrive.
struct Tracked<S> {
    inner: S,
    clock: Arc<Clock>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.bytes_read();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_deadline_runs_from_first_byte_to_parsed_headers() {
        let clock = Clock::new();
        assert!(!clock.headers_overdue(Duration::ZERO), "no request yet");
        clock.bytes_read();
        std::thread::sleep(Duration::from_millis(5));
        assert!(clock.headers_overdue(Duration::from_millis(1)));
        assert!(!clock.headers_overdue(Duration::from_secs(10)));
        clock.headers_done();
        assert!(!clock.headers_overdue(Duration::ZERO), "request parsed");
    }
}
