//! The one owner of a supernode's long-lived decision state: the
//! registration leases (`servent_proto::lease`), the mesh membership
//! (`servent_proto::mesh`) and the election (`servent_proto::elect`), with
//! the connections those decisions are about (leaf connections by
//! registration, mesh links by link id).
//!
//! One task ([`run`]) holds them all and takes [`Command`]s over a channel,
//! as rust-libp2p's `examples/file-sharing/src/network.rs` does: connection
//! tasks (the leaf session, the mesh links, query routing) send a command
//! and, where they need an answer, wait on a `oneshot` reply. Every
//! decision is then made in one place, in one step: a registration is
//! checked against the caps and inserted at once, a mesh link is admitted
//! or refused against the neighbour table as it is, and the election sees
//! a promoted leaf join the mesh the moment the link is admitted.
//!
//! The owner never waits on the network: what takes I/O (dials, dial-backs,
//! `Promote`, hand-overs) runs in tasks of its own that report back with a
//! command. What is read often and cheaply (counts, neighbours) is
//! published as a [`Snapshot`] after each change, for status, metrics and
//! the mesh's `Status` frames.
//!
//! Query routing never waits on the owner: a query from a flooding
//! neighbour that its rate limit or the seen-set refuses must cost nothing
//! but that check, and no one task may sit on every query's path. So the
//! owner also publishes the neighbours ranked for a query with each one's
//! link ([`Routes`]), after each change of the neighbours and on the mesh
//! core's timers (so the RTT ranking is at most a maintenance interval
//! old), which routing reads synchronously when the hop core asks; and the
//! node's seeded RNG, from which mesh query ids are drawn, is shared
//! behind a lock of its own ([`State::query_id`]).
//!
//! Not here: the file index, which is read by every query and keeps its
//! own lock and caps (`crate::index`), the per-query state of routing
//! (`servent_proto::hop::HopNode`, behind a short lock in [`State`]), and
//! the query rate limits of leaves (`crate::session::QueryLimits`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use servent_proto::elect::{self, Load, PromoteReply, Room};
use servent_proto::filter::{Filter, WordKey};
use servent_proto::lease::{self, Admission, Generation, LeaseConfig, Leases};
use servent_proto::mesh::{DialId, LinkId, Membership, Refusal};
use servent_proto::msg::{Candidacy, SupernodeInfo};
use servent_proto::walk::View;
use servent_proto::NodeId;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::mesh::Link;
use crate::{election, mesh, State};
use servent_net::Endpoint;

/// Commands waiting for the owner. Senders that need no answer and cannot
/// wait (a session ending) fall back to a task when it is full.
const COMMAND_QUEUE: usize = 1024;

/// What the owner publishes after each change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Leaves registered now.
    pub leaves: usize,
    pub max_leaves: usize,
    /// Mesh neighbours linked now and where they listen, by id.
    pub neighbours: Vec<(NodeId, SocketAddr)>,
    /// Other supernodes known now, neighbours included.
    pub known: usize,
}

/// The neighbours a query may be forwarded to, ranked, and the link to
/// each: what routing reads on every query instead of asking the owner.
///
/// Apart from [`Snapshot`] because a connection is a handle, not a value:
/// status and metrics compare snapshots, routing only reads this.
#[derive(Debug, Clone, Default)]
pub(crate) struct Routes {
    /// Neighbour ids in the order `Membership::ranked_neighbours` gives
    /// (least loaded first, then fastest by the links' latest RTTs).
    ranked: Vec<NodeId>,
    /// The connection of each neighbour's link.
    links: HashMap<NodeId, quinn::Connection>,
    /// Each neighbour's keyword filter, as its link last had it.
    filters: HashMap<NodeId, Arc<Filter>>,
}

impl Routes {
    /// What a walker sees here: every neighbour, and those whose filter
    /// may match `keys` (a neighbour that sent none is never probed).
    pub(crate) fn walk_view(&self, keys: &[WordKey]) -> View<NodeId> {
        let matching = self
            .ranked
            .iter()
            .filter(|id| self.filters.get(id).is_some_and(|f| f.may_match(keys)))
            .copied()
            .collect();
        View {
            neighbours: self.ranked.clone(),
            matching,
        }
    }

