//! The operator's HTTP endpoint (`--http ADDR`): `GET /status`, a JSON
//! document, and `GET /metrics`, the Prometheus text format (0.0.4). Both
//! binaries serve it; what they show comes from a [`Report`] (the
//! supernode's is in `supernode::status`, the leaf's in `leaf::status`):
//! this module is the server only, and knows nothing of either node.
//!
//! `/status` and `/metrics` are not an API: no other path, no method but
//! GET (and HEAD), no request body is read, no TLS. The same server also
//! serves the leaf's control API ([`HttpServer::serve`] with its own
//! routes, in `leaf::api`). It may still face a hostile network, so
//! connections are bounded in number ([`MAX_CONNECTIONS`]; more wait in
//! the kernel's backlog) and in lifetime ([`CONNECTION_LIFETIME`]), which
//! also bounds how long a client may take to send its request
//! ([`HttpConfig`] holds both).

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::State as Shared;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::{prometheus_text, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info, Instrument};

/// Connections served at once. A scraper and a person or two need far fewer.
pub const MAX_CONNECTIONS: usize = 32;
/// A connection is closed this long after it was accepted, whatever it is
/// doing: enough for many keep-alive scrapes, and a client that dribbles
/// its request holds a slot no longer than this.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Longest wait for answers in progress when the server stops.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The bounds of an [`HttpServer`]. Every field defaults to the constant
/// of the same name in this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Connections served at once. Default [`MAX_CONNECTIONS`], 32.
    pub max_connections: usize,
    /// How long after it was accepted a connection is closed. Default
    /// [`CONNECTION_LIFETIME`], 60 s.
    pub connection_lifetime: Duration,
    /// Longest wait for answers in progress on shutdown. Default
    /// [`SHUTDOWN_GRACE`], 2 s.
    pub shutdown_grace: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            connection_lifetime: CONNECTION_LIFETIME,
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

/// What a node shows on its HTTP endpoint.
pub trait Report: Send + Sync + 'static {
    /// The `/status` document.
    type Status: Serialize;

    /// The node's status now.
    fn status(&self) -> Self::Status;

    /// What `/metrics` encodes.
    fn registry(&self) -> &Registry;
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    // The io error is the `source`, so it is not repeated in the message
    // (the binaries print the whole chain).
    #[error("cannot serve HTTP on {addr}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// A running HTTP endpoint. Dropping it stops it at once; [`HttpServer::shutdown`]
/// lets answers in progress finish first.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    shutdown_grace: Duration,
}

impl HttpServer {
    /// Binds `addr` and serves `report` until stopped, with the default
    /// [`HttpConfig`].
    pub async fn bind<R: Report>(addr: SocketAddr, report: Arc<R>) -> Result<Self, HttpError> {
        Self::bind_with(addr, report, HttpConfig::default()).await
    }

    /// Like [`HttpServer::bind`], within the given bounds.
    pub async fn bind_with<R: Report>(
        addr: SocketAddr,
        report: Arc<R>,
        config: HttpConfig,
    ) -> Result<Self, HttpError> {
        let app = Router::new()
            .route("/status", get(status::<R>))
            .route("/metrics", get(metrics::<R>))
            .with_state(report);
        Self::serve(addr, app, config).await
    }

    /// Binds `addr` and serves `app` until stopped, within `config`'s
    /// bounds: the server of `/status` and `/metrics`, and of the leaf's
    /// control API (its own routes and checks, the same bounds on
    /// connections).
    pub async fn serve(
        addr: SocketAddr,
        app: Router,
        config: HttpConfig,
    ) -> Result<Self, HttpError> {
        let bind_error = |source| HttpError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
        let bound = listener.local_addr().map_err(bind_error)?;
        let listener = Limited {
            inner: listener,
            slots: Arc::new(Semaphore::new(config.max_connections)),
            lifetime: config.connection_lifetime,
        };
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(
            async move {
                info!(addr = %bound, "http listening");
                let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                    let _ = stopped.wait_for(|s| *s).await;
                });
                // Infallible: accept errors are retried by the listener.
                let _ = serve.await;
            }
            .in_current_span(),
        );
        Ok(Self {
            addr: bound,
            stop,
            task: Some(task),
            shutdown_grace: config.shutdown_grace,
        })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets answers in progress finish (briefly), and
    /// closes every connection.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(self.shutdown_grace, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn status<R: Report>(Shared(report): Shared<Arc<R>>) -> Json<R::Status> {
    Json(report.status())
}

