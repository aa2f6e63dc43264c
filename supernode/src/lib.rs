//! The Servent supernode: it accepts leaf connections (ALPN
//! `servent-leaf/2`), indexes the files each leaf registers, and answers
//! keyword and hash queries with hits whose sources are dialable addresses
//! it observed itself. Transfers never pass through it.
//!
//! Module map: [`owner`] the one task that owns the leases, the mesh
//! membership and the election, [`index`] the concurrent file index, [`session`] one leaf's
//! connection, [`mesh`] links to other supernodes, [`routing`] answering
//! and forwarding queries, [`election`] carrying out the election's actions,
//! [`metrics`] counters, [`status`] what `--http` serves, [`probe`] the
//! health check of the container images, [`config`] configuration;
//! [`Role`] the supernode on an endpoint (its protocol handlers and
//! tasks), [`Supernode`] a standalone one (its own endpoint, router and
//! HTTP server).
//!
//! The plumbing shared with the leaf (identity, QUIC endpoints, framed
//! streams, the gate, the ALPN router, the HTTP server, shutdown, logging)
//! is the `servent-net` crate (`supernode/net`).

pub mod config;
pub mod connect;
pub mod election;
pub mod index;
mod lan;
pub mod mesh;
pub mod metrics;
pub mod owner;
pub mod probe;
pub mod relay;
pub mod routing;
pub mod session;
pub mod status;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use rand::Rng;
use servent_proto::hop::HopNode;
use servent_proto::msg::{ALPN_LEAF, ALPN_MESH};
use servent_proto::NodeId;
use tokio::sync::watch;
use tracing::{info, info_span, Instrument};

