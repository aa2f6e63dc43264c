//! Mesh membership as a pure state machine: which supernodes one supernode
//! knows, whom it dials and when, what it gossips to each neighbour, which
//! links it takes or refuses, and when a neighbour is gone
//! (`docs/PROTOCOL.md` sections 11.2 to 11.4).
//!
//! [`Membership`] holds no connections and reads no clock. The caller (the
//! supernode's `mesh` module over QUIC, or a simulator) feeds it what
//! happens — a dial's outcome, a `Hello`, a `Status`, a link that ended, an
//! RTT sample, a timer expiry — with the time, and carries out the
//! [`Action`]s it returns: dial an address, send a `Status` on a link,
//! close a link. Links are named by a [`LinkId`] the caller chooses, so
//! that news of a link that has already been replaced cannot drop the
//! neighbour's newer one.
//!
//! What this is not: the query side of the mesh (the seen-id memory, the
//! per-neighbour query limits and fair forwarding are in [`crate::route`],
//! [`crate::rate`] and [`crate::fair`]), nor the wire encoding of the
//! frames.
//!
//! Rules, in short:
//! - **Learning.** Gossiped entries are claims: the first 64 of a frame are
//!   read, entries naming us, the sender, or no dialable address are
//!   skipped, the most recent news of an id wins. At most
//!   [`MeshConfig::max_known`] supernodes are remembered, of which at most
//!   [`MeshConfig::max_known_per_sender`] unverified ones from any one
//!   neighbour (its own oldest make room), then the least recently heard of
//!   unverified ones go first. An entry not heard of for
//!   [`MeshConfig::forget_after`] is forgotten.
//! - **Passing on.** Only neighbours and former neighbours heard of within
//!   [`MeshConfig::gossip_max_age`] are gossiped or offered to leaves, never
//!   the receiver; a made-up entry dies with the first supernode told of it.
//! - **Dialling.** Every [`MeshConfig::maintain_interval`], bootstrap
//!   addresses not linked are dialled (backoff doubling from
//!   [`MeshConfig::backoff_min`] to [`MeshConfig::backoff_max`], reset on
//!   success), and while there are fewer than
//!   [`MeshConfig::target_neighbors`] neighbours, the best known ones are
//!   (least loaded, then most recently heard of; after a failure an id waits
//!   `backoff_min × 2^failures`, at most twice `backoff_max`). No address is
//!   dialled twice at once.
//! - **Admitting.** At most [`MeshConfig::max_neighbors`] links; an accepted
//!   link also within the per-address caps. Of two links between one pair,
//!   both ends keep the one dialled by the lower node id.
//! - **Silence.** A neighbour that sends no `Status` for
//!   [`MeshConfig::silence_limit`] is dropped.
//!
//! Driving it (what `supernode/src/mesh.rs` does over QUIC, and
//! `proto/tests/mesh.rs` on a virtual clock):
//! - call [`Membership::handle_timeout`] at [`Membership::poll_timeout`]
//!   (at the latest), and drain [`Membership::poll_action`] after every
//!   call;
//! - `Dial`: connect (a [`DialAddr::Name`] is resolved first and reported
//!   with [`Membership::handle_resolved`]); if the peer is ourselves or
//!   already a neighbour ([`Membership::is_neighbour`]) close it and report
//!   [`Membership::handle_dial_failed`]; else say `Hello`, and on `Welcome`
//!   report [`Membership::handle_dialled`] with a fresh [`LinkId`] (on
//!   `Err`, close the connection), on anything else `handle_dial_failed`;
//! - an incoming `Hello`: [`Membership::handle_hello`]; `Ok` means answer
//!   `Welcome`, `Err` a `Refused` with its text;
//! - a `Status` on a link: [`Membership::handle_status`]; a link whose
//!   connection or control stream ends: [`Membership::handle_link_down`]
//!   (before a new link to the same node is judged, so a dead link does not
//!   win the duplicate rule);
//! - `SendGossip`: a `Status` on that link with the node's own load;
//!   `Close`: close that link's connection with [`CloseReason::as_str`];
//! - RTT samples ([`Membership::handle_rtt`]) whenever convenient; only
//!   [`Membership::ranked_neighbours`] reads them.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::limits::MAX_SUPERNODE_INFOS;
use crate::msg::SupernodeInfo;
use crate::route::{ip_allowed, IpCaps};
use crate::NodeId;

/// Timings and sizes of mesh membership. The defaults are the reference
/// supernode's (docs/PROTOCOL.md sections 11.2 to 11.4).
#[derive(Debug, Clone, PartialEq)]
pub struct MeshConfig {
    /// How often each side of a link sends its `Status`. Default 2 s.
    pub gossip_interval: Duration,
    /// A neighbour whose control stream brings no `Status` for this long is
    /// dropped. Default 8 s (four gossip intervals).
    pub silence_limit: Duration,
    /// Known supernodes not heard of for this long are not gossiped nor
    /// offered to leaves. Default 300 s.
    pub gossip_max_age: Duration,
    /// Known supernodes not heard of for this long are forgotten.
    /// Default 600 s.
    pub forget_after: Duration,
    /// Most supernodes remembered. Default 1000.
    pub max_known: usize,
    /// Most unverified supernodes remembered from what one neighbour told
    /// us, so that one hostile neighbour cannot fill the table with
    /// made-up entries and push out real ones. Default 128 (two `Status`
    /// frames' worth).
    pub max_known_per_sender: usize,
    /// How often the mesh is checked for missing links. Default 0.5 s.
    pub maintain_interval: Duration,
    /// First retry delay of a bootstrap address, and the unit of a known
    /// supernode's backoff after a failed dial. Default 0.5 s.
    pub backoff_min: Duration,
    /// Longest retry delay of a bootstrap address (a known supernode's is
    /// at most twice this). Default 30 s.
    pub backoff_max: Duration,
    /// Neighbours to dial for. Default 8.
    pub target_neighbors: usize,
    /// Most neighbours, dialled and accepted. Default 16.
    pub max_neighbors: usize,
    /// Most accepted neighbours per IP address and per IPv4 /24 or IPv6
    /// /48. Default 2 and 4.
    pub ip_caps: IpCaps,
    /// Addresses the per-address caps neither apply to nor count.
    /// Default none.
    pub exempt_ips: Vec<IpAddr>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            gossip_interval: Duration::from_secs(2),
            silence_limit: Duration::from_secs(8),
            gossip_max_age: Duration::from_secs(300),
            forget_after: Duration::from_secs(600),
            max_known: 1000,
            max_known_per_sender: 2 * MAX_SUPERNODE_INFOS,
            maintain_interval: Duration::from_millis(500),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            target_neighbors: 8,
            max_neighbors: 16,
            ip_caps: IpCaps::default(),
            exempt_ips: Vec::new(),
        }
    }
}

impl MeshConfig {
    /// Whether the per-address caps spare `ip`.
    pub fn is_exempt(&self, ip: IpAddr) -> bool {
        self.exempt_ips.contains(&ip.to_canonical())
    }
}

/// One link, as the caller names it (the supernode uses the QUIC
/// connection's stable id). Unique among the links of one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub u64);

/// One dial attempt, named by the core in [`Action::Dial`]; its outcome is
/// reported with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DialId(pub u64);

