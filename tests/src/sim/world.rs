//! The simulated network: every node's state, the messages between them,
//! and what each node does with a message or a timer.
//!
//! The rules are `proto`'s cores, run as the nodes run them: each leaf's
//! `attach::AttachPlanner`, and each supernode's `mesh::Membership`,
//! `elect::Election` and, for every query it handles, `hop::HopQuery`
//! with its `hop::HopNode`. This module is their driver: it carries their
//! actions as messages with a modelled delay, feeds them the answers and
//! the timers they ask for, and keeps what the world holds beside them
//! (who is online, which files each leaf has, each supernode's index).

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;
use std::rc::Rc;
use std::time::{Duration, Instant};

use std::net::SocketAddr;

use rand::rngs::StdRng;
use rand::Rng;
use servent_proto::attach::{Action, AttachConfig, AttachPlanner, CacheEntry, LinkOutcome};
use servent_proto::elect::{
    self, Action as ElectAction, Election, Load, Policy, PromoteReply, Room, Rules, STEP_DOWN_WAIT,
};
use servent_proto::filter::{Filter, LocalFilter, Update, WordKey};
use servent_proto::hop::{
    Action as HopAction, Arrival, HopNode, HopQuery, LeafQuery, Local, Lookup, Routing,
};
use servent_proto::limits::MAX_SOURCES_PER_HIT;
use servent_proto::mesh::{
    Action as MeshAction, CloseReason, DialAddr, DialId, LinkId, Membership, MeshConfig,
};
use servent_proto::msg::{Candidacy, SupernodeInfo};
use servent_proto::msg::{Hit, MeshQuery, NameVariant, Query, QueryKind, Source};
use servent_proto::path::{path, Nat, Path};
use servent_proto::rng::SplitMix64;
use servent_proto::walk::{CopyKind, View, WalkConfig};
use servent_proto::ContentHash;
use servent_proto::NodeId;

use super::dist::{self, Latency, Zipf};
use super::queue::{micros, Micros, Queue};
use super::report::{self, Report, Sample};
use super::scenario::Scenario;

/// Maps and sets that iterate in the same order in every run (no random
/// keys), and hash small integers fast.
type Map<K, V> = HashMap<K, V, BuildHasherDefault<dist::MixHasher>>;
type Set<K> = HashSet<K, BuildHasherDefault<dist::MixHasher>>;

const SEC: Micros = 1_000_000;
const MS: Micros = 1_000;

/// A `Promote` that gets no answer counts as failed after this long.
const PROMOTE_TIMEOUT: Micros = 10 * SEC;
/// How long a supernode's view of others' room (for election) is reused.
const ROOM_REFRESH: Micros = SEC;
/// Unix time at the start of a run, for the leaf cache's stamps.
const UNIX_START: u64 = 1_800_000_000;
/// `leaf/src/search.rs` ASKED_AT_ONCE.
const ASKED_AT_ONCE: usize = 3;
/// A register that gets no answer counts as failed after this long.
const REGISTER_TIMEOUT: Micros = 10 * SEC;
/// Bootstrap supernodes a new leaf is given (its `--supernode` flags).
const BOOTSTRAP: usize = 5;
/// `--peer` flags of a dedicated supernode.
const PEERS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Node {
    Super(u32),
    Leaf(u32),
}

#[derive(Debug)]
enum Msg {
    // leaf → supernode
    Register {
        leaf: u32,
        gen: u32,
    },
    Goodbye {
        leaf: u32,
        gen: u32,
    },
    Query {
        q: u32,
        leaf: u32,
    },
    Promoted {
        leaf: u32,
        sup: Option<u32>,
    },
    ListReq {
        leaf: u32,
        gen: u32,
    },
    // supernode → leaf
    Registered {
        sup: u32,
        list: Vec<SupernodeInfo>,
    },
    List {
        sup: u32,
        list: Vec<SupernodeInfo>,
    },
    Full {
        sup: u32,
        list: Vec<SupernodeInfo>,
    },
    Hits {
        q: u32,
        files: Vec<u32>,
    },
    Done {
        q: u32,
    },
    Promote {
        sup: u32,
        max_leaves: usize,
    },
    Rehome {
        sup: u32,
        list: Vec<SupernodeInfo>,
    },
    // supernode ↔ supernode
    /// A dialled supernode's `Hello`, on link `link`.
    Hello {
        from: u32,
        dial: u64,
        link: u64,
    },
    /// The answer to `Hello`: `Welcome` or `Refused`.
    Welcome {
        from: u32,
        dial: u64,
        link: u64,
        ok: bool,
    },
    Status {
        from: u32,
        link: u64,
        leaves: u32,
        max_leaves: u32,
        known: Vec<SupernodeInfo>,
        /// The sender was elected and may step down.
        elected: bool,
        /// The sender's keyword filter as its neighbours last had it
        /// (`walk` routing only; the bytes of its updates are counted
        /// when they are made).
        filter: Option<Rc<Filter>>,
    },
    /// The link's connection was closed.
    LinkDown {
        from: u32,
        link: u64,
    },
    MeshQuery(Box<MeshCopy>),
    MeshHits {
        stream: u64,
        from: u32,
        hits: Vec<Hit>,
    },
    MeshDone {
        stream: u64,
        from: u32,
    },
    MeshCancel {
        stream: u64,
    },
}

impl Msg {
    /// Whether the message is part of a query's traffic.
    fn is_query(&self) -> bool {
        matches!(
            self,
            Msg::Query { .. }
                | Msg::Hits { .. }
                | Msg::Done { .. }
                | Msg::MeshQuery(_)
                | Msg::MeshHits { .. }
                | Msg::MeshDone { .. }
                | Msg::MeshCancel { .. }
        )
    }
}

/// A copy of a query on its way to a neighbour, on a stream of its own.
#[derive(Debug)]
struct MeshCopy {
    /// The stream this copy opens at its receiver.
    stream: u64,
    /// The sender's stream its answers go back to.
    parent: u64,
    from: u32,
    query: MeshQuery,
    kind: CopyKind,
    /// The measured query it belongs to (for the tallies only).
    q: u32,
}

#[derive(Debug)]
enum Ev {
    /// `to` at incarnation `epoch` (supernode) or session `epoch` (leaf).
    Deliver {
        to: Node,
        epoch: u32,
        msg: Msg,
    },
    LeafJoin(u32),
    LeafLeave {
        leaf: u32,
        gen: u32,
    },
    LeafWake {
        leaf: u32,
        gen: u32,
    },
    RegisterTimeout {
        leaf: u32,
        gen: u32,
        addr: SocketAddr,
    },
    /// The leaf's session asks its supernode for others (after 2, 4, 8,
    /// 16 s, then every 30 s, as `leaf/src/link.rs` does).
    AskList {
        leaf: u32,
        gen: u32,
        sup: u32,
        n: u32,
    },
    /// A leaf's link to a supernode that vanished times out.
    LinkLost {
        leaf: u32,
        gen: u32,
        sup: u32,
    },
    /// A supernode notices a leaf that vanished.
    LeafGone {
        sup: u32,
        epoch: u32,
        leaf: u32,
        gen: u32,
    },
    /// A link's connection to a neighbour that vanished times out.
    NeighbourLost {
        sup: u32,
        epoch: u32,
        gone: u32,
        link: u64,
    },
    /// The mesh core's timer (`Membership::poll_timeout`).
    MeshWake {
        sup: u32,
        epoch: u32,
    },
    /// A dial to an address where no supernode answers gives up.
    DialFailed {
        sup: u32,
        epoch: u32,
        dial: u64,
    },
    /// A stepping-down supernode stops waiting for its leaves to move.
    StepDownEnd {
        sup: u32,
        epoch: u32,
    },
    /// The election core's timer (`Election::poll_timeout`).
    ElectWake {
        sup: u32,
        epoch: u32,
    },
    ProbeDone {
        sup: u32,
        epoch: u32,
        leaf: u32,
        addr: SocketAddr,
        ok: bool,
    },
    PromoteTimeout {
        sup: u32,
        epoch: u32,
        leaf: u32,
    },
    Kill,
    MassKill,
    Restart(u32),
    HopWake {
        stream: u64,
    },
    QueryStart,
    QueryEnd(u32),
    Sample,
}

struct Super {
    alive: bool,
    epoch: u32,
    from_leaf: Option<u32>,
    max_leaves: usize,
    /// Registered leaves and their session generation.
    leaves: Map<u32, u32>,
    /// Mesh membership (`proto::mesh`): known table, dials, links, gossip.
    mesh: Membership,
    mesh_wake: Option<Micros>,
    /// Its `--peer` supernodes (dedicated ones), dialled at each start.
    peers: Vec<u32>,
    /// keyword → (file, leaf).
    index: Map<u32, Vec<(u32, u32)>>,
    /// The keyword filter of `index` (`proto::filter`), kept for `walk`
    /// routing only.
    filter: LocalFilter,
    /// The filter as the neighbours were last sent it.
    filter_sent: Option<Rc<Filter>>,
    /// Each neighbour's filter, as its last `Status` carried it.
    neighbour_filters: Map<u32, Rc<Filter>>,
    /// Seen-set, neighbours' query buckets and fair forwarding (`proto::hop`).
    hop: HopNode<u32>,
    /// Election (`proto::elect::Election`); none when the scenario turns it off.
    election: Option<Election<u32>>,
    elect_wake: Option<Micros>,
    /// The leaf a `Promote` was sent to, until it answers.
    asked: Option<u32>,
    /// Stepping down: its leaves are moving (each leaves once registered
    /// elsewhere); it goes once they have, or at `STEP_DOWN_WAIT`.
    stepping: bool,
    /// Others' room as `for_leaves` last gave it, the loads of every
    /// supernode known (`Membership::loads`), and when.
    rooms: (Micros, Vec<Room>, Vec<Room>),
    msgs_sec: u64,
    msgs_in_sec: u64,
    /// Query messages received for the current query window.
    query_msgs: u64,
}

impl Super {
    fn new(
        epoch: u32,
        from_leaf: Option<u32>,
        max_leaves: usize,
        mesh: Membership,
        peers: Vec<u32>,
        election: Option<Election<u32>>,
        hop_seed: u64,
    ) -> Self {
        Self {
            alive: true,
            epoch,
            from_leaf,
            max_leaves,
            leaves: Map::default(),
            mesh,
            mesh_wake: None,
            peers,
            index: Map::default(),
            filter: LocalFilter::default(),
            filter_sent: None,
            neighbour_filters: Map::default(),
            hop: {
                // What every supernode accepts from each neighbour by default.
                let node = supernode::Config::default();
                let mut hop = HopNode::new(node.hop, node.mesh_query_rate, node.mesh_query_burst);
                hop.seed(hop_seed);
                hop
            },
            election,
            elect_wake: None,
            asked: None,
            stepping: false,
            rooms: (0, Vec::new(), Vec::new()),
            msgs_sec: 0,
            msgs_in_sec: 0,
            query_msgs: 0,
        }
    }
}

/// A session of a leaf: tried, then registered.
struct Sess {
    addr: SocketAddr,
    sup: u32,
    registered: bool,
}

