//! The supernode mesh (ALPN `servent-mesh/2`) over QUIC: the driver of
//! [`servent_proto::mesh::Membership`], which decides who our neighbours
//! are, what we know of other supernodes, whom to dial, what to gossip and
//! when a neighbour is gone. This module only carries its decisions out:
//! it dials, runs each link's control stream, feeds the core what happens
//! (dial outcomes, `Hello`s, `Status` frames, links that end, RTT samples,
//! timer expiries) and keeps the connections, keyed by link, beside it.
//!
//! A neighbour's own address is the one its connection comes from (with the
//! port its `Hello` gave); gossiped addresses are only claims, dialled with
//! the gossiped id as the expected node id. Query routing over these links
//! is in [`crate::routing`]; the per-neighbour query state (seen ids, rate
//! limits, fair forwarding) lives here beside the links it belongs to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use servent_proto::fair::{FairForwarder, Origin};
use servent_proto::limits::MAX_MESH_FRAME;
use servent_proto::mesh::{Action, CloseReason, DialAddr, DialId, LinkId, Membership, Refusal};
use servent_proto::msg::{
    ErrorCode, ErrorReply, MeshControl, MeshRequest, SupernodeInfo, ALPN_MESH,
};
use servent_proto::rate::TokenBucket;
use servent_proto::route::Seen;
use servent_proto::NodeId;
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::gate::Inbound;
use crate::net::{self, Peer, StreamError};
use crate::{routing, State};

/// `Status` frames waiting for a link's writer. The core queues one a
/// gossip interval; a writer this far behind has a link that is dying.
const GOSSIP_QUEUE: usize = 4;

/// A link the core has admitted: the connection it runs on.
struct Link {
    peer: NodeId,
    conn: quinn::Connection,
    /// The `known` lists of the `Status` frames to send on it.
    gossip: mpsc::Sender<Vec<SupernodeInfo>>,
}

struct Inner {
    core: Membership,
    /// Exactly the links of the core's neighbours.
    links: HashMap<LinkId, Link>,
}

/// The mesh state of one supernode.
pub struct Mesh {
    inner: Mutex<Inner>,
    /// Wakes the maintenance loop when a new link may move the core's
    /// next deadline earlier.
    wake: Notify,
    /// The UDP port our `Hello`s announce.
    listen_port: AtomicU16,
    pub seen: Mutex<Seen>,
    /// Per-neighbour mesh query rate limits.
    pub rates: DashMap<NodeId, TokenBucket>,
    /// What we forward on each link, shared fairly among the origins of
    /// the queries (`servent_proto::fair`).
    pub fair: Mutex<FairForwarder<NodeId, Origin<NodeId>>>,
}

fn link_id(conn: &quinn::Connection) -> LinkId {
    LinkId(conn.stable_id() as u64)
}

