//! The supernode mesh (ALPN `servent-mesh/3`) over QUIC: the driver of
//! [`servent_proto::mesh::Membership`], which decides who our neighbours
//! are, what we know of other supernodes, whom to dial, what to gossip and
//! when a neighbour is gone. The core and the links' connections, keyed by
//! link, are held by the node's owner (`crate::owner`); this module only
//! carries the core's decisions out: it dials, runs each link's control
//! stream, and sends the owner what happens (dial outcomes, `Hello`s,
//! `Status` frames, links that end; the owner adds RTT samples and timer
//! expiries).
//!
//! A neighbour's own address is the one its connection comes from (with the
//! port its `Hello` gave); gossiped addresses are only claims, dialled with
//! the gossiped id as the expected node id. Query routing over these links
//! is in [`crate::routing`]; the per-neighbour query state (seen ids, rate
//! limits, fair forwarding) is `servent_proto::hop::HopNode`, kept in the
//! node's `State` and told here when a link goes down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use servent_proto::filter::{
    FilterCopy, FilterError, FilterSender, Update, FILTER_CHECK, FILTER_UPDATE_BURST,
    FILTER_UPDATE_RATE, MAX_FILTER_FILL_PERMILLE,
};
use servent_proto::limits::MAX_MESH_FRAME;
use servent_proto::mesh::{Action, CloseReason, DialAddr, DialId, LinkId, Membership, Refusal};
use servent_proto::msg::{
    ErrorCode, ErrorReply, FilterBits, MeshControl, MeshRequest, SupernodeInfo, ALPN_MESH,
};
use servent_proto::rate::TokenBucket;
use servent_proto::walk::CopyKind;
use servent_proto::NodeId;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::owner::{Command, Io, NewLink};
use crate::{routing, State};
use servent_net::gate::Inbound;
use servent_net::{self as net, Peer, StreamError};

/// `Status` frames waiting for a link's writer. The core queues one a
/// gossip interval; a writer this far behind has a link that is dying.
const GOSSIP_QUEUE: usize = 4;

/// A link the core has admitted: the connection it runs on. The owner
/// keeps exactly the links of the core's neighbours.
pub(crate) struct Link {
    pub peer: NodeId,
    pub conn: quinn::Connection,
    /// The `known` lists of the `Status` frames to send on it.
    pub gossip: mpsc::Sender<Vec<SupernodeInfo>>,
}

pub(crate) fn link_id(conn: &quinn::Connection) -> LinkId {
    LinkId(conn.stable_id() as u64)
}

