//! The leaf's attach planner: which supernodes a leaf keeps a session with,
//! and when it tries the next one. Pure decisions: the caller passes the
//! time and what happened, and carries out the [`Action`]s; dialling,
//! sessions and the cache file are the driver's (`leaf/src/attach.rs`).
//!
//! The rules (docs/PROTOCOL.md section 8.7 describes them for other leaves):
//! - **Multi-homing.** Up to `links` sessions at once, one only while the
//!   leaf holds the supernode role itself (for its own files: the room on
//!   its supernodes goes to leaves that need it). Candidates are tried
//!   fewest failures first, then least loaded, then most recently seen.
//! - **Extra links only where there is room.** Once registered somewhere,
//!   a leaf opens further links only to supernodes whose known load is at
//!   most [`AttachConfig::extra_link_max_load_permille`], so that a leaf
//!   with no supernode at all can still find one.
//! - **Backoff.** Each try of a candidate doubles its next delay, from
//!   `backoff_min` to `backoff_max`; a session that registered resets it.
//! - **Lost.** A registered session that fails counts its supernode as
//!   fully loaded until a list tells its load again: it is retried soon,
//!   but after the others (it has most likely gone).
//! - **Orphan.** A leaf registered nowhere after a session ends makes every
//!   candidate due within `full_retry`, whatever its backoff, and while it
//!   is registered nowhere it tries `orphan_extra_tries` more sessions at
//!   once than it wants (the extra ones stop once one registers).
//! - **`Full`.** The full supernode counts as fully loaded; its suggestions
//!   are learned; with no other supernode the full one is asked again after
//!   `full_retry` (room appears as the network elects more supernodes).
//! - **`Rehome`.** The sender counts as full and is not dialled for
//!   `rehome_avoid`; the offered supernodes are due now, first of all.
//!   Make before break: the session with the sender is kept, no longer
//!   counted among those wanted, until another session is registered (or
//!   `rehome_grace` has passed), so that the leaf's files stay searchable
//!   throughout the move.
//! - **Never itself, never twice.** No session to the leaf's own id, and
//!   no two sessions (registered or being tried) to one id.
//!
//! Not here: what a session does (`leaf/src/link.rs`), what a supernode
//! decides about the leaf (`admit`, `elect`).
//!
//! Addresses are generic ([`PeerAddr`]): the node uses `HOST:PORT` strings
//! (a bootstrap address may be a name), a simulator may use its own.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::limits::MAX_SUPERNODE_INFOS;
use crate::msg::SupernodeInfo;
use crate::NodeId;

/// Supernodes a leaf attaches to by default.
pub const DEFAULT_ATTACH: usize = 3;

/// Load assumed of a supernode no list has told of yet, thousandths.
const UNKNOWN_LOAD: u64 = 500;
/// Load of a full supernode, thousandths.
const FULL_LOAD: u64 = 1000;

/// Timings and limits of the attach planner, with their defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachConfig {
    /// First delay before a candidate is tried again; doubles with each try.
    /// Default 500 ms.
    pub backoff_min: Duration,
    /// Longest delay between two tries of one candidate. Default 30 s.
    pub backoff_max: Duration,
    /// Load (thousandths) above which a supernode gets no extra links:
    /// the last 5 % of its room is kept for leaves with no supernode at
    /// all. Above the election's shortage mark (`elect::Policy`: less than
    /// 80 ‰ free), so that a network whose leaves lack their extra links
    /// reads as short of room and elects (the supernodes needed are those
    /// that give every leaf its `links`). Default 950 (500 before the
    /// election tracked need).
    pub extra_link_max_load_permille: u64,
    /// A leaf registered nowhere retries a full supernode, and every
    /// candidate after losing its last session, within this. Default 1 s.
    pub full_retry: Duration,
    /// A leaf registered nowhere tries this many more sessions at once
    /// than it wants, so that a dead or full candidate (after a loss,
    /// most of what it knows may be either) does not hold up the one
    /// with room; once registered, the tries beyond its `links` stop.
    /// Default 2.
    pub orphan_extra_tries: usize,
    /// A supernode that moved the leaf elsewhere is not dialled for this
    /// long (unless the leaf is then registered nowhere). Default 60 s.
    pub rehome_avoid: Duration,
    /// Longest a session that a `Rehome` moved the leaf away from is kept
    /// while no other session is registered. Default 10 s: a handshake's
    /// timeout (5 s) and a registration's round trip, with room.
    pub rehome_grace: Duration,
    /// How often the driver looks at what the planner cannot be told of as
    /// an event (whether the leaf holds the supernode role, and the mesh it
    /// then knows). The planner's own timeouts are exact. Default 250 ms.
    pub tick: Duration,
    /// Supernodes remembered (candidates kept and cache entries saved),
    /// the most recently seen. Default 200.
    pub max_cached: usize,
}

impl Default for AttachConfig {
    fn default() -> Self {
        Self {
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            extra_link_max_load_permille: 950,
            full_retry: Duration::from_secs(1),
            orphan_extra_tries: 2,
            rehome_avoid: Duration::from_secs(60),
            rehome_grace: Duration::from_secs(10),
            tick: Duration::from_millis(250),
            max_cached: 200,
        }
    }
}

/// An address the planner can dial and tell others of.
pub trait PeerAddr: Clone + Eq + std::fmt::Debug {
    /// The address a [`SupernodeInfo`] gives, if it can be dialled
    /// (`None`: the entry is skipped).
    fn from_info(addr: &str) -> Option<Self>;
    /// The address as a [`SupernodeInfo`] gives it.
    fn to_info(&self) -> String;
}

/// `IP:PORT`, neither port 0 nor an unspecified address.
fn dialable(addr: &str) -> Option<SocketAddr> {
    let a: SocketAddr = addr.parse().ok()?;
    (a.port() != 0 && !a.ip().is_unspecified()).then_some(a)
}

