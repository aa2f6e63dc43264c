//! Which supernodes a leaf attaches to: up to `attach` of them at once,
//! chosen among those it was given, those in its cache, and those its
//! supernodes told it of, least loaded first; a lost one is replaced at once.
//!
//! The cache (`supernodes.json` in the data dir) remembers every supernode
//! the leaf has met, so that after a restart or an address change it needs
//! no particular server again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use servent_proto::limits::MAX_SUPERNODE_INFOS;
use servent_proto::msg::SupernodeInfo;
use servent_proto::NodeId;
use supernode::net::Endpoint;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::link::{self, LinkError, LinkStatus};
use crate::role::Role;
use crate::share::Share;
use servent_proto::msg::{LeafReply, SupernodeRequest};

/// Supernodes a leaf attaches to by default.
pub const DEFAULT_ATTACH: usize = 3;
const CACHE_FILE: &str = "supernodes.json";
/// Supernodes remembered in the cache.
const MAX_CACHED: usize = 200;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Load (thousandths) above which a supernode gets no extra links.
/// Below the election high-water mark (800 by default), so that extra
/// links alone never make a supernode ask for more supernodes.
const EXTRA_LINK_MAX_LOAD: u64 = 500;
/// A leaf with no supernode retries a full one after this long.
const FULL_RETRY: Duration = Duration::from_secs(1);
/// A supernode that moved us elsewhere is not retried for this long.
const REHOME_AVOID: Duration = Duration::from_secs(60);
/// How often the manager looks for missing links.
const TICK: Duration = Duration::from_millis(250);

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

fn save_cache(data_dir: &Path, entries: &[Cached]) {
    let path = data_dir.join(CACHE_FILE);
    let result = serde_json::to_vec_pretty(entries)
        .map_err(std::io::Error::other)
        .and_then(|b| crate::replace_file(&path, &b));
    if let Err(e) = result {
        warn!(path = %path.display(), error = %e, "cannot save the supernode cache");
    }
}

#[derive(Debug, Clone)]
struct Candidate {
    addr: String,
    id: Option<NodeId>,
    load_permille: u64,
    last_seen: u64,
    next_try: Instant,
    delay: Duration,
    /// Attempts in a row that did not reach it; the unreachable go last.
    failures: u32,
}

impl Candidate {
    fn new(addr: String, id: Option<NodeId>, last_seen: u64) -> Self {
        Self {
            addr,
            id,
            load_permille: 500,
            last_seen,
            next_try: Instant::now(),
            delay: BACKOFF_MIN,
            failures: 0,
        }
    }
}

/// Everything the manager needs.
pub struct Attach {
    pub endpoint: Endpoint,
    pub bootstrap: Vec<String>,
    pub data_dir: PathBuf,
    pub listen_port: u16,
    pub share: Arc<Share>,
    pub attach: usize,
    /// One entry per live link, for status.
    pub links: Arc<Mutex<Vec<Arc<Mutex<LinkStatus>>>>>,
    /// The supernode role this leaf may be asked to take.
    pub role: Arc<Role>,
}

enum Event {
    Learned(Vec<SupernodeInfo>),
    Asked(link::Request),
    Ended {
        addr: String,
        result: Result<(), LinkError>,
        registered: Option<NodeId>,
    },
}