/// Where to dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialAddr {
    Socket(SocketAddr),
    /// A bootstrap `HOST:PORT` that is not an address: resolve it, then
    /// tell [`Membership::handle_resolved`] what it resolved to.
    Name(String),
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Connect to `addr` (expecting node id `expect`, if given), say
    /// `Hello`, and report the outcome with [`Membership::handle_dialled`]
    /// or [`Membership::handle_dial_failed`].
    Dial {
        dial: DialId,
        expect: Option<NodeId>,
        addr: DialAddr,
    },
    /// Send `Status { leaves, max_leaves, known }` on the control stream
    /// of `link`, with the sender's own load at the time of sending.
    SendGossip {
        to: NodeId,
        link: LinkId,
        known: Vec<SupernodeInfo>,
    },
    /// Close `link` to `id`. Unless `reason` is [`CloseReason::Replaced`],
    /// `id` is no longer a neighbour: whatever the caller keeps per
    /// neighbour can go.
    Close {
        id: NodeId,
        link: LinkId,
        reason: CloseReason,
    },
}

/// Why a link is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// A newer link to the same node won the duplicate-link rule.
    Replaced,
    /// No `Status` came for [`MeshConfig::silence_limit`].
    Silent,
    /// The caller reported the link ended ([`Membership::handle_link_down`]).
    Ended,
}

impl CloseReason {
    /// The connection-close reason on the wire (docs/PROTOCOL.md 11.2, 11.4).
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Replaced => "duplicate link",
            CloseReason::Silent | CloseReason::Ended => "link closed",
        }
    }
}

/// Why a link is not taken. `Display` gives the reference `Refused`
/// message of docs/PROTOCOL.md section 11.2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("that is me")]
    Myself,
    #[error("listen_port 0 is not dialable")]
    ListenPortZero,
    #[error("no room: {0} neighbours")]
    NoRoom(usize),
    #[error("too many neighbours from {0}")]
    TooManyFrom(IpAddr),
    #[error("a link to this supernode exists already")]
    Duplicate,
}

/// A live link to another supernode.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbour {
    /// Where it listens: observed IP, announced port (or the address dialled).
    pub addr: SocketAddr,
    pub leaves: u32,
    pub max_leaves: u32,
    /// Its last `Status` said it was elected (and may step down).
    pub elected: bool,
    /// Which end dialled this link (for settling duplicate links).
    pub dialer: NodeId,
    pub since: Instant,
    /// The link it is on now.
    pub link: LinkId,
    /// The latest round-trip time sample ([`Membership::handle_rtt`]).
    pub rtt: Option<Duration>,
    /// `addr` as gossip writes it, formatted once.
    addr_text: String,
    last_heard: Instant,
    next_gossip: Instant,
}

