//! Answering queries: from the local index, and across the mesh.
//!
//! The decisions (duplicate or not, whom to forward to, with which TTL, when
//! to widen a search) are the pure functions of `servent_proto::route`; this
//! module carries them out on QUIC streams. A query forwarded to a neighbour
//! travels on a stream of its own, and that neighbour's hits come back on
//! the same stream, so hits can only follow the reverse path of a query that
//! was really forwarded. What goes out on each link is shared fairly among
//! the queries' origins (our own leaves, and the neighbours we forward
//! for) by `servent_proto::fair`, so that a flooding neighbour spends only
//! its own share of what the next hop accepts from us.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use servent_proto::cost::query_cost;
use servent_proto::fair::Origin;
use servent_proto::hits::{self, HitBuilder};
use servent_proto::keywords;
use servent_proto::limits::{
    MAX_HITS_PER_FRAME, MAX_MESH_FRAME, MAX_QUERY_WORDS, MAX_REPLY_FRAME, MAX_RESULTS,
    MAX_SOURCES_PER_HIT,
};
use servent_proto::msg::{
    ErrorCode, ErrorReply, Hit, MeshQuery, MeshRequest, Query, QueryKind, SupernodeReply,
};
use servent_proto::rate::TokenBucket;
use servent_proto::route::{on_query, DynamicQuery, QueryAction};
use servent_proto::{ContentHash, NodeId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, Instrument};

use crate::net::{self, StreamError};
use crate::State;

/// Each hop keeps this much of its budget for sending its answer back.
const HOP_MARGIN: Duration = Duration::from_millis(250);
/// The origin asks one more group of neighbours this often.
const STEP: Duration = Duration::from_millis(300);
/// Longest a mesh query may ask a hop to spend.
const MAX_HOP_BUDGET: Duration = Duration::from_secs(10);
/// Most hits relayed from one neighbour's answer.
const MAX_RELAYED_HITS: usize = 4 * MAX_RESULTS as usize;

/// Checks a query and answers it from the local index, with what it cost
/// (in query-limit tokens, `servent_proto::cost`).
pub fn local_hits(state: &State, q: &Query) -> Result<(Vec<Hit>, f64), ErrorReply> {
    let max = q.max_results.clamp(1, MAX_RESULTS) as usize;
    let (found, examined) = match &q.kind {
        QueryKind::Keywords(terms) => {
            let words = keywords::words(&terms.join(" "));
            if words.is_empty() {
                return Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    "a query needs at least one word",
                ));
            }
            if words.len() > MAX_QUERY_WORDS {
                return Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    format!("a query may have at most {MAX_QUERY_WORDS} words"),
                ));
            }
            let searched = state.index.search(&words, max);
            (searched.found, searched.examined)
        }
        QueryKind::Hash(h) => (state.index.get(h).into_iter().collect(), 1),
    };
    let cost = query_cost(examined, found.len());
    let hits = found
        .into_iter()
        .filter_map(|f| {
            // Every owner's own name and size, counted by independent
            // sources: no one owner names the file for the others.
            let mut hit = HitBuilder::new(f.hash);
            for (owner, variant) in &f.owners {
                if let Some(e) = state.leaves.get(owner) {
                    hit.add(*owner, e.addr.to_string(), variant);
                }
            }
            hit.finish()
        })
        .collect();
    Ok((hits, cost))
}

/// Hits already sent on one stream, so that only news is sent again.
#[derive(Default)]
struct Sent {
    sources: HashMap<ContentHash, Known>,
}

/// The sources of one hash sent so far, by id and by address.
#[derive(Default)]
struct Known {
    ids: HashSet<NodeId>,
    addrs: HashSet<String>,
}

impl Sent {
    /// Keeps what is new in `hits`: new hashes, or new sources of known
    /// ones (new by id and by address). Each hit is rebuilt on its own
    /// (`hits::retain_sources`), so a frame stays self-contained and its
    /// names are ranked on the sources it lists.
    fn news(&mut self, hits: Vec<Hit>) -> Vec<Hit> {
        let mut out = Vec::new();
        for hit in hits {
            let known = self.sources.entry(hit.hash).or_default();
            if known.ids.len() >= MAX_SOURCES_PER_HIT {
                continue;
            }
            let room = MAX_SOURCES_PER_HIT - known.ids.len();
            let mut taken = 0;
            let news = hits::retain_sources(&hit, |s| {
                let new =
                    taken < room && !known.ids.contains(&s.id) && !known.addrs.contains(&s.addr);
                taken += new as usize;
                new
            });
            if let Some(news) = news {
                for s in &news.sources {
                    known.ids.insert(s.id);
                    known.addrs.insert(s.addr.clone());
                }
                out.push(news);
            }
        }
        out
    }