    /// Whether `other` ranks the same neighbours the same way over the
    /// same connections.
    fn same(&self, other: &Routes) -> bool {
        self.ranked == other.ranked
            && self.filters.len() == other.filters.len()
            && self
                .filters
                .iter()
                .all(|(id, f)| other.filters.get(id).is_some_and(|o| Arc::ptr_eq(f, o)))
            && self.links.len() == other.links.len()
            && self.links.iter().all(|(id, c)| {
                other
                    .links
                    .get(id)
                    .is_some_and(|o| o.stable_id() == c.stable_id())
            })
    }
}

/// What became of a leaf's `Register`.
#[derive(Debug)]
pub(crate) enum Registration {
    /// Registered as `generation`, downloaded from at `addr`.
    Admitted {
        generation: Generation,
        addr: SocketAddr,
    },
    /// No room: these supernodes may have some.
    Full(Vec<SupernodeInfo>),
    Refused(lease::Refusal),
    /// The owner has stopped (the node is shutting down).
    Gone,
}

/// A link a mesh task asks the owner to admit.
pub(crate) struct NewLink {
    pub peer: NodeId,
    pub conn: quinn::Connection,
    /// Where the `known` lists of its `Status` frames go.
    pub gossip: mpsc::Sender<Vec<SupernodeInfo>>,
}

