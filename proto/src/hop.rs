//! Query handling at one hop, as a pure state machine: what a supernode
//! does with one query, from the moment it arrives (from one of its own
//! leaves, or forwarded by a neighbour) until it finishes the stream the
//! query came on.
//!
//! A [`HopQuery`] is made by [`HopQuery::from_leaf`] or
//! [`HopQuery::from_neighbour`] (the rate limit, the seen-set and the
//! query's own checks), then fed the hits of the local index
//! ([`HopQuery::handle_local`]; [`HopQuery::lookup`] says whether the index
//! must be searched at all), the hits and the end of each neighbour's
//! answer, and timer expiries. It hands back [`Action`]s: forward to a
//! neighbour, send hits back to whoever asked, charge the asker, cancel a
//! neighbour's answer, finish. The decisions it combines are in
//! [`crate::route`] (seen-set, forward set, [`DynamicQuery`]),
//! [`crate::fair`] (each link shared fairly among origins) and
//! [`crate::cost`] (what a query costs); the rules are those of
//! `docs/PROTOCOL.md` section 11.5.
//!
//! Not here: streams, connections, timers, the index itself. A driver:
//! 1. makes the query from its arrival; anything but
//!    [`Arrival::Accepted`] only finishes the stream (a leaf is told why
//!    its query is invalid);
//! 2. searches its index for [`HopQuery::lookup`], if any, and passes
//!    what it found to [`HopQuery::handle_local`];
//! 3. carries out every [`HopQuery::poll_action`], then waits for a
//!    forwarded copy's hits or end ([`HopQuery::handle_hits`],
//!    [`HopQuery::handle_ended`]) or for [`HopQuery::poll_timeout`]
//!    ([`HopQuery::handle_timeout`]), and goes back to 3 until
//!    [`Action::Finish`].
//!
//! [`HopNode`] holds what the queries of one node share (seen-set,
//! neighbours' buckets, fair forwarder), for a driver that keeps no such
//! state of its own (a simulator; `proto/tests/hop.rs` is one in
//! miniature).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

use crate::cost::query_cost;
use crate::fair::{FairForwarder, Origin};
use crate::filter::WordKey;
use crate::hits;
use crate::id::ContentHash;
use crate::keywords;
use crate::limits::{MAX_QUERY_WORDS, MAX_RESULTS, MAX_SOURCES_PER_HIT};
use crate::msg::{ErrorCode, ErrorReply, Hit, MeshQuery, Query, QueryKind, Source};
use crate::rate::TokenBucket;
use crate::rng::SplitMix64;
use crate::route::{on_query, DynamicQuery, QueryAction, Seen};
use crate::walk::{self, CopyKind, View, Visit, WalkConfig};

/// How a supernode sends its leaves' queries into the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// Every neighbour within the TTL, widened step by step
    /// (`crate::route`): how every supernode routed before `servent-mesh/3`.
    #[default]
    Flood,
    /// Random walkers that probe the neighbours whose keyword filters may
    /// match (`crate::walk`).
    Walk(WalkConfig),
}

/// The name of a [`Routing`] in a config file or on a command line:
/// `flood` or `walk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingKind {
    Flood,
    Walk,
}

impl RoutingKind {
    /// The routing of this name, walking with `walk`.
    pub fn with(self, walk: WalkConfig) -> Routing {
        match self {
            RoutingKind::Flood => Routing::Flood,
            RoutingKind::Walk => Routing::Walk(walk),
        }
    }
}

impl RoutingKind {
    /// The name a config file or command line gives it.
    pub fn name(self) -> &'static str {
        match self {
            RoutingKind::Flood => "flood",
            RoutingKind::Walk => "walk",
        }
    }
}

impl std::fmt::Display for RoutingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RoutingKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "flood" => Ok(RoutingKind::Flood),
            "walk" => Ok(RoutingKind::Walk),
            other => Err(format!("unknown routing {other:?}: flood or walk")),
        }
    }
}

/// The timings of query handling at a hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopConfig {
    /// Each hop keeps this much of its budget for sending its answer back:
    /// a copy it forwards may spend its own budget less this. Default
    /// 250 ms.
    pub hop_margin: Duration,
    /// The origin asks one more group of neighbours this often
    /// ([`DynamicQuery`]). Default 300 ms.
    pub step: Duration,
    /// Longest a forwarded query may ask a hop to spend, whatever its
    /// `timeout_ms` says. Default 10 s.
    pub max_hop_budget: Duration,
    /// Most hits relayed from one neighbour's answer: once more have come,
    /// that answer is cancelled. Default 2 000 (4 × `MAX_RESULTS`).
    pub max_relayed_hits: usize,
}

impl Default for HopConfig {
    fn default() -> Self {
        Self {
            hop_margin: Duration::from_millis(250),
            step: Duration::from_millis(300),
            max_hop_budget: Duration::from_secs(10),
            max_relayed_hits: 4 * MAX_RESULTS as usize,
        }
    }
}

/// What the local index is asked, once a query has passed its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Files whose names hold every one of these words (normalised by
    /// [`keywords::words`], 1 to `MAX_QUERY_WORDS` of them).
    Words(Vec<String>),
    /// The file with this hash.
    Hash(ContentHash),
}

/// Checks a query by the rules of `docs/PROTOCOL.md` section 8.3 and says
/// what to look up, without looking anything up.
pub fn check(query: &Query) -> Result<Lookup, ErrorReply> {
    match &query.kind {
        QueryKind::Keywords(terms) => {
            let words = keywords::words(&terms.join(" "));
            if words.is_empty() {
                return Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    "a query needs at least one word",
                ));
            }
            if words.len() > MAX_QUERY_WORDS {
                return Err(ErrorReply::new(
                    ErrorCode::BadRequest,
                    format!("a query may have at most {MAX_QUERY_WORDS} words"),
                ));
            }
            Ok(Lookup::Words(words))
        }
        QueryKind::Hash(h) => Ok(Lookup::Hash(*h)),
    }
}

/// Distinct files a query wants: its `max_results`, within 1 and
/// `MAX_RESULTS`.
pub fn wanted(query: &Query) -> usize {
    query.max_results.clamp(1, MAX_RESULTS) as usize
}

/// What the local index answered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Local {
    pub hits: Vec<Hit>,
    /// Index candidates examined.
    pub examined: usize,
    /// Files found (before those without a dialable source were dropped).
    pub found: usize,
}

/// A query of one of this supernode's leaves.
#[derive(Debug, Clone)]
pub struct LeafQuery<'a, N> {
    /// The leaf that asked: its fair share of each link pays for the query.
    pub leaf: N,
    /// The mesh id to give the query (random).
    pub id: u64,
    pub query: &'a Query,
    /// Hops the query may travel (`query_ttl`).
    pub ttl: u8,
    /// How long it may search the mesh (`search_time_ms`).
    pub search_time: Duration,
}

