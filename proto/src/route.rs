//! Query routing over the supernode mesh, as pure decisions: the caller
//! passes the state, the message and the time, and gets back what to do.
//! No sockets, no clocks of its own: the same code runs in a supernode and
//! in simulations of hundreds of supernodes.
//!
//! The scheme is flooding with a hop limit and duplicate suppression:
//! - a query carries a random id and a TTL (hops it may still travel);
//! - a supernode processes a query id at most once (a bounded, expiring
//!   memory of ids seen) and forwards it, with TTL − 1, to every neighbour
//!   but the one it came from, as long as that TTL is at least 1;
//! - a later copy with more hops left than any before it (it came by a
//!   shorter path, or the origin widened the search) is forwarded again but
//!   not answered again, so the whole TTL radius is reached whatever order
//!   copies arrive in;
//! - hits travel back on the stream the query came on, so they can only
//!   follow the reverse path of a query that was really forwarded.
//!
//! When copies arrive in hop order (as on links of similar latency) each
//! link carries a query at most once in each direction, so one query costs
//! at most twice as many messages as the mesh has links; copies that
//! overtake each other can add extensions, at most one per TTL level. The origin
//! widens the search step by step ([`DynamicQuery`]) and stops as soon as
//! enough results have come or the leaf's deadline has passed.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Highest TTL a supernode accepts; larger values are lowered to it.
pub const MAX_TTL: u8 = 7;
/// TTL of a new query. With 8 neighbours a supernode reaches thousands of
/// others within 4 hops, more than any one search needs.
pub const DEFAULT_TTL: u8 = 4;
/// How long a query id is remembered: longer than any query may run.
pub const SEEN_TTL: Duration = Duration::from_secs(60);
/// Most query ids remembered; the oldest are forgotten first.
///
/// A neighbour that floods fresh ids can only push out old ones, and only
/// as fast as the mesh query limits let its queries in (a query refused
/// by the limit is never recorded): at the defaults, 16 neighbours at 200
/// a second, 3 200 ids a second in all, so an id stays at least 31 s,
/// longer than any query lives (a hop's budget is at most 10 s). A
/// forgotten id can only make a late copy be answered twice, never loop:
/// every copy has one hop less. About 50 bytes an id: 5 MB when full.
pub const SEEN_CAPACITY: usize = 100_000;

/// A bounded, time-expiring set of query ids.
#[derive(Debug)]
pub struct Seen {
    /// id → (first seen, highest TTL seen with).
    at: HashMap<u64, (Instant, u8)>,
    order: VecDeque<(u64, Instant)>,
    capacity: usize,
    ttl: Duration,
}

impl Default for Seen {
    fn default() -> Self {
        Self::new(SEEN_CAPACITY, SEEN_TTL)
    }
}

impl Seen {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            at: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            ttl,
        }
    }

    /// Records `id`; true if it had not been seen (within the memory).
    pub fn insert(&mut self, id: u64, now: Instant) -> bool {
        matches!(self.observe(id, 0, now), Observed::New)
    }

    /// Records that `id` arrived with `ttl`: new, with more reach than any
    /// copy before it, or nothing new.
    pub fn observe(&mut self, id: u64, ttl: u8, now: Instant) -> Observed {
        self.expire(now);
        if let Some((_, best)) = self.at.get_mut(&id) {
            if ttl > *best {
                *best = ttl;
                return Observed::FartherReach;
            }
            return Observed::Seen;
        }
        while self.at.len() >= self.capacity {
            match self.order.pop_front() {
                Some((old, _)) => {
                    self.at.remove(&old);
                }
                None => break,
            }
        }
        self.at.insert(id, (now, ttl));
        self.order.push_back((id, now));
        Observed::New
    }

    pub fn contains(&self, id: u64) -> bool {
        self.at.contains_key(&id)
    }

    /// Forgets ids older than the memory's TTL.
    pub fn expire(&mut self, now: Instant) {
        while let Some(&(id, t)) = self.order.front() {
            if now.saturating_duration_since(t) < self.ttl {
                break;
            }
            self.order.pop_front();
            if self.at.get(&id).is_some_and(|(first, _)| *first == t) {
                self.at.remove(&id);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }
}

/// What [`Seen::observe`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    New,
    /// Seen before, but this copy may travel farther.
    FartherReach,
    Seen,
}