/// Carries out what the mesh core asked for: queues gossip, closes links
/// and starts dials (the owner calls this; nothing here waits).
pub(crate) fn carry_out(io: &Io<'_>, core: &mut Membership, links: &mut HashMap<LinkId, Link>) {
    while let Some(action) = core.poll_action() {
        match action {
            Action::Dial { dial, expect, addr } => {
                let state = io.state.clone();
                tokio::spawn(run_dial(state, dial, expect, addr, io.listen_port).in_current_span());
            }
            Action::SendGossip { link, known, .. } => {
                if let Some(l) = links.get(&link) {
                    // A full queue: that link's writer is stuck, and the
                    // next frame will carry fresher news anyway.
                    let _ = l.gossip.try_send(known);
                }
            }
            Action::Close { id, link, reason } => {
                let Some(link) = links.remove(&link) else {
                    continue;
                };
                link.conn.close(0u32.into(), reason.as_str().as_bytes());
                match reason {
                    CloseReason::Replaced => {
                        debug!(peer = %id.short(), "duplicate link closed");
                        continue;
                    }
                    CloseReason::Silent => {
                        warn!(peer = %id.short(), "neighbour stopped sending status")
                    }
                    CloseReason::Ended => {}
                }
                io.state.hop().remove_neighbour(&id);
                info!(peer = %id.short(), "link down");
            }
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
            Some(addr) => {
                let go_on = state
                    .ask(|reply| Command::Resolved { dial, addr, reply })
                    .await;
                if go_on != Some(true) {
                    return;
                }
                Some(addr)
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
        state.send(Command::DialFailed { dial }).await;
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
    let id = peer.id;
    let linked = state.ask(|reply| Command::IsLinked { id, reply }).await;
    if linked != Some(false) {
        peer.conn.close(0u32.into(), b"already linked");
        return Err(DialError::Duplicate);
    }
    let (mut send, mut recv) = peer
        .conn
        .open_bi()
        .await
        .map_err(|e| DialError::Refused(e.to_string()))?;
    let (leaves, max_leaves) = state.load();
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
    let link = new_link(&peer, tx);
    let admitted = state
        .ask(|reply| Command::Dialled {
            dial,
            link,
            leaves: their_leaves,
            max_leaves: their_max,
            reply,
        })
        .await;
    match admitted {
        Some(Ok(())) => {}
        None => {
            peer.conn.close(0u32.into(), b"shutting down");
            return Err(DialError::Busy);
        }
        Some(Err(Refusal::NoRoom(_))) => {
            peer.conn.close(0u32.into(), b"no room");
            return Err(DialError::Refused(
                "neighbour table filled meanwhile".into(),
            ));
        }
        Some(Err(_)) => {
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

fn new_link(peer: &Peer, gossip: mpsc::Sender<Vec<SupernodeInfo>>) -> NewLink {
    NewLink {
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
            let welcomed = welcome(&state, &peer, listen_port, leaves, max_leaves, tx).await;
            if let Err(refusal) = welcomed {
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
            let (leaves, max_leaves) = state.load();
            let welcome = MeshControl::Welcome { leaves, max_leaves };
            if net::write_frame(&mut send, &welcome, MAX_MESH_FRAME)
                .await
                .is_err()
            {
                link_down(&state, &peer).await;
                return;
            }
            info!("linked (accepted)");
            run_link(state, peer, false, send, recv, rx).await;
        }
        Ok(Some(MeshRequest::Query(q))) if state.is_neighbour(&peer.id) => {
            let kind = CopyKind::Flood { ttl: q.ttl };
            let here = state.reached_at(&peer.conn);
            routing::serve_mesh_query(state, peer.id, here, q, kind, send).await;
        }
        Ok(Some(MeshRequest::Walk { query, walkers })) if state.is_neighbour(&peer.id) => {
            let kind = CopyKind::Walk {
                walkers,
                steps: query.ttl,
            };
            let here = state.reached_at(&peer.conn);
            routing::serve_mesh_query(state, peer.id, here, query, kind, send).await;
        }
        Ok(Some(MeshRequest::Probe(q))) if state.is_neighbour(&peer.id) => {
            let here = state.reached_at(&peer.conn);
            routing::serve_mesh_query(state, peer.id, here, q, CopyKind::Probe, send).await;
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
async fn welcome(
    state: &Arc<State>,
    peer: &Peer,
    listen_port: u16,
    leaves: u32,
    max_leaves: u32,
    gossip: mpsc::Sender<Vec<SupernodeInfo>>,
) -> Result<(), Refusal> {
    let ip = peer.conn.remote_address().ip().to_canonical();
    let link = new_link(peer, gossip);
    state
        .ask(|reply| Command::Hello {
            link,
            ip,
            listen_port,
            leaves,
            max_leaves,
            reply,
        })
        .await
        // The owner is gone: the node is going too.
        .unwrap_or(Err(Refusal::NoRoom(0)))
}

/// Tells the core that this connection's link has ended.
async fn link_down(state: &State, peer: &Peer) {
    let (id, link) = (peer.id, link_id(&peer.conn));
    state.send(Command::LinkDown { id, link }).await;
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
        let conn = conn.clone();
        async move {
            let mut filter = FilterCopy::default();
            let mut filter_rate =
                TokenBucket::new(FILTER_UPDATE_RATE, FILTER_UPDATE_BURST, Instant::now());
            loop {
                // Silence is the core's to judge (its timers drop the
                // neighbour and close the connection).
                match net::read_frame::<MeshControl>(&mut recv, MAX_MESH_FRAME).await {
                    Ok(Some(
                        update @ (MeshControl::Filter { .. } | MeshControl::FilterPatch(_)),
                    )) => {
                        if !filter_rate.try_take(Instant::now()) {
                            warn!("filter updates too fast: link dropped");
                            conn.close(1u32.into(), b"filter updates too fast");
                            return;
                        }
                        let copied = match &update {
                            MeshControl::FilterPatch(bits) => filter.handle_patch(bits),
                            MeshControl::Filter { log2, bits } => {
                                filter.handle_full(*log2, &bits.0)
                            }
                            // Only the two kinds above come here.
                            _ => Err(FilterError::NoFilter),
                        };
                        match copied {
                            Ok(f) => {
                                let filter = Arc::new(f.clone());
                                state.send(Command::Filter { id, link, filter }).await;
                            }
                            Err(e) => {
                                warn!(error = %e, "bad filter: link dropped");
                                conn.close(1u32.into(), format!("bad filter: {e}").as_bytes());
                                return;
                            }
                        }
                    }
                    Ok(Some(MeshControl::Status {
                        leaves,
                        max_leaves,
                        known,
                        elected,
                    })) => {
                        let status = Command::Status {
                            id,
                            link,
                            leaves,
                            max_leaves,
                            known,
                            elected,
                        };
                        state.send(status).await;
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
        // What this neighbour was last sent of our keyword filter, and
        // the snapshot that was.
        let mut filter = FilterSender::default();
        let mut last: Option<Arc<servent_proto::filter::Filter>> = None;
        let mut tick = tokio::time::interval(FILTER_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                known = gossip.recv() => {
                    // Ends when the core drops the link (the sender goes
                    // with it).
                    let Some(known) = known else { return };
                    let (leaves, max_leaves) = state.load();
                    let status = MeshControl::Status {
                        leaves,
                        max_leaves,
                        known,
                        elected: state.elected,
                    };
                    if net::write_frame(&mut send, &status, MAX_MESH_FRAME)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    continue;
                }
                _ = tick.tick() => {}
            }
            // What changed of our filter since this neighbour was last
            // sent it: a patch, or the whole filter, at most once a
            // `FILTER_CHECK`. One too full to be taken (more words than the
            // largest filter holds) is not sent; the neighbour then never
            // probes us, and walkers still visit.
            let current = state.index().filter();
            if last.as_ref().is_some_and(|l| Arc::ptr_eq(l, &current))
                || current.fill_permille() > MAX_FILTER_FILL_PERMILLE
            {
                continue;
            }
            last = Some(current.clone());
            let update = match filter.update(&current) {
                None => continue,
                Some(Update::Full(f)) => {
                    let (log2, bits) = f.to_wire();
                    MeshControl::Filter {
                        log2,
                        bits: FilterBits(bits),
                    }
                }
                Some(Update::Patch(bits)) => MeshControl::FilterPatch(bits),
            };
            if net::write_frame(&mut send, &update, MAX_MESH_FRAME)
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
    link_down(&state, &peer).await;
    conn.close(0u32.into(), b"link closed");
}
