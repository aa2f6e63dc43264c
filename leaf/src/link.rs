//! A leaf's session with one supernode: register, keep the supernode's view
//! of the share in step with the folder, and pass on what the supernode
//! tells of other supernodes. Which supernodes to attach to is decided in
//! [`crate::attach`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use servent_net::{self as net, Endpoint};
use servent_proto::limits::{
    DEFAULT_MAX_FILES_PER_LEAF, MAX_FILES_PER_UPDATE, MAX_REPLY_FRAME, MAX_REQUEST_FRAME,
    MAX_UPDATE_FRAME,
};
use servent_proto::msg::{
    FileEntry, LeafReply, LeafRequest, SessionUpdate, SupernodeInfo, SupernodeReply,
    SupernodeRequest, ALPN_LEAF,
};
use servent_proto::{ContentHash, NodeId};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::portmap::Announced;
use crate::share::Share;

/// The timings of a session with a supernode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkTimings {
    /// Changes to the share are sent at most this often. Default 200 ms.
    pub batch_delay: Duration,
    /// How often a promotable leaf restates its candidacy. Default 30 s.
    pub candidacy_interval: Duration,
    /// A new session asks its supernode which supernodes it knows at once,
    /// again after this long, then twice as long each time up to
    /// `learn_interval`: a leaf that joined a small network learns the
    /// supernodes elected soon after, before it may need them. Default 2 s
    /// (so 2, 4, 8, 16 s).
    pub learn_first: Duration,
    /// How often a linked supernode is asked which supernodes it knows,
    /// once the session is old. Default 30 s.
    pub learn_interval: Duration,
    /// Longest the rest of the leaf may take to decide on a request the
    /// supernode made (promotion, handover) before the answer is
    /// `Declined("busy")`: the supernode waits 10 s. Default 10 s.
    pub request_answer: Duration,
}

impl Default for LinkTimings {
    fn default() -> Self {
        Self {
            batch_delay: Duration::from_millis(200),
            candidacy_interval: Duration::from_secs(30),
            learn_first: Duration::from_secs(2),
            learn_interval: Duration::from_secs(30),
            request_answer: Duration::from_secs(10),
        }
    }
}