/// What to do with a query that arrived from a neighbour (or, with
/// `from = None`, that a leaf of this supernode asked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryAction<N> {
    /// Seen before: answer nothing and forward nothing.
    Duplicate,
    /// Answer from the local index, and forward with `ttl` to `forward`.
    Process { forward: Vec<N>, ttl: u8 },
    /// Already answered, but this copy has more hops left than the first:
    /// forward it with `ttl` to `forward` without answering again, so that a
    /// query first met by a long path still reaches its whole TTL radius.
    Extend { forward: Vec<N>, ttl: u8 },
}

/// Decides what to do with query `id` that arrived with `ttl` hops left.
/// For a query of our own leaf, `ttl` is the TTL it starts with.
pub fn on_query<N: Clone + PartialEq>(
    seen: &mut Seen,
    now: Instant,
    id: u64,
    ttl: u8,
    from: Option<&N>,
    neighbours: impl FnOnce() -> Vec<N>,
) -> QueryAction<N> {
    let ttl = ttl.min(MAX_TTL);
    // Our own query goes out with its full TTL; a received one with one less.
    let out = if from.is_none() {
        ttl
    } else {
        ttl.saturating_sub(1)
    };
    // Asked for only when the query goes on: a duplicate costs no ranking.
    let forward = || -> Vec<N> {
        if out == 0 {
            Vec::new()
        } else {
            let mut v = neighbours();
            v.retain(|n| Some(n) != from);
            v
        }
    };
    match seen.observe(id, ttl, now) {
        Observed::New => QueryAction::Process {
            forward: forward(),
            ttl: out,
        },
        Observed::FartherReach if out > 0 => QueryAction::Extend {
            forward: forward(),
            ttl: out,
        },
        Observed::FartherReach | Observed::Seen => QueryAction::Duplicate,
    }
}

/// The origin's plan for widening a search: ask a first group of
/// neighbours, then one more group every `step` while too few results have
/// come, and stop when enough have come, everyone was asked and answered,
/// or the deadline passes.
#[derive(Debug, Clone)]
pub struct DynamicQuery<N> {
    waiting: VecDeque<N>,
    outstanding: usize,
    results: usize,
    wanted: usize,
    next_step: Instant,
    step: Duration,
    deadline: Instant,
    group: usize,
}

impl<N: Clone> DynamicQuery<N> {
    /// `neighbours` in the order they should be asked (best first).
    pub fn new(
        neighbours: Vec<N>,
        wanted: usize,
        now: Instant,
        deadline: Instant,
        step: Duration,
    ) -> Self {
        Self {
            waiting: neighbours.into(),
            outstanding: 0,
            results: 0,
            wanted: wanted.max(1),
            next_step: now,
            step,
            deadline,
            group: 1,
        }
    }

    /// Neighbours to send the query to now.
    pub fn poll(&mut self, now: Instant) -> Vec<N> {
        if self.is_done(now) || now < self.next_step {
            return Vec::new();
        }
        let n = self.group.min(self.waiting.len());
        let out: Vec<N> = self.waiting.drain(..n).collect();
        self.outstanding += out.len();
        // Each step asks twice as many as the last.
        self.group = self.group.saturating_mul(2);
        self.next_step = now + self.step;
        out
    }

    /// One neighbour has finished answering, with `results` new results.
    pub fn on_answer(&mut self, results: usize) {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.results += results;
    }

    /// Results that came from somewhere else (the local index).
    pub fn add_results(&mut self, results: usize) {
        self.results += results;
    }

    /// Neighbours not asked yet.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// When `poll` may next have something to send.
    pub fn next_wakeup(&self) -> Instant {
        Instant::min(self.next_step, self.deadline)
    }

    pub fn is_done(&self, now: Instant) -> bool {
        now >= self.deadline
            || self.results >= self.wanted
            || (self.waiting.is_empty() && self.outstanding == 0)
    }