impl Neighbour {
    fn info(&self, id: NodeId) -> SupernodeInfo {
        SupernodeInfo {
            id,
            addr: self.addr_text.clone(),
            leaves: self.leaves,
            max_leaves: self.max_leaves,
            age_secs: 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Known {
    addr: SocketAddr,
    /// `addr` as gossip writes it, formatted once.
    addr_text: String,
    leaves: u32,
    max_leaves: u32,
    last_seen: Instant,
    next_try: Instant,
    failures: u32,
    /// We have been linked to it ourselves. Only such entries are passed
    /// on, so a made-up entry dies with the first supernode told of it.
    verified: bool,
    /// The neighbour that told us of it, while it is not verified.
    told_by: Option<NodeId>,
}

#[derive(Debug)]
struct Bootstrap {
    addr: String,
    next_try: Instant,
    delay: Duration,
    /// The node last found there, to tell whether we are linked to it.
    id: Option<NodeId>,
}

#[derive(Debug)]
struct PendingDial {
    /// The address being dialled, once known (a name resolves later).
    addr: Option<SocketAddr>,
    expect: Option<NodeId>,
    bootstrap: Option<usize>,
}

/// The mesh membership of one supernode.
#[derive(Debug)]
pub struct Membership {
    me: NodeId,
    config: MeshConfig,
    neighbours: HashMap<NodeId, Neighbour>,
    known: KnownTable,
    bootstrap: Vec<Bootstrap>,
    dials: HashMap<DialId, PendingDial>,
    /// Addresses being dialled now, so no address is dialled twice at once.
    dialing: HashSet<SocketAddr>,
    next_dial: u64,
    next_maintain: Instant,
    actions: VecDeque<Action>,
}

impl Membership {
    /// `bootstrap`: the `--peer` addresses (`HOST:PORT`), dialled from the
    /// first [`Membership::handle_timeout`] on.
    pub fn new(me: NodeId, config: MeshConfig, bootstrap: &[String], now: Instant) -> Self {
        let delay = config.backoff_min;
        Self {
            me,
            config,
            neighbours: HashMap::new(),
            known: KnownTable::default(),
            bootstrap: bootstrap
                .iter()
                .map(|a| Bootstrap {
                    addr: a.clone(),
                    next_try: now,
                    delay,
                    id: None,
                })
                .collect(),
            dials: HashMap::new(),
            dialing: HashSet::new(),
            next_dial: 0,
            next_maintain: now,
            actions: VecDeque::new(),
        }
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Membership::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let links = self
            .neighbours
            .values()
            .map(|n| n.next_gossip.min(n.last_heard + self.config.silence_limit));
        Some(links.fold(self.next_maintain, Instant::min))
    }

    /// Runs what is due: maintenance (forgetting, dialling), the `Status`
    /// of each neighbour whose turn it is, and dropping silent neighbours.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut silent: Vec<NodeId> = self
            .neighbours
            .iter()
            .filter(|(_, n)| {
                now.saturating_duration_since(n.last_heard) >= self.config.silence_limit
            })
            .map(|(id, _)| *id)
            .collect();
        silent.sort();
        for id in silent {
            self.drop_neighbour(id, CloseReason::Silent, now);
        }
        let mut due: Vec<NodeId> = self
            .neighbours
            .iter()
            .filter(|(_, n)| n.next_gossip <= now)
            .map(|(id, _)| *id)
            .collect();
        due.sort();
        for id in due {
            self.send_gossip(id, now);
        }
        if self.next_maintain <= now {
            self.next_maintain = now + self.config.maintain_interval;
            self.maintain(now);
        }
    }

    fn maintain(&mut self, now: Instant) {
        // Bootstrap peers: always wanted, whatever the count.
        for i in 0..self.bootstrap.len() {
            if self.neighbours.len() >= self.config.max_neighbors {
                break;
            }
            let b = &mut self.bootstrap[i];
            let linked = b.id.is_some_and(|id| self.neighbours.contains_key(&id));
            if linked || b.next_try > now {
                continue;
            }
            b.next_try = now + b.delay;
            b.delay = (b.delay * 2).min(self.config.backoff_max);
            let addr = match b.addr.parse::<SocketAddr>() {
                Ok(a) => DialAddr::Socket(a),
                Err(_) => DialAddr::Name(b.addr.clone()),
            };
            self.start_dial(None, addr, Some(i));
        }
        // Learned supernodes: up to the target.
        let missing = self
            .config
            .target_neighbors
            .saturating_sub(self.neighbours.len());
        if missing > 0 {
            for (id, addr) in self.candidates(now).into_iter().take(missing) {
                self.start_dial(Some(id), DialAddr::Socket(addr), None);
            }
        }
    }

    fn start_dial(&mut self, expect: Option<NodeId>, addr: DialAddr, bootstrap: Option<usize>) {
        let known_addr = match &addr {
            DialAddr::Socket(a) => {
                if !self.dialing.insert(*a) {
                    // Being dialled already: today's attempt is that one.
                    return;
                }
                Some(*a)
            }
            DialAddr::Name(_) => None,
        };
        let dial = DialId(self.next_dial);
        self.next_dial += 1;
        self.dials.insert(
            dial,
            PendingDial {
                addr: known_addr,
                expect,
                bootstrap,
            },
        );
        self.actions.push_back(Action::Dial { dial, expect, addr });
    }

    /// A [`DialAddr::Name`] resolved to `addr`. False if that address is
    /// being dialled already: then this dial is over (as failed) and must
    /// not go on.
    pub fn handle_resolved(&mut self, now: Instant, dial: DialId, addr: SocketAddr) -> bool {
        if !self.dials.contains_key(&dial) {
            return false;
        }
        if !self.dialing.insert(addr) {
            self.handle_dial_failed(now, dial);
            return false;
        }
        if let Some(p) = self.dials.get_mut(&dial) {
            p.addr = Some(addr);
        }
        true
    }

    /// A dial came to nothing (no answer, wrong id, refused, or it turned
    /// out to be ourselves or a node we are linked to already).
    pub fn handle_dial_failed(&mut self, now: Instant, dial: DialId) {
        let Some(p) = self.finish_dial(dial) else {
            return;
        };
        if let Some(id) = p.expect {
            let (unit, cap) = (self.config.backoff_min, self.config.backoff_max * 2);
            self.known.update(&id, |k| {
                k.failures = k.failures.saturating_add(1);
                k.next_try = now + unit.saturating_mul(1 << k.failures.min(7)).min(cap);
            });
        }
    }

    fn finish_dial(&mut self, dial: DialId) -> Option<PendingDial> {
        let p = self.dials.remove(&dial)?;
        if let Some(a) = p.addr {
            self.dialing.remove(&a);
        }
        Some(p)
    }

    /// A dial reached node `id`, which welcomed us on `link` with its
    /// load. On `Ok` it is a neighbour (and a `Status` is queued for it);
    /// on `Err` the caller closes the connection and the dial counts as
    /// failed.
    pub fn handle_dialled(
        &mut self,
        now: Instant,
        dial: DialId,
        id: NodeId,
        link: LinkId,
        leaves: u32,
        max_leaves: u32,
    ) -> Result<(), Refusal> {
        let Some(addr) = self.dials.get(&dial).and_then(|p| p.addr) else {
            return Err(Refusal::Duplicate);
        };
        let outcome = if id == self.me {
            Err(Refusal::Myself)
        } else if self.neighbours.len() >= self.config.max_neighbors
            && !self.neighbours.contains_key(&id)
        {
            // Dials run concurrently: the table may have filled meanwhile.
            Err(Refusal::NoRoom(self.config.max_neighbors))
        } else {
            let n = self.neighbour(addr, leaves, max_leaves, self.me, link, now);
            self.admit(id, n, now)
        };
        match outcome {
            Ok(()) => {
                if let Some(p) = self.finish_dial(dial) {
                    if let Some(b) = p.bootstrap.and_then(|i| self.bootstrap.get_mut(i)) {
                        b.id = Some(id);
                        b.delay = self.config.backoff_min;
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.handle_dial_failed(now, dial);
                Err(e)
            }
        }
    }

    /// Whether to take the link `link` that node `id` dialled from `ip`,
    /// listening on `listen_port`, with its load. On `Ok` it is a
    /// neighbour (and a `Status` is queued for it, to follow `Welcome`);
    /// on `Err` the caller refuses it with that message.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_hello(
        &mut self,
        now: Instant,
        id: NodeId,
        link: LinkId,
        ip: IpAddr,
        listen_port: u16,
        leaves: u32,
        max_leaves: u32,
    ) -> Result<(), Refusal> {
        if id == self.me {
            return Err(Refusal::Myself);
        }
        if listen_port == 0 {
            return Err(Refusal::ListenPortZero);
        }
        let addr = SocketAddr::new(ip.to_canonical(), listen_port);
        // A link to the same id can only replace the one there: no caps.
        if !self.neighbours.contains_key(&id) {
            if self.neighbours.len() >= self.config.max_neighbors {
                return Err(Refusal::NoRoom(self.config.max_neighbors));
            }
            let current = self.neighbours.values().map(|n| n.addr.ip());
            if !ip_allowed(addr.ip(), current, self.config.ip_caps, |ip| {
                self.config.is_exempt(ip)
            }) {
                return Err(Refusal::TooManyFrom(addr.ip()));
            }
        }
        let n = self.neighbour(addr, leaves, max_leaves, id, link, now);
        self.admit(id, n, now)
    }

    fn neighbour(
        &self,
        addr: SocketAddr,
        leaves: u32,
        max_leaves: u32,
        dialer: NodeId,
        link: LinkId,
        now: Instant,
    ) -> Neighbour {
        Neighbour {
            addr,
            addr_text: addr.to_string(),
            leaves,
            max_leaves,
            elected: false,
            dialer,
            since: now,
            link,
            rtt: None,
            last_heard: now,
            next_gossip: now,
        }
    }

    /// Adds a link, settling a duplicate deterministically: of two links
    /// between the same pair, both ends keep the one dialled by the lower
    /// id. A link the caller knows has ended must be reported
    /// ([`Membership::handle_link_down`]) first, or it still counts.
    fn admit(&mut self, id: NodeId, n: Neighbour, now: Instant) -> Result<(), Refusal> {
        if let Some(old) = self.neighbours.get(&id) {
            if n.dialer >= old.dialer {
                return Err(Refusal::Duplicate);
            }
            self.actions.push_back(Action::Close {
                id,
                link: old.link,
                reason: CloseReason::Replaced,
            });
        }
        self.neighbours.insert(id, n);
        // Each end sends a Status at once, then every gossip interval.
        self.send_gossip(id, now);
        Ok(())
    }

    /// A `Status` from neighbour `id` on `link`.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_status(
        &mut self,
        now: Instant,
        id: NodeId,
        link: LinkId,
        leaves: u32,
        max_leaves: u32,
        known: Vec<SupernodeInfo>,
        elected: bool,
    ) {
        if let Some(n) = self.neighbours.get_mut(&id) {
            n.leaves = leaves;
            n.max_leaves = max_leaves;
            n.elected = elected;
            if n.link == link {
                n.last_heard = now;
            }
        }
        self.learn(id, known, now);
    }

    /// `link` to `id` ended (its connection closed, its control stream
    /// ended or carried something else than `Status`). If it was the
    /// neighbour's link, the neighbour is dropped, remembered as a former
    /// neighbour, and [`Action::Close`] follows.
    pub fn handle_link_down(&mut self, now: Instant, id: NodeId, link: LinkId) {
        if self.neighbours.get(&id).is_some_and(|n| n.link == link) {
            self.drop_neighbour(id, CloseReason::Ended, now);
        }
    }

    /// A round-trip time sample of the link to `id`.
    pub fn handle_rtt(&mut self, id: NodeId, rtt: Duration) {
        if let Some(n) = self.neighbours.get_mut(&id) {
            n.rtt = Some(rtt);
        }
    }

    fn drop_neighbour(&mut self, id: NodeId, reason: CloseReason, now: Instant) {
        let Some(n) = self.neighbours.remove(&id) else {
            return;
        };
        // Remembered so that it may be redialled later, within the cap.
        if !self.known.contains_key(&id) && self.known.len() >= self.config.max_known {
            if let Some(o) = self.known.oldest_unverified() {
                self.known.remove(&o);
            }
        }
        self.known.insert(
            id,
            Known {
                addr: n.addr,
                addr_text: n.addr_text,
                leaves: n.leaves,
                max_leaves: n.max_leaves,
                last_seen: now,
                next_try: now + self.config.backoff_min,
                failures: 0,
                verified: true,
                told_by: None,
            },
        );
        self.actions.push_back(Action::Close {
            id,
            link: n.link,
            reason,
        });
    }

    fn send_gossip(&mut self, to: NodeId, now: Instant) {
        let known = self.gossip(Some(to), now);
        let interval = self.config.gossip_interval;
        if let Some(n) = self.neighbours.get_mut(&to) {
            n.next_gossip = now + interval;
            let link = n.link;
            self.actions
                .push_back(Action::SendGossip { to, link, known });
        }
    }

    /// Adds supernodes known from elsewhere (an elected leaf's own list),
    /// unverified, as candidates to dial: a supernode whose first peers
    /// refuse it still has others to try.
    pub fn seed(&mut self, infos: Vec<SupernodeInfo>, now: Instant) {
        self.learn(self.me, infos, now);
    }

    /// Records what `from` gossiped.
    fn learn(&mut self, from: NodeId, infos: Vec<SupernodeInfo>, now: Instant) {
        let max_known = self.config.max_known;
        let per_sender = self.config.max_known_per_sender;
        let known = &mut self.known;
        for info in infos.into_iter().take(MAX_SUPERNODE_INFOS) {
            if info.id == self.me || info.id == from {
                continue;
            }
            let seen = now
                .checked_sub(Duration::from_secs(info.age_secs.into()))
                .unwrap_or(now);
            // Nothing newer than what we have: skipped, whatever its
            // address (checked only when it would be used: most entries
            // of a settled mesh's gossip are news to no one).
            if known.get(&info.id).is_some_and(|k| k.last_seen >= seen) {
                continue;
            }
            let Ok(addr) = info.addr.parse::<SocketAddr>() else {
                continue;
            };
            if addr.port() == 0 || addr.ip().is_unspecified() {
                continue;
            }
            // Known and older than this news (newer ones were skipped above).
            match known.get(&info.id) {
                Some(_) => known.update(&info.id, |k| {
                    k.last_seen = seen;
                    k.leaves = info.leaves;
                    k.max_leaves = info.max_leaves;
                    if k.addr != addr {
                        // A new address for the same key: worth a fresh try.
                        k.addr = addr;
                        k.addr_text = addr.to_string();
                        k.next_try = now;
                        k.failures = 0;
                    }
                }),
                None => {
                    // Room comes first out of what this neighbour told us,
                    // then out of what nobody has verified.
                    let evict = if known.told_by(&from) >= per_sender {
                        known.oldest_told_by(&from)
                    } else if known.len() >= max_known {
                        known.oldest_unverified()
                    } else {
                        None
                    };
                    if let Some(o) = evict {
                        known.remove(&o);
                    }
                    known.insert(
                        info.id,
                        Known {
                            addr,
                            addr_text: addr.to_string(),
                            leaves: info.leaves,
                            max_leaves: info.max_leaves,
                            last_seen: seen,
                            next_try: now,
                            failures: 0,
                            verified: false,
                            told_by: Some(from),
                        },
                    );
                }
            }
        }
    }

    /// Known supernodes worth dialling now, best first. Forgets those not
    /// heard of for [`MeshConfig::forget_after`].
    fn candidates(&mut self, now: Instant) -> Vec<(NodeId, SocketAddr)> {
        let forget_after = self.config.forget_after;
        self.known
            .retain(|k| now.saturating_duration_since(k.last_seen) < forget_after);
        let mut v: Vec<_> = self
            .known
            .iter()
            .filter(|(id, k)| {
                **id != self.me
                    && !self.neighbours.contains_key(*id)
                    && k.next_try <= now
                    && !self.dialing.contains(&k.addr)
            })
            .map(|(id, k)| {
                (
                    (
                        load_permille(k.leaves, k.max_leaves),
                        now.saturating_duration_since(k.last_seen),
                        *id,
                    ),
                    k.addr,
                )
            })
            .collect();
        v.sort();
        v.into_iter().map(|((_, _, id), addr)| (id, addr)).collect()
    }

    /// Neighbour ids, least loaded and fastest first (by the latest RTT
    /// sample; one without a sample last among equals): the order a search
    /// asks them in.
    pub fn ranked_neighbours(&self) -> Vec<NodeId> {
        let mut v: Vec<(u64, Duration, NodeId)> = self
            .neighbours
            .iter()
            .map(|(id, n)| {
                (
                    load_permille(n.leaves, n.max_leaves),
                    n.rtt.unwrap_or(Duration::MAX),
                    *id,
                )
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, _, id)| id).collect()
    }

    pub fn neighbour_count(&self) -> usize {
        self.neighbours.len()
    }

    pub fn is_neighbour(&self, id: &NodeId) -> bool {
        self.neighbours.contains_key(id)
    }

    pub fn neighbour_info(&self, id: &NodeId) -> Option<&Neighbour> {
        self.neighbours.get(id)
    }

    /// Every neighbour, in no particular order.
    pub fn neighbours(&self) -> impl Iterator<Item = (&NodeId, &Neighbour)> {
        self.neighbours.iter()
    }

    /// Other supernodes known now: neighbours, and those remembered but
    /// not linked (gossiped ones included, checked or not).
    pub fn known_count(&self) -> usize {
        let remembered = self
            .known
            .keys()
            .filter(|id| !self.neighbours.contains_key(*id))
            .count();
        self.neighbours.len() + remembered
    }

    /// How many neighbours said in their last `Status` that they were
    /// elected, and of how many (`elect::Load::neighbours_elected`).
    pub fn neighbours_elected(&self) -> (usize, usize) {
        let elected = self.neighbours.values().filter(|n| n.elected).count();
        (elected, self.neighbours.len())
    }

    /// The load (`leaves`, `max_leaves`) of every other supernode known:
    /// each neighbour as its last `Status` gave it, and each entry of the
    /// known table heard of within `max_age` (at most
    /// [`MeshConfig::gossip_max_age`]), checked or not (at most
    /// `max_known`, of which `max_known_per_sender` from any one
    /// neighbour). The sample election judges need by
    /// (`elect::Load::known`, `elect::NEED_SAMPLE_MAX_AGE`).
    pub fn loads(&self, now: Instant, max_age: Duration) -> Vec<(u32, u32)> {
        let max_age = max_age.min(self.config.gossip_max_age);
        let remembered = self.known.iter().filter(move |(id, k)| {
            !self.neighbours.contains_key(*id)
                && now.saturating_duration_since(k.last_seen) < max_age
        });
        self.neighbours
            .values()
            .map(|n| (n.leaves, n.max_leaves))
            .chain(remembered.map(|(_, k)| (k.leaves, k.max_leaves)))
            .collect()
    }

    /// Supernodes to tell others about: neighbours first (by id), then
    /// recently seen ones (by age), never `except`, at most
    /// `MAX_SUPERNODE_INFOS`.
    pub fn gossip(&self, except: Option<NodeId>, now: Instant) -> Vec<SupernodeInfo> {
        let keys = self
            .passable(except, now)
            .map(|p| (p.former, p.age_secs, p.id))
            .collect();
        smallest(keys, MAX_SUPERNODE_INFOS)
            .into_iter()
            .map(|(_, _, id)| self.info(id, now))
            .collect()
    }

    /// Every supernode we may tell others about: linked to, or verified
    /// and heard of within [`MeshConfig::gossip_max_age`]. Only keys: a
    /// frame's worth is chosen before any entry is built.
    fn passable(
        &self,
        except: Option<NodeId>,
        now: Instant,
    ) -> impl Iterator<Item = Passable> + '_ {
        let linked = self
            .neighbours
            .iter()
            .filter(move |(id, _)| Some(**id) != except)
            .map(|(id, n)| Passable {
                id: *id,
                former: false,
                age_secs: 0,
                load: load_permille(n.leaves, n.max_leaves),
                room: n.leaves < n.max_leaves,
            });
        let former = self
            .known
            .verified()
            .filter(move |(id, k)| {
                now.saturating_duration_since(k.last_seen) < self.config.gossip_max_age
                    && Some(**id) != except
                    && !self.neighbours.contains_key(*id)
            })
            .map(move |(id, k)| Passable {
                id: *id,
                former: true,
                age_secs: age_secs(now, k.last_seen),
                load: load_permille(k.leaves, k.max_leaves),
                room: k.leaves < k.max_leaves,
            });
        linked.chain(former)
    }

    /// The entry for `id`, a neighbour or a known supernode.
    fn info(&self, id: NodeId, now: Instant) -> SupernodeInfo {
        if let Some(n) = self.neighbours.get(&id) {
            return n.info(id);
        }
        let k = &self.known.entries[&id];
        SupernodeInfo {
            id,
            addr: k.addr_text.clone(),
            leaves: k.leaves,
            max_leaves: k.max_leaves,
            age_secs: age_secs(now, k.last_seen),
        }
    }

    /// Supernodes for a leaf, least loaded first (then most recently
    /// heard of, neighbours first, by id); with `with_room`, only those
    /// that can take another leaf.
    /// At most `MAX_SUPERNODE_INFOS`, chosen from all we may pass on (not
    /// only the first 64 we would gossip), so that room anywhere is found.
    pub fn for_leaves(&self, with_room: bool, now: Instant) -> Vec<SupernodeInfo> {
        let keys = self
            .passable(None, now)
            .filter(|p| p.room || !with_room)
            .map(|p| (p.load, p.age_secs, p.former, p.id))
            .collect();
        smallest(keys, MAX_SUPERNODE_INFOS)
            .into_iter()
            .map(|(_, _, _, id)| self.info(id, now))
            .collect()
    }
}

/// A supernode we may pass on, by the keys it is chosen by.
struct Passable {
    id: NodeId,
    /// Not linked now (a former neighbour).
    former: bool,
    age_secs: u32,
    load: u64,
    room: bool,
}

fn age_secs(now: Instant, last_seen: Instant) -> u32 {
    now.saturating_duration_since(last_seen)
        .as_secs()
        .min(u32::MAX as u64) as u32
}

/// The `n` smallest of `v`, in order, without sorting all of it (a
/// supernode may know a thousand others and gossips 64 of them).
fn smallest<K: Ord>(mut v: Vec<K>, n: usize) -> Vec<K> {
    if n == 0 {
        return Vec::new();
    }
    if v.len() > n {
        v.select_nth_unstable(n - 1);
        v.truncate(n);
    }
    v.sort_unstable();
    v
}

/// The known supernodes, with their unverified entries indexed by age
/// overall and by the neighbour that told of them, so that making room
/// costs a lookup rather than a scan of the table: at a thousand entries,
/// new names arrive in every `Status` of a churning mesh.
///
/// The age indexes are heaps with lazy deletion: an entry heard of again
/// pushes its new age and leaves the old one behind, to be skipped (and
/// swept once stale keys outnumber live ones), because every `Status`
/// freshens dozens of entries and only a full table ever asks for the
/// oldest.
#[derive(Debug, Default)]
struct KnownTable {
    entries: HashMap<NodeId, Known>,
    /// Unverified entries, least recently heard of on top.
    unverified: AgeHeap,
    /// The same, by the neighbour that told us of them.
    by_sender: HashMap<NodeId, AgeHeap>,
    /// Verified entries (former neighbours): the only ones passed on, and
    /// few, so gossip need not look at the rest.
    verified: BTreeSet<NodeId>,
}

/// Keys `(last heard of, id)` of some entries, oldest on top, with stale
/// keys left in until they reach the top or are swept.
#[derive(Debug, Default)]
struct AgeHeap {
    heap: BinaryHeap<Reverse<(Instant, NodeId)>>,
    /// Entries it indexes now (its live keys).
    live: usize,
}

impl AgeHeap {
    fn push(&mut self, key: (Instant, NodeId), is_live: impl Fn(&(Instant, NodeId)) -> bool) {
        self.heap.push(Reverse(key));
        if self.heap.len() > 2 * self.live + 32 {
            let mut keys = std::mem::take(&mut self.heap).into_vec();
            keys.retain(|Reverse(k)| is_live(k));
            keys.sort_unstable();
            keys.dedup();
            self.heap = keys.into();
        }
    }