/// `HOST:PORT` as given; a learned one is a normalised `IP:PORT`.
impl PeerAddr for String {
    fn from_info(addr: &str) -> Option<Self> {
        dialable(addr).map(|a| a.to_string())
    }
    fn to_info(&self) -> String {
        self.clone()
    }
}

impl PeerAddr for SocketAddr {
    fn from_info(addr: &str) -> Option<Self> {
        dialable(addr)
    }
    fn to_info(&self) -> String {
        self.to_string()
    }
}

/// One supernode the leaf knows of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<A> {
    pub addr: A,
    pub id: Option<NodeId>,
    /// Load the last list naming it gave, thousandths (500 while unknown).
    pub load_permille: u64,
    /// Unix seconds when last registered with or heard of.
    pub last_seen: u64,
    /// Not tried before this.
    pub next_try: Instant,
    /// The wait after the next try.
    pub delay: Duration,
    /// Tries in a row that did not reach it; the unreachable go last.
    pub failures: u32,
}

impl<A> Candidate<A> {
    fn new(addr: A, id: Option<NodeId>, last_seen: u64, now: Instant, cfg: &AttachConfig) -> Self {
        Self {
            addr,
            id,
            load_permille: UNKNOWN_LOAD,
            last_seen,
            next_try: now,
            delay: cfg.backoff_min,
            failures: 0,
        }
    }
}

/// One supernode as the cache keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry<A> {
    pub addr: A,
    pub id: Option<NodeId>,
    /// Unix seconds when last registered with or heard of.
    pub last_seen: u64,
}

/// A session being tried or held.
#[derive(Debug, Clone)]
struct Link<A> {
    addr: A,
    /// The id dialled for, if known.
    expected: Option<NodeId>,
    /// Set once registered.
    id: Option<NodeId>,
    /// Told to stop; still counts until it has ended.
    stopping: bool,
    /// Moved away by a `Rehome`: kept until another session is registered
    /// or this deadline passes, and not counted among the sessions wanted.
    leaving: Option<Instant>,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<A> {
    /// Dial `addr` (checking the peer's id against `expected`, if any) and
    /// run a session there; report [`AttachPlanner::handle_link_up`] when
    /// registered and always [`AttachPlanner::handle_link_ended`] at the end.
    Connect { addr: A, expected: Option<NodeId> },
    /// End the session at `addr`; its end is still to be reported.
    Stop { addr: A },
    /// Replace the cache with these entries, most recently seen first.
    SaveCache(Vec<CacheEntry<A>>),
}

/// How a session ended. Whether it had registered the planner knows from
/// [`AttachPlanner::handle_link_up`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkOutcome {
    /// Ended on [`Action::Stop`] or at shutdown.
    Stopped,
    /// Registration was answered `Full`, with the supernodes it suggested.
    Full(Vec<SupernodeInfo>),
    /// Not reached, refused or lost.
    Failed,
}

/// What an elected leaf tells its new supernode role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Promotion {
    /// Supernodes to mesh with first: the one that asked, then those this
    /// leaf is registered with.
    pub peers: Vec<NodeId>,
    /// Every supernode this leaf knows by id, most reliable and least
    /// loaded first (at most [`MAX_SUPERNODE_INFOS`]).
    pub known: Vec<SupernodeInfo>,
}

/// The leaf's attach decisions (see the module doc).
#[derive(Debug, Clone)]
pub struct AttachPlanner<A> {
    cfg: AttachConfig,
    me: NodeId,
    /// Sessions wanted while a plain leaf.
    attach: usize,
    /// Whether the leaf holds the supernode role.
    supernode: bool,
    candidates: Vec<Candidate<A>>,
    /// In the order they were started.
    links: Vec<Link<A>>,
    actions: VecDeque<Action<A>>,
    /// It lost its last registered session and has not registered since.
    orphaned: bool,
}

impl<A: PeerAddr> AttachPlanner<A> {
    /// A planner for the leaf `me`, attached to up to `attach` supernodes
    /// (at least one), starting from the `bootstrap` addresses and then
    /// the `cached` entries not among them. The first actions connect to
    /// the best candidates and save the cache.
    pub fn new(
        cfg: AttachConfig,
        me: NodeId,
        attach: usize,
        bootstrap: Vec<A>,
        cached: Vec<CacheEntry<A>>,
        now: Instant,
        unix_secs: u64,
    ) -> Self {
        let mut candidates: Vec<Candidate<A>> = Vec::new();
        for addr in bootstrap {
            if !candidates.iter().any(|c| c.addr == addr) {
                candidates.push(Candidate::new(addr, None, 0, now, &cfg));
            }
        }
        for c in cached {
            if !candidates.iter().any(|x| x.addr == c.addr) {
                candidates.push(Candidate::new(c.addr, c.id, c.last_seen, now, &cfg));
            }
        }
        let mut planner = Self {
            cfg,
            me,
            attach: attach.max(1),
            supernode: false,
            candidates,
            links: Vec::new(),
            actions: VecDeque::new(),
            orphaned: false,
        };
        planner.plan(now);
        planner.save(unix_secs);
        planner
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action<A>> {
        self.actions.pop_front()
    }

    /// When the planner next wants [`AttachPlanner::handle_timeout`]: when
    /// a candidate it would start becomes due. `None`: only an event can
    /// change anything.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let leaving = self
            .links
            .iter()
            .filter(|l| !l.stopping)
            .filter_map(|l| l.leaving)
            .min();
        if self.staying() >= self.wanted() {
            return leaving;
        }
        let busy = self.busy_ids();
        let spare = self.registered_anywhere();
        self.candidates
            .iter()
            .filter(|c| self.may_try(c, &busy, spare))
            .map(|c| c.next_try)
            .chain(leaving)
            .min()
    }