impl Mesh {
    /// The membership core of supernode `me`, configured from `config`
    /// (its `mesh` timings, neighbour counts, address caps and `peers`).
    /// `mesh_query_rate` and `mesh_query_burst` are what a neighbour
    /// accepts from us (assumed to be what we accept from each of them).
    pub fn new(me: NodeId, config: &crate::Config) -> Self {
        let core = Membership::new(me, config.mesh_config(), &config.peers, Instant::now());
        Self {
            inner: Mutex::new(Inner {
                core,
                links: HashMap::new(),
            }),
            wake: Notify::new(),
            listen_port: AtomicU16::new(0),
            seen: Mutex::new(Seen::default()),
            rates: DashMap::new(),
            fair: Mutex::new(FairForwarder::new(
                config.mesh_query_rate,
                config.mesh_query_burst,
            )),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().expect("mesh lock")
    }

    /// Neighbour ids, least loaded and fastest first: the order a search
    /// asks them in. Each link's current RTT is fed to the core first.
    pub fn ranked_neighbours(&self) -> Vec<NodeId> {
        let mut inner = self.lock();
        let Inner { core, links } = &mut *inner;
        for l in links.values() {
            core.handle_rtt(l.peer, l.conn.rtt());
        }
        core.ranked_neighbours()
    }

    /// The connection of neighbour `id`, if linked.
    pub fn conn(&self, id: &NodeId) -> Option<quinn::Connection> {
        let inner = self.lock();
        let link = inner.core.neighbour_info(id)?.link;
        inner.links.get(&link).map(|l| l.conn.clone())
    }

    /// Where neighbour `id` listens, if linked.
    pub fn neighbour_addr(&self, id: &NodeId) -> Option<SocketAddr> {
        self.lock().core.neighbour_info(id).map(|n| n.addr)
    }

    pub fn is_neighbour(&self, id: &NodeId) -> bool {
        self.lock().core.is_neighbour(id)
    }

    pub fn neighbour_count(&self) -> usize {
        self.lock().core.neighbour_count()
    }

    /// The neighbours linked now and where they listen.
    pub fn neighbours(&self) -> Vec<(NodeId, SocketAddr)> {
        self.lock()
            .core
            .neighbours()
            .map(|(id, n)| (*id, n.addr))
            .collect()
    }

    /// Other supernodes known now: neighbours, and those remembered but
    /// not linked (gossiped ones included, checked or not).
    pub fn known_count(&self) -> usize {
        self.lock().core.known_count()
    }

    /// Supernodes for a leaf, least loaded first; with `with_room`, only
    /// those that can take another leaf (see [`Membership::for_leaves`]).
    pub fn for_leaves(&self, with_room: bool, now: Instant) -> Vec<SupernodeInfo> {
        self.lock().core.for_leaves(with_room, now)
    }

    /// Adds supernodes known from elsewhere (an elected leaf's own list),
    /// unverified, as candidates to dial.
    pub fn seed(&self, infos: Vec<SupernodeInfo>, now: Instant) {
        self.lock().core.seed(infos, now);
    }

    /// Closes every link with `reason` (the role is ending).
    pub fn close_all(&self, reason: &[u8]) {
        for l in self.lock().links.values() {
            l.conn.close(0u32.into(), reason);
        }
    }
}

/// Tells the core of any link whose connection has closed, so that a new
/// link to the same node is not measured against a dead one.
fn reap(inner: &mut Inner, now: Instant) {
    let dead: Vec<(NodeId, LinkId)> = inner
        .links
        .iter()
        .filter(|(_, l)| l.conn.close_reason().is_some())
        .map(|(id, l)| (l.peer, *id))
        .collect();
    for (peer, link) in dead {
        inner.core.handle_link_down(now, peer, link);
    }
}

/// Carries out what the core asked for: queues gossip under the lock, then
/// closes connections and starts dials once it is released.
fn run_actions(state: &Arc<State>, mut inner: MutexGuard<'_, Inner>) {
    let mut dials = Vec::new();
    let mut closes = Vec::new();
    while let Some(action) = inner.core.poll_action() {
        match action {
            Action::Dial { dial, expect, addr } => dials.push((dial, expect, addr)),
            Action::SendGossip { link, known, .. } => {
                if let Some(l) = inner.links.get(&link) {
                    // A full queue: that link's writer is stuck, and the
                    // next frame will carry fresher news anyway.
                    let _ = l.gossip.try_send(known);
                }
            }
            Action::Close { id, link, reason } => {
                if let Some(l) = inner.links.remove(&link) {
                    closes.push((id, l, reason));
                }
            }
        }
    }
    drop(inner);
    for (id, link, reason) in closes {
        link.conn.close(0u32.into(), reason.as_str().as_bytes());
        match reason {
            CloseReason::Replaced => {
                debug!(peer = %id.short(), "duplicate link closed");
                continue;
            }
            CloseReason::Silent => warn!(peer = %id.short(), "neighbour stopped sending status"),
            CloseReason::Ended => {}
        }
        state.mesh.rates.remove(&id);
        state.mesh.fair.lock().expect("fair lock").remove_link(&id);
        info!(peer = %id.short(), "link down");
    }
    let listen_port = state.mesh.listen_port.load(Ordering::Relaxed);
    for (dial, expect, addr) in dials {
        tokio::spawn(run_dial(state.clone(), dial, expect, addr, listen_port).in_current_span());
    }
}

fn my_load(state: &State) -> (u32, u32) {
    (
        state.leaves.len() as u32,
        state.config.max_leaves.min(u32::MAX as usize) as u32,
    )
}

/// Runs the core's timers until `stop` fires: maintenance (bootstrap
/// peers, dialling up to the target), each link's `Status`, and dropping
/// silent neighbours.
pub async fn maintain(state: Arc<State>, listen_port: u16, mut stop: watch::Receiver<bool>) {
    state.mesh.listen_port.store(listen_port, Ordering::Relaxed);
    loop {
        let next = {
            let now = Instant::now();
            let mut inner = state.mesh.lock();
            reap(&mut inner, now);
            inner.core.handle_timeout(now);
            let next = inner.core.poll_timeout();
            run_actions(&state, inner);
            next
        };
        let sleep = match next {
            Some(at) => tokio::time::sleep_until(at.into()),
            None => tokio::time::sleep(Duration::from_secs(3600)),
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = sleep => {}
            _ = state.mesh.wake.notified() => {}
        }
    }
}

async fn resolve(addr: &str) -> Option<SocketAddr> {
    tokio::net::lookup_host(addr).await.ok()?.next()
}

#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("cannot resolve the address")]
    Unresolved,
    #[error("already dialling")]
    Busy,
    #[error(transparent)]
    Connect(#[from] net::ConnectError),
    #[error("that is this supernode")]
    Myself,
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("link already exists")]
    Duplicate,
}

