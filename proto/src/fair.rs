//! Fair forwarding: which queries a supernode passes on to each neighbour,
//! so that one flooding neighbour spends only its own share of what this
//! node forwards (Daswani and Garcia-Molina, "Query-flood DoS attacks in
//! Gnutella", CCS 2002: fair-share forwarding per incoming connection).
//!
//! Every neighbour limits the mesh queries it takes from us with a token
//! bucket (`mesh_query_rate`, `mesh_query_burst`, charged by cost,
//! [`crate::cost`]). A query it refuses is lost, whoever asked it. So this
//! node keeps, per outgoing link, a mirror of that bucket at
//! [`LINK_HEADROOM`] of its rate and burst, and never sends more than the
//! mirror allows: the neighbour does not refuse us, and what we send is
//! what we chose to send.
//!
//! What the mirror allows is shared among the *origins* that use the link:
//! each of our own leaves, and each neighbour whose queries we forward.
//! With `k` origins active in the last [`ACTIVE_WINDOW`], each has a share
//! bucket of `rate / (k + 1)` and `burst / (k + 1)` (at least one query):
//! one share is always kept free, so that an origin that starts asking
//! finds room at once. A share's tokens are a promise: the mirror never
//! gives away what it has promised. A query goes out:
//! - within its share, if the mirror has a token and the share holds the
//!   query's cost (or as much as a share can hold); it pays its whole cost
//!   from both, as the neighbour's bucket charges it ([`Verdict::Forward`]);
//! - beyond its share, if the mirror, once paid, still holds everything
//!   promised to the shares plus one free share: capacity nobody else is
//!   using is not wasted ([`Verdict::Borrow`]).
//!
//! Otherwise it is not sent to that neighbour ([`Verdict::Drop`]), as if
//! that neighbour had found nothing. So an origin that asks no more than
//! its share always gets through, however hard others flood (property-
//! tested below), and a flooder gets its own share plus what the others
//! leave unused.
//!
//! No queue: a mesh query is worth something only within its deadline,
//! and a queue behind a flooder would only make honest queries late.
//! State is bounded: at most [`MAX_ORIGINS_PER_LINK`] origins per link
//! (beyond them a newcomer gets only capacity nobody uses), and origins
//! idle for longer than [`ACTIVE_WINDOW`] are forgotten.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Fraction of a neighbour's limit this node allows itself to use, so that
/// timing jitter between the two buckets never makes the neighbour refuse.
pub const LINK_HEADROOM: f64 = 0.9;
/// An origin that asked nothing for this long no longer counts as active.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(2);
/// Most origins with a share on one link.
pub const MAX_ORIGINS_PER_LINK: usize = 1024;
/// Idle origins are looked for at most this often (the check walks them all).
const PURGE_EVERY: Duration = Duration::from_millis(200);

/// Where a query forwarded by this node came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin<N> {
    /// One of this supernode's own leaves.
    Leaf(N),
    /// A mesh neighbour that forwarded it to us.
    Neighbour(N),
}

/// What to do with a query on one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it now, within its origin's share.
    Forward,
    /// Send it now, on capacity other origins left unused.
    Borrow,
    /// Do not send it on this link.
    Drop,
}

impl Verdict {
    pub fn forwards(self) -> bool {
        !matches!(self, Verdict::Drop)
    }
}

#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(cap: f64, now: Instant) -> Self {
        Self {
            tokens: cap,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant, rate: f64, cap: f64) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * rate).min(cap);
    }
}

#[derive(Debug, Clone)]
struct Share {
    bucket: Bucket,
    active: Instant,
}

#[derive(Debug, Clone)]
struct Link<O> {
    mirror: Bucket,
    origins: HashMap<O, Share>,
    purged: Instant,
}

/// The fair-forwarding state of one supernode: per outgoing link, the
/// mirror of the neighbour's limit and the share of each origin.
#[derive(Debug, Clone)]
pub struct FairForwarder<L, O> {
    rate: f64,
    burst: f64,
    links: HashMap<L, Link<O>>,
}