/// What a link knows of its supernode, for status and tests.
#[derive(Debug, Clone, Default)]
pub struct LinkStatus {
    /// Set while registered.
    pub supernode: Option<(NodeId, SocketAddr)>,
    /// Where that supernode sees this leaf's socket (its `Registered`).
    pub observed: Option<SocketAddr>,
    /// Files the supernode says it holds for us.
    pub indexed: u32,
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Connect(#[from] net::ConnectError),
    #[error("supernode refused: {0}")]
    Refused(String),
    #[error("session lost: {0}")]
    Lost(String),
    #[error("supernode is full")]
    Full(Vec<SupernodeInfo>),
    /// The gateway now maps another port (or none): the session ends so
    /// that the next one registers the port a dial reaches.
    #[error("the port to announce changed from {from} to {to}")]
    PortChanged { from: u16, to: u16 },
}

/// A request a supernode made of this leaf, for the leaf to answer.
#[derive(Debug)]
pub struct Request {
    pub from: NodeId,
    pub from_addr: SocketAddr,
    pub req: SupernodeRequest,
    pub reply: oneshot::Sender<LeafReply>,
}

/// How a session reports to the rest of the leaf.
pub struct Hooks {
    /// Supernodes this supernode tells of.
    pub learned: mpsc::Sender<Vec<SupernodeInfo>>,
    /// Requests this supernode makes.
    pub requests: mpsc::Sender<Request>,
    /// Offer to become a supernode (not with `--no-promote`).
    pub promotable: bool,
    /// Whether it may take the role now (`Role::may_offer`: not within
    /// the hour of its last promotion); asked before each `Candidacy`.
    pub may_offer: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Told the supernode's id once registered.
    pub registered: oneshot::Sender<NodeId>,
    /// Takes a `Relay { peer }` request's stream, with the supernode's
    /// address: it answers on it and serves `peer` through it.
    pub relayed: Relayed,
}

/// What a session hands a `Relay` request to: the downloader, the relay's
/// address, and the stream.
pub type Relayed =
    Arc<dyn Fn(NodeId, SocketAddr, quinn::SendStream, quinn::RecvStream) + Send + Sync>;

/// Resolves `HOST:PORT` (a name or an address).
pub async fn resolve(addr: &str) -> Option<SocketAddr> {
    tokio::net::lookup_host(addr).await.ok()?.next()
}

/// Registers with the supernode at `sock` and keeps it up to date until the
/// connection is lost or `stop` fires. Supernodes it tells of go to `learned`.
#[allow(clippy::too_many_arguments)]
pub async fn session(
    endpoint: &Endpoint,
    sock: SocketAddr,
    expected: Option<NodeId>,
    port: Announced,
    share: &Share,
    status: &Mutex<LinkStatus>,
    hooks: Hooks,
    timings: &LinkTimings,
    stop: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let Hooks {
        learned,
        requests,
        promotable,
        may_offer,
        registered,
        relayed,
    } = hooks;
    let peer = endpoint.connect(sock, ALPN_LEAF, expected).await?;
    let listen_port = port.now();
    let mut port = port;
    let lost = |e: net::StreamError| LinkError::Lost(e.to_string());
    let (mut send, mut recv) = peer
        .conn
        .open_bi()
        .await
        .map_err(|e| LinkError::Lost(e.to_string()))?;
    net::write_frame(
        &mut send,
        &LeafRequest::Register { listen_port },
        MAX_REQUEST_FRAME,
    )
    .await
    .map_err(lost)?;
    match net::read_first_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME)
        .await
        .map_err(lost)?
    {
        Some(SupernodeReply::Registered { observed_addr }) => {
            info!(id = %peer.id.short(), observed = %observed_addr, "registered");
            // A supernode's claim: `nat::classify` weighs it against the others'.
            status.lock().expect("link status").observed = observed_addr.parse().ok();
        }
        Some(SupernodeReply::Full(elsewhere)) => return Err(LinkError::Full(elsewhere)),
        Some(SupernodeReply::Error(e)) => return Err(LinkError::Refused(e.to_string())),
        other => return Err(LinkError::Lost(format!("unexpected reply {other:?}"))),
    }
    status.lock().expect("link status").supernode = Some((peer.id, sock));
    let _ = registered.send(peer.id);
    // Ask, now and then, which other supernodes it knows.
    let asker = {
        let conn = peer.conn.clone();
        let (first, most) = (timings.learn_first, timings.learn_interval);
        tokio::spawn(async move {
            let mut every = first;
            loop {
                match ask_supernodes(&conn).await {
                    Ok(list) => {
                        if learned.send(list).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => debug!(error = %e, "supernode list not available"),
                }
                tokio::time::sleep(every).await;
                every = (every * 2).min(most);
            }
        })
    };
    let _asker = AbortOnDrop(asker);
    // Requests the supernode opens streams for (promotion, handover, dial
    // back); a relay's stream goes on being the tunnel, so it is handed on
    // whole.
    let (asked_tx, mut asked) = mpsc::channel::<(SupernodeRequest, quinn::SendStream)>(4);
    let acceptor = {
        let conn = peer.conn.clone();
        tokio::spawn(async move {
            while let Ok((send, mut recv)) = conn.accept_bi().await {
                match net::read_first_frame::<SupernodeRequest>(&mut recv, MAX_REPLY_FRAME).await {
                    Ok(Some(SupernodeRequest::Relay { peer })) => relayed(peer, sock, send, recv),
                    Ok(Some(req)) => {
                        if asked_tx.send((req, send)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => debug!(error = %e, "bad request from supernode"),
                }
            }
        })
    };
    let _acceptor = AbortOnDrop(acceptor);
    let mut next_candidacy = tokio::time::Instant::now();

    // What this supernode holds for us: hash → name.
    let mut announced: HashMap<ContentHash, String> = HashMap::new();
    let mut changes = share.subscribe();
    let mut stop = stop;
    loop {
        changes.borrow_and_update();
        let mut current = share.entries();
        if current.len() > DEFAULT_MAX_FILES_PER_LEAF {
            // More would be refused (and the session closed) by the supernode.
            warn!(
                shared = current.len(),
                announced = DEFAULT_MAX_FILES_PER_LEAF,
                "too many files: announcing only some"
            );
            current.sort_by_key(|e| e.hash);
            current.truncate(DEFAULT_MAX_FILES_PER_LEAF);
        }
        let (adds, removes) = diff(&announced, &current);
        for batch in removes.chunks(MAX_FILES_PER_UPDATE) {
            let indexed =
                update(&mut send, &mut recv, SessionUpdate::Remove(batch.to_vec())).await?;
            batch.iter().for_each(|h| {
                announced.remove(h);
            });
            status.lock().expect("link status").indexed = indexed;
        }
        for batch in adds.chunks(MAX_FILES_PER_UPDATE) {
            let indexed = update(&mut send, &mut recv, SessionUpdate::Add(batch.to_vec())).await?;
            announced.extend(batch.iter().map(|e| (e.hash, e.name.clone())));
            status.lock().expect("link status").indexed = indexed;
        }
        if !adds.is_empty() || !removes.is_empty() {
            debug!(
                added = adds.len(),
                removed = removes.len(),
                total = announced.len(),
                "share updated"
            );
        }
        if promotable && tokio::time::Instant::now() >= next_candidacy {
            if may_offer() {
                let candidacy = SessionUpdate::Candidacy(crate::role::measure());
                update(&mut send, &mut recv, candidacy).await?;
            }
            next_candidacy = tokio::time::Instant::now() + timings.candidacy_interval;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return Ok(()) },
            _ = tokio::time::sleep_until(next_candidacy), if promotable => continue,
            Some((req, mut stream)) = asked.recv() => {
                // An accepted `Rehome` keeps the session: the planner stops
                // it once another one is registered (make before break).
                let (reply_tx, reply_rx) = oneshot::channel();
                let request = Request { from: peer.id, from_addr: sock, req, reply: reply_tx };
                let reply = match requests.send(request).await {
                    Ok(()) => tokio::time::timeout(timings.request_answer, reply_rx)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_else(|| LeafReply::Declined("busy".into())),
                    Err(_) => LeafReply::Declined("shutting down".into()),
                };
                let _ = net::write_frame(&mut stream, &reply, MAX_REPLY_FRAME).await;
                let _ = stream.finish();
                continue;
            }
            e = peer.conn.closed() => return Err(LinkError::Lost(e.to_string())),
            to = port.moved_from(listen_port) => {
                return Err(LinkError::PortChanged { from: listen_port, to })
            }
            _ = stop.changed() => return Ok(()),
        }
        tokio::time::sleep(timings.batch_delay).await;
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Asks a supernode which supernodes it knows, on a stream of its own.
pub async fn ask_supernodes(conn: &quinn::Connection) -> Result<Vec<SupernodeInfo>, LinkError> {
    let lost = |e: String| LinkError::Lost(e);
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
    net::write_frame(&mut send, &LeafRequest::Supernodes, MAX_REQUEST_FRAME)
        .await
        .map_err(|e| lost(e.to_string()))?;
    let _ = send.finish();
    match net::read_first_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME)
        .await
        .map_err(|e| lost(e.to_string()))?
    {
        Some(SupernodeReply::Supernodes(list)) => Ok(list),
        Some(SupernodeReply::Error(e)) => Err(LinkError::Refused(e.to_string())),
        other => Err(lost(format!("unexpected reply {other:?}"))),
    }
}

/// What to add and remove so that `announced` becomes `current`.
fn diff(
    announced: &HashMap<ContentHash, String>,
    current: &[FileEntry],
) -> (Vec<FileEntry>, Vec<ContentHash>) {
    let adds: Vec<FileEntry> = current
        .iter()
        .filter(|e| announced.get(&e.hash) != Some(&e.name))
        .cloned()
        .collect();
    let keep: std::collections::HashSet<&ContentHash> = current.iter().map(|e| &e.hash).collect();
    let removes = announced
        .keys()
        .filter(|h| !keep.contains(h))
        .copied()
        .collect();
    (adds, removes)
}

async fn update(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    update: SessionUpdate,
) -> Result<u32, LinkError> {
    let lost = |e: net::StreamError| LinkError::Lost(e.to_string());
    net::write_frame(send, &update, MAX_UPDATE_FRAME)
        .await
        .map_err(lost)?;
    match net::read_first_frame::<SupernodeReply>(recv, MAX_REPLY_FRAME)
        .await
        .map_err(lost)?
    {
        Some(SupernodeReply::Indexed { files }) => Ok(files),
        Some(SupernodeReply::Error(e)) => Err(LinkError::Refused(e.to_string())),
        other => Err(LinkError::Lost(format!("unexpected reply {other:?}"))),
    }
}
