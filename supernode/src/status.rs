//! What a supernode tells its operator over `--http` (served by
//! [`crate::http`]): the `/status` document and the `/metrics` registry.
//!
//! The supernode's own fields are [`SupernodeFields`], kept apart from who
//! the node is ([`SupernodeStatus`]), so that a leaf elected to supernode
//! can show them in its own status document.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::registry::Registry;
use serde::Serialize;
use servent_proto::NodeId;

use crate::State;
use servent_net::http::{Report, Sampled};

/// Another node: its id (64 hex digits) and where it listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeAddr {
    pub id: String,
    pub addr: String,
}

impl NodeAddr {
    pub fn new(id: NodeId, addr: SocketAddr) -> Self {
        Self {
            id: id.to_string(),
            addr: addr.to_string(),
        }
    }
}

/// The supernode role's part of a status document.
#[derive(Debug, Clone, Serialize)]
pub struct SupernodeFields {
    /// Leaves registered now.
    pub leaves: usize,
    pub max_leaves: usize,
    /// Distinct files indexed now.
    pub files: usize,
    /// Mesh neighbours linked now, by id.
    pub neighbors: Vec<NodeAddr>,
    /// Other supernodes known now, neighbours included.
    pub known_supernodes: usize,
}

impl SupernodeFields {
    /// Read from the snapshot the node's owner published last.
    pub fn of(state: &State) -> Self {
        let snapshot = state.snapshot();
        Self {
            leaves: snapshot.leaves,
            max_leaves: snapshot.max_leaves,
            files: state.index().file_count(),
            neighbors: snapshot
                .neighbours
                .into_iter()
                .map(|(id, addr)| NodeAddr::new(id, addr))
                .collect(),
            known_supernodes: snapshot.known,
        }
    }
}

/// A dedicated supernode's `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct SupernodeStatus {
    pub id: String,
    /// Always `"supernode"`.
    pub role: String,
    /// The UDP address it listens on.
    pub listen: String,
    pub uptime_secs: u64,
    #[serde(flatten)]
    pub supernode: SupernodeFields,
}

/// Where the supernode metrics are read from at each scrape: the node's
/// state while it holds the supernode role (always, for a dedicated
/// supernode; while elected, for a leaf).
pub type Source = Arc<dyn Fn() -> Option<Arc<State>> + Send + Sync>;

/// A source that holds `state` weakly: a registry must not keep a node alive.
pub fn source_of(state: &Arc<State>) -> Source {
    let state = Arc::downgrade(state);
    Arc::new(move || state.upgrade())
}

/// Adds the supernode metrics to `registry`, all read from `source` when
/// scraped (zero while there is no supernode state).
pub fn register(registry: &mut Registry, source: Source) {
    let read = |f: fn(&State) -> u64| {
        let source = source.clone();
        move || source().map_or(0, |s| f(&s))
    };
    for (name, help, counter) in crate::metrics::COUNTERS {
        let source = source.clone();
        let metric = Sampled::counter(move || source().map_or(0, |s| counter(&s.metrics).get()));
        registry.register(name, help, metric);
    }
    type Read = fn(&State) -> u64;
    let gauges: [(&str, &str, Read); 6] = [
        ("servent_leaves", "Leaves registered now", |s| {
            s.leaf_count() as u64
        }),
        (
            "servent_max_leaves",
            "Most leaves this supernode takes",
            |s| s.config.max_leaves as u64,
        ),
        ("servent_files", "Distinct files indexed now", |s| {
            s.index().file_count() as u64
        }),
        ("servent_neighbors", "Mesh neighbours linked now", |s| {
            s.neighbour_count() as u64
        }),
        (
            "servent_known_supernodes",
            "Other supernodes known now, neighbours included",
            |s| s.known_count() as u64,
        ),
        (
            "servent_connections",
            "QUIC connections to this supernode open now, of every kind",
            |s| s.metrics.traffic.live() as u64,
        ),
    ];
    for (name, help, f) in gauges {
        registry.register(name, help, Sampled::gauge(read(f)));
    }
    registry.register(
        "servent_received_bytes",
        "Bytes received in UDP datagrams on supernode connections",
        Sampled::counter(read(|s| s.metrics.traffic.totals().received)),
    );
    registry.register(
        "servent_sent_bytes",
        "Bytes sent in UDP datagrams on supernode connections",
        Sampled::counter(read(|s| s.metrics.traffic.totals().sent)),
    );
}

/// `/status` and `/metrics` of a dedicated supernode.
pub struct SupernodeReport {
    state: Arc<State>,
    listen: SocketAddr,
    started: Instant,
    registry: Registry,
}

impl SupernodeReport {
    pub fn new(state: Arc<State>, listen: SocketAddr) -> Self {
        let mut registry = Registry::default();
        register(&mut registry, source_of(&state));
        Self {
            state,
            listen,
            started: Instant::now(),
            registry,
        }
    }
}

impl Report for SupernodeReport {
    type Status = SupernodeStatus;

    fn status(&self) -> SupernodeStatus {
        SupernodeStatus {
            id: self.state.id.to_string(),
            role: "supernode".into(),
            listen: self.listen.to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            supernode: SupernodeFields::of(&self.state),
        }
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }
}