pub(crate) enum Command {
    // Leases.
    Register {
        id: NodeId,
        observed: SocketAddr,
        listen_port: u16,
        conn: quinn::Connection,
        reply: oneshot::Sender<Registration>,
    },
    /// A session update arrived; with a candidacy, the leaf offers itself.
    /// Answers whether the registration is still current.
    Heard {
        id: NodeId,
        generation: Generation,
        candidacy: Option<Candidacy>,
        reply: oneshot::Sender<bool>,
    },
    Release {
        id: NodeId,
        generation: Generation,
    },
    /// The connection of registration `generation` now comes from
    /// `observed` (QUIC migrated it); false in `reply` if the session
    /// must end (its new address is at its cap).
    Moved {
        id: NodeId,
        generation: Generation,
        observed: SocketAddr,
        reply: oneshot::Sender<bool>,
    },
    /// A registered leaf's session connection.
    Session {
        id: NodeId,
        reply: oneshot::Sender<Option<quinn::Connection>>,
    },
    /// Where each leaf is downloaded from, if registered.
    Addrs {
        ids: Vec<NodeId>,
        reply: oneshot::Sender<Vec<Option<SocketAddr>>>,
    },
    // Mesh.
    ForLeaves {
        with_room: bool,
        reply: oneshot::Sender<Vec<SupernodeInfo>>,
    },
    Seed {
        infos: Vec<SupernodeInfo>,
    },
    Resolved {
        dial: DialId,
        addr: SocketAddr,
        reply: oneshot::Sender<bool>,
    },
    DialFailed {
        dial: DialId,
    },
    IsLinked {
        id: NodeId,
        reply: oneshot::Sender<bool>,
    },
    Dialled {
        dial: DialId,
        link: NewLink,
        leaves: u32,
        max_leaves: u32,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    Hello {
        link: NewLink,
        ip: IpAddr,
        listen_port: u16,
        leaves: u32,
        max_leaves: u32,
        reply: oneshot::Sender<Result<(), Refusal>>,
    },
    Status {
        id: NodeId,
        link: LinkId,
        leaves: u32,
        max_leaves: u32,
        known: Vec<SupernodeInfo>,
        elected: bool,
    },
    LinkDown {
        id: NodeId,
        link: LinkId,
    },
    /// Link `link` to `id` brought its keyword filter up to date.
    Filter {
        id: NodeId,
        link: LinkId,
        filter: Arc<Filter>,
    },
    // Election.
    Reachable {
        id: NodeId,
        reply: oneshot::Sender<Option<Option<bool>>>,
    },
    Probed {
        id: NodeId,
        addr: SocketAddr,
        reachable: bool,
    },
    PromoteReply {
        id: NodeId,
        reply: PromoteReply,
    },
    HandedOver {
        to: NodeId,
    },
}

/// The state the owner task holds, made with the [`State`] and taken by
/// [`run`].
pub(crate) struct Owner {
    rx: mpsc::Receiver<Command>,
    snapshot: watch::Sender<Snapshot>,
    routes: watch::Sender<Routes>,
    leases: Leases<NodeId>,
    /// The connection of each registration.
    leaf_conns: HashMap<Generation, quinn::Connection>,
    mesh: Membership,
    /// Exactly the links of the mesh core's neighbours.
    links: HashMap<LinkId, Link>,
    election: elect::Election<NodeId>,
    /// Whether the election is run (enabled, with a socket for
    /// dial-backs, and not stepped down).
    electing: bool,
    /// Stepping down: its leaves are moving elsewhere, and a registration
    /// is answered `Full` (docs/PROTOCOL.md 12.4).
    stepping_down: bool,
    /// Something the snapshot or the routes show may have changed.
    dirty: bool,
    /// Each neighbour's keyword filter, and the link it came on.
    filters: HashMap<NodeId, (LinkId, Arc<Filter>)>,
}

/// The parts of [`State`] the owner's client side keeps.
pub(crate) struct Client {
    pub commands: mpsc::Sender<Command>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub routes: watch::Receiver<Routes>,
    /// The node's seeded RNG, once the owner has drawn its seeds: query
    /// ids come from it. Held only to draw one.
    pub query_ids: Mutex<StdRng>,
}

/// Makes the owner of supernode `id` and the client [`State`] talks to it
/// with. `rng` is the node's; the election's waits are seeded from it,
/// then query ids are drawn from it.
pub(crate) fn new(
    id: NodeId,
    config: &crate::Config,
    elected: bool,
    mut rng: StdRng,
) -> (Owner, Client) {
    let now = Instant::now();
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (snapshot_tx, snapshot_rx) = watch::channel(Snapshot {
        max_leaves: config.max_leaves,
        ..Snapshot::default()
    });
    let (routes_tx, routes_rx) = watch::channel(Routes::default());
    let owner = Owner {
        rx,
        snapshot: snapshot_tx,
        routes: routes_tx,
        leases: Leases::new(LeaseConfig {
            max_leaves: config.max_leaves,
            // The supernode caps registrations in all only (its gate caps
            // connections per address, its index entries per address).
            per_address: None,
        }),
        leaf_conns: HashMap::new(),
        mesh: Membership::new(id, config.mesh_config(), &config.peers, now),
        links: HashMap::new(),
        election: elect::Election::new(config.election.policy(), elected, rng.random(), now),
        electing: false,
        stepping_down: false,
        dirty: true,
        filters: HashMap::new(),
    };
    let client = Client {
        commands: tx,
        snapshot: snapshot_rx,
        routes: routes_rx,
        query_ids: Mutex::new(rng),
    };
    (owner, client)
}

/// A seeded RNG for a node, from OS randomness.
pub(crate) fn node_rng() -> StdRng {
    StdRng::from_os_rng()
}

/// Runs the owner of `state` until `stop` fires: its commands, the mesh
/// core's timers and the election's. `listen_port` is what our mesh
/// `Hello`s announce.
pub async fn run(state: Arc<State>, listen_port: u16, mut stop: watch::Receiver<bool>) {
    let Some(mut owner) = state.take_owner() else {
        return;
    };
    // Dial-backs go out from a socket of their own.
    let probe = match state.config.election.enabled {
        false => None,
        true => match state.endpoint().map(|e| e.sibling_client()) {
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                warn!(error = %e, "no socket for dial-backs; not electing");
                None
            }
            None => None,
        },
    };
    owner.electing = probe.is_some();
    let io = Io {
        state: &state,
        probe,
        listen_port,
    };
    loop {
        owner.handle_due(&io, Instant::now());
        owner.carry_out(&io);
        owner.publish();
        let due = owner.next_due();
        let sleep = match due {
            Some(at) => tokio::time::sleep_until(at.into()),
            None => tokio::time::sleep(Duration::from_secs(3600)),
        };
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            cmd = owner.rx.recv() => match cmd {
                Some(cmd) => owner.handle(&io, cmd),
                None => break,
            },
            _ = sleep => {}
        }
    }
    if state.elected {
        // The role ends, the leaf's endpoint stays: close what was the role's.
        owner.close_all(b"supernode stepped down");
    }
}

/// What the owner's actions need to be carried out.
pub(crate) struct Io<'a> {
    pub state: &'a Arc<State>,
    /// The dial-back socket, while electing.
    pub probe: Option<Endpoint>,
    pub listen_port: u16,
}