struct Leaf {
    online: bool,
    gen: u32,
    /// A new address at each session: nothing keys a leaf by it.
    ip: u32,
    /// Where it serves in this session, as hits name it.
    addr: String,
    /// Its NAT, for the path a download from it would take; the leaf is
    /// reachable (a dial-back gets through) when it is `Nat::Open`.
    nat: Nat,
    capable: bool,
    upload_kbps: u32,
    files: Vec<u32>,
    /// Its `--supernode` addresses.
    boot: Vec<SocketAddr>,
    /// The attach planner of the session now (`proto::attach`).
    planner: Option<Box<AttachPlanner<SocketAddr>>>,
    /// Its supernode cache between sessions.
    cache: Vec<CacheEntry<SocketAddr>>,
    sessions: Vec<Sess>,
    role: Option<u32>,
    orphan_since: Option<Micros>,
    wake_at: Option<Micros>,
    promoted_at: Vec<Micros>,
}

impl Leaf {
    /// The supernodes it is registered with.
    fn links(&self) -> impl Iterator<Item = u32> + '_ {
        self.sessions.iter().filter(|x| x.registered).map(|x| x.sup)
    }
}

#[derive(Clone, Copy)]
enum Up {
    Leaf { q: u32, leaf: u32 },
    Mesh { node: u32, epoch: u32, parent: u64 },
}

/// One query at one supernode: its hop core, where its answers go, and
/// the copies it forwarded (neighbour, stream there).
struct Stream {
    /// The measured query it belongs to (for the tallies only).
    q: u32,
    node: u32,
    epoch: u32,
    query: HopQuery<u32>,
    up: Up,
    mesh: Query,
    children: Vec<(u32, u64)>,
    wake_at: Option<Micros>,
}

struct QueryRec {
    start: Micros,
    /// The leaf that asked, and the one holder of a rare file.
    asker: u32,
    holder: Option<u32>,
    kw: u32,
    rare: bool,
    expected: usize,
    found: Set<u32>,
    first_hit: Option<Micros>,
    outstanding: usize,
    done: bool,
    unattached: bool,
    /// Messages of its traffic (the leaf's, the mesh copies', their hits
    /// and ends).
    msgs: u64,
}

pub struct World {
    sc: Scenario,
    q: Queue<Ev>,
    rng: StdRng,
    /// Access delays (`dist::Latency`), by dedicated supernode and by leaf.
    super_delay: Vec<u32>,
    leaf_delay: Vec<u32>,
    policy: Policy,
    supers: Vec<Super>,
    mesh_config: MeshConfig,
    next_link: u64,
    dedicated: usize,
    leaves: Vec<Leaf>,
    zipf: Zipf,
    /// Online leaves holding each popular file.
    holders: Vec<u32>,
    online: Vec<u32>,
    online_pos: Vec<u32>,
    streams: Map<u64, Stream>,
    next_stream: u64,
    queries: Vec<QueryRec>,
    measure_from: Micros,
    end: Micros,
    // Tallies.
    query_traffic: u64,
    mesh_copies: u64,
    max_msgs_per_sec: u64,
    /// Copies the origin's fair share of a link did not allow.
    unforwarded: u64,
    /// The walkers' settings, when the scenario routes by `walk`.
    walk: Option<WalkConfig>,
    /// Each keyword's filter key (`WordKey::of("k<n>")`), made once.
    kw_keys: Vec<WordKey>,
    /// Bytes of filter updates sent to neighbours after warm-up (a whole
    /// filter or a patch of 4 bytes a bit, times the neighbours).
    filter_bytes: u64,
    /// Print each sample to stderr as the run goes.
    pub progress: bool,
    samples: Vec<Sample>,
    msgs_since_sample: u64,
    orphaned: Vec<f64>,
    promotions: u64,
    step_downs: u64,
    kills: u64,
    sessions: u64,
    online_sum: f64,
}

const NOT_ONLINE: u32 = u32::MAX;

/// Where a leaf serves in the session that drew address `ip`.
fn leaf_sock(ip: u32) -> SocketAddr {
    SocketAddr::from((std::net::Ipv4Addr::from(ip | 0x0100_0000), 7401))
}

impl World {
    pub fn new(sc: Scenario) -> Self {
        let walk = match sc.routing() {
            Routing::Walk(w) => Some(w),
            Routing::Flood => None,
        };
        let kw_keys = match walk {
            Some(_) => (0..keywords(&sc))
                .map(|k| WordKey::of(&format!("k{k}")))
                .collect(),
            None => Vec::new(),
        };
        let mut rng = dist::rng(sc.seed, 0);
        let latency = Latency {
            seed: sc.seed,
            median_ms: sc.rtt_median_ms,
            sigma: sc.rtt_sigma,
            floor_ms: 1.0,
        };
        let scale = |d: Duration| d.mul_f64(sc.election_time_scale.max(0.0));
        let p = Policy::default();
        let policy = Policy {
            rules: Rules::from_name(&sc.election_rules).unwrap_or_default(),
            round: scale(p.round),
            overload_for: scale(p.overload_for),
            jitter: scale(p.jitter),
            cooldown: scale(p.cooldown),
            min_uptime: scale(p.min_uptime),
            drain_for: scale(p.drain_for),
            ..p
        };
        // The rules before need was tracked had no hold on a leaf's promotions.
        let policy = match policy.rules {
            Rules::Overload => Policy {
                repromote_after: Duration::ZERO,
                ..policy
            },
            Rules::Need => policy,
        };
        let zipf = Zipf::new(sc.catalog_files, sc.zipf_exponent);
        let mut leaves = Vec::with_capacity(sc.leaves);
        for i in 0..sc.leaves {
            let mut files = Vec::with_capacity(sc.popular_per_leaf + sc.rare_per_leaf);
            for _ in 0..sc.popular_per_leaf {
                let f = zipf.sample(&mut rng) as u32;
                if !files.contains(&f) {
                    files.push(f);
                }
            }
            for j in 0..sc.rare_per_leaf {
                files.push((sc.catalog_files + i * sc.rare_per_leaf + j) as u32);
            }
            let capable = rng.random_bool(sc.capable_share);
            let reachable = !rng.random_bool(sc.unreachable_share);
            // Drawn apart from the world's generator, so that every other
            // figure stays what it was for a seed.
            let symmetric =
                SplitMix64::new(sc.seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
                    .next_f64()
                    < sc.symmetric_share;
            leaves.push(Leaf {
                online: false,
                gen: 0,
                ip: 0,
                addr: String::new(),
                nat: match (reachable, symmetric) {
                    (true, _) => Nat::Open,
                    (false, true) => Nat::Symmetric,
                    (false, false) => Nat::PortRestricted,
                },
                capable,
                upload_kbps: rng.random_range(1_000..100_000),
                files,
                boot: Vec::new(),
                planner: None,
                cache: Vec::new(),
                sessions: Vec::new(),
                role: None,
                orphan_since: None,
                wake_at: None,
                promoted_at: Vec::new(),
            });
        }
        let mesh_config = MeshConfig {
            target_neighbors: sc.target_neighbors,
            max_neighbors: sc.max_neighbors,
            ..MeshConfig::default()
        };
        let base = Instant::now();
        let mut supers = Vec::with_capacity(sc.supernodes);
        for s in 0..sc.supernodes as u32 {
            // `--peer` flags: a few other dedicated supernodes, by name
            // (so that they resolve to wherever those are now).
            let mut peers = Vec::new();
            for _ in 0..PEERS.min(sc.supernodes - 1) {
                let p = rng.random_range(0..sc.supernodes) as u32;
                if p != s && !peers.contains(&p) {
                    peers.push(p);
                }
            }
            let boot: Vec<String> = peers.iter().map(|&p| addr_of(p, 0).to_string()).collect();
            let mesh = Membership::new(node_id(1, s), mesh_config.clone(), &boot, base);
            let election = sc.election.then(|| {
                Election::new(
                    policy.clone(),
                    false,
                    u64::from(s) ^ sc.seed.rotate_left(32),
                    base,
                )
            });
            let hop_seed = hop_seed(sc.seed, s, 0);
            supers.push(Super::new(
                0,
                None,
                sc.max_leaves,
                mesh,
                peers,
                election,
                hop_seed,
            ));
        }
        let super_delay = (0..sc.supernodes as u64)
            .map(|s| latency.access_us(s))
            .collect();
        let leaf_delay = (0..sc.leaves as u64)
            .map(|l| latency.access_us((1 << 40) | l))
            .collect();
        let measure_from = mins(sc.warmup_minutes);
        let end = mins(sc.minutes);
        Self {
            holders: vec![0; sc.catalog_files],
            online_pos: vec![NOT_ONLINE; sc.leaves],
            dedicated: sc.supernodes,
            sc,
            q: Queue::new(base),
            mesh_config,
            next_link: 0,
            rng,
            super_delay,
            leaf_delay,
            policy,
            supers,
            leaves,
            zipf,
            online: Vec::new(),
            streams: Map::default(),
            next_stream: 1,
            queries: Vec::new(),
            measure_from,
            end,
            query_traffic: 0,
            mesh_copies: 0,
            walk,
            kw_keys,
            filter_bytes: 0,
            max_msgs_per_sec: 0,
            unforwarded: 0,
            progress: false,
            samples: Vec::new(),
            msgs_since_sample: 0,
            orphaned: Vec::new(),
            promotions: 0,
            step_downs: 0,
            kills: 0,
            sessions: 0,
            online_sum: 0.0,
        }
    }

    /// Runs the scenario to its end and reports.
    pub fn run(mut self) -> (Report, Vec<Sample>) {
        let started = Instant::now();
        self.start();
        while let Some(ev) = self.q.pop(self.end) {
            self.handle(ev);
        }
        let wall = started.elapsed().as_secs_f64();
        let report = self.report(wall);
        (report, self.samples)
    }

    fn start(&mut self) {
        // The dedicated supernodes start meshed with a few others each, as
        // from their `--peer` flags.
        for s in 0..self.dedicated as u32 {
            self.boot_super(s);
        }
        // Leaves join over the first half of the warm-up.
        let spread = (self.measure_from / 2).max(1);
        for l in 0..self.leaves.len() as u32 {
            let at = self.rng.random_range(0..spread);
            self.q.at(at, Ev::LeafJoin(l));
        }
        if self.sc.supernode_kill_share_per_hour > 0.0 {
            self.schedule_kill();
        }
        if let Some(m) = self.sc.mass_kill_at_min {
            self.q.at(mins(m), Ev::MassKill);
        }
        let n = self.sc.queries.max(1) as f64;
        let window = (self.end - self.measure_from) as f64;
        let mut t = self.measure_from as f64;
        // Leave the last leaf timeout inside the run, so every query ends.
        let last = self.end.saturating_sub(self.sc.leaf_timeout_ms * MS + SEC) as f64;
        for _ in 0..self.sc.queries {
            t += dist::exponential(&mut self.rng, window / n);
            if t > last {
                t = self.measure_from as f64
                    + self.rng.random::<f64>() * (last - self.measure_from as f64).max(1.0);
            }
            self.q.at(t as Micros, Ev::QueryStart);
        }
        self.q.at(0, Ev::Sample);
    }

    fn boot_super(&mut self, s: u32) {
        self.drive_mesh(s);
        self.drive_election(s);
    }

    fn schedule_kill(&mut self) {
        let per_hour = self.sc.supernode_kill_share_per_hour * self.dedicated as f64;
        let mean = 3600.0 * SEC as f64 / per_hour;
        let gap = dist::exponential(&mut self.rng, mean) as Micros;
        self.q.after(gap.max(1), Ev::Kill);
    }

    /// A node's access delay: an elected supernode is its leaf's host.
    fn access(&self, n: Node) -> u64 {
        let leaf = match n {
            Node::Leaf(l) => l,
            Node::Super(s) => match self.supers[s as usize].from_leaf {
                Some(l) => l,
                None => return u64::from(self.super_delay[s as usize]),
            },
        };
        u64::from(self.leaf_delay[leaf as usize])
    }

    fn rtt(&self, a: Node, b: Node) -> Micros {
        self.access(a) + self.access(b)
    }

    fn now(&self) -> Micros {
        self.q.now()
    }

    fn measuring(&self) -> bool {
        self.now() >= self.measure_from
    }

    /// Sends `msg` from `from` to `to`, arriving `rtts` round trips later
    /// (half of one for a message, 1.5 for a handshake first), unless lost.
    fn send_after(&mut self, from: Node, to: Node, msg: Msg, rtts: f64) {
        let query = msg.is_query();
        if query {
            self.query_traffic += 1;
            let q = match &msg {
                Msg::Query { q, .. } | Msg::Hits { q, .. } | Msg::Done { q } => Some(*q),
                Msg::MeshQuery(mq) => Some(mq.q),
                Msg::MeshHits { stream, .. }
                | Msg::MeshDone { stream, .. }
                | Msg::MeshCancel { stream } => self.streams.get(stream).map(|st| st.q),
                _ => None,
            };
            if let Some(r) = q.and_then(|q| self.queries.get_mut(q as usize)) {
                r.msgs += 1;
            }
            if matches!(msg, Msg::MeshQuery(_)) {
                self.mesh_copies += 1;
            }
        }
        if self.sc.loss > 0.0 && query && self.rng.random_bool(self.sc.loss) {
            return;
        }
        let epoch = match to {
            Node::Super(s) => self.supers[s as usize].epoch,
            Node::Leaf(l) => self.leaves[l as usize].gen,
        };
        let delay = (self.rtt(from, to) as f64 * rtts) as Micros;
        self.q.after(delay.max(1), Ev::Deliver { to, epoch, msg });
    }

    fn send(&mut self, from: Node, to: Node, msg: Msg) {
        self.send_after(from, to, msg, 0.5);
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { to, epoch, msg } => self.deliver(to, epoch, msg),
            Ev::LeafJoin(l) => self.leaf_join(l),
            Ev::LeafLeave { leaf, gen } => {
                if self.session(leaf, gen) {
                    self.leaf_leave(leaf);
                }
            }
            Ev::LeafWake { leaf, gen } => {
                if self.session(leaf, gen) {
                    self.leaves[leaf as usize].wake_at = None;
                    let instant = self.q.instant();
                    if let Some(p) = self.leaves[leaf as usize].planner.as_mut() {
                        p.handle_timeout(instant);
                    }
                    self.drive_leaf(leaf);
                }
            }
            Ev::RegisterTimeout { leaf, gen, addr } => {
                let waiting = self.session(leaf, gen)
                    && self.leaves[leaf as usize]
                        .sessions
                        .iter()
                        .any(|x| x.addr == addr && !x.registered);
                if waiting {
                    self.session_ended(leaf, addr, LinkOutcome::Failed, false);
                }
            }
            Ev::AskList { leaf, gen, sup, n } => {
                if self.session(leaf, gen) && self.registered_addr(leaf, sup).is_some() {
                    self.send(
                        Node::Leaf(leaf),
                        Node::Super(sup),
                        Msg::ListReq { leaf, gen },
                    );
                    let next = if n < 3 { (4 << n) * SEC } else { 30 * SEC };
                    self.q.after(
                        next,
                        Ev::AskList {
                            leaf,
                            gen,
                            sup,
                            n: n + 1,
                        },
                    );
                }
            }
            Ev::LinkLost { leaf, gen, sup } => {
                if self.session(leaf, gen) {
                    if let Some(addr) = self.registered_addr(leaf, sup) {
                        self.session_ended(leaf, addr, LinkOutcome::Failed, true);
                    }
                }
            }
            Ev::LeafGone {
                sup,
                epoch,
                leaf,
                gen,
            } => {
                if self.up(sup, epoch) {
                    self.drop_leaf(sup, leaf, gen);
                }
            }
            Ev::NeighbourLost {
                sup,
                epoch,
                gone,
                link,
            } => {
                if self.up(sup, epoch) {
                    self.link_down(sup, gone, link);
                }
            }
            Ev::MeshWake { sup, epoch } => {
                if self.up(sup, epoch) {
                    let instant = self.q.instant();
                    let me = &mut self.supers[sup as usize];
                    me.mesh_wake = None;
                    me.mesh.handle_timeout(instant);
                    self.drive_mesh(sup);
                }
            }
            Ev::DialFailed { sup, epoch, dial } => {
                if self.up(sup, epoch) {
                    let instant = self.q.instant();
                    self.supers[sup as usize]
                        .mesh
                        .handle_dial_failed(instant, DialId(dial));
                    self.drive_mesh(sup);
                }
            }
            Ev::StepDownEnd { sup, epoch } => {
                if self.up(sup, epoch) {
                    self.super_down(sup, true);
                }
            }
            Ev::ElectWake { sup, epoch } => {
                if self.up(sup, epoch) && !self.supers[sup as usize].stepping {
                    self.supers[sup as usize].elect_wake = None;
                    self.elect_timeout(sup);
                }
            }
            Ev::ProbeDone {
                sup,
                epoch,
                leaf,
                addr,
                ok,
            } => {
                if self.up(sup, epoch) {
                    let instant = self.q.instant();
                    if let Some(e) = self.supers[sup as usize].election.as_mut() {
                        e.handle_probe(instant, leaf, addr, ok);
                    }
                    self.drive_election(sup);
                }
            }
            Ev::PromoteTimeout { sup, epoch, leaf } => {
                if self.up(sup, epoch) && self.supers[sup as usize].asked == Some(leaf) {
                    self.promote_answered(sup, leaf, PromoteReply::Failed);
                }
            }
            Ev::Kill => {
                self.schedule_kill();
                self.kill_random(1);
            }
            Ev::MassKill => {
                let alive = self.supers.iter().filter(|s| s.alive).count();
                let n = (alive as f64 * self.sc.mass_kill_share).round() as usize;
                self.kill_random(n);
            }
            Ev::Restart(s) => {
                let epoch = self.supers[s as usize].epoch + 1;
                self.supers[s as usize].epoch = epoch;
                let peers = std::mem::take(&mut self.supers[s as usize].peers);
                let mesh = self.membership(self.sup_id(s), &peers);
                let election = self.election(s, epoch, false);
                let hop_seed = hop_seed(self.sc.seed, s, epoch);
                self.supers[s as usize] = Super::new(
                    epoch,
                    None,
                    self.sc.max_leaves,
                    mesh,
                    peers,
                    election,
                    hop_seed,
                );
                self.boot_super(s);
            }
            Ev::HopWake { stream } => self.hop_wake(stream),
            Ev::QueryStart => self.query_start(),
            Ev::QueryEnd(q) => self.query_end(q),
            Ev::Sample => {
                self.sample();
                self.q
                    .after((self.sc.sample_secs * SEC as f64) as Micros, Ev::Sample);
            }
        }
    }

