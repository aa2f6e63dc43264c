//! The supernode mesh (ALPN `servent-mesh/2`): who our neighbours are, what
//! we know of other supernodes, and keeping enough links alive.
//!
//! Membership is learned by gossip: every neighbour tells us, every
//! `GOSSIP_INTERVAL`, its load and the supernodes it knows. A neighbour's own
//! address is the one its connection comes from (with the port its `Hello`
//! gave); gossiped addresses are only claims, dialled with the gossiped id
//! as the expected node id. Query routing over these links is in
//! [`crate::routing`].

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use servent_proto::fair::{FairForwarder, Origin};
use servent_proto::limits::{MAX_MESH_FRAME, MAX_SUPERNODE_INFOS};
use servent_proto::msg::{
    ErrorCode, ErrorReply, MeshControl, MeshRequest, SupernodeInfo, ALPN_MESH,
};
use servent_proto::rate::TokenBucket;
use servent_proto::route::{ip_allowed, IpCaps, Seen};
use servent_proto::NodeId;
use tokio::sync::watch;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::gate::Inbound;
use crate::net::{self, Peer, StreamError};
use crate::{routing, State};

/// How often each side of a link sends its `Status`.
pub const GOSSIP_INTERVAL: Duration = Duration::from_secs(2);
/// A neighbour whose control stream is silent this long is dropped.
const SILENCE_LIMIT: Duration = Duration::from_secs(8);
/// Known supernodes not heard of for this long are not gossiped.
pub const GOSSIP_MAX_AGE: Duration = Duration::from_secs(300);
/// Known supernodes not heard of for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most supernodes remembered.
const MAX_KNOWN: usize = 1000;
/// Most unverified supernodes remembered from what one neighbour told us
/// (two `Status` frames' worth), so that one hostile neighbour cannot
/// fill the table with made-up entries and push out real ones.
const MAX_KNOWN_PER_SENDER: usize = 2 * MAX_SUPERNODE_INFOS;
/// How often the mesh is checked for missing links.
const MAINTAIN_INTERVAL: Duration = Duration::from_millis(500);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A live link to another supernode.
#[derive(Debug, Clone)]
pub struct Neighbour {
    pub conn: quinn::Connection,
    /// Where it listens: observed IP, announced port (or the address dialled).
    pub addr: SocketAddr,
    pub leaves: u32,
    pub max_leaves: u32,
    /// Which end dialled this link (for settling duplicate links).
    pub dialer: NodeId,
    pub since: Instant,
}