impl Owner {
    fn next_due(&self) -> Option<Instant> {
        let mesh = self.mesh.poll_timeout();
        let election = self
            .electing
            .then(|| self.election.poll_timeout())
            .flatten();
        [mesh, election].into_iter().flatten().min()
    }

    /// Runs the cores' timers that are due.
    fn handle_due(&mut self, io: &Io<'_>, now: Instant) {
        if self.mesh.poll_timeout().is_some_and(|t| t <= now) {
            self.reap(now);
            self.mesh.handle_timeout(now);
            self.dirty = true;
        }
        if !self.electing {
            return;
        }
        // The mesh has told us when a neighbour arrived: the promoted
        // leaf has joined once it is one.
        let joining = self.election.awaiting_join();
        if let Some(id) = joining {
            if let Some(n) = self.mesh.neighbour_info(&id) {
                self.election
                    .handle_joined(now, id, n.addr, self.leases.len());
            }
        }
        if self.election.poll_timeout().is_some_and(|t| t <= now) {
            let others: Vec<Room> = self
                .mesh
                .for_leaves(true, now)
                .iter()
                .map(|i| Room {
                    leaves: i.leaves,
                    max_leaves: i.max_leaves,
                })
                .collect();
            let known: Vec<Room> = self
                .mesh
                .loads(now, elect::NEED_SAMPLE_MAX_AGE)
                .into_iter()
                .map(|(leaves, max_leaves)| Room { leaves, max_leaves })
                .collect();
            let load = Load {
                leaves: self.leases.len(),
                max_leaves: io.state.config.max_leaves,
                others: &others,
                known: &known,
                neighbours_elected: self.mesh.neighbours_elected(),
            };
            let joining = self.election.awaiting_join();
            self.election.handle_timeout(now, &load);
            if let Some(id) = joining
                .filter(|_| self.election.awaiting_join().is_none() && !self.election.promoting())
            {
                debug!(leaf = %id.short(), "promoted leaf did not join the mesh in time");
            }
        }
    }

    /// Tells the mesh core of any link whose connection has closed, so that
    /// a new link to the same node is not measured against a dead one.
    fn reap(&mut self, now: Instant) {
        let dead: Vec<(NodeId, LinkId)> = self
            .links
            .iter()
            .filter(|(_, l)| l.conn.close_reason().is_some())
            .map(|(id, l)| (l.peer, *id))
            .collect();
        for (peer, link) in dead {
            self.mesh.handle_link_down(now, peer, link);
            self.dirty = true;
        }
    }

    /// Carries out what the cores asked for.
    fn carry_out(&mut self, io: &Io<'_>) {
        mesh::carry_out(io, &mut self.mesh, &mut self.links);
        while let Some(action) = self.election.poll_action() {
            match action {
                elect::Action::Probe { id, addr, timeout } => match &io.probe {
                    Some(probe) => election::spawn_probe(io.state, probe, id, addr, timeout),
                    None => self.election.handle_probe(Instant::now(), id, addr, false),
                },
                elect::Action::Promote { id } => {
                    election::spawn_promote(io.state, id, self.leaf_conn(&id));
                }
                elect::Action::HandOver { to, addr, count } => {
                    let movers = self
                        .leases
                        .iter()
                        .map(|(id, _)| *id)
                        .filter(|l| *l != to)
                        .take(count)
                        .filter_map(|l| self.leaf_conn(&l))
                        .collect();
                    election::spawn_hand_over(io.state, to, addr, movers);
                }
                elect::Action::StepDown => {
                    self.electing = false;
                    self.stepping_down = true;
                    let elsewhere = self.mesh.for_leaves(true, Instant::now());
                    let leaves: Vec<_> = self
                        .leases
                        .iter()
                        .filter_map(|(id, _)| self.leaf_conn(id))
                        .collect();
                    election::spawn_step_down(io.state, elsewhere, leaves);
                }
            }
        }
    }

    fn leaf_conn(&self, id: &NodeId) -> Option<quinn::Connection> {
        let generation = self.leases.get(id)?.generation;
        self.leaf_conns.get(&generation).cloned()
    }