    fn hashes(&self) -> usize {
        self.sources.len()
    }
}

async fn write_hits(
    state: &State,
    send: &mut quinn::SendStream,
    hits: &[Hit],
) -> Result<(), StreamError> {
    for batch in hits.chunks(MAX_HITS_PER_FRAME) {
        net::write_frame(send, &SupernodeReply::Hits(batch.to_vec()), MAX_REPLY_FRAME).await?;
    }
    state.metrics.hits_returned.inc_by(hits.len() as u64);
    Ok(())
}

enum Event {
    Hits(Vec<Hit>),
    Done,
}

/// Answers a query of one of our leaves: the local index at once, then the
/// mesh, widening step by step until enough distinct files have been found,
/// every neighbour has answered, or the search time is over.
///
/// `charge` is told what the local search cost beyond the one token the
/// query took to be let in, for the asker's limits to pay. `leaf` is the
/// asker, whose fair share of each link the mesh query is charged to.
pub async fn serve_leaf_query(
    state: &Arc<State>,
    leaf: NodeId,
    q: Query,
    send: &mut quinn::SendStream,
    charge: impl FnOnce(f64),
) -> Result<(), ErrorReply> {
    state.metrics.leaf_queries.inc();
    let (local, cost) = local_hits(state, &q)?;
    charge(cost - 1.0);
    let mut sent = Sent::default();
    let wanted = q.max_results.clamp(1, MAX_RESULTS) as usize;
    let io = |e: StreamError| ErrorReply::new(ErrorCode::Internal, e.to_string());
    write_hits(state, send, &sent.news(local))
        .await
        .map_err(io)?;
    state.metrics.queries_processed.inc();

    let id: u64 = rand::random();
    let now = Instant::now();
    let neighbours = state.mesh.ranked_neighbours();
    let action = {
        let mut seen = state.mesh.seen.lock().expect("seen lock");
        on_query(
            &mut seen,
            now,
            id,
            state.config.query_ttl,
            None,
            &neighbours,
        )
    };
    let QueryAction::Process { forward, ttl } = action else {
        return Ok(());
    };
    if forward.is_empty() || sent.hashes() >= wanted {
        return Ok(());
    }
    let search_time = Duration::from_millis(state.config.search_time_ms.into());
    let deadline = now + search_time;
    let mut plan = DynamicQuery::new(forward, wanted, now, deadline, STEP);
    plan.add_results(sent.hashes());
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    let mut asks = JoinSet::new();
    loop {
        let now = Instant::now();
        for n in plan.poll(now) {
            let budget = deadline
                .saturating_duration_since(now)
                .saturating_sub(HOP_MARGIN);
            let mq = MeshQuery {
                id,
                ttl,
                timeout_ms: budget.as_millis() as u32,
                query: q.clone(),
            };
            if !ask(
                state,
                &mut asks,
                n,
                mq,
                tx.clone(),
                Origin::Leaf(leaf),
                cost,
            ) {
                // Not sent: as if that neighbour had found nothing.
                plan.on_answer(0);
                plan.hurry_if_idle(now);
            }
        }
        if plan.is_done(now) {
            break;
        }
        let wake = tokio::time::Instant::from_std(plan.next_wakeup());
        tokio::select! {
            ev = rx.recv() => match ev {
                Some(Event::Hits(hits)) => {
                    let before = sent.hashes();
                    let news = sent.news(hits);
                    write_hits(state, send, &news).await.map_err(io)?;
                    plan.add_results(sent.hashes() - before);
                }
                Some(Event::Done) => {
                    plan.on_answer(0);
                    plan.hurry_if_idle(Instant::now());
                }
                None => break,
            },
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    asks.abort_all();
    Ok(())
}

/// Starts asking neighbour `to`, if `origin` is within its fair share of
/// that link (`servent_proto::fair`; `cost` is what the query cost here,
/// the estimate of what it costs there); its hits and its end then arrive
/// on `tx`. Returns whether it was sent.
fn ask(
    state: &Arc<State>,
    asks: &mut JoinSet<()>,
    to: NodeId,
    mq: MeshQuery,
    tx: mpsc::Sender<Event>,
    origin: Origin<NodeId>,
    cost: f64,
) -> bool {
    let verdict =
        state
            .mesh
            .fair
            .lock()
            .expect("fair lock")
            .decide(Instant::now(), &to, &origin, cost);
    if !verdict.forwards() {
        state.metrics.queries_unforwarded.inc();
        return false;
    }
    let conn = state.mesh.conn(&to);
    let state = state.clone();
    asks.spawn(
        async move {
            if let Some(conn) = conn {
                state.metrics.queries_forwarded.inc();
                let budget = Duration::from_millis(mq.timeout_ms.into()) + HOP_MARGIN;
                let _ = tokio::time::timeout(budget, relay(conn, mq, &tx)).await;
            }
            let _ = tx.send(Event::Done).await;
        }
        .in_current_span(),
    );
    true
}

async fn relay(
    conn: quinn::Connection,
    mq: MeshQuery,
    tx: &mpsc::Sender<Event>,
) -> Result<(), StreamError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| StreamError::Write(e.into()))?;
    net::write_frame(&mut send, &MeshRequest::Query(mq), MAX_MESH_FRAME).await?;
    let _ = send.finish();
    let mut relayed = 0;
    while let Some(reply) = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME).await? {
        match reply {
            SupernodeReply::Hits(hits) => {
                relayed += hits.len();
                if tx.send(Event::Hits(hits)).await.is_err() || relayed > MAX_RELAYED_HITS {
                    break;
                }
            }
            _ => break,
        }
    }
    Ok(())
}