    /// The oldest live key's id.
    fn oldest(&mut self, is_live: impl Fn(&(Instant, NodeId)) -> bool) -> Option<NodeId> {
        while let Some(Reverse(k)) = self.heap.peek() {
            if is_live(k) {
                return Some(k.1);
            }
            self.heap.pop();
        }
        None
    }
}

impl KnownTable {
    fn get(&self, id: &NodeId) -> Option<&Known> {
        self.entries.get(id)
    }

    fn contains_key(&self, id: &NodeId) -> bool {
        self.entries.contains_key(id)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn iter(&self) -> impl Iterator<Item = (&NodeId, &Known)> {
        self.entries.iter()
    }

    fn keys(&self) -> impl Iterator<Item = &NodeId> {
        self.entries.keys()
    }

    #[cfg(test)]
    fn values(&self) -> impl Iterator<Item = &Known> {
        self.entries.values()
    }

    fn insert(&mut self, id: NodeId, k: Known) {
        self.remove(&id);
        let (verified, told_by, key) = (k.verified, k.told_by, (k.last_seen, id));
        self.entries.insert(id, k);
        if verified {
            self.verified.insert(id);
        } else {
            self.unverified.live += 1;
            if let Some(from) = told_by {
                self.by_sender.entry(from).or_default().live += 1;
            }
            self.index(key, told_by);
        }
    }

    /// Pushes an unverified entry's age key to the heaps that count it.
    fn index(&mut self, key: (Instant, NodeId), told_by: Option<NodeId>) {
        let entries = &self.entries;
        self.unverified.push(key, |k| unverified_at(entries, k));
        if let Some(from) = told_by {
            if let Some(h) = self.by_sender.get_mut(&from) {
                h.push(key, |k| told_at(entries, from, k));
            }
        }
    }

    fn remove(&mut self, id: &NodeId) -> Option<Known> {
        let k = self.entries.remove(id)?;
        if k.verified {
            self.verified.remove(id);
        } else {
            self.unverified.live -= 1;
            if let Some(from) = k.told_by {
                if let Some(h) = self.by_sender.get_mut(&from) {
                    h.live -= 1;
                    if h.live == 0 {
                        self.by_sender.remove(&from);
                    }
                }
            }
        }
        Some(k)
    }

    /// Changes an entry (not whether it is verified, nor who told of it),
    /// keeping the indexes right.
    fn update(&mut self, id: &NodeId, f: impl FnOnce(&mut Known)) {
        let Some(k) = self.entries.get_mut(id) else {
            return;
        };
        let (before, verified, told_by) = (k.last_seen, k.verified, k.told_by);
        f(k);
        debug_assert!(k.verified == verified && k.told_by == told_by);
        let after = k.last_seen;
        if verified || before == after {
            return;
        }
        self.index((after, *id), told_by);
    }

    fn retain(&mut self, keep: impl Fn(&Known) -> bool) {
        let gone: Vec<NodeId> = self
            .entries
            .iter()
            .filter(|(_, k)| !keep(k))
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.remove(&id);
        }
    }