    fn session(&self, leaf: u32, gen: u32) -> bool {
        let l = &self.leaves[leaf as usize];
        l.online && l.gen == gen
    }

    fn up(&self, sup: u32, epoch: u32) -> bool {
        let s = &self.supers[sup as usize];
        s.alive && s.epoch == epoch
    }

    fn count_msg(&mut self, sup: u32, query: bool) {
        if !self.measuring() {
            return;
        }
        let sec = self.now() / SEC;
        let s = &mut self.supers[sup as usize];
        if s.msgs_sec != sec {
            s.msgs_sec = sec;
            s.msgs_in_sec = 0;
        }
        s.msgs_in_sec += 1;
        if query {
            s.query_msgs += 1;
        }
        self.max_msgs_per_sec = self.max_msgs_per_sec.max(s.msgs_in_sec);
        self.msgs_since_sample += 1;
    }

    fn deliver(&mut self, to: Node, epoch: u32, msg: Msg) {
        match to {
            Node::Super(s) => {
                if !self.up(s, epoch) {
                    return;
                }
                self.count_msg(s, msg.is_query());
                self.at_super(s, msg);
            }
            Node::Leaf(l) => {
                if !self.session(l, epoch) {
                    return;
                }
                self.at_leaf(l, msg);
            }
        }
    }

    // ---- leaves -------------------------------------------------------

    fn leaf_join(&mut self, l: u32) {
        let now = self.now();
        let instant = self.q.instant();
        let unix = self.unix();
        if self.leaves[l as usize].boot.is_empty() {
            // Its `--supernode` flags: addresses that stay as they were
            // given, even after those supernodes move.
            let mut boot = Vec::new();
            for _ in 0..BOOTSTRAP {
                let s = self.rng.random_range(0..self.dedicated) as u32;
                let a = self.sup_addr(s);
                if !boot.contains(&a) {
                    boot.push(a);
                }
            }
            self.leaves[l as usize].boot = boot;
        }
        // With the overload rules, the leaf as it was before them: extra
        // links up to 500 permille, no extra tries when orphaned.
        let (extra, orphan_extra_tries) = match self.policy.rules {
            Rules::Need => {
                let d = AttachConfig::default();
                (d.extra_link_max_load_permille, d.orphan_extra_tries)
            }
            Rules::Overload => (500, 0),
        };
        let cfg = AttachConfig {
            max_cached: self.sc.leaf_table,
            extra_link_max_load_permille: self.sc.extra_link_max_load_permille.unwrap_or(extra),
            orphan_extra_tries,
            ..AttachConfig::default()
        };
        let id = leaf_id(l);
        let leaf = &mut self.leaves[l as usize];
        if leaf.online {
            return;
        }
        leaf.online = true;
        leaf.gen += 1;
        leaf.ip = self.rng.random();
        leaf.addr = leaf_sock(leaf.ip).to_string();
        leaf.sessions.clear();
        leaf.orphan_since = None;
        leaf.wake_at = None;
        let cached = std::mem::take(&mut leaf.cache);
        leaf.planner = Some(Box::new(AttachPlanner::new(
            cfg,
            id,
            self.sc.attach,
            leaf.boot.clone(),
            cached,
            instant,
            unix,
        )));
        let gen = leaf.gen;
        self.sessions += 1;
        self.online_pos[l as usize] = self.online.len() as u32;
        self.online.push(l);
        for f in &self.leaves[l as usize].files {
            if let Some(h) = self.holders.get_mut(*f as usize) {
                *h += 1;
            }
        }
        let minutes = dist::lognormal(
            &mut self.rng,
            self.sc.session_median_min,
            self.sc.session_sigma,
        );
        let length = mins(minutes).max(SEC);
        self.q.at(now + length, Ev::LeafLeave { leaf: l, gen });
        self.drive_leaf(l);
    }

