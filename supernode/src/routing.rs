//! Answering queries: from the local index, and across the mesh.
//!
//! The decisions (rate limit, duplicate or not, whom to forward to, with
//! which TTL and budget, when to widen a search, which hits to pass on,
//! when a query is over) are the state machine `servent_proto::hop`; this
//! module carries them out on QUIC streams and searches the index when the
//! machine asks. A query forwarded to a neighbour travels on a stream of
//! its own, and that neighbour's hits come back on the same stream, so
//! hits can only follow the reverse path of a query that was really
//! forwarded. What goes out on each link is shared fairly among the
//! queries' origins (our own leaves, and the neighbours we forward for) by
//! `servent_proto::fair`, so that a flooding neighbour spends only its own
//! share of what the next hop accepts from us.
//!
//! Nothing here waits on the owner task (`crate::owner`) before the hop
//! core has let a query in: the ranked neighbours are read from what the
//! owner publishes, inside the hop core's lazy closure, so a query refused
//! for its rate limit costs no ranking, and each forwarded copy takes its
//! link from the same published list. Only an index answer with hits asks
//! the owner (for where their leaves are now).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use servent_proto::hits::HitBuilder;
use servent_proto::hop::{Action, Arrival, HopQuery, LeafQuery, Local, Lookup, Routing};
use servent_proto::limits::{HITS_PER_WRITTEN_FRAME, MAX_MESH_FRAME, MAX_REPLY_FRAME};
use servent_proto::msg::{
    ErrorCode, ErrorReply, Hit, MeshQuery, MeshRequest, Query, SupernodeReply,
};
use servent_proto::walk::CopyKind;
use servent_proto::NodeId;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, Instrument};

use crate::owner::Command;
use crate::State;
use servent_net::{self as net, StreamError};

/// Searches the local index for what a query's checks said to look up;
/// the sources of each hit are where the owner has their leaves now. This
/// node's own entries (a leaf holding the role, sharing: `leaf/src/lan.rs`)
/// are served at `here`, the address the asker reached it at, or not at
/// all without one.
async fn search(state: &State, lookup: &Lookup, max: usize, here: Option<SocketAddr>) -> Local {
    let (found, examined) = match lookup {
        Lookup::Words(words) => {
            let searched = state.index().search(words, max);
            (searched.found, searched.examined)
        }
        Lookup::Hash(h) => (state.index().get(h).into_iter().collect(), 1),
    };
    let files = found.len();
    let owners: Vec<NodeId> = found
        .iter()
        .flat_map(|f| f.owners.iter().map(|(owner, _)| *owner))
        .filter(|owner| *owner != state.id)
        .collect();
    let addrs = match owners.is_empty() {
        true => Vec::new(),
        false => state
            .ask(|reply| Command::Addrs { ids: owners, reply })
            .await
            .unwrap_or_default(),
    };
    let mut addrs = addrs.into_iter();
    let hits = found
        .into_iter()
        .filter_map(|f| {
            // Every owner's own name and size, counted by independent
            // sources: no one owner names the file for the others.
            let mut hit = HitBuilder::new(f.hash);
            for (owner, variant) in &f.owners {
                if *owner == state.id {
                    if let Some(here) = here {
                        hit.add(*owner, here.to_string(), variant);
                    }
                } else if let Some(addr) = addrs.next().flatten() {
                    // We hold its session: we are its push proxy, named
                    // by whoever receives this hit from us.
                    hit.add_via(*owner, addr.to_string(), Some(String::new()), variant);
                }
            }
            hit.finish()
        })
        .collect();
    Local {
        hits,
        examined,
        found: files,
    }
}

/// Answers the local index for `hq` if it is to be answered, and starts it.
async fn start(state: &State, hq: &mut HopQuery<NodeId>, here: Option<SocketAddr>) {
    let local = match hq.lookup() {
        Some(l) => search(state, l, hq.wanted(), here).await,
        None => Local::default(),
    };
    state.hop().handle_local(Instant::now(), hq, local);
}