    /// Publishes the snapshot and the routes, if anything they show may
    /// have changed. The mesh core's timers mark them changed, so the
    /// ranking follows the links' RTTs at least that often.
    fn publish(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        self.publish_routes();
        let mut neighbours: Vec<(NodeId, SocketAddr)> = self
            .mesh
            .neighbours()
            .map(|(id, n)| (*id, n.addr))
            .collect();
        neighbours.sort();
        let next = Snapshot {
            leaves: self.leases.len(),
            max_leaves: self.leases.max_leaves(),
            neighbours,
            known: self.mesh.known_count(),
        };
        self.snapshot.send_if_modified(|s| {
            let changed = *s != next;
            *s = next;
            changed
        });
    }

    /// Feeds the mesh core the links' current RTTs and publishes the
    /// neighbours as it ranks them, with their links.
    fn publish_routes(&mut self) {
        for l in self.links.values() {
            self.mesh.handle_rtt(l.peer, l.conn.rtt());
        }
        let ranked = self.mesh.ranked_neighbours();
        let links = ranked
            .iter()
            .filter_map(|id| {
                let n = self.mesh.neighbour_info(id)?;
                Some((*id, self.links.get(&n.link)?.conn.clone()))
            })
            .collect();
        let filters = ranked
            .iter()
            .filter_map(|id| {
                let n = self.mesh.neighbour_info(id)?;
                let (link, f) = self.filters.get(id)?;
                (*link == n.link).then(|| (*id, f.clone()))
            })
            .collect();
        let next = Routes {
            ranked,
            links,
            filters,
        };
        self.routes.send_if_modified(|r| {
            let changed = !r.same(&next);
            if changed {
                *r = next;
            }
            changed
        });
    }

    fn close_all(&mut self, reason: &[u8]) {
        for conn in self.leaf_conns.values() {
            conn.close(0u32.into(), reason);
        }
        for l in self.links.values() {
            l.conn.close(0u32.into(), reason);
        }
    }

    fn handle(&mut self, io: &Io<'_>, cmd: Command) {
        let now = Instant::now();
        match cmd {
            Command::Register {
                id,
                observed,
                listen_port,
                conn,
                reply,
            } => {
                let r = self.register(io, now, id, observed, listen_port, conn);
                // Published before the answer, so that whoever learns of the
                // registration from the leaf finds it counted.
                self.publish();
                let _ = reply.send(r);
            }
            Command::Heard {
                id,
                generation,
                candidacy,
                reply,
            } => {
                let current = self.leases.touch(now, &id, generation);
                if let (true, Some(c), Some(lease)) = (current, candidacy, self.leases.get(&id)) {
                    self.election.offer(id, c, lease.since, lease.addr);
                }
                let _ = reply.send(current);
            }
            Command::Release { id, generation } => {
                self.leaf_conns.remove(&generation);
                if self.leases.release(&id, generation).is_some() {
                    io.state.index.remove_owner(id);
                    self.election.withdraw(&id);
                    self.dirty = true;
                    info!(leaf = %id.short(), "leaf gone, entries dropped");
                }
            }
            Command::Moved {
                id,
                generation,
                observed,
                reply,
            } => {
                let keep = match self.leases.moved(&id, generation, observed) {
                    Ok(Some((old, new))) => {
                        info!(leaf = %id.short(), %old, %new, "leaf moved");
                        self.dirty = true;
                        true
                    }
                    Ok(None) => true,
                    Err(e) => {
                        info!(leaf = %id.short(), %observed, error = %e, "leaf moved onto a full address");
                        false
                    }
                };
                let _ = reply.send(keep);
            }
            Command::Session { id, reply } => {
                let _ = reply.send(self.leaf_conn(&id));
            }
            Command::Addrs { ids, reply } => {
                let _ = reply.send(ids.iter().map(|id| self.leases.addr(id)).collect());
            }
            Command::ForLeaves { with_room, reply } => {
                let _ = reply.send(self.mesh.for_leaves(with_room, now));
            }
            Command::Seed { infos } => {
                self.mesh.seed(infos, now);
                self.dirty = true;
            }
            Command::Resolved { dial, addr, reply } => {
                let _ = reply.send(self.mesh.handle_resolved(now, dial, addr));
            }
            Command::DialFailed { dial } => {
                // Once the core has refused the link it has counted the
                // failure itself; reporting it again is harmless.
                self.mesh.handle_dial_failed(now, dial);
                self.dirty = true;
            }
            Command::IsLinked { id, reply } => {
                self.reap(now);
                let _ = reply.send(self.mesh.is_neighbour(&id));
            }
            Command::Dialled {
                dial,
                link,
                leaves,
                max_leaves,
                reply,
            } => {
                self.reap(now);
                let id = mesh::link_id(&link.conn);
                let r = self
                    .mesh
                    .handle_dialled(now, dial, link.peer, id, leaves, max_leaves);
                self.admitted(io, id, link, &r);
                let _ = reply.send(r);
            }
            Command::Hello {
                link,
                ip,
                listen_port,
                leaves,
                max_leaves,
                reply,
            } => {
                self.reap(now);
                let id = mesh::link_id(&link.conn);
                let r =
                    self.mesh
                        .handle_hello(now, link.peer, id, ip, listen_port, leaves, max_leaves);
                self.admitted(io, id, link, &r);
                let _ = reply.send(r);
            }
            Command::Status {
                id,
                link,
                leaves,
                max_leaves,
                known,
                elected,
            } => {
                self.mesh
                    .handle_status(now, id, link, leaves, max_leaves, known, elected);
                self.dirty = true;
            }
            Command::LinkDown { id, link } => {
                self.mesh.handle_link_down(now, id, link);
                if self.filters.get(&id).is_some_and(|(l, _)| *l == link) {
                    self.filters.remove(&id);
                }
                self.dirty = true;
            }
            Command::Filter { id, link, filter } => {
                if self.links.contains_key(&link) {
                    self.filters.insert(id, (link, filter));
                    self.dirty = true;
                }
            }
            Command::Reachable { id, reply } => {
                let _ = reply.send(self.election.reachable(&id));
            }
            Command::Probed {
                id,
                addr,
                reachable,
            } => self.election.handle_probe(now, id, addr, reachable),
            Command::PromoteReply { id, reply } => {
                self.election.handle_promote_reply(now, id, reply)
            }
            Command::HandedOver { to } => self.election.handle_handover_done(now, to),
        }
    }

