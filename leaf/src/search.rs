//! Asking supernodes: keyword and hash queries, with the hits of every
//! supernode asked merged by content hash, each source once by id and by
//! address, and every name recounted by independent sources
//! (`servent_proto::hits`): what a hit shows is what most sources agree
//! on, whichever supernode or source answered first.

use std::time::Duration;

use servent_net::{self as net, Endpoint};
use servent_proto::hits;
use servent_proto::limits::{MAX_REPLY_FRAME, MAX_REQUEST_FRAME, MAX_RESULTS};
use servent_proto::msg::{Hit, LeafRequest, Query, QueryKind, SupernodeReply, ALPN_LEAF};
use tracing::{debug, warn};

use crate::link::resolve;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error(
        "no supernode given: pass --supernode ADDR (or run `leaf serve` once to remember some)"
    )]
    NoSupernodes,
    #[error("no supernode reachable (tried {tried}): {last}")]
    Unreachable { tried: String, last: String },
    #[error("supernode refused the query: {0}")]
    Refused(String),
}

/// Supernodes asked at the same time.
const ASKED_AT_ONCE: usize = 3;

/// The timings of a search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchTimings {
    /// How long a supernode may take to complete the handshake when there
    /// are others left to ask: a dead one (a stale cache entry) must not
    /// use up the whole search. The last few asked get until the deadline.
    /// Default 1.5 s.
    pub ask_connect_timeout: Duration,
}

impl Default for SearchTimings {
    fn default() -> Self {
        Self {
            ask_connect_timeout: Duration::from_millis(1500),
        }
    }
}

/// Asks the supernodes in `supernodes` (a few at a time, in order, until
/// one answers), merges their hits by hash and ranks them by independent
/// sources, most first.
pub async fn query(
    endpoint: &Endpoint,
    supernodes: &[String],
    kind: QueryKind,
    max_results: u32,
    timeout: Duration,
    timings: &SearchTimings,
) -> Result<Vec<Hit>, SearchError> {
    query_streaming(
        endpoint,
        supernodes,
        kind,
        max_results,
        timeout,
        timings,
        None,
    )
    .await
}

/// [`query`], also handing each batch of hits to `batches` as it arrives
/// (sources resolved, not merged: a hash may come again in a later batch).
/// The batches are bounded as the answers are: at most [`MAX_RESULTS`]
/// hits and a few more from each supernode asked.
pub async fn query_streaming(
    endpoint: &Endpoint,
    supernodes: &[String],
    kind: QueryKind,
    max_results: u32,
    timeout: Duration,
    timings: &SearchTimings,
    batches: Option<tokio::sync::mpsc::UnboundedSender<Vec<Hit>>>,
) -> Result<Vec<Hit>, SearchError> {
    if supernodes.is_empty() {
        return Err(SearchError::NoSupernodes);
    }
    let query = Query {
        kind,
        max_results: max_results.min(MAX_RESULTS),
    };
    // The mesh spreads a query from any one supernode: ask a few at a time,
    // and more only if none of those answers.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut all: Vec<Hit> = Vec::new();
    let mut reached = 0;
    let mut last = String::from("timed out");
    let groups = supernodes.len().div_ceil(ASKED_AT_ONCE);
    for (g, group) in supernodes.chunks(ASKED_AT_ONCE).enumerate() {
        // Only where others are left to ask is a slow handshake cut short.
        let connect_by = match g + 1 < groups {
            true => deadline.min(tokio::time::Instant::now() + timings.ask_connect_timeout),
            false => deadline,
        };
        if reached > 0 || tokio::time::Instant::now() >= deadline {
            break;
        }
        let mut asks = tokio::task::JoinSet::new();
        for addr in group {
            let (endpoint, addr, query) = (endpoint.clone(), addr.clone(), query.clone());
            let batches = batches.clone();
            asks.spawn(async move {
                let answer = ask(&endpoint, &addr, query, connect_by, deadline, batches).await;
                (addr, answer)
            });
        }
        let answers = asks.join_all().await;
        for (addr, answer) in answers {
            let hits = match answer {
                Ok(h) => h,
                Err(AskError::Refused(e)) => return Err(SearchError::Refused(e)),
                Err(AskError::Other(e)) => {
                    warn!(supernode = %addr, error = %e, "query failed");
                    last = e;
                    continue;
                }
            };
            reached += 1;
            all.extend(hits);
        }
    }
    if reached == 0 {
        return Err(SearchError::Unreachable {
            tried: supernodes.join(", "),
            last,
        });
    }
    let mut merged = hits::merge(all);
    hits::rank(&mut merged);
    merged.truncate(max_results as usize);
    Ok(merged)
}