    /// Asks the next group at once if nothing is outstanding.
    pub fn hurry_if_idle(&mut self, now: Instant) {
        if self.outstanding == 0 {
            self.next_step = now;
        }
    }
}

/// Caps on how many neighbours may share an address or a /24 (IPv4) or /48
/// (IPv6), so that one host or network cannot surround a supernode.
/// Addresses the operator exempts (`exempt_ips`; local test networks
/// exempt 127.0.0.1 and ::1, where all their honest nodes live) are
/// neither capped nor counted against others: other loopback addresses,
/// such as a test's attacker on 127.0.0.2, are capped like any address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpCaps {
    pub per_ip: usize,
    pub per_subnet: usize,
}

impl Default for IpCaps {
    fn default() -> Self {
        Self {
            per_ip: 2,
            per_subnet: 4,
        }
    }
}

/// Whether one more neighbour at `ip` stays within `caps`, given the
/// addresses of the current neighbours; `exempt` says which addresses the
/// caps spare.
pub fn ip_allowed(
    ip: IpAddr,
    current: impl IntoIterator<Item = IpAddr>,
    caps: IpCaps,
    exempt: impl Fn(IpAddr) -> bool,
) -> bool {
    if exempt(ip) {
        return true;
    }
    let (mut same_ip, mut same_net) = (0, 0);
    for other in current.into_iter().filter(|o| !exempt(*o)) {
        if other == ip {
            same_ip += 1;
        }
        if subnet(other) == subnet(ip) {
            same_net += 1;
        }
    }
    same_ip < caps.per_ip && same_net < caps.per_subnet
}

