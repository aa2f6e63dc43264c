//! Supernode election, as pure decisions: when a supernode should grow the
//! network by promoting one of its leaves, which leaf, when to dial a
//! candidate back, how to hand leaves over, and when an elected supernode
//! should step down. The caller passes the time and the facts.
//!
//! Two sets of rules ([`Rules`]), the default first:
//! - **Need** ([`Rules::Need`]): a supernode elects only while it is over
//!   its high-water mark *and* the network it knows of (its own load and
//!   the loads its neighbours' `Status` gossip told it, [`Load::known`]) is
//!   short of room: less than `elect_below_spare_permille` of the capacity
//!   it knows is free. Even then it elects with a probability: the
//!   deficit (the supernodes that would bring the known capacity back to
//!   `target_spare_permille` free) ÷ the overloaded supernodes it knows,
//!   drawn once per `round`, so that N overloaded supernodes facing a
//!   deficit of D promote about D between them, not N. An elected supernode
//!   steps down once the others would still have `step_down_spare_permille`
//!   free after taking its leaves, for `drain_for` (at once when they would
//!   have `step_down_now_spare_permille`), again with a probability (the
//!   surplus ÷ the elected supernodes known, judged from the neighbours'
//!   `Status`) once per round. The gap between
//!   the two marks is the hysteresis that keeps it from flapping, and a
//!   leaf takes the role at most once per `repromote_after`
//!   ([`answer_promote`]).
//! - **Overload** ([`Rules::Overload`], the rules before need was tracked):
//!   a supernode elects after being over its high-water mark for a
//!   randomised wait, at most once per cool-down, whatever room the others
//!   have; an elected supernode steps down only after holding no more than
//!   `drained_leaves` leaves for `drain_for`. Kept so that a simulator run
//!   can put them beside the new rules with the same seed.
//!
//! [`Election`] is the whole of it as one state machine, in the manner of
//! quinn-proto: the driver feeds it candidacies, dial-back results, the
//! leaf's answer to `Promote` and the moment the new supernode joins the
//! mesh, calls [`Election::handle_timeout`] at [`Election::poll_timeout`]
//! with the load of this supernode and the room of the others, and carries
//! out the [`Action`]s it drains with [`Election::poll_action`]. It never
//! dials, sends or reads a clock itself; that is what lets a simulator run
//! thousands of them on a virtual clock. [`Elector`], [`qualifies`] and
//! [`best`] are its parts. [`answer_promote`] is the leaf's side.
//!
//! Not here: measuring a leaf's spare capacity (the leaf does, from /proc),
//! the dial-back itself (a QUIC handshake from a socket of its own), and
//! which supernodes a stepping-down node lists to its leaves (the mesh's
//! `Full` list).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::msg::Candidacy;
use crate::rng::SplitMix64;

/// Which rules decide when to elect and when to step down (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rules {
    /// Elect only while the known network is short of room, about as many
    /// as it lacks; step down when not needed. The default.
    #[default]
    Need,
    /// Elect whenever this supernode is over its high-water mark; step
    /// down only when drained (the rules before need was tracked).
    Overload,
}

impl Rules {
    /// The name a config file gives them: `need` or `overload`.
    pub fn name(self) -> &'static str {
        match self {
            Rules::Need => "need",
            Rules::Overload => "overload",
        }
    }

    /// The rules of a config file's name, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "need" => Some(Rules::Need),
            "overload" => Some(Rules::Overload),
            _ => None,
        }
    }
}

/// The rules, with their defaults (see docs/PROTOCOL.md).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Which rules apply. Default [`Rules::Need`].
    pub rules: Rules,
    /// Need rules: the known network is short of room when less than this
    /// share (thousandths) of its capacity is free. Default 80.
    pub elect_below_spare_permille: u32,
    /// Need rules: the share (thousandths) of capacity a round of
    /// elections aims to leave free; the deficit is counted against it.
    /// Default 120.
    pub target_spare_permille: u32,
    /// Need rules: an elected supernode is not needed when, without it,
    /// at least this share (thousandths) of the known capacity would still
    /// be free. Default 160.
    pub step_down_spare_permille: u32,
    /// Need rules: when, without it, at least this share (thousandths)
    /// would be free, an elected supernode steps down without waiting out
    /// `drain_for` (still once per `round`). Default 200: the others alone
    /// would still be 1.25 times the fewest supernodes the leaves need.
    pub step_down_now_spare_permille: u32,
    /// Need rules: the highest chance (thousandths) that one elected
    /// supernode steps down in a round. Default 500.
    pub step_down_chance_max_permille: u32,
    /// Need rules: least time between two draws (to elect or to step
    /// down) by one supernode, long enough for the last round's
    /// promotions and step-downs to show in the gossip. Default 60 s.
    pub round: Duration,
    /// Least time between two promotions of one leaf ([`may_take_role`]).
    /// Default 1 h.
    pub repromote_after: Duration,
    /// Load (thousandths of `max_leaves`) at which more supernodes are needed. Default 800.
    pub high_water_permille: u32,
    /// Least time over the high-water mark before electing. Default 10 s.
    pub overload_for: Duration,
    /// Extra random wait, up to this much, before electing. Default 10 s.
    pub jitter: Duration,
    /// Least time between two elections by one supernode. Default 30 s.
    pub cooldown: Duration,
    /// Least session age (measured by the supernode) of a candidate. Default 10 min.
    pub min_uptime: Duration,
    /// Least idle CPU of a candidate, thousandths. Default 500.
    pub min_cpu_idle_permille: u16,
    /// Least available memory of a candidate, MiB. Default 512.
    pub min_mem_mib: u32,
    /// An elected supernode with at most this many leaves is drained. Default 0.
    pub drained_leaves: usize,
    /// How long it must stay drained before stepping down. Default 5 min.
    pub drain_for: Duration,
    /// How often the rules are applied (at least every millisecond). Default 250 ms.
    pub tick: Duration,
    /// Longest wait for a dial-back. Default 5 s.
    pub probe_timeout: Duration,
    /// A failed dial-back is retried once this long has passed. Default 60 s.
    pub probe_retry: Duration,
    /// Least time between two dial-backs of one leaf. Default 10 s.
    pub probe_spacing: Duration,
    /// Longest wait, after a leaf accepted `Promote`, for it to join the
    /// mesh before handing leaves over to it. Default 10 s.
    pub join_timeout: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            rules: Rules::Need,
            elect_below_spare_permille: 80,
            target_spare_permille: 120,
            step_down_spare_permille: 160,
            step_down_now_spare_permille: 200,
            step_down_chance_max_permille: 500,
            round: Duration::from_secs(60),
            repromote_after: Duration::from_secs(3600),
            high_water_permille: 800,
            overload_for: Duration::from_secs(10),
            jitter: Duration::from_secs(10),
            cooldown: Duration::from_secs(30),
            min_uptime: Duration::from_secs(600),
            min_cpu_idle_permille: 500,
            min_mem_mib: 512,
            drained_leaves: 0,
            drain_for: Duration::from_secs(300),
            tick: Duration::from_millis(250),
            probe_timeout: Duration::from_secs(5),
            probe_retry: Duration::from_secs(60),
            probe_spacing: Duration::from_secs(10),
            join_timeout: Duration::from_secs(10),
        }
    }
}

/// What a supernode knows of one of its leaves as a candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<N> {
    pub id: N,
    /// How long its session has lasted, as the supernode measured it.
    pub session_age: Duration,
    /// Whether a dial-back through another socket reached it (None: not yet tried).
    pub reachable: Option<bool>,
    pub cpu_idle_permille: u16,
    pub mem_available_mib: u32,
    pub upload_kbps: u32,
}