/// Carries out one `Dial` of the core and reports its outcome.
async fn run_dial(
    state: Arc<State>,
    dial: DialId,
    expect: Option<NodeId>,
    addr: DialAddr,
    listen_port: u16,
) {
    let sock = match addr {
        DialAddr::Socket(a) => Some(a),
        DialAddr::Name(name) => match resolve(&name).await {
            Some(a) => {
                if !state
                    .mesh
                    .lock()
                    .core
                    .handle_resolved(Instant::now(), dial, a)
                {
                    return;
                }
                Some(a)
            }
            None => None,
        },
    };
    let result = match sock {
        Some(sock) => dial_inner(&state, dial, sock, expect, listen_port).await,
        None => Err(DialError::Unresolved),
    };
    if let Err(e) = result {
        debug!(addr = ?sock, error = %e, "mesh dial failed");
        // Once the core has refused the link it has counted the failure
        // itself; reporting it again is harmless.
        let mut inner = state.mesh.lock();
        inner.core.handle_dial_failed(Instant::now(), dial);
        run_actions(&state, inner);
    }
}

/// Dials a supernode and, once it welcomes us and the core takes the
/// link, runs the link.
async fn dial_inner(
    state: &Arc<State>,
    dial: DialId,
    addr: SocketAddr,
    expected: Option<NodeId>,
    listen_port: u16,
) -> Result<(), DialError> {
    let endpoint = state.endpoint().ok_or(DialError::Busy)?;
    let peer = endpoint.connect(addr, ALPN_MESH, expected).await?;
    if peer.id == state.id {
        peer.conn.close(0u32.into(), b"that is me");
        return Err(DialError::Myself);
    }
    let linked = {
        let mut inner = state.mesh.lock();
        reap(&mut inner, Instant::now());
        let linked = inner.core.is_neighbour(&peer.id);
        run_actions(state, inner);
        linked
    };
    if linked {
        peer.conn.close(0u32.into(), b"already linked");
        return Err(DialError::Duplicate);
    }
    let (mut send, mut recv) = peer
        .conn
        .open_bi()
        .await
        .map_err(|e| DialError::Refused(e.to_string()))?;
    let (leaves, max_leaves) = my_load(state);
    net::write_frame(
        &mut send,
        &MeshRequest::Hello {
            listen_port,
            leaves,
            max_leaves,
        },
        MAX_MESH_FRAME,
    )
    .await?;
    let (their_leaves, their_max) =
        match net::read_first_frame::<MeshControl>(&mut recv, MAX_MESH_FRAME).await? {
            Some(MeshControl::Welcome { leaves, max_leaves }) => (leaves, max_leaves),
            Some(MeshControl::Refused(e)) => return Err(DialError::Refused(e.to_string())),
            other => return Err(DialError::Refused(format!("unexpected answer {other:?}"))),
        };
    let (tx, rx) = mpsc::channel(GOSSIP_QUEUE);
    let link = link_id(&peer.conn);
    let admitted = {
        let mut inner = state.mesh.lock();
        reap(&mut inner, Instant::now());
        let r =
            inner
                .core
                .handle_dialled(Instant::now(), dial, peer.id, link, their_leaves, their_max);
        if r.is_ok() {
            inner.links.insert(link, new_link(&peer, tx));
        }
        run_actions(state, inner);
        r
    };
    match admitted {
        Ok(()) => state.mesh.wake.notify_one(),
        Err(Refusal::NoRoom(_)) => {
            peer.conn.close(0u32.into(), b"no room");
            return Err(DialError::Refused(
                "neighbour table filled meanwhile".into(),
            ));
        }
        Err(_) => {
            peer.conn.close(0u32.into(), b"duplicate link");
            return Err(DialError::Duplicate);
        }
    }
    let span = info_span!("mesh", peer = %peer.id.short(), %addr);
    info!(parent: &span, "linked (dialled)");
    // Accepted links are counted where they are accepted; this one is ours.
    let traffic = state.metrics.traffic.track(&peer.conn);
    let link = run_link(state.clone(), peer, true, send, recv, rx);
    tokio::spawn(
        async move {
            link.await;
            drop(traffic);
        }
        .instrument(span),
    );
    Ok(())
}