/// What became of a query that arrived.
#[derive(Debug)]
pub enum Arrival<N> {
    /// Let in: drive it to its end (boxed: it is large, the other
    /// outcomes are not).
    Accepted(Box<HopQuery<N>>),
    /// Over the sender's mesh query limit: finish the stream, nothing else.
    RateLimited,
    /// A copy seen before with as much reach: finish the stream.
    Duplicate,
    /// The query is not valid (`docs/PROTOCOL.md` section 8.3): a leaf is
    /// told why, a neighbour's stream is only finished.
    Invalid(ErrorReply),
}

/// What the driver must do for a query.
#[derive(Debug, Clone, PartialEq)]
pub enum Action<N> {
    /// Send the query on a new stream to neighbour `to`, as a copy of
    /// kind `copy` (a flood copy's TTL, a walk's walkers and steps, or a
    /// probe) with `budget` to spend (its `timeout_ms`), and pass whatever
    /// comes back to [`HopQuery::handle_hits`] and its end to
    /// [`HopQuery::handle_ended`].
    Forward {
        to: N,
        copy: CopyKind,
        budget: Duration,
    },
    /// Not sent to `to`: the origin's fair share of that link is spent
    /// (counted as unforwarded). Nothing to do but count it.
    NotForwarded { to: N },
    /// Send these hits back on the stream the query came on.
    SendHits { hits: Vec<Hit> },
    /// Charge whoever asked this many tokens more than the one the query
    /// took to be let in: the leaf's query limits, or the neighbour's mesh
    /// query bucket.
    Charge { tokens: f64 },
    /// Stop reading neighbour's answer and close its stream.
    Cancel { neighbour: N },
    /// The query is over: finish the stream it came on.
    Finish,
}

#[derive(Debug)]
enum Mode<N> {
    /// A query of our own leaf, widened step by step.
    Origin { plan: DynamicQuery<N> },
    /// Every copy at once, each with `budget` to spend (this hop's budget
    /// less the margin): a flood copy a neighbour forwarded, or any hop of
    /// a walk, the origin's included. A walk stops as soon as it has the
    /// results it wants, at every hop; a flood relay does not (its origin
    /// does).
    AtOnce {
        forward: Vec<(N, CopyKind)>,
        budget: Duration,
        stop_when_enough: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the local index.
    Local,
    Running,
    Finished,
}

/// One query at one hop, from its arrival to its end.
#[derive(Debug)]
pub struct HopQuery<N> {
    config: HopConfig,
    id: u64,
    origin: Origin<N>,
    /// `None` for an extension, which is not answered again.
    lookup: Option<Lookup>,
    wanted: usize,
    /// TTL of the copies it forwards.
    ttl: u8,
    deadline: Instant,
    /// What the query cost here, the estimate of what it costs a neighbour.
    cost: f64,
    mode: Mode<N>,
    /// Neighbours asked and not done yet, with the hits each has sent.
    asked: HashMap<N, usize>,
    sent: Sent,
    phase: Phase,
    actions: VecDeque<Action<N>>,
}

impl<N: Clone + Eq + Hash> HopQuery<N> {
    /// A query of one of our leaves: checked (an invalid one is refused
    /// before anything is recorded), recorded in the seen-set with its
    /// TTL, so that copies coming back are duplicates, and to be answered
    /// from the local index. `neighbours` are ranked best first.
    pub fn from_leaf(
        config: &HopConfig,
        now: Instant,
        seen: &mut Seen,
        ask: LeafQuery<'_, N>,
        neighbours: impl FnOnce() -> Vec<N>,
    ) -> Arrival<N> {
        let lookup = match check(ask.query) {
            Ok(l) => l,
            Err(e) => return Arrival::Invalid(e),
        };
        let (forward, ttl) = match on_query(seen, now, ask.id, ask.ttl, None, neighbours) {
            QueryAction::Process { forward, ttl } | QueryAction::Extend { forward, ttl } => {
                (forward, ttl)
            }
            // Only a random id colliding: answer, but route nothing.
            QueryAction::Duplicate => (Vec::new(), 0),
        };
        let deadline = now + ask.search_time;
        let wanted = wanted(ask.query);
        let plan = DynamicQuery::new(forward, wanted, now, deadline, config.step);
        Arrival::Accepted(Box::new(Self::new(
            config,
            ask.id,
            Origin::Leaf(ask.leaf),
            Some(lookup),
            wanted,
            ttl,
            deadline,
            Mode::Origin { plan },
        )))
    }

    /// A query neighbour `from` forwarded, in the order of
    /// `docs/PROTOCOL.md` section 11.5 rule 3: `from`'s mesh query bucket
    /// (duplicates count too), the seen-set, the query's checks. The
    /// neighbours to forward to, ranked, are asked for only if it gets
    /// that far.
    pub fn from_neighbour(
        config: &HopConfig,
        now: Instant,
        bucket: &mut TokenBucket,
        seen: &mut Seen,
        from: N,
        query: &MeshQuery,
        neighbours: impl FnOnce() -> Vec<N>,
    ) -> Arrival<N> {
        if !bucket.try_take(now) {
            return Arrival::RateLimited;
        }
        let (forward, ttl, answer) =
            match on_query(seen, now, query.id, query.ttl, Some(&from), neighbours) {
                QueryAction::Process { forward, ttl } => (forward, ttl, true),
                QueryAction::Extend { forward, ttl } => (forward, ttl, false),
                QueryAction::Duplicate => return Arrival::Duplicate,
            };
        let lookup = match check(&query.query) {
            Ok(l) => l,
            Err(e) => return Arrival::Invalid(e),
        };
        let (budget, child_budget) = hop_budgets(config, query);
        // No time left to pass on: answer only.
        let forward = if child_budget.is_zero() {
            Vec::new()
        } else {
            forward
                .into_iter()
                .map(|n| (n, CopyKind::Flood { ttl }))
                .collect()
        };
        Arrival::Accepted(Box::new(Self::new(
            config,
            query.id,
            Origin::Neighbour(from),
            // An extension was answered the first time round: only forward it.
            answer.then_some(lookup),
            wanted(&query.query),
            ttl,
            now + budget,
            Mode::AtOnce {
                forward,
                budget: child_budget,
                stop_when_enough: false,
            },
        )))
    }

    /// A query of one of our leaves, sent as `walk.walkers` walkers
    /// (`crate::walk`): checked, recorded in the seen-set as a walker's
    /// visit, answered from the local index, and sent to the neighbours
    /// [`walk::plan`] picks from `view` (called with the keys the
    /// neighbours' filters are checked against). `random` draws the order
    /// among neighbours.
    pub fn from_leaf_walked(
        config: &HopConfig,
        walk: &WalkConfig,
        now: Instant,
        seen: &mut Seen,
        ask: LeafQuery<'_, N>,
        view: impl FnOnce(&[WordKey]) -> View<N>,
        random: &mut impl FnMut() -> u64,
    ) -> Arrival<N> {
        let lookup = match check(ask.query) {
            Ok(l) => l,
            Err(e) => return Arrival::Invalid(e),
        };
        let (walkers, steps) = (
            walk.walkers.clamp(1, walk::MAX_WALKERS),
            walk.steps.min(walk::MAX_STEPS),
        );
        let kind = CopyKind::Walk { walkers, steps };
        let deadline = now + ask.search_time;
        let budget = ask.search_time.saturating_sub(config.hop_margin);
        let forward = match walk::observe(seen, now, ask.id, kind) {
            // Only a random id colliding: answer, but route nothing.
            Some(Visit::First) if !budget.is_zero() => {
                // The origin's own visit is the walk's step 0: its copies
                // have `steps - 1` left, so each walker visits `steps`
                // supernodes after it.
                walk::plan(
                    walkers,
                    steps,
                    walk.probes,
                    Visit::First,
                    None,
                    view(&walk::keys(&lookup)),
                    random,
                )
            }
            _ => Vec::new(),
        };
        Arrival::Accepted(Box::new(Self::new(
            config,
            ask.id,
            Origin::Leaf(ask.leaf),
            Some(lookup),
            wanted(ask.query),
            0,
            deadline,
            Mode::AtOnce {
                forward,
                budget,
                stop_when_enough: true,
            },
        )))
    }