/// Whether `c` may be elected at all (reachability aside).
pub fn qualifies<N>(c: &Candidate<N>, p: &Policy) -> bool {
    c.session_age >= p.min_uptime
        && c.cpu_idle_permille >= p.min_cpu_idle_permille
        && c.mem_available_mib >= p.min_mem_mib
}

/// The best qualified, reachable candidate: most upload capacity, then most
/// memory, then longest up.
pub fn best<'a, N>(candidates: &'a [Candidate<N>], p: &Policy) -> Option<&'a Candidate<N>> {
    candidates
        .iter()
        .filter(|c| qualifies(c, p) && c.reachable == Some(true))
        .max_by_key(|c| (c.upload_kbps, c.mem_available_mib, c.session_age))
}

/// What the supernode should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Nothing,
    /// Promote the best candidate.
    Elect,
    /// Step down (only ever for an elected supernode).
    StepDown,
}

/// One supernode's election state.
#[derive(Debug, Clone, Default)]
pub struct Elector {
    overloaded_since: Option<Instant>,
    /// The random extra wait for the current overload episode.
    wait: Duration,
    last_election: Option<Instant>,
    /// Overload rules: drained since; need rules: not needed since.
    drained_since: Option<Instant>,
    /// Need rules: the last draw, to elect or to step down.
    last_draw: Option<Instant>,
}

impl Elector {
    /// Decides, given the load now. `random` is uniform in [0, 1), drawn
    /// by the caller (a new overload episode uses it for its jitter).
    /// `elected`: this supernode was a leaf once and may step down;
    /// `others`: other supernodes exist for its leaves to go to.
    #[allow(clippy::too_many_arguments)]
    pub fn tick(
        &mut self,
        now: Instant,
        leaves: usize,
        max_leaves: usize,
        elected: bool,
        others: bool,
        random: f64,
        p: &Policy,
    ) -> Decision {
        // No capacity at all counts as full.
        let load = leaves
            .saturating_mul(1000)
            .checked_div(max_leaves)
            .unwrap_or(1000);
        if load >= p.high_water_permille as usize {
            self.drained_since = None;
            let since = *self.overloaded_since.get_or_insert_with(|| {
                self.wait = p.overload_for + p.jitter.mul_f64(random.clamp(0.0, 1.0));
                now
            });
            let cooled = self
                .last_election
                .is_none_or(|t| now.saturating_duration_since(t) >= p.cooldown);
            if cooled && now.saturating_duration_since(since) >= self.wait {
                return Decision::Elect;
            }
            return Decision::Nothing;
        }
        self.overloaded_since = None;
        if elected && others && leaves <= p.drained_leaves {
            let since = *self.drained_since.get_or_insert(now);
            if now.saturating_duration_since(since) >= p.drain_for {
                return Decision::StepDown;
            }
        } else {
            self.drained_since = None;
        }
        Decision::Nothing
    }

    /// Decides by the need rules, given this supernode's load `me` and
    /// what `need` makes of the network it knows. `others_take_mine`:
    /// the supernodes it would send its leaves to have room for all of
    /// them under their marks. `random` is uniform in [0, 1), a fresh draw
    /// at each tick.
    #[allow(clippy::too_many_arguments)]
    pub fn tick_need(
        &mut self,
        now: Instant,
        me: Room,
        need: &Need,
        elected: bool,
        others_take_mine: bool,
        random: f64,
        p: &Policy,
    ) -> Decision {
        let random = random.clamp(0.0, 1.0);
        let since = |t: Instant| now.saturating_duration_since(t);
        let drawn = self.last_draw.is_some_and(|t| since(t) < p.round);
        let overloaded = load_permille(me) >= u64::from(p.high_water_permille);
        if overloaded && need.short(p) {
            self.drained_since = None;
            let start = *self.overloaded_since.get_or_insert_with(|| {
                self.wait = p.overload_for + p.jitter.mul_f64(random);
                now
            });
            let cooled = self
                .last_election
                .is_none_or(|t| since(t) >= p.cooldown.max(p.round));
            if since(start) < self.wait || drawn || !cooled {
                return Decision::Nothing;
            }
            self.last_draw = Some(now);
            return if random < need.elect_chance(p) {
                Decision::Elect
            } else {
                Decision::Nothing
            };
        }
        self.overloaded_since = None;
        if elected
            && others_take_mine
            && need.spare_without_permille(me) >= p.step_down_spare_permille.into()
        {
            let start = *self.drained_since.get_or_insert(now);
            let waited = since(start) >= p.drain_for || need.plainly_surplus(me, p);
            if !waited || drawn {
                return Decision::Nothing;
            }
            self.last_draw = Some(now);
            if random < need.step_down_chance(me, p) {
                return Decision::StepDown;
            }
        } else {
            self.drained_since = None;
        }
        Decision::Nothing
    }

    /// Records that an election was made (whether or not a leaf accepted):
    /// the cool-down starts and a new overload episode must begin.
    pub fn elected(&mut self, now: Instant) {
        self.last_election = Some(now);
        self.overloaded_since = None;
    }
}

/// Load of `r`, thousandths of its `max_leaves` (no capacity counts as full).
fn load_permille(r: Room) -> u64 {
    (u64::from(r.leaves) * 1000)
        .checked_div(r.max_leaves.into())
        .unwrap_or(1000)
}

/// What the need rules make of the network a supernode knows: itself and
/// the loads its neighbours' `Status` told it of.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Need {
    /// Supernodes counted (this one included).
    pub supernodes: u64,
    /// Of them, at or over the high-water mark.
    pub overloaded: u64,
    /// Their `max_leaves`, summed.
    pub capacity: u64,
    /// Their leaves, each counted at most at its `max_leaves`.
    pub leaves: u64,
    /// Of them, about how many were elected (and so may step down):
    /// `supernodes` × the elected share of this supernode's neighbours,
    /// itself counted as elected ([`Load::neighbours_elected`]).
    pub elected: f64,
}

impl Need {
    /// Counts `me` and every entry of `known` (at most
    /// [`MAX_NEED_SAMPLE`] of them: the estimate needs no more, and a
    /// hostile list costs nothing beyond); `neighbours_elected` is
    /// [`Load::neighbours_elected`].
    pub fn of(me: Room, known: &[Room], neighbours_elected: (usize, usize), p: &Policy) -> Self {
        let mut n = Need {
            supernodes: 0,
            overloaded: 0,
            capacity: 0,
            leaves: 0,
            elected: 0.0,
        };
        for r in std::iter::once(&me).chain(known.iter().take(MAX_NEED_SAMPLE)) {
            n.supernodes += 1;
            n.overloaded += u64::from(load_permille(*r) >= u64::from(p.high_water_permille));
            n.capacity += u64::from(r.max_leaves);
            n.leaves += u64::from(r.leaves.min(r.max_leaves));
        }
        let (elected, of) = neighbours_elected;
        let share = (elected.min(of) + 1) as f64 / (of + 1) as f64;
        n.elected = n.supernodes as f64 * share;
        n
    }

    /// Free share of the capacity, thousandths (0 with no capacity).
    pub fn spare_permille(&self) -> u64 {
        (self.capacity.saturating_sub(self.leaves) * 1000)
            .checked_div(self.capacity)
            .unwrap_or(0)
    }

    /// Whether less than `elect_below_spare_permille` is free.
    pub fn short(&self, p: &Policy) -> bool {
        self.spare_permille() < u64::from(p.elect_below_spare_permille)
    }

    /// Free share if `me` stepped down: its capacity goes, its leaves
    /// stay (they re-home to the others). 0 when nothing would be left.
    pub fn spare_without_permille(&self, me: Room) -> u64 {
        let capacity = self.capacity.saturating_sub(me.max_leaves.into());
        (capacity.saturating_sub(self.leaves) * 1000)
            .checked_div(capacity)
            .unwrap_or(0)
    }

    /// The mean `max_leaves` of the supernodes counted (at least 1).
    fn mean_capacity(&self) -> f64 {
        (self.capacity as f64 / self.supernodes.max(1) as f64).max(1.0)
    }

