//! Counters a supernode keeps about itself, for `/metrics` and tests.
//!
//! Each counter is a `prometheus_client` [`Counter`]: one relaxed atomic
//! add per event. `/metrics` reads them when scraped (see
//! [`crate::status`]), as it reads what is a count of things *now*
//! (leaves, files, neighbours), which is not kept here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;

#[derive(Debug, Default)]
pub struct Metrics {
    /// Queries from our own leaves.
    pub leaf_queries: Counter,
    /// Queries that arrived from mesh neighbours (duplicates included).
    pub mesh_queries: Counter,
    /// Queries processed: answered from the index (each id once).
    pub queries_processed: Counter,
    /// Query messages sent to neighbours.
    pub queries_forwarded: Counter,
    /// Query messages not sent to a neighbour, to keep their origin to its
    /// fair share of that link (`servent_proto::fair`).
    pub queries_unforwarded: Counter,
    /// Mesh queries dropped because their id had been seen.
    pub queries_duplicate: Counter,
    /// Mesh queries seen before but forwarded again, farther (not answered again).
    pub queries_extended: Counter,
    /// Queries refused by a rate limit (leaf or mesh).
    pub queries_rate_limited: Counter,
    /// Hits sent back (to leaves and to neighbours).
    pub hits_returned: Counter,
    /// `Connect` requests passed on to one of our leaves, which accepted.
    pub connects_passed: Counter,
    /// `Connect` requests refused: by a rate limit, for a leaf not ours,
    /// or declined by the leaf.
    pub connects_refused: Counter,
    /// Relay circuits opened (both leaves accepted).
    pub relays_opened: Counter,
    /// `Relay` requests refused: over a budget, for a leaf not ours, or
    /// declined by the leaf.
    pub relays_refused: Counter,
    /// Bytes relayed, both ways, over every circuit.
    pub relayed_bytes: Counter,
    /// Dial-backs to candidate leaves that reached them (election rule:
    /// only these may be promoted).
    pub dial_backs_reached: Counter,
    /// Dial-backs to candidate leaves that did not reach them.
    pub dial_backs_failed: Counter,
    /// Bytes on the wire, over every connection.
    pub traffic: Traffic,
}

/// Where a counter is in [`Metrics`].
pub type Field = fn(&Metrics) -> &Counter;

/// Every counter of [`Metrics`]: its `/metrics` name (`prometheus_client`
/// appends `_total`), its help, and where it is.
pub const COUNTERS: [(&str, &str, Field); 16] = [
    (
        "servent_leaf_queries",
        "Queries received from this supernode's own leaves",
        |m| &m.leaf_queries,
    ),
    (
        "servent_mesh_queries",
        "Queries received from mesh neighbours, duplicates included",
        |m| &m.mesh_queries,
    ),
    (
        "servent_queries_processed",
        "Queries answered from the local index, each query id once",
        |m| &m.queries_processed,
    ),
    (
        "servent_queries_forwarded",
        "Query messages sent to mesh neighbours",
        |m| &m.queries_forwarded,
    ),
    (
        "servent_queries_unforwarded",
        "Query messages not sent to a neighbour, to keep their origin to its fair share of that link",
        |m| &m.queries_unforwarded,
    ),
    (
        "servent_queries_duplicate",
        "Mesh queries dropped because their id had been seen",
        |m| &m.queries_duplicate,
    ),
    (
        "servent_queries_extended",
        "Mesh queries seen before and forwarded farther, not answered again",
        |m| &m.queries_extended,
    ),
    (
        "servent_queries_rate_limited",
        "Queries refused by a rate limit, from leaves or neighbours",
        |m| &m.queries_rate_limited,
    ),
    (
        "servent_hits_returned",
        "Hits sent back to leaves and neighbours",
        |m| &m.hits_returned,
    ),
    (
        "servent_connects_passed",
        "Connect requests (reverse connect, hole punch) passed on to a leaf of this supernode",
        |m| &m.connects_passed,
    ),
    (
        "servent_connects_refused",
        "Connect requests refused: rate limited, for a leaf not here, or declined by it",
        |m| &m.connects_refused,
    ),
    (
        "servent_relays_opened",
        "Relay circuits opened between two leaves",
        |m| &m.relays_opened,
    ),
    (
        "servent_relays_refused",
        "Relay requests refused: over a budget, for a leaf not here, or declined by it",
        |m| &m.relays_refused,
    ),
    (
        "servent_relayed_bytes",
        "Bytes relayed between leaves, both ways",
        |m| &m.relayed_bytes,
    ),
    (
        "servent_dial_backs_reached",
        "Dial-backs to candidate leaves that reached them (only those may be elected)",
        |m| &m.dial_backs_reached,
    ),
    (
        "servent_dial_backs_failed",
        "Dial-backs to candidate leaves that did not reach them",
        |m| &m.dial_backs_failed,
    ),
];

/// Bytes sent and received in UDP datagrams, summed over connections: the
/// live ones are read when asked, the ended ones were added up as they
/// ended. quinn counts bytes per connection only (its endpoint statistics
/// count handshakes), so connections must be tracked while they live.
///
/// Tracking holds a clone of the connection, which keeps it open: only
/// track it for as long as something else holds it anyway (the task
/// serving it), through the [`Tracked`] guard.
#[derive(Debug, Clone, Default)]
pub struct Traffic {
    inner: Arc<Mutex<TrafficState>>,
}

#[derive(Debug, Default)]
struct TrafficState {
    live: HashMap<usize, quinn::Connection>,
    ended: Bytes,
}

/// Bytes received and sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Bytes {
    pub received: u64,
    pub sent: u64,
}

impl Traffic {
    /// Counts `conn` until the guard is dropped.
    pub fn track(&self, conn: &quinn::Connection) -> Tracked {
        let id = conn.stable_id();
        self.inner
            .lock()
            .expect("traffic lock")
            .live
            .insert(id, conn.clone());
        Tracked {
            traffic: self.clone(),
            id,
        }
    }

    /// Everything so far. One lock covers the live connections and the
    /// ended ones, so a connection ending never makes the total go down.
    pub fn totals(&self) -> Bytes {
        let state = self.inner.lock().expect("traffic lock");
        state.live.values().fold(state.ended, |sum, conn| {
            let s = conn.stats();
            Bytes {
                received: sum.received + s.udp_rx.bytes,
                sent: sum.sent + s.udp_tx.bytes,
            }
        })
    }

    /// Connections tracked now.
    pub fn live(&self) -> usize {
        self.inner.lock().expect("traffic lock").live.len()
    }
}

/// Keeps a connection counted in [`Traffic`]; on drop, its bytes move to
/// the ended total.
#[must_use = "the connection is counted only while the guard lives"]
#[derive(Debug)]
pub struct Tracked {
    traffic: Traffic,
    id: usize,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut state = self.traffic.inner.lock().expect("traffic lock");
        if let Some(conn) = state.live.remove(&self.id) {
            let s = conn.stats();
            state.ended.received += s.udp_rx.bytes;
            state.ended.sent += s.udp_tx.bytes;
        }
    }
}