    /// A walker or a probe (`kind`) of a query neighbour `from` sent, in
    /// the order of [`HopQuery::from_neighbour`]: `from`'s bucket, the
    /// seen-set ([`walk::observe`]), the query's checks. A first visit is
    /// answered; the copies [`walk::plan`] picks from `view` (the probes
    /// capped by this node's `walk.probes`) go on while there is budget.
    #[allow(clippy::too_many_arguments)]
    pub fn from_neighbour_walked(
        config: &HopConfig,
        walk: &WalkConfig,
        now: Instant,
        bucket: &mut TokenBucket,
        seen: &mut Seen,
        from: N,
        query: &MeshQuery,
        kind: CopyKind,
        view: impl FnOnce(&[WordKey]) -> View<N>,
        random: &mut impl FnMut() -> u64,
    ) -> Arrival<N> {
        if !bucket.try_take(now) {
            return Arrival::RateLimited;
        }
        let kind = kind.capped();
        let Some(visit) = walk::observe(seen, now, query.id, kind) else {
            return Arrival::Duplicate;
        };
        let lookup = match check(&query.query) {
            Ok(l) => l,
            Err(e) => return Arrival::Invalid(e),
        };
        let (budget, child_budget) = hop_budgets(config, query);
        let forward = match kind {
            CopyKind::Walk { walkers, steps } if !child_budget.is_zero() => walk::plan(
                walkers,
                steps,
                walk.probes,
                visit,
                Some(&from),
                view(&walk::keys(&lookup)),
                random,
            ),
            _ => Vec::new(),
        };
        if forward.is_empty() && visit != Visit::First {
            // Nothing to answer and nobody to ask.
            return Arrival::Duplicate;
        }
        Arrival::Accepted(Box::new(Self::new(
            config,
            query.id,
            Origin::Neighbour(from),
            (visit == Visit::First).then_some(lookup),
            wanted(&query.query),
            0,
            now + budget,
            Mode::AtOnce {
                forward,
                budget: child_budget,
                stop_when_enough: true,
            },
        )))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        config: &HopConfig,
        id: u64,
        origin: Origin<N>,
        lookup: Option<Lookup>,
        wanted: usize,
        ttl: u8,
        deadline: Instant,
        mode: Mode<N>,
    ) -> Self {
        Self {
            config: *config,
            id,
            origin,
            lookup,
            wanted,
            ttl,
            deadline,
            cost: 1.0,
            mode,
            asked: HashMap::new(),
            sent: Sent::default(),
            phase: Phase::Local,
            actions: VecDeque::new(),
        }
    }

    /// The query's mesh id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether this hop answers from its index (it does not for an
    /// extension).
    pub fn answers(&self) -> bool {
        self.lookup.is_some()
    }

    /// What to search the local index for before [`HopQuery::handle_local`],
    /// with at most [`HopQuery::wanted`] results; `None` when the index is
    /// not to be searched (an extension: the query was checked, and
    /// answered the first time round).
    pub fn lookup(&self) -> Option<&Lookup> {
        self.lookup.as_ref()
    }

    /// Distinct files the query wants.
    pub fn wanted(&self) -> usize {
        self.wanted
    }

    /// When the query gives up, whatever is outstanding.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    /// What the local index answered (`Local::default()` when
    /// [`HopQuery::lookup`] said not to search): sends it back, charges
    /// the asker for the work, and starts forwarding. `fair` is this
    /// node's fair forwarder, which every copy sent on a link must pass.
    pub fn handle_local(
        &mut self,
        now: Instant,
        local: Local,
        fair: &mut FairForwarder<N, Origin<N>>,
    ) {
        if self.phase != Phase::Local {
            return;
        }
        self.phase = Phase::Running;
        if self.answers() {
            self.cost = query_cost(local.examined, local.found);
            let news = self.sent.news(local.hits);
            if !news.is_empty() {
                self.actions.push_back(Action::SendHits { hits: news });
            }
            // The asker pays for the work, not just the query. An
            // extension did no work and costs only the token it took.
            if self.cost > 1.0 {
                self.actions.push_back(Action::Charge {
                    tokens: self.cost - 1.0,
                });
            }
        }
        match &mut self.mode {
            Mode::Origin { plan } => {
                plan.add_results(self.sent.hashes());
                self.advance(now, fair);
            }
            Mode::AtOnce {
                forward, budget, ..
            } => {
                let (forward, budget) = (std::mem::take(forward), *budget);
                for (to, copy) in forward {
                    self.forward(now, to, copy, budget, fair);
                }
                self.check_done(now);
            }
        }
    }

    /// Hits that came back from neighbour `from`: passes on what is news,
    /// and cancels an answer that has sent too many.
    pub fn handle_hits(&mut self, now: Instant, from: &N, hits: Vec<Hit>) {
        if self.phase != Phase::Running {
            return;
        }
        let Some(relayed) = self.asked.get_mut(from) else {
            return;
        };
        *relayed += hits.len();
        let over = *relayed > self.config.max_relayed_hits;
        let before = self.sent.hashes();
        let news = self.sent.news(hits);
        if !news.is_empty() {
            self.actions.push_back(Action::SendHits { hits: news });
        }
        if let Mode::Origin { plan } = &mut self.mode {
            plan.add_results(self.sent.hashes() - before);
        }
        if over {
            self.actions.push_back(Action::Cancel {
                neighbour: from.clone(),
            });
            self.answered(now, from);
        }
        self.check_done(now);
    }

    /// Neighbour `from` finished its answer, or its stream failed.
    pub fn handle_ended(&mut self, now: Instant, from: &N) {
        if self.phase != Phase::Running {
            return;
        }
        self.answered(now, from);
        self.check_done(now);
    }