    /// The verified entries, by id.
    fn verified(&self) -> impl Iterator<Item = (&NodeId, &Known)> {
        self.verified.iter().map(|id| (id, &self.entries[id]))
    }

    /// Unverified entries `from` told us of.
    fn told_by(&self, from: &NodeId) -> usize {
        self.by_sender.get(from).map_or(0, |h| h.live)
    }

    fn oldest_told_by(&mut self, from: &NodeId) -> Option<NodeId> {
        let entries = &self.entries;
        let from = *from;
        self.by_sender
            .get_mut(&from)?
            .oldest(|k| told_at(entries, from, k))
    }

    /// The least recently heard of unverified entry, or of all if every
    /// entry is verified.
    fn oldest_unverified(&mut self) -> Option<NodeId> {
        let entries = &self.entries;
        match self.unverified.oldest(|k| unverified_at(entries, k)) {
            Some(id) => Some(id),
            None => self
                .entries
                .iter()
                .min_by_key(|(id, k)| (k.last_seen, **id))
                .map(|(id, _)| *id),
        }
    }

    /// Whether the indexes agree with the entries (for tests).
    #[cfg(test)]
    fn consistent(&mut self) -> bool {
        let unverified: Vec<(Instant, NodeId)> = {
            let mut v: Vec<_> = self
                .entries
                .iter()
                .filter(|(_, k)| !k.verified)
                .map(|(id, k)| (k.last_seen, *id))
                .collect();
            v.sort();
            v
        };
        let mut senders: HashMap<NodeId, usize> = HashMap::new();
        for k in self.entries.values().filter(|k| !k.verified) {
            if let Some(from) = k.told_by {
                *senders.entry(from).or_default() += 1;
            }
        }
        let counts_agree = senders.len() == self.by_sender.len()
            && senders.iter().all(|(from, n)| self.told_by(from) == *n);
        let oldest_agrees = unverified.is_empty() || {
            self.oldest_unverified() == unverified.first().map(|k| k.1)
        };
        let oldest_per_sender_agrees = senders.keys().all(|from| {
            let want = unverified
                .iter()
                .find(|(_, id)| self.entries[id].told_by == Some(*from))
                .map(|k| k.1);
            self.oldest_told_by(from) == want
        });
        let verified: BTreeSet<NodeId> = self
            .entries
            .iter()
            .filter(|(_, k)| k.verified)
            .map(|(id, _)| *id)
            .collect();
        unverified.len() == self.unverified.live
            && counts_agree
            && oldest_agrees
            && oldest_per_sender_agrees
            && verified == self.verified
    }
}

/// Whether `key` is the age of an unverified entry now.
fn unverified_at(entries: &HashMap<NodeId, Known>, key: &(Instant, NodeId)) -> bool {
    entries
        .get(&key.1)
        .is_some_and(|k| !k.verified && k.last_seen == key.0)
}

/// Whether `key` is the age of an unverified entry `from` told us of.
fn told_at(entries: &HashMap<NodeId, Known>, from: NodeId, key: &(Instant, NodeId)) -> bool {
    entries
        .get(&key.1)
        .is_some_and(|k| !k.verified && k.last_seen == key.0 && k.told_by == Some(from))
}

/// Load as thousandths of capacity (full or unknown capacity ranks last).
fn load_permille(leaves: u32, max_leaves: u32) -> u64 {
    if max_leaves == 0 {
        return 1000;
    }
    (u64::from(leaves) * 1000 / u64::from(max_leaves)).min(1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn node(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn info(n: u32) -> SupernodeInfo {
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        SupernodeInfo {
            id: NodeId(id),
            addr: format!("192.0.2.{}:{}", n % 250 + 1, 7000 + n % 1000),
            leaves: 0,
            max_leaves: 100,
            age_secs: 0,
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 51, n, 1))
    }

    fn drain(m: &mut Membership) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action()).collect()
    }

