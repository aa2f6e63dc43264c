//! Reverse connect and hole punching, at both ends (docs/PROTOCOL.md 10.5).
//!
//! - The downloader ([`reach`]): dials the source directly; if that has
//!   not connected within a head start, it asks the source's push proxy
//!   (a supernode holding the source's session, [`Source::via`]) to have
//!   the source dial it, and dials the address the proxy says the source
//!   dials from, at the same moment. The source's dial is reverse connect
//!   when the downloader is reachable; the two dials together are a hole
//!   punch when neither is. The first handshake wins.
//! - The source ([`Pusher`]): dials the downloader its supernode names,
//!   with `servent-push/1`, and serves it on that connection as it serves
//!   downloads ([`crate::upload`]).
//! - The downloader's endpoint ([`Awaiting`]): hands each connection a
//!   source dialled to the download waiting for that source.
//!
//! The pacing and caps are `servent_proto::connect`'s.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use servent_net::{self as net, ConnectError, Endpoint, Peer, ProtocolHandler, TunnelSocket};
use servent_proto::connect::{Attempts, Proxies, Pushes};
use servent_proto::limits::{MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
use servent_proto::msg::{
    LeafReply, LeafRequest, Source, SupernodeReply, ALPN_LEAF, ALPN_PUSH, ALPN_TRANSFER,
};
use servent_proto::NodeId;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, Instrument};

/// How a downloader reached a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Its dial to the source's address.
    Direct,
    /// The source dialled it back.
    Reversed,
    /// Its dial to the address the source dials from, opened by the
    /// source's dial the other way.
    Punched,
    /// Its dial through a tunnel the source's push proxy relays.
    Relayed,
}

impl Route {
    /// Every route, most direct first (the order of `Progress::by_route`).
    pub const ALL: [Route; 4] = [
        Route::Direct,
        Route::Reversed,
        Route::Punched,
        Route::Relayed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Reversed => "reversed",
            Route::Punched => "punched",
            Route::Relayed => "relayed",
        }
    }
}

/// Longest a source's dial back may take.
const PUSH_DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a push proxy's answer.
const PROXY_TIMEOUT: Duration = Duration::from_secs(5);
/// Downloads one endpoint waits for dial-backs for at once, and
/// connections of one source handed over that nobody took yet.
const MAX_AWAITED: usize = 256;

/// The source side: dials the downloaders its supernodes name.
pub struct Pusher {
    endpoint: Endpoint,
    serve: Arc<dyn Fn(Peer) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>,
    pushes: Mutex<Pushes<NodeId>>,
}