    /// When [`HopQuery::handle_timeout`] is next due; `None` once finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (&self.mode, self.phase) {
            (_, Phase::Finished) => None,
            (Mode::Origin { plan }, Phase::Running) if plan.waiting() > 0 => {
                Some(plan.next_wakeup())
            }
            _ => Some(self.deadline),
        }
    }

    /// Time has passed: the origin asks its next group, and a query past
    /// its deadline finishes.
    pub fn handle_timeout(&mut self, now: Instant, fair: &mut FairForwarder<N, Origin<N>>) {
        if self.phase != Phase::Running {
            if self.phase == Phase::Local && now >= self.deadline {
                self.finish();
            }
            return;
        }
        if matches!(self.mode, Mode::Origin { .. }) {
            self.advance(now, fair);
        }
        self.check_done(now);
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action<N>> {
        self.actions.pop_front()
    }

    /// The origin asks whatever groups are due.
    fn advance(&mut self, now: Instant, fair: &mut FairForwarder<N, Origin<N>>) {
        loop {
            let Mode::Origin { plan } = &mut self.mode else {
                return;
            };
            let group = plan.poll(now);
            if group.is_empty() {
                break;
            }
            let budget = self
                .deadline
                .saturating_duration_since(now)
                .saturating_sub(self.config.hop_margin);
            let copy = CopyKind::Flood { ttl: self.ttl };
            for to in group {
                if !self.forward(now, to, copy, budget, fair) {
                    // Not sent: as if that neighbour had found nothing.
                    if let Mode::Origin { plan } = &mut self.mode {
                        plan.on_answer(0);
                        plan.hurry_if_idle(now);
                    }
                }
            }
        }
        self.check_done(now);
    }

    /// Sends a copy to `to` if the origin is within its fair share of that
    /// link (what the query cost here is the estimate of what it costs
    /// there); says whether it was sent.
    fn forward(
        &mut self,
        now: Instant,
        to: N,
        copy: CopyKind,
        budget: Duration,
        fair: &mut FairForwarder<N, Origin<N>>,
    ) -> bool {
        if !fair.decide(now, &to, &self.origin, self.cost).forwards() {
            self.actions.push_back(Action::NotForwarded { to });
            return false;
        }
        self.asked.insert(to.clone(), 0);
        self.actions.push_back(Action::Forward { to, copy, budget });
        true
    }

    fn answered(&mut self, now: Instant, from: &N) {
        if self.asked.remove(from).is_none() {
            return;
        }
        if let Mode::Origin { plan } = &mut self.mode {
            plan.on_answer(0);
            plan.hurry_if_idle(now);
        }
    }

    fn check_done(&mut self, now: Instant) {
        if self.phase != Phase::Running {
            return;
        }
        let done = match &self.mode {
            Mode::Origin { plan } => plan.is_done(now),
            Mode::AtOnce {
                stop_when_enough, ..
            } => {
                now >= self.deadline
                    || self.asked.is_empty()
                    || (*stop_when_enough && self.sent.hashes() >= self.wanted)
            }
        };
        if done {
            self.finish();
        }
    }

    fn finish(&mut self) {
        for (neighbour, _) in self.asked.drain() {
            self.actions.push_back(Action::Cancel { neighbour });
        }
        self.actions.push_back(Action::Finish);
        self.phase = Phase::Finished;
    }
}

/// What a neighbour's copy may spend here (its `timeout_ms`, capped), and
/// what the copies this hop sends may spend.
fn hop_budgets(config: &HopConfig, query: &MeshQuery) -> (Duration, Duration) {
    let budget = Duration::from_millis(query.timeout_ms.into()).min(config.max_hop_budget);
    (budget, budget.saturating_sub(config.hop_margin))
}

/// What every query at one node shares: the seen-set, each neighbour's
/// mesh query bucket and the fair forwarder, with the calls of
/// [`HopQuery`] that need them. A simulator keeps one per node and owns
/// the [`HopQuery`]s beside it; the supernode keeps the same three parts
/// in its mesh state and makes the same calls.
#[derive(Debug)]
pub struct HopNode<N> {
    pub config: HopConfig,
    pub seen: Seen,
    pub fair: FairForwarder<N, Origin<N>>,
    buckets: HashMap<N, TokenBucket>,
    mesh_query_rate: f64,
    mesh_query_burst: u32,
    /// Draws the order walkers pick neighbours in.
    rng: SplitMix64,
}

impl<N: Clone + Eq + Hash> HopNode<N> {
    /// `mesh_query_rate` and `mesh_query_burst`: what this node accepts
    /// from each neighbour, taken as what each accepts from it.
    pub fn new(config: HopConfig, mesh_query_rate: f64, mesh_query_burst: u32) -> Self {
        Self {
            config,
            seen: Seen::default(),
            fair: FairForwarder::new(mesh_query_rate, mesh_query_burst),
            buckets: HashMap::new(),
            mesh_query_rate,
            mesh_query_burst,
            rng: SplitMix64::new(0),
        }
    }

    /// Seeds the order walkers pick neighbours in (a node seeds it at
    /// random; a simulator from its run's seed).
    pub fn seed(&mut self, seed: u64) {
        self.rng = SplitMix64::new(seed);
    }

    /// [`HopQuery::from_leaf_walked`] with this node's seen-set and
    /// random numbers.
    pub fn from_leaf_walked(
        &mut self,
        walk: &WalkConfig,
        now: Instant,
        ask: LeafQuery<'_, N>,
        view: impl FnOnce(&[WordKey]) -> View<N>,
    ) -> Arrival<N> {
        let rng = &mut self.rng;
        HopQuery::from_leaf_walked(
            &self.config,
            walk,
            now,
            &mut self.seen,
            ask,
            view,
            &mut || rng.next_u64(),
        )
    }

    /// [`HopQuery::from_neighbour_walked`] with `from`'s bucket, this
    /// node's seen-set and random numbers.
    pub fn from_neighbour_walked(
        &mut self,
        walk: &WalkConfig,
        now: Instant,
        from: N,
        query: &MeshQuery,
        kind: CopyKind,
        view: impl FnOnce(&[WordKey]) -> View<N>,
    ) -> Arrival<N> {
        let bucket = bucket_of(
            &mut self.buckets,
            (self.mesh_query_rate, self.mesh_query_burst),
            &from,
            now,
        );
        let rng = &mut self.rng;
        HopQuery::from_neighbour_walked(
            &self.config,
            walk,
            now,
            bucket,
            &mut self.seen,
            from,
            query,
            kind,
            view,
            &mut || rng.next_u64(),
        )
    }

    /// [`HopQuery::from_leaf`] with this node's seen-set.
    pub fn from_leaf(
        &mut self,
        now: Instant,
        ask: LeafQuery<'_, N>,
        neighbours: impl FnOnce() -> Vec<N>,
    ) -> Arrival<N> {
        HopQuery::from_leaf(&self.config, now, &mut self.seen, ask, neighbours)
    }

    /// [`HopQuery::from_neighbour`] with `from`'s bucket and this node's
    /// seen-set.
    pub fn from_neighbour(
        &mut self,
        now: Instant,
        from: N,
        query: &MeshQuery,
        neighbours: impl FnOnce() -> Vec<N>,
    ) -> Arrival<N> {
        let bucket = bucket_of(
            &mut self.buckets,
            (self.mesh_query_rate, self.mesh_query_burst),
            &from,
            now,
        );
        HopQuery::from_neighbour(
            &self.config,
            now,
            bucket,
            &mut self.seen,
            from,
            query,
            neighbours,
        )
    }

