//! The accept loop of an endpoint, and one handler per protocol.
//!
//! Every Servent protocol has its own versioned ALPN (docs/PROTOCOL.md
//! section 2): `servent-leaf/2` between a leaf and its supernode,
//! `servent-mesh/…` between supernodes, `servent-transfer/…` between two
//! leaves. A [`Router`] owns the accept loop of one [`Endpoint`]: each
//! incoming connection goes through the endpoint's [`Gate`] (before any
//! handshake work is done for it), then the handshake, and is then handed to
//! the one [`ProtocolHandler`] registered for the ALPN it negotiated. The
//! handler serves it to its end; the connection's admission slot is held
//! until then.
//!
//! Handlers come and go while the router runs: an elected leaf adds the
//! supernode's handlers on promotion and removes them on step-down.
//! Removing a handler closes nothing: the connections it is serving are its
//! own to close (the supernode role closes its leaves and links itself).
//! A connection whose ALPN no handler serves now is closed with
//! application code 0 and the router's *unserved* reason
//! (`unsupported protocol` unless the node says otherwise: a leaf not
//! holding the supernode role says `not a supernode`, section 4).
//!
//! What it is not: the list of ALPNs the endpoint negotiates is fixed when
//! it is bound (every protocol the node can ever speak there), so that a
//! peer dialling a protocol the node knows but does not serve now gets a
//! close with a reason, not a TLS failure. Nor does the router close the
//! endpoint when it shuts down: the endpoint is its owner's.
//!
//! Modelled on iroh's `Router` and `ProtocolHandler` (`iroh/src/protocol.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, Instrument};

use crate::endpoint::{accept_within, alpn, Endpoint, Peer};
use crate::gate::Gate;

/// The close reason of a connection whose ALPN no handler serves, unless
/// the router was given another ([`RouterBuilder::unserved_reason`]).
pub const UNSUPPORTED_PROTOCOL: &[u8] = b"unsupported protocol";

/// Serves the connections of one protocol (one ALPN).
///
/// Implement it with `async fn`:
///
/// ```
/// use servent_net::{Peer, ProtocolHandler};
///
/// struct Hold;
///
/// impl ProtocolHandler for Hold {
///     async fn accept(&self, peer: Peer) {
///         // Serve `peer.conn` here, until it ends.
///         peer.conn.closed().await;
///     }
/// }
/// ```
pub trait ProtocolHandler: Send + Sync + 'static {
    /// Serves one authenticated connection to its end. The router spawns a
    /// task for each connection, so this may run as long as the connection
    /// does; the connection counts against the gate's slots until it
    /// returns.
    fn accept(&self, peer: Peer) -> impl Future<Output = ()> + Send;

    /// Called once when the router shuts down with this handler still
    /// registered (not when it is removed). Default: nothing.
    fn shutdown(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

impl<P: ProtocolHandler> ProtocolHandler for Arc<P> {
    fn accept(&self, peer: Peer) -> impl Future<Output = ()> + Send {
        P::accept(self, peer)
    }

    fn shutdown(&self) -> impl Future<Output = ()> + Send {
        P::shutdown(self)
    }
}

type BoxFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// [`ProtocolHandler`] made object-safe, so that handlers of different
/// types share one table.
trait DynHandler: Send + Sync + 'static {
    fn accept(&self, peer: Peer) -> BoxFuture<'_>;
    fn shutdown(&self) -> BoxFuture<'_>;
}

impl<P: ProtocolHandler> DynHandler for P {
    fn accept(&self, peer: Peer) -> BoxFuture<'_> {
        Box::pin(ProtocolHandler::accept(self, peer))
    }

    fn shutdown(&self) -> BoxFuture<'_> {
        Box::pin(ProtocolHandler::shutdown(self))
    }
}

/// The handlers registered now, by ALPN.
type Handlers = Arc<Mutex<HashMap<Vec<u8>, Arc<dyn DynHandler>>>>;

/// Sets up a [`Router`]: its handlers at start and its unserved reason.
pub struct RouterBuilder {
    endpoint: Endpoint,
    gate: Arc<Gate>,
    handlers: HashMap<Vec<u8>, Arc<dyn DynHandler>>,
    unserved: Vec<u8>,
}