fn subnet(ip: IpAddr) -> (u8, [u8; 6]) {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            (4, [o[0], o[1], o[2], 0, 0, 0])
        }
        IpAddr::V6(v6) => {
            let o = v6.octets();
            (6, [o[0], o[1], o[2], o[3], o[4], o[5]])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_is_bounded_and_expires() {
        let t0 = Instant::now();
        let mut s = Seen::new(3, Duration::from_secs(10));
        assert!(s.insert(1, t0));
        assert!(!s.insert(1, t0));
        assert!(s.insert(2, t0) && s.insert(3, t0) && s.insert(4, t0));
        assert_eq!(s.len(), 3);
        assert!(!s.contains(1), "oldest forgotten first");
        assert!(s.insert(5, t0 + Duration::from_secs(11)));
        assert_eq!(s.len(), 1, "everything older than the TTL expired");
    }

    #[test]
    fn a_flood_of_fresh_ids_at_the_mesh_limits_forgets_no_live_query() {
        // 16 neighbours at 200 queries a second, every one a fresh id, for
        // twice as long as ids are remembered; an honest query every
        // second must still be known 10 s on (the longest a query lives).
        let t0 = Instant::now();
        let mut s = Seen::default();
        let mut flood = u64::MAX / 2;
        for ms in 0..120_000u64 {
            let now = t0 + Duration::from_millis(ms);
            for _ in 0..(16 * 200 / 1000 + u64::from(ms % 5 == 0)) {
                flood += 1;
                s.insert(flood, now);
            }
            if ms % 1000 == 0 {
                assert!(s.insert(ms, now));
            }
            if ms >= 10_000 && ms % 1000 == 0 {
                assert!(s.contains(ms - 10_000), "honest id from 10 s ago forgotten");
            }
            assert!(s.len() <= SEEN_CAPACITY);
        }
    }

    #[test]
    fn forwarding_respects_ttl_and_sender() {
        let t = Instant::now();
        let mut s = Seen::default();
        let n = [1, 2, 3];
        assert_eq!(
            on_query(&mut s, t, 7, 2, None, || n.to_vec()),
            QueryAction::Process {
                forward: vec![1, 2, 3],
                ttl: 2
            }
        );
        let mut s = Seen::default();
        assert_eq!(
            on_query(&mut s, t, 7, 2, Some(&2), || n.to_vec()),
            QueryAction::Process {
                forward: vec![1, 3],
                ttl: 1
            }
        );
        assert_eq!(
            on_query(&mut s, t, 7, 2, Some(&1), || n.to_vec()),
            QueryAction::Duplicate
        );
        let mut s = Seen::default();
        assert_eq!(
            on_query(&mut s, t, 8, 1, Some(&2), || n.to_vec()),
            QueryAction::Process {
                forward: vec![],
                ttl: 0
            }
        );
        let mut s = Seen::default();
        match on_query(&mut s, t, 9, 200, Some(&2), || n.to_vec()) {
            QueryAction::Process { ttl, .. } => assert_eq!(ttl, MAX_TTL - 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_copy_with_more_reach_is_forwarded_but_not_answered_again() {
        let t = Instant::now();
        let mut s = Seen::default();
        let n = [1, 2, 3];
        assert!(matches!(
            on_query(&mut s, t, 5, 1, Some(&1), || n.to_vec()),
            QueryAction::Process { ttl: 0, .. }
        ));
        assert_eq!(
            on_query(&mut s, t, 5, 3, Some(&2), || n.to_vec()),
            QueryAction::Extend {
                forward: vec![1, 3],
                ttl: 2
            }
        );
        assert_eq!(
            on_query(&mut s, t, 5, 3, Some(&3), || n.to_vec()),
            QueryAction::Duplicate
        );
        assert_eq!(
            on_query(&mut s, t, 5, 2, Some(&3), || n.to_vec()),
            QueryAction::Duplicate
        );
    }

    #[test]
    fn dynamic_query_widens_step_by_step_and_stops_when_satisfied() {
        let t = Instant::now();
        let step = Duration::from_millis(100);
        let mut q = DynamicQuery::new(
            vec![1, 2, 3, 4, 5, 6, 7],
            10,
            t,
            t + Duration::from_secs(5),
            step,
        );
        assert_eq!(q.poll(t), vec![1]);
        assert!(q.poll(t).is_empty(), "waits for the step");
        assert_eq!(q.poll(t + step), vec![2, 3]);
        q.on_answer(4);
        assert_eq!(q.poll(t + step * 2), vec![4, 5, 6, 7]);
        q.on_answer(6);
        assert!(q.is_done(t + step * 2), "enough results");
        assert!(q.poll(t + step * 3).is_empty());
    }

    #[test]
    fn dynamic_query_ends_at_the_deadline_or_when_all_answered() {
        let t = Instant::now();
        let mut q = DynamicQuery::new(
            vec![1],
            10,
            t,
            t + Duration::from_secs(1),
            Duration::from_millis(10),
        );
        assert_eq!(q.poll(t), vec![1]);
        assert!(!q.is_done(t));
        q.on_answer(0);
        assert!(q.is_done(t), "nobody left to ask");
        let q = DynamicQuery::new(
            vec![1, 2],
            10,
            t,
            t + Duration::from_secs(1),
            Duration::from_millis(10),
        );
        assert!(q.is_done(t + Duration::from_secs(1)));
    }

    #[test]
    fn ip_caps_limit_one_host_and_one_subnet() {
        let caps = IpCaps {
            per_ip: 2,
            per_subnet: 3,
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let none = |_: IpAddr| false;
        let cur = [ip("10.0.0.1"), ip("10.0.0.1")];
        assert!(!ip_allowed(ip("10.0.0.1"), cur, caps, none));
        assert!(ip_allowed(ip("10.0.0.2"), cur, caps, none));
        let cur = [ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")];
        assert!(!ip_allowed(ip("10.0.0.4"), cur, caps, none));
        assert!(ip_allowed(ip("10.0.1.4"), cur, caps, none));
        let lo = [ip("127.0.0.1"); 10];
        let exempt = |a: IpAddr| a == ip("127.0.0.1");
        assert!(ip_allowed(ip("127.0.0.1"), lo, caps, exempt), "exempt");
        // The exempt neighbours do not count against an attacker on the
        // same /24, and the attacker is capped like anyone else.
        assert!(ip_allowed(ip("127.0.0.2"), lo, caps, exempt));
        let two = [ip("127.0.0.2"), ip("127.0.0.2")];
        assert!(!ip_allowed(ip("127.0.0.2"), two, caps, exempt));
        assert!(
            !ip_allowed(ip("127.0.0.2"), two, caps, none),
            "loopback is not exempt by itself"
        );
    }
}
