//! One leaf's connection (ALPN `servent-leaf/2`): its registration stream,
//! and its queries, each on a stream of its own.
//!
//! A bad frame gets an `Error` reply and ends only the stream it came on; a
//! bad update on the registration stream ends the leaf's session (and its
//! index entries) but nothing else. The leaf's source address is always the
//! one this connection comes from, with the port the leaf announced.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use servent_proto::lease::{self, Generation};
use servent_proto::limits::{
    MAX_FILES_PER_UPDATE, MAX_REPLY_FRAME, MAX_REQUEST_FRAME, MAX_UPDATE_FRAME,
};
use servent_proto::msg::{
    ErrorCode, ErrorReply, FileEntry, LeafRequest, Query, SessionUpdate, SupernodeReply,
};
use servent_proto::rate::TokenBucket;
use servent_proto::NodeId;
use tracing::{debug, info, Instrument};

use crate::owner::{Command, Registration};
use crate::{routing, State};
use servent_net::gate::Inbound;
use servent_net::{self as net, canonical, Peer, StreamError};

/// Per-connection facts shared by its streams.
struct Conn {
    peer: Peer,
    registered: AtomicBool,
    /// Its streams' frame budget and the idle rule: a connection that
    /// neither registers nor asks anything is closed.
    inbound: Inbound,
}

/// Query rate limits that outlive a connection, so that reconnecting does
/// not refill them: a bucket per node id (`query_burst`, `query_rate`) and
/// one per IP address with [`PER_IP_FACTOR`] times as much, since node ids
/// cost nothing to make. Exempt addresses (`Config::exempt_ips`: local
/// test networks run many honest nodes on one address) have no per-IP
/// bucket.
pub struct QueryLimits {
    rate: f64,
    burst: u32,
    exempt: Vec<IpAddr>,
    by_id: Mutex<HashMap<NodeId, TokenBucket>>,
    by_ip: Mutex<HashMap<IpAddr, TokenBucket>>,
}

/// How many node ids' worth of queries one IP address may send.
pub const PER_IP_FACTOR: u32 = 8;
/// Buckets kept before the full (idle) ones are forgotten.
const MAX_BUCKETS: usize = 16 * 1024;