    /// Time passed: starts the candidates now due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.plan(now);
    }

    /// A supernode told of these supernodes.
    pub fn handle_learned(&mut self, now: Instant, unix_secs: u64, list: Vec<SupernodeInfo>) {
        self.merge(list, now, unix_secs);
        self.save(unix_secs);
        self.plan(now);
    }

    /// Whether the leaf holds the supernode role: `Some` with the
    /// supernodes its mesh knows first-hand (learned, not saved until the
    /// next event), `None` while a plain leaf. Holding it, the leaf keeps
    /// one session and stops the others.
    pub fn handle_role(
        &mut self,
        now: Instant,
        unix_secs: u64,
        supernode: Option<Vec<SupernodeInfo>>,
    ) {
        self.supernode = supernode.is_some();
        if let Some(list) = supernode {
            self.merge(list, now, unix_secs);
        }
        self.plan(now);
    }

    /// The session at `addr` registered with the supernode `id` (as its
    /// certificate proved). A session to this leaf itself, or to a
    /// supernode another session is registered with, is stopped.
    pub fn handle_link_up(&mut self, now: Instant, unix_secs: u64, addr: &A, id: NodeId) {
        let twice = self
            .links
            .iter()
            .any(|l| l.addr != *addr && l.id == Some(id));
        let Some(link) = self.links.iter_mut().find(|l| l.addr == *addr) else {
            return;
        };
        if id == self.me || twice {
            if !link.stopping {
                link.stopping = true;
                self.actions.push_back(Action::Stop { addr: addr.clone() });
            }
        } else {
            link.id = Some(id);
            self.orphaned = false;
        }
        if let Some(c) = self.candidates.iter_mut().find(|c| c.addr == *addr) {
            c.id = Some(id);
            c.last_seen = c.last_seen.max(unix_secs);
        }
        self.save(unix_secs);
        self.plan(now);
    }

    /// The session at `addr` ended.
    pub fn handle_link_ended(
        &mut self,
        now: Instant,
        unix_secs: u64,
        addr: &A,
        outcome: LinkOutcome,
    ) {
        let Some(at) = self.links.iter().position(|l| l.addr == *addr) else {
            return;
        };
        let link = self.links.remove(at);
        let orphan = !self.registered_anywhere();
        // It lost its last supernode (not merely a try that failed).
        self.orphaned |= orphan && link.id.is_some();
        if orphan {
            // With no supernode left, every known one is worth a try now.
            let soon = now + self.cfg.full_retry;
            for c in &mut self.candidates {
                c.next_try = c.next_try.min(soon);
                c.delay = self.cfg.backoff_min;
            }
        }
        let full = matches!(outcome, LinkOutcome::Full(_));
        if let Some(c) = self.candidates.iter_mut().find(|c| c.addr == *addr) {
            if link.id.is_some() {
                c.id = link.id;
                c.last_seen = c.last_seen.max(unix_secs);
                // It worked for a while: retry it soon, not after a long backoff.
                c.delay = self.cfg.backoff_min;
                c.failures = 0;
                if matches!(outcome, LinkOutcome::Failed) {
                    // Lost: most likely gone (or it moved us away). Until a
                    // list tells its load again, others come first.
                    c.load_permille = FULL_LOAD;
                }
            } else if !full {
                c.failures = c.failures.saturating_add(1);
            }
            if full {
                c.load_permille = FULL_LOAD;
                if orphan {
                    // With no supernode at all, keep asking: room appears
                    // as the network elects more supernodes.
                    c.next_try = now + self.cfg.full_retry;
                    c.delay = self.cfg.backoff_min;
                }
            }
        }
        if let LinkOutcome::Full(elsewhere) = outcome {
            self.merge(elsewhere, now, unix_secs);
        }
        self.save(unix_secs);
        self.plan(now);
    }

    /// The supernode `from` (one this leaf is registered with) asked it to
    /// move to those in `list`. The leaf accepts: the driver answers
    /// `Accepted` and keeps the session until the planner stops it, once
    /// another session is registered or `rehome_grace` has passed.
    pub fn handle_rehome(
        &mut self,
        now: Instant,
        unix_secs: u64,
        from: NodeId,
        mut list: Vec<SupernodeInfo>,
    ) {
        // A hostile supernode could send thousands.
        list.truncate(MAX_SUPERNODE_INFOS);
        let offered: Vec<NodeId> = list.iter().map(|i| i.id).filter(|&id| id != from).collect();
        let until = now + self.cfg.rehome_grace;
        for link in &mut self.links {
            if link.id == Some(from) && link.leaving.is_none() {
                link.leaving = Some(until);
            }
        }
        self.merge(list, now, unix_secs);
        // Prefer what we were offered; keep away from the sender a while.
        for c in &mut self.candidates {
            if c.id == Some(from) {
                c.next_try = now + self.cfg.rehome_avoid;
                c.load_permille = FULL_LOAD;
            } else if c.id.is_some_and(|id| offered.contains(&id)) {
                c.load_permille = 0;
                c.next_try = now;
            }
        }
        self.save(unix_secs);
        self.plan(now);
    }

    /// What to give the supernode role should this leaf accept the
    /// `Promote` that the supernode `from` sent.
    pub fn promotion(&self, unix_secs: u64, from: NodeId) -> Promotion {
        let mut peers = vec![from];
        for id in self.links.iter().filter_map(|l| l.id) {
            if !peers.contains(&id) {
                peers.push(id);
            }
        }
        Promotion {
            peers,
            known: self.known(unix_secs),
        }
    }

    /// The supernodes known by id, fewest failures then least loaded first,
    /// as a list for the mesh of this leaf's supernode role to dial.
    pub fn known(&self, unix_secs: u64) -> Vec<SupernodeInfo> {
        let mut known: Vec<&Candidate<A>> = self
            .candidates
            .iter()
            .filter(|c| c.id.is_some_and(|id| id != self.me))
            .collect();
        known.sort_by_key(|c| (c.failures, c.load_permille));
        known
            .into_iter()
            .take(MAX_SUPERNODE_INFOS)
            .filter_map(|c| {
                Some(SupernodeInfo {
                    id: c.id?,
                    addr: c.addr.to_info(),
                    leaves: c.load_permille.min(FULL_LOAD) as u32,
                    max_leaves: FULL_LOAD as u32,
                    age_secs: unix_secs.saturating_sub(c.last_seen).min(u32::MAX.into()) as u32,
                })
            })
            .collect()
    }

    /// What the cache should hold now: every candidate, a registered one
    /// as seen now, most recently seen first, at most `max_cached`.
    pub fn cache_entries(&self, unix_secs: u64) -> Vec<CacheEntry<A>> {
        let mut entries: Vec<CacheEntry<A>> = self
            .candidates
            .iter()
            .map(|c| {
                let linked = self
                    .links
                    .iter()
                    .any(|l| l.addr == c.addr && l.id.is_some());
                CacheEntry {
                    addr: c.addr.clone(),
                    id: c.id,
                    last_seen: if linked { unix_secs } else { c.last_seen },
                }
            })
            .collect();
        entries.sort_by_key(|c| std::cmp::Reverse(c.last_seen));
        entries.truncate(self.cfg.max_cached);
        entries
    }

    /// The supernodes a session is registered with now.
    pub fn registered(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.links.iter().filter_map(|l| l.id)
    }

    /// The sessions being tried or held, in the order they were started.
    pub fn links(&self) -> impl Iterator<Item = &A> + '_ {
        self.links.iter().map(|l| &l.addr)
    }

    /// The supernodes this leaf knows of.
    pub fn candidates(&self) -> &[Candidate<A>] {
        &self.candidates
    }

    /// Sessions wanted now.
    fn wanted(&self) -> usize {
        if self.supernode {
            1
        } else {
            self.attach
        }
    }

    fn registered_anywhere(&self) -> bool {
        self.links.iter().any(|l| l.id.is_some())
    }

    /// Sessions held or tried that count among those wanted: all but the
    /// ones a `Rehome` moved the leaf away from.
    fn staying(&self) -> usize {
        self.links.iter().filter(|l| l.leaving.is_none()).count()
    }

    /// Ids of the supernodes a session is registered with or dialled for.
    fn busy_ids(&self) -> Vec<NodeId> {
        self.links
            .iter()
            .filter_map(|l| l.id.or(l.expected))
            .collect()
    }

    /// Whether `c` may be tried once due (`spare`: the leaf is registered
    /// somewhere, so only supernodes with room to spare qualify).
    fn may_try(&self, c: &Candidate<A>, busy: &[NodeId], spare: bool) -> bool {
        // Extra links go only where there is room to spare, so that a leaf
        // with no supernode at all can still find one.
        (!spare || c.load_permille <= self.cfg.extra_link_max_load_permille)
            && c.id != Some(self.me)
            && !c.id.is_some_and(|id| busy.contains(&id))
            && !self.links.iter().any(|l| l.addr == c.addr)
    }

    /// Stops sessions beyond those wanted and the ones moved away from
    /// once they are replaced, and starts the due candidates while fewer
    /// are up or being tried.
    fn plan(&mut self, now: Instant) {
        // Make before break: a session moved away from ends once another
        // one is registered (the leaf stays searchable), or at its deadline.
        let replaced = self
            .links
            .iter()
            .any(|l| l.id.is_some() && l.leaving.is_none() && !l.stopping);
        for link in &mut self.links {
            if link.stopping {
                continue;
            }
            if link.leaving.is_some_and(|until| replaced || until <= now) {
                link.stopping = true;
                self.actions.push_back(Action::Stop {
                    addr: link.addr.clone(),
                });
            }
        }
        let wanted = if self.orphaned && !self.registered_anywhere() {
            // Orphaned: more tries at once (at most the cap).
            (self.wanted() + self.cfg.orphan_extra_tries).min(MAX_SUPERNODE_INFOS)
        } else {
            self.wanted()
        };
        // Keep the registered sessions first, the oldest first.
        let mut live: Vec<usize> = (0..self.links.len())
            .filter(|&i| !self.links[i].stopping && self.links[i].leaving.is_none())
            .collect();
        live.sort_by_key(|&i| self.links[i].id.is_none());
        for &i in live.iter().skip(wanted) {
            let link = &mut self.links[i];
            link.stopping = true;
            self.actions.push_back(Action::Stop {
                addr: link.addr.clone(),
            });
        }
        let mut staying = self.staying();
        if staying >= wanted {
            return;
        }
        let mut busy = self.busy_ids();
        let spare = self.registered_anywhere();
        let mut order: Vec<usize> = (0..self.candidates.len())
            .filter(|&i| {
                let c = &self.candidates[i];
                c.next_try <= now && self.may_try(c, &busy, spare)
            })
            .collect();
        order.sort_by_key(|&i| {
            let c = &self.candidates[i];
            (c.failures, c.load_permille, std::cmp::Reverse(c.last_seen))
        });
        for i in order {
            if staying >= wanted {
                break;
            }
            let c = &mut self.candidates[i];
            // Two candidates may carry one id (a bootstrap name and the
            // address it was learned at).
            if c.id.is_some_and(|id| busy.contains(&id)) {
                continue;
            }
            c.next_try = now + c.delay;
            c.delay = (c.delay * 2).min(self.cfg.backoff_max);
            busy.extend(c.id);
            self.links.push(Link {
                addr: c.addr.clone(),
                expected: c.id,
                id: None,
                stopping: false,
                leaving: None,
            });
            staying += 1;
            self.actions.push_back(Action::Connect {
                addr: c.addr.clone(),
                expected: c.id,
            });
        }
    }

    /// Adds or refreshes supernodes a supernode told of (never this leaf).
    fn merge(&mut self, list: Vec<SupernodeInfo>, now: Instant, unix_secs: u64) {
        for info in list {
            if info.id == self.me {
                continue;
            }
            let Some(addr) = A::from_info(&info.addr) else {
                continue;
            };
            let load = if info.max_leaves == 0 {
                FULL_LOAD
            } else {
                u64::from(info.leaves) * 1000 / u64::from(info.max_leaves)
            }
            .min(FULL_LOAD);
            let seen = unix_secs.saturating_sub(info.age_secs.into());
            match self
                .candidates
                .iter_mut()
                .find(|c| c.id == Some(info.id) || c.addr == addr)
            {
                Some(c) => {
                    c.load_permille = load;
                    c.last_seen = c.last_seen.max(seen);
                    // A supernode is known by its id: it may have moved.
                    if c.id == Some(info.id) && c.addr != addr {
                        c.addr = addr;
                    }
                    c.id = Some(info.id);
                }
                None => {
                    // A new candidate is due at once.
                    let mut c = Candidate::new(addr, Some(info.id), seen, now, &self.cfg);
                    c.load_permille = load;
                    self.candidates.push(c);
                }
            }
        }
        if self.candidates.len() > self.cfg.max_cached {
            self.candidates
                .sort_by_key(|c| std::cmp::Reverse(c.last_seen));
            self.candidates.truncate(self.cfg.max_cached);
        }
    }

    /// Replaces a pending save with one of the table as it is now.
    fn save(&mut self, unix_secs: u64) {
        self.actions.retain(|a| !matches!(a, Action::SaveCache(_)));
        let entries = self.cache_entries(unix_secs);
        self.actions.push_back(Action::SaveCache(entries));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const UNIX: u64 = 1_700_000_000;

    fn id(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn addr(n: u8) -> String {
        format!("10.0.0.{n}:7400")
    }

    /// A supernode `n` with `leaves` of 1000 taken, heard of just now.
    fn info(n: u8, leaves: u32) -> SupernodeInfo {
        SupernodeInfo {
            id: id(n),
            addr: addr(n),
            leaves,
            max_leaves: 1000,
            age_secs: 0,
        }
    }

    /// A planner for leaf 0 that has learned of the supernodes in `known`.
    fn planner(attach: usize, known: &[SupernodeInfo], t0: Instant) -> AttachPlanner<String> {
        let mut p = AttachPlanner::new(
            AttachConfig::default(),
            id(0),
            attach,
            Vec::new(),
            Vec::new(),
            t0,
            UNIX,
        );
        p.handle_learned(t0, UNIX, known.to_vec());
        p
    }

    /// The addresses of the `Connect` and `Stop` actions pending, in order.
    fn drain(p: &mut AttachPlanner<String>) -> (Vec<String>, Vec<String>) {
        let (mut connects, mut stops) = (Vec::new(), Vec::new());
        while let Some(a) = p.poll_action() {
            match a {
                Action::Connect { addr, .. } => connects.push(addr),
                Action::Stop { addr } => stops.push(addr),
                Action::SaveCache(_) => {}
            }
        }
        (connects, stops)
    }

    /// Runs the planner's own timeouts up to `until`, collecting connects.
    fn run_until(p: &mut AttachPlanner<String>, until: Instant) -> Vec<(Instant, String)> {
        let mut out = Vec::new();
        while let Some(t) = p.poll_timeout().filter(|&t| t <= until) {
            p.handle_timeout(t);
            let (connects, _) = drain(p);
            assert!(
                !connects.is_empty() || p.poll_timeout().is_none_or(|next| next > t),
                "a timeout that does nothing must not repeat"
            );
            out.extend(connects.into_iter().map(|a| (t, a)));
        }
        out
    }

    fn candidate(p: &AttachPlanner<String>, n: u8) -> &Candidate<String> {
        p.candidates()
            .iter()
            .find(|c| c.id == Some(id(n)))
            .expect("known")
    }

    #[test]
    fn starts_the_least_loaded_and_saves_the_cache() {
        let t0 = Instant::now();
        let mut p = AttachPlanner::new(
            AttachConfig::default(),
            id(0),
            2,
            vec!["seed.example:7400".to_string()],
            Vec::new(),
            t0,
            UNIX,
        );
        assert_eq!(
            p.poll_action(),
            Some(Action::Connect {
                addr: "seed.example:7400".into(),
                expected: None
            })
        );
        assert!(matches!(p.poll_action(), Some(Action::SaveCache(e)) if e.len() == 1));
        assert_eq!(p.poll_action(), None);
        // The seed tells of three; the two least loaded take the free link
        // (one only: the seed is being tried).
        p.handle_learned(t0, UNIX, vec![info(1, 900), info(2, 100), info(3, 300)]);
        assert_eq!(drain(&mut p).0, vec![addr(2)]);
    }

    #[test]
    fn full_with_no_supernode_retries_after_full_retry() {
        let t0 = Instant::now();
        let mut p = planner(1, &[info(1, 0)], t0);
        assert_eq!(drain(&mut p).0, vec![addr(1)]);
        p.handle_link_ended(t0 + 10 * MS, UNIX, &addr(1), LinkOutcome::Full(Vec::new()));
        assert_eq!(drain(&mut p).0, Vec::<String>::new());
        let full_retry = AttachConfig::default().full_retry;
        assert_eq!(p.poll_timeout(), Some(t0 + 10 * MS + full_retry));
        // And again and again, never backing off, while it has no supernode.
        for round in 1..=5u32 {
            let at = t0 + 10 * MS + full_retry * round;
            assert_eq!(run_until(&mut p, at), vec![(at, addr(1))]);
            p.handle_link_ended(at, UNIX, &addr(1), LinkOutcome::Full(Vec::new()));
        }
        assert_eq!(candidate(&p, 1).failures, 0, "full is not a failure");
    }

    #[test]
    fn full_tries_the_suggested_ones_and_no_extra_link_to_a_full_one() {
        let t0 = Instant::now();
        let mut p = planner(2, &[info(1, 0), info(2, 0)], t0);
        assert_eq!(drain(&mut p).0, vec![addr(1), addr(2)]);
        p.handle_link_up(t0, UNIX, &addr(1), id(1));
        p.handle_link_ended(t0, UNIX, &addr(2), LinkOutcome::Full(vec![info(3, 200)]));
        assert_eq!(drain(&mut p).0, vec![addr(3)], "the suggested one at once");
        p.handle_link_ended(t0, UNIX, &addr(3), LinkOutcome::Failed);
        // Registered with 1: the full one gets no extra link, 3 is retried.
        let tried = run_until(&mut p, t0 + Duration::from_secs(120));
        assert!(tried.iter().all(|(_, a)| *a == addr(3)), "{tried:?}");
    }

    #[test]
    fn a_lost_supernode_is_tried_after_the_others_and_an_orphan_tries_more_at_once() {
        let t0 = Instant::now();
        let infos: Vec<SupernodeInfo> = (1..=8).map(|n| info(n, 100 * u32::from(n))).collect();
        let mut p = planner(1, &infos, t0);
        assert_eq!(drain(&mut p).0, vec![addr(1)]);
        p.handle_link_up(t0, UNIX, &addr(1), id(1));
        // Lost: registered nowhere, it tries 1 + 2 at once, the lost one last.
        p.handle_link_ended(t0 + MS, UNIX, &addr(1), LinkOutcome::Failed);
        assert_eq!(drain(&mut p).0, vec![addr(2), addr(3), addr(4)]);
        // One registers: the extra tries stop, one link is kept.
        p.handle_link_up(t0 + 3 * MS, UNIX, &addr(3), id(3));
        let stops: Vec<String> = std::iter::from_fn(|| p.poll_action())
            .filter_map(|a| match a {
                Action::Stop { addr } => Some(addr),
                _ => None,
            })
            .collect();
        assert_eq!(stops.len(), 2, "{stops:?}");
        assert_eq!(p.links.iter().filter(|l| !l.stopping).count(), 1);
    }

    #[test]
    fn rehome_prefers_the_offered_and_keeps_the_old_session_until_it_is_replaced() {
        let t0 = Instant::now();
        let mut p = planner(1, &[info(1, 0), info(2, 100), info(3, 400)], t0);
        assert_eq!(drain(&mut p).0, vec![addr(1)]);
        p.handle_link_up(t0, UNIX, &addr(1), id(1));
        p.handle_rehome(t0, UNIX, id(1), vec![info(3, 400)]);
        // 2 is less loaded by its own account, but 3 was offered: dialled
        // at once, while the session with 1 stays (still searchable).
        assert_eq!(drain(&mut p), (vec![addr(3)], vec![]));
        assert_eq!(p.registered().collect::<Vec<_>>(), vec![id(1)]);
        // 3 registers: only now does the session with 1 end.
        p.handle_link_up(t0 + MS, UNIX, &addr(3), id(3));
        assert_eq!(drain(&mut p), (vec![], vec![addr(1)]));
        p.handle_link_ended(t0 + 2 * MS, UNIX, &addr(1), LinkOutcome::Stopped);
        assert_eq!(p.registered().collect::<Vec<_>>(), vec![id(3)]);
        assert_eq!(drain(&mut p).0, Vec::<String>::new());
    }

    #[test]
    fn a_session_moved_away_from_ends_at_the_grace_if_nothing_replaces_it() {
        let t0 = Instant::now();
        let grace = AttachConfig::default().rehome_grace;
        let mut p = planner(1, &[info(1, 0), info(3, 0)], t0);
        assert_eq!(drain(&mut p).0, vec![addr(1)]);
        p.handle_link_up(t0, UNIX, &addr(1), id(1));
        p.handle_rehome(t0, UNIX, id(1), vec![info(3, 0)]);
        assert_eq!(drain(&mut p), (vec![addr(3)], vec![]));
        // 3 cannot be reached; 1 is kept meanwhile (and never dialled twice).
        p.handle_link_ended(t0 + MS, UNIX, &addr(3), LinkOutcome::Failed);
        let retries = run_until(&mut p, t0 + grace - MS);
        assert!(retries.iter().all(|(_, a)| *a == addr(3)), "{retries:?}");
        assert_eq!(p.registered().collect::<Vec<_>>(), vec![id(1)]);
        // At the grace it ends, whether or not a replacement registered.
        assert_eq!(p.poll_timeout().map(|t| t <= t0 + grace), Some(true));
        p.handle_timeout(t0 + grace);
        assert!(drain(&mut p).1.contains(&addr(1)));
    }

    #[test]
    fn rehome_avoids_the_sender_for_rehome_avoid() {
        let t0 = Instant::now();
        let mut p = planner(2, &[info(1, 0), info(2, 0)], t0);
        assert_eq!(drain(&mut p).0, vec![addr(1), addr(2)]);
        p.handle_link_up(t0, UNIX, &addr(1), id(1));
        p.handle_link_up(t0, UNIX, &addr(2), id(2));
        // It even offers itself: that does not count.
        p.handle_rehome(t0, UNIX, id(1), vec![info(1, 0)]);
        p.handle_link_ended(t0 + MS, UNIX, &addr(1), LinkOutcome::Failed);
        assert_eq!(drain(&mut p).0, Vec::<String>::new());
        // Another list says it has room again: still not dialled for a while.
        p.handle_learned(t0 + 2 * MS, UNIX, vec![info(1, 0)]);
        let avoid = AttachConfig::default().rehome_avoid;
        assert_eq!(drain(&mut p).0, Vec::<String>::new());
        assert_eq!(run_until(&mut p, t0 + avoid), vec![(t0 + avoid, addr(1))]);
    }

    #[test]
    fn losing_the_last_link_resets_every_backoff() {
        let t0 = Instant::now();
        let cfg = AttachConfig::default();
        let mut p = planner(2, &[info(3, 0), info(1, 100)], t0);
        assert_eq!(drain(&mut p).0, vec![addr(3), addr(1)]);
        p.handle_link_up(t0, UNIX, &addr(3), id(3));
        // 1 keeps failing while 3 holds: its backoff grows.
        let mut now = t0;
        for _ in 0..6 {
            p.handle_link_ended(now, UNIX, &addr(1), LinkOutcome::Failed);
            now = p.poll_timeout().expect("1 is due again");
            p.handle_timeout(now);
            assert_eq!(drain(&mut p).0, vec![addr(1)]);
        }
        assert!(candidate(&p, 1).delay > cfg.backoff_min * 4);
        assert!(candidate(&p, 1).next_try > now + cfg.full_retry);
        // 3 lost: registered nowhere, so every candidate is due soon again.
        p.handle_link_ended(now, UNIX, &addr(3), LinkOutcome::Failed);
        assert_eq!(candidate(&p, 1).delay, cfg.backoff_min);
        assert!(candidate(&p, 1).next_try <= now + cfg.full_retry);
        assert_eq!(candidate(&p, 1).failures, 6);
    }

    #[test]
    fn never_links_to_itself() {
        let t0 = Instant::now();
        let mut p = AttachPlanner::new(
            AttachConfig::default(),
            id(0),
            3,
            vec!["me.example:7401".to_string()],
            Vec::new(),
            t0,
            UNIX,
        );
        // Its own address gossiped back to it is not learned.
        p.handle_learned(t0, UNIX, vec![info(0, 0)]);
        assert_eq!(drain(&mut p).0, vec!["me.example:7401".to_string()]);
        // A bootstrap address that turns out to be this leaf is stopped and
        // never dialled again.
        p.handle_link_up(t0, UNIX, &"me.example:7401".to_string(), id(0));
        assert_eq!(drain(&mut p).1, vec!["me.example:7401".to_string()]);
        p.handle_link_ended(
            t0,
            UNIX,
            &"me.example:7401".to_string(),
            LinkOutcome::Stopped,
        );
        assert!(run_until(&mut p, t0 + Duration::from_secs(600)).is_empty());
        assert!(p.known(UNIX).is_empty());
    }

    #[test]
    fn never_links_twice_to_one_id() {
        let t0 = Instant::now();
        let name = "sn.example:7400".to_string();
        let mut p = AttachPlanner::new(
            AttachConfig::default(),
            id(0),
            3,
            vec![name.clone()],
            Vec::new(),
            t0,
            UNIX,
        );
        // The same supernode under its IP address, and another one.
        p.handle_learned(t0, UNIX, vec![info(1, 0), info(2, 0)]);
        assert_eq!(drain(&mut p).0, vec![name.clone(), addr(1), addr(2)]);
        p.handle_link_up(t0, UNIX, &addr(1), id(1));
        p.handle_link_up(t0, UNIX, &name, id(1));
        assert_eq!(drain(&mut p).1, vec![name.clone()]);
        p.handle_link_ended(t0, UNIX, &name, LinkOutcome::Stopped);
        // Neither address of 1 is dialled while a session with 1 lives, and
        // while 2 is being tried nothing else dials 2.
        assert!(run_until(&mut p, t0 + Duration::from_secs(600)).is_empty());
        assert_eq!(p.registered().collect::<Vec<_>>(), vec![id(1)]);
    }

    #[test]
    fn an_elected_leaf_keeps_one_link() {
        let t0 = Instant::now();
        let mut p = planner(3, &[info(1, 0), info(2, 0), info(3, 0), info(4, 0)], t0);
        let (up, _) = drain(&mut p);
        assert_eq!(up.len(), 3);
        // The third registers first: it is the one kept.
        p.handle_link_up(t0, UNIX, &up[2], id(3));
        p.handle_role(t0, UNIX, Some(vec![info(5, 0)]));
        let (connects, stops) = drain(&mut p);
        assert!(connects.is_empty());
        assert_eq!(stops, vec![up[0].clone(), up[1].clone()]);
        for a in &stops {
            p.handle_link_ended(t0, UNIX, a, LinkOutcome::Stopped);
        }
        assert!(run_until(&mut p, t0 + Duration::from_secs(60)).is_empty());
        assert!(
            p.candidates().iter().any(|c| c.id == Some(id(5))),
            "mesh learned"
        );
        // Stepped down: back to three.
        let later = t0 + Duration::from_secs(60);
        p.handle_role(later, UNIX, None);
        assert_eq!(drain(&mut p).0.len(), 2);
    }

    #[test]
    fn extra_links_go_only_where_there_is_room() {
        let t0 = Instant::now();
        let mut p = planner(3, &[info(1, 950)], t0);
        assert_eq!(
            drain(&mut p).0,
            vec![addr(1)],
            "a busy one is fine for the first"
        );
        p.handle_link_up(t0, UNIX, &addr(1), id(1));
        p.handle_learned(t0, UNIX, vec![info(2, 600), info(3, 500), info(4, 100)]);
        assert_eq!(drain(&mut p).0, vec![addr(4), addr(3)]);
    }

    #[test]
    fn promotion_names_the_asker_first() {
        let t0 = Instant::now();
        let mut p = planner(3, &[info(1, 0), info(2, 100), info(3, 200)], t0);
        drain(&mut p);
        p.handle_link_up(t0, UNIX, &addr(1), id(1));
        p.handle_link_up(t0, UNIX, &addr(3), id(3));
        let promo = p.promotion(UNIX + 5, id(3));
        assert_eq!(promo.peers, vec![id(3), id(1)]);
        let known: Vec<NodeId> = promo.known.iter().map(|i| i.id).collect();
        assert_eq!(known, vec![id(1), id(2), id(3)]);
        assert!(promo.known.iter().all(|i| i.age_secs == 5));
    }

    #[test]
    fn the_cache_is_bounded_and_stamps_live_sessions() {
        let t0 = Instant::now();
        let cfg = AttachConfig {
            max_cached: 4,
            ..AttachConfig::default()
        };
        let mut p = AttachPlanner::new(cfg, id(0), 1, Vec::new(), Vec::new(), t0, UNIX);
        let list: Vec<SupernodeInfo> = (1..=6)
            .map(|n| SupernodeInfo {
                age_secs: u32::from(n) * 10,
                ..info(n, 0)
            })
            .collect();
        p.handle_learned(t0, UNIX, list);
        assert_eq!(p.candidates().len(), 4, "the least recently seen forgotten");
        let (connects, _) = drain(&mut p);
        p.handle_link_up(t0, UNIX + 100, &connects[0], id(1));
        let mut saved = None;
        while let Some(a) = p.poll_action() {
            if let Action::SaveCache(e) = a {
                assert!(saved.is_none(), "one save pending at most");
                saved = Some(e);
            }
        }
        let saved = saved.expect("saved on registration");
        assert_eq!(saved.len(), 4);
        assert_eq!((saved[0].id, saved[0].last_seen), (Some(id(1)), UNIX + 100));
        assert!(saved.windows(2).all(|w| w[0].last_seen >= w[1].last_seen));
    }

    /// What may happen to a leaf, for the property test.
    #[derive(Debug, Clone)]
    enum Step {
        Wait(u16),
        Learned(Vec<(u8, u16)>),
        Up(usize),
        Ended(usize, u8),
        Rehome(usize, Vec<u8>),
        Role(bool),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            (0u16..5000).prop_map(Step::Wait),
            proptest::collection::vec((0u8..8, 0u16..1200), 0..5).prop_map(Step::Learned),
            (0usize..4).prop_map(Step::Up),
            ((0usize..4), (0u8..3)).prop_map(|(i, o)| Step::Ended(i, o)),
            ((0usize..4), proptest::collection::vec(0u8..8, 0..3))
                .prop_map(|(i, l)| Step::Rehome(i, l)),
            any::<bool>().prop_map(Step::Role),
        ]
    }

    /// The true id behind an address: `10.0.0.n` is `n`, the name is 1.
    fn true_id(addr: &str) -> NodeId {
        if addr == "sn1.example:7400" {
            return id(1);
        }
        let n: u8 = addr[7..addr.len() - 5].parse().expect("test address");
        id(n)
    }

    proptest::proptest! {
        #[test]
        fn never_itself_never_twice_never_too_many(
            attach in 1usize..4,
            steps in proptest::collection::vec(step(), 1..80),
        ) {
            let t0 = Instant::now();
            let mut now = t0;
            let bootstrap = vec!["sn1.example:7400".to_string(), addr(0)];
            let mut p = AttachPlanner::new(
                AttachConfig::default(), id(0), attach, bootstrap, Vec::new(), t0, UNIX,
            );
            let mut supernode = false;
            let (first, _) = drain(&mut p);
            proptest::prop_assert_eq!(first.len(), attach.min(2));
            for s in steps {
                let links: Vec<String> = p.links().cloned().collect();
                let was_registered = p.registered().next().is_some();
                let rehomed = matches!(s, Step::Rehome(..));
                match s {
                    Step::Wait(ms) => {
                        now += MS * u32::from(ms);
                        // Every timeout on the way, as a driver would fire them.
                        while let Some(t) = p.poll_timeout().filter(|&t| t <= now) {
                            let before = p.links().count();
                            p.handle_timeout(t);
                            proptest::prop_assert!(
                                p.links().count() > before
                                    || p.poll_timeout().is_none_or(|next| next > t),
                                "a timeout that starts nothing must move on"
                            );
                        }
                        p.handle_timeout(now);
                    }
                    Step::Learned(list) => {
                        let list = list.into_iter().map(|(n, l)| info(n, l.into())).collect();
                        p.handle_learned(now, UNIX, list);
                    }
                    Step::Up(i) => {
                        if let Some(a) = links.get(i) {
                            p.handle_link_up(now, UNIX, a, true_id(a));
                        }
                    }
                    Step::Ended(i, o) => if let Some(a) = links.get(i) {
                        let outcome = match o {
                            0 => LinkOutcome::Stopped,
                            1 => LinkOutcome::Failed,
                            _ => LinkOutcome::Full(vec![info(5, 0), info(6, 999)]),
                        };
                        p.handle_link_ended(now, UNIX, a, outcome);
                    },
                    Step::Rehome(i, offered) => {
                        let from: Vec<NodeId> = p.registered().collect();
                        if let Some(&from) = from.get(i) {
                            let list = offered.into_iter().map(|n| info(n, 0)).collect();
                            p.handle_rehome(now, UNIX, from, list);
                        }
                    }
                    Step::Role(on) => {
                        supernode = on;
                        p.handle_role(now, UNIX, on.then(|| vec![info(7, 0)]));
                    }
                }
                let mut connects = Vec::new();
                while let Some(a) = p.poll_action() {
                    if let Action::Connect { addr, expected } = a {
                        proptest::prop_assert!(expected != Some(id(0)), "dialled itself");
                        proptest::prop_assert!(p.links().filter(|&a| *a == addr).count() == 1);
                        connects.push(addr);
                    }
                }
                let all: Vec<&String> = p.links().collect();
                for (i, a) in all.iter().enumerate() {
                    proptest::prop_assert!(!all[i + 1..].contains(a), "{} dialled twice", a);
                }
                let registered: Vec<NodeId> = p.registered().collect();
                proptest::prop_assert!(!registered.contains(&id(0)));
                for (i, r) in registered.iter().enumerate() {
                    proptest::prop_assert!(!registered[i + 1..].contains(r), "twice with {:?}", r);
                }
                let mut wanted = if supernode { 1 } else { attach };
                if p.orphaned && p.registered().next().is_none() {
                    wanted += p.cfg.orphan_extra_tries;
                }
                let live = p.links.iter().filter(|l| !l.stopping && l.leaving.is_none()).count();
                proptest::prop_assert!(live <= wanted, "{} sessions, {} wanted", live, wanted);
                proptest::prop_assert!(connects.is_empty() || p.staying() <= wanted);
                // Make before break: a session moved away from is kept only
                // while no other is registered, and never past its grace.
                let replaced = p.links.iter().any(|l| {
                    l.id.is_some() && l.leaving.is_none() && !l.stopping
                });
                for l in p.links.iter().filter(|l| !l.stopping) {
                    if let Some(until) = l.leaving {
                        proptest::prop_assert!(!replaced && until > now, "{:?} kept", l.addr);
                    }
                }
                if was_registered && rehomed {
                    proptest::prop_assert!(p.registered().next().is_some(), "a rehome unregistered it");
                }
            }
        }
    }
}