    /// [`HopQuery::handle_local`] with this node's fair forwarder.
    pub fn handle_local(&mut self, now: Instant, query: &mut HopQuery<N>, local: Local) {
        query.handle_local(now, local, &mut self.fair);
    }

    /// [`HopQuery::handle_timeout`] with this node's fair forwarder.
    pub fn handle_timeout(&mut self, now: Instant, query: &mut HopQuery<N>) {
        query.handle_timeout(now, &mut self.fair);
    }

    /// Carries out [`Action::Charge`] of a query neighbour `from` sent.
    pub fn charge(&mut self, now: Instant, from: &N, tokens: f64) {
        if let Some(b) = self.buckets.get_mut(from) {
            b.take_many(tokens, now);
        }
    }

    /// Forgets what was kept for a neighbour whose link went down.
    pub fn remove_neighbour(&mut self, neighbour: &N) {
        self.buckets.remove(neighbour);
        self.fair.remove_link(neighbour);
    }
}

/// `from`'s mesh query bucket in `buckets`, made full (`rate`, `burst`)
/// on first use.
fn bucket_of<'a, N: Clone + Eq + Hash>(
    buckets: &'a mut HashMap<N, TokenBucket>,
    (rate, burst): (f64, u32),
    from: &N,
    now: Instant,
) -> &'a mut TokenBucket {
    buckets
        .entry(from.clone())
        .or_insert_with(|| TokenBucket::new(rate, burst, now))
}

/// Hits already sent on one stream, so that only news is sent again.
#[derive(Debug, Default)]
struct Sent {
    sources: HashMap<ContentHash, Known>,
}

/// The sources of one hash sent so far, by id and by address: at most
/// `MAX_SOURCES_PER_HIT`, few enough to scan.
#[derive(Debug, Default)]
struct Known {
    sources: Vec<Fingerprint>,
}

/// A source's id and address as 64-bit fingerprints, so that remembering
/// one costs no allocation: the id's first 8 bytes (an id is a hash of
/// its key already) and the SipHash-1-3 of the address text. To pass off
/// a source as one sent before, or hide one behind another, a peer would
/// have to find a key or an address with the same 64 bits: about 2^64
/// tries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    id: u64,
    addr: u64,
}

impl Fingerprint {
    fn of(s: &Source) -> Self {
        use std::hash::Hasher;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        h.write(s.addr.as_bytes());
        Self {
            id: u64::from_le_bytes(s.id.0[..8].try_into().expect("8 bytes")),
            addr: h.finish(),
        }
    }
}

impl Known {
    fn has(&self, f: Fingerprint) -> bool {
        self.sources
            .iter()
            .any(|k| k.id == f.id || k.addr == f.addr)
    }
}

impl Sent {
    /// Keeps what is new in `hits`: new hashes, or new sources of known
    /// ones (new by id and by address), at most `MAX_SOURCES_PER_HIT`
    /// sources a hash in all. Each hit is rebuilt on its own
    /// (`hits::retain_sources`), so a frame stays self-contained and its
    /// names are ranked on the sources it lists.
    fn news(&mut self, hits: Vec<Hit>) -> Vec<Hit> {
        let mut out = Vec::new();
        for hit in hits {
            let known = self.sources.entry(hit.hash).or_default();
            if known.sources.len() >= MAX_SOURCES_PER_HIT {
                continue;
            }
            let room = MAX_SOURCES_PER_HIT - known.sources.len();
            let mut taken = 0;
            let news = hits::retain_sources(hit, |s| {
                let new = taken < room && !known.has(Fingerprint::of(s));
                taken += new as usize;
                new
            });
            if let Some(news) = news {
                known
                    .sources
                    .extend(news.sources.iter().map(Fingerprint::of));
                out.push(news);
            }
        }
        out
    }