impl Pusher {
    /// `serve` serves a downloader on a connection (as `servent-xfer/3`).
    pub fn new(
        endpoint: Endpoint,
        serve: impl Fn(Peer) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            endpoint,
            serve: Arc::new(serve),
            pushes: Mutex::default(),
        })
    }

    /// Answers a supernode's `Connect { peer, addr }`: accepted if the
    /// dial is admitted, and then it runs in a task of its own.
    pub fn answer(self: &Arc<Self>, peer: NodeId, addr: &str) -> LeafReply {
        let Ok(addr) = addr.parse::<SocketAddr>() else {
            return LeafReply::Declined(format!("not an IP:PORT: {addr:?}"));
        };
        if let Err(declined) = self.admit(peer) {
            return declined;
        }
        let this = self.clone();
        let span = tracing::info_span!("push", peer = %peer.short(), %addr);
        tokio::spawn(
            async move {
                let dial = this.endpoint.connect(addr, ALPN_PUSH, Some(peer));
                let dialled = tokio::time::timeout(PUSH_DIAL_TIMEOUT, dial).await;
                this.lock().done();
                match dialled {
                    Ok(Ok(peer)) => {
                        debug!("dialled back; serving");
                        (this.serve)(peer).await;
                    }
                    Ok(Err(e)) => debug!(error = %e, "dial back failed"),
                    Err(_) => debug!("dial back timed out"),
                }
            }
            .instrument(span),
        );
        LeafReply::Accepted
    }

    /// Answers a supernode's `Relay { peer }` on its stream (`send`/`recv`,
    /// from the relay at `via`): accepted if admitted as a dial back is,
    /// and then, in a task of its own, takes `peer`'s connection through
    /// the tunnel the stream becomes and serves it (docs/PROTOCOL.md 10.6).
    pub fn relayed(
        self: &Arc<Self>,
        peer: NodeId,
        via: SocketAddr,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let this = self.clone();
        let span = tracing::info_span!("relayed", peer = %peer.short(), %via);
        tokio::spawn(
            async move {
                let (reply, admitted) = match this.admit(peer) {
                    Ok(()) => (LeafReply::Accepted, true),
                    Err(declined) => (declined, false),
                };
                let written = net::write_frame(&mut send, &reply, MAX_REPLY_FRAME).await;
                if !admitted || written.is_err() {
                    if admitted {
                        this.lock().done();
                    }
                    let _ = send.finish();
                    return;
                }
                let accepted = async {
                    let local = this.endpoint.local_addr().map_err(|e| e.to_string())?;
                    let tunnel = TunnelSocket::open(send, recv, local, via);
                    let inner = this
                        .endpoint
                        .on_tunnel(tunnel.socket, &[ALPN_TRANSFER])
                        .map_err(|e| e.to_string())?;
                    let incoming = inner.quinn().accept().await.ok_or("tunnel closed")?;
                    let dialled = net::accept_within(incoming, PUSH_DIAL_TIMEOUT).await?;
                    if dialled.id != peer {
                        dialled.conn.close(0u32.into(), b"unexpected node id");
                        return Err(format!("dialled by {}", dialled.id.short()));
                    }
                    Ok(dialled)
                };
                let accepted = tokio::time::timeout(PUSH_DIAL_TIMEOUT, accepted).await;
                this.lock().done();
                match accepted {
                    Ok(Ok(peer)) => {
                        debug!("dialled through the relay; serving");
                        (this.serve)(peer).await;
                    }
                    Ok(Err(e)) => debug!(error = %e, "relayed dial failed"),
                    Err(_) => debug!("relayed dial timed out"),
                }
            }
            .instrument(span),
        );
    }

    /// Whether to connect to `peer` (a dial back or a relayed connection):
    /// not to ourselves, and within the limits of `Pushes`, which then
    /// count it until [`Pushes::done`].
    fn admit(&self, peer: NodeId) -> Result<(), LeafReply> {
        if peer == self.endpoint.id() {
            return Err(LeafReply::Declined("that is this leaf".into()));
        }
        if !self.lock().admit(Instant::now(), peer) {
            return Err(LeafReply::Declined("too many dials back at once".into()));
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pushes<NodeId>> {
        self.pushes.lock().expect("push limits lock")
    }
}

/// The downloader's side of `servent-push/1`: connections sources dialled,
/// for the downloads waiting for them.
#[derive(Default)]
pub struct Awaiting {
    waiting: Mutex<HashMap<NodeId, mpsc::Sender<Peer>>>,
    /// The push proxies asked, by IP address.
    proxies: Mutex<Proxies<std::net::IpAddr>>,
}

/// A download's wait for one source to dial; ends the wait when dropped.
struct Wait<'a> {
    awaiting: &'a Awaiting,
    id: NodeId,
    rx: mpsc::Receiver<Peer>,
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        self.awaiting.lock().remove(&self.id);
    }
}

impl Awaiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, mpsc::Sender<Peer>>> {
        self.waiting.lock().expect("awaiting lock")
    }

    /// Waits for `id` to dial; `None` if too many waits are open, or one
    /// for `id` already is.
    fn expect(&self, id: NodeId) -> Option<Wait<'_>> {
        let mut w = self.lock();
        if w.len() >= MAX_AWAITED || w.contains_key(&id) {
            return None;
        }
        let (tx, rx) = mpsc::channel(1);
        w.insert(id, tx);
        Some(Wait {
            awaiting: self,
            id,
            rx,
        })
    }
}

/// Serves `servent-push/1` on the downloader's endpoint.
pub struct PushHandler(pub Arc<Awaiting>);

impl ProtocolHandler for PushHandler {
    async fn accept(&self, peer: Peer) {
        let tx = self.0.lock().get(&peer.id).cloned();
        let conn = peer.conn.clone();
        let Some(tx) = tx else {
            debug!(peer = %peer.id.short(), "dialled by a source no download waits for");
            conn.close(0u32.into(), b"not expected");
            return;
        };
        if tx.try_send(peer).is_err() {
            conn.close(0u32.into(), b"already connected");
            return;
        }
        // The router holds the connection's slot while this runs.
        conn.closed().await;
    }
}