    fn leaf_leave(&mut self, l: u32) {
        let vanish = self.rng.random_bool(self.sc.vanish_share);
        let unix = self.unix();
        let (gen, links, role) = {
            let leaf = &mut self.leaves[l as usize];
            leaf.online = false;
            // What the next session starts from: the cache on disk.
            if let Some(p) = leaf.planner.take() {
                leaf.cache = p.cache_entries(unix);
            }
            let links = leaf.links().collect::<Vec<u32>>();
            leaf.sessions.clear();
            (leaf.gen, links, leaf.role.take())
        };
        // Out of the online list (swap-remove keeps it dense).
        let pos = self.online_pos[l as usize] as usize;
        let last = self.online.pop().expect("online leaf listed");
        if last != l {
            self.online[pos] = last;
            self.online_pos[last as usize] = pos as u32;
        }
        self.online_pos[l as usize] = NOT_ONLINE;
        for f in &self.leaves[l as usize].files {
            if let Some(h) = self.holders.get_mut(*f as usize) {
                *h -= 1;
            }
        }
        for s in links {
            if vanish {
                let epoch = self.supers[s as usize].epoch;
                let at = self.sc.loss_detect_ms * MS;
                self.q.after(
                    at,
                    Ev::LeafGone {
                        sup: s,
                        epoch,
                        leaf: l,
                        gen,
                    },
                );
            } else {
                self.send(Node::Leaf(l), Node::Super(s), Msg::Goodbye { leaf: l, gen });
            }
        }
        if let Some(s) = role {
            self.super_down(s, !vanish);
        }
        let minutes = dist::lognormal(&mut self.rng, self.sc.offline_median_min, 1.0);
        let gap = mins(minutes).max(SEC);
        self.q.after(gap, Ev::LeafJoin(l));
    }

    /// Unix seconds, as the leaf's cache stamps entries.
    fn unix(&self) -> u64 {
        UNIX_START + self.now() / SEC
    }

    /// Supernode `s`'s address now: a restarted one is somewhere new.
    fn sup_addr(&self, s: u32) -> SocketAddr {
        addr_of(s, self.supers[s as usize].epoch)
    }

    /// The supernode that answers at `addr` now (and has the id
    /// `expect`, if given): a dial there reaches it.
    fn listening(&self, addr: SocketAddr, expect: Option<NodeId>) -> Option<u32> {
        let s = slot_of(addr);
        let sup = self.supers.get(s as usize)?;
        (sup.alive && self.sup_addr(s) == addr && expect.is_none_or(|id| id == self.sup_id(s)))
            .then_some(s)
    }

    fn sup_id(&self, s: u32) -> NodeId {
        match self.supers[s as usize].from_leaf {
            Some(l) => leaf_id(l),
            None => node_id(1, s),
        }
    }

    /// Carries out what leaf `l`'s attach planner asks for, until it asks
    /// for nothing more, and sets its timer.
    fn drive_leaf(&mut self, l: u32) {
        let instant = self.q.instant();
        let unix = self.unix();
        for _ in 0..1000 {
            let Some(action) = self.leaves[l as usize]
                .planner
                .as_mut()
                .and_then(|p| p.poll_action())
            else {
                break;
            };
            match action {
                Action::Connect { addr, expected } => {
                    let gen = self.leaves[l as usize].gen;
                    let s = slot_of(addr);
                    self.leaves[l as usize].sessions.push(Sess {
                        addr,
                        sup: s,
                        registered: false,
                    });
                    // Nobody there: the handshake gives up (`CONNECT_TIMEOUT`);
                    // else the register waits for its answer.
                    let up = self.listening(addr, expected) == Some(s);
                    let timeout = if up {
                        REGISTER_TIMEOUT
                    } else {
                        micros(servent_net::CONNECT_TIMEOUT)
                    };
                    self.q
                        .after(timeout, Ev::RegisterTimeout { leaf: l, gen, addr });
                    if up {
                        // A QUIC handshake, then the registration.
                        self.send_after(
                            Node::Leaf(l),
                            Node::Super(s),
                            Msg::Register { leaf: l, gen },
                            1.5,
                        );
                    }
                }
                Action::Stop { addr } => {
                    let gen = self.leaves[l as usize].gen;
                    let leaf = &mut self.leaves[l as usize];
                    if let Some(i) = leaf.sessions.iter().position(|x| x.addr == addr) {
                        let sess = leaf.sessions.remove(i);
                        if sess.registered {
                            self.send(
                                Node::Leaf(l),
                                Node::Super(sess.sup),
                                Msg::Goodbye { leaf: l, gen },
                            );
                        }
                    }
                    if let Some(p) = self.leaves[l as usize].planner.as_mut() {
                        p.handle_link_ended(instant, unix, &addr, LinkOutcome::Stopped);
                    }
                }
                Action::SaveCache(_) => {}
            }
        }
        let leaf = &mut self.leaves[l as usize];
        if let Some(t) = leaf.planner.as_ref().and_then(|p| p.poll_timeout()) {
            let gen = leaf.gen;
            self.q
                .arm(&mut leaf.wake_at, t, Ev::LeafWake { leaf: l, gen });
        }
    }

    /// The session to `s` that is being tried (not yet registered).
    fn trying(&self, l: u32, s: u32) -> Option<SocketAddr> {
        self.leaves[l as usize]
            .sessions
            .iter()
            .find(|x| x.sup == s && !x.registered)
            .map(|x| x.addr)
    }

    /// Ends leaf `l`'s session at `addr` with `outcome`; `died`: its
    /// supernode vanished (the leaf may now be orphaned).
    fn session_ended(&mut self, l: u32, addr: SocketAddr, outcome: LinkOutcome, died: bool) {
        let now = self.now();
        let instant = self.q.instant();
        let unix = self.unix();
        let measuring = self.measuring();
        let leaf = &mut self.leaves[l as usize];
        let Some(i) = leaf.sessions.iter().position(|x| x.addr == addr) else {
            return;
        };
        let sess = leaf.sessions.remove(i);
        let orphaned = sess.registered && leaf.links().next().is_none();
        if died && orphaned && leaf.orphan_since.is_none() && measuring {
            leaf.orphan_since = Some(now);
        }
        if let Some(p) = leaf.planner.as_mut() {
            p.handle_link_ended(instant, unix, &addr, outcome);
        }
        self.drive_leaf(l);
    }

    fn registered_addr(&self, l: u32, s: u32) -> Option<SocketAddr> {
        self.leaves[l as usize]
            .sessions
            .iter()
            .find(|x| x.sup == s && x.registered)
            .map(|x| x.addr)
    }

    fn at_leaf(&mut self, l: u32, msg: Msg) {
        let now = self.now();
        let instant = self.q.instant();
        let unix = self.unix();
        match msg {
            Msg::Registered { sup, list } => {
                let gen = self.leaves[l as usize].gen;
                let Some(addr) = self.trying(l, sup) else {
                    // Given up on meanwhile: say goodbye.
                    self.send(
                        Node::Leaf(l),
                        Node::Super(sup),
                        Msg::Goodbye { leaf: l, gen },
                    );
                    return;
                };
                let id = self.sup_id(sup);
                let infos = list;
                let leaf = &mut self.leaves[l as usize];
                if let Some(x) = leaf.sessions.iter_mut().find(|x| x.addr == addr) {
                    x.registered = true;
                }
                if let Some(since) = leaf.orphan_since.take() {
                    self.orphaned.push((now - since) as f64 / SEC as f64);
                }
                let leaf = &mut self.leaves[l as usize];
                if let Some(p) = leaf.planner.as_mut() {
                    p.handle_link_up(instant, unix, &addr, id);
                    p.handle_learned(instant, unix, infos);
                }
                self.q.after(
                    2 * SEC,
                    Ev::AskList {
                        leaf: l,
                        gen,
                        sup,
                        n: 0,
                    },
                );
                self.drive_leaf(l);
            }
            Msg::List { sup, list } if self.registered_addr(l, sup).is_some() => {
                let infos = list;
                if let Some(p) = self.leaves[l as usize].planner.as_mut() {
                    p.handle_learned(instant, unix, infos);
                }
                self.drive_leaf(l);
            }
            Msg::Full { sup, list } => {
                if let Some(addr) = self.trying(l, sup) {
                    let infos = list;
                    self.session_ended(l, addr, LinkOutcome::Full(infos), false);
                }
            }
            Msg::Hits { q, files } => {
                let rec = &mut self.queries[q as usize];
                if rec.done {
                    return;
                }
                if rec.first_hit.is_none() && !files.is_empty() {
                    rec.first_hit = Some(now);
                }
                rec.found.extend(files);
            }
            Msg::Done { q } => {
                let rec = &mut self.queries[q as usize];
                rec.outstanding = rec.outstanding.saturating_sub(1);
                if rec.outstanding == 0 {
                    self.query_end(q);
                }
            }
            Msg::Promote { sup, max_leaves } => {
                let leaf = &self.leaves[l as usize];
                let accept = leaf.role.is_none()
                    && leaf.links().any(|x| x == sup)
                    && self.sc.election
                    && self.may_take_role(l);
                let answer = if accept {
                    Some(self.promote_leaf(l, sup, max_leaves))
                } else {
                    None
                };
                self.send(
                    Node::Leaf(l),
                    Node::Super(sup),
                    Msg::Promoted {
                        leaf: l,
                        sup: answer,
                    },
                );
            }
            Msg::Rehome { sup, list } => {
                if self.registered_addr(l, sup).is_none() {
                    return;
                }
                let (from, infos) = (self.sup_id(sup), list);
                if let Some(p) = self.leaves[l as usize].planner.as_mut() {
                    p.handle_rehome(instant, unix, from, infos);
                }
                // The session stays until the planner stops it, once another
                // is registered (make before break).
                self.drive_leaf(l);
            }
            _ => {}
        }
    }

    /// Whether leaf `l` may take the role (and so offers itself): at most
    /// once per `repromote_after` (`elect::may_take_role`).
    fn may_take_role(&self, l: u32) -> bool {
        let now = self.now();
        let since = self.leaves[l as usize]
            .promoted_at
            .last()
            .map(|&t| Duration::from_micros(now - t));
        elect::may_take_role(since, &self.policy)
    }

    /// The leaf takes the supernode role on its own endpoint.
    fn promote_leaf(&mut self, l: u32, promoter: u32, max_leaves: usize) -> u32 {
        let now = self.now();
        let instant = self.q.instant();
        let unix = self.unix();
        let s = self.supers.len() as u32;
        let from = self.sup_id(promoter);
        let promotion = self.leaves[l as usize]
            .planner
            .as_ref()
            .map(|p| p.promotion(unix, from));
        let promotion_known = promotion.as_ref().map(|p| p.known.clone());
        let leaf = &mut self.leaves[l as usize];
        leaf.role = Some(s);
        leaf.promoted_at.push(now);
        self.promotions += 1;
        // Mesh first with the supernodes it is linked to, the promoter first.
        let peers: Vec<u32> = promotion
            .map(|p| {
                p.peers
                    .iter()
                    .filter_map(|id| self.slot_by_id(id))
                    .collect()
            })
            .unwrap_or_default();
        let mut mesh = self.membership(leaf_id(l), &peers);
        if let Some(known) = promotion_known {
            mesh.seed(known, instant);
        }
        self.supers.push(Super::new(
            0,
            Some(l),
            max_leaves,
            mesh,
            Vec::new(),
            self.election(s, 0, true),
            hop_seed(self.sc.seed, s, 0),
        ));
        self.boot_super(s);
        if let Some(p) = self.leaves[l as usize].planner.as_mut() {
            p.handle_role(instant, unix, Some(Vec::new()));
        }
        self.drive_leaf(l);
        s
    }

    fn slot_by_id(&self, id: &NodeId) -> Option<u32> {
        slot_by_id(&self.leaves, id)
    }

    // ---- supernodes ---------------------------------------------------

    fn for_leaves(&self, s: u32, with_room: bool) -> Vec<SupernodeInfo> {
        self.supers[s as usize]
            .mesh
            .for_leaves(with_room, self.q.instant())
    }