    /// Admits a leaf's registration in one step, replacing an older
    /// session of the same node.
    fn register(
        &mut self,
        io: &Io<'_>,
        now: Instant,
        id: NodeId,
        observed: SocketAddr,
        listen_port: u16,
        conn: quinn::Connection,
    ) -> Registration {
        if self.stepping_down {
            return Registration::Full(self.elsewhere(now));
        }
        match self.leases.register(now, id, observed, listen_port) {
            Admission::Admitted {
                generation,
                addr,
                replaced,
            } => {
                // The same leaf from a new connection (perhaps a new
                // address) replaces its old session: it is one node, known
                // by its key.
                if let Some(old) = replaced {
                    if let Some(c) = self.leaf_conns.remove(&old) {
                        c.close(0u32.into(), b"replaced by a newer connection");
                    }
                    io.state.index.remove_owner(id);
                    // Its candidacy described the old session (its address,
                    // its uptime): the new one offers its own.
                    self.election.withdraw(&id);
                }
                self.leaf_conns.insert(generation, conn);
                self.dirty = true;
                Registration::Admitted { generation, addr }
            }
            Admission::Full => Registration::Full(self.elsewhere(now)),
            Admission::Refused(r) => Registration::Refused(r),
        }
    }

    /// Where a leaf we have no room for should go: the supernodes with
    /// room. If none we know has room, all of them, least loaded first:
    /// they know others again, so the leaf walks on through the mesh
    /// instead of asking us over and over.
    fn elsewhere(&self, now: Instant) -> Vec<SupernodeInfo> {
        let elsewhere = self.mesh.for_leaves(true, now);
        if elsewhere.is_empty() {
            return self.mesh.for_leaves(false, now);
        }
        elsewhere
    }

    /// Keeps the connection of a link the mesh core has admitted.
    fn admitted(&mut self, io: &Io<'_>, id: LinkId, link: NewLink, r: &Result<(), Refusal>) {
        if r.is_ok() {
            self.links.insert(
                id,
                Link {
                    peer: link.peer,
                    conn: link.conn,
                    gossip: link.gossip,
                },
            );
            self.dirty = true;
            // Gossip and closes the core queued go out now, not at the
            // next timer.
            mesh::carry_out(io, &mut self.mesh, &mut self.links);
            self.publish();
        }
    }
}