/// What a connection attempt yields: a connection and its route, or why
/// there is none.
type Reached = Result<(Peer, Route), ConnectError>;

/// A better path to a source first reached through a relay: a dial back or
/// a punch that got through in a later round (docs/PROTOCOL.md 10.6). The
/// download moves to it.
pub struct Upgrade(mpsc::Receiver<Reached>);

impl Upgrade {
    /// The better connection, if one has been made.
    pub fn try_take(&mut self) -> Option<(Peer, Route)> {
        loop {
            match self.0.try_recv() {
                Ok(Ok(found)) => return Some(found),
                Ok(Err(_)) => continue,
                Err(_) => return None,
            }
        }
    }
}

/// Connects to `source` at `addr` for a download: directly, else (with
/// `awaiting`, and a push proxy in the hit) through its push proxy, by
/// reverse connect, a hole punch or, last, its relay. A relayed connection
/// comes with the [`Upgrade`] the remaining rounds may still find.
pub async fn reach(
    endpoint: &Endpoint,
    awaiting: Option<&Arc<Awaiting>>,
    source: &Source,
    addr: SocketAddr,
    attempts: Attempts,
) -> Result<(Peer, Route, Option<Upgrade>), ConnectError> {
    let id = source.id;
    let proxy = source
        .via
        .as_deref()
        .and_then(|v| v.parse::<SocketAddr>().ok());
    let (Some(awaiting), Some(proxy)) = (awaiting, proxy) else {
        let direct = endpoint.connect(addr, ALPN_TRANSFER, Some(id)).await;
        return direct.map(|p| (p, Route::Direct, None));
    };
    // The rounds run in a task of their own, which goes on after a relayed
    // connection until a better one is found, the rounds end, or nobody
    // listens any more.
    let (tx, mut rx) = mpsc::channel(2);
    let (endpoint, awaiting) = (endpoint.clone(), awaiting.clone());
    tokio::spawn(
        async move { rounds(&endpoint, &awaiting, id, proxy, addr, attempts, tx).await }
            .in_current_span(),
    );
    match rx.recv().await {
        Some(Ok((peer, Route::Relayed))) => Ok((peer, Route::Relayed, Some(Upgrade(rx)))),
        Some(Ok((peer, route))) => Ok((peer, route, None)),
        Some(Err(e)) => Err(e),
        None => Err(ConnectError::Connect {
            addr,
            reason: "the connection attempts ended".into(),
        }),
    }
}

