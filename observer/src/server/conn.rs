//! The metrics server's accept loop, hardened for a node agent that must not
//! be knocked over by a misbehaving client: connection slots shared fairly
//! between clients with a reserve for health probes ([`crate::server::slots`]),
//! a deadline for a request's head counted from the accept (TLS handshake
//! included), a deadline for writing a response, an idle timeout between
//! requests and a small header size limit. `axum::serve` exposes none of
//! these, so connections are driven by hyper's HTTP/1 server directly.
use std::{
    io,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{Router, body::Body};
use hyper::{Request, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpListener,
    sync::Notify,
    task::JoinSet,
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::server::slots::{Admitted, ConnState, Slots};

/// A request's head must be complete this long after the connection was
/// accepted (TLS handshake included), or, on a kept-alive connection, after
/// the next request's first byte. A silent or slow-headers client is cut off
/// then.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A response must be written this long after it is ready: a client that
/// does not read it is cut off then. Prometheus' default scrape timeout.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// A keep-alive connection with no request for this long is closed. Longer
/// than any usual scrape interval (Prometheus keeps its connection open
/// between scrapes, and every reconnection is a TCP session the observer
/// would itself report).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Request line plus headers; a scrape needs a few hundred bytes. Larger
/// requests are answered 431. (8 KiB is also hyper's smallest read buffer.)
pub const MAX_HEADER_BYTES: usize = 8 * 1024;
/// How often a connection's deadlines are checked, and the accept loop
/// looks again for a slot when all are held.
const CHECK_PERIOD: Duration = Duration::from_millis(250);

/// The slots, and a signal each time one is given back.
#[derive(Default)]
pub struct Server {
    slots: Mutex<Slots>,
    released: Notify,
}

impl Server {
    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// On every request of a connection admitted to the health reserve (a
/// request extension): the data endpoints call [`HealthOnly::promote`].
#[derive(Clone)]
pub struct HealthOnly {
    server: Arc<Server>,
    id: u64,
}

impl HealthOnly {
    /// Waits up to `wait` for a data slot for this connection; false if none
    /// came (answer 503 and close).
    pub async fn promote(&self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if self.server.slots().promote(self.id, Instant::now()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            let next = deadline.min(tokio::time::Instant::now() + CHECK_PERIOD);
            let _ = tokio::time::timeout_at(next, self.server.released.notified()).await;
        }
    }
}

/// Serves `app` on `listener`, over TLS when `tls` is given, until the task
/// is cancelled (dropping it drops every connection), or returns an error if
/// accepting fails for good.
pub async fn serve(listener: TcpListener, app: Router, tls: Option<TlsAcceptor>) -> io::Result<()> {
    let server = Arc::new(Server::default());
    let mut http = hyper::server::conn::http1::Builder::new();
    // hyper's header timer starts as soon as it waits for a request, so on a
    // keep-alive connection it is the idle timeout; the per-request header
    // deadline is enforced by the connection's task below.
    http.timer(TokioTimer::new()).header_read_timeout(IDLE_TIMEOUT).max_buf_size(MAX_HEADER_BYTES);
    let mut connections = JoinSet::new();
    loop {
        // Reap finished connection tasks so the set stays as small as the
        // number of live connections.
        while connections.try_join_next().is_some() {}
        // Every slot held by a connection that cannot be closed yet: leave
        // newcomers in the listen backlog until one can.
        while server.slots().stuck(Instant::now()) {
            let _ = tokio::time::timeout(CHECK_PERIOD, server.released.notified()).await;
        }
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Out of descriptors or a connection reset before accept:
            // transient, so pause briefly instead of spinning or exiting.
            Err(e) => {
                tracing::warn!(error = %e, "metrics server: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let conn = Arc::new(ConnState::new(Instant::now()));
        let Some(Admitted { id, health_only }) = server.slots().admit(peer.ip(), conn.clone(), Instant::now()) else {
            tracing::debug!(%peer, "metrics server: every slot held; closing the connection");
            continue;
        };
        let health_only = health_only.then(|| HealthOnly { server: server.clone(), id });
        let (http, app, tls, server) = (http.clone(), app.clone(), tls.clone(), server.clone());
        connections.spawn(async move {
            let served = async {
                match tls {
                    None => serve_connection(http, stream, app, &conn, health_only).await,
                    // The handshake runs in the connection's task, so a slow
                    // one holds no one else up; it counts against the head's
                    // deadline. A plain-HTTP client fails it and is disconnected.
                    Some(tls) => match tokio::time::timeout(HEADER_READ_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => serve_connection(http, stream, app, &conn, health_only).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "metrics server: TLS handshake failed"),
                        Err(_) => tracing::debug!("metrics server: TLS handshake too slow; closing the connection"),
                    },
                }
            };
            tokio::select! {
                () = served => {}
                () = conn.evicted() => {}
            }
            server.slots().release(id);
            server.released.notify_waiters();
        });
    }
}

async fn serve_connection<S>(
    http: hyper::server::conn::http1::Builder,
    stream: S,
    app: Router,
    conn: &Arc<ConnState>,
    health_only: Option<HealthOnly>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(Tracked { inner: stream, conn: conn.clone() });
    let service = {
        let conn = conn.clone();
        service_fn(move |request: Request<Incoming>| {
            // Headers are parsed once the service is called.
            conn.head_parsed();
            let mut request = request.map(Body::new);
            if let Some(health_only) = &health_only {
                request.extensions_mut().insert(health_only.clone());
            }
            let (app, conn) = (app.clone(), conn.clone());
            async move {
                let response = app.oneshot(request).await;
                conn.responded(Instant::now());
                response
            }
        })
    };
    let served = http.serve_connection(io, service);
    tokio::pin!(served);
    let mut tick = tokio::time::interval(CHECK_PERIOD);
    loop {
        tokio::select! {
            result = served.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "metrics server: connection ended with an error");
                }
                return;
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if conn.head_overdue(HEADER_READ_TIMEOUT, now) {
                    tracing::debug!("metrics server: request head too slow; closing the connection");
                    return;
                }
                if conn.write_overdue(WRITE_TIMEOUT, now) {
                    tracing::debug!("metrics server: response not read in time; closing the connection");
                    return;
                }
            }
        }
    }
}

/// The connection's stream (TCP or TLS), telling the connection's state
/// when request bytes arrive and when writes wait for the client.
struct Tracked<S> {
    inner: S,
    conn: Arc<ConnState>,
}

impl<S> Tracked<S> {
    fn wrote<T>(&self, result: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        self.conn.write_blocked(result.is_pending(), Instant::now());
        result
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.conn.bytes_read(Instant::now());
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(result)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.inner).poll_flush(cx);
        self.wrote(result)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(result)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
