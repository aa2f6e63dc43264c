//! The door of an endpoint: which incoming connections are admitted, how
//! long one may sit idle, and how many bytes of half-received frames its
//! streams may hold. Shared by the supernode and the leaf (every endpoint
//! that accepts connections has one, and its [`Router`](crate::Router)
//! applies it to each incoming connection before the handshake).
//!
//! The admission rules are the pure [`servent_proto::admit`]; this module
//! applies them to quinn's `Incoming`, holds each admitted connection's slot
//! in a [`Ticket`] until the connection ends, closes connections that carry
//! no request ([`Inbound`]), and bounds buffered frame bytes per connection
//! and per node ([`Budget`]).

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use servent_proto::admit::{Admission, Admit, AdmitConfig};
use tracing::debug;

use crate::transport::StreamTimeouts;

/// QUIC application close code of a connection closed for carrying no
/// request for the idle limit (docs/PROTOCOL.md section 14).
pub const IDLE_CLOSE_CODE: u32 = 2;

/// Counters of what the gate turned away.
#[derive(Debug, Default, Clone)]
pub struct GateMetrics {
    /// Connection attempts refused (slots, address caps, handshake rates).
    pub refused: Counter,
    /// Connection attempts answered with a QUIC Retry.
    pub retried: Counter,
    /// Connections closed for carrying no request.
    pub idle_closed: Counter,
    /// Streams refused because their connection or the node had too many
    /// frame bytes buffered.
    pub over_budget: Counter,
}

/// What a [`Gate`] enforces. The node crates build it from their own
/// configuration (the supernode's `Config`, which a leaf's elected role
/// shares); there is no default, since the values are the node's.
#[derive(Debug, Clone)]
pub struct GateConfig {
    /// The admission rules: connection slots, per-address caps, handshake
    /// rates, when to ask for a Retry, exempt addresses.
    pub admit: AdmitConfig,
    /// An admitted connection with no stream open this long is closed
    /// ([`IDLE_CLOSE_CODE`]).
    pub idle_close: Duration,
    /// Frame bytes one connection's streams may hold half-received.
    pub max_buffered_per_connection: usize,
    /// Frame bytes every connection of the endpoint may hold together.
    pub max_buffered: usize,
    /// How long the streams of an admitted connection wait for frames.
    /// Default: [`StreamTimeouts::default`].
    pub streams: StreamTimeouts,
}

/// One endpoint's door.
pub struct Gate {
    admission: Mutex<Admission>,
    idle_close: Duration,
    per_connection: usize,
    /// Frame bytes buffered by every connection of this endpoint together.
    node: Arc<Budget>,
    streams: StreamTimeouts,
    pub metrics: GateMetrics,
}

impl Gate {
    pub fn new(config: GateConfig) -> Arc<Self> {
        Arc::new(Self {
            admission: Mutex::new(Admission::new(config.admit, Instant::now())),
            idle_close: config.idle_close,
            per_connection: config.max_buffered_per_connection,
            node: Budget::new(config.max_buffered, None),
            streams: config.streams,
            metrics: GateMetrics::default(),
        })
    }

    /// Applies the admission rules to `incoming`: the attempt comes back
    /// with its slot when it may go on to the handshake; otherwise it has
    /// been refused or asked to retry, and is gone.
    pub fn admit(self: &Arc<Self>, incoming: quinn::Incoming) -> Option<(quinn::Incoming, Ticket)> {
        let ip = incoming.remote_address().ip().to_canonical();
        let validated = incoming.remote_address_validated();
        let decision = self.admission.lock().expect("admission lock").on_incoming(
            Instant::now(),
            ip,
            validated,
        );
        match decision {
            Admit::Accept => Some((
                incoming,
                Ticket {
                    gate: self.clone(),
                    ip,
                },
            )),
            Admit::Retry => {
                self.metrics.retried.inc();
                if incoming.retry().is_err() {
                    // Only an already validated attempt cannot be retried.
                    self.metrics.refused.inc();
                }
                None
            }
            Admit::Refuse(why) => {
                debug!(%ip, reason = %why, "connection refused");
                self.metrics.refused.inc();
                incoming.refuse();
                None
            }
        }
    }

    /// Connections admitted and not yet ended.
    pub fn open(&self) -> usize {
        self.admission.lock().expect("admission lock").open()
    }