/// The rounds of [`reach`] through push proxy `proxy`: every connection
/// made goes to `found`, until one that is not relayed.
async fn rounds(
    endpoint: &Endpoint,
    awaiting: &Arc<Awaiting>,
    id: NodeId,
    proxy: SocketAddr,
    addr: SocketAddr,
    attempts: Attempts,
    found: mpsc::Sender<Reached>,
) {
    // Whether to go on after this connection: only after a relayed one,
    // and while someone listens.
    let go_on = |route: Route| route == Route::Relayed;
    let mut relayed = false;
    let mut dials: Dials = JoinSet::new();
    let mut pending = vec![addr];
    dial(&mut dials, endpoint, Route::Direct, addr, id);
    let mut last: Option<ConnectError> = None;
    // The head start: a reachable source costs its proxy nothing.
    let head = tokio::time::sleep(attempts.direct_head_start);
    tokio::pin!(head);
    tokio::select! {
        _ = &mut head => {}
        Some(done) = dials.join_next() => match done {
            Ok((route, _, Ok(peer))) => {
                let _ = found.send(Ok((peer, route))).await;
                return;
            }
            Ok((_, _, Err(e))) => { pending.clear(); last = Some(e) }
            Err(_) => pending.clear(),
        },
    }
    let Some(mut wait) = awaiting.expect(id) else {
        let _ = found.send(finish(dials, last, addr).await).await;
        return;
    };
    // Once the source dials us, a dial of ours that gets through went
    // through the hole its dial opened.
    let mut dialling_back = false;
    // A relay asked for and not yet failed.
    let mut relaying = false;
    for round in 0.. {
        let Some(patience) = attempts.wait(round) else {
            break;
        };
        let host = proxy.ip();
        if attempts.relays_at(round) {
            relaying = true;
            debug!(source = %id.short(), %proxy, round, "asking for a relay too");
            let endpoint = endpoint.clone();
            dials.spawn(async move {
                let r = relay(&endpoint, proxy, id).await;
                (Route::Relayed, proxy, r)
            });
        }
        let may_ask = awaiting.proxies.lock().expect("proxies lock").may_ask(host);
        if !may_ask {
            debug!(%proxy, "push proxy asked enough, or unreachable");
            if pending.is_empty() && !relaying {
                break;
            }
        }
        let answer = match may_ask {
            true => Some(ask_proxy(endpoint, proxy, id).await),
            false => None,
        };
        match answer {
            None => {}
            Some(Ok(from)) => {
                debug!(source = %id.short(), %proxy, %from, round, "source dials back");
                dialling_back = true;
                if !pending.contains(&from) {
                    pending.push(from);
                    dial(&mut dials, endpoint, Route::Punched, from, id);
                }
            }
            Some(Err(Asked::Unreachable(e))) => {
                debug!(source = %id.short(), %proxy, error = %e, "push proxy unreachable");
                awaiting
                    .proxies
                    .lock()
                    .expect("proxies lock")
                    .unreachable(host);
                last = Some(e);
            }
            Some(Err(Asked::Refused(e))) => {
                debug!(source = %id.short(), %proxy, error = %e, "push proxy refused");
                last = Some(e);
            }
        }
        let until = tokio::time::sleep(patience);
        tokio::pin!(until);
        loop {
            tokio::select! {
                _ = &mut until => break,
                _ = found.closed() => return,
                Some(peer) = wait.rx.recv() => {
                    info!(source = %id.short(), route = "reversed", "connected");
                    let _ = found.send(Ok((peer, Route::Reversed))).await;
                    return;
                }
                Some(done) = dials.join_next() => match done {
                    Ok((route, _, Ok(peer))) => {
                        let route = match route {
                            Route::Direct if dialling_back => Route::Punched,
                            r => r,
                        };
                        info!(source = %id.short(), route = route.name(), "connected");
                        if found.send(Ok((peer, route))).await.is_err() || !go_on(route) {
                            return;
                        }
                        relayed = true;
                    }
                    Ok((route, at, Err(e))) => {
                        debug!(route = route.name(), %at, error = %e, "dial failed");
                        relaying &= route != Route::Relayed;
                        pending.retain(|a| *a != at);
                        last = Some(e);
                    }
                    Err(_) => {}
                },
            }
        }
    }
    drop(wait);
    dials.abort_all();
    if !relayed {
        let _ = found
            .send(Err(last.unwrap_or(ConnectError::Connect {
                addr,
                reason: "not reached directly, by dial back, by hole punch or by relay".into(),
            })))
            .await;
    }
}

type Dials = JoinSet<(Route, SocketAddr, Result<Peer, ConnectError>)>;

/// Dials `id` at `at` in a task of `dials`.
fn dial(dials: &mut Dials, endpoint: &Endpoint, route: Route, at: SocketAddr, id: NodeId) {
    let endpoint = endpoint.clone();
    dials.spawn(async move {
        let r = endpoint.connect(at, ALPN_TRANSFER, Some(id)).await;
        (route, at, r)
    });
}

/// Waits for the direct dial alone.
async fn finish(
    mut dials: Dials,
    last: Option<ConnectError>,
    addr: SocketAddr,
) -> Result<(Peer, Route), ConnectError> {
    while let Some(done) = dials.join_next().await {
        if let Ok((route, _, r)) = done {
            return r.map(|p| (p, route));
        }
    }
    Err(last.unwrap_or(ConnectError::Connect {
        addr,
        reason: "no dial left".into(),
    }))
}

