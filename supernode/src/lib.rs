//! The Servent supernode: it accepts leaf connections (ALPN
//! `servent-leaf/2`), indexes the files each leaf registers, and answers
//! keyword and hash queries with hits whose sources are dialable addresses
//! it observed itself. Transfers never pass through it.
//!
//! Module map: [`net`] identity and QUIC transport (shared with the leaf),
//! [`owner`] the one task that owns the leases, the mesh membership and the
//! election, [`index`] the concurrent file index, [`session`] one leaf's
//! connection, [`mesh`] links to other supernodes, [`election`] carrying
//! out the election's actions, [`routing`] answering and forwarding
//! queries, [`metrics`] counters, [`status`] and [`http`] what `--http`
//! serves, [`probe`] the health check of the container images, [`config`]
//! configuration.

pub mod config;
pub mod election;
pub mod gate;
pub mod http;
pub mod index;
pub mod mesh;
pub mod metrics;
pub mod net;
pub mod owner;
pub mod probe;
pub mod routing;
pub mod session;
pub mod status;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use servent_proto::hop::HopNode;
use servent_proto::msg::{ALPN_LEAF, ALPN_MESH};
use servent_proto::NodeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, info_span, warn, Instrument};

pub use config::Config;
use index::Index;
use metrics::Metrics;
use net::{Endpoint, EndpointError, Identity, IdentityError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot read the bound address: {0}")]
    LocalAddr(std::io::Error),
    #[error(transparent)]
    Http(#[from] http::HttpError),
}

/// State shared by every connection of one supernode.
///
/// The long-lived decision state (leases, mesh membership, election) is
/// not here but in the task [`owner::run`], which these methods talk to;
/// what is here is either fixed (id, config), counters, or read by every
/// query and guarded by a short lock of its own (the index, the per-query
/// routing state, the leaves' query limits).
pub struct State {
    pub id: NodeId,
    pub config: Config,
    index: Index,
    pub metrics: Metrics,
    query_limits: session::QueryLimits,
    /// What every query at this node shares: the seen-set, each
    /// neighbour's query bucket and the fair forwarder.
    hop: Mutex<HopNode<NodeId>>,
    /// The owner's command queue and snapshot.
    owner: owner::Client,
    /// The owner's state, until [`owner::run`] takes it.
    core: Mutex<Option<owner::Owner>>,
    /// This supernode was a leaf once, and may step down.
    elected: bool,
    /// Set when it has stepped down: its owner stops the role.
    stepped_down: watch::Sender<bool>,
    /// Leaves that accepted a promotion from this supernode.
    promotions: AtomicU64,
    endpoint: OnceLock<Endpoint>,
    /// Admits connections of every kind, registered or not, and bounds
    /// what they may hold.
    pub gate: Arc<gate::Gate>,
}

impl State {
    pub fn new(id: NodeId, config: Config, elected: bool) -> Self {
        let gate = gate::Gate::new(&config);
        let index_limits = index::IndexLimits {
            files_per_leaf: config.max_files_per_leaf,
            entries: config.max_index_entries,
            entries_per_ip: config.max_index_entries_per_ip,
            exempt: config.exempt_ips.clone(),
        };
        let query_limits = session::QueryLimits::new(
            config.query_rate,
            config.query_burst,
            config.exempt_ips.clone(),
        );
        let hop = HopNode::new(config.hop, config.mesh_query_rate, config.mesh_query_burst);
        let (core, client) = owner::new(id, &config, elected, owner::node_rng());
        Self {
            id,
            config,
            index: Index::new(index_limits),
            metrics: Metrics::default(),
            query_limits,
            hop: Mutex::new(hop),
            owner: client,
            core: Mutex::new(Some(core)),
            elected,
            stepped_down: watch::channel(false).0,
            promotions: AtomicU64::new(0),
            endpoint: OnceLock::new(),
            gate,
        }
    }

    /// The endpoint this supernode dials from (set once it is bound).
    pub fn endpoint(&self) -> Option<&Endpoint> {
        self.endpoint.get()
    }

    /// The file index of this supernode's leaves.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The per-query routing state, locked: hold it only for a call.
    pub(crate) fn hop(&self) -> MutexGuard<'_, HopNode<NodeId>> {
        self.hop.lock().expect("hop lock")
    }

    fn take_owner(&self) -> Option<owner::Owner> {
        self.core.lock().expect("owner lock").take()
    }

    /// Whether this supernode was a leaf once, and may step down.
    pub fn is_elected(&self) -> bool {
        self.elected
    }

    /// Becomes true when the election core has stepped down: whoever holds
    /// the role then stops it.
    pub fn stepped_down(&self) -> watch::Receiver<bool> {
        self.stepped_down.subscribe()
    }

    /// Leaves that accepted a promotion from this supernode.
    pub fn promotions(&self) -> u64 {
        self.promotions.load(Ordering::Relaxed)
    }

    /// Handles one incoming connection to the end, whatever its ALPN.
    pub async fn handle_incoming(self: Arc<Self>, incoming: quinn::Incoming) {
        let Some((incoming, _ticket)) = self.gate.admit(incoming) else {
            return;
        };
        let remote = incoming.remote_address();
        let peer = match net::accept(incoming).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "handshake failed");
                return;
            }
        };
        self.serve_peer(peer).await;
    }

    /// Serves an accepted connection by its ALPN (an embedding node that
    /// accepts connections itself hands the supernode's ones over here).
    pub async fn serve_peer(self: Arc<Self>, peer: net::Peer) {
        let remote = peer.conn.remote_address();
        let _traffic = self.metrics.traffic.track(&peer.conn);
        let span = info_span!("conn", peer = %peer.id.short(), %remote);
        match net::alpn(&peer.conn).as_deref() {
            Some(ALPN_LEAF) => session::serve(self, peer).instrument(span).await,
            Some(ALPN_MESH) => {
                let span = info_span!("mesh", peer = %peer.id.short(), %remote);
                mesh::serve(self, peer).instrument(span).await
            }
            other => {
                warn!(parent: &span, alpn = ?other.map(String::from_utf8_lossy), "unexpected protocol");
                peer.conn.close(0u32.into(), b"unsupported protocol");
            }
        }
    }
}