async fn metrics<R: Report>(Shared(report): Shared<Arc<R>>) -> Response {
    let mut body = String::new();
    match prometheus_text::encode(&mut body, report.registry()) {
        Ok(()) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            body,
        )
            .into_response(),
        Err(fmt::Error) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// A metric read from the node each time it is scraped, for what is a
/// state rather than an event: leaves now, files now, bytes so far.
pub struct Sampled {
    kind: MetricType,
    read: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl Sampled {
    /// A value that goes up and down.
    pub fn gauge(read: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self {
            kind: MetricType::Gauge,
            read: Box::new(read),
        }
    }

    /// A total that only grows (registered without `_total`: it is added).
    pub fn counter(read: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        Self {
            kind: MetricType::Counter,
            read: Box::new(read),
        }
    }
}

impl fmt::Debug for Sampled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampled")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl EncodeMetric for Sampled {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), fmt::Error> {
        let value = (self.read)();
        match self.kind {
            MetricType::Counter => encoder.encode_counter::<NoLabelSet, _, u64>(&value, None),
            _ => encoder.encode_gauge(&value),
        }
    }

    fn metric_type(&self) -> MetricType {
        self.kind
    }
}

/// A TCP listener that serves at most `max_connections` at once, each
/// for at most `connection_lifetime`.
struct Limited {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    lifetime: Duration,
}

impl axum::serve::Listener for Limited {
    type Io = Bounded;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Bounded, SocketAddr) {
        // While every slot is taken, connections wait in the backlog.
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        loop {
            match self.inner.accept().await {
                Ok((io, remote)) => {
                    let _ = io.set_nodelay(true);
                    let deadline = Box::pin(tokio::time::sleep(self.lifetime));
                    return (
                        Bounded {
                            io,
                            deadline,
                            _slot: slot,
                        },
                        remote,
                    );
                }
                Err(e) => {
                    // Out of file descriptors, or a connection reset while
                    // queued: neither is fatal, but do not spin on it.
                    debug!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection that fails once its lifetime is over.
struct Bounded {
    io: TcpStream,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Bounded {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready()
    }
}

fn expired_error() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "http connection lifetime over")
}

impl AsyncRead for Bounded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Bounded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(expired_error()));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fixed {
        registry: Registry,
    }

    impl Report for Fixed {
        type Status = serde_json::Value;
        fn status(&self) -> serde_json::Value {
            serde_json::json!({"role": "test", "n": 7})
        }
        fn registry(&self) -> &Registry {
            &self.registry
        }
    }

    fn fixed() -> Arc<Fixed> {
        let mut registry = Registry::default();
        registry.register("servent_things", "Things now", Sampled::gauge(|| 3));
        registry.register("servent_events", "Events so far", Sampled::counter(|| 9));
        Arc::new(Fixed { registry })
    }

    /// One request on its own connection: (status code, headers, body).
    async fn request(addr: SocketAddr, head: &str) -> (u16, String, String) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
            .await
            .expect("answer in time")
            .unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (headers, body) = raw.split_once("\r\n\r\n").expect("a header block");
        let code = headers.split(' ').nth(1).unwrap().parse().unwrap();
        (code, headers.to_ascii_lowercase(), body.to_string())
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    }

    #[tokio::test]
    async fn serves_status_and_metrics_and_nothing_else() {
        let server = HttpServer::bind(([127, 0, 0, 1], 0).into(), fixed())
            .await
            .unwrap();
        let addr = server.addr();
        assert_ne!(addr.port(), 0);

        let (code, headers, body) = request(addr, &get("/status")).await;
        assert_eq!(code, 200);
        assert!(
            headers.contains("content-type: application/json"),
            "{headers}"
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v, serde_json::json!({"role": "test", "n": 7}));

        let (code, headers, body) = request(addr, &get("/metrics")).await;
        assert_eq!(code, 200);
        assert!(
            headers.contains("content-type: text/plain; version=0.0.4"),
            "{headers}"
        );
        assert!(body.contains("# TYPE servent_things gauge\n"), "{body}");
        assert!(body.contains("\nservent_things 3\n"), "{body}");
        assert!(
            body.contains("# TYPE servent_events_total counter\n"),
            "{body}"
        );
        assert!(body.contains("\nservent_events_total 9\n"), "{body}");

        assert_eq!(request(addr, &get("/")).await.0, 404);
        assert_eq!(request(addr, &get("/status/../etc")).await.0, 404);
        let post =
            "POST /status HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}";
        assert_eq!(request(addr, post).await.0, 405);
        let (code, _, _) = request(addr, "garbage\r\n\r\n").await;
        assert_eq!(code, 400);

        server.shutdown().await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "nothing listens after shutdown"
        );
    }

    #[tokio::test]
    async fn an_address_in_use_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let e = HttpServer::bind(addr, fixed()).await.unwrap_err();
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        assert_eq!(
            std::error::Error::source(&e)
                .and_then(|s| s.downcast_ref::<io::Error>())
                .map(io::Error::kind),
            Some(io::ErrorKind::AddrInUse)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_when_its_lifetime_is_over() {
        let server = HttpServer::bind(([127, 0, 0, 1], 0).into(), fixed())
            .await
            .unwrap();
        let mut s = TcpStream::connect(server.addr()).await.unwrap();
        // Half a request, then nothing: the server must not wait forever.
        s.write_all(b"GET /sta").await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(CONNECTION_LIFETIME * 2, s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the connection was closed");
    }
}