async fn write_hits(
    state: &State,
    send: &mut quinn::SendStream,
    hits: &[Hit],
) -> Result<(), StreamError> {
    for batch in hits.chunks(HITS_PER_WRITTEN_FRAME) {
        net::write_frame(send, &SupernodeReply::Hits(batch.to_vec()), MAX_REPLY_FRAME).await?;
    }
    state.metrics.hits_returned.inc_by(hits.len() as u64);
    Ok(())
}

/// What the streams of one query's forwarded copies report.
enum Event {
    Hits(NodeId, Vec<Hit>),
    Ended(NodeId),
}

/// Answers a query of one of our leaves: the local index at once, then the
/// mesh, widening step by step until enough distinct files have been found,
/// every neighbour has answered, or the search time is over.
///
/// `charge` is told what the local search cost beyond the one token the
/// query took to be let in, for the asker's limits to pay. `leaf` is the
/// asker, whose fair share of each link the mesh query is charged to;
/// `here` where it reached us.
pub async fn serve_leaf_query(
    state: &Arc<State>,
    leaf: NodeId,
    here: Option<SocketAddr>,
    q: Query,
    send: &mut quinn::SendStream,
    charge: impl FnOnce(f64),
) -> Result<(), ErrorReply> {
    state.metrics.leaf_queries.inc();
    let ask = LeafQuery {
        leaf,
        id: state.query_id(),
        query: &q,
        ttl: state.config.query_ttl,
        search_time: Duration::from_millis(state.config.search_time_ms.into()),
    };
    let now = Instant::now();
    let arrival = match state.config.routing() {
        Routing::Walk(walk) if walk.walks(state.known_count()) => {
            state
                .hop()
                .from_leaf_walked(&walk, now, ask, |keys| state.walk_view(keys))
        }
        _ => state
            .hop()
            .from_leaf(now, ask, || state.ranked_neighbours()),
    };
    let mut hq = match arrival {
        Arrival::Accepted(hq) => *hq,
        Arrival::Invalid(e) => return Err(e),
        Arrival::RateLimited | Arrival::Duplicate => return Ok(()),
    };
    start(state, &mut hq, here).await;
    state.metrics.queries_processed.inc();
    let mut charge = Some(charge);
    drive(state, &mut hq, &q, send, |tokens| {
        if let Some(charge) = charge.take() {
            charge(tokens);
        }
    })
    .await
    .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))
}

/// Answers a copy of a query a neighbour sent, of kind `kind` (a flood
/// copy, a walker or a probe): drop it if over the neighbour's limit or
/// seen, else answer from the index (unless it was answered here before)
/// and pass it on as the hop core decides (a flood copy with one hop less,
/// walkers one step on, probes to nobody), relaying what comes back until
/// the budget the query allows is spent. `here` is where the neighbour
/// reached us.
pub async fn serve_mesh_query(
    state: Arc<State>,
    from: NodeId,
    here: Option<SocketAddr>,
    mq: MeshQuery,
    kind: CopyKind,
    mut send: quinn::SendStream,
) {
    state.metrics.mesh_queries.inc();
    let now = Instant::now();
    let arrival = match kind {
        CopyKind::Flood { .. } => state
            .hop()
            .from_neighbour(now, from, &mq, || state.ranked_neighbours()),
        kind => {
            state
                .hop()
                .from_neighbour_walked(&state.config.walk(), now, from, &mq, kind, |keys| {
                    state.walk_view(keys)
                })
        }
    };
    let mut hq = match arrival {
        Arrival::Accepted(hq) => *hq,
        Arrival::RateLimited => {
            state.metrics.queries_rate_limited.inc();
            let _ = send.finish();
            return;
        }
        Arrival::Duplicate => {
            state.metrics.queries_duplicate.inc();
            let _ = send.finish();
            return;
        }
        Arrival::Invalid(e) => {
            debug!(error = %e, "bad mesh query");
            let _ = send.finish();
            return;
        }
    };
    if hq.answers() {
        state.metrics.queries_processed.inc();
    } else {
        state.metrics.queries_extended.inc();
    }
    start(&state, &mut hq, here).await;
    // The neighbour pays for the work, not just the query.
    let charge = |tokens: f64| state.hop().charge(Instant::now(), &from, tokens);
    if let Err(e) = drive(&state, &mut hq, &mq.query, &mut send, charge).await {
        debug!(error = %e, "mesh query ended early");
    }
    let _ = send.finish();
}