    /// Supernodes (of the mean capacity) lacking for `target_spare_permille`
    /// of the capacity to be free; negative: that many to spare.
    pub fn deficit(&self, p: &Policy) -> f64 {
        let free = 1.0 - f64::from(p.target_spare_permille.min(999)) / 1000.0;
        (self.leaves as f64 / free - self.capacity as f64) / self.mean_capacity()
    }

    /// The chance that one overloaded supernode elects in this round: the
    /// deficit (at least one supernode, since the network is short) shared
    /// among the overloaded supernodes known, so that between them they
    /// promote about the deficit. A full network hides how much more its
    /// leaves want; the rounds that follow elect again while it stays short.
    pub fn elect_chance(&self, p: &Policy) -> f64 {
        if !self.short(p) {
            return 0.0;
        }
        (self.deficit(p).max(1.0) / self.overloaded.max(1) as f64).clamp(0.0, 1.0)
    }

    /// The chance that `me`, an elected supernode not needed, steps down
    /// in this round: the surplus (the supernodes that could go and leave
    /// `step_down_spare_permille` free) shared among the elected
    /// supernodes known ([`Need::elected`]), so that between them about the
    /// surplus steps down in one round, but at most
    /// `step_down_chance_max_permille` (an elected share misjudged low,
    /// from a few neighbours, must not take them all at once). The
    /// hysteresis gap below the mark that elects absorbs a round that
    /// overshoots by a few.
    pub fn step_down_chance(&self, me: Room, p: &Policy) -> f64 {
        if self.spare_without_permille(me) < u64::from(p.step_down_spare_permille) {
            return 0.0;
        }
        let free = 1.0 - f64::from(p.step_down_spare_permille.min(999)) / 1000.0;
        let surplus = (self.capacity as f64 - self.leaves as f64 / free) / self.mean_capacity();
        let most = f64::from(p.step_down_chance_max_permille.min(1000)) / 1000.0;
        (surplus / self.elected.max(1.0)).clamp(0.0, most)
    }

    /// Whether, without `me`, so much would be free
    /// (`step_down_now_spare_permille`) that the surplus is no passing dip
    /// of load: an elected supernode then steps down without waiting out
    /// `drain_for`.
    pub fn plainly_surplus(&self, me: Room, p: &Policy) -> bool {
        self.spare_without_permille(me) >= u64::from(p.step_down_now_spare_permille)
    }
}

/// The most loads the need rules count, besides a supernode's own.
pub const MAX_NEED_SAMPLE: usize = 4096;

/// Longest a stepping-down supernode waits for the leaves it sent
/// elsewhere to leave (each keeps its session until it is registered
/// elsewhere, at most `AttachConfig::rehome_grace`, 10 s), before it stops
/// its role anyway (docs/PROTOCOL.md 12.4).
pub const STEP_DOWN_WAIT: Duration = Duration::from_secs(12);

/// The oldest news of another supernode's load that the need rules count
/// (`mesh::Membership::loads`): in a network that grows or shrinks by
/// the minute, older loads would keep showing a shortage already met.
pub const NEED_SAMPLE_MAX_AGE: Duration = Duration::from_secs(30);

/// The shortest tick: a tick of zero would have the driver spin.
const MIN_TICK: Duration = Duration::from_millis(1);

/// The spare room of one other supernode, as last gossiped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    pub leaves: u32,
    pub max_leaves: u32,
}

/// How many leaves the supernodes in `others` can take between them and
/// stay under their high-water marks (each mark taken at this supernode's
/// own `high_water_permille`).
pub fn room(others: &[Room], p: &Policy) -> u64 {
    others
        .iter()
        .map(|r| {
            (u64::from(r.max_leaves) * u64::from(p.high_water_permille) / 1000)
                .saturating_sub(r.leaves.into())
        })
        .sum()
}

/// What the driver tells [`Election::handle_timeout`] of the load now.
#[derive(Debug, Clone, Copy)]
pub struct Load<'a> {
    /// Leaves registered with this supernode.
    pub leaves: usize,
    /// Its `max_leaves` setting.
    pub max_leaves: usize,
    /// The other supernodes it would send its leaves to (those it would
    /// list in a `Full`): only when they have room for all of its leaves may
    /// an elected supernode step down, or its leaves would push another over
    /// the mark and a new election would follow.
    pub others: &'a [Room],
    /// Need rules: the load of every other supernode it knows of
    /// (neighbours, and the entries of their gossip heard of recently),
    /// full ones included: the sample the network's need is judged by.
    pub known: &'a [Room],
    /// Need rules: how many of this supernode's neighbours said (in their
    /// `Status`) that they were elected, and of how many: the share of the
    /// supernodes known that may step down.
    pub neighbours_elected: (usize, usize),
}

/// How a promoted leaf answered `Promote`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromoteReply {
    /// It took the role.
    Accepted,
    /// It refused: it is no longer a candidate until its next `Candidacy`.
    Declined,
    /// No answer (the leaf went, the stream broke): it stays a candidate.
    Failed,
}

/// What the driver must do for the election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<N> {
    /// Dial `addr` back from a socket of its own, expecting node `id`, and
    /// give up after `timeout`; report with [`Election::handle_probe`].
    Probe {
        id: N,
        addr: SocketAddr,
        timeout: Duration,
    },
    /// Send `Promote { max_leaves }` to leaf `id`; report its answer with
    /// [`Election::handle_promote_reply`], then, once it is a neighbour in
    /// the mesh, call [`Election::handle_joined`] (while
    /// [`Election::awaiting_join`] names it).
    Promote { id: N },
    /// Send `Rehome([to at addr])` to `count` of our leaves other than
    /// `to`, one after the other; report with [`Election::handle_handover_done`].
    HandOver {
        to: N,
        addr: SocketAddr,
        count: usize,
    },
    /// Send every leaf to the supernodes with room, close every leaf and
    /// mesh connection, and stop the role. The core does nothing after this.
    StepDown,
}

/// What is known of one leaf that offered itself.
#[derive(Debug, Clone)]
struct Offer {
    candidacy: Candidacy,
    /// When its session began.
    since: Instant,
    /// Its source address (observed IP, announced port).
    addr: SocketAddr,
    reachable: Option<bool>,
    probed_at: Option<Instant>,
    /// The address being dialled back, while a dial-back is out.
    probing: Option<SocketAddr>,
}

/// The one promotion under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Promotion<N> {
    /// `Promote` sent, no answer yet.
    Asked(N),
    /// Accepted; waiting for it to join the mesh until the deadline.
    Joining(N, Instant),
    /// Leaves are being handed over to it.
    HandingOver(N),
}

/// One supernode's whole election, as a state machine (see the module doc).
///
/// Generic over the node id `N`, so that a simulator may use small ids.
/// Candidates are kept in id order, so that the same inputs always give the
/// same actions.
#[derive(Debug, Clone)]
pub struct Election<N> {
    policy: Policy,
    /// This supernode was a leaf once, and may step down.
    elected: bool,
    offers: BTreeMap<N, Offer>,
    elector: Elector,
    rng: SplitMix64,
    promotion: Option<Promotion<N>>,
    next_tick: Instant,
    actions: VecDeque<Action<N>>,
    promotions: u64,
    stepped_down: bool,
}