/// A running supernode. Dropping it shuts it down.
pub struct Supernode {
    state: Arc<State>,
    endpoint: Endpoint,
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    /// False when embedded in a leaf: the endpoint is the leaf's to close.
    owns_endpoint: bool,
    /// `/status` and `/metrics`, when `config.http` asks for them (an
    /// embedded role has none: the leaf's endpoint shows it).
    http: Option<http::HttpServer>,
}

impl Supernode {
    /// Binds, loads or creates the identity, and starts accepting leaves.
    pub async fn spawn(config: Config) -> Result<Self, StartError> {
        Self::spawn_inner(config, None).await
    }

    /// Like [`Supernode::spawn`], on a UDP socket the caller provides (tests
    /// use one that can be made to go silent, to kill a node without goodbye).
    pub async fn spawn_on_socket(
        config: Config,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
    ) -> Result<Self, StartError> {
        Self::spawn_inner(config, Some(socket)).await
    }

    async fn spawn_inner(
        config: Config,
        socket: Option<Arc<dyn quinn::AsyncUdpSocket>>,
    ) -> Result<Self, StartError> {
        let identity = match &config.data_dir {
            Some(dir) => Identity::load_or_create(dir)?,
            None => Identity::generate()?,
        };
        let identity = Arc::new(identity);
        let alpns: &[&[u8]] = &[ALPN_LEAF, ALPN_MESH];
        let endpoint = match socket {
            Some(socket) => Endpoint::bind_socket(identity.clone(), socket, alpns)?,
            None => Endpoint::bind(identity.clone(), config.listen, alpns)?,
        };
        let addr = endpoint.local_addr().map_err(StartError::LocalAddr)?;
        let state = Arc::new(State::new(identity.id(), config, false));
        let _ = state.endpoint.set(endpoint.clone());
        let (shutdown, mut stop) = watch::channel(false);
        let span = info_span!("supernode", id = %identity.id().short());
        let http = match state.config.http {
            Some(at) => {
                let report = status::SupernodeReport::new(state.clone(), addr);
                match http::HttpServer::bind(at, Arc::new(report))
                    .instrument(span.clone())
                    .await
                {
                    Ok(server) => Some(server),
                    Err(e) => {
                        endpoint.close();
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        let task = tokio::spawn({
            let endpoint = endpoint.clone();
            let state = state.clone();
            async move {
                info!(%addr, "listening");
                tokio::spawn(
                    owner::run(state.clone(), addr.port(), stop.clone()).in_current_span(),
                );
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        incoming = endpoint.quinn().accept() => {
                            let Some(incoming) = incoming else { break };
                            tokio::spawn(state.clone().handle_incoming(incoming).in_current_span());
                        }
                    }
                }
                endpoint.close();
                info!("stopped");
            }
            .instrument(span)
        });
        Ok(Self {
            state,
            endpoint,
            addr,
            shutdown,
            task: Some(task),
            owns_endpoint: true,
            http,
        })
    }

    /// The supernode role of an elected leaf, on the leaf's own endpoint:
    /// it meshes and elects, while the leaf keeps accepting connections and
    /// hands the supernode's ones to [`State::serve_peer`].
    pub fn embedded(config: Config, endpoint: Endpoint) -> Result<Self, StartError> {
        let addr = endpoint.local_addr().map_err(StartError::LocalAddr)?;
        let state = Arc::new(State::new(endpoint.id(), config, true));
        let _ = state.endpoint.set(endpoint.clone());
        let (shutdown, stop) = watch::channel(false);
        let span = info_span!("supernode", id = %endpoint.id().short());
        info!(parent: &span, %addr, "supernode role started");
        tokio::spawn(owner::run(state.clone(), addr.port(), stop).instrument(span));
        Ok(Self {
            state,
            endpoint,
            addr,
            shutdown,
            task: None,
            owns_endpoint: false,
            http: None,
        })
    }

    /// Ends the role: stops its tasks, whose owner closes its leaf and
    /// mesh connections, leaving the endpoint to its owner.
    pub fn stop_role(&self) {
        let _ = self.shutdown.send(true);
    }

    pub fn id(&self) -> NodeId {
        self.state.id
    }

    /// The bound UDP address (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound HTTP address of `/status` and `/metrics`, if served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(http::HttpServer::addr)
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }

    /// Leaves registered now.
    pub fn leaf_count(&self) -> usize {
        self.state.leaf_count()
    }

    /// Distinct files indexed now.
    pub fn file_count(&self) -> usize {
        self.state.index().file_count()
    }

    /// Ids of the mesh neighbours linked now.
    pub fn neighbours(&self) -> Vec<NodeId> {
        self.state
            .neighbours()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    pub fn metrics(&self) -> &metrics::Metrics {
        &self.state.metrics
    }

    /// Closes every connection and waits until the accept loop has ended.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(http) = self.http.take() {
            http.shutdown().await;
        }
        self.endpoint.close();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.endpoint.quinn().wait_idle().await;
    }