impl RouterBuilder {
    /// Serves `alpn` with `handler` (replacing any handler given for it
    /// before).
    pub fn accept(mut self, alpn: &[u8], handler: impl ProtocolHandler) -> Self {
        self.handlers.insert(alpn.to_vec(), Arc::new(handler));
        self
    }

    /// The reason a connection is closed with when no handler serves its
    /// ALPN. Default [`UNSUPPORTED_PROTOCOL`].
    pub fn unserved_reason(mut self, reason: &[u8]) -> Self {
        self.unserved = reason.to_vec();
        self
    }

    /// Starts the accept loop, in the current span. Must be called within
    /// a tokio runtime.
    pub fn spawn(self) -> Router {
        let handlers: Handlers = Arc::new(Mutex::new(self.handlers));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(
            accept_loop(
                self.endpoint.clone(),
                self.gate.clone(),
                handlers.clone(),
                Arc::from(self.unserved),
                stopped,
            )
            .in_current_span(),
        );
        Router {
            inner: Arc::new(Inner {
                endpoint: self.endpoint,
                gate: self.gate,
                handlers,
                stop,
                task: Mutex::new(Some(task)),
            }),
        }
    }
}

/// The accept loop of one endpoint, dispatching by ALPN. Clones share one
/// loop; it stops on [`Router::shutdown`], when the endpoint is closed, or
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    gate: Arc<Gate>,
    handlers: Handlers,
    /// Dropped with the last clone, which ends the loop too.
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("id", &self.inner.endpoint.id())
            .field("alpns", &self.alpns())
            .finish_non_exhaustive()
    }
}

impl Router {
    /// A router for `endpoint`, admitting through `gate`, with no handler.
    pub fn builder(endpoint: Endpoint, gate: Arc<Gate>) -> RouterBuilder {
        RouterBuilder {
            endpoint,
            gate,
            handlers: HashMap::new(),
            unserved: UNSUPPORTED_PROTOCOL.to_vec(),
        }
    }

    /// Serves `alpn` with `handler` from now on; true if it replaced
    /// another handler (whose connections go on being served by it).
    pub fn accept(&self, alpn: &[u8], handler: impl ProtocolHandler) -> bool {
        self.table()
            .insert(alpn.to_vec(), Arc::new(handler))
            .is_some()
    }

    /// Stops serving `alpn`: new connections for it are closed with the
    /// unserved reason. Closes nothing, neither the connections its handler
    /// is serving nor any other. True if a handler was registered.
    pub fn remove(&self, alpn: &[u8]) -> bool {
        self.table().remove(alpn).is_some()
    }

    /// Whether a handler serves `alpn` now.
    pub fn serves(&self, alpn: &[u8]) -> bool {
        self.table().contains_key(alpn)
    }

    /// The ALPNs served now, sorted.
    pub fn alpns(&self) -> Vec<Vec<u8>> {
        let mut alpns: Vec<_> = self.table().keys().cloned().collect();
        alpns.sort();
        alpns
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// The gate every incoming connection goes through.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.inner.gate
    }

