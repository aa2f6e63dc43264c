//! Which supernodes a leaf attaches to: the driver of the attach planner
//! ([`servent_proto::attach`], where the rules live). It dials what the
//! planner says, runs one [`link::session`] per supernode, reports what
//! happens to the planner, answers the supernodes' requests, and keeps the
//! cache file.
//!
//! The cache (`supernodes.json` in the data dir) remembers every supernode
//! the leaf has met, so that after a restart or an address change it needs
//! no particular server again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use servent_net::Endpoint;
use servent_proto::attach::{Action, AttachConfig, AttachPlanner, CacheEntry, LinkOutcome};
use servent_proto::msg::{LeafReply, SupernodeInfo, SupernodeRequest};
use servent_proto::NodeId;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::link::{self, LinkError, LinkStatus};
use crate::portmap::Announced;
use crate::role::Role;
use crate::share::{now_secs, Share};

pub use servent_proto::attach::DEFAULT_ATTACH;

const CACHE_FILE: &str = "supernodes.json";

/// One supernode as the cache file holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cached {
    pub addr: String,
    #[serde(default)]
    pub id: Option<String>,
    /// Unix seconds when last registered with or heard of.
    #[serde(default)]
    pub last_seen: u64,
}

/// Reads the cache, most recently seen first.
pub fn load_cache(data_dir: &Path) -> Vec<Cached> {
    let mut v: Vec<Cached> = std::fs::read(data_dir.join(CACHE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    v.sort_by_key(|c| std::cmp::Reverse(c.last_seen));
    v
}

fn save_cache(data_dir: &Path, entries: &[CacheEntry<String>]) {
    let entries: Vec<Cached> = entries
        .iter()
        .map(|c| Cached {
            addr: c.addr.clone(),
            id: c.id.map(|i| i.to_string()),
            last_seen: c.last_seen,
        })
        .collect();
    let path = data_dir.join(CACHE_FILE);
    let result = serde_json::to_vec_pretty(&entries)
        .map_err(std::io::Error::other)
        .and_then(|b| crate::replace_file(&path, &b));
    if let Err(e) = result {
        warn!(path = %path.display(), error = %e, "cannot save the supernode cache");
    }
}

/// Everything the manager needs.
pub struct Attach {
    /// The supernodes heard on the LAN now (`crate::lan`), learned as a
    /// supernode's list is.
    pub lan: watch::Receiver<Vec<SupernodeInfo>>,
    pub endpoint: Endpoint,
    pub bootstrap: Vec<String>,
    pub data_dir: PathBuf,
    /// The port each session registers (the gateway's mapping of the
    /// listening one, while there is one).
    pub port: Announced,
    pub share: Arc<Share>,
    pub attach: usize,
    /// The planner's timings and limits.
    pub rules: AttachConfig,
    /// The timings of each session (share batches, candidacy, asking for
    /// supernodes).
    pub link_timings: link::LinkTimings,
    /// One entry per live link, for status.
    pub links: Arc<Mutex<Vec<Arc<Mutex<LinkStatus>>>>>,
    /// The supernode role this leaf may be asked to take.
    pub role: Arc<Role>,
    /// Dials the downloaders our supernodes ask us to dial back.
    pub pusher: Arc<crate::push::Pusher>,
}

/// What the link tasks tell the manager.
enum Event {
    Up {
        addr: String,
        id: NodeId,
    },
    Learned(Vec<SupernodeInfo>),
    Asked(link::Request),
    Ended {
        addr: String,
        result: Result<(), LinkError>,
    },
}

/// A link task, as the manager holds it.
struct Running {
    status: Arc<Mutex<LinkStatus>>,
    stop: watch::Sender<bool>,
}

/// Keeps the leaf attached to up to `attach` supernodes until `stop`.
pub async fn run(cfg: Attach, mut stop: watch::Receiver<bool>) {
    let mut lan = cfg.lan.clone();
    let cached = load_cache(&cfg.data_dir)
        .into_iter()
        .map(|c| CacheEntry {
            addr: c.addr,
            id: c.id.and_then(|i| i.parse().ok()),
            last_seen: c.last_seen,
        })
        .collect();
    let (me, bootstrap) = (cfg.endpoint.id(), cfg.bootstrap.clone());
    let mut planner = AttachPlanner::new(
        cfg.rules.clone(),
        me,
        cfg.attach,
        bootstrap,
        cached,
        Instant::now(),
        now_secs(),
    );
    let (events_tx, mut events) = mpsc::channel::<Event>(64);
    let mut links: HashMap<String, Running> = HashMap::new();
    let mut tasks = JoinSet::new();
    loop {
        // The role comes and goes without an event: look at it each time
        // round. An elected leaf knows the mesh first-hand.
        let mesh = match cfg.role.state() {
            Some(s) => Some(s.for_leaves(true).await),
            None => None,
        };
        planner.handle_role(Instant::now(), now_secs(), mesh);
        while let Some(action) = planner.poll_action() {
            match action {
                Action::Connect { addr, expected } => {
                    let link = start(&cfg, &mut tasks, &events_tx, &stop, &addr, expected);
                    links.insert(addr, link);
                }
                Action::Stop { addr } => {
                    if let Some(link) = links.get(&addr) {
                        let _ = link.stop.send(true);
                    }
                }
                Action::SaveCache(entries) => save_cache(&cfg.data_dir, &entries),
            }
        }
        publish(&cfg, &links);
        let tick = Instant::now() + cfg.rules.tick;
        let wake = planner.poll_timeout().map_or(tick, |t| t.min(tick));
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep_until(wake.into()) => planner.handle_timeout(Instant::now()),
            Ok(()) = lan.changed() => {
                let heard = lan.borrow_and_update().clone();
                planner.handle_learned(Instant::now(), now_secs(), heard);
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            Some(ev) = events.recv() => {
                let (now, unix) = (Instant::now(), now_secs());
                match ev {
                    Event::Up { addr, id } => planner.handle_link_up(now, unix, &addr, id),
                    Event::Learned(list) => planner.handle_learned(now, unix, list),
                    Event::Asked(request) => answer(&cfg, &mut planner, &links, request),
                    Event::Ended { addr, result } => {
                        let outcome = outcome(&addr, links.remove(&addr), result);
                        planner.handle_link_ended(now, unix, &addr, outcome);
                    }
                }
            }
        }
    }
    tasks.abort_all();
}

/// Answers a request of a supernode this leaf is registered with.
fn answer(
    cfg: &Attach,
    planner: &mut AttachPlanner<String>,
    links: &HashMap<String, Running>,
    request: link::Request,
) {
    let reply = match request.req {
        SupernodeRequest::Promote { max_leaves } => {
            let promotion = planner.promotion(now_secs(), request.from);
            let registered: Vec<_> = links
                .values()
                .filter_map(|l| l.status.lock().expect("link status").supernode)
                .collect();
            // Mesh first with the one that asked, then the others we know to be up.
            let mut peers = vec![request.from_addr];
            for id in promotion.peers {
                if let Some(&(_, addr)) = registered.iter().find(|(i, _)| *i == id) {
                    if !peers.contains(&addr) {
                        peers.push(addr);
                    }
                }
            }
            cfg.role.promote(max_leaves, peers, promotion.known)
        }
        SupernodeRequest::Rehome(list) => {
            info!(from = %request.from.short(), offered = list.len(), "asked to move");
            planner.handle_rehome(Instant::now(), now_secs(), request.from, list);
            LeafReply::Accepted
        }
        SupernodeRequest::Connect { peer, addr } => cfg.pusher.answer(peer, &addr),
        // The session hands a relay's stream to the pusher itself.
        SupernodeRequest::Relay { .. } => LeafReply::Declined("not here".into()),
    };
    let _ = request.reply.send(reply);
}

/// What the planner is told of a link's end (and what the log says).
fn outcome(addr: &str, link: Option<Running>, result: Result<(), LinkError>) -> LinkOutcome {
    match result {
        Ok(()) => LinkOutcome::Stopped,
        Err(LinkError::PortChanged { from, to }) => {
            // Not the supernode's doing: registered again straight away.
            info!(supernode = %addr, from, to, "the gateway maps another port: registering again");
            LinkOutcome::Stopped
        }
        Err(LinkError::Full(elsewhere)) => {
            info!(supernode = %addr, suggested = elsewhere.len(), "supernode full; trying others");
            LinkOutcome::Full(elsewhere)
        }
        Err(e) => {
            let was_up =
                link.is_some_and(|l| l.status.lock().expect("link status").supernode.is_some());
            if was_up {
                warn!(supernode = %addr, error = %e, "supernode lost");
            } else {
                debug!(supernode = %addr, error = %e, "supernode not reachable");
            }
            LinkOutcome::Failed
        }
    }
}

/// Starts a session with the supernode at `addr`, in a task of its own
/// that reports to `events`.
fn start(
    cfg: &Attach,
    tasks: &mut JoinSet<()>,
    events: &mpsc::Sender<Event>,
    stop: &watch::Receiver<bool>,
    addr: &str,
    expected: Option<NodeId>,
) -> Running {
    let status = Arc::new(Mutex::new(LinkStatus::default()));
    let (link_stop, mut link_stopped) = watch::channel(false);
    let (endpoint, share, events, stop) = (
        cfg.endpoint.clone(),
        cfg.share.clone(),
        events.clone(),
        stop.clone(),
    );
    let (addr, task_status) = (addr.to_string(), status.clone());
    let port = cfg.port.clone();
    let timings = cfg.link_timings.clone();
    let promotable = !cfg.role.no_promote;
    let may_offer = {
        let role = cfg.role.clone();
        Arc::new(move || role.may_offer()) as Arc<dyn Fn() -> bool + Send + Sync>
    };
    let relayed: link::Relayed = {
        let pusher = cfg.pusher.clone();
        Arc::new(move |peer, via, send, recv| pusher.relayed(peer, via, send, recv))
    };
    let span = info_span!("link", supernode = %addr);
    tasks.spawn(
        async move {
            let status = task_status;
            let (learned_tx, mut learned_rx) = mpsc::channel(4);
            let (requests_tx, mut requests_rx) = mpsc::channel(4);
            let (registered_tx, mut registered_rx) = oneshot::channel();
            let forward = {
                let (events, addr) = (events.clone(), addr.clone());
                async move {
                    let mut up_told = false;
                    loop {
                        let ev = tokio::select! {
                            r = &mut registered_rx, if !up_told => {
                                up_told = true;
                                match r {
                                    Ok(id) => Event::Up { addr: addr.clone(), id },
                                    Err(_) => continue,
                                }
                            }
                            Some(list) = learned_rx.recv() => Event::Learned(list),
                            Some(req) = requests_rx.recv() => Event::Asked(req),
                            else => return,
                        };
                        let _ = events.send(ev).await;
                    }
                }
            };
            let hooks = link::Hooks {
                learned: learned_tx,
                requests: requests_tx,
                promotable,
                may_offer,
                registered: registered_tx,
                relayed,
            };
            let session = async {
                let Some(sock) = link::resolve(&addr).await else {
                    return Err(LinkError::Lost(format!("cannot resolve {addr}")));
                };
                link::session(
                    &endpoint, sock, expected, port, &share, &status, hooks, &timings, stop,
                )
                .await
            };
            let session = async {
                tokio::select! {
                    r = session => r,
                    _ = link_stopped.changed() => Ok(()),
                }
            };
            let (result, ()) = tokio::join!(session, forward);
            let _ = events.send(Event::Ended { addr, result }).await;
        }
        .instrument(span),
    );
    Running {
        status,
        stop: link_stop,
    }
}

fn publish(cfg: &Attach, active: &HashMap<String, Running>) {
    let mut links = cfg.links.lock().expect("links");
    links.clear();
    links.extend(active.values().map(|l| l.status.clone()));
}
