//! Zero configuration on a LAN: the leaf's driver of `servent_proto::lan`
//! over `servent_net::lan`'s mDNS daemon.
//!
//! It announces the leaf (its role, and whether it would take the
//! supernode role), hands the supernodes heard to the attach manager as
//! hints (dialled with their announced id expected, so the TLS handshake
//! checks it), and takes the role alone when the LAN has no supernode and
//! the core says this leaf is the one. While it holds a role taken alone,
//! it keeps the role's index of this leaf's own files, which no other
//! supernode then holds; the role meshes with the supernodes heard since,
//! and steps down by the election's rules.
//!
//! [`discover`] is the one-shot commands' part: listen for a moment, and
//! name the supernodes heard.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use servent_net::lan::{Heard, Lan};
use servent_proto::lan::{self as rules, Alone, Announcement, LanPeers, LanRole};
use servent_proto::msg::{FileEntry, SupernodeInfo};
use servent_proto::{ContentHash, NodeId};
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use crate::role::Role;
use crate::share::Share;
use crate::status;

/// How often the driver looks at its facts again, at most.
const TICK: Duration = Duration::from_secs(1);

/// Everything the driver needs.
pub struct LanConfig {
    pub id: NodeId,
    /// Where the leaf's QUIC endpoint serves.
    pub listen: SocketAddr,
    /// Supernodes were given on the command line: the user chose a
    /// network, and the leaf never takes the role alone.
    pub given: bool,
    pub role: Arc<Role>,
    pub share: Arc<Share>,
    pub links: status::Links,
    /// The supernodes heard, for the attach manager.
    pub hints: watch::Sender<Vec<SupernodeInfo>>,
}

/// Starts the mDNS daemon for `cfg`, or says why it cannot (the leaf
/// then goes on without the LAN).
pub fn start(cfg: LanConfig, stop: watch::Receiver<bool>) -> Option<tokio::task::JoinHandle<()>> {
    match Lan::start(cfg.id, cfg.listen) {
        Ok((lan, heard)) => Some(tokio::spawn(run(cfg, lan, heard, stop).in_current_span())),
        Err(e) => {
            warn!(error = %e, "no LAN discovery");
            None
        }
    }
}