    /// A mesh core for the supernode `id`, dialling `peers` first.
    fn membership(&self, id: NodeId, peers: &[u32]) -> Membership {
        let boot: Vec<String> = peers
            .iter()
            .map(|&p| self.sup_addr(p).to_string())
            .collect();
        Membership::new(id, self.mesh_config.clone(), &boot, self.q.instant())
    }

    fn load_of(&self, s: u32) -> (u32, u32) {
        let sup = &self.supers[s as usize];
        (sup.leaves.len() as u32, sup.max_leaves as u32)
    }

    /// Carries out what supernode `s`'s mesh core asks for, and sets its
    /// timer.
    fn drive_mesh(&mut self, s: u32) {
        for _ in 0..10_000 {
            let Some(action) = self.supers[s as usize].mesh.poll_action() else {
                break;
            };
            match action {
                MeshAction::Dial { dial, expect, addr } => {
                    let target = match addr {
                        DialAddr::Socket(a) => Some(a),
                        DialAddr::Name(_) => None,
                    };
                    let t = target
                        .and_then(|a| self.listening(a, expect))
                        .filter(|&t| t != s);
                    match t {
                        Some(t) => {
                            self.next_link += 1;
                            let link = self.next_link;
                            let hello = Msg::Hello {
                                from: s,
                                dial: dial.0,
                                link,
                            };
                            self.send_after(Node::Super(s), Node::Super(t), hello, 1.5);
                        }
                        None => {
                            let epoch = self.supers[s as usize].epoch;
                            let dial = dial.0;
                            self.q.after(
                                self.sc.loss_detect_ms * MS,
                                Ev::DialFailed {
                                    sup: s,
                                    epoch,
                                    dial,
                                },
                            );
                        }
                    }
                }
                MeshAction::SendGossip { to, link, known } => {
                    if let Some(t) = self.slot_by_id(&to) {
                        let (leaves, max_leaves) = self.load_of(s);
                        let filter = self.filter_update(s);
                        let status = Msg::Status {
                            from: s,
                            link: link.0,
                            leaves,
                            max_leaves,
                            known,
                            elected: self.supers[s as usize].from_leaf.is_some(),
                            filter,
                        };
                        self.send(Node::Super(s), Node::Super(t), status);
                    }
                }
                MeshAction::Close { id, link, reason } => {
                    if let Some(t) = self.slot_by_id(&id) {
                        self.send(
                            Node::Super(s),
                            Node::Super(t),
                            Msg::LinkDown {
                                from: s,
                                link: link.0,
                            },
                        );
                        if reason != CloseReason::Replaced {
                            let me = &mut self.supers[s as usize];
                            me.hop.remove_neighbour(&t);
                            me.neighbour_filters.remove(&t);
                        }
                    }
                }
            }
        }
        // A promoted leaf has joined the mesh: the election hands over.
        let joined = self.supers[s as usize]
            .election
            .as_ref()
            .and_then(|e| e.awaiting_join())
            .filter(|&l| self.supers[s as usize].mesh.is_neighbour(&leaf_id(l)));
        if let Some(l) = joined {
            if let Some(to) = self.leaves[l as usize].role {
                let (instant, addr) = (self.q.instant(), self.sup_addr(to));
                let leaves = self.supers[s as usize].leaves.len();
                if let Some(e) = self.supers[s as usize].election.as_mut() {
                    e.handle_joined(instant, l, addr, leaves);
                }
                self.drive_election(s);
            }
        }
        let me = &mut self.supers[s as usize];
        if let Some(t) = me.mesh.poll_timeout() {
            let epoch = me.epoch;
            self.q
                .arm(&mut me.mesh_wake, t, Ev::MeshWake { sup: s, epoch });
        }
    }

    /// Supernode `s`'s link `link` to `from` has ended.
    fn link_down(&mut self, s: u32, from: u32, link: u64) {
        let instant = self.q.instant();
        let id = self.sup_id(from);
        let me = &mut self.supers[s as usize];
        me.mesh.handle_link_down(instant, id, LinkId(link));
        if !me.mesh.is_neighbour(&id) {
            me.hop.remove_neighbour(&from);
            me.neighbour_filters.remove(&from);
        }
        self.drive_mesh(s);
    }

    fn at_super(&mut self, s: u32, msg: Msg) {
        let instant = self.q.instant();
        match msg {
            Msg::Register { leaf, gen } => {
                let sup = &self.supers[s as usize];
                let full = sup.leaves.len() >= sup.max_leaves && !sup.leaves.contains_key(&leaf);
                if full || sup.stepping {
                    let mut list = self.for_leaves(s, true);
                    if list.is_empty() {
                        list = self.for_leaves(s, false);
                    }
                    self.send(Node::Super(s), Node::Leaf(leaf), Msg::Full { sup: s, list });
                    return;
                }
                self.add_leaf(s, leaf, gen);
                let list = self.for_leaves(s, true);
                self.send(
                    Node::Super(s),
                    Node::Leaf(leaf),
                    Msg::Registered { sup: s, list },
                );
            }
            Msg::Goodbye { leaf, gen } => {
                self.drop_leaf(s, leaf, gen);
                let sup = &self.supers[s as usize];
                if sup.stepping && sup.leaves.is_empty() {
                    self.super_down(s, true);
                }
            }
            Msg::ListReq { leaf, gen }
                if self.supers[s as usize]
                    .leaves
                    .get(&leaf)
                    .is_some_and(|&g| g == gen) =>
            {
                let list = self.for_leaves(s, true);
                self.send(Node::Super(s), Node::Leaf(leaf), Msg::List { sup: s, list });
            }
            Msg::Query { q, leaf } => self.origin_query(s, q, leaf),
            Msg::Promoted { leaf, sup: to } => {
                let reply = if to.is_some() {
                    PromoteReply::Accepted
                } else {
                    PromoteReply::Declined
                };
                if self.supers[s as usize].asked == Some(leaf) {
                    self.promote_answered(s, leaf, reply);
                }
            }
            Msg::Hello { from, dial, link } => {
                let (id, addr) = (self.sup_id(from), self.sup_addr(from));
                let (leaves, max_leaves) = self.load_of(from);
                let rtt = Duration::from_micros(self.rtt(Node::Super(s), Node::Super(from)));
                let me = &mut self.supers[s as usize].mesh;
                let ok = me
                    .handle_hello(
                        instant,
                        id,
                        LinkId(link),
                        addr.ip(),
                        addr.port(),
                        leaves,
                        max_leaves,
                    )
                    .is_ok();
                if ok {
                    me.handle_rtt(id, rtt);
                }
                self.send(
                    Node::Super(s),
                    Node::Super(from),
                    Msg::Welcome {
                        from: s,
                        dial,
                        link,
                        ok,
                    },
                );
                self.drive_mesh(s);
            }
            Msg::Welcome {
                from,
                dial,
                link,
                ok,
            } => {
                let id = self.sup_id(from);
                let (leaves, max_leaves) = self.load_of(from);
                let rtt = Duration::from_micros(self.rtt(Node::Super(s), Node::Super(from)));
                let me = &mut self.supers[s as usize].mesh;
                if !ok {
                    me.handle_dial_failed(instant, DialId(dial));
                } else if me
                    .handle_dialled(instant, DialId(dial), id, LinkId(link), leaves, max_leaves)
                    .is_ok()
                {
                    me.handle_rtt(id, rtt);
                } else {
                    self.send(
                        Node::Super(s),
                        Node::Super(from),
                        Msg::LinkDown { from: s, link },
                    );
                }
                self.drive_mesh(s);
            }
            Msg::Status {
                from,
                link,
                leaves,
                max_leaves,
                known,
                elected,
                filter,
            } => {
                if let Some(f) = filter {
                    self.supers[s as usize].neighbour_filters.insert(from, f);
                }
                let id = self.sup_id(from);
                self.supers[s as usize].mesh.handle_status(
                    instant,
                    id,
                    LinkId(link),
                    leaves,
                    max_leaves,
                    known,
                    elected,
                );
                self.drive_mesh(s);
            }
            Msg::LinkDown { from, link } => self.link_down(s, from, link),
            Msg::MeshQuery(mq) => self.mesh_query(s, *mq),
            Msg::MeshHits { stream, from, hits } => self.stream_hits(stream, from, hits),
            Msg::MeshDone { stream, from } => self.stream_done(stream, from),
            Msg::MeshCancel { stream } => self.stream_cancelled(stream),
            _ => {}
        }
    }

    fn add_leaf(&mut self, s: u32, leaf: u32, gen: u32) {
        let addr = self.leaf_sock(leaf);
        let instant = self.q.instant();
        let may_take_role = self.may_take_role(leaf);
        let (l, sup) = (&self.leaves[leaf as usize], &mut self.supers[s as usize]);
        let (capable, upload_kbps) = (l.capable && may_take_role, l.upload_kbps);
        if let Some(old) = sup.leaves.insert(leaf, gen) {
            if old == gen {
                return;
            }
        }
        for &f in &l.files {
            let kw = keyword(&self.sc, f);
            let postings = sup.index.entry(kw).or_default();
            if postings.is_empty() && self.walk.is_some() {
                sup.filter.add(self.kw_keys[kw as usize]);
            }
            if !postings.contains(&(f, leaf)) {
                postings.push((f, leaf));
            }
        }
        if let (true, Some(e)) = (capable, sup.election.as_mut()) {
            let candidacy = Candidacy {
                cpu_idle_permille: 800,
                mem_available_mib: 4096,
                upload_kbps,
            };
            e.offer(leaf, candidacy, instant, addr);
        }
    }

    fn drop_leaf(&mut self, s: u32, leaf: u32, gen: u32) {
        let files = &self.leaves[leaf as usize].files;
        let sup = &mut self.supers[s as usize];
        match sup.leaves.get(&leaf) {
            Some(&g) if g == gen => {}
            _ => return,
        }
        sup.leaves.remove(&leaf);
        if let Some(e) = sup.election.as_mut() {
            e.withdraw(&leaf);
        }
        for &f in files {
            let kw = keyword(&self.sc, f);
            if let Some(p) = sup.index.get_mut(&kw) {
                p.retain(|&(_, l)| l != leaf);
                if p.is_empty() {
                    sup.index.remove(&kw);
                    if self.walk.is_some() {
                        sup.filter.remove(self.kw_keys[kw as usize]);
                    }
                }
            }
        }
    }

    fn kill_random(&mut self, n: usize) {
        let alive: Vec<u32> = (0..self.dedicated as u32)
            .filter(|&s| self.supers[s as usize].alive)
            .collect();
        let mut picked = Set::default();
        for _ in 0..n.min(alive.len()) * 4 {
            if picked.len() >= n.min(alive.len()) {
                break;
            }
            picked.insert(alive[self.rng.random_range(0..alive.len())]);
        }
        let mut picked: Vec<u32> = picked.into_iter().collect();
        picked.sort_unstable();
        for s in picked {
            self.kills += 1;
            self.super_down(s, false);
            let restart = mins(self.sc.supernode_restart_min);
            self.q.after(restart.max(SEC), Ev::Restart(s));
        }
    }