impl<N: Copy + Ord> Election<N> {
    /// A new election, first ticking one `policy.tick` after `now`.
    /// `elected`: this supernode was a leaf once and may step down. `seed`
    /// seeds the random waits.
    pub fn new(policy: Policy, elected: bool, seed: u64, now: Instant) -> Self {
        Self {
            next_tick: now + policy.tick.max(MIN_TICK),
            policy,
            elected,
            offers: BTreeMap::new(),
            elector: Elector::default(),
            rng: SplitMix64::new(seed),
            promotion: None,
            actions: VecDeque::new(),
            promotions: 0,
            stepped_down: false,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Records a leaf's candidacy; `since` is when its session began and
    /// `addr` its source address. A new address must be dialled back anew.
    pub fn offer(&mut self, id: N, candidacy: Candidacy, since: Instant, addr: SocketAddr) {
        let o = self.offers.entry(id).or_insert(Offer {
            candidacy: candidacy.clone(),
            since,
            addr,
            reachable: None,
            probed_at: None,
            probing: None,
        });
        o.candidacy = candidacy;
        if o.addr != addr {
            // What a dial-back of the old address finds says nothing of the new.
            o.addr = addr;
            o.reachable = None;
            o.probing = None;
        }
    }

    /// Forgets a leaf (its session ended, or a new one replaced it).
    pub fn withdraw(&mut self, id: &N) {
        self.offers.remove(id);
    }

    /// Whether a leaf's dial-back succeeded: `None` if it has not offered
    /// itself, `Some(None)` if not checked yet.
    pub fn reachable(&self, id: &N) -> Option<Option<bool>> {
        self.offers.get(id).map(|o| o.reachable)
    }

    /// Leaves that offered themselves, as the election rules see them.
    pub fn candidates(&self, now: Instant) -> Vec<Candidate<N>> {
        self.offers
            .iter()
            .map(|(id, o)| Candidate {
                id: *id,
                session_age: now.saturating_duration_since(o.since),
                reachable: o.reachable,
                cpu_idle_permille: o.candidacy.cpu_idle_permille,
                mem_available_mib: o.candidacy.mem_available_mib,
                upload_kbps: o.candidacy.upload_kbps,
            })
            .collect()
    }

    /// The result of a dial-back of `id` at `addr`. A result for an address
    /// the leaf no longer has is ignored.
    pub fn handle_probe(&mut self, _now: Instant, id: N, addr: SocketAddr, reachable: bool) {
        if let Some(o) = self.offers.get_mut(&id) {
            if o.addr == addr {
                o.reachable = Some(reachable);
                o.probing = None;
            }
        }
    }

    /// How leaf `id` answered `Promote`.
    pub fn handle_promote_reply(&mut self, now: Instant, id: N, reply: PromoteReply) {
        if self.promotion != Some(Promotion::Asked(id)) {
            return;
        }
        match reply {
            PromoteReply::Accepted => {
                self.promotions += 1;
                self.offers.remove(&id);
                self.promotion = Some(Promotion::Joining(id, now + self.policy.join_timeout));
            }
            PromoteReply::Declined => {
                self.offers.remove(&id);
                self.promotion = None;
            }
            PromoteReply::Failed => self.promotion = None,
        }
    }

    /// The promoted leaf the driver should watch the mesh for.
    pub fn awaiting_join(&self) -> Option<N> {
        match self.promotion {
            Some(Promotion::Joining(id, _)) => Some(id),
            _ => None,
        }
    }

    /// The promoted leaf `id` is now a neighbour, its link coming from
    /// `addr`; `leaves` is how many leaves this supernode holds now. Half
    /// of them are handed over.
    pub fn handle_joined(&mut self, _now: Instant, id: N, addr: SocketAddr, leaves: usize) {
        if self.awaiting_join() != Some(id) {
            return;
        }
        self.promotion = Some(Promotion::HandingOver(id));
        self.actions.push_back(Action::HandOver {
            to: id,
            addr,
            count: leaves / 2,
        });
    }

    /// The hand-over to `to` is done: another promotion may start.
    pub fn handle_handover_done(&mut self, _now: Instant, to: N) {
        if self.promotion == Some(Promotion::HandingOver(to)) {
            self.promotion = None;
        }
    }

    /// When [`Election::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.stepped_down {
            return None;
        }
        let probes = self
            .offers
            .values()
            .filter(|o| o.probing.is_some())
            .filter_map(|o| o.probed_at.map(|t| t + self.policy.probe_timeout));
        let join = match self.promotion {
            Some(Promotion::Joining(_, deadline)) => Some(deadline),
            _ => None,
        };
        probes.chain(join).chain([self.next_tick]).min()
    }

    /// Expires dial-backs and the wait for a join, and applies the rules
    /// when a tick is due, given the load now.
    pub fn handle_timeout(&mut self, now: Instant, load: &Load<'_>) {
        if self.stepped_down {
            return;
        }
        let timeout = self.policy.probe_timeout;
        for o in self.offers.values_mut() {
            let expired = o
                .probed_at
                .is_some_and(|t| now.saturating_duration_since(t) >= timeout);
            if o.probing.is_some() && expired {
                o.probing = None;
                o.reachable = Some(false);
            }
        }
        if let Some(Promotion::Joining(_, deadline)) = self.promotion {
            if now >= deadline {
                // It accepted but never meshed with us: hand nothing over.
                self.promotion = None;
            }
        }
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + self.policy.tick.max(MIN_TICK);
        self.tick(now, load);
    }

    fn tick(&mut self, now: Instant, load: &Load<'_>) {
        self.probe_due(now);
        let others = room(load.others, &self.policy) > load.leaves as u64;
        let random = self.rng.next_f64();
        let decision = match self.policy.rules {
            Rules::Overload => self.elector.tick(
                now,
                load.leaves,
                load.max_leaves,
                self.elected,
                others,
                random,
                &self.policy,
            ),
            Rules::Need => {
                let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                let me = Room {
                    leaves: clamp(load.leaves),
                    max_leaves: clamp(load.max_leaves),
                };
                let need = Need::of(me, load.known, load.neighbours_elected, &self.policy);
                // Stepping down while a promotion is under way would
                // strand the leaf being promoted.
                let elected = self.elected && self.promotion.is_none();
                self.elector
                    .tick_need(now, me, &need, elected, others, random, &self.policy)
            }
        };
        match decision {
            Decision::Nothing => {}
            Decision::Elect => {
                let candidates = self.candidates(now);
                // No candidate yet: try again at the next tick.
                let Some(id) = best(&candidates, &self.policy).map(|c| c.id) else {
                    return;
                };
                self.elector.elected(now);
                // One promotion at a time; the cool-down runs anyway.
                if self.promotion.is_none() {
                    self.promotion = Some(Promotion::Asked(id));
                    self.actions.push_back(Action::Promote { id });
                }
            }
            Decision::StepDown => {
                self.stepped_down = true;
                // Whatever was under way ends with the role.
                self.promotion = None;
                self.actions.push_back(Action::StepDown);
            }
        }
    }

    /// Dials back the qualified candidates not yet checked, those whose
    /// last dial-back failed `probe_retry` ago, never one twice within
    /// `probe_spacing`.
    fn probe_due(&mut self, now: Instant) {
        let p = &self.policy;
        for (id, o) in self.offers.iter_mut() {
            let since = |t: Instant| now.saturating_duration_since(t);
            let due = o.reachable.is_none()
                || (o.reachable == Some(false)
                    && o.probed_at.is_some_and(|t| since(t) > p.probe_retry));
            let qualifies = since(o.since) >= p.min_uptime
                && o.candidacy.cpu_idle_permille >= p.min_cpu_idle_permille
                && o.candidacy.mem_available_mib >= p.min_mem_mib;
            let spaced = o.probed_at.is_none_or(|t| since(t) >= p.probe_spacing);
            if !due || !qualifies || !spaced || o.probing.is_some() {
                continue;
            }
            o.probed_at = Some(now);
            o.probing = Some(o.addr);
            self.actions.push_back(Action::Probe {
                id: *id,
                addr: o.addr,
                timeout: p.probe_timeout,
            });
        }
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action<N>> {
        self.actions.pop_front()
    }

    /// Leaves that accepted a promotion from this supernode.
    pub fn promotions(&self) -> u64 {
        self.promotions
    }

    /// Whether a promotion is under way (asked, joining or handing over).
    pub fn promoting(&self) -> bool {
        self.promotion.is_some()
    }

    /// Whether this supernode has decided to step down.
    pub fn stepped_down(&self) -> bool {
        self.stepped_down
    }
}

/// Why a leaf refuses `Promote`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It runs with `--no-promote`.
    OptedOut,
    /// It holds the role already: accepting again would cost the asker its
    /// cool-down and send it leaves that this supernode never meshed to take.
    AlreadySupernode,
}