/// Answers a query a neighbour forwarded: drop it if seen, else answer from
/// the index and forward it with one hop less, relaying what comes back
/// until the budget the query allows is spent.
pub async fn serve_mesh_query(
    state: Arc<State>,
    from: NodeId,
    mq: MeshQuery,
    mut send: quinn::SendStream,
) {
    state.metrics.mesh_queries.inc();
    let now = Instant::now();
    let allowed = state
        .mesh
        .rates
        .entry(from)
        .or_insert_with(|| {
            TokenBucket::new(
                state.config.mesh_query_rate,
                state.config.mesh_query_burst,
                now,
            )
        })
        .try_take(now);
    if !allowed {
        state.metrics.queries_rate_limited.inc();
        let _ = send.finish();
        return;
    }
    let neighbours = state.mesh.ranked_neighbours();
    let action = {
        let mut seen = state.mesh.seen.lock().expect("seen lock");
        on_query(&mut seen, now, mq.id, mq.ttl, Some(&from), &neighbours)
    };
    let (forward, ttl, answer) = match action {
        QueryAction::Process { forward, ttl } => (forward, ttl, true),
        QueryAction::Extend { forward, ttl } => (forward, ttl, false),
        QueryAction::Duplicate => {
            state.metrics.queries_duplicate.inc();
            let _ = send.finish();
            return;
        }
    };
    if answer {
        state.metrics.queries_processed.inc();
    } else {
        state.metrics.queries_extended.inc();
    }
    let budget = Duration::from_millis(mq.timeout_ms.into()).min(MAX_HOP_BUDGET);
    let deadline = now + budget;
    let result = async {
        // An extension was answered the first time round: only forward it.
        let (local, cost) = match local_hits(&state, &mq.query) {
            Ok((hits, cost)) => {
                // The neighbour pays for the work, not just the query.
                if let Some(mut bucket) = state.mesh.rates.get_mut(&from) {
                    bucket.take_many(cost - 1.0, Instant::now());
                }
                if answer {
                    (hits, cost)
                } else {
                    (Vec::new(), cost)
                }
            }
            Err(e) => {
                debug!(error = %e, "bad mesh query");
                return Ok(());
            }
        };
        let mut sent = Sent::default();
        write_hits(&state, &mut send, &sent.news(local)).await?;
        let child_budget = budget.saturating_sub(HOP_MARGIN);
        if forward.is_empty() || child_budget.is_zero() {
            return Ok(());
        }
        let (tx, mut rx) = mpsc::channel::<Event>(64);
        let mut asks = JoinSet::new();
        let child = MeshQuery { id: mq.id, ttl, timeout_ms: child_budget.as_millis() as u32, query: mq.query.clone() };
        let mut outstanding = 0;
        for n in forward {
            // The sender spends only its own share of each onward link.
            let origin = Origin::Neighbour(from);
            outstanding += usize::from(ask(&state, &mut asks, n, child.clone(), tx.clone(), origin, cost));
        }
        drop(tx);
        while outstanding > 0 {
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(Event::Hits(hits)) => write_hits(&state, &mut send, &sent.news(hits)).await?,
                    Some(Event::Done) => outstanding -= 1,
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline.into()) => break,
            }
        }
        asks.abort_all();
        Ok::<(), StreamError>(())
    }
    .await;
    if let Err(e) = result {
        debug!(error = %e, "mesh query ended early");
    }
    let _ = send.finish();
}