impl QueryLimits {
    pub fn new(rate: f64, burst: u32, exempt: Vec<IpAddr>) -> Self {
        Self {
            rate,
            burst,
            exempt,
            by_id: Mutex::new(HashMap::new()),
            by_ip: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a query token for `id` at `ip`, if both buckets have one.
    pub fn allow(&self, id: NodeId, ip: IpAddr, now: Instant) -> bool {
        self.with_buckets(id, ip, now, |ip_bucket, id_bucket| {
            // Both or neither: a refused query costs no token.
            if !id_bucket.ready(now) || ip_bucket.as_ref().is_some_and(|b| !b.ready(now)) {
                return false;
            }
            id_bucket.try_take(now);
            if let Some(b) = ip_bucket {
                b.try_take(now);
            }
            true
        })
    }

    /// Charges `id` at `ip` `extra` tokens more for a query already let in
    /// (what it cost beyond one token), going into debt if need be: the
    /// next queries wait until it is paid.
    pub fn charge(&self, id: NodeId, ip: IpAddr, extra: f64, now: Instant) {
        if extra <= 0.0 {
            return;
        }
        self.with_buckets(id, ip, now, |ip_bucket, id_bucket| {
            if let Some(b) = ip_bucket {
                b.take_many(extra, now);
            }
            id_bucket.take_many(extra, now);
        })
    }

    /// Runs `f` on `ip`'s bucket (none if exempt) and `id`'s, both locked.
    fn with_buckets<R>(
        &self,
        id: NodeId,
        ip: IpAddr,
        now: Instant,
        f: impl FnOnce(Option<&mut TokenBucket>, &mut TokenBucket) -> R,
    ) -> R {
        // Always in this order: ip, then id.
        let mut by_ip = self.by_ip.lock().expect("query limits lock");
        let mut by_id = self.by_id.lock().expect("query limits lock");
        let ip_bucket = match self.exempt.contains(&ip.to_canonical()) {
            true => None,
            false => Some(bucket(
                &mut by_ip,
                ip,
                self.rate * f64::from(PER_IP_FACTOR),
                self.burst.saturating_mul(PER_IP_FACTOR),
                now,
            )),
        };
        f(
            ip_bucket,
            bucket(&mut by_id, id, self.rate, self.burst, now),
        )
    }
}

/// `key`'s bucket, made full if new; when there are too many, the
/// buckets that are full again are forgotten first.
fn bucket<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, TokenBucket>,
    key: K,
    rate: f64,
    burst: u32,
    now: Instant,
) -> &mut TokenBucket {
    servent_proto::rate::bucket_in(map, key, rate, burst, now, MAX_BUCKETS)
}

/// Serves a leaf connection until it closes.
pub async fn serve(state: Arc<State>, peer: Peer) {
    debug!("connected");
    let conn = Arc::new(Conn {
        registered: AtomicBool::new(false),
        inbound: state.gate.inbound(&peer.conn),
        peer,
    });
    loop {
        match conn.peer.conn.accept_bi().await {
            Ok((send, recv)) => {
                tokio::spawn(
                    handle_stream(state.clone(), conn.clone(), send, recv).in_current_span(),
                );
            }
            Err(e) => {
                debug!(reason = %e, "connection ended");
                break;
            }
        }
    }
}

async fn handle_stream(
    state: Arc<State>,
    conn: Arc<Conn>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let _active = conn.inbound.stream();
    let first =
        net::read_first_frame_in::<LeafRequest>(&mut recv, MAX_REQUEST_FRAME, &conn.inbound);
    let result = match first.await {
        Ok(Some(LeafRequest::Register { listen_port })) => {
            register(&state, &conn, listen_port, &mut send, recv).await
        }
        Ok(Some(LeafRequest::Query(q))) => query(&state, &conn, q, &mut send).await,
        Ok(Some(LeafRequest::Supernodes)) => supernodes(&state, &mut send).await,
        Ok(Some(LeafRequest::Connect { to })) => {
            match crate::connect::connect(&state, &conn.peer, to).await {
                Ok(reply) => net::write_frame(&mut send, &reply, MAX_REPLY_FRAME)
                    .await
                    .map_err(Refusal::from),
                Err(reply) => Err(Refusal {
                    reply,
                    close_connection: false,
                }),
            }
        }
        Ok(Some(LeafRequest::Relay { to })) => {
            crate::relay::relay(&state, &conn.peer, to, &mut send, recv)
                .await
                .map_err(|reply| Refusal {
                    reply,
                    close_connection: false,
                })
        }
        Ok(None) => Ok(()),
        Err(e) => Err(Refusal::bad(format!("bad request: {e}"))),
    };
    if let Err(refusal) = result {
        debug!(error = %refusal.reply, "request refused");
        let reason = refusal.reply.message.clone();
        let reply = SupernodeReply::Error(refusal.reply);
        let _ = net::write_frame(&mut send, &reply, MAX_REPLY_FRAME).await;
        if refusal.close_connection {
            // Let the error frame leave before the connection goes.
            let _ = send.finish();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
            conn.peer.conn.close(1u32.into(), reason.as_bytes());
            return;
        }
    }
    let _ = send.finish();
}

/// Why a stream is refused, and whether the whole connection goes with it.
struct Refusal {
    reply: ErrorReply,
    close_connection: bool,
}

impl Refusal {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            reply: ErrorReply::new(ErrorCode::BadRequest, message),
            close_connection: false,
        }
    }
    fn code(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            reply: ErrorReply::new(code, message),
            close_connection: false,
        }
    }
    fn fatal(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            reply: ErrorReply::new(code, message),
            close_connection: true,
        }
    }
}

impl From<StreamError> for Refusal {
    fn from(e: StreamError) -> Self {
        Self::fatal(ErrorCode::BadRequest, e.to_string())
    }
}