/// The client side: what connection tasks, status and the embedding leaf
/// call. Reads of counts and neighbours come from the snapshot, of the
/// ranked neighbours and their links from the routes; anything else is a
/// command.
impl State {
    /// Sends `cmd` to the owner and waits for the answer; `None` once the
    /// owner has stopped.
    pub(crate) async fn ask<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.owner.commands.send(cmd(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Sends `cmd`, waiting for room in the queue (a task that reports
    /// faster than the owner keeps up is held back).
    pub(crate) async fn send(&self, cmd: Command) {
        let _ = self.owner.commands.send(cmd).await;
    }

    /// Sends `cmd` from where one cannot wait (a `Drop`): a full queue
    /// hands it to a task.
    pub(crate) fn tell(&self, cmd: Command) {
        match self.owner.commands.try_send(cmd) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let tx = self.owner.commands.clone();
                    rt.spawn(async move {
                        let _ = tx.send(cmd).await;
                    });
                }
            }
        }
    }

    /// What the owner published last: counts and neighbours.
    pub fn snapshot(&self) -> Snapshot {
        self.owner.snapshot.borrow().clone()
    }

    /// Leaves registered now.
    pub fn leaf_count(&self) -> usize {
        self.owner.snapshot.borrow().leaves
    }

    /// The leaves registered now and how many this supernode takes.
    pub(crate) fn load(&self) -> (u32, u32) {
        let s = self.owner.snapshot.borrow();
        (
            s.leaves.min(u32::MAX as usize) as u32,
            s.max_leaves.min(u32::MAX as usize) as u32,
        )
    }

    pub fn neighbour_count(&self) -> usize {
        self.owner.snapshot.borrow().neighbours.len()
    }

    /// The neighbours linked now and where they listen, by id.
    pub fn neighbours(&self) -> Vec<(NodeId, SocketAddr)> {
        self.owner.snapshot.borrow().neighbours.clone()
    }

    pub fn is_neighbour(&self, id: &NodeId) -> bool {
        self.owner
            .snapshot
            .borrow()
            .neighbours
            .iter()
            .any(|(n, _)| n == id)
    }

    /// The neighbours linked now, ranked for a query (least loaded first,
    /// then fastest), as the owner last published them: after any change
    /// of the neighbours, and at least every mesh maintenance interval.
    /// Read without a round trip to the owner: routing asks for it on
    /// every query that gets past the rate limit.
    pub fn ranked_neighbours(&self) -> Vec<NodeId> {
        self.owner.routes.borrow().ranked.clone()
    }

    /// The connection of neighbour `id`'s link, as last published with
    /// the ranked neighbours.
    pub(crate) fn link_conn(&self, id: &NodeId) -> Option<quinn::Connection> {
        self.owner.routes.borrow().links.get(id).cloned()
    }

    /// What a walker sees at this supernode ([`Routes::walk_view`]), as
    /// the owner last published the neighbours and their filters.
    pub(crate) fn walk_view(&self, keys: &[WordKey]) -> View<NodeId> {
        self.owner.routes.borrow().walk_view(keys)
    }

    /// A fresh query id, from the node's seeded RNG.
    pub(crate) fn query_id(&self) -> u64 {
        self.owner.query_ids.lock().expect("query id lock").random()
    }

    /// Other supernodes known now: neighbours, and those remembered but
    /// not linked (gossiped ones included, checked or not).
    pub fn known_count(&self) -> usize {
        self.owner.snapshot.borrow().known
    }

    /// Supernodes for a leaf, least loaded first; with `with_room`, only
    /// those that can take another leaf (see `Membership::for_leaves`).
    pub async fn for_leaves(&self, with_room: bool) -> Vec<SupernodeInfo> {
        self.ask(|reply| Command::ForLeaves { with_room, reply })
            .await
            .unwrap_or_default()
    }

    /// Adds supernodes known from elsewhere (an elected leaf's own list),
    /// unverified, as candidates to dial.
    pub fn seed(&self, infos: Vec<SupernodeInfo>) {
        self.tell(Command::Seed { infos });
    }

    /// Whether a leaf's dial-back succeeded: `None` if it has not offered
    /// itself, `Some(None)` if not checked yet.
    pub async fn reachable(&self, id: &NodeId) -> Option<Option<bool>> {
        let id = *id;
        self.ask(|reply| Command::Reachable { id, reply })
            .await
            .flatten()
    }
}