pub use config::Config;
use index::Index;
use metrics::Metrics;
use servent_net::{
    gate, http, Endpoint, EndpointError, Identity, IdentityError, Peer, ProtocolHandler, Router,
    ShutdownSignal,
};

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
    /// Which `Connect` requests are passed on to our leaves.
    connects: Mutex<servent_proto::connect::Connects<NodeId>>,
    /// The circuits this supernode relays, and their budgets.
    relays: Mutex<servent_proto::relay::Relays>,
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
        let gate = gate::Gate::new(gate_config(&config));
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
        let mut hop = HopNode::new(config.hop, config.mesh_query_rate, config.mesh_query_burst);
        let (core, client) = owner::new(id, &config, elected, owner::node_rng());
        let relay_limits = config.relay.limits();
        // Walkers pick neighbours in an order drawn from the node's RNG.
        hop.seed(client.query_ids.lock().expect("query id lock").random());
        Self {
            id,
            config,
            index: Index::new(index_limits),
            metrics: Metrics::default(),
            query_limits,
            connects: Mutex::new(servent_proto::connect::Connects::new(Default::default())),
            relays: Mutex::new(servent_proto::relay::Relays::new(
                relay_limits,
                std::time::Instant::now(),
            )),
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

    /// The file index of this supernode's leaves (and of its own files,
    /// when a leaf holding the role shares them: `leaf/src/lan.rs`).
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Where `conn`'s peer reached this node: the connection's local IP
    /// and the endpoint's port. What this node's own entries are served
    /// at, to that peer; `None` where the platform does not say.
    pub fn reached_at(&self, conn: &quinn::Connection) -> Option<SocketAddr> {
        let ip = conn.local_ip()?.to_canonical();
        let port = self.endpoint()?.local_addr().ok()?.port();
        Some(SocketAddr::new(ip, port))
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
}

/// The gate settings of a supernode configuration: what a standalone
/// supernode's endpoint admits, and a leaf's endpoint too (with its role's
/// settings, whether or not it is elected).
pub fn gate_config(config: &Config) -> gate::GateConfig {
    gate::GateConfig {
        admit: servent_proto::admit::AdmitConfig {
            max_connections: config.max_connections,
            per_address: config.max_connections_per_ip,
            handshake_rate: config.handshake_rate,
            handshake_burst: config.handshake_burst,
            handshake_rate_per_address: config.handshake_rate_per_ip,
            handshake_burst_per_address: config.handshake_burst_per_ip,
            retry_above: config.retry_above,
            exempt: config.exempt_ips.clone(),
        },
        idle_close: std::time::Duration::from_millis(config.idle_close_ms),
        max_buffered_per_connection: config.max_buffered_per_connection,
        max_buffered: config.max_buffered,
        streams: config.transport.streams(),
    }
}

/// Serves `ALPN_LEAF`: the session of one leaf ([`session`]).
struct SessionHandler(Arc<State>);

impl ProtocolHandler for SessionHandler {
    async fn accept(&self, peer: Peer) {
        let remote = peer.conn.remote_address();
        let _traffic = self.0.metrics.traffic.track(&peer.conn);
        let span = info_span!("conn", peer = %peer.id.short(), %remote);
        session::serve(self.0.clone(), peer).instrument(span).await
    }
}

/// Serves `ALPN_MESH`: a link another supernode dialled ([`mesh`]).
struct MeshHandler(Arc<State>);

impl ProtocolHandler for MeshHandler {
    async fn accept(&self, peer: Peer) {
        let remote = peer.conn.remote_address();
        let _traffic = self.0.metrics.traffic.track(&peer.conn);
        let span = info_span!("mesh", peer = %peer.id.short(), %remote);
        mesh::serve(self.0.clone(), peer).instrument(span).await
    }
}

/// The supernode role on an endpoint it does not own: its state, its
/// handlers of `ALPN_LEAF` and `ALPN_MESH` on the endpoint's [`Router`],
/// and its mesh and election tasks. It is how every supernode runs: a
/// standalone [`Supernode`] starts one on its own endpoint, an elected
/// leaf on the leaf's. Dropping it stops it.
pub struct Role {
    state: Arc<State>,
    router: Router,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    stopped: std::sync::atomic::AtomicBool,
}

impl Role {
    /// Starts the role on `router`'s endpoint: registers its handlers and
    /// spawns its tasks (in the current span). `elected` is true for a leaf
    /// that was promoted. The role's connections are admitted, and their
    /// frames budgeted, by the router's gate: one door per endpoint.
    pub fn start(config: Config, router: &Router, elected: bool) -> Result<Self, StartError> {
        let addr = router
            .endpoint()
            .local_addr()
            .map_err(StartError::LocalAddr)?;
        Self::start_announcing(config, router, elected, addr.port())
    }

    /// Like [`Role::start`], telling the mesh it is dialled at `port` of
    /// the address its neighbours observe (a leaf's gateway may map
    /// another port to the one it listens on).
    pub fn start_announcing(
        config: Config,
        router: &Router,
        elected: bool,
        port: u16,
    ) -> Result<Self, StartError> {
        let endpoint = router.endpoint().clone();
        let addr = endpoint.local_addr().map_err(StartError::LocalAddr)?;
        let mut state = State::new(endpoint.id(), config, elected);
        state.gate = router.gate().clone();
        let state = Arc::new(state);
        let _ = state.endpoint.set(endpoint);
        let (stop, stopped) = watch::channel(false);
        spawn_tasks(&state, port, stopped);
        router.accept(ALPN_LEAF, SessionHandler(state.clone()));
        router.accept(ALPN_MESH, MeshHandler(state.clone()));
        Ok(Self {
            state,
            router: router.clone(),
            addr,
            stop,
            stopped: Default::default(),
        })
    }

    /// Ends the role: its handlers leave the router (new leaf and mesh
    /// connections are refused with the router's reason), its tasks stop,
    /// and its leaf and mesh connections are closed. The endpoint, and the
    /// router's other handlers and their connections, are left alone.
    /// Only the first call does anything.
    pub fn stop(&self) {
        if self.stopped.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        self.router.remove(ALPN_LEAF);
        self.router.remove(ALPN_MESH);
        // The owner closes an elected role's leaf and mesh connections
        // as it stops (`owner::run`).
        let _ = self.stop.send(true);
    }

    /// Stops the role's tasks only, for a node that is closing its
    /// endpoint anyway (and so every connection, with its own reason).
    fn halt(&self) {
        let _ = self.stop.send(true);
    }

    pub fn id(&self) -> NodeId {
        self.state.id
    }

    /// The endpoint's UDP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state(&self) -> &Arc<State> {
        &self.state
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The role's long-running tasks, in the current span, until `stop`.
fn spawn_tasks(state: &Arc<State>, port: u16, stop: watch::Receiver<bool>) {
    tokio::spawn(owner::run(state.clone(), port, stop).in_current_span());
}

/// A standalone supernode: its own endpoint, router and HTTP server, and
/// the supernode [`Role`] on them. Dropping it shuts it down.
pub struct Supernode {
    role: Role,
    router: Router,
    endpoint: Endpoint,
    /// `/status` and `/metrics`, when `config.http` asks for them.
    http: Option<http::HttpServer>,
    /// Announcing and hearing the LAN (`config.lan`); aborted on shutdown.
    lan: Option<tokio::task::JoinHandle<()>>,
    span: tracing::Span,
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
        let transport = config.transport.clone();
        let endpoint = match socket {
            Some(socket) => Endpoint::bind_socket_with(identity.clone(), socket, alpns, transport)?,
            None => Endpoint::bind_with(identity.clone(), config.listen, alpns, transport)?,
        };
        let addr = endpoint.local_addr().map_err(StartError::LocalAddr)?;
        let span = info_span!("supernode", id = %identity.id().short());
        let http_at = config.http;
        let lan = config.lan && servent_net::lan::wanted(addr);
        let gate = gate::Gate::new(gate_config(&config));
        let started = span.in_scope(|| {
            let router = Router::builder(endpoint.clone(), gate).spawn();
            Role::start(config, &router, false).map(|role| (router, role))
        });
        let (router, role) = match started {
            Ok(started) => started,
            Err(e) => {
                endpoint.close();
                return Err(e);
            }
        };
        let http = match http_at {
            Some(at) => {
                let report = status::SupernodeReport::new(role.state().clone(), addr);
                match http::HttpServer::bind(at, Arc::new(report))
                    .instrument(span.clone())
                    .await
                {
                    Ok(server) => Some(server),
                    Err(e) => {
                        role.halt();
                        endpoint.close();
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        let lan = match lan {
            true => span.in_scope(|| lan::start(role.state().clone(), addr)),
            false => None,
        };
        info!(parent: &span, %addr, "listening");
        Ok(Self {
            lan,
            role,
            router,
            endpoint,
            http,
            span,
        })
    }

    pub fn id(&self) -> NodeId {
        self.role.id()
    }

    /// The bound UDP address (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.role.addr()
    }

    /// The bound HTTP address of `/status` and `/metrics`, if served.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(http::HttpServer::addr)
    }

    pub fn state(&self) -> &Arc<State> {
        self.role.state()
    }

    /// The supernode role this node runs.
    pub fn role(&self) -> &Role {
        &self.role
    }

    /// The accept loop of this node's endpoint.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Leaves registered now.
    pub fn leaf_count(&self) -> usize {
        self.state().leaf_count()
    }

    /// Distinct files indexed now.
    pub fn file_count(&self) -> usize {
        self.state().index().file_count()
    }

    /// Ids of the mesh neighbours linked now.
    pub fn neighbours(&self) -> Vec<NodeId> {
        self.state()
            .neighbours()
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    pub fn metrics(&self) -> &metrics::Metrics {
        &self.state().metrics
    }

    /// Closes every connection and waits until the accept loop has ended.
    pub async fn shutdown(mut self) {
        if let Some(lan) = self.lan.take() {
            lan.abort();
        }
        self.role.halt();
        if let Some(http) = self.http.take() {
            http.shutdown().await;
        }
        self.endpoint.close();
        self.router.shutdown().await;
        info!(parent: &self.span, "stopped");
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
        // The endpoint first, so that peers see it shut down (not the
        // role's step-down) when the role is dropped after this.
        if let Some(lan) = &self.lan {
            lan.abort();
        }
        self.role.halt();
        self.endpoint.close();
    }
}