/// Keeps the leaf attached to up to `attach` supernodes until `stop`.
pub async fn run(cfg: Attach, mut stop: watch::Receiver<bool>) {
    let me = cfg.endpoint.id();
    let mut candidates: Vec<Candidate> = Vec::new();
    for addr in &cfg.bootstrap {
        candidates.push(Candidate::new(addr.clone(), None, 0));
    }
    for c in load_cache(&cfg.data_dir) {
        if !candidates.iter().any(|x| x.addr == c.addr) {
            candidates.push(Candidate::new(
                c.addr,
                c.id.and_then(|i| i.parse().ok()),
                c.last_seen,
            ));
        }
    }
    let (events, mut rx) = mpsc::channel::<Event>(64);
    let mut active: HashMap<String, Arc<Mutex<LinkStatus>>> = HashMap::new();
    // Ends one link (an elected leaf dropping its extra links).
    let mut link_stops: HashMap<String, watch::Sender<bool>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut dirty = true;
    loop {
        // An elected leaf knows the mesh first-hand: those are candidates too.
        if let Some(state) = cfg.role.state() {
            merge(
                &mut candidates,
                state.mesh.for_leaves(true, std::time::Instant::now()),
                me,
            );
        }
        // Start links while fewer than wanted are up.
        let now = Instant::now();
        let linked_ids: Vec<NodeId> = active
            .values()
            .filter_map(|s| s.lock().expect("link status").supernode.map(|(id, _)| id))
            .collect();
        let mut order: Vec<usize> = (0..candidates.len())
            .filter(|&i| {
                let c = &candidates[i];
                // Extra links go only where there is room to spare, so that
                // a leaf with no supernode at all can still find one.
                let spare = linked_ids.is_empty() || c.load_permille <= EXTRA_LINK_MAX_LOAD;
                !active.contains_key(&c.addr)
                    && c.next_try <= now
                    && spare
                    && c.id != Some(me)
                    && !c.id.is_some_and(|id| linked_ids.contains(&id))
            })
            .collect();
        order.sort_by_key(|&i| {
            (
                candidates[i].failures,
                candidates[i].load_permille,
                std::cmp::Reverse(candidates[i].last_seen),
            )
        });
        // An elected leaf keeps one link (for its own files) and leaves
        // the rest of its supernodes' room to leaves that need it.
        let wanted = if cfg.role.is_supernode() {
            1
        } else {
            cfg.attach
        };
        if active.len() > wanted {
            let extra: Vec<String> = active.keys().skip(wanted).cloned().collect();
            for addr in extra {
                if let Some(stop) = link_stops.remove(&addr) {
                    let _ = stop.send(true);
                }
            }
        }
        for i in order.into_iter().take(wanted.saturating_sub(active.len())) {
            let c = &mut candidates[i];
            c.next_try = now + c.delay;
            c.delay = (c.delay * 2).min(BACKOFF_MAX);
            let status = Arc::new(Mutex::new(LinkStatus::default()));
            active.insert(c.addr.clone(), status.clone());
            let (link_stop, mut link_stopped) = watch::channel(false);
            link_stops.insert(c.addr.clone(), link_stop);
            let (addr, expected) = (c.addr.clone(), c.id);
            let (endpoint, share, events, stop) = (
                cfg.endpoint.clone(),
                cfg.share.clone(),
                events.clone(),
                stop.clone(),
            );
            let listen_port = cfg.listen_port;
            let promotable = !cfg.role.no_promote;
            tasks.spawn(
                async move {
                    let (learned_tx, mut learned_rx) = mpsc::channel(4);
                    let (requests_tx, mut requests_rx) = mpsc::channel(4);
                    let forward = {
                        let events = events.clone();
                        async move {
                            loop {
                                let ev = tokio::select! {
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
                    };
                    let session = async {
                        let Some(sock) = link::resolve(&addr).await else {
                            return Err(LinkError::Lost(format!("cannot resolve {addr}")));
                        };
                        link::session(
                            &endpoint,
                            sock,
                            expected,
                            listen_port,
                            &share,
                            &status,
                            hooks,
                            stop,
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
                    let registered = status
                        .lock()
                        .expect("link status")
                        .supernode
                        .map(|(id, _)| id);
                    let _ = events
                        .send(Event::Ended {
                            addr,
                            result,
                            registered,
                        })
                        .await;
                }
                .instrument(info_span!("link", supernode = %c.addr)),
            );
        }
        publish(&cfg, &active);
        if dirty {
            save(&cfg, &candidates, &active);
            dirty = false;
        }

        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(TICK) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            Some(ev) = rx.recv() => {
                dirty = true;
                match ev {
                    Event::Learned(list) => merge(&mut candidates, list, me),
                    Event::Asked(request) => {
                        let reply = match request.req {
                            SupernodeRequest::Promote { max_leaves } => {
                                // Mesh first with the supernodes we know to be up.
                                let mut peers = vec![request.from_addr];
                                peers.extend(
                                    active
                                        .values()
                                        .filter_map(|s| s.lock().expect("link status").supernode.map(|(_, a)| a))
                                        .filter(|a| *a != request.from_addr),
                                );
                                cfg.role.promote(max_leaves, peers, as_infos(&candidates, me))
                            }
                            SupernodeRequest::Rehome(mut list) => {
                                // A hostile supernode could send thousands.
                                list.truncate(MAX_SUPERNODE_INFOS);
                                info!(from = %request.from.short(), offered = list.len(), "asked to move");
                                // Prefer what we were offered; keep away from the sender a while.
                                if let Some(c) = candidates.iter_mut().find(|c| c.id == Some(request.from)) {
                                    c.next_try = Instant::now() + REHOME_AVOID;
                                    c.load_permille = 1000;
                                }
                                let offered: Vec<NodeId> = list.iter().map(|i| i.id).collect();
                                merge(&mut candidates, list, me);
                                for c in candidates.iter_mut().filter(|c| c.id.is_some_and(|id| offered.contains(&id))) {
                                    c.load_permille = 0;
                                    c.next_try = Instant::now();
                                }
                                LeafReply::Accepted
                            }
                        };
                        let _ = request.reply.send(reply);
                    }
                    Event::Ended { addr, result, registered } => {
                        let status = active.remove(&addr);
                        link_stops.remove(&addr);
                        let orphan = active.values().all(|s| s.lock().expect("link status").supernode.is_none());
                        if orphan {
                            // With no supernode left, every known one is worth a try now.
                            let soon = Instant::now() + FULL_RETRY;
                            for c in candidates.iter_mut() {
                                c.next_try = c.next_try.min(soon);
                                c.delay = BACKOFF_MIN;
                            }
                        }
                        if let Some(c) = candidates.iter_mut().find(|c| c.addr == addr) {
                            if registered.is_some() {
                                c.id = registered;
                                c.last_seen = crate::share::now_secs();
                                // It worked for a while: retry it soon, not after a long backoff.
                                c.delay = BACKOFF_MIN;
                                c.failures = 0;
                            } else if !matches!(result, Err(LinkError::Full(_))) {
                                c.failures = c.failures.saturating_add(1);
                            }
                        }
                        match result {
                            Ok(()) => {}
                            Err(LinkError::Full(elsewhere)) => {
                                info!(supernode = %addr, suggested = elsewhere.len(), "supernode full; trying others");
                                let orphan = active.values().all(|s| s.lock().expect("link status").supernode.is_none());
                                if let Some(c) = candidates.iter_mut().find(|c| c.addr == addr) {
                                    c.load_permille = 1000;
                                    if orphan {
                                        // With no supernode at all, keep asking: room appears as
                                        // the network elects more supernodes.
                                        c.next_try = Instant::now() + FULL_RETRY;
                                        c.delay = BACKOFF_MIN;
                                    }
                                }
                                merge(&mut candidates, elsewhere, me);
                            }
                            Err(e) => {
                                if status.is_some_and(|s| s.lock().expect("link status").supernode.is_some()) || registered.is_some() {
                                    warn!(supernode = %addr, error = %e, "supernode lost");
                                } else {
                                    debug!(supernode = %addr, error = %e, "supernode not reachable");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    tasks.abort_all();
}

/// The supernodes this leaf knows by id, least loaded and most reliable
/// first, for the mesh of its supernode role to dial (load as thousandths).
fn as_infos(candidates: &[Candidate], me: NodeId) -> Vec<SupernodeInfo> {
    let now = crate::share::now_secs();
    let mut known: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.id.is_some_and(|id| id != me))
        .collect();
    known.sort_by_key(|c| (c.failures, c.load_permille));
    known
        .into_iter()
        .take(MAX_SUPERNODE_INFOS)
        .filter_map(|c| {
            Some(SupernodeInfo {
                id: c.id?,
                addr: c.addr.clone(),
                leaves: c.load_permille.min(1000) as u32,
                max_leaves: 1000,
                age_secs: now.saturating_sub(c.last_seen).min(u32::MAX.into()) as u32,
            })
        })
        .collect()
}

/// Adds or refreshes supernodes a supernode told us of (never ourselves).
fn merge(candidates: &mut Vec<Candidate>, list: Vec<SupernodeInfo>, me: NodeId) {
    let now = crate::share::now_secs();
    for info in list {
        if info.id == me {
            continue;
        }
        let Ok(addr) = info.addr.parse::<SocketAddr>() else {
            continue;
        };
        if addr.port() == 0 || addr.ip().is_unspecified() {
            continue;
        }
        let load = if info.max_leaves == 0 {
            1000
        } else {
            u64::from(info.leaves) * 1000 / u64::from(info.max_leaves)
        };
        let seen = now.saturating_sub(info.age_secs.into());
        let addr = addr.to_string();
        match candidates
            .iter_mut()
            .find(|c| c.id == Some(info.id) || c.addr == addr)
        {
            Some(c) => {
                c.load_permille = load.min(1000);
                c.last_seen = c.last_seen.max(seen);
                if c.id == Some(info.id) && c.addr != addr {
                    c.addr = addr;
                }
                c.id = Some(info.id);
            }
            None => {
                let mut c = Candidate::new(addr, Some(info.id), seen);
                c.load_permille = load.min(1000);
                candidates.push(c);
            }
        }
    }
    if candidates.len() > MAX_CACHED {
        candidates.sort_by_key(|c| std::cmp::Reverse(c.last_seen));
        candidates.truncate(MAX_CACHED);
    }
}

fn publish(cfg: &Attach, active: &HashMap<String, Arc<Mutex<LinkStatus>>>) {
    let mut links = cfg.links.lock().expect("links");
    links.clear();
    links.extend(active.values().cloned());
}

fn save(cfg: &Attach, candidates: &[Candidate], active: &HashMap<String, Arc<Mutex<LinkStatus>>>) {
    let now = crate::share::now_secs();
    let mut entries: Vec<Cached> = candidates
        .iter()
        .map(|c| {
            let linked = active
                .get(&c.addr)
                .is_some_and(|s| s.lock().expect("link status").supernode.is_some());
            Cached {
                addr: c.addr.clone(),
                id: c.id.map(|i| i.to_string()),
                last_seen: if linked { now } else { c.last_seen },
            }
        })
        .collect();
    entries.sort_by_key(|c| std::cmp::Reverse(c.last_seen));
    entries.truncate(MAX_CACHED);
    save_cache(&cfg.data_dir, &entries);
}