/// Carries out what `hq` decides until it finishes: forwards copies of
/// `query` on streams of their own, sends hits back on `send`, and feeds
/// back what the copies' streams report and when its timer is due.
async fn drive(
    state: &Arc<State>,
    hq: &mut HopQuery<NodeId>,
    query: &Query,
    send: &mut quinn::SendStream,
    mut charge: impl FnMut(f64),
) -> Result<(), StreamError> {
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    // Dropping the set on any return aborts every copy still running.
    let mut asks = JoinSet::new();
    let mut running: HashMap<NodeId, AbortHandle> = HashMap::new();
    loop {
        while let Some(action) = hq.poll_action() {
            match action {
                Action::Forward { to, copy, budget } => {
                    let request = copy.request(MeshQuery {
                        id: hq.id(),
                        ttl: 0,
                        timeout_ms: u32::try_from(budget.as_millis()).unwrap_or(u32::MAX),
                        query: query.clone(),
                    });
                    let handle = asks.spawn(ask(state.clone(), to, request, tx.clone()));
                    running.insert(to, handle);
                }
                Action::NotForwarded { .. } => {
                    state.metrics.queries_unforwarded.inc();
                }
                Action::SendHits { hits } => write_hits(state, send, &hits).await?,
                Action::Charge { tokens } => charge(tokens),
                Action::Cancel { neighbour } => {
                    if let Some(h) = running.remove(&neighbour) {
                        h.abort();
                    }
                }
                Action::Finish => return Ok(()),
            }
        }
        let Some(wake) = hq.poll_timeout() else {
            return Ok(());
        };
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(Event::Hits(from, hits)) => hq.handle_hits(Instant::now(), &from, hits),
                Some(Event::Ended(from)) => {
                    running.remove(&from);
                    hq.handle_ended(Instant::now(), &from);
                }
                // `tx` is held here: never.
                None => return Ok(()),
            },
            _ = tokio::time::sleep_until(wake.into()) => {
                state.hop().handle_timeout(Instant::now(), hq);
            }
        }
    }
}

/// Asks neighbour `to` on a stream of its own; its hits and its end
/// arrive on `tx`. The query's own deadline bounds how long this runs.
fn ask(
    state: Arc<State>,
    to: NodeId,
    request: MeshRequest,
    tx: mpsc::Sender<Event>,
) -> impl std::future::Future<Output = ()> {
    async move {
        // Gone since the query was ranked: the copy just ends.
        if let Some(conn) = state.link_conn(&to) {
            state.metrics.queries_forwarded.inc();
            let _ = relay(conn, to, request, &tx).await;
        }
        let _ = tx.send(Event::Ended(to)).await;
    }
    .in_current_span()
}