    /// Supernode `s` stops; `goodbye`: it closed its connections, else
    /// they time out.
    fn super_down(&mut self, s: u32, goodbye: bool) {
        let (leaves, neighbours) = {
            let sup = &mut self.supers[s as usize];
            sup.alive = false;
            let leaves: Vec<(u32, u32)> = sup.leaves.iter().map(|(&l, &g)| (l, g)).collect();
            let links: Vec<(NodeId, u64)> = sup
                .mesh
                .neighbours()
                .map(|(id, n)| (*id, n.link.0))
                .collect();
            (leaves, links)
        };
        let neighbours: Vec<(u32, u64)> = neighbours
            .into_iter()
            .filter_map(|(id, link)| Some((self.slot_by_id(&id)?, link)))
            .collect();
        let detect = self.sc.loss_detect_ms * MS;
        for (l, gen) in leaves {
            if goodbye {
                let at = self.rtt(Node::Super(s), Node::Leaf(l)) / 2;
                self.q.after(
                    at,
                    Ev::LinkLost {
                        leaf: l,
                        gen,
                        sup: s,
                    },
                );
            } else {
                let jitter = self.rng.random_range(0..SEC);
                self.q.after(
                    detect + jitter,
                    Ev::LinkLost {
                        leaf: l,
                        gen,
                        sup: s,
                    },
                );
            }
        }
        for (n, link) in neighbours {
            let epoch = self.supers[n as usize].epoch;
            let at = if goodbye {
                self.rtt(Node::Super(s), Node::Super(n)) / 2
            } else {
                detect
            };
            self.q.after(
                at,
                Ev::NeighbourLost {
                    sup: n,
                    epoch,
                    gone: s,
                    link,
                },
            );
        }
        if let Some(l) = self.supers[s as usize].from_leaf {
            let (instant, unix) = (self.q.instant(), self.unix());
            let leaf = &mut self.leaves[l as usize];
            if leaf.role == Some(s) {
                leaf.role = None;
                if let Some(p) = leaf.planner.as_mut() {
                    p.handle_role(instant, unix, None);
                }
                if leaf.online {
                    self.drive_leaf(l);
                }
            }
        }
        let s_sup = &mut self.supers[s as usize];
        s_sup.leaves.clear();
        s_sup.index.clear();
        s_sup.filter = LocalFilter::default();
    }

    // ---- election -----------------------------------------------------

    fn election(&self, s: u32, epoch: u32, elected: bool) -> Option<Election<u32>> {
        let seed = dist::splitmix64(self.sc.seed ^ (u64::from(s) << 32) ^ u64::from(epoch));
        self.sc
            .election
            .then(|| Election::new(self.policy.clone(), elected, seed, self.q.instant()))
    }

    /// The election's timer: the rules, given the load now and the room
    /// of the supernodes this one would send its leaves to.
    fn elect_timeout(&mut self, s: u32) {
        let (now, instant) = (self.now(), self.q.instant());
        if self.supers[s as usize].rooms.0 + ROOM_REFRESH <= now || now < ROOM_REFRESH {
            let rooms = self
                .for_leaves(s, true)
                .iter()
                .map(|i| Room {
                    leaves: i.leaves,
                    max_leaves: i.max_leaves,
                })
                .collect();
            let known = self.supers[s as usize]
                .mesh
                .loads(instant, elect::NEED_SAMPLE_MAX_AGE)
                .into_iter()
                .map(|(leaves, max_leaves)| Room { leaves, max_leaves })
                .collect();
            self.supers[s as usize].rooms = (now, rooms, known);
        }
        let sup = &mut self.supers[s as usize];
        let load = Load {
            leaves: sup.leaves.len(),
            max_leaves: sup.max_leaves,
            others: &sup.rooms.1,
            known: &sup.rooms.2,
            neighbours_elected: sup.mesh.neighbours_elected(),
        };
        if let Some(e) = sup.election.as_mut() {
            e.handle_timeout(instant, &load);
        }
        self.drive_election(s);
    }

    fn promote_answered(&mut self, s: u32, leaf: u32, reply: PromoteReply) {
        let instant = self.q.instant();
        let sup = &mut self.supers[s as usize];
        sup.asked = None;
        if let Some(e) = sup.election.as_mut() {
            e.handle_promote_reply(instant, leaf, reply);
        }
        self.drive_election(s);
        // It may have joined before its answer came.
        self.drive_mesh(s);
    }

    /// Carries out what supernode `s`'s election core asks for, and sets
    /// its timer.
    fn drive_election(&mut self, s: u32) {
        let instant = self.q.instant();
        for _ in 0..10_000 {
            if !self.supers[s as usize].alive {
                return;
            }
            let Some(action) = self.supers[s as usize]
                .election
                .as_mut()
                .and_then(|e| e.poll_action())
            else {
                break;
            };
            let epoch = self.supers[s as usize].epoch;
            match action {
                ElectAction::Probe { id, addr, timeout } => {
                    let l = &self.leaves[id as usize];
                    let ok = l.online && l.nat == Nat::Open && self.leaf_sock(id) == addr;
                    let after = if ok {
                        self.rtt(Node::Super(s), Node::Leaf(id)) * 3 / 2
                    } else {
                        micros(timeout)
                    };
                    let ev = Ev::ProbeDone {
                        sup: s,
                        epoch,
                        leaf: id,
                        addr,
                        ok,
                    };
                    self.q.after(after, ev);
                }
                ElectAction::Promote { id } => {
                    let max_leaves = self.supers[s as usize].max_leaves;
                    self.supers[s as usize].asked = Some(id);
                    self.send(
                        Node::Super(s),
                        Node::Leaf(id),
                        Msg::Promote { sup: s, max_leaves },
                    );
                    self.q.after(
                        PROMOTE_TIMEOUT,
                        Ev::PromoteTimeout {
                            sup: s,
                            epoch,
                            leaf: id,
                        },
                    );
                }
                ElectAction::HandOver { to, addr, count } => {
                    self.handover(s, to, addr, count);
                    if let Some(e) = self.supers[s as usize].election.as_mut() {
                        e.handle_handover_done(instant, to);
                    }
                }
                ElectAction::StepDown => {
                    self.step_downs += 1;
                    let list = self.for_leaves(s, true);
                    let mut leaves: Vec<u32> =
                        self.supers[s as usize].leaves.keys().copied().collect();
                    leaves.sort_unstable();
                    for l in leaves {
                        let rehome = Msg::Rehome {
                            sup: s,
                            list: list.clone(),
                        };
                        self.send(Node::Super(s), Node::Leaf(l), rehome);
                    }
                    // Make before break: it stays until they have moved.
                    let me = &mut self.supers[s as usize];
                    if me.leaves.is_empty() {
                        self.super_down(s, true);
                    } else {
                        me.stepping = true;
                        let epoch = me.epoch;
                        self.q
                            .after(micros(STEP_DOWN_WAIT), Ev::StepDownEnd { sup: s, epoch });
                    }
                    return;
                }
            }
        }
        let me = &mut self.supers[s as usize];
        if let Some(t) = me.election.as_ref().and_then(|e| e.poll_timeout()) {
            let epoch = me.epoch;
            self.q
                .arm(&mut me.elect_wake, t, Ev::ElectWake { sup: s, epoch });
        }
    }

    /// Moves `count` of our leaves (not the new supernode's own) to the
    /// promoted leaf `to`, at `addr`.
    fn handover(&mut self, s: u32, to: u32, addr: SocketAddr, count: usize) {
        let max_leaves = self.leaves[to as usize]
            .role
            .map_or(self.sc.max_leaves, |r| self.supers[r as usize].max_leaves);
        let mut movers: Vec<u32> = self.supers[s as usize]
            .leaves
            .keys()
            .copied()
            .filter(|&l| l != to)
            .collect();
        movers.sort_unstable();
        movers.truncate(count);
        let info = SupernodeInfo {
            id: leaf_id(to),
            addr: addr.to_string(),
            leaves: 0,
            max_leaves: max_leaves as u32,
            age_secs: 0,
        };
        for l in movers {
            let rehome = Msg::Rehome {
                sup: s,
                list: vec![info.clone()],
            };
            self.send(Node::Super(s), Node::Leaf(l), rehome);
        }
    }

    // ---- queries ------------------------------------------------------

    fn query_start(&mut self) {
        if self.online.is_empty() {
            return;
        }
        let leaf = self.online[self.rng.random_range(0..self.online.len())];
        let rare = self.rng.random_bool(self.sc.rare_query_share);
        let mut holder = None;
        let (kw, expected) = if rare && self.sc.rare_per_leaf > 0 {
            // A file of another online leaf that only it has.
            let mut pick = None;
            for _ in 0..16 {
                let h = self.online[self.rng.random_range(0..self.online.len())];
                if h != leaf {
                    let j = self.rng.random_range(0..self.sc.rare_per_leaf);
                    let f = (self.sc.catalog_files + h as usize * self.sc.rare_per_leaf + j) as u32;
                    pick = Some((keyword(&self.sc, f), h));
                    break;
                }
            }
            let Some((kw, h)) = pick else { return };
            holder = Some(h);
            (kw, 1)
        } else {
            let f = self.zipf.sample(&mut self.rng);
            let group = f / self.sc.files_per_keyword;
            let lo = group * self.sc.files_per_keyword;
            let hi = (lo + self.sc.files_per_keyword).min(self.sc.catalog_files);
            let held = (lo..hi).filter(|&g| self.holders[g] > 0).count();
            if held == 0 {
                return;
            }
            (group as u32, held.min(self.sc.max_results))
        };
        let rare = rare && self.sc.rare_per_leaf > 0;
        let q = self.queries.len() as u32;
        let links: Vec<u32> = self.leaves[leaf as usize]
            .links()
            .take(ASKED_AT_ONCE)
            .collect();
        self.queries.push(QueryRec {
            start: self.now(),
            asker: leaf,
            holder,
            kw,
            rare,
            expected,
            found: Set::default(),
            first_hit: None,
            outstanding: links.len(),
            done: links.is_empty(),
            unattached: links.is_empty(),
            msgs: 0,
        });
        for s in &links {
            self.send(Node::Leaf(leaf), Node::Super(*s), Msg::Query { q, leaf });
        }
        if !links.is_empty() {
            self.q.after(self.sc.leaf_timeout_ms * MS, Ev::QueryEnd(q));
        }
    }

    fn query_end(&mut self, q: u32) {
        self.queries[q as usize].done = true;
    }

    /// `s`'s filter as its neighbours are to have it, brought up to date
    /// first (and the update's bytes counted); `None` under `flood`.
    fn filter_update(&mut self, s: u32) -> Option<Rc<Filter>> {
        self.walk?;
        let measuring = self.measuring();
        let sup = &mut self.supers[s as usize];
        if let Some(update) = sup.filter.poll_update() {
            let bytes = match &update {
                Update::Full(f) => f.to_wire().1.len() as u64,
                Update::Patch(bits) => 4 * bits.len() as u64,
            };
            if measuring {
                self.filter_bytes += bytes * sup.mesh.neighbour_count() as u64;
            }
            sup.filter_sent = sup.filter.sent().cloned().map(Rc::new);
        }
        sup.filter_sent.clone()
    }

    /// What `s`'s index holds for `lookup`: one hit per file, with every
    /// leaf registered there that holds it as a source.
    fn local(&self, s: u32, lookup: &Lookup, wanted: usize) -> Local {
        let kw = match lookup {
            Lookup::Words(w) => w
                .first()
                .and_then(|w| w.strip_prefix('k')?.parse::<u32>().ok()),
            Lookup::Hash(_) => None,
        };
        let Some(p) = kw.and_then(|kw| self.supers[s as usize].index.get(&kw)) else {
            return Local::default();
        };
        let mut hits: Vec<Hit> = Vec::new();
        for &(f, l) in p {
            let hash = file_hash(f);
            let source = || Source {
                id: leaf_id(l),
                addr: self.leaf_addr(l),
                variant: 0,
                via: None,
            };
            let room = hits.len() < wanted;
            match hits.iter_mut().find(|h| h.hash == hash) {
                Some(h) if h.sources.len() < MAX_SOURCES_PER_HIT => h.sources.push(source()),
                Some(_) => {}
                None if room => hits.push(Hit {
                    hash,
                    names: vec![NameVariant {
                        name: format!("file {f}"),
                        size: 1 << 20,
                    }],
                    sources: vec![source()],
                }),
                None => {}
            }
        }
        let found = hits.len();
        Local {
            hits,
            examined: p.len().min(servent_proto::cost::MAX_EXAMINED),
            found,
        }
    }