fn new_link(peer: &Peer, gossip: mpsc::Sender<Vec<SupernodeInfo>>) -> Link {
    Link {
        peer: peer.id,
        conn: peer.conn.clone(),
        gossip,
    }
}

/// Serves an accepted mesh connection: its control stream and its queries.
pub async fn serve(state: Arc<State>, peer: Peer) {
    serve_streams(state, peer, true).await
}

/// Accepts the streams of a mesh connection until it ends. Only on a
/// connection we accepted may the first stream be a `Hello`.
///
/// Boxed with an explicit `Send` bound: links spawn stream servers that
/// spawn links, and the compiler cannot infer `Send` through that cycle.
fn serve_streams(
    state: Arc<State>,
    peer: Peer,
    accepted: bool,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(serve_streams_inner(state, peer, accepted))
}

async fn serve_streams_inner(state: Arc<State>, peer: Peer, accepted: bool) {
    let hello_seen = Arc::new(std::sync::atomic::AtomicBool::new(!accepted));
    // An accepted connection that never says Hello, or whose link is gone
    // and that sends no queries, is closed as idle.
    let inbound = match accepted {
        true => state.gate.inbound(&peer.conn),
        false => state.gate.inbound_unwatched(),
    };
    loop {
        let (send, recv) = match peer.conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(reason = %e, "mesh connection ended");
                return;
            }
        };
        let (state, peer, hello_seen) = (state.clone(), peer.clone(), hello_seen.clone());
        let inbound = inbound.clone();
        tokio::spawn(
            async move {
                let _active = inbound.stream();
                serve_stream(state, peer, &inbound, hello_seen, send, recv).await
            }
            .in_current_span(),
        );
    }
}

async fn serve_stream(
    state: Arc<State>,
    peer: Peer,
    inbound: &Inbound,
    hello_seen: Arc<std::sync::atomic::AtomicBool>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    use std::sync::atomic::Ordering;
    match net::read_first_frame_in::<MeshRequest>(&mut recv, MAX_MESH_FRAME, inbound).await {
        Ok(Some(MeshRequest::Hello {
            listen_port,
            leaves,
            max_leaves,
        })) if !hello_seen.swap(true, Ordering::SeqCst) => {
            let (tx, rx) = mpsc::channel(GOSSIP_QUEUE);
            if let Err(refusal) = welcome(&state, &peer, listen_port, leaves, max_leaves, tx) {
                let reason = refusal.to_string();
                debug!(%reason, "link refused");
                let refusal =
                    MeshControl::Refused(ErrorReply::new(ErrorCode::Unavailable, reason.clone()));
                let _ = net::write_frame(&mut send, &refusal, MAX_MESH_FRAME).await;
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
                peer.conn.close(0u32.into(), reason.as_bytes());
                return;
            }
            let (leaves, max_leaves) = my_load(&state);
            let welcome = MeshControl::Welcome { leaves, max_leaves };
            if net::write_frame(&mut send, &welcome, MAX_MESH_FRAME)
                .await
                .is_err()
            {
                link_down(&state, &peer);
                return;
            }
            info!("linked (accepted)");
            run_link(state, peer, false, send, recv, rx).await;
        }
        Ok(Some(MeshRequest::Query(q))) if state.mesh.is_neighbour(&peer.id) => {
            routing::serve_mesh_query(state, peer.id, q, send).await;
        }
        Ok(Some(_)) => {
            let e = ErrorReply::new(ErrorCode::BadRequest, "not a neighbour, or a second Hello");
            let _ = net::write_frame(&mut send, &MeshControl::Refused(e), MAX_MESH_FRAME).await;
            let _ = send.finish();
        }
        Ok(None) => {}
        Err(e) => {
            debug!(error = %e, "bad mesh stream");
            let _ = send.reset(1u32.into());
        }
    }
}