    /// Links `n` as a neighbour that dialled us from its own subnet.
    fn accept(m: &mut Membership, now: Instant, n: u8) {
        m.handle_hello(now, node(n), LinkId(n.into()), ip(n), 7000, 0, 100)
            .expect("accepted");
    }

    fn dials(actions: &[Action]) -> Vec<(DialId, Option<NodeId>, DialAddr)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Dial { dial, expect, addr } => Some((*dial, *expect, addr.clone())),
                _ => None,
            })
            .collect()
    }

    fn gossip_to(actions: &[Action], to: NodeId) -> Option<Vec<SupernodeInfo>> {
        actions.iter().find_map(|a| match a {
            Action::SendGossip { to: t, known, .. } if *t == to => Some(known.clone()),
            _ => None,
        })
    }

    #[test]
    fn one_neighbour_cannot_flood_the_known_table() {
        let t0 = Instant::now();
        let mut m = Membership::new(node(0xee), MeshConfig::default(), &[], t0);
        let (honest, hostile) = (node(1), node(2));
        m.learn(honest, (0..10).map(info).collect(), t0);
        // Made-up entries, 64 fresh ones every round, always the newest.
        for round in 0..40u32 {
            let batch = (0..64).map(|i| info(1000 + round * 64 + i)).collect();
            m.learn(hostile, batch, t0 + Duration::from_secs(round.into()));
        }
        let from_hostile = m
            .known
            .values()
            .filter(|k| k.told_by == Some(hostile))
            .count();
        assert_eq!(from_hostile, m.config.max_known_per_sender);
        for n in 0..10 {
            assert!(m.known.contains_key(&info(n).id), "honest entry {n} kept");
        }
        assert!(m.known.consistent());
    }

    #[test]
    fn a_full_table_forgets_unverified_entries_first() {
        let t0 = Instant::now();
        let config = MeshConfig {
            max_known: 20,
            max_known_per_sender: 1000,
            ..MeshConfig::default()
        };
        let mut m = Membership::new(node(0xee), config, &[], t0);
        // Two former neighbours: verified.
        for n in [1, 2] {
            accept(&mut m, t0, n);
            m.handle_link_down(t0, node(n), LinkId(n.into()));
        }
        for round in 0..10u32 {
            let at = t0 + Duration::from_secs(round.into());
            let batch = (0..10).map(|i| info(100 + round * 10 + i)).collect();
            m.handle_status(at, node(3), LinkId(3), 0, 100, batch, false);
        }
        assert_eq!(m.known.len(), 20);
        assert!(m.known.contains_key(&node(1)) && m.known.contains_key(&node(2)));
        // The newest claims stayed, the oldest went.
        assert!(m.known.contains_key(&info(199).id));
        assert!(!m.known.contains_key(&info(100).id));
        // Claims naming us or the sender, or no dialable address, are skipped.
        let mut bad = vec![info(500), info(501), info(502), info(503)];
        bad[0].id = node(0xee);
        bad[1].id = node(4);
        bad[2].addr = "0.0.0.0:7000".into();
        bad[3].addr = "192.0.2.1:0".into();
        m.handle_status(t0, node(4), LinkId(4), 0, 100, bad, false);
        assert!(!m.known.contains_key(&node(0xee)) && !m.known.contains_key(&node(4)));
        assert!(!m.known.contains_key(&info(502).id) && !m.known.contains_key(&info(503).id));
        // Former neighbours make room too, and the indexes follow.
        for n in 10..20 {
            accept(&mut m, t0, n);
            m.handle_link_down(t0 + Duration::from_secs(20), node(n), LinkId(n.into()));
        }
        assert_eq!(m.known.len(), 20);
        assert!(m.known.consistent());
    }

    #[test]
    fn known_entries_are_forgotten_when_not_heard_of() {
        let t0 = Instant::now();
        let mut m = Membership::new(node(0xee), MeshConfig::default(), &[], t0);
        m.seed(vec![info(1)], t0);
        assert_eq!(m.known_count(), 1);
        m.handle_timeout(t0 + Duration::from_secs(600));
        assert_eq!(m.known_count(), 0);
    }

    #[test]
    fn loads_count_known_entries_only_while_fresh() {
        let t0 = Instant::now();
        let mut m = Membership::new(node(0xee), MeshConfig::default(), &[], t0);
        let old = SupernodeInfo {
            leaves: 90,
            age_secs: 40,
            ..info(1)
        };
        let fresh = SupernodeInfo {
            leaves: 10,
            age_secs: 5,
            ..info(2)
        };
        m.seed(vec![old, fresh], t0);
        let mut all = m.loads(t0, Duration::from_secs(3600));
        all.sort_unstable();
        assert_eq!(
            all,
            [(10, 100), (90, 100)],
            "capped at gossip_max_age, both in"
        );
        assert_eq!(m.loads(t0, Duration::from_secs(30)), [(10, 100)]);
        assert!(m
            .loads(t0 + Duration::from_secs(30), Duration::from_secs(30))
            .is_empty());
    }

    #[test]
    fn failed_dials_back_off_and_a_link_resets_the_backoff() {
        let t0 = Instant::now();
        let mut m = Membership::new(node(0xee), MeshConfig::default(), &[], t0);
        let target = info(7);
        m.seed(vec![target.clone()], t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..10 {
            // Step in maintenance intervals until the id is dialled again.
            let mut waited = Duration::ZERO;
            let dial = loop {
                m.handle_timeout(now);
                if let Some((dial, expect, addr)) = dials(&drain(&mut m)).pop() {
                    assert_eq!(expect, Some(target.id));
                    assert_eq!(addr, DialAddr::Socket(target.addr.parse().unwrap()));
                    break dial;
                }
                now += Duration::from_millis(500);
                waited += Duration::from_millis(500);
                assert!(waited < Duration::from_secs(120), "never redialled");
            };
            waits.push(waited.as_millis());
            // While the dial runs, the address is not dialled again.
            now += Duration::from_millis(500);
            m.handle_timeout(now);
            assert!(dials(&drain(&mut m)).is_empty());
            m.handle_dial_failed(now, dial);
        }
        // 0.5 s × 2^failures, at most 60 s (twice the bootstrap's 30 s cap),
        // counted from the failure; the first try is at once.
        assert_eq!(
            waits,
            [0, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]
        );
        // A link that comes up and goes down again: redialled 0.5 s later.
        m.handle_timeout(now + Duration::from_secs(60));
        let (dial, _, _) = dials(&drain(&mut m)).pop().expect("dialled");
        now += Duration::from_secs(60);
        m.handle_dialled(now, dial, target.id, LinkId(1), 0, 100)
            .unwrap();
        m.handle_link_down(now, target.id, LinkId(1));
        drain(&mut m);
        m.handle_timeout(now + Duration::from_millis(499));
        assert!(dials(&drain(&mut m)).is_empty());
        m.handle_timeout(now + Duration::from_millis(1000));
        assert_eq!(dials(&drain(&mut m)).len(), 1);
        assert!(m.known.consistent());
    }

    #[test]
    fn bootstrap_backoff_doubles_to_its_cap_and_resets_on_a_link() {
        let t0 = Instant::now();
        let peers = [
            "192.0.2.9:7400".to_string(),
            "seed.example:7400".to_string(),
        ];
        let mut m = Membership::new(node(0xee), MeshConfig::default(), &peers, t0);
        let mut times = Vec::new();
        let mut now = t0;
        let mut last = None;
        while now < t0 + Duration::from_secs(130) {
            m.handle_timeout(now);
            for (dial, expect, addr) in dials(&drain(&mut m)) {
                assert_eq!(expect, None);
                match addr {
                    DialAddr::Socket(_) => {
                        times.push((now - t0).as_millis());
                        last = Some(dial);
                    }
                    // A name to resolve; it resolves to nothing.
                    DialAddr::Name(name) => {
                        assert_eq!(name, "seed.example:7400");
                        m.handle_dial_failed(now, dial);
                    }
                }
            }
            if let Some(d) = last.take() {
                m.handle_dial_failed(now, d);
            }
            now += Duration::from_millis(500);
        }
        assert_eq!(
            times,
            [0, 500, 1500, 3500, 7500, 15500, 31500, 61500, 91500, 121500]
        );
        // Once linked, the address is not dialled.
        m.handle_timeout(now);
        let (dial, _, _) = dials(&drain(&mut m))
            .into_iter()
            .find(|(_, _, a)| matches!(a, DialAddr::Socket(_)))
            .or_else(|| {
                now += Duration::from_secs(30);
                m.handle_timeout(now);
                dials(&drain(&mut m))
                    .into_iter()
                    .find(|(_, _, a)| matches!(a, DialAddr::Socket(_)))
            })
            .expect("bootstrap dialled");
        m.handle_dialled(now, dial, node(9), LinkId(9), 0, 100)
            .unwrap();
        now += Duration::from_secs(5);
        m.handle_status(now, node(9), LinkId(9), 0, 100, Vec::new(), false);
        m.handle_timeout(now);
        assert!(!dials(&drain(&mut m))
            .iter()
            .any(|(_, _, a)| matches!(a, DialAddr::Socket(_))));
        // When the link ends, the node found there is a former neighbour,
        // dialled again (by id) 0.5 s later.
        m.handle_link_down(now, node(9), LinkId(9));
        m.handle_timeout(now + Duration::from_millis(500));
        assert!(dials(&drain(&mut m))
            .iter()
            .any(|(_, e, a)| *e == Some(node(9)) && matches!(a, DialAddr::Socket(_))));
    }

    #[test]
    fn a_name_resolving_to_an_address_being_dialled_is_not_dialled_twice() {
        let t0 = Instant::now();
        let peers = ["seed.example:7400".to_string()];
        let mut m = Membership::new(node(0xee), MeshConfig::default(), &peers, t0);
        m.seed(vec![info(3)], t0);
        m.handle_timeout(t0);
        let d = dials(&drain(&mut m));
        assert_eq!(d.len(), 2);
        let name = d.iter().find(|(_, e, _)| e.is_none()).unwrap().0;
        let addr = info(3).addr.parse().unwrap();
        assert!(!m.handle_resolved(t0, name, addr));
    }

    #[test]
    fn both_ends_keep_the_link_dialled_by_the_lower_id() {
        let t0 = Instant::now();
        let (low, high) = (node(1), node(2));
        let config = MeshConfig::default;
        let mut a = Membership::new(low, config(), &[], t0);
        let mut b = Membership::new(high, config(), &[], t0);
        for (m, other) in [(&mut a, high), (&mut b, low)] {
            let mut i = info(0);
            i.id = other;
            m.seed(vec![i], t0);
            m.handle_timeout(t0);
        }
        let (da, _, _) = dials(&drain(&mut a)).pop().unwrap();
        let (db, _, _) = dials(&drain(&mut b)).pop().unwrap();
        // Link 10 is dialled by the low end, link 20 by the high one; both
        // come up at each end before either end has settled.
        a.handle_dialled(t0, da, high, LinkId(10), 0, 100).unwrap();
        b.handle_dialled(t0, db, low, LinkId(20), 0, 100).unwrap();
        drain(&mut a);
        drain(&mut b);
        // The low end refuses the high end's Hello: its own link wins.
        assert_eq!(
            a.handle_hello(t0, high, LinkId(20), ip(2), 7000, 0, 100),
            Err(Refusal::Duplicate)
        );
        // The high end takes the low end's, and closes its own.
        b.handle_hello(t0, low, LinkId(10), ip(1), 7000, 0, 100)
            .unwrap();
        let actions = drain(&mut b);
        assert!(actions.contains(&Action::Close {
            id: low,
            link: LinkId(20),
            reason: CloseReason::Replaced
        }));
        assert_eq!(a.neighbour_info(&high).unwrap().link, LinkId(10));
        assert_eq!(b.neighbour_info(&low).unwrap().link, LinkId(10));
        // News of the replaced link does not drop the neighbour.
        b.handle_link_down(t0, low, LinkId(20));
        assert!(b.is_neighbour(&low));
        // A Status follows the new link at once.
        assert!(gossip_to(&actions, low).is_some());
    }

    #[test]
    fn admission_respects_room_and_address_caps() {
        let t0 = Instant::now();
        let config = MeshConfig {
            max_neighbors: 6,
            exempt_ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            ..MeshConfig::default()
        };
        let mut m = Membership::new(node(0xee), config, &[], t0);
        let same_ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5));
        let hello = |m: &mut Membership, n: u8, ip: IpAddr| {
            m.handle_hello(t0, node(n), LinkId(n.into()), ip, 7000, 0, 100)
        };
        assert_eq!(hello(&mut m, 0xee, same_ip), Err(Refusal::Myself));
        assert_eq!(
            m.handle_hello(t0, node(1), LinkId(1), same_ip, 0, 0, 100),
            Err(Refusal::ListenPortZero)
        );
        hello(&mut m, 1, same_ip).unwrap();
        hello(&mut m, 2, same_ip).unwrap();
        assert_eq!(
            hello(&mut m, 3, same_ip),
            Err(Refusal::TooManyFrom(same_ip))
        );
        let subnet = |h| IpAddr::V4(Ipv4Addr::new(203, 0, 113, h));
        hello(&mut m, 4, subnet(6)).unwrap();
        hello(&mut m, 5, subnet(7)).unwrap();
        assert_eq!(
            hello(&mut m, 6, subnet(8)),
            Err(Refusal::TooManyFrom(subnet(8)))
        );
        // Exempt addresses are neither capped nor counted, but room is.
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        hello(&mut m, 7, local).unwrap();
        hello(&mut m, 8, local).unwrap();
        assert_eq!(hello(&mut m, 9, local), Err(Refusal::NoRoom(6)));
        assert_eq!(Refusal::NoRoom(6).to_string(), "no room: 6 neighbours");
        // A link from a node already linked may replace it (lower dialer
        // wins), whatever the room: node 1 dialled both, so the new loses.
        assert_eq!(hello(&mut m, 1, same_ip), Err(Refusal::Duplicate));
        assert_eq!(m.neighbour_count(), 6);
    }

    #[test]
    fn a_silent_neighbour_is_dropped() {
        let t0 = Instant::now();
        let mut m = Membership::new(node(0xee), MeshConfig::default(), &[], t0);
        accept(&mut m, t0, 1);
        accept(&mut m, t0, 2);
        drain(&mut m);
        let s = Duration::from_secs;
        // Node 1 keeps gossiping, node 2 is silent.
        for t in [2, 4, 6] {
            m.handle_status(t0 + s(t), node(1), LinkId(1), 0, 100, Vec::new(), false);
        }
        // Status on a link that is not the neighbour's does not count.
        m.handle_status(t0 + s(7), node(2), LinkId(99), 0, 100, Vec::new(), false);
        assert!(m.poll_timeout().unwrap() <= t0 + s(8));
        m.handle_timeout(t0 + s(8) - Duration::from_millis(1));
        assert!(m.is_neighbour(&node(2)));
        drain(&mut m);
        m.handle_timeout(t0 + s(8));
        let actions = drain(&mut m);
        assert!(actions.contains(&Action::Close {
            id: node(2),
            link: LinkId(2),
            reason: CloseReason::Silent
        }));
        assert!(!m.is_neighbour(&node(2)) && m.is_neighbour(&node(1)));
        m.handle_timeout(t0 + s(14) - Duration::from_millis(1));
        assert!(m.is_neighbour(&node(1)));
        m.handle_timeout(t0 + s(14));
        assert!(!m.is_neighbour(&node(1)));
    }

    #[test]
    fn gossip_is_periodic_and_never_names_the_receiver_or_stale_or_unchecked_entries() {
        let t0 = Instant::now();
        let mut m = Membership::new(node(0xee), MeshConfig::default(), &[], t0);
        for n in [1, 2, 3] {
            accept(&mut m, t0, n);
        }
        // Node 3 leaves: a former neighbour, passed on while heard of lately.
        m.handle_link_down(t0, node(3), LinkId(3));
        // Node 1 tells of an unchecked node: not passed on.
        m.handle_status(t0, node(1), LinkId(1), 0, 100, vec![info(50)], false);
        drain(&mut m);
        let s = Duration::from_secs;
        let now = t0 + s(2);
        m.handle_timeout(now);
        let actions = drain(&mut m);
        let to1 = gossip_to(&actions, node(1)).expect("status to node 1");
        let ids: Vec<NodeId> = to1.iter().map(|i| i.id).collect();
        assert_eq!(ids, [node(2), node(3)]);
        assert_eq!((to1[0].age_secs, to1[1].age_secs), (0, 2));
        assert!(gossip_to(&actions, node(2)).is_some());
        // Not again before the next interval.
        m.handle_timeout(now + Duration::from_millis(1999));
        assert!(gossip_to(&drain(&mut m), node(1)).is_none());
        // The former neighbour is stale after 5 minutes.
        let later = t0 + s(300);
        for n in [1, 2] {
            m.handle_status(later, node(n), LinkId(n.into()), 0, 100, Vec::new(), false);
        }
        m.handle_timeout(later);
        let to1 = gossip_to(&drain(&mut m), node(1)).expect("status to node 1");
        assert_eq!(to1.iter().map(|i| i.id).collect::<Vec<_>>(), [node(2)]);
        assert_eq!(m.for_leaves(false, later).len(), 2);
        assert!(m.known.consistent());
    }

    #[test]
    fn ranking_and_leaf_lists_go_by_load_then_rtt() {
        let t0 = Instant::now();
        let mut m = Membership::new(node(0xee), MeshConfig::default(), &[], t0);
        for n in [1, 2, 3] {
            accept(&mut m, t0, n);
        }
        m.handle_status(t0, node(1), LinkId(1), 90, 100, Vec::new(), false);
        m.handle_status(t0, node(2), LinkId(2), 10, 100, Vec::new(), false);
        m.handle_status(t0, node(3), LinkId(3), 10, 100, Vec::new(), false);
        m.handle_rtt(node(2), Duration::from_millis(40));
        m.handle_rtt(node(3), Duration::from_millis(5));
        assert_eq!(m.ranked_neighbours(), [node(3), node(2), node(1)]);
        m.handle_status(t0, node(1), LinkId(1), 100, 100, Vec::new(), false);
        let room: Vec<NodeId> = m.for_leaves(true, t0).iter().map(|i| i.id).collect();
        assert_eq!(room, [node(2), node(3)]);
    }

    #[test]
    fn dialling_stops_at_the_target_and_prefers_the_least_loaded() {
        let t0 = Instant::now();
        let config = MeshConfig {
            target_neighbors: 2,
            ..MeshConfig::default()
        };
        let mut m = Membership::new(node(0xee), config, &[], t0);
        let mut infos: Vec<SupernodeInfo> = (1..=4).map(info).collect();
        for (i, load) in infos.iter_mut().zip([80, 20, 50, 10]) {
            i.leaves = load;
        }
        m.seed(infos.clone(), t0);
        m.handle_timeout(t0);
        let d = dials(&drain(&mut m));
        let expected: Vec<Option<NodeId>> = vec![Some(infos[3].id), Some(infos[1].id)];
        assert_eq!(d.iter().map(|x| x.1).collect::<Vec<_>>(), expected);
        for (dial, id, _) in d {
            m.handle_dialled(t0, dial, id.unwrap(), LinkId(dial.0), 0, 100)
                .unwrap();
        }
        drain(&mut m);
        m.handle_timeout(t0 + Duration::from_secs(1));
        assert!(dials(&drain(&mut m)).is_empty());
    }
}