    fn leaf_addr(&self, l: u32) -> String {
        self.leaves[l as usize].addr.clone()
    }

    /// Where leaf `l` serves in its session now.
    fn leaf_sock(&self, l: u32) -> SocketAddr {
        leaf_sock(self.leaves[l as usize].ip)
    }

    /// A leaf's query at its supernode (`routing::serve_leaf_query`).
    fn origin_query(&mut self, s: u32, q: u32, leaf: u32) {
        let query = Query {
            kind: QueryKind::Keywords(vec![format!("k{}", self.queries[q as usize].kw)]),
            max_results: self.sc.max_results as u32,
        };
        let id: u64 = self.rng.random();
        let ask = LeafQuery {
            leaf: u32::MAX - leaf,
            id,
            query: &query,
            ttl: self.sc.query_ttl,
            search_time: Duration::from_millis(self.sc.search_time_ms),
        };
        let instant = self.q.instant();
        let Super {
            mesh,
            hop,
            neighbour_filters,
            ..
        } = &mut self.supers[s as usize];
        let leaves = &self.leaves;
        let arrival = match self.walk.filter(|w| w.walks(mesh.known_count())) {
            Some(walk) => hop.from_leaf_walked(&walk, instant, ask, |keys| {
                walk_view(mesh, leaves, neighbour_filters, keys)
            }),
            None => hop.from_leaf(instant, ask, || ranked(mesh, leaves)),
        };
        let Arrival::Accepted(hq) = arrival else {
            self.send(Node::Super(s), Node::Leaf(leaf), Msg::Done { q });
            return;
        };
        self.start_hop(s, *hq, Up::Leaf { q, leaf }, query, q);
    }

    /// A neighbour's copy of a query (`routing::serve_mesh_query`).
    fn mesh_query(&mut self, s: u32, mq: MeshCopy) {
        let instant = self.q.instant();
        let Super {
            mesh,
            hop,
            neighbour_filters,
            ..
        } = &mut self.supers[s as usize];
        let leaves = &self.leaves;
        let arrival = match (&self.walk, mq.kind) {
            (_, CopyKind::Flood { .. }) => {
                hop.from_neighbour(instant, mq.from, &mq.query, || ranked(mesh, leaves))
            }
            (Some(walk), kind) => {
                hop.from_neighbour_walked(walk, instant, mq.from, &mq.query, kind, |keys| {
                    walk_view(mesh, leaves, neighbour_filters, keys)
                })
            }
            // Only walking supernodes send walkers.
            (None, _) => Arrival::Duplicate,
        };
        let Arrival::Accepted(hq) = arrival else {
            self.send(
                Node::Super(s),
                Node::Super(mq.from),
                Msg::MeshDone {
                    stream: mq.parent,
                    from: s,
                },
            );
            return;
        };
        let epoch = self.supers[mq.from as usize].epoch;
        let up = Up::Mesh {
            node: mq.from,
            epoch,
            parent: mq.parent,
        };
        self.start_hop_as(s, *hq, up, mq.query.query, mq.stream, mq.q);
    }

    fn start_hop(&mut self, s: u32, hq: HopQuery<u32>, up: Up, query: Query, q: u32) {
        let id = self.new_stream();
        self.start_hop_as(s, hq, up, query, id, q);
    }

    fn start_hop_as(
        &mut self,
        s: u32,
        mut hq: HopQuery<u32>,
        up: Up,
        query: Query,
        id: u64,
        q: u32,
    ) {
        let instant = self.q.instant();
        let local = match hq.lookup() {
            Some(l) => self.local(s, l, hq.wanted()),
            None => Local::default(),
        };
        self.supers[s as usize]
            .hop
            .handle_local(instant, &mut hq, local);
        let epoch = self.supers[s as usize].epoch;
        self.streams.insert(
            id,
            Stream {
                q,
                node: s,
                epoch,
                query: hq,
                up,
                mesh: query,
                children: Vec::new(),
                wake_at: None,
            },
        );
        self.drive_hop(id);
    }

    fn new_stream(&mut self) -> u64 {
        self.next_stream += 1;
        self.next_stream
    }

    /// Carries out what query `id`'s hop core asks for, and sets its timer.
    fn drive_hop(&mut self, id: u64) {
        let instant = self.q.instant();
        for _ in 0..10_000 {
            let Some(st) = self.streams.get_mut(&id) else {
                return;
            };
            let Some(action) = st.query.poll_action() else {
                break;
            };
            let (s, up) = (st.node, st.up);
            match action {
                HopAction::Forward { to, copy, budget } => {
                    let child = self.new_stream();
                    let st = self.streams.get_mut(&id).expect("stream");
                    st.children.push((to, child));
                    let ttl = copy.wire_ttl();
                    let mq = MeshCopy {
                        stream: child,
                        parent: id,
                        from: s,
                        query: MeshQuery {
                            id: st.query.id(),
                            ttl,
                            timeout_ms: budget.as_millis().min(u32::MAX as u128) as u32,
                            query: st.mesh.clone(),
                        },
                        kind: copy,
                        q: st.q,
                    };
                    self.send(
                        Node::Super(s),
                        Node::Super(to),
                        Msg::MeshQuery(Box::new(mq)),
                    );
                }
                HopAction::NotForwarded { .. } => self.unforwarded += 1,
                HopAction::SendHits { hits } => match up {
                    Up::Leaf { q, leaf } => {
                        let files = hits.iter().map(|h| file_of(&h.hash)).collect();
                        self.send(Node::Super(s), Node::Leaf(leaf), Msg::Hits { q, files });
                    }
                    Up::Mesh { node, parent, .. } => {
                        self.send(
                            Node::Super(s),
                            Node::Super(node),
                            Msg::MeshHits {
                                stream: parent,
                                from: s,
                                hits,
                            },
                        );
                    }
                },
                HopAction::Charge { tokens } => {
                    if let Up::Mesh { node, .. } = up {
                        self.supers[s as usize].hop.charge(instant, &node, tokens);
                    }
                }
                HopAction::Cancel { neighbour } => {
                    let st = self.streams.get_mut(&id).expect("stream");
                    if let Some(i) = st.children.iter().position(|&(n, _)| n == neighbour) {
                        let (n, child) = st.children.swap_remove(i);
                        self.send(
                            Node::Super(s),
                            Node::Super(n),
                            Msg::MeshCancel { stream: child },
                        );
                    }
                }
                HopAction::Finish => {
                    let st = self.streams.remove(&id).expect("stream");
                    for (n, child) in st.children {
                        self.send(
                            Node::Super(s),
                            Node::Super(n),
                            Msg::MeshCancel { stream: child },
                        );
                    }
                    match up {
                        Up::Leaf { q, leaf } => {
                            self.send(Node::Super(s), Node::Leaf(leaf), Msg::Done { q })
                        }
                        Up::Mesh {
                            node,
                            epoch,
                            parent,
                        } => {
                            if self.supers[node as usize].epoch == epoch {
                                self.send(
                                    Node::Super(s),
                                    Node::Super(node),
                                    Msg::MeshDone {
                                        stream: parent,
                                        from: s,
                                    },
                                );
                            }
                        }
                    }
                    return;
                }
            }
        }
        let Some(st) = self.streams.get_mut(&id) else {
            return;
        };
        if let Some(t) = st.query.poll_timeout() {
            self.q.arm(&mut st.wake_at, t, Ev::HopWake { stream: id });
        }
    }

    fn live_stream(&mut self, id: u64) -> Option<&mut Stream> {
        let st = self.streams.get(&id)?;
        if !(self.supers[st.node as usize].alive && self.supers[st.node as usize].epoch == st.epoch)
        {
            self.streams.remove(&id);
            return None;
        }
        self.streams.get_mut(&id)
    }

    fn stream_hits(&mut self, id: u64, from: u32, hits: Vec<Hit>) {
        let instant = self.q.instant();
        let Some(st) = self.live_stream(id) else {
            return;
        };
        if !st.children.iter().any(|&(n, _)| n == from) {
            return;
        }
        st.query.handle_hits(instant, &from, hits);
        self.drive_hop(id);
    }

    fn stream_done(&mut self, id: u64, from: u32) {
        let instant = self.q.instant();
        let Some(st) = self.live_stream(id) else {
            return;
        };
        let Some(i) = st.children.iter().position(|&(n, _)| n == from) else {
            return;
        };
        st.children.swap_remove(i);
        st.query.handle_ended(instant, &from);
        self.drive_hop(id);
    }

    fn hop_wake(&mut self, id: u64) {
        let instant = self.q.instant();
        let Some(st) = self.live_stream(id) else {
            return;
        };
        st.wake_at = None;
        let st = self.streams.get_mut(&id).expect("stream");
        self.supers[st.node as usize]
            .hop
            .handle_timeout(instant, &mut st.query);
        self.drive_hop(id);
    }

    /// The asker closed a stream: the query there ends, and so do the
    /// copies it forwarded.
    fn stream_cancelled(&mut self, id: u64) {
        let Some(st) = self.streams.remove(&id) else {
            return;
        };
        for (n, child) in st.children {
            self.send(
                Node::Super(st.node),
                Node::Super(n),
                Msg::MeshCancel { stream: child },
            );
        }
    }

    // ---- measuring ----------------------------------------------------

    fn sample(&mut self) {
        let alive: Vec<&Super> = self.supers.iter().filter(|s| s.alive).collect();
        let online = self.online.len();
        let attached = self
            .online
            .iter()
            .filter(|&&l| self.leaves[l as usize].links().next().is_some())
            .count();
        // The fewest supernodes the leaves need: every one full, each leaf
        // with its `attach` links.
        let links = online as u64 * self.sc.attach as u64;
        let needed = links.div_ceil(self.sc.max_leaves.max(1) as u64).max(1) as usize;
        let over_cap = alive
            .iter()
            .map(|s| s.leaves.len() as f64 / s.max_leaves.max(1) as f64)
            .fold(0.0, f64::max);
        let t = self.now() as f64 / SEC as f64;
        let sample = Sample {
            t_secs: report::round(t, 1),
            supernodes: alive.len(),
            elected: alive.iter().filter(|s| s.from_leaf.is_some()).count(),
            needed,
            online_leaves: online,
            attached_leaves: attached,
            max_leaves_over_cap: report::round(over_cap, 3),
            msgs_per_sec: report::round(self.msgs_since_sample as f64 / self.sc.sample_secs, 1),
            links: alive.iter().map(|s| s.leaves.len()).sum(),
        };
        self.msgs_since_sample = 0;
        if self.progress {
            eprintln!(
                "t={:>6.0}s supernodes={} elected={} needed={} online={} attached={} links={} streams={} queued={} events={}",
                sample.t_secs,
                sample.supernodes,
                sample.elected,
                sample.needed,
                sample.online_leaves,
                sample.attached_leaves,
                sample.links,
                self.streams.len(),
                self.q.len(),
                self.q.processed()
            );
        }
        if self.measuring() {
            self.online_sum += online as f64;
        }
        self.samples.push(sample);
    }