async fn run(
    cfg: LanConfig,
    lan: Lan,
    mut heard: tokio::sync::mpsc::Receiver<Heard>,
    mut stop: watch::Receiver<bool>,
) {
    let mut peers = LanPeers::new(cfg.id);
    let mut announced: Option<Announcement> = None;
    let mut alone_since = Instant::now();
    let mut own = OwnFiles::default();
    let mut changes = cfg.share.subscribe();
    let mut share_changed = true;
    // What the role's mesh was last told of, and by which role.
    let mut seeded: Option<(u64, Vec<SupernodeInfo>)> = None;
    loop {
        let now = Instant::now();
        peers.expire(now);
        let supernodes = peers.supernodes();
        let lan_supernodes = peers.supernode_infos();
        cfg.hints.send_if_modified(|hints| {
            let changed = *hints != lan_supernodes;
            hints.clone_from(&lan_supernodes);
            changed
        });
        // The role's mesh learns of the LAN's supernodes as they appear.
        if let Some(state) = cfg.role.state().filter(|_| cfg.role.is_alone()) {
            let now_seeded = Some((cfg.role.promotions(), lan_supernodes.clone()));
            if seeded != now_seeded && !lan_supernodes.is_empty() {
                state.seed(lan_supernodes.clone());
                seeded = now_seeded;
            }
        }
        let registered = !status::attached(&cfg.links).is_empty();
        if registered || !supernodes.is_empty() || cfg.role.is_supernode() {
            alone_since = now;
        }
        let alone = Alone {
            for_how_long: now - alone_since,
            // Given supernodes, the user chose a network: never alone.
            may_take: !cfg.given && cfg.role.may_offer(),
            holding: cfg.role.is_supernode(),
        };
        if rules::take_role_alone(&peers, alone) {
            let mesh = supernodes.iter().map(|(_, a)| *a).collect();
            cfg.role.take_alone(mesh);
        }
        own.keep(
            &cfg.role,
            cfg.id,
            &cfg.share,
            std::mem::take(&mut share_changed),
        );
        let ann = Announcement {
            id: cfg.id,
            role: match cfg.role.is_supernode() {
                true => LanRole::Supernode,
                false => LanRole::Leaf,
            },
            port: cfg.listen.port(),
            // Asked again: taking the role just now ends the candidacy.
            candidate: !cfg.given && cfg.role.may_offer(),
        };
        if announced.as_ref() != Some(&ann) {
            match lan.announce(&ann) {
                Ok(()) => {
                    info!(role = ann.role.as_str(), "announced on the LAN");
                    announced = Some(ann);
                }
                Err(e) => warn!(error = %e, "cannot announce on the LAN"),
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = changes.changed() => share_changed = true,
            _ = tokio::time::sleep(TICK) => {}
            event = heard.recv() => match event {
                Some(event) => event.apply(&mut peers, Instant::now()),
                None => break,
            },
        }
    }
    // Dropping `lan` says goodbye.
}

/// This leaf's own files in the index of the role it took alone.
#[derive(Default)]
struct OwnFiles {
    /// What is in the role's index now, by hash; empty while no such role
    /// is held.
    indexed: HashMap<ContentHash, FileEntry>,
    /// The promotion `indexed` is of (a new role starts with an empty
    /// index).
    of: Option<u64>,
}

impl OwnFiles {
    /// Brings the role's index to the share when the share `changed` or
    /// the role is new: adds what is new or renamed, removes what is gone.
    /// A role stepped down forgets its index, and so does this.
    fn keep(&mut self, role: &Role, id: NodeId, share: &Share, changed: bool) {
        let Some(state) = role.state().filter(|_| role.is_alone()) else {
            self.indexed.clear();
            self.of = None;
            return;
        };
        if self.of != Some(role.promotions()) {
            self.indexed.clear();
            self.of = Some(role.promotions());
        } else if !changed {
            return;
        }
        let now: HashMap<ContentHash, FileEntry> =
            share.entries().into_iter().map(|e| (e.hash, e)).collect();
        let gone: Vec<ContentHash> = self
            .indexed
            .keys()
            .filter(|h| !now.contains_key(h))
            .copied()
            .collect();
        let new: Vec<FileEntry> = now
            .values()
            .filter(|e| self.indexed.get(&e.hash) != Some(e))
            .cloned()
            .collect();
        if !gone.is_empty() {
            state.index().remove(id, &gone);
        }
        if !new.is_empty() {
            // Its own entries count against no one else's address.
            if let Err(e) = state.index().add(id, IpAddr::V4(Ipv4Addr::LOCALHOST), &new) {
                warn!(error = %e, "cannot index this leaf's own files");
                return;
            }
        }
        self.indexed = now;
    }
}

/// For one-shot commands that know no supernode: listens on the LAN for
/// up to `wait` (less once one is heard and a moment has passed for
/// others), and names the supernodes heard, this node's own included
/// (a `leaf serve` of the same data dir may hold the role).
pub async fn discover(listen: SocketAddr, wait: Duration) -> Vec<String> {
    // A random id of its own: the daemon's records are heard too.
    let me = NodeId(rand::random());
    let (lan, mut heard) = match Lan::start(me, listen) {
        Ok(started) => started,
        Err(e) => {
            debug!(error = %e, "no LAN discovery");
            return Vec::new();
        }
    };
    let mut peers = LanPeers::new(me);
    let deadline = tokio::time::Instant::now() + wait;
    let mut settle: Option<tokio::time::Instant> = None;
    loop {
        let until = settle.map_or(deadline, |s| s.min(deadline));
        match tokio::time::timeout_at(until, heard.recv()).await {
            Ok(Some(event)) => {
                event.apply(&mut peers, Instant::now());
                if !peers.supernodes().is_empty() && settle.is_none() {
                    settle = Some(tokio::time::Instant::now() + Duration::from_millis(300));
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
    drop(lan);
    peers
        .supernodes()
        .into_iter()
        .map(|(_, a)| a.to_string())
        .collect()
}

/// How long a one-shot command that knows no supernode listens on the LAN.
pub const DISCOVER_WAIT: Duration = Duration::from_secs(3);

/// The supernodes a one-shot command asks: those `given`, else the data
/// dir's cache, else those heard on the LAN within [`DISCOVER_WAIT`].
pub async fn supernodes_or_lan(data_dir: &std::path::Path, given: Vec<String>) -> Vec<String> {
    let known = crate::known_supernodes(data_dir, given);
    if !known.is_empty() {
        return known;
    }
    discover(SocketAddr::from(([0, 0, 0, 0], 0)), DISCOVER_WAIT).await
}