async fn relay(
    conn: quinn::Connection,
    to: NodeId,
    request: MeshRequest,
    tx: &mpsc::Sender<Event>,
) -> Result<(), StreamError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| StreamError::Write(e.into()))?;
    net::write_frame(&mut send, &request, MAX_MESH_FRAME).await?;
    let _ = send.finish();
    while let Some(reply) = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME).await? {
        match reply {
            SupernodeReply::Hits(mut hits) => {
                // The sources this neighbour holds have it as push proxy.
                let from = net::canonical(conn.remote_address());
                for s in hits.iter_mut().flat_map(|h| h.sources.iter_mut()) {
                    s.resolve_via(&from);
                }
                if tx.send(Event::Hits(to, hits)).await.is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use servent_net::{Endpoint, Identity};
    use servent_proto::msg::{QueryKind, ALPN_MESH};

    const T: Duration = Duration::from_secs(5);

    fn query(id: u64) -> MeshQuery {
        MeshQuery {
            id,
            ttl: 3,
            timeout_ms: 2000,
            query: Query {
                kind: QueryKind::Keywords(vec!["tune".into()]),
                max_results: 10,
            },
        }
    }

    /// Sends `mq` from `client` on a stream of its own and serves it at
    /// `state` as a query of neighbour `from`, within `T`; returns the
    /// frames the asker got back before the stream was finished.
    async fn serve_one(
        state: &Arc<State>,
        client: &quinn::Connection,
        server: &quinn::Connection,
        from: NodeId,
        mq: MeshQuery,
    ) -> usize {
        let (mut send, mut recv) = client.open_bi().await.expect("open a stream");
        net::write_frame(&mut send, &MeshRequest::Query(mq), MAX_MESH_FRAME)
            .await
            .expect("write the query");
        let _ = send.finish();
        let (their_send, mut their_recv) = server.accept_bi().await.expect("accept the stream");
        let Ok(Some(MeshRequest::Query(mq))) =
            net::read_first_frame::<MeshRequest>(&mut their_recv, MAX_MESH_FRAME).await
        else {
            panic!("the query did not arrive");
        };
        let kind = CopyKind::Flood { ttl: mq.ttl };
        tokio::time::timeout(
            T,
            serve_mesh_query(state.clone(), from, None, mq, kind, their_send),
        )
        .await
        .expect("the query was served without the owner");
        let mut frames = 0;
        while let Ok(Ok(Some(_))) = tokio::time::timeout(
            T,
            net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME),
        )
        .await
        {
            frames += 1;
        }
        frames
    }

    /// The owner is never started here: had routing asked it anything
    /// (neighbours, a link, an id), the query would wait for ever and a
    /// command would sit in its queue.
    #[tokio::test]
    async fn mesh_queries_are_decided_without_the_owner() {
        let config = Config {
            // One query and one duplicate pass the bucket, the next is
            // over it (and the bucket does not refill meanwhile).
            mesh_query_burst: 2,
            mesh_query_rate: 0.001,
            ..Config::localhost()
        };
        let at = "127.0.0.1:0".parse().unwrap();
        let server_ep =
            Endpoint::bind(Arc::new(Identity::generate().unwrap()), at, &[ALPN_MESH]).unwrap();
        let client_ep =
            Endpoint::bind(Arc::new(Identity::generate().unwrap()), at, &[ALPN_MESH]).unwrap();
        let state = Arc::new(State::new(server_ep.id(), config, false));
        let to = server_ep.local_addr().unwrap();
        let (client, server) = tokio::join!(client_ep.connect(to, ALPN_MESH, None), async {
            net::accept(server_ep.quinn().accept().await.expect("incoming")).await
        });
        let client = client.expect("connect").conn;
        let server = server.expect("accept");
        let from = server.id;

        let queued = || state.owner.commands.max_capacity() - state.owner.commands.capacity();
        let m = &state.metrics;
        assert_eq!(
            serve_one(&state, &client, &server.conn, from, query(7)).await,
            0
        );
        assert_eq!(m.queries_processed.get(), 1, "the first copy is answered");
        serve_one(&state, &client, &server.conn, from, query(7)).await;
        assert_eq!(
            m.queries_duplicate.get(),
            1,
            "the second copy is a duplicate"
        );
        serve_one(&state, &client, &server.conn, from, query(8)).await;
        assert_eq!(
            m.queries_rate_limited.get(),
            1,
            "the third is over the limit"
        );
        assert_eq!(queued(), 0, "routing sent the owner a command");
        client.close(0u32.into(), b"done");
        server_ep.close();
        client_ep.close();
    }
}