impl<L: Eq + Hash + Clone, O: Eq + Hash + Clone> FairForwarder<L, O> {
    /// `rate_per_sec` and `burst`: the mesh query limit each neighbour
    /// applies to us (its `mesh_query_rate` and `mesh_query_burst`).
    pub fn new(rate_per_sec: f64, burst: u32) -> Self {
        let rate = if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
            rate_per_sec
        } else {
            0.0
        };
        Self {
            rate: rate * LINK_HEADROOM,
            burst: (f64::from(burst.max(1)) * LINK_HEADROOM).max(1.0),
            links: HashMap::new(),
        }
    }

    /// Decides whether a query from `origin` that costs `cost` tokens (at
    /// least 1; what it cost here is the estimate of what it will cost
    /// there) goes to neighbour `link` at `now`, and charges it if so.
    pub fn decide(&mut self, now: Instant, link: &L, origin: &O, cost: f64) -> Verdict {
        let cost = if cost.is_finite() { cost.max(1.0) } else { 1.0 };
        let (rate, burst) = (self.rate, self.burst);
        let l = self.links.entry(link.clone()).or_insert_with(|| Link {
            mirror: Bucket::full(burst, now),
            origins: HashMap::new(),
            purged: now,
        });
        l.mirror.refill(now, rate, burst);
        let full = l.origins.len() >= MAX_ORIGINS_PER_LINK;
        if full || now.saturating_duration_since(l.purged) >= PURGE_EVERY {
            l.origins
                .retain(|_, s| now.saturating_duration_since(s.active) < ACTIVE_WINDOW);
            l.purged = now;
        }
        let known = l.origins.contains_key(origin);
        let active = l.origins.len() + usize::from(!known);
        // One share more than there are origins is kept free, so that an
        // origin that starts asking finds room at once.
        let shares = (active + 1) as f64;
        let (share_rate, share_cap) = (rate / shares, (burst / shares).max(1.0));
        // Refill every share to `now` (a share's tokens are a promise the
        // mirror must be able to keep), and sum what they hold.
        let mut promised = 0.0;
        for s in l.origins.values_mut() {
            s.bucket.refill(now, share_rate, share_cap);
            promised += s.bucket.tokens.max(0.0);
        }
        if !known && l.origins.len() < MAX_ORIGINS_PER_LINK {
            // A newcomer starts with a full share, out of what is not
            // promised to others already.
            let start = share_cap.min((l.mirror.tokens - promised).max(0.0));
            promised += start;
            l.origins.insert(
                origin.clone(),
                Share {
                    bucket: Bucket::full(start, now),
                    active: now,
                },
            );
        }
        if let Some(share) = l.origins.get_mut(origin) {
            share.active = now;
            // A costly query waits until its share holds its whole cost
            // (or as much as a share can hold), so that no origin spends
            // what is promised to another.
            if l.mirror.tokens >= 1.0 && share.bucket.tokens >= cost.min(share_cap) {
                share.bucket.tokens -= cost;
                l.mirror.tokens -= cost;
                return Verdict::Forward;
            }
        }
        // Beyond its share: only what is promised to nobody, and enough
        // left over for a newcomer's share.
        if l.mirror.tokens >= 1.0 && l.mirror.tokens - cost >= promised + share_cap {
            l.mirror.tokens -= cost;
            return Verdict::Borrow;
        }
        Verdict::Drop
    }

    /// Forgets a link that went down.
    pub fn remove_link(&mut self, link: &L) {
        self.links.remove(link);
    }

    /// Links with state.
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// Origins with a share on `link`.
    pub fn origins(&self, link: &L) -> usize {
        self.links.get(link).map_or(0, |l| l.origins.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate::TokenBucket;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn one_origin_alone_may_use_the_whole_link() {
        let t0 = Instant::now();
        let mut f = FairForwarder::new(100.0, 100);
        let sent = (0..10_000)
            .filter(|i| f.decide(t0 + MS * *i, &"b", &1, 1.0).forwards())
            .count();
        // 90 at once, then 90 a second for 10 s: about 990, less the
        // one share kept free for a newcomer (45).
        assert!((900..=1000).contains(&sent), "{sent}");
    }

    #[test]
    fn a_flooder_does_not_starve_an_origin_within_its_share() {
        let t0 = Instant::now();
        let mut f = FairForwarder::new(200.0, 400);
        let (mut honest, mut honest_sent, mut flood_sent) = (0, 0, 0);
        for i in 0..20_000u32 {
            let now = t0 + MS * i;
            // The flooder asks every millisecond, 5 times the link's rate.
            flood_sent += usize::from(f.decide(now, &"b", &Origin::Neighbour(9), 1.0).forwards());
            // The honest leaf, every 20 ms: 50 a second, under its half.
            if i % 20 == 0 {
                honest += 1;
                honest_sent += usize::from(f.decide(now, &"b", &Origin::Leaf(1), 1.0).forwards());
            }
        }
        assert_eq!(honest_sent, honest, "every honest query forwarded");
        // The link carries no more than its mirror allows: 360 + 180/s.
        let total = flood_sent + honest_sent;
        assert!(total <= 360 + 180 * 20 + 1, "{total}");
        // And the flooder gets what the honest leaf leaves unused.
        assert!(flood_sent >= 180 * 20 - 50 * 20 - 200, "{flood_sent}");
    }

    #[test]
    fn a_broad_query_pays_its_cost() {
        let t0 = Instant::now();
        let mut f = FairForwarder::new(10.0, 10);
        // Burst 9: one query of cost 16 goes (into debt), then nothing
        // until the debt is paid back at 9 a second.
        assert!(f.decide(t0, &0, &1, 16.0).forwards());
        assert_eq!(f.decide(t0 + 100 * MS, &0, &1, 1.0), Verdict::Drop);
        assert_eq!(f.decide(t0 + 700 * MS, &0, &1, 1.0), Verdict::Drop);
        assert!(f.decide(t0 + 2500 * MS, &0, &1, 1.0).forwards());
    }

    #[test]
    fn state_is_bounded_and_idle_origins_are_forgotten() {
        let t0 = Instant::now();
        let mut f = FairForwarder::new(1000.0, 1000);
        for i in 0..5000u32 {
            f.decide(t0, &0, &i, 1.0);
        }
        assert_eq!(f.origins(&0), MAX_ORIGINS_PER_LINK);
        f.decide(t0 + ACTIVE_WINDOW + PURGE_EVERY, &0, &0, 1.0);
        assert_eq!(f.origins(&0), 1);
        f.remove_link(&0);
        assert_eq!(f.links(), 0);
    }

    #[test]
    fn nonsense_costs_and_rates_do_not_panic() {
        let t0 = Instant::now();
        let mut f = FairForwarder::new(f64::NAN, 0);
        f.decide(t0, &0, &0, f64::INFINITY);
        f.decide(t0, &0, &0, f64::NAN);
        f.decide(t0, &0, &0, -5.0);
    }

    /// What the neighbour does with what we send: `serve_mesh_query`'s
    /// bucket, one token to be let in and the rest of the cost after.
    fn neighbour_takes(b: &mut TokenBucket, now: Instant, cost: f64) -> bool {
        let ok = b.try_take(now);
        if ok {
            b.take_many(cost - 1.0, now);
        }
        ok
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the origins ask, the neighbour never refuses what we
        /// send, and every origin that asks within its fair share is
        /// never dropped.
        #[test]
        fn the_link_is_never_overrun_and_fair_shares_hold(
            rate in 20.0f64..500.0,
            burst in 1u32..800,
            honest in 1usize..6,
            flooders in 0usize..4,
            costs in proptest::collection::vec(1.0f64..16.0, 1..8),
            steps in 500u32..4000,
        ) {
            let t0 = Instant::now();
            let mut f = FairForwarder::new(rate, burst);
            let mut next_hop = TokenBucket::new(rate, burst, t0);
            let active = (honest + flooders) as f64;
            // Each honest origin asks at half its share of the rate.
            let honest_every = (2.0 * active / (rate * LINK_HEADROOM) * 1000.0).ceil() as u32;
            // Each honest origin's first query may find everything
            // promised (flooders that came first); none after it.
            let mut first = vec![true; honest];
            let mut dropped_honest = 0;
            for i in 0..steps {
                let now = t0 + MS * i;
                for o in 0..flooders {
                    let cost = costs[(i as usize + o) % costs.len()];
                    if f.decide(now, &0, &(100 + o), cost).forwards() {
                        prop_assert!(neighbour_takes(&mut next_hop, now, cost), "refused at {i}");
                    }
                }
                for (o, first) in first.iter_mut().enumerate() {
                    if (i + o as u32) % honest_every == 0 {
                        if f.decide(now, &0, &o, 1.0).forwards() {
                            prop_assert!(neighbour_takes(&mut next_hop, now, 1.0), "refused at {i}");
                        } else if !*first {
                            dropped_honest += 1;
                        }
                        *first = false;
                    }
                }
            }
            // A share smaller than a flooder's query (up to 16 tokens) goes
            // into debt, which may leave an honest origin short.
            if burst as f64 * LINK_HEADROOM / (active + 1.0) >= 16.0 {
                prop_assert_eq!(dropped_honest, 0);
            }
        }
    }
}