    /// Distinct hashes sent.
    fn hashes(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hits::HitBuilder;
    use crate::id::NodeId;
    use crate::msg::NameVariant;
    use std::collections::HashSet;

    const MS: Duration = Duration::from_millis(1);

    type Fair = FairForwarder<u32, Origin<u32>>;

    fn fair() -> Fair {
        FairForwarder::new(200.0, 400)
    }

    /// A hit for file `file` with sources numbered `sources`, each at an
    /// address of its own.
    fn hit(file: u8, sources: impl IntoIterator<Item = u8>) -> Hit {
        let mut b = HitBuilder::new(ContentHash([file; 32]));
        let v = NameVariant {
            name: format!("file {file}.mp3"),
            size: 1000,
        };
        for s in sources {
            b.add(NodeId([s; 32]), format!("10.0.{s}.1:7401"), &v);
        }
        b.finish().expect("a source")
    }

    fn words(max_results: u32) -> Query {
        Query {
            kind: QueryKind::Keywords(vec!["blue moon".into()]),
            max_results,
        }
    }

    fn drain(q: &mut HopQuery<u32>) -> Vec<Action<u32>> {
        std::iter::from_fn(|| q.poll_action()).collect()
    }

    fn forwards(actions: &[Action<u32>]) -> Vec<(u32, u8, Duration)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Forward {
                    to,
                    copy: CopyKind::Flood { ttl },
                    budget,
                } => Some((*to, *ttl, *budget)),
                _ => None,
            })
            .collect()
    }

    fn sent_hits(actions: &[Action<u32>]) -> Vec<Hit> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendHits { hits } => Some(hits.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn leaf_query(t0: Instant, query: &Query, neighbours: Vec<u32>) -> HopQuery<u32> {
        let ask = LeafQuery {
            leaf: 100,
            id: 42,
            query,
            ttl: 4,
            search_time: Duration::from_secs(3),
        };
        match HopQuery::from_leaf(&HopConfig::default(), t0, &mut Seen::default(), ask, || {
            neighbours
        }) {
            Arrival::Accepted(q) => *q,
            other => panic!("{other:?}"),
        }
    }

    fn mesh_query(ttl: u8, timeout_ms: u32) -> MeshQuery {
        MeshQuery {
            id: 7,
            ttl,
            timeout_ms,
            query: words(50),
        }
    }

    fn arrive(
        seen: &mut Seen,
        now: Instant,
        from: u32,
        mq: &MeshQuery,
        neighbours: &[u32],
    ) -> Arrival<u32> {
        let mut bucket = TokenBucket::new(200.0, 400, now);
        HopQuery::from_neighbour(
            &HopConfig::default(),
            now,
            &mut bucket,
            seen,
            from,
            mq,
            || neighbours.to_vec(),
        )
    }

    /// A walker or probe from neighbour 1, seen by a node with
    /// neighbours 1 to 6 of which 2 and 3 may hold the words.
    fn walked(
        seen: &mut Seen,
        bucket: &mut TokenBucket,
        now: Instant,
        mq: &MeshQuery,
        kind: CopyKind,
    ) -> Arrival<u32> {
        let mut x = 1u64;
        HopQuery::from_neighbour_walked(
            &HopConfig::default(),
            &WalkConfig::default(),
            now,
            bucket,
            seen,
            1,
            mq,
            kind,
            |_| View {
                neighbours: (1..7).collect(),
                matching: vec![2, 3],
            },
            &mut || {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                x >> 3
            },
        )
    }

    #[test]
    fn a_walker_is_answered_once_walks_on_and_a_repeated_probe_is_a_duplicate() {
        let t0 = Instant::now();
        let (mut seen, mut bucket) = (Seen::default(), TokenBucket::new(200.0, 400, t0));
        let mq = mesh_query(3, 2_000);
        let walk = CopyKind::Walk {
            walkers: 2,
            steps: 3,
        };
        let Arrival::Accepted(mut q) = walked(&mut seen, &mut bucket, t0, &mq, walk) else {
            panic!("a first walker is accepted");
        };
        assert!(q.answers());
        q.handle_local(t0, Local::default(), &mut fair());
        let copies: Vec<(u32, CopyKind)> = drain(&mut q)
            .into_iter()
            .filter_map(|a| match a {
                Action::Forward { to, copy, budget } => {
                    assert_eq!(budget, Duration::from_millis(1_750));
                    Some((to, copy))
                }
                _ => None,
            })
            .collect();
        let probes: Vec<u32> = copies
            .iter()
            .filter(|(_, k)| *k == CopyKind::Probe)
            .map(|(n, _)| *n)
            .collect();
        assert!(probes.iter().all(|n| [2, 3].contains(n)));
        let walkers: u8 = copies
            .iter()
            .map(|(_, k)| match k {
                CopyKind::Walk { walkers, steps } => {
                    assert_eq!(*steps, 2);
                    *walkers
                }
                _ => 0,
            })
            .sum();
        assert_eq!(walkers, 2);
        assert!(copies.iter().all(|(n, _)| *n != 1), "never back");
        // A second walker only walks on: nothing answered, nothing probed.
        let Arrival::Accepted(again) = walked(&mut seen, &mut bucket, t0, &mq, walk) else {
            panic!("a second walker still walks");
        };
        assert!(!again.answers());
        // A probe of a query seen before is a duplicate.
        assert!(matches!(
            walked(&mut seen, &mut bucket, t0, &mq, CopyKind::Probe),
            Arrival::Duplicate
        ));
        // A walker with no steps left on a second visit has nothing to do.
        let spent = CopyKind::Walk {
            walkers: 1,
            steps: 0,
        };
        assert!(matches!(
            walked(&mut seen, &mut bucket, t0, &mq, spent),
            Arrival::Duplicate
        ));
    }

    #[test]
    fn walkers_pay_the_senders_bucket_and_a_bad_query_is_refused() {
        let t0 = Instant::now();
        let (mut seen, mut bucket) = (Seen::default(), TokenBucket::new(1.0, 1, t0));
        let walk = CopyKind::Walk {
            walkers: 1,
            steps: 2,
        };
        let bad = MeshQuery {
            query: Query {
                kind: QueryKind::Keywords(vec!["  ".into()]),
                max_results: 5,
            },
            ..mesh_query(3, 2_000)
        };
        assert!(matches!(
            walked(&mut seen, &mut bucket, t0, &bad, walk),
            Arrival::Invalid(_)
        ));
        let fresh = MeshQuery {
            id: 8,
            ..mesh_query(3, 2_000)
        };
        assert!(matches!(
            walked(&mut seen, &mut bucket, t0, &fresh, walk),
            Arrival::RateLimited
        ));
    }

    #[test]
    fn checks_refuse_empty_and_long_queries_without_searching() {
        assert_eq!(
            check(&words(1)),
            Ok(Lookup::Words(vec!["blue".into(), "moon".into()]))
        );
        let empty = Query {
            kind: QueryKind::Keywords(vec!["  ,; ".into()]),
            max_results: 1,
        };
        assert_eq!(check(&empty).unwrap_err().code, ErrorCode::BadRequest);
        let long = Query {
            kind: QueryKind::Keywords((0..=MAX_QUERY_WORDS).map(|i| format!("w{i}")).collect()),
            max_results: 1,
        };
        assert!(check(&long).is_err());
        let t0 = Instant::now();
        let mut seen = Seen::default();
        let ask = LeafQuery {
            leaf: 1,
            id: 9,
            query: &empty,
            ttl: 4,
            search_time: Duration::from_secs(3),
        };
        let a = HopQuery::from_leaf(&HopConfig::default(), t0, &mut seen, ask, || {
            panic!("neighbours asked for an invalid query")
        });
        assert!(matches!(a, Arrival::Invalid(_)));
        assert!(!seen.contains(9), "an invalid leaf query is not recorded");
    }

    #[test]
    fn a_leaf_query_widens_within_its_budget_and_finishes_on_enough_results() {
        let t0 = Instant::now();
        let query = words(3);
        let mut q = leaf_query(t0, &query, vec![1, 2, 3, 4, 5, 6, 7]);
        assert!(q.lookup().is_some());
        assert_eq!(q.wanted(), 3);
        let mut f = fair();
        q.handle_local(
            t0,
            Local {
                hits: vec![hit(1, [10])],
                examined: 2500,
                found: 1,
            },
            &mut f,
        );
        let a = drain(&mut q);
        assert_eq!(sent_hits(&a), vec![hit(1, [10])]);
        assert!(a.contains(&Action::Charge { tokens: 2.0 }), "{a:?}");
        // One neighbour at once, with the whole search time less the margin.
        assert_eq!(forwards(&a), vec![(1, 4, 2750 * MS)]);
        assert_eq!(q.poll_timeout(), Some(t0 + 300 * MS));
        // Nothing before the step; then two more, with what is left.
        q.handle_timeout(t0 + 100 * MS, &mut f);
        assert!(drain(&mut q).is_empty());
        q.handle_timeout(t0 + 300 * MS, &mut f);
        let a = drain(&mut q);
        assert_eq!(forwards(&a), vec![(2, 4, 2450 * MS), (3, 4, 2450 * MS)]);
        // A known source again is not news; a new source of a known file is.
        q.handle_hits(t0 + 400 * MS, &2, vec![hit(1, [10, 11]), hit(2, [12])]);
        let a = drain(&mut q);
        assert_eq!(sent_hits(&a), vec![hit(1, [11]), hit(2, [12])]);
        assert!(!q.is_finished());
        // A third file: enough. Those still asked are cancelled.
        q.handle_hits(t0 + 450 * MS, &3, vec![hit(3, [13])]);
        let a = drain(&mut q);
        assert_eq!(sent_hits(&a), vec![hit(3, [13])]);
        assert!(a.contains(&Action::Cancel { neighbour: 1 }));
        assert!(a.contains(&Action::Cancel { neighbour: 2 }));
        assert!(a.contains(&Action::Cancel { neighbour: 3 }));
        assert_eq!(a.last(), Some(&Action::Finish));
        assert!(q.is_finished() && q.poll_timeout().is_none());
        q.handle_hits(t0 + 500 * MS, &1, vec![hit(4, [14])]);
        assert!(drain(&mut q).is_empty(), "nothing after the end");
    }

    #[test]
    fn the_origin_asks_on_at_once_when_everyone_asked_has_answered() {
        let t0 = Instant::now();
        let query = words(10);
        let mut q = leaf_query(t0, &query, vec![1, 2, 3]);
        let mut f = fair();
        q.handle_local(t0, Local::default(), &mut f);
        assert_eq!(forwards(&drain(&mut q)), vec![(1, 4, 2750 * MS)]);
        q.handle_ended(t0 + 20 * MS, &1);
        assert_eq!(q.poll_timeout(), Some(t0 + 20 * MS), "hurries");
        q.handle_timeout(t0 + 20 * MS, &mut f);
        assert_eq!(forwards(&drain(&mut q)).len(), 2);
        q.handle_ended(t0 + 30 * MS, &2);
        q.handle_ended(t0 + 30 * MS, &3);
        assert_eq!(drain(&mut q), vec![Action::Finish], "everyone answered");
    }

    #[test]
    fn a_leaf_query_ends_at_its_deadline() {
        let t0 = Instant::now();
        let query = words(10);
        let mut q = leaf_query(t0, &query, vec![1]);
        let mut f = fair();
        q.handle_local(t0, Local::default(), &mut f);
        drain(&mut q);
        assert_eq!(q.poll_timeout(), Some(t0 + Duration::from_secs(3)));
        q.handle_timeout(t0 + Duration::from_secs(3), &mut f);
        assert_eq!(
            drain(&mut q),
            vec![Action::Cancel { neighbour: 1 }, Action::Finish]
        );
    }

    #[test]
    fn a_leaf_query_with_enough_local_hits_or_no_neighbours_is_not_routed() {
        let t0 = Instant::now();
        let query = words(1);
        let mut q = leaf_query(t0, &query, vec![1, 2]);
        let local = Local {
            hits: vec![hit(1, [10])],
            examined: 1,
            found: 1,
        };
        q.handle_local(t0, local.clone(), &mut fair());
        let a = drain(&mut q);
        assert!(forwards(&a).is_empty());
        assert_eq!(a.last(), Some(&Action::Finish));
        let query = words(10);
        let mut q = leaf_query(t0, &query, vec![]);
        q.handle_local(t0, local, &mut fair());
        assert_eq!(drain(&mut q).last(), Some(&Action::Finish));
    }

    #[test]
    fn a_link_out_of_fair_share_is_skipped_and_the_next_asked_at_once() {
        let t0 = Instant::now();
        let query = words(10);
        let mut q = leaf_query(t0, &query, vec![1, 2, 3]);
        // Neighbour 1's link is spent by another origin.
        let mut f = FairForwarder::new(1.0, 2);
        while f.decide(t0, &1, &Origin::Neighbour(9), 1.0).forwards() {}
        q.handle_local(t0, Local::default(), &mut f);
        let a = drain(&mut q);
        assert_eq!(a[0], Action::NotForwarded { to: 1 });
        assert_eq!(forwards(&a), vec![(2, 4, 2750 * MS), (3, 4, 2750 * MS)]);
    }

    #[test]
    fn a_forwarded_query_is_answered_charged_and_relayed_until_all_answer() {
        let t0 = Instant::now();
        let mut seen = Seen::default();
        let mq = mesh_query(3, 2750);
        let Arrival::Accepted(mut q) = arrive(&mut seen, t0, 1, &mq, &[1, 2, 3]) else {
            panic!()
        };
        assert!(q.answers());
        assert_eq!(q.deadline(), t0 + 2750 * MS);
        let mut f = fair();
        q.handle_local(
            t0,
            Local {
                hits: vec![hit(1, [10])],
                examined: 10_000,
                found: 300,
            },
            &mut f,
        );
        let a = drain(&mut q);
        assert_eq!(sent_hits(&a), vec![hit(1, [10])]);
        assert!(a.contains(&Action::Charge { tokens: 13.0 }));
        // Every neighbour but the sender at once, one hop less, 250 ms less.
        assert_eq!(forwards(&a), vec![(2, 2, 2500 * MS), (3, 2, 2500 * MS)]);
        // A relay passes on news however many files it has: the origin stops.
        q.handle_hits(t0 + 10 * MS, &2, (2..60).map(|i| hit(i, [i])).collect());
        assert_eq!(sent_hits(&drain(&mut q)).len(), 58);
        q.handle_ended(t0 + 20 * MS, &2);
        assert!(drain(&mut q).is_empty());
        q.handle_ended(t0 + 30 * MS, &3);
        assert_eq!(drain(&mut q), vec![Action::Finish]);
    }

    #[test]
    fn an_extension_is_forwarded_but_not_answered_nor_charged() {
        let t0 = Instant::now();
        let mut seen = Seen::default();
        let first = mesh_query(1, 2000);
        assert!(matches!(
            arrive(&mut seen, t0, 1, &first, &[1, 2, 3]),
            Arrival::Accepted(_)
        ));
        let farther = mesh_query(3, 2500);
        let Arrival::Accepted(mut q) = arrive(&mut seen, t0 + MS, 2, &farther, &[1, 2, 3]) else {
            panic!()
        };
        assert!(!q.answers() && q.lookup().is_none(), "no search needed");
        // Even if the driver searched, nothing of it is sent or charged.
        q.handle_local(
            t0 + MS,
            Local {
                hits: vec![hit(1, [10])],
                examined: 10_000,
                found: 500,
            },
            &mut fair(),
        );
        let a = drain(&mut q);
        assert!(sent_hits(&a).is_empty());
        assert!(!a.iter().any(|a| matches!(a, Action::Charge { .. })));
        assert_eq!(forwards(&a), vec![(1, 2, 2250 * MS), (3, 2, 2250 * MS)]);
        // A third copy with no more reach is a duplicate.
        assert!(matches!(
            arrive(&mut seen, t0 + 2 * MS, 3, &farther, &[1, 2, 3]),
            Arrival::Duplicate
        ));
    }

    #[test]
    fn over_the_limit_duplicates_and_invalid_queries_end_at_once() {
        let t0 = Instant::now();
        let mut seen = Seen::default();
        let mut bucket = TokenBucket::new(1.0, 1, t0);
        let mq = mesh_query(3, 1000);
        let cfg = HopConfig::default();
        let mut go = |seen: &mut Seen, mq: &MeshQuery| {
            HopQuery::from_neighbour(&cfg, t0, &mut bucket, seen, 1, mq, Vec::new)
        };
        assert!(matches!(go(&mut seen, &mq), Arrival::Accepted(_)));
        assert!(matches!(go(&mut seen, &mq), Arrival::RateLimited));
        let bad = MeshQuery {
            id: 8,
            query: Query {
                kind: QueryKind::Keywords(vec![]),
                max_results: 5,
            },
            ..mq.clone()
        };
        let a = arrive(&mut seen, t0, 1, &bad, &[1, 2]);
        assert!(matches!(a, Arrival::Invalid(_)));
        assert!(matches!(
            arrive(&mut seen, t0, 2, &mq, &[1, 2]),
            Arrival::Duplicate
        ));
    }

    #[test]
    fn the_budget_is_capped_and_a_spent_one_is_not_passed_on() {
        let t0 = Instant::now();
        let mut seen = Seen::default();
        let Arrival::Accepted(mut q) = arrive(&mut seen, t0, 1, &mesh_query(3, u32::MAX), &[1, 2])
        else {
            panic!()
        };
        assert_eq!(q.deadline(), t0 + Duration::from_secs(10));
        q.handle_local(t0, Local::default(), &mut fair());
        assert_eq!(forwards(&drain(&mut q)), vec![(2, 2, 9750 * MS)]);
        let mut seen = Seen::default();
        let Arrival::Accepted(mut q) = arrive(&mut seen, t0, 1, &mesh_query(3, 250), &[1, 2])
        else {
            panic!()
        };
        q.handle_local(t0, Local::default(), &mut fair());
        assert_eq!(
            drain(&mut q),
            vec![Action::Finish],
            "answered, not forwarded"
        );
    }

    #[test]
    fn an_answer_with_too_many_hits_is_cancelled() {
        let t0 = Instant::now();
        let mut seen = Seen::default();
        let Arrival::Accepted(mut q) = arrive(&mut seen, t0, 1, &mesh_query(3, 2000), &[1, 2, 3])
        else {
            panic!()
        };
        q.handle_local(t0, Local::default(), &mut fair());
        drain(&mut q);
        let max = HopConfig::default().max_relayed_hits;
        // The same file over and over: nothing new, but it all counts.
        for _ in 0..max / 100 {
            q.handle_hits(t0 + MS, &2, vec![hit(1, [10]); 100]);
        }
        assert!(!drain(&mut q).contains(&Action::Cancel { neighbour: 2 }));
        q.handle_hits(t0 + MS, &2, vec![hit(1, [10])]);
        assert_eq!(drain(&mut q), vec![Action::Cancel { neighbour: 2 }]);
        q.handle_hits(t0 + MS, &2, vec![hit(5, [15])]);
        assert!(
            drain(&mut q).is_empty(),
            "nothing more from a cancelled answer"
        );
        q.handle_ended(t0 + 2 * MS, &3);
        assert_eq!(drain(&mut q), vec![Action::Finish]);
    }

    #[test]
    fn news_caps_sources_per_hash_and_dedups_by_id_and_address() {
        let mut sent = Sent::default();
        let first = sent.news(vec![hit(1, 0..40)]);
        assert_eq!(first[0].sources.len(), 40);
        let again = sent.news(vec![hit(1, 20..100)]);
        assert_eq!(again[0].sources.len(), MAX_SOURCES_PER_HIT - 40);
        assert!(sent.news(vec![hit(1, 100..120)]).is_empty(), "full");
        // The same address under another id is not a new source.
        let mut b = HitBuilder::new(ContentHash([2; 32]));
        let v = NameVariant {
            name: "x".into(),
            size: 1,
        };
        b.add(NodeId([1; 32]), "10.0.1.1:7401".into(), &v);
        let h = b.finish().unwrap();
        assert_eq!(sent.news(vec![h.clone()]).len(), 1);
        let mut b = HitBuilder::new(ContentHash([2; 32]));
        b.add(NodeId([200; 32]), "10.0.1.1:7401".into(), &v);
        assert!(sent.news(vec![b.finish().unwrap()]).is_empty());
        assert_eq!(sent.hashes(), 2);
    }

    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Ev {
        Hits(u32, Vec<(u8, u8)>),
        Ended(u32),
        Tick(u32),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (
                0u32..8,
                proptest::collection::vec((0u8..20, 0u8..80), 0..30)
            )
                .prop_map(|(n, h)| Ev::Hits(n, h)),
            (0u32..8).prop_map(Ev::Ended),
            (0u32..800).prop_map(Ev::Tick),
        ]
    }

    /// What a query's actions have done so far, and the rules they keep.
    #[derive(Default)]
    struct Watch {
        cfg: HopConfig,
        deadline: Option<Instant>,
        asked: HashSet<u32>,
        sources: HashMap<ContentHash, HashSet<NodeId>>,
        finished: bool,
    }

    impl Watch {
        fn check(&mut self, q: &mut HopQuery<u32>, now: Instant) -> Result<(), TestCaseError> {
            let deadline = self.deadline.expect("deadline");
            for a in drain(q) {
                prop_assert!(!self.finished, "{:?} after Finish", a);
                match a {
                    Action::Forward { to, budget, .. } => {
                        prop_assert!(self.asked.insert(to), "{} asked twice", to);
                        let left = deadline.saturating_duration_since(now);
                        let margin = self.cfg.hop_margin;
                        prop_assert!(budget + margin <= left.max(margin));
                    }
                    Action::SendHits { hits } => {
                        for h in hits {
                            let known = self.sources.entry(h.hash).or_default();
                            for s in h.sources {
                                prop_assert!(known.insert(s.id), "source sent twice");
                            }
                            prop_assert!(known.len() <= MAX_SOURCES_PER_HIT);
                        }
                    }
                    Action::Finish => self.finished = true,
                    _ => {}
                }
            }
            Ok(())
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever comes back in whatever order: each neighbour is asked
        /// at most once, within the time left less the margin; no source
        /// is sent twice and no hash gets more than `MAX_SOURCES_PER_HIT`;
        /// nothing follows `Finish`, which comes once, by the deadline.
        #[test]
        fn a_query_keeps_its_rules_whatever_happens(
            origin in any::<bool>(),
            neighbours in 0u32..8,
            wanted in 1u32..30,
            events in proptest::collection::vec(ev(), 0..60),
        ) {
            let t0 = Instant::now();
            let cfg = HopConfig::default();
            let ranked: Vec<u32> = (0..neighbours).collect();
            let query = words(wanted);
            let mut q = if origin {
                leaf_query(t0, &query, ranked.clone())
            } else {
                let mq = MeshQuery { query: query.clone(), ..mesh_query(4, 3000) };
                match arrive(&mut Seen::default(), t0, 100, &mq, &ranked) {
                    Arrival::Accepted(q) => *q,
                    other => panic!("{other:?}"),
                }
            };
            let deadline = q.deadline();
            let mut f = fair();
            let mut now = t0;
            q.handle_local(now, Local::default(), &mut f);
            let mut w = Watch { cfg, deadline: Some(deadline), ..Watch::default() };
            w.check(&mut q, now)?;
            for e in events {
                match e {
                    Ev::Hits(n, hits) => {
                        let hits = hits.into_iter().map(|(file, s)| hit(file, [s, s / 2 + 100])).collect();
                        q.handle_hits(now, &n, hits);
                    }
                    Ev::Ended(n) => q.handle_ended(now, &n),
                    Ev::Tick(ms) => {
                        now += ms * MS;
                        q.handle_timeout(now, &mut f);
                    }
                }
                w.check(&mut q, now)?;
                if origin && w.sources.len() >= wanted as usize {
                    prop_assert!(q.is_finished(), "enough results and still running");
                }
            }
            q.handle_timeout(deadline, &mut f);
            w.check(&mut q, deadline)?;
            prop_assert!(q.is_finished() && w.finished);
            prop_assert!(q.poll_timeout().is_none());
        }
    }
}