    /// Waits for ctrl-c or SIGTERM, then shuts down.
    pub async fn run_until(self, signal: ShutdownSignal) {
        signal.wait().await;
        self.shutdown().await;
    }
}

impl Drop for Supernode {
    fn drop(&mut self) {
        if self.owns_endpoint {
            let _ = self.shutdown.send(true);
            self.endpoint.close();
        } else {
            self.stop_role();
        }
    }
}

/// SIGINT and SIGTERM, caught from the moment this is created: create it
/// before announcing that the node is up, so that a signal sent right after
/// the announcement shuts the node down cleanly instead of killing it.
pub struct ShutdownSignal {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignal {
    pub fn register() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            Self {}
        }
    }

    /// Resolves on the first SIGINT or SIGTERM (ctrl-c elsewhere).
    pub async fn wait(self) {
        #[cfg(unix)]
        {
            let (mut term, mut int) = (self.term, self.int);
            let term = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let int = async {
                match int.as_mut() {
                    Some(i) => {
                        i.recv().await;
                    }
                    None => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            };
            tokio::select! {
                _ = term => {}
                _ = int => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (else `default_filter`), in
/// colour only on a terminal. For the binaries.
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .init();
}

/// The one-line `error: ...` text of an error and its causes, leaving out
/// a cause whose text the line already holds (our messages often quote it).
pub fn error_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line.replace('\n', " ")
}