impl Neighbour {
    fn info(&self, id: NodeId) -> SupernodeInfo {
        SupernodeInfo {
            id,
            addr: self.addr.to_string(),
            leaves: self.leaves,
            max_leaves: self.max_leaves,
            age_secs: 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Known {
    addr: SocketAddr,
    leaves: u32,
    max_leaves: u32,
    last_seen: Instant,
    next_try: Instant,
    failures: u32,
    /// We have been linked to it ourselves. Only such entries are passed
    /// on, so a made-up entry dies with the first supernode told of it.
    verified: bool,
    /// The neighbour that told us of it, while it is not verified.
    told_by: Option<NodeId>,
}

#[derive(Debug)]
struct Bootstrap {
    addr: String,
    next_try: Instant,
    delay: Duration,
    /// The node last found there, to tell whether we are linked to it.
    id: Option<NodeId>,
}

/// The mesh state of one supernode.
pub struct Mesh {
    pub neighbours: DashMap<NodeId, Neighbour>,
    known: Mutex<HashMap<NodeId, Known>>,
    bootstrap: Mutex<Vec<Bootstrap>>,
    /// Addresses being dialled now, so no address is dialled twice at once.
    dialing: Mutex<HashSet<SocketAddr>>,
    pub seen: Mutex<Seen>,
    /// Per-neighbour mesh query rate limits.
    pub rates: DashMap<NodeId, TokenBucket>,
    /// What we forward on each link, shared fairly among the origins of
    /// the queries (`servent_proto::fair`).
    pub fair: Mutex<FairForwarder<NodeId, Origin<NodeId>>>,
}

impl Mesh {
    /// `mesh_query_rate` and `mesh_query_burst`: what a neighbour accepts
    /// from us (assumed to be what we accept from each of them).
    pub fn new(bootstrap: &[String], mesh_query_rate: f64, mesh_query_burst: u32) -> Self {
        let now = Instant::now();
        Self {
            neighbours: DashMap::new(),
            known: Mutex::new(HashMap::new()),
            bootstrap: Mutex::new(
                bootstrap
                    .iter()
                    .map(|a| Bootstrap {
                        addr: a.clone(),
                        next_try: now,
                        delay: BACKOFF_MIN,
                        id: None,
                    })
                    .collect(),
            ),
            dialing: Mutex::new(HashSet::new()),
            seen: Mutex::new(Seen::default()),
            rates: DashMap::new(),
            fair: Mutex::new(FairForwarder::new(mesh_query_rate, mesh_query_burst)),
        }
    }

    /// Neighbour ids, least loaded and fastest first: the order a search asks them in.
    pub fn ranked_neighbours(&self) -> Vec<NodeId> {
        let mut v: Vec<(u64, Duration, NodeId)> = self
            .neighbours
            .iter()
            .map(|n| {
                (
                    load_permille(n.leaves, n.max_leaves),
                    n.conn.rtt(),
                    *n.key(),
                )
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, _, id)| id).collect()
    }

    /// Other supernodes known now: neighbours, and those remembered but
    /// not linked (gossiped ones included, checked or not).
    pub fn known_count(&self) -> usize {
        let known = self.known.lock().expect("known lock");
        let remembered = known
            .keys()
            .filter(|id| !self.neighbours.contains_key(*id))
            .count();
        self.neighbours.len() + remembered
    }

    /// Supernodes to tell others about: neighbours first, then recently
    /// seen ones, never `except`, at most `MAX_SUPERNODE_INFOS`.
    pub fn gossip(&self, except: Option<NodeId>, now: Instant) -> Vec<SupernodeInfo> {
        let mut out = self.passable(except, now);
        out.truncate(MAX_SUPERNODE_INFOS);
        out
    }

    /// Every supernode we may tell others about (linked to, or verified
    /// and heard of lately): neighbours first, then by age.
    fn passable(&self, except: Option<NodeId>, now: Instant) -> Vec<SupernodeInfo> {
        let mut out: Vec<SupernodeInfo> = self
            .neighbours
            .iter()
            .filter(|n| Some(*n.key()) != except)
            .map(|n| n.info(*n.key()))
            .collect();
        let known = self.known.lock().expect("known lock");
        let mut rest: Vec<SupernodeInfo> = known
            .iter()
            .filter(|(id, k)| {
                Some(**id) != except
                    && k.verified
                    && !self.neighbours.contains_key(*id)
                    && now.saturating_duration_since(k.last_seen) < GOSSIP_MAX_AGE
            })
            .map(|(id, k)| SupernodeInfo {
                id: *id,
                addr: k.addr.to_string(),
                leaves: k.leaves,
                max_leaves: k.max_leaves,
                age_secs: now
                    .saturating_duration_since(k.last_seen)
                    .as_secs()
                    .min(u32::MAX as u64) as u32,
            })
            .collect();
        rest.sort_by_key(|i| i.age_secs);
        out.extend(rest);
        out
    }

    /// Supernodes for a leaf, least loaded first; with `with_room`, only
    /// those that can take another leaf.
    /// At most `MAX_SUPERNODE_INFOS`, chosen from all we know (not only
    /// those we would gossip), so that room anywhere is found.
    pub fn for_leaves(&self, with_room: bool, now: Instant) -> Vec<SupernodeInfo> {
        let mut v = self.passable(None, now);
        if with_room {
            v.retain(|i| i.leaves < i.max_leaves);
        }
        v.sort_by_key(|i| (load_permille(i.leaves, i.max_leaves), i.age_secs));
        v.truncate(MAX_SUPERNODE_INFOS);
        v
    }

    /// Adds supernodes known from elsewhere (an elected leaf's own list),
    /// unverified, as candidates to dial: a supernode whose first peers
    /// refuse it still has others to try.
    pub fn seed(&self, me: NodeId, infos: Vec<SupernodeInfo>, now: Instant) {
        self.learn(me, me, infos, now);
    }

    /// Records what a neighbour gossiped.
    fn learn(&self, me: NodeId, from: NodeId, infos: Vec<SupernodeInfo>, now: Instant) {
        let mut known = self.known.lock().expect("known lock");
        for info in infos.into_iter().take(MAX_SUPERNODE_INFOS) {
            if info.id == me || info.id == from {
                continue;
            }
            let Ok(addr) = info.addr.parse::<SocketAddr>() else {
                continue;
            };
            if addr.port() == 0 || addr.ip().is_unspecified() {
                continue;
            }
            let seen = now
                .checked_sub(Duration::from_secs(info.age_secs.into()))
                .unwrap_or(now);
            match known.get_mut(&info.id) {
                Some(k) if k.last_seen >= seen => {}
                Some(k) => {
                    k.last_seen = seen;
                    k.leaves = info.leaves;
                    k.max_leaves = info.max_leaves;
                    if k.addr != addr {
                        // A new address for the same key: worth a fresh try.
                        k.addr = addr;
                        k.next_try = now;
                        k.failures = 0;
                    }
                }
                None => {
                    let oldest = |known: &HashMap<NodeId, Known>, pick: &dyn Fn(&Known) -> bool| {
                        known
                            .iter()
                            .filter(|(_, k)| pick(k))
                            .min_by_key(|(_, k)| k.last_seen)
                            .map(|(id, _)| *id)
                    };
                    let by_sender = |k: &Known| !k.verified && k.told_by == Some(from);
                    // Room comes first out of what this neighbour told us,
                    // then out of what nobody has verified.
                    let evict = if known.values().filter(|k| by_sender(k)).count()
                        >= MAX_KNOWN_PER_SENDER
                    {
                        oldest(&known, &by_sender)
                    } else if known.len() >= MAX_KNOWN {
                        oldest(&known, &|k| !k.verified).or_else(|| oldest(&known, &|_| true))
                    } else {
                        None
                    };
                    if let Some(o) = evict {
                        known.remove(&o);
                    }
                    known.insert(
                        info.id,
                        Known {
                            addr,
                            leaves: info.leaves,
                            max_leaves: info.max_leaves,
                            last_seen: seen,
                            next_try: now,
                            failures: 0,
                            verified: false,
                            told_by: Some(from),
                        },
                    );
                }
            }
        }
    }

    /// Records a neighbour that just went away, so it may be redialled later.
    fn remember(&self, id: NodeId, n: &Neighbour, now: Instant) {
        let mut known = self.known.lock().expect("known lock");
        known.insert(
            id,
            Known {
                addr: n.addr,
                leaves: n.leaves,
                max_leaves: n.max_leaves,
                last_seen: now,
                next_try: now + BACKOFF_MIN,
                failures: 0,
                verified: true,
                told_by: None,
            },
        );
    }

    fn failed(&self, id: NodeId, now: Instant) {
        if let Some(k) = self.known.lock().expect("known lock").get_mut(&id) {
            k.failures = k.failures.saturating_add(1);
            let delay = BACKOFF_MIN
                .saturating_mul(1 << k.failures.min(7))
                .min(BACKOFF_MAX * 2);
            k.next_try = now + delay;
        }
    }

    /// Known supernodes worth dialling now, best first.
    fn candidates(&self, me: NodeId, now: Instant) -> Vec<(NodeId, SocketAddr)> {
        let mut known = self.known.lock().expect("known lock");
        known.retain(|_, k| now.saturating_duration_since(k.last_seen) < FORGET_AFTER);
        let dialing = self.dialing.lock().expect("dialing lock");
        let mut v: Vec<_> = known
            .iter()
            .filter(|(id, k)| {
                **id != me
                    && !self.neighbours.contains_key(*id)
                    && k.next_try <= now
                    && !dialing.contains(&k.addr)
            })
            .map(|(id, k)| {
                (
                    (
                        load_permille(k.leaves, k.max_leaves),
                        now.saturating_duration_since(k.last_seen),
                    ),
                    *id,
                    k.addr,
                )
            })
            .collect();
        v.sort_by_key(|(rank, _, _)| *rank);
        v.into_iter().map(|(_, id, addr)| (id, addr)).collect()
    }

    fn ip_caps_allow(&self, addr: SocketAddr, caps: IpCaps, config: &crate::Config) -> bool {
        let current = self.neighbours.iter().map(|n| n.addr.ip());
        ip_allowed(addr.ip(), current, caps, |ip| config.is_exempt(ip))
    }

    /// Adds a link, settling a duplicate deterministically: of two links
    /// between the same pair, both ends keep the one dialled by the lower id.
    /// Returns false if `n` lost and must be closed.
    fn admit(&self, id: NodeId, n: Neighbour) -> bool {
        match self.neighbours.entry(id) {
            dashmap::mapref::entry::Entry::Vacant(v) => {
                v.insert(n);
                true
            }
            dashmap::mapref::entry::Entry::Occupied(mut o) => {
                if o.get().conn.close_reason().is_some() || n.dialer < o.get().dialer {
                    let old = o.insert(n);
                    old.conn.close(0u32.into(), b"duplicate link");
                    true
                } else {
                    false
                }
            }
        }
    }
}

/// Load as thousandths of capacity (full or unknown capacity ranks last).
fn load_permille(leaves: u32, max_leaves: u32) -> u64 {
    if max_leaves == 0 {
        return 1000;
    }
    (u64::from(leaves) * 1000 / u64::from(max_leaves)).min(1000)
}

fn caps(state: &State) -> IpCaps {
    IpCaps {
        per_ip: state.config.neighbors_per_ip,
        per_subnet: state.config.neighbors_per_subnet,
    }
}

fn my_load(state: &State) -> (u32, u32) {
    (
        state.leaves.len() as u32,
        state.config.max_leaves.min(u32::MAX as usize) as u32,
    )
}

/// Keeps the mesh at its target size until `stop` fires: redials
/// bootstrap peers that are not linked, and dials known supernodes while
/// there are fewer neighbours than the target.
pub async fn maintain(state: Arc<State>, listen_port: u16, mut stop: watch::Receiver<bool>) {
    loop {
        let now = Instant::now();
        let mesh = &state.mesh;
        // Bootstrap peers: always wanted, whatever the count.
        let mut due = Vec::new();
        for (i, b) in mesh
            .bootstrap
            .lock()
            .expect("bootstrap lock")
            .iter()
            .enumerate()
        {
            let linked = b.id.is_some_and(|id| mesh.neighbours.contains_key(&id));
            if !linked && b.next_try <= now {
                due.push((i, b.addr.clone()));
            }
        }
        for (i, addr) in due {
            if mesh.neighbours.len() >= state.config.max_neighbors {
                break;
            }
            if let Some(b) = mesh.bootstrap.lock().expect("bootstrap lock").get_mut(i) {
                b.next_try = now + b.delay;
                b.delay = (b.delay * 2).min(BACKOFF_MAX);
            }
            let state = state.clone();
            tokio::spawn(
                async move {
                    let Some(sock) = resolve(&addr).await else {
                        debug!(%addr, "cannot resolve peer");
                        return;
                    };
                    if let Ok(id) = dial(&state, sock, None, listen_port).await {
                        if let Some(b) = state
                            .mesh
                            .bootstrap
                            .lock()
                            .expect("bootstrap lock")
                            .get_mut(i)
                        {
                            b.id = Some(id);
                            b.delay = BACKOFF_MIN;
                        }
                    }
                }
                .in_current_span(),
            );
        }
        // Learned supernodes: up to the target.
        let missing = state
            .config
            .target_neighbors
            .saturating_sub(mesh.neighbours.len());
        if missing > 0 {
            for (id, addr) in mesh.candidates(state.id, now).into_iter().take(missing) {
                let state = state.clone();
                tokio::spawn(
                    async move {
                        if dial(&state, addr, Some(id), listen_port).await.is_err() {
                            state.mesh.failed(id, Instant::now());
                        }
                    }
                    .in_current_span(),
                );
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(MAINTAIN_INTERVAL) => {}
        }
    }
}

async fn resolve(addr: &str) -> Option<SocketAddr> {
    tokio::net::lookup_host(addr).await.ok()?.next()
}

#[derive(Debug, thiserror::Error)]
enum DialError {
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

/// Dials a supernode and, once it welcomes us, runs the link.
async fn dial(
    state: &Arc<State>,
    addr: SocketAddr,
    expected: Option<NodeId>,
    listen_port: u16,
) -> Result<NodeId, ()> {
    {
        let mut dialing = state.mesh.dialing.lock().expect("dialing lock");
        if !dialing.insert(addr) {
            return Err(());
        }
    }
    let result = dial_inner(state, addr, expected, listen_port).await;
    state
        .mesh
        .dialing
        .lock()
        .expect("dialing lock")
        .remove(&addr);
    match result {
        Ok(id) => Ok(id),
        Err(e) => {
            debug!(%addr, error = %e, "mesh dial failed");
            Err(())
        }
    }
}

async fn dial_inner(
    state: &Arc<State>,
    addr: SocketAddr,
    expected: Option<NodeId>,
    listen_port: u16,
) -> Result<NodeId, DialError> {
    let endpoint = state.endpoint().ok_or(DialError::Busy)?;
    let peer = endpoint.connect(addr, ALPN_MESH, expected).await?;
    if peer.id == state.id {
        peer.conn.close(0u32.into(), b"that is me");
        return Err(DialError::Myself);
    }
    if state
        .mesh
        .neighbours
        .get(&peer.id)
        .is_some_and(|n| n.conn.close_reason().is_none())
    {
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
    let n = Neighbour {
        conn: peer.conn.clone(),
        addr,
        leaves: their_leaves,
        max_leaves: their_max,
        dialer: state.id,
        since: Instant::now(),
    };
    // Dials run concurrently: check the cap again now that this one is up.
    if state.mesh.neighbours.len() >= state.config.max_neighbors
        && !state.mesh.neighbours.contains_key(&peer.id)
    {
        peer.conn.close(0u32.into(), b"no room");
        return Err(DialError::Refused(
            "neighbour table filled meanwhile".into(),
        ));
    }
    if !state.mesh.admit(peer.id, n) {
        peer.conn.close(0u32.into(), b"duplicate link");
        return Err(DialError::Duplicate);
    }
    let id = peer.id;
    let span = info_span!("mesh", peer = %id.short(), %addr);
    info!(parent: &span, "linked (dialled)");
    // Accepted links are counted where they are accepted; this one is ours.
    let traffic = state.metrics.traffic.track(&peer.conn);
    let link = run_link(state.clone(), peer, send, recv);
    tokio::spawn(
        async move {
            link.await;
            drop(traffic);
        }
        .instrument(span),
    );
    Ok(id)
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
            if let Err(reason) = welcome(&state, &peer, listen_port, leaves, max_leaves) {
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
                return;
            }
            info!("linked (accepted)");
            run_link(state, peer, send, recv).await;
        }
        Ok(Some(MeshRequest::Query(q))) if state.mesh.neighbours.contains_key(&peer.id) => {
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

/// Whether to take an accepted link; on success it is in the neighbour table.
fn welcome(
    state: &State,
    peer: &Peer,
    listen_port: u16,
    leaves: u32,
    max_leaves: u32,
) -> Result<(), String> {
    if peer.id == state.id {
        return Err("that is me".into());
    }
    if listen_port == 0 {
        return Err("listen_port 0 is not dialable".into());
    }
    let addr = SocketAddr::new(peer.conn.remote_address().ip().to_canonical(), listen_port);
    let existing = state.mesh.neighbours.contains_key(&peer.id);
    if !existing && state.mesh.neighbours.len() >= state.config.max_neighbors {
        return Err(format!(
            "no room: {} neighbours",
            state.config.max_neighbors
        ));
    }
    if !existing && !state.mesh.ip_caps_allow(addr, caps(state), &state.config) {
        return Err(format!("too many neighbours from {}", addr.ip()));
    }
    let n = Neighbour {
        conn: peer.conn.clone(),
        addr,
        leaves,
        max_leaves,
        dialer: peer.id,
        since: Instant::now(),
    };
    if !state.mesh.admit(peer.id, n) {
        return Err("a link to this supernode exists already".into());
    }
    Ok(())
}

/// Runs one link's control stream and, on the dialling side, serves the
/// queries the other end sends, until the connection ends.
async fn run_link(
    state: Arc<State>,
    peer: Peer,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let id = peer.id;
    let conn = peer.conn.clone();
    let dialled = state
        .mesh
        .neighbours
        .get(&id)
        .is_some_and(|n| n.dialer == state.id);
    // The dialling end must also accept the query streams of the other end.
    let streams = dialled.then(|| {
        let (state, peer) = (state.clone(), peer.clone());
        tokio::spawn(serve_streams(state, peer, false).in_current_span())
    });
    let reader = {
        let state = state.clone();
        async move {
            loop {
                // A neighbour that stops gossiping is as good as gone.
                let frame = tokio::time::timeout(
                    SILENCE_LIMIT,
                    net::read_frame::<MeshControl>(&mut recv, MAX_MESH_FRAME),
                );
                let Ok(frame) = frame.await else {
                    warn!("neighbour stopped sending status");
                    return;
                };
                match frame {
                    Ok(Some(MeshControl::Status {
                        leaves,
                        max_leaves,
                        known,
                    })) => {
                        if let Some(mut n) = state.mesh.neighbours.get_mut(&id) {
                            n.leaves = leaves;
                            n.max_leaves = max_leaves;
                        }
                        state.mesh.learn(state.id, id, known, Instant::now());
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
        loop {
            let (leaves, max_leaves) = my_load(&state);
            let known = state.mesh.gossip(Some(id), Instant::now());
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
            tokio::time::sleep(GOSSIP_INTERVAL).await;
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
    let same = |n: &Neighbour| n.conn.stable_id() == conn.stable_id();
    if let Some((_, n)) = state.mesh.neighbours.remove_if(&id, |_, n| same(n)) {
        state.mesh.remember(id, &n, Instant::now());
        state.mesh.rates.remove(&id);
        state.mesh.fair.lock().expect("fair lock").remove_link(&id);
        info!("link down");
    }
    conn.close(0u32.into(), b"link closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(n: u32) -> SupernodeInfo {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        SupernodeInfo {
            id: NodeId(id),
            addr: format!("192.0.2.{}:{}", n % 250 + 1, 7000 + n % 1000),
            leaves: 0,
            max_leaves: 100,
            age_secs: 0,
        }
    }

    #[test]
    fn one_neighbour_cannot_flood_the_known_table() {
        let mesh = Mesh::new(&[], 200.0, 400);
        let me = NodeId([0xee; 32]);
        let (honest, hostile) = (NodeId([1; 32]), NodeId([2; 32]));
        let now = Instant::now();
        mesh.learn(me, honest, (0..10).map(info).collect(), now);
        // Made-up entries, 64 fresh ones every round, always the newest.
        for round in 0..40u32 {
            let batch = (0..64).map(|i| info(1000 + round * 64 + i)).collect();
            mesh.learn(me, hostile, batch, now + Duration::from_secs(round.into()));
        }
        let known = mesh.known.lock().unwrap();
        let from_hostile = known
            .values()
            .filter(|k| k.told_by == Some(hostile))
            .count();
        assert_eq!(from_hostile, MAX_KNOWN_PER_SENDER);
        for n in 0..10 {
            assert!(known.contains_key(&info(n).id), "honest entry {n} kept");
        }
    }
}