/// Whether to take an accepted link; on success it is a neighbour and its
/// `Status` frames go to `gossip`.
fn welcome(
    state: &Arc<State>,
    peer: &Peer,
    listen_port: u16,
    leaves: u32,
    max_leaves: u32,
    gossip: mpsc::Sender<Vec<SupernodeInfo>>,
) -> Result<(), Refusal> {
    let ip = peer.conn.remote_address().ip().to_canonical();
    let link = link_id(&peer.conn);
    let now = Instant::now();
    let mut inner = state.mesh.lock();
    reap(&mut inner, now);
    let r = inner
        .core
        .handle_hello(now, peer.id, link, ip, listen_port, leaves, max_leaves);
    if r.is_ok() {
        inner.links.insert(link, new_link(peer, gossip));
    }
    run_actions(state, inner);
    if r.is_ok() {
        state.mesh.wake.notify_one();
    }
    r
}

/// Tells the core that this connection's link has ended.
fn link_down(state: &Arc<State>, peer: &Peer) {
    let mut inner = state.mesh.lock();
    inner
        .core
        .handle_link_down(Instant::now(), peer.id, link_id(&peer.conn));
    run_actions(state, inner);
}

/// Runs one link's control stream and, on the dialling side (`dialled`),
/// serves the queries the other end sends, until the connection ends, the
/// control stream carries anything but `Status`, or the core drops the
/// neighbour (silence, a duplicate link won).
async fn run_link(
    state: Arc<State>,
    peer: Peer,
    dialled: bool,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut gossip: mpsc::Receiver<Vec<SupernodeInfo>>,
) {
    let id = peer.id;
    let link = link_id(&peer.conn);
    let conn = peer.conn.clone();
    // The dialling end must also accept the query streams of the other end.
    let streams = dialled.then(|| {
        let (state, peer) = (state.clone(), peer.clone());
        tokio::spawn(serve_streams(state, peer, false).in_current_span())
    });
    let reader = {
        let state = state.clone();
        async move {
            loop {
                // Silence is the core's to judge (its timers drop the
                // neighbour and close the connection).
                match net::read_frame::<MeshControl>(&mut recv, MAX_MESH_FRAME).await {
                    Ok(Some(MeshControl::Status {
                        leaves,
                        max_leaves,
                        known,
                    })) => {
                        let mut inner = state.mesh.lock();
                        inner.core.handle_status(
                            Instant::now(),
                            id,
                            link,
                            leaves,
                            max_leaves,
                            known,
                        );
                        run_actions(&state, inner);
                    }
                    Ok(Some(other)) => {
                        warn!(message = ?other, "unexpected control frame");
                        return;
                    }
                    Ok(None) => return,
                    Err(e) => {
                        debug!(error = %e, "control stream ended");
                        return;
                    }
                }
            }
        }
    };
    let writer = async {
        // Ends when the core drops the link (the sender goes with it).
        while let Some(known) = gossip.recv().await {
            let (leaves, max_leaves) = my_load(&state);
            let status = MeshControl::Status {
                leaves,
                max_leaves,
                known,
            };
            if net::write_frame(&mut send, &status, MAX_MESH_FRAME)
                .await
                .is_err()
            {
                return;
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
        _ = conn.closed() => {}
    }
    if let Some(t) = streams {
        t.abort();
    }
    link_down(&state, &peer);
    conn.close(0u32.into(), b"link closed");
}