enum AskError {
    Refused(String),
    Other(String),
}

/// Asks one supernode, giving up if it has not completed the handshake by
/// `connect_by`; at `deadline`, keeps what has arrived so far.
async fn ask(
    endpoint: &Endpoint,
    addr: &str,
    query: Query,
    connect_by: tokio::time::Instant,
    deadline: tokio::time::Instant,
    batches: Option<tokio::sync::mpsc::UnboundedSender<Vec<Hit>>>,
) -> Result<Vec<Hit>, AskError> {
    let other = |e: String| AskError::Other(e);
    let connect = async {
        let sock = resolve(addr)
            .await
            .ok_or_else(|| other(format!("cannot resolve {addr}")))?;
        endpoint
            .connect(sock, ALPN_LEAF, None)
            .await
            .map_err(|e| other(e.to_string()))
    };
    let peer = tokio::time::timeout_at(connect_by, connect)
        .await
        .map_err(|_| other(format!("{addr} did not answer in time")))??;
    let (mut send, mut recv) = peer
        .conn
        .open_bi()
        .await
        .map_err(|e| other(e.to_string()))?;
    net::write_frame(&mut send, &LeafRequest::Query(query), MAX_REQUEST_FRAME)
        .await
        .map_err(|e| other(e.to_string()))?;
    let _ = send.finish();
    let mut hits = Vec::new();
    loop {
        let frame = tokio::time::timeout_at(
            deadline,
            net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME),
        );
        let Ok(frame) = frame.await else {
            debug!(supernode = %addr, hits = hits.len(), "out of time; keeping what came");
            break;
        };
        match frame {
            Ok(Some(SupernodeReply::Hits(mut batch))) => {
                // The sources this supernode holds have it as push proxy.
                let at = peer.conn.remote_address();
                let at = net::canonical(at);
                for s in batch.iter_mut().flat_map(|h| h.sources.iter_mut()) {
                    s.resolve_via(&at);
                }
                if let Some(tx) = &batches {
                    let _ = tx.send(batch.clone());
                }
                hits.extend(batch);
                if hits.len() > MAX_RESULTS as usize {
                    break;
                }
            }
            Ok(Some(SupernodeReply::Error(e))) => return Err(AskError::Refused(e.to_string())),
            Ok(Some(other_reply)) => {
                return Err(other(format!("unexpected reply {other_reply:?}")))
            }
            Ok(None) => break,
            Err(e) => return Err(other(e.to_string())),
        }
    }
    debug!(supernode = %addr, hits = hits.len(), "answered");
    peer.conn.close(0u32.into(), b"done");
    Ok(hits)
}

/// A hit as one JSON object (`leaf search --json`, the API's search):
/// the name and size most independent sources announce, every variant
/// with its support, the sources' addresses, and a link to it.
pub fn hit_json(hit: &Hit) -> serde_json::Value {
    let support = servent_proto::hits::support(hit);
    serde_json::json!({
        "hash": hit.hash.to_string(),
        // What most independent sources announce.
        "name": hit.name(),
        "size": hit.size(),
        "sources": hit.sources.len(),
        // Distinct IP addresses among them.
        "hosts": servent_proto::hits::hit_support(hit).ips,
        // Every name and size announced, best supported first.
        "names": hit.names.iter().zip(&support).map(|(v, s)| {
            serde_json::json!({
                "name": v.name,
                "size": v.size,
                "sources": s.ids,
                "hosts": s.ips,
            })
        }).collect::<Vec<_>>(),
        // Where each source would be dialled: the addresses the
        // supernodes saw it connect from.
        "addrs": hit.sources.iter().map(|s| &s.addr).collect::<Vec<_>>(),
        "link": servent_proto::magnet::Link::new(hit.hash, hit.name(), hit.size()).to_string(),
    })
}