    /// Connections admitted from `ip`'s address (or IPv6 /64), not yet ended.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.admission.lock().expect("admission lock").open_from(ip)
    }

    /// Starts watching an admitted, established connection: it is closed
    /// once it has had no stream open for the idle limit, and its streams
    /// share one frame budget.
    pub fn inbound(self: &Arc<Self>, conn: &quinn::Connection) -> Inbound {
        let inbound = self.inbound_unwatched();
        tokio::spawn(watch_idle(
            conn.clone(),
            inbound.activity.clone(),
            self.idle_close,
            self.metrics.idle_closed.clone(),
        ));
        inbound
    }

    /// The frame budget for the streams a peer opens on a connection we
    /// dialled: bounded like an accepted one, but never closed for being
    /// idle (it is ours to close).
    pub fn inbound_unwatched(self: &Arc<Self>) -> Inbound {
        Inbound {
            activity: Arc::new(Activity {
                streams: AtomicUsize::new(0),
                idle_since: Mutex::new(Instant::now()),
            }),
            budget: Budget::new(self.per_connection, Some(self.node.clone())),
            over_budget: self.metrics.over_budget.clone(),
            timeouts: self.streams,
        }
    }
}

/// The slot of one admitted connection, given back on drop.
pub struct Ticket {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Ok(mut a) = self.gate.admission.lock() {
            a.on_closed(self.ip);
        }
    }
}

/// What the streams of one accepted connection share: whether any is open
/// (for the idle rule) and their frame budget.
#[derive(Clone)]
pub struct Inbound {
    activity: Arc<Activity>,
    pub budget: Arc<Budget>,
    pub over_budget: Counter,
    /// How long its streams wait for frames.
    pub timeouts: StreamTimeouts,
}

impl Inbound {
    /// Marks a stream as open until the guard is dropped: a connection
    /// with an open stream is not idle.
    pub fn stream(&self) -> StreamGuard {
        self.activity.streams.fetch_add(1, Ordering::SeqCst);
        StreamGuard(self.activity.clone())
    }
}

struct Activity {
    streams: AtomicUsize,
    /// When the last stream ended (or the connection began).
    idle_since: Mutex<Instant>,
}

pub struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Ok(mut since) = self.0.idle_since.lock() {
            *since = Instant::now();
        }
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes `conn` once it has had no stream open for `limit`. Keep-alive
/// pings, ours or the peer's, do not count: a connection is for requests.
async fn watch_idle(
    conn: quinn::Connection,
    activity: Arc<Activity>,
    limit: Duration,
    closed: Counter,
) {
    let check = (limit / 4).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            _ = tokio::time::sleep(check) => {}
        }
        let idle = activity.streams.load(Ordering::SeqCst) == 0
            && activity
                .idle_since
                .lock()
                .is_ok_and(|since| since.elapsed() >= limit);
        if idle {
            debug!(remote = %conn.remote_address(), "closing an idle connection");
            closed.inc();
            conn.close(IDLE_CLOSE_CODE.into(), b"idle: no request");
            return;
        }
    }
}

/// Bytes of frames being received, with a cap, and optionally a parent
/// budget (the node's) that every reservation also takes from.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
    parent: Option<Arc<Budget>>,
}

impl Budget {
    pub fn new(max: usize, parent: Option<Arc<Budget>>) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            max,
            parent,
        })
    }

    /// Reserves `bytes` here and in the parent, or nothing if either
    /// would go over its cap.
    pub fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let take = |b: &Budget| {
            b.used
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                    used.checked_add(bytes).filter(|n| *n <= b.max)
                })
                .is_ok()
        };
        if !take(self) {
            return None;
        }
        if let Some(parent) = &self.parent {
            if !take(parent) {
                self.used.fetch_sub(bytes, Ordering::SeqCst);
                return None;
            }
        }
        Some(Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }
}

/// Bytes held from a [`Budget`] until dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::SeqCst);
        if let Some(parent) = &self.budget.parent {
            parent.used.fetch_sub(self.bytes, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_and_its_parent_both_bound_reservations() {
        let node = Budget::new(100, None);
        let a = Budget::new(60, Some(node.clone()));
        let b = Budget::new(60, Some(node.clone()));
        let ra = a.try_reserve(60).expect("fits");
        assert!(a.try_reserve(1).is_none(), "the connection's cap");
        let rb = b.try_reserve(40).expect("fits");
        assert!(b.try_reserve(1).is_none(), "the node's cap");
        assert_eq!(b.used(), 40, "a refused reservation holds nothing");
        drop(ra);
        assert_eq!(node.used(), 40);
        assert!(b.try_reserve(20).is_some());
        drop(rb);
        assert_eq!(node.used(), 0);
    }
}
