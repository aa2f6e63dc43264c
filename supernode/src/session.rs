//! One leaf's connection (ALPN `servent-leaf/1`): its registration stream,
//! and its queries, each on a stream of its own.
//!
//! A bad frame gets an `Error` reply and ends only the stream it came on; a
//! bad update on the registration stream ends the leaf's session (and its
//! index entries) but nothing else. The leaf's source address is always the
//! one this connection comes from, with the port the leaf announced.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use servent_proto::limits::{
    MAX_FILES_PER_UPDATE, MAX_NAME_BYTES, MAX_REPLY_FRAME, MAX_REQUEST_FRAME, MAX_UPDATE_FRAME,
};
use servent_proto::msg::{
    ErrorCode, ErrorReply, FileEntry, LeafRequest, Query, SessionUpdate, SupernodeReply,
};
use servent_proto::rate::TokenBucket;
use tracing::{debug, info, Instrument};

use crate::net::{self, Peer, StreamError};
use crate::{routing, LeafEntry, State};

/// Per-connection facts shared by its streams.
struct Conn {
    peer: Peer,
    registered: AtomicBool,
    queries: Mutex<TokenBucket>,
}

/// Serves a leaf connection until it closes.
pub async fn serve(state: Arc<State>, peer: Peer) {
    debug!("connected");
    let conn = Arc::new(Conn {
        queries: Mutex::new(TokenBucket::new(
            state.config.query_rate,
            state.config.query_burst,
            Instant::now(),
        )),
        registered: AtomicBool::new(false),
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
    let result = match net::read_first_frame::<LeafRequest>(&mut recv, MAX_REQUEST_FRAME).await {
        Ok(Some(LeafRequest::Register { listen_port })) => {
            register(&state, &conn, listen_port, &mut send, recv).await
        }
        Ok(Some(LeafRequest::Query(q))) => query(&state, &conn, q, &mut send).await,
        Ok(Some(LeafRequest::Supernodes)) => supernodes(&state, &mut send).await,
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
async fn register(
    state: &Arc<State>,
    conn: &Arc<Conn>,
    listen_port: u16,
    send: &mut quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), Refusal> {
    if listen_port == 0 {
        return Err(Refusal::bad("listen_port 0 is not dialable"));
    }
    if conn.registered.swap(true, Ordering::SeqCst) {
        return Err(Refusal::bad("this connection is already registered"));
    }
    let id = conn.peer.id;
    if state.leaves.len() >= state.config.max_leaves && !state.leaves.contains_key(&id) {
        // Full: point the leaf at supernodes with room, then let it go.
        // If none we know has room, at all of them, least loaded first:
        // they know others again, so the leaf walks on through the mesh
        // instead of asking us over and over.
        let mut elsewhere = state.mesh.for_leaves(true, Instant::now());
        if elsewhere.is_empty() {
            elsewhere = state.mesh.for_leaves(false, Instant::now());
        }
        info!(suggested = elsewhere.len(), "full: leaf redirected");
        net::write_frame(send, &SupernodeReply::Full(elsewhere), MAX_REPLY_FRAME).await?;
        let _ = send.finish();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
        conn.peer.conn.close(0u32.into(), b"supernode is full");
        return Ok(());
    }
    let observed = conn.peer.conn.remote_address();
    let addr = SocketAddr::new(observed.ip(), listen_port);
    let generation = state.next_generation();
    let entry = LeafEntry {
        generation,
        addr,
        conn: conn.peer.conn.clone(),
    };
    // The same leaf from a new connection (perhaps a new address) replaces
    // its old session: it is one node, known by its key.
    if let Some(old) = state.leaves.insert(id, entry) {
        old.conn
            .close(0u32.into(), b"replaced by a newer connection");
        state.index.remove_owner(id);
    }
    info!(%addr, "leaf registered");
    let since = Instant::now();
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
    loop {
        let update = match net::read_frame::<SessionUpdate>(&mut recv, MAX_UPDATE_FRAME).await {
            Ok(Some(u)) => u,
            Ok(None) => return Ok(()),
            Err(StreamError::Read(e)) => {
                debug!(reason = %e, "session stream ended");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        if !is_current(state, id, generation) {
            return Ok(());
        }
        let files = match update {
            SessionUpdate::Candidacy(c) => {
                state.election.offer(id, c, since, addr);
                state.index.owner_file_count(&id)
            }
            update => apply(state, id, update)?,
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
}

fn is_current(state: &State, id: servent_proto::NodeId, generation: u64) -> bool {
    state
        .leaves
        .get(&id)
        .is_some_and(|e| e.generation == generation)
}

/// Drops a leaf's entries when its session ends, unless a newer session of
/// the same leaf has taken over.
struct SessionGuard {
    state: Arc<State>,
    id: servent_proto::NodeId,
    generation: u64,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let gen = self.generation;
        if self
            .state
            .leaves
            .remove_if(&self.id, |_, e| e.generation == gen)
            .is_some()
        {
            self.state.index.remove_owner(self.id);
            self.state.election.withdraw(&self.id);
            info!("leaf gone, entries dropped");
        }
    }
}

fn apply(
    state: &State,
    id: servent_proto::NodeId,
    update: SessionUpdate,
) -> Result<usize, Refusal> {
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
                .index
                .add(id, &entries, state.config.max_files_per_leaf)
                .map_err(|e| Refusal::fatal(ErrorCode::LimitExceeded, e.to_string()))
        }
        SessionUpdate::Candidacy(_) => Ok(state.index.owner_file_count(&id)),
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
            Ok(state.index.remove(id, &hashes))
        }
    }
}

/// A file name must be one plain path component a person could type.
fn invalid_name(e: &FileEntry) -> Option<String> {
    let n = &e.name;
    if n.is_empty() || n.len() > MAX_NAME_BYTES {
        return Some(format!(
            "file name must be 1 to {MAX_NAME_BYTES} bytes, got {}",
            n.len()
        ));
    }
    if n == "." || n == ".." || n.chars().any(|c| c == '/' || c == '\\' || c.is_control()) {
        return Some(format!(
            "file name {:?} is not a plain file name",
            n.chars().take(64).collect::<String>()
        ));
    }
    None
}

async fn query(
    state: &Arc<State>,
    conn: &Conn,
    q: Query,
    send: &mut quinn::SendStream,
) -> Result<(), Refusal> {
    let allowed = conn
        .queries
        .lock()
        .map(|mut b| b.try_take(Instant::now()))
        .unwrap_or(false);
    if !allowed {
        state.metrics.queries_rate_limited.inc();
        return Err(Refusal::code(
            ErrorCode::RateLimited,
            "too many queries: slow down",
        ));
    }
    routing::serve_leaf_query(state, q, send)
        .await
        .map_err(|reply| Refusal {
            reply,
            close_connection: false,
        })
}

/// The supernodes a leaf may attach to besides this one.
async fn supernodes(state: &State, send: &mut quinn::SendStream) -> Result<(), Refusal> {
    let list = state.mesh.for_leaves(false, Instant::now());
    net::write_frame(send, &SupernodeReply::Supernodes(list), MAX_REPLY_FRAME).await?;
    Ok(())
}