    /// Stops the accept loop and waits until it has ended, then lets each
    /// handler still registered shut down. Connections already accepted
    /// are left to their handlers, and the endpoint to its owner; incoming
    /// ones wait unanswered until the endpoint is closed.
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let task = self.inner.task.lock().expect("router task").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        let handlers: Vec<_> = self.table().drain().map(|(_, h)| h).collect();
        for handler in handlers {
            handler.shutdown().await;
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Arc<dyn DynHandler>>> {
        self.inner.handlers.lock().expect("router handlers")
    }
}

async fn accept_loop(
    endpoint: Endpoint,
    gate: Arc<Gate>,
    handlers: Handlers,
    unserved: Arc<[u8]>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            // A stop, or the router gone (the sender dropped).
            _ = stop.changed() => return,
            incoming = endpoint.quinn().accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        // Refused or retried attempts cost no task.
        let Some((incoming, ticket)) = gate.admit(incoming) else {
            continue;
        };
        let limit = endpoint.transport().connect_timeout;
        let (handlers, unserved) = (handlers.clone(), unserved.clone());
        tokio::spawn(
            async move {
                // The slot is held until the handler is done.
                let _ticket = ticket;
                let remote = incoming.remote_address();
                let peer = match accept_within(incoming, limit).await {
                    Ok(peer) => peer,
                    Err(e) => {
                        debug!(%remote, error = %e, "handshake failed");
                        return;
                    }
                };
                let negotiated = alpn(&peer.conn);
                let handler = negotiated.as_deref().and_then(|a| {
                    let table = handlers.lock().expect("router handlers");
                    table.get(a).cloned()
                });
                match handler {
                    Some(handler) => handler.accept(peer).await,
                    None => {
                        debug!(
                            peer = %peer.id.short(),
                            %remote,
                            alpn = ?negotiated.as_deref().map(String::from_utf8_lossy),
                            "no handler for this protocol"
                        );
                        peer.conn.close(0u32.into(), &unserved);
                    }
                }
            }
            .in_current_span(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use servent_proto::admit::AdmitConfig;
    use servent_proto::NodeId;
    use tokio::sync::mpsc;

    use super::*;
    use crate::gate::GateConfig;
    use crate::Identity;

    const A: &[u8] = b"test-a/1";
    const B: &[u8] = b"test-b/1";
    const T: Duration = Duration::from_secs(5);

    /// Reports each connection it gets, by its own name, and holds it open
    /// until the peer closes it.
    struct Tell {
        name: &'static str,
        seen: mpsc::UnboundedSender<(&'static str, NodeId)>,
    }

    impl ProtocolHandler for Tell {
        async fn accept(&self, peer: Peer) {
            let _ = self.seen.send((self.name, peer.id));
            peer.conn.closed().await;
        }
    }

    fn gate() -> Arc<Gate> {
        Gate::new(GateConfig {
            admit: AdmitConfig {
                max_connections: 64,
                per_address: 64,
                handshake_rate: 1000.0,
                handshake_burst: 1000,
                handshake_rate_per_address: 1000.0,
                handshake_burst_per_address: 1000,
                retry_above: 64,
                exempt: Vec::new(),
            },
            idle_close: Duration::from_secs(60),
            max_buffered_per_connection: 1 << 20,
            max_buffered: 8 << 20,
            streams: Default::default(),
        })
    }

    /// A server endpoint speaking both test protocols, and a client.
    fn endpoints() -> (Endpoint, Endpoint, SocketAddr) {
        let server = Endpoint::bind(
            Arc::new(Identity::generate().unwrap()),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &[A, B],
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let client = Endpoint::client(Arc::new(Identity::generate().unwrap()), addr).unwrap();
        (server, client, addr)
    }

    fn tell(name: &'static str, seen: &mpsc::UnboundedSender<(&'static str, NodeId)>) -> Tell {
        Tell {
            name,
            seen: seen.clone(),
        }
    }

    /// The reason the server closed `peer` with, once it has.
    async fn close_reason(peer: &Peer) -> Vec<u8> {
        match tokio::time::timeout(T, peer.conn.closed()).await {
            Ok(quinn::ConnectionError::ApplicationClosed(c)) => c.reason.to_vec(),
            other => panic!("not closed by the application: {other:?}"),
        }
    }

    #[tokio::test]
    async fn each_connection_goes_to_the_handler_of_its_alpn() {
        let (server, client, addr) = endpoints();
        let (seen, mut told) = mpsc::unbounded_channel();
        let router = Router::builder(server.clone(), gate())
            .accept(A, tell("a", &seen))
            .accept(B, tell("b", &seen))
            .spawn();
        assert_eq!(router.alpns(), vec![A.to_vec(), B.to_vec()]);

        let a = client.connect(addr, A, Some(server.id())).await.unwrap();
        let got = tokio::time::timeout(T, told.recv()).await.unwrap();
        assert_eq!(got, Some(("a", client.id())));
        let b = client.connect(addr, B, Some(server.id())).await.unwrap();
        let got = tokio::time::timeout(T, told.recv()).await.unwrap();
        assert_eq!(got, Some(("b", client.id())));
        assert!(a.conn.close_reason().is_none() && b.conn.close_reason().is_none());
        assert_eq!(router.gate().open(), 2, "both hold a slot while served");

        router.shutdown().await;
        server.close();
    }

    #[tokio::test]
    async fn a_removed_handlers_alpn_is_refused_and_nothing_else_is_closed() {
        let (server, client, addr) = endpoints();
        let (seen, mut told) = mpsc::unbounded_channel();
        let router = Router::builder(server.clone(), gate())
            .accept(A, tell("a", &seen))
            .accept(B, tell("b", &seen))
            .spawn();
        let a = client.connect(addr, A, None).await.unwrap();
        let b = client.connect(addr, B, None).await.unwrap();
        for _ in 0..2 {
            tokio::time::timeout(T, told.recv()).await.unwrap();
        }

        assert!(router.remove(B));
        assert!(!router.remove(B), "already gone");
        assert!(!router.serves(B) && router.serves(A));
        let refused = client.connect(addr, B, None).await.unwrap();
        assert_eq!(close_reason(&refused).await, UNSUPPORTED_PROTOCOL);

        // Neither the removed handler's connection nor the other's closed.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            a.conn.close_reason().is_none(),
            "{:?}",
            a.conn.close_reason()
        );
        assert!(
            b.conn.close_reason().is_none(),
            "{:?}",
            b.conn.close_reason()
        );
        // And A is still served.
        let _a2 = client.connect(addr, A, None).await.unwrap();
        let got = tokio::time::timeout(T, told.recv()).await.unwrap();
        assert_eq!(got, Some(("a", client.id())));
        assert!(
            told.try_recv().is_err(),
            "the refused one reached no handler"
        );

        router.shutdown().await;
        server.close();
    }

    #[tokio::test]
    async fn a_handler_added_after_start_is_served_and_the_reason_is_the_nodes() {
        let (server, client, addr) = endpoints();
        let (seen, mut told) = mpsc::unbounded_channel();
        let router = Router::builder(server.clone(), gate())
            .accept(A, tell("a", &seen))
            .unserved_reason(b"not a supernode")
            .spawn();
        let early = client.connect(addr, B, None).await.unwrap();
        assert_eq!(close_reason(&early).await, b"not a supernode");

        assert!(!router.accept(B, tell("b", &seen)), "nothing replaced");
        let _b = client.connect(addr, B, None).await.unwrap();
        let got = tokio::time::timeout(T, told.recv()).await.unwrap();
        assert_eq!(got, Some(("b", client.id())));
        assert!(router.accept(B, tell("b2", &seen)), "replaced");
        let _b2 = client.connect(addr, B, None).await.unwrap();
        let got = tokio::time::timeout(T, told.recv()).await.unwrap();
        assert_eq!(got, Some(("b2", client.id())));

        router.shutdown().await;
        server.close();
    }

    #[tokio::test]
    async fn shutdown_stops_the_loop_and_tells_the_handlers() {
        struct Stopped(mpsc::UnboundedSender<()>);
        impl ProtocolHandler for Stopped {
            async fn accept(&self, _peer: Peer) {}
            async fn shutdown(&self) {
                let _ = self.0.send(());
            }
        }
        let (server, client, addr) = endpoints();
        let (stopped, mut told) = mpsc::unbounded_channel();
        let router = Router::builder(server.clone(), gate())
            .accept(A, Stopped(stopped))
            .spawn();
        let clone = router.clone();
        router.shutdown().await;
        assert_eq!(told.try_recv(), Ok(()), "the handler was told");
        assert!(clone.alpns().is_empty());
        // Nothing answers any more: the handshake is never accepted.
        let late = tokio::time::timeout(Duration::from_millis(500), client.connect(addr, A, None));
        assert!(late.await.is_err(), "no handshake after shutdown");
        assert!(server.local_addr().is_ok(), "the endpoint is the owner's");
        server.close();
    }
}