/// Reaches `to` through a tunnel its push proxy at `proxy` relays
/// (docs/PROTOCOL.md 10.6): asks for the circuit, then dials `to` through
/// it, expecting its node id, as it would dial it directly. The tunnel
/// and its connection to the proxy last as long as the connection to `to`.
async fn relay(endpoint: &Endpoint, proxy: SocketAddr, to: NodeId) -> Result<Peer, ConnectError> {
    let fail = |reason: String| ConnectError::Connect {
        addr: proxy,
        reason: format!("relay: {reason}"),
    };
    let asked = ask_supernode(endpoint, proxy, &LeafRequest::Relay { to }, false)
        .await
        .map_err(|(Asked::Unreachable(e) | Asked::Refused(e))| e)?;
    match asked.reply {
        SupernodeReply::Relaying => {}
        SupernodeReply::Error(e) => return Err(fail(e.to_string())),
        other => return Err(fail(format!("answered {other:?}"))),
    }
    let local = endpoint.local_addr().map_err(|e| fail(e.to_string()))?;
    let tunnel = TunnelSocket::open(asked.send, asked.recv, local, proxy);
    let inner = endpoint
        .on_tunnel(tunnel.socket, &[])
        .map_err(|e| fail(e.to_string()))?;
    hold_until_carried(asked.peer.conn, tunnel.carrier);
    inner.connect(proxy, ALPN_TRANSFER, Some(to)).await
}

/// Keeps the connection a tunnel runs on until the tunnel ends.
fn hold_until_carried(conn: quinn::Connection, carrier: tokio::task::JoinHandle<()>) {
    tokio::spawn(async move {
        let _ = carrier.await;
        conn.close(0u32.into(), b"relay ended");
    });
}

/// Why a push proxy gave no address.
enum Asked {
    /// No connection to it at all.
    Unreachable(ConnectError),
    /// It answered, but not with an address.
    Refused(ConnectError),
}

/// Asks the supernode at `proxy` to have `to` dial us; where `to` dials
/// from.
async fn ask_proxy(
    endpoint: &Endpoint,
    proxy: SocketAddr,
    to: NodeId,
) -> Result<SocketAddr, Asked> {
    let asked = ask_supernode(endpoint, proxy, &LeafRequest::Connect { to }, true).await?;
    asked.peer.conn.close(0u32.into(), b"done");
    let fail = |reason: String| {
        Asked::Refused(ConnectError::Connect {
            addr: proxy,
            reason,
        })
    };
    match asked.reply {
        SupernodeReply::Connecting { addr } => addr
            .parse::<SocketAddr>()
            .map_err(|_| fail(format!("named a bad address {addr:?}"))),
        SupernodeReply::Error(e) => Err(fail(e.to_string())),
        other => Err(fail(format!("answered {other:?}"))),
    }
}

/// A request of ours to a supernode, on a connection of its own, and its
/// first answer; the connection and the stream stay open for the caller.
struct AskedSupernode {
    peer: Peer,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    reply: SupernodeReply,
}

/// Sends `request` to the supernode at `at` on a new connection (our side
/// of the stream finished after it if `finish`) and reads its first
/// answer, each step within [`PROXY_TIMEOUT`].
async fn ask_supernode(
    endpoint: &Endpoint,
    at: SocketAddr,
    request: &LeafRequest,
    finish: bool,
) -> Result<AskedSupernode, Asked> {
    let timed_out = || ConnectError::Timeout {
        addr: at,
        after: PROXY_TIMEOUT,
    };
    let peer = tokio::time::timeout(PROXY_TIMEOUT, endpoint.connect(at, ALPN_LEAF, None))
        .await
        .map_err(|_| Asked::Unreachable(timed_out()))?
        .map_err(Asked::Unreachable)?;
    let fail = |reason: String| ConnectError::Connect { addr: at, reason };
    let asked = async {
        let (mut send, mut recv) = peer.conn.open_bi().await.map_err(|e| fail(e.to_string()))?;
        net::write_frame(&mut send, request, MAX_REQUEST_FRAME)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if finish {
            let _ = send.finish();
        }
        match net::read_first_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME).await {
            Ok(Some(reply)) => Ok((send, recv, reply)),
            Ok(None) => Err(fail("answered nothing".into())),
            Err(e) => Err(fail(e.to_string())),
        }
    };
    let (send, recv, reply) = tokio::time::timeout(PROXY_TIMEOUT, asked)
        .await
        .map_err(|_| Asked::Refused(timed_out()))?
        .map_err(Asked::Refused)?;
    Ok(AskedSupernode {
        peer,
        send,
        recv,
        reply,
    })
}