/// The registration stream: the leaf's session lives as long as it does.
///
/// Whether it may register at all is the owner's decision
/// (`servent_proto::lease`), made in one step against the caps.
async fn register(
    state: &Arc<State>,
    conn: &Arc<Conn>,
    listen_port: u16,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), Refusal> {
    // Checked before the connection counts as registered, so that a
    // refused Register may be sent again with a port that is dialable.
    lease::dialable(listen_port).map_err(|e| Refusal::bad(e.to_string()))?;
    if conn.registered.swap(true, Ordering::SeqCst) {
        return Err(Refusal::bad("this connection is already registered"));
    }
    let id = conn.peer.id;
    // On a dual-stack socket an IPv4 leaf shows as ::ffff:a.b.c.d: name it
    // by its IPv4 address, which IPv4-only nodes can dial.
    let observed = canonical(conn.peer.conn.remote_address());
    let leaf_conn = conn.peer.conn.clone();
    let registration = state
        .ask(|reply| Command::Register {
            id,
            observed,
            listen_port,
            conn: leaf_conn,
            reply,
        })
        .await
        .unwrap_or(Registration::Gone);
    let (generation, addr) = match registration {
        Registration::Admitted { generation, addr } => (generation, addr),
        Registration::Full(elsewhere) => {
            // Full: point the leaf elsewhere, then let it go.
            info!(suggested = elsewhere.len(), "full: leaf redirected");
            net::write_frame(send, &SupernodeReply::Full(elsewhere), MAX_REPLY_FRAME).await?;
            let _ = send.finish();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
            conn.peer.conn.close(0u32.into(), b"supernode is full");
            return Ok(());
        }
        Registration::Refused(e) => {
            return Err(Refusal::fatal(ErrorCode::LimitExceeded, e.to_string()))
        }
        Registration::Gone => {
            return Err(Refusal::fatal(
                ErrorCode::Unavailable,
                "supernode is shutting down",
            ))
        }
    };
    info!(%addr, "leaf registered");
    let _guard = SessionGuard {
        state: state.clone(),
        id,
        generation,
    };
    net::write_frame(
        send,
        &SupernodeReply::Registered {
            observed_addr: observed.to_string(),
        },
        MAX_REPLY_FRAME,
    )
    .await?;
    let updates = async {
        loop {
            let next =
                net::read_frame_in::<SessionUpdate>(&mut recv, MAX_UPDATE_FRAME, &conn.inbound);
            let update = match next.await {
                Ok(Some(u)) => u,
                Ok(None) => return Ok(()),
                Err(StreamError::Read(e)) => {
                    debug!(reason = %e, "session stream ended");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            // A candidacy is the owner's to record, with the session it
            // describes (its address, its uptime).
            let (candidacy, update) = match update {
                SessionUpdate::Candidacy(c) => (Some(c), None),
                update => (None, Some(update)),
            };
            let heard = state.ask(|reply| Command::Heard {
                id,
                generation,
                candidacy,
                reply,
            });
            if heard.await != Some(true) {
                return Ok(());
            }
            let files = match update {
                Some(update) => apply(state, id, addr.ip(), update)?,
                None => state.index().owner_file_count(&id),
            };
            net::write_frame(
                send,
                &SupernodeReply::Indexed {
                    files: files as u32,
                },
                MAX_REPLY_FRAME,
            )
            .await?;
        }
    };
    // Beside the updates, without cancelling a read: when QUIC has
    // migrated the connection to a new address (the leaf's NAT rebound, or
    // its network changed), the lease follows it within `MOVE_CHECK`.
    let moves = async {
        let mut at = observed;
        let mut tick = tokio::time::interval(MOVE_CHECK);
        loop {
            tick.tick().await;
            let now = canonical(conn.peer.conn.remote_address());
            if now == at {
                continue;
            }
            at = now;
            let keep = state.ask(|reply| Command::Moved {
                id,
                generation,
                observed: now,
                reply,
            });
            if keep.await != Some(true) {
                return Refusal::fatal(
                    ErrorCode::LimitExceeded,
                    "moved to an address with too many leaves",
                );
            }
        }
    };
    tokio::select! {
        r = updates => r,
        e = moves => Err(e),
    }
}

/// How often a session checks whether its connection has moved.
const MOVE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Releases a leaf's lease when its session ends (the owner drops its
/// entries then, unless a newer session of the same leaf has taken over).
struct SessionGuard {
    state: Arc<State>,
    id: NodeId,
    generation: Generation,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.state.tell(Command::Release {
            id: self.id,
            generation: self.generation,
        });
    }
}

fn apply(state: &State, id: NodeId, ip: IpAddr, update: SessionUpdate) -> Result<usize, Refusal> {
    match update {
        SessionUpdate::Add(entries) => {
            if entries.len() > MAX_FILES_PER_UPDATE {
                return Err(Refusal::fatal(
                    ErrorCode::LimitExceeded,
                    format!(
                        "{} entries in one update exceed {MAX_FILES_PER_UPDATE}",
                        entries.len()
                    ),
                ));
            }
            if let Some(bad) = entries.iter().find_map(invalid_name) {
                return Err(Refusal::fatal(ErrorCode::BadRequest, bad));
            }
            state
                .index()
                .add(id, ip, &entries)
                .map_err(|e| Refusal::fatal(ErrorCode::LimitExceeded, e.to_string()))
        }
        SessionUpdate::Candidacy(_) => Ok(state.index().owner_file_count(&id)),
        SessionUpdate::Remove(hashes) => {
            if hashes.len() > MAX_FILES_PER_UPDATE {
                return Err(Refusal::fatal(
                    ErrorCode::LimitExceeded,
                    format!(
                        "{} entries in one update exceed {MAX_FILES_PER_UPDATE}",
                        hashes.len()
                    ),
                ));
            }
            Ok(state.index().remove(id, &hashes))
        }
    }
}

/// A file name must be one plain path component a person could read and
/// type, in NFC: the rule of `servent_proto::name`.
fn invalid_name(e: &FileEntry) -> Option<String> {
    servent_proto::name::check(&e.name)
        .err()
        .map(|err| err.to_string())
}

async fn query(
    state: &Arc<State>,
    conn: &Conn,
    q: Query,
    send: &mut quinn::SendStream,
) -> Result<(), Refusal> {
    let remote = conn.peer.conn.remote_address().ip().to_canonical();
    let allowed = state
        .query_limits
        .allow(conn.peer.id, remote, Instant::now());
    if !allowed {
        state.metrics.queries_rate_limited.inc();
        return Err(Refusal::code(
            ErrorCode::RateLimited,
            "too many queries: slow down",
        ));
    }
    let charge = |extra: f64| {
        state
            .query_limits
            .charge(conn.peer.id, remote, extra, Instant::now())
    };
    let here = state.reached_at(&conn.peer.conn);
    routing::serve_leaf_query(state, conn.peer.id, here, q, send, charge)
        .await
        .map_err(|reply| Refusal {
            reply,
            close_connection: false,
        })
}

/// The supernodes a leaf may attach to besides this one.
async fn supernodes(state: &State, send: &mut quinn::SendStream) -> Result<(), Refusal> {
    let list = state.for_leaves(false).await;
    net::write_frame(send, &SupernodeReply::Supernodes(list), MAX_REPLY_FRAME).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_limits_hold_across_connections_and_ids() {
        let limits = QueryLimits::new(1.0, 2, vec!["127.0.0.1".parse().unwrap()]);
        let now = Instant::now();
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let id = NodeId([1; 32]);
        // A node's bucket is its own, whatever connection it asks on.
        assert!(limits.allow(id, ip, now) && limits.allow(id, ip, now));
        assert!(!limits.allow(id, ip, now));
        // New ids from one address share that address's bucket: 8 x 2.
        let fresh = (2..40u8)
            .filter(|&n| limits.allow(NodeId([n; 32]), ip, now))
            .count();
        assert_eq!(fresh, 2 * PER_IP_FACTOR as usize - 2);
        // Another address is not held back; an exempt one has no address bucket.
        assert!(limits.allow(NodeId([2; 32]), "192.0.2.10".parse().unwrap(), now));
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let local = (100..140u8)
            .filter(|&n| limits.allow(NodeId([n; 32]), lo, now))
            .count();
        assert_eq!(local, 40);
        // Refilled in time.
        assert!(limits.allow(id, ip, now + std::time::Duration::from_secs(30)));
    }
}