    fn report(&mut self, wall: f64) -> Report {
        let measured: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.t_secs * SEC as f64 >= self.measure_from as f64)
            .collect();
        let ratio = |s: &Sample| s.supernodes as f64 / s.needed.max(1) as f64;
        let over_max = measured.iter().map(|s| ratio(s)).fold(0.0, f64::max);
        let over_mean =
            measured.iter().map(|s| ratio(s)).sum::<f64>() / measured.len().max(1) as f64;
        let over_min = measured
            .iter()
            .map(|s| ratio(s))
            .reduce(f64::min)
            .unwrap_or(0.0);
        let links_per_leaf = measured
            .iter()
            .map(|s| s.links as f64 / s.online_leaves.max(1) as f64)
            .sum::<f64>()
            / measured.len().max(1) as f64;
        let (mut rare_n, mut rare_found, mut pop_n, mut pop_recall, mut unattached) =
            (0, 0, 0, 0.0, 0);
        let mut first: Vec<f64> = Vec::new();
        let (mut rare_msgs, mut pop_msgs, mut most_msgs) = (0u64, 0u64, 0u64);
        // By `Path` as usize: direct, reversed, punched, relayed.
        let mut paths = [0u32; 4];
        // Rare queries started within 30 s of the mass kill, and after.
        let kill = self.sc.mass_kill_at_min.map(mins);
        let (mut soon, mut later) = ((0u32, 0u32), (0u32, 0u32));
        for r in &self.queries {
            if r.unattached {
                unattached += 1;
            }
            let got = r.found.len().min(r.expected);
            if r.rare {
                rare_n += 1;
                rare_found += usize::from(got > 0);
                rare_msgs += r.msgs;
                if let (true, Some(h)) = (got > 0, r.holder) {
                    let nat = |l: u32| self.leaves[l as usize].nat;
                    paths[path(nat(r.asker), nat(h), false) as usize] += 1;
                }
            } else {
                pop_n += 1;
                pop_recall += got as f64 / r.expected.max(1) as f64;
                pop_msgs += r.msgs;
            }
            most_msgs = most_msgs.max(r.msgs);
            if let (Some(k), true) = (kill, r.rare && r.start >= kill.unwrap_or(0)) {
                let window = if r.start < k + 30 * SEC {
                    &mut soon
                } else {
                    &mut later
                };
                window.0 += 1;
                window.1 += u32::from(got > 0);
            }
            if let Some(t) = r.first_hit {
                first.push((t - r.start) as f64 / MS as f64);
            }
        }
        let n = self.queries.len().max(1) as f64;
        let max_q = self.supers.iter().map(|s| s.query_msgs).max().unwrap_or(0);
        let alive_q: Vec<u64> = self
            .supers
            .iter()
            .filter(|s| s.alive)
            .map(|s| s.query_msgs)
            .collect();
        let mean_q = alive_q.iter().sum::<u64>() as f64 / alive_q.len().max(1) as f64;
        let measured_secs =
            (self.now().saturating_sub(self.measure_from) as f64 / SEC as f64).max(1.0);
        // Leaves still orphaned at the end count with their time so far.
        let end = self.now();
        let mut orphaned = self.orphaned.clone();
        for l in &self.leaves {
            if let (true, Some(since)) = (l.online, l.orphan_since) {
                orphaned.push((end - since) as f64 / SEC as f64);
            }
        }
        let hours = (self.sc.minutes / 60.0).max(1.0);
        let most_promoted = self
            .leaves
            .iter()
            .map(|l| l.promoted_at.len())
            .max()
            .unwrap_or(0);
        let events = self.q.processed();
        Report {
            seed: self.sc.seed,
            leaves: self.sc.leaves,
            supernodes: self.sc.supernodes,
            minutes: self.sc.minutes,
            queries: self.queries.len(),
            rare_queries: rare_n,
            popular_queries: pop_n,
            recall_rare: report::round(rare_found as f64 / rare_n.max(1) as f64, 4),
            recall_popular: report::round(pop_recall / pop_n.max(1) as f64, 4),
            queries_unattached: report::round(unattached as f64 / n, 4),
            first_hit_ms_p50: report::round(report::percentile(&mut first.clone(), 50.0), 1),
            first_hit_ms_p99: report::round(report::percentile(&mut first, 99.0), 1),
            messages_per_query: report::round(self.query_traffic as f64 / n, 1),
            mesh_queries_per_query: report::round(self.mesh_copies as f64 / n, 1),
            messages_per_rare_query: report::round(rare_msgs as f64 / rare_n.max(1) as f64, 1),
            messages_per_popular_query: report::round(pop_msgs as f64 / pop_n.max(1) as f64, 1),
            messages_per_query_max: most_msgs,
            recall_rare_30s_after_mass_kill: kill
                .map(|_| report::round(f64::from(soon.1) / f64::from(soon.0.max(1)), 4)),
            recall_rare_later_after_mass_kill: kill
                .map(|_| report::round(f64::from(later.1) / f64::from(later.0.max(1)), 4)),
            rare_paths: {
                let found = f64::from(paths.iter().sum::<u32>().max(1));
                let share = |p: Path| report::round(f64::from(paths[p as usize]) / found, 4);
                report::RarePaths {
                    direct: share(Path::Direct),
                    reversed: share(Path::Reversed),
                    punched: share(Path::Punched),
                    relayed: share(Path::Relayed),
                }
            },
            mesh_copies_unforwarded: self.unforwarded,
            routing: self.sc.routing,
            filter_bytes_per_supernode_sec: report::round(
                self.filter_bytes as f64 / measured_secs / alive_q.len().max(1) as f64,
                1,
            ),
            busiest_supernode_over_mean: report::round(
                alive_q.iter().copied().max().unwrap_or(0) as f64 / mean_q.max(1.0),
                2,
            ),
            max_supernode_msgs_per_sec: self.max_msgs_per_sec,
            max_supernode_msgs_per_query: report::round(max_q as f64 / n, 2),
            election_rules: self.policy.rules.name().to_string(),
            supernodes_over_needed_max: report::round(over_max, 3),
            supernodes_over_needed_mean: report::round(over_mean, 3),
            supernodes_over_needed_min: report::round(over_min, 3),
            links_per_leaf_mean: report::round(links_per_leaf, 3),
            supernodes_alive_min: measured.iter().map(|s| s.supernodes).min().unwrap_or(0),
            supernodes_alive_max: measured.iter().map(|s| s.supernodes).max().unwrap_or(0),
            elected_max: measured.iter().map(|s| s.elected).max().unwrap_or(0),
            max_leaves_over_cap: report::round(
                self.samples
                    .iter()
                    .map(|s| s.max_leaves_over_cap)
                    .fold(0.0, f64::max),
                3,
            ),
            unattached_secs_p50: report::round(report::percentile(&mut orphaned.clone(), 50.0), 2),
            unattached_secs_p99: report::round(report::percentile(&mut orphaned, 99.0), 2),
            orphanings: orphaned.len(),
            promotions: self.promotions,
            step_downs: self.step_downs,
            promotions_per_leaf_hour: report::round(most_promoted as f64 / hours, 3),
            supernode_kills: self.kills,
            leaf_sessions: self.sessions,
            online_leaves_mean: report::round(self.online_sum / measured.len().max(1) as f64, 1),
            events,
            wall_secs: report::round(wall, 2),
            events_per_sec: report::round(events as f64 / wall.max(1e-9), 0),
            peak_rss_mib: report::round(report::peak_rss_mib(), 1),
        }
    }
}

/// The slot of the supernode `id` (dedicated, or an elected leaf's).
fn slot_by_id(leaves: &[Leaf], id: &NodeId) -> Option<u32> {
    let b = id.as_bytes();
    let n = u32::from_be_bytes([b[1], b[2], b[3], b[4]]);
    match b[0] {
        1 => Some(n),
        2 => leaves.get(n as usize)?.role,
        _ => None,
    }
}

/// A supernode's neighbours by slot, in the order a search asks them.
fn ranked(mesh: &Membership, leaves: &[Leaf]) -> Vec<u32> {
    mesh.ranked_neighbours()
        .iter()
        .filter_map(|id| slot_by_id(leaves, id))
        .collect()
}

/// What a walker sees at a supernode: its neighbours, and those whose
/// filter may match `keys`.
fn walk_view(
    mesh: &Membership,
    leaves: &[Leaf],
    filters: &Map<u32, Rc<Filter>>,
    keys: &[WordKey],
) -> View<u32> {
    let neighbours = ranked(mesh, leaves);
    let matching = neighbours
        .iter()
        .copied()
        .filter(|n| filters.get(n).is_some_and(|f| f.may_match(keys)))
        .collect();
    View {
        neighbours,
        matching,
    }
}

/// `m` minutes of virtual time.
fn mins(m: f64) -> Micros {
    (m * 60.0 * SEC as f64) as Micros
}

/// Keywords in all: one per group of popular files, one per rare file.
fn keywords(sc: &Scenario) -> u32 {
    (sc.catalog_files.div_ceil(sc.files_per_keyword) + sc.leaves * sc.rare_per_leaf) as u32
}

/// The one keyword of file `f`: popular files share theirs with
/// `files_per_keyword − 1` others, a single-holder file has its own.
fn keyword(sc: &Scenario, f: u32) -> u32 {
    let f = f as usize;
    if f < sc.catalog_files {
        (f / sc.files_per_keyword) as u32
    } else {
        (sc.catalog_files.div_ceil(sc.files_per_keyword) + (f - sc.catalog_files)) as u32
    }
}

/// The seed of supernode `s`'s walkers in incarnation `epoch`.
fn hop_seed(seed: u64, s: u32, epoch: u32) -> u64 {
    dist::splitmix64(seed ^ 0x7761_6c6b ^ (u64::from(s) << 32) ^ (u64::from(epoch) << 16))
}

/// A made-up node id: `kind` 1 for a dedicated supernode, 2 for a leaf
/// (and the supernode role it may hold), then the index.
fn node_id(kind: u8, n: u32) -> NodeId {
    let mut b = [0u8; 32];
    b[0] = kind;
    b[1..5].copy_from_slice(&n.to_be_bytes());
    NodeId(b)
}

fn leaf_id(l: u32) -> NodeId {
    node_id(2, l)
}

/// Where supernode slot `s` listens in its `epoch`-th life: a /24 of its
/// own (the mesh caps neighbours per /24), a new port after each restart.
fn addr_of(s: u32, epoch: u32) -> SocketAddr {
    let ip = std::net::Ipv4Addr::new(11 + (s >> 16) as u8, (s >> 8) as u8, s as u8, 1);
    SocketAddr::from((ip, 1024 + (epoch % 60_000) as u16))
}

/// The supernode slot an address of [`addr_of`] stands for.
fn slot_of(addr: SocketAddr) -> u32 {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            (u32::from(o[0].wrapping_sub(11)) << 16) | (u32::from(o[1]) << 8) | u32::from(o[2])
        }
        std::net::IpAddr::V6(_) => u32::MAX,
    }
}

/// A made-up content hash standing for file `f`.
fn file_hash(f: u32) -> ContentHash {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(&f.to_be_bytes());
    ContentHash(b)
}

fn file_of(h: &ContentHash) -> u32 {
    let b = h.as_bytes();
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