impl Refusal {
    /// The text of its `Declined`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::OptedOut => "this leaf never becomes a supernode (--no-promote)",
            Refusal::AlreadySupernode => "already a supernode",
        }
    }
}

/// The leaf's side: whether it takes the supernode role when asked.
pub fn answer_promote(no_promote: bool, holds_role: bool) -> Result<(), Refusal> {
    if no_promote {
        Err(Refusal::OptedOut)
    } else if holds_role {
        Err(Refusal::AlreadySupernode)
    } else {
        Ok(())
    }
}

/// The text of the `Declined` of a leaf promoted less than
/// `repromote_after` ago.
pub const RECENTLY_PROMOTED: &str =
    "promoted too recently to take the role again (repromote_after)";

/// Whether a leaf last promoted `since` ago (None: never) may take the
/// role again, and so offer itself: at most one promotion a leaf per
/// `repromote_after`, so that a leaf that stepped down is not elected
/// straight back (no flapping).
pub fn may_take_role(since: Option<Duration>, p: &Policy) -> bool {
    since.is_none_or(|d| d >= p.repromote_after)
}

/// The most leaves a promoted leaf's role takes when asked for
/// `max_leaves`: at least one.
pub fn role_max_leaves(asked: u32) -> usize {
    asked.max(1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            overload_for: Duration::from_secs(10),
            jitter: Duration::from_secs(10),
            cooldown: Duration::from_secs(30),
            drain_for: Duration::from_secs(60),
            ..Policy::default()
        }
    }

    #[test]
    fn elects_only_after_a_damped_overload_and_then_cools_down() {
        let p = policy();
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut e = Elector::default();
        assert_eq!(e.tick(t, 9, 10, false, true, 0.5, &p), Decision::Nothing);
        // 10 s + 0.5 × 10 s of jitter = 15 s.
        assert_eq!(
            e.tick(t + s(14), 9, 10, false, true, 0.9, &p),
            Decision::Nothing
        );
        assert_eq!(
            e.tick(t + s(15), 9, 10, false, true, 0.9, &p),
            Decision::Elect
        );
        e.elected(t + s(15));
        // Still overloaded, but cooling down.
        assert_eq!(
            e.tick(t + s(16), 10, 10, false, true, 0.0, &p),
            Decision::Nothing
        );
        assert_eq!(
            e.tick(t + s(40), 10, 10, false, true, 0.0, &p),
            Decision::Nothing
        );
        assert_eq!(
            e.tick(t + s(46), 10, 10, false, true, 0.0, &p),
            Decision::Elect
        );
    }

    #[test]
    fn a_dip_below_the_high_water_mark_restarts_the_wait() {
        let p = policy();
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut e = Elector::default();
        e.tick(t, 9, 10, false, true, 0.0, &p);
        e.tick(t + s(9), 5, 10, false, true, 0.0, &p);
        assert_eq!(
            e.tick(t + s(12), 9, 10, false, true, 0.0, &p),
            Decision::Nothing
        );
        assert_eq!(
            e.tick(t + s(22), 9, 10, false, true, 0.0, &p),
            Decision::Elect
        );
    }

    #[test]
    fn only_an_elected_supernode_steps_down_and_only_when_drained_long_enough() {
        let p = policy();
        let t = Instant::now();
        let s = Duration::from_secs;
        let mut dedicated = Elector::default();
        assert_eq!(
            dedicated.tick(t + s(1000), 0, 10, false, true, 0.0, &p),
            Decision::Nothing
        );
        let mut e = Elector::default();
        assert_eq!(e.tick(t, 0, 10, true, true, 0.0, &p), Decision::Nothing);
        assert_eq!(
            e.tick(t + s(30), 1, 10, true, true, 0.0, &p),
            Decision::Nothing
        );
        assert_eq!(
            e.tick(t + s(31), 0, 10, true, true, 0.0, &p),
            Decision::Nothing
        );
        assert_eq!(
            e.tick(t + s(90), 0, 10, true, true, 0.0, &p),
            Decision::Nothing
        );
        assert_eq!(
            e.tick(t + s(91), 0, 10, true, true, 0.0, &p),
            Decision::StepDown
        );
        let mut alone = Elector::default();
        alone.tick(t, 0, 10, true, false, 0.0, &p);
        assert_eq!(
            alone.tick(t + s(1000), 0, 10, true, false, 0.0, &p),
            Decision::Nothing,
            "the last supernode stays"
        );
    }

    #[test]
    fn the_best_candidate_is_qualified_reachable_and_strongest() {
        let p = Policy {
            min_uptime: Duration::from_secs(60),
            ..Policy::default()
        };
        let c = |id: u8, age: u64, reach: Option<bool>, kbps: u32| Candidate {
            id,
            session_age: Duration::from_secs(age),
            reachable: reach,
            cpu_idle_permille: 900,
            mem_available_mib: 4096,
            upload_kbps: kbps,
        };
        let cands = [
            c(1, 30, Some(true), 9000),   // too young
            c(2, 100, Some(false), 9000), // unreachable
            c(3, 100, None, 9000),        // not yet checked
            c(4, 100, Some(true), 100),
            c(5, 100, Some(true), 500),
        ];
        assert_eq!(best(&cands, &p).map(|c| c.id), Some(5));
        let weak = Candidate {
            mem_available_mib: 10,
            ..c(6, 100, Some(true), 99_999)
        };
        assert!(!qualifies(&weak, &p));
    }

    // The state machine, on a made-up clock.

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn quick() -> Policy {
        Policy {
            rules: Rules::Overload,
            overload_for: Duration::from_secs(1),
            jitter: Duration::ZERO,
            cooldown: Duration::from_secs(3),
            min_uptime: Duration::from_secs(1),
            min_cpu_idle_permille: 0,
            min_mem_mib: 0,
            drain_for: Duration::from_secs(2),
            ..Policy::default()
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    fn candidacy(kbps: u32) -> Candidacy {
        Candidacy {
            cpu_idle_permille: 900,
            mem_available_mib: 4096,
            upload_kbps: kbps,
        }
    }

    /// A supernode core with a clock, fed the same load at every step.
    struct Rig {
        e: Election<u8>,
        now: Instant,
        leaves: usize,
        max_leaves: usize,
        others: Vec<Room>,
        known: Vec<Room>,
        /// Every action, with the time it came out.
        log: Vec<(Duration, Action<u8>)>,
        t0: Instant,
        /// Whom a dial-back reaches (answered at once); others time out.
        reachable: Vec<u8>,
    }

    impl Rig {
        fn new(p: Policy, elected: bool) -> Self {
            let t0 = Instant::now();
            Self {
                e: Election::new(p, elected, 7, t0),
                now: t0,
                leaves: 10,
                max_leaves: 10,
                others: Vec::new(),
                known: Vec::new(),
                log: Vec::new(),
                t0,
                reachable: Vec::new(),
            }
        }

        /// Runs the core until `until` after the start, stepping from one
        /// timeout to the next, answering dial-backs from `reachable`.
        fn run_until(&mut self, until: Duration) {
            let end = self.t0 + until;
            while let Some(t) = self.e.poll_timeout() {
                if t > end {
                    break;
                }
                self.now = self.now.max(t);
                let load = Load {
                    leaves: self.leaves,
                    max_leaves: self.max_leaves,
                    others: &self.others,
                    known: &self.known,
                    neighbours_elected: (0, 0),
                };
                self.e.handle_timeout(self.now, &load);
                self.drain();
            }
            self.now = self.now.max(end);
        }

        fn drain(&mut self) {
            while let Some(a) = self.e.poll_action() {
                if let Action::Probe { id, addr, .. } = a {
                    if self.reachable.contains(&id) {
                        self.e.handle_probe(self.now, id, addr, true);
                    }
                }
                self.log.push((self.now - self.t0, a));
            }
        }

        fn promotes(&self) -> Vec<(Duration, u8)> {
            self.log
                .iter()
                .filter_map(|(t, a)| match a {
                    Action::Promote { id } => Some((*t, *id)),
                    _ => None,
                })
                .collect()
        }

        fn probes(&self, who: u8) -> Vec<Duration> {
            self.log
                .iter()
                .filter_map(|(t, a)| match a {
                    Action::Probe { id, .. } if *id == who => Some(*t),
                    _ => None,
                })
                .collect()
        }
    }

    #[test]
    fn an_unreachable_candidate_is_never_promoted() {
        let mut r = Rig::new(quick(), false);
        // The strongest candidate cannot be reached; the other can.
        r.e.offer(1, candidacy(9000), r.t0, addr(1));
        r.run_until(Duration::from_secs(120));
        assert!(
            r.promotes().is_empty(),
            "no reachable candidate, no promotion"
        );
        assert_eq!(r.e.reachable(&1), Some(Some(false)));
        assert!(!r.e.promoting() && r.e.promotions() == 0);

        r.reachable.push(2);
        r.e.offer(2, candidacy(10), r.now, addr(2));
        r.run_until(Duration::from_secs(240));
        let promoted: Vec<u8> = r.promotes().iter().map(|(_, id)| *id).collect();
        assert_eq!(promoted.first(), Some(&2));
        assert!(!promoted.contains(&1));
    }

    #[test]
    fn a_failed_dial_back_is_retried_after_probe_retry_and_a_new_address_at_once() {
        let p = quick();
        let mut r = Rig::new(p.clone(), false);
        r.leaves = 0; // Not electing: only the dial-backs matter here.
        r.e.offer(1, candidacy(0), r.t0, addr(1));
        r.run_until(Duration::from_secs(183));
        let probes = r.probes(1);
        // Qualifies at 1 s (first tick at or after it), times out 5 s later,
        // retried once more than 60 s have passed since the last attempt.
        assert_eq!(probes[0], Duration::from_secs(1));
        for w in probes.windows(2) {
            assert!(w[1] - w[0] > p.probe_retry, "{probes:?}");
            assert!(w[1] - w[0] <= p.probe_retry + p.tick, "{probes:?}");
        }
        assert_eq!(probes.len(), 4, "{probes:?}");
        assert_eq!(r.e.reachable(&1), Some(Some(false)));

        // A new source address is checked anew, but never twice within 10 s,
        // and the dial-back of the old one, still out, does not count.
        let last = *probes.last().unwrap();
        r.e.offer(1, candidacy(0), r.t0, addr(2));
        assert_eq!(r.e.reachable(&1), Some(None));
        r.run_until(last + Duration::from_secs(20));
        let again = r.probes(1);
        assert_eq!(again.len(), 5);
        assert_eq!(again[4], last + p.probe_spacing);
        // A late answer for the old address changes nothing.
        r.e.handle_probe(r.now, 1, addr(1), true);
        assert_eq!(r.e.reachable(&1), Some(Some(false)));
        r.e.handle_probe(r.now, 1, addr(2), true);
        assert_eq!(r.e.reachable(&1), Some(Some(true)));
    }

    #[test]
    fn a_leaf_is_dialled_back_only_once_it_qualifies() {
        let mut r = Rig::new(quick(), false);
        r.leaves = 0;
        r.e.offer(
            1,
            Candidacy {
                mem_available_mib: 0,
                ..candidacy(0)
            },
            r.t0,
            addr(1),
        );
        let p = Policy {
            min_mem_mib: 1,
            ..quick()
        };
        r.e.policy = p;
        r.run_until(Duration::from_secs(30));
        assert!(r.probes(1).is_empty());
        assert_eq!(r.e.reachable(&1), Some(None));
    }

    #[test]
    fn an_overloaded_supernode_promotes_whatever_room_the_others_have() {
        // Today's rule: room elsewhere holds back a step-down, never an
        // election (an overloaded supernode cannot send its leaves away).
        for others in [
            vec![],
            vec![Room {
                leaves: 0,
                max_leaves: 1000,
            }],
        ] {
            let mut r = Rig::new(quick(), false);
            r.others = others;
            r.reachable.push(1);
            r.e.offer(1, candidacy(0), r.t0, addr(1));
            r.run_until(Duration::from_secs(5));
            assert_eq!(r.promotes().len(), 1);
        }
    }

    #[test]
    fn no_promotion_below_the_high_water_mark() {
        let mut r = Rig::new(quick(), false);
        r.leaves = 7; // 700 ‰ of 10
        r.reachable.push(1);
        r.e.offer(1, candidacy(0), r.t0, addr(1));
        r.run_until(Duration::from_secs(60));
        assert!(r.promotes().is_empty());
        assert_eq!(r.e.reachable(&1), Some(Some(true)));
        r.leaves = 8;
        r.run_until(Duration::from_secs(62));
        assert_eq!(r.promotes().len(), 1);
    }

    #[test]
    fn no_two_promotions_at_once_and_a_handover_goes_to_half_the_leaves() {
        let p = quick();
        let mut r = Rig::new(p.clone(), false);
        r.reachable.extend([1, 2]);
        r.e.offer(1, candidacy(500), r.t0, addr(1));
        r.e.offer(2, candidacy(100), r.t0, addr(2));
        r.run_until(Duration::from_secs(2));
        assert_eq!(r.promotes(), vec![(MS(1250), 1)]);
        // The leaf takes its time to answer: cool-downs pass, no second
        // promotion while the first is open.
        r.run_until(Duration::from_secs(30));
        assert_eq!(r.promotes().len(), 1);
        r.e.handle_promote_reply(r.now, 1, PromoteReply::Accepted);
        assert_eq!(r.e.promotions(), 1);
        assert_eq!(r.e.reachable(&1), None, "no longer a candidate");
        assert_eq!(r.e.awaiting_join(), Some(1));
        r.run_until(Duration::from_secs(33));
        assert_eq!(r.promotes().len(), 1, "joining is part of the promotion");
        r.e.handle_joined(r.now, 1, addr(9), 9);
        r.drain();
        assert_eq!(
            r.log.last().map(|(_, a)| a.clone()),
            Some(Action::HandOver {
                to: 1,
                addr: addr(9),
                count: 4
            })
        );
        r.run_until(Duration::from_secs(50));
        assert_eq!(r.promotes().len(), 1, "handing over is part of it too");
        r.e.handle_handover_done(r.now, 1);
        assert!(!r.e.promoting());
        // Still overloaded: the next election needs a new episode's wait.
        let done = r.now - r.t0;
        r.run_until(Duration::from_secs(60));
        let promotes = r.promotes();
        assert_eq!(promotes.len(), 2);
        assert_eq!(promotes[1].1, 2);
        assert!(promotes[1].0 >= done + p.overload_for, "{promotes:?}");
    }

    #[test]
    fn a_promoted_leaf_that_does_not_join_in_time_gets_no_leaves() {
        let p = quick();
        let mut r = Rig::new(p.clone(), false);
        r.reachable.push(1);
        r.e.offer(1, candidacy(0), r.t0, addr(1));
        r.run_until(Duration::from_secs(2));
        r.e.handle_promote_reply(r.now, 1, PromoteReply::Accepted);
        let accepted = r.now;
        assert_eq!(
            r.e.poll_timeout().map(|t| t <= accepted + p.join_timeout),
            Some(true)
        );
        r.run_until(Duration::from_secs(2) + p.join_timeout - MS(1));
        assert_eq!(r.e.awaiting_join(), Some(1));
        r.run_until(Duration::from_secs(2) + p.join_timeout);
        assert_eq!(r.e.awaiting_join(), None);
        assert!(!r.e.promoting());
        // Too late: nothing is handed over.
        r.e.handle_joined(r.now, 1, addr(9), 10);
        r.drain();
        assert!(!r
            .log
            .iter()
            .any(|(_, a)| matches!(a, Action::HandOver { .. })));
    }

    #[test]
    fn a_declined_promotion_forgets_the_candidate_and_a_failed_one_keeps_it() {
        let mut r = Rig::new(quick(), false);
        r.reachable.extend([1, 2]);
        r.e.offer(1, candidacy(500), r.t0, addr(1));
        r.e.offer(2, candidacy(100), r.t0, addr(2));
        r.run_until(Duration::from_secs(2));
        r.e.handle_promote_reply(r.now, 1, PromoteReply::Failed);
        assert_eq!(r.e.reachable(&1), Some(Some(true)));
        // An answer for a promotion not under way is ignored.
        r.e.handle_promote_reply(r.now, 1, PromoteReply::Accepted);
        assert_eq!(r.e.promotions(), 0);
        r.run_until(Duration::from_secs(10));
        assert_eq!(r.promotes().last().map(|p| p.1), Some(1), "still the best");
        r.e.handle_promote_reply(r.now, 1, PromoteReply::Declined);
        assert_eq!(r.e.reachable(&1), None);
        r.run_until(Duration::from_secs(20));
        assert_eq!(r.promotes().last().map(|p| p.1), Some(2));
    }

    #[test]
    fn an_elected_supernode_steps_down_only_drained_and_when_the_others_have_room() {
        let p = quick();
        // Drained, but the others are full: it stays.
        let mut r = Rig::new(p.clone(), true);
        r.leaves = 0;
        r.others = vec![Room {
            leaves: 8,
            max_leaves: 10,
        }];
        r.run_until(Duration::from_secs(60));
        assert!(!r.e.stepped_down());
        // One leaf, room for exactly one: not enough (room must exceed it).
        let mut r = Rig::new(
            Policy {
                drained_leaves: 1,
                ..p.clone()
            },
            true,
        );
        r.leaves = 1;
        r.others = vec![Room {
            leaves: 7,
            max_leaves: 10,
        }];
        r.run_until(Duration::from_secs(60));
        assert!(!r.e.stepped_down());
        r.others = vec![Room {
            leaves: 6,
            max_leaves: 10,
        }];
        let since = r.now;
        r.run_until(Duration::from_secs(120));
        assert!(r.e.stepped_down());
        let (at, last) = r.log.last().cloned().unwrap();
        assert_eq!(last, Action::StepDown);
        assert!(r.t0 + at >= since + p.drain_for);
        assert_eq!(r.e.poll_timeout(), None, "nothing after a step-down");
        // A dedicated supernode never steps down.
        let mut r = Rig::new(p, false);
        r.leaves = 0;
        r.others = vec![Room {
            leaves: 0,
            max_leaves: 1000,
        }];
        r.run_until(Duration::from_secs(600));
        assert!(!r.e.stepped_down());
        assert!(r.log.is_empty());
    }

    #[test]
    fn the_same_seed_and_inputs_give_the_same_actions() {
        let run = |seed| {
            let p = Policy {
                jitter: Duration::from_secs(10),
                ..quick()
            };
            let mut r = Rig::new(p, false);
            r.e = Election::new(r.e.policy.clone(), false, seed, r.t0);
            r.reachable.extend(0..20);
            for id in 0..20 {
                r.e.offer(id, candidacy(u32::from(id % 3)), r.t0, addr(id.into()));
            }
            for round in 0..5u64 {
                r.run_until(Duration::from_secs(30 * (round + 1)));
                for (_, id) in r.promotes() {
                    r.e.handle_promote_reply(r.now, id, PromoteReply::Declined);
                }
            }
            r.log
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2), "the seed draws the waits");
    }

    #[test]
    fn the_leaf_answers_promote_by_its_choice_and_its_role() {
        assert_eq!(answer_promote(false, false), Ok(()));
        assert_eq!(answer_promote(true, false), Err(Refusal::OptedOut));
        assert_eq!(answer_promote(true, true), Err(Refusal::OptedOut));
        assert_eq!(answer_promote(false, true), Err(Refusal::AlreadySupernode));
        assert_eq!(role_max_leaves(0), 1);
        assert_eq!(role_max_leaves(50), 50);
    }

    #[test]
    fn room_counts_each_mark_less_its_leaves() {
        let p = Policy::default();
        let others = [
            Room {
                leaves: 100,
                max_leaves: 1000,
            },
            Room {
                leaves: 900,
                max_leaves: 1000,
            },
            Room {
                leaves: 0,
                max_leaves: 0,
            },
        ];
        assert_eq!(room(&others, &p), 700);
    }

    // The need rules.

    fn need_policy() -> Policy {
        Policy {
            rules: Rules::Need,
            round: Duration::from_secs(10),
            ..quick()
        }
    }

    fn full(n: usize) -> Vec<Room> {
        vec![
            Room {
                leaves: 100,
                max_leaves: 100,
            };
            n
        ]
    }

    /// `n` overloaded supernodes, each seeing the others as `known` and
    /// holding one reachable candidate, run for one round: the leaves promoted.
    fn one_round(n: usize, known: &[Room], seed: u64) -> usize {
        let mut promoted = 0;
        for i in 0..n {
            let mut r = Rig::new(need_policy(), false);
            r.e = Election::new(need_policy(), false, seed * 1000 + i as u64, r.t0);
            r.leaves = 100;
            r.max_leaves = 100;
            r.known = known.to_vec();
            r.reachable.push(1);
            r.e.offer(1, candidacy(0), r.t0, addr(1));
            r.run_until(Duration::from_secs(9));
            promoted += r.promotes().len();
        }
        promoted
    }

    #[test]
    fn overloaded_supernodes_facing_a_deficit_promote_about_the_deficit_not_all() {
        let p = need_policy();
        // 100 supernodes, all full: 12 % spare needs 13.6 more.
        let known = full(99);
        let need = Need::of(known[0], &known, (0, 0), &p);
        assert_eq!(
            (need.supernodes, need.overloaded, need.spare_permille()),
            (100, 100, 0)
        );
        assert!(
            (need.deficit(&p) - 13.64).abs() < 0.01,
            "{}",
            need.deficit(&p)
        );
        let mut total = 0;
        for seed in 1..=5 {
            let promoted = one_round(100, &known, seed);
            assert!(
                (4..=28).contains(&promoted),
                "seed {seed}: {promoted} of 100"
            );
            total += promoted;
        }
        // About 14 a round over five rounds, never 100.
        assert!((45..=100).contains(&total), "{total} in 5 rounds");

        // Half of them big and full, half under their marks (79 of 100):
        // 1.9 % spare, short by 11.4; only the 50 overloaded ones draw.
        let mut known = vec![
            Room {
                leaves: 1000,
                max_leaves: 1000
            };
            49
        ];
        known.extend(vec![
            Room {
                leaves: 79,
                max_leaves: 100
            };
            50
        ]);
        let need = Need::of(full(1)[0], &known, (0, 0), &p);
        assert_eq!((need.overloaded, need.spare_permille()), (50, 19));
        assert!((need.elect_chance(&p) - 0.2286).abs() < 0.001);
        let total: usize = (1..=5).map(|seed| one_round(50, &known, seed)).sum();
        assert!(
            (35..=85).contains(&total),
            "{total} in 5 rounds, deficit 11.4 a round"
        );
        // A few full supernodes: short by less than one, yet one of them,
        // about, elects each round.
        let known = full(4);
        assert!(Need::of(known[0], &known, (0, 0), &p).deficit(&p) < 1.0);
        let total: usize = (1..=20).map(|seed| one_round(5, &known, seed)).sum();
        assert!((8..=35).contains(&total), "{total} in 20 rounds of 5 full");
    }

    #[test]
    fn an_overloaded_supernode_does_not_elect_while_the_network_has_room() {
        // Full itself, but the others it knows are half empty.
        let mut r = Rig::new(need_policy(), false);
        r.leaves = 100;
        r.max_leaves = 100;
        r.known = vec![
            Room {
                leaves: 50,
                max_leaves: 100
            };
            9
        ];
        r.reachable.push(1);
        r.e.offer(1, candidacy(0), r.t0, addr(1));
        r.run_until(Duration::from_secs(600));
        assert!(r.promotes().is_empty());
        // Alone and full: short by one at least, its own (chance 1).
        r.known.clear();
        r.run_until(Duration::from_secs(700));
        assert_eq!(r.promotes().len(), 1);
        // Not loaded itself: whatever the network lacks, another elects.
        let mut r = Rig::new(need_policy(), false);
        r.leaves = 50;
        r.max_leaves = 100;
        r.known = full(9);
        r.reachable.push(1);
        r.e.offer(1, candidacy(0), r.t0, addr(1));
        r.run_until(Duration::from_secs(600));
        assert!(r.promotes().is_empty());
    }

    #[test]
    fn an_elected_supernode_not_needed_steps_down_once_and_a_needed_one_stays() {
        let p = need_policy();
        // Without it, 19.6 % of the room known would be free: over the
        // step-down mark (16 %), under the plain-surplus one (20 %). It
        // steps down within a few rounds after `drain_for`, and nothing
        // comes after.
        let mut r = Rig::new(p.clone(), true);
        r.leaves = 10;
        r.max_leaves = 100;
        r.others = vec![Room {
            leaves: 10,
            max_leaves: 100,
        }];
        r.known = r.others.clone();
        r.known.extend(vec![
            Room {
                leaves: 88,
                max_leaves: 100
            };
            8
        ]);
        r.run_until(Duration::from_secs(600));
        assert!(r.e.stepped_down());
        let downs = r.log.iter().filter(|(_, a)| *a == Action::StepDown).count();
        assert_eq!(downs, 1);
        let at = r.log.last().unwrap().0;
        assert!(at >= p.drain_for, "{at:?}");
        assert_eq!(r.e.poll_timeout(), None);

        // Ten supernodes at 10 %: plainly too many. It steps down in its
        // first rounds, without waiting out `drain_for`.
        let mut r = Rig::new(p.clone(), true);
        r.leaves = 10;
        r.max_leaves = 100;
        r.others = vec![
            Room {
                leaves: 10,
                max_leaves: 100
            };
            9
        ];
        r.known = r.others.clone();
        r.run_until(p.drain_for - Duration::from_millis(1));
        assert!(r.e.stepped_down());
        assert_eq!(r.log, [(r.log[0].0, Action::StepDown)]);

        // Just elected into a short network: without it, 3 % would be
        // free, under the step-down mark; it stays however long.
        let mut r = Rig::new(p.clone(), true);
        r.leaves = 0;
        r.max_leaves = 100;
        r.others = vec![Room {
            leaves: 70,
            max_leaves: 100,
        }];
        let mut known = full(8);
        known.push(Room {
            leaves: 70,
            max_leaves: 100,
        });
        r.known = known;
        r.run_until(Duration::from_secs(3600));
        assert!(!r.e.stepped_down());
        assert!(r.log.is_empty());
    }

    #[test]
    fn the_marks_leave_a_gap_so_a_newcomer_never_meets_the_step_down_mark() {
        // Whatever the network, if electing is due, a just-elected empty
        // supernode would not step down: short means under 5 % free, and
        // without the newcomer that is what is free, under 15 %.
        let p = Policy::default();
        for n in [1usize, 2, 5, 10, 50, 1000] {
            for fill in [950u32, 970, 990, 1000] {
                let known = vec![
                    Room {
                        leaves: fill,
                        max_leaves: 1000
                    };
                    n
                ];
                let before = Need::of(known[0], &known[1..], (0, 0), &p);
                assert!(before.short(&p));
                let newcomer = Room {
                    leaves: 0,
                    max_leaves: 1000,
                };
                let after = Need::of(newcomer, &known, (0, 0), &p);
                assert!(after.spare_without_permille(newcomer) < p.step_down_spare_permille.into());
                assert_eq!(after.step_down_chance(newcomer, &p), 0.0);
            }
        }
    }

    #[test]
    fn the_surplus_is_shared_among_the_elected_the_neighbours_show() {
        let p = Policy::default();
        // 60 supernodes of 100 with 4 200 leaves between them: 10 could go.
        let me = Room {
            leaves: 70,
            max_leaves: 100,
        };
        let known = vec![me; 59];
        let surplus = 60.0 - 4200.0 / 0.84 / 100.0;
        // No neighbour elected: only this one may go, at the cap.
        let alone = Need::of(me, &known, (0, 8), &p);
        assert_eq!(alone.step_down_chance(me, &p), 0.5);
        // 3 of 11 neighbours elected: a third of 60, 20, share the 10.
        let third = Need::of(me, &known, (3, 11), &p);
        let chance = third.step_down_chance(me, &p);
        assert!((chance - surplus / 20.0).abs() < 1e-9, "{chance}");
        // All elected: each goes with the surplus over all.
        let all = Need::of(me, &known, (8, 8), &p);
        assert!((all.step_down_chance(me, &p) - surplus / 60.0).abs() < 1e-9);
        // A neighbour count claiming more elected than neighbours is read
        // as all of them.
        let lie = Need::of(me, &known, (1000, 8), &p);
        assert_eq!(lie.elected, 60.0);
        assert!(third.plainly_surplus(me, &p));
        // At 81 % each, 18.6 % would be free without it: not plainly.
        let fuller = vec![
            Room {
                leaves: 81,
                max_leaves: 100
            };
            59
        ];
        assert!(!Need::of(me, &fuller, (3, 11), &p).plainly_surplus(me, &p));
    }

    #[test]
    fn a_leaf_takes_the_role_at_most_once_an_hour() {
        let p = Policy::default();
        let m = Duration::from_secs(60);
        assert!(may_take_role(None, &p));
        assert!(!may_take_role(Some(Duration::ZERO), &p));
        assert!(!may_take_role(Some(59 * m), &p));
        assert!(may_take_role(Some(60 * m), &p));
    }

    #[test]
    fn a_hostile_or_huge_known_list_is_counted_only_up_to_its_cap() {
        let p = Policy::default();
        let known = vec![
            Room {
                leaves: u32::MAX,
                max_leaves: u32::MAX,
            };
            MAX_NEED_SAMPLE * 3
        ];
        let me = Room {
            leaves: 0,
            max_leaves: 0,
        };
        let need = Need::of(me, &known, (0, 0), &p);
        assert_eq!(need.supernodes, MAX_NEED_SAMPLE as u64 + 1);
        assert!(need.elect_chance(&p) <= 1.0);
        assert_eq!(Need::of(me, &[], (0, 0), &p).spare_permille(), 0);
        assert_eq!(Need::of(me, &[], (0, 0), &p).spare_without_permille(me), 0);
    }

    #[test]
    fn rules_have_names() {
        for r in [Rules::Need, Rules::Overload] {
            assert_eq!(Rules::from_name(r.name()), Some(r));
        }
        assert_eq!(Rules::from_name("flood"), None);
        assert_eq!(Policy::default().rules, Rules::Need);
    }
}
