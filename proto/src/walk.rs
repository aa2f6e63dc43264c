//! Random walkers that check keyword filters one hop out: how a query
//! travels the mesh when it does not flood (`docs/PROTOCOL.md` section
//! 11.7).
//!
//! A query leaves its origin supernode as a number of *walkers* with a
//! number of *steps* each. Every supernode a walker visits:
//! - answers from its index, unless it answered that query before;
//! - sends the query as a *probe* (answer only, forward to nobody) to at
//!   most [`WalkConfig::probes`] of its neighbours whose keyword filter
//!   (`crate::filter`) may match it, unless a walker of that query
//!   visited before (it probed them then);
//! - passes its walkers on, one step less, spread over neighbours it did
//!   not probe this time (then over the others), never back to the
//!   neighbour they came from.
//!
//! The walkers spread like a flood for the first steps (a copy with 4
//! walkers reaches up to 4 neighbours, one walker each) and then walk on
//! one by one, so a query costs at most about `walkers × steps` walker
//! copies and `walkers × steps × probes` probes, whatever the mesh's size;
//! a flood costs as many copies as the mesh has links. Hits go back on the
//! stream each copy came on, as in a flood, and the origin cancels every
//! walker once it has the results it wants ([`crate::hop`]).
//!
//! This module decides only where copies go: [`observe`] says what a
//! supernode already did for a query, [`plan`] whom to send what. The
//! seen-set, the fair share of each link and the budget of each copy are
//! [`crate::hop`]'s.

use std::time::Instant;

use crate::filter::WordKey;
use crate::hop::Lookup;
use crate::msg::{MeshQuery, MeshRequest};
use crate::route::{Observed, Seen};

/// How a query travels from the origin, and its limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkConfig {
    /// Walkers a supernode starts for one of its leaves' queries. Default 12.
    pub walkers: u8,
    /// Steps each walker takes. Default 10.
    pub steps: u8,
    /// Most neighbours a visit probes. Default 4.
    pub probes: u8,
    /// An origin that knows of fewer supernodes than this floods instead
    /// ([`WalkConfig::walks`]). Default 48.
    pub flood_below: usize,
}

impl Default for WalkConfig {
    fn default() -> Self {
        Self {
            walkers: 12,
            steps: 10,
            probes: 4,
            flood_below: 48,
        }
    }
}

impl WalkConfig {
    /// Whether an origin that knows of `known` other supernodes walks a
    /// query rather than flood it. A small mesh is flooded: while it forms
    /// it is often a chain with local shortcuts, where walkers wander near
    /// their origin for all their steps (a real 20-node mesh found a file
    /// at its far edge in 3 searches of 5), and a flood of it costs no
    /// more than a walk (under 50 supernodes of 8 to 16 links).
    pub fn walks(&self, known: usize) -> bool {
        known + 1 >= self.flood_below
    }
}

/// Most walkers one copy may carry; more are lowered to it.
pub const MAX_WALKERS: u8 = 64;
/// Most steps a walker may have left; more are lowered to it.
pub const MAX_STEPS: u8 = 16;

/// How one copy of a query travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// A flood copy with `ttl` hops left (`crate::route`).
    Flood { ttl: u8 },
    /// `walkers` walkers with `steps` steps left each.
    Walk { walkers: u8, steps: u8 },
    /// Answer from the index; forward to nobody.
    Probe,
}

impl CopyKind {
    /// The `ttl` a `MeshQuery` of this kind carries on the wire: a flood
    /// copy's TTL, a walker's steps left, 0 for a probe (not read).
    pub fn wire_ttl(self) -> u8 {
        match self {
            CopyKind::Flood { ttl } => ttl,
            CopyKind::Walk { steps, .. } => steps,
            CopyKind::Probe => 0,
        }
    }

    /// The request that sends `query` as a copy of this kind (its `ttl`
    /// set to [`CopyKind::wire_ttl`]).
    pub fn request(self, query: MeshQuery) -> MeshRequest {
        let query = MeshQuery {
            ttl: self.wire_ttl(),
            ..query
        };
        match self {
            CopyKind::Flood { .. } => MeshRequest::Query(query),
            CopyKind::Walk { walkers, .. } => MeshRequest::Walk { query, walkers },
            CopyKind::Probe => MeshRequest::Probe(query),
        }
    }

    /// The kind within the limits a supernode accepts.
    pub fn capped(self) -> Self {
        match self {
            CopyKind::Walk { walkers, steps } => CopyKind::Walk {
                walkers: walkers.clamp(1, MAX_WALKERS),
                steps: steps.min(MAX_STEPS),
            },
            other => other,
        }
    }
}

/// What this supernode already did for a walked query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    /// Nothing: answer, probe, walk on.
    First,
    /// Answered it as a probe: probe and walk on, without answering again.
    Probed,
    /// A walker was here: only walk on.
    Again,
}

/// Marks in the seen-set: a walker's visit counts for more than a probe's,
/// so that a walker after a probe is [`Observed::FartherReach`].
const PROBE_MARK: u8 = 1;
const WALK_MARK: u8 = 2;

/// Records that a copy of `kind` of query `id` arrived, and says what was
/// done for it before; `None` for a probe of a query answered before (a
/// duplicate: nothing to do). A flood copy is not a walk: `None`.
pub fn observe(seen: &mut Seen, now: Instant, id: u64, kind: CopyKind) -> Option<Visit> {
    let mark = match kind {
        CopyKind::Probe => PROBE_MARK,
        CopyKind::Walk { .. } => WALK_MARK,
        CopyKind::Flood { .. } => return None,
    };
    match (seen.observe(id, mark, now), kind) {
        (Observed::New, _) => Some(Visit::First),
        (Observed::FartherReach, _) => Some(Visit::Probed),
        (Observed::Seen, CopyKind::Walk { .. }) => Some(Visit::Again),
        (Observed::Seen, _) => None,
    }
}

/// What a neighbour's filter is checked against: the keys of a query's
/// words, or of the hash it asks for.
pub fn keys(lookup: &Lookup) -> Vec<WordKey> {
    match lookup {
        Lookup::Words(words) => words.iter().map(|w| WordKey::of(w)).collect(),
        Lookup::Hash(hash) => vec![WordKey::of_hash(hash)],
    }
}

/// The neighbours a visit may send copies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View<N> {
    /// Every neighbour.
    pub neighbours: Vec<N>,
    /// Those whose filter may match the query ([`keys`]).
    pub matching: Vec<N>,
}

impl<N> Default for View<N> {
    fn default() -> Self {
        Self {
            neighbours: Vec::new(),
            matching: Vec::new(),
        }
    }
}

/// Where the copies of one visit go: probes to at most `probes` matching
/// neighbours (none on a walker's second visit), then `walkers` walkers
/// with `steps` steps left spread over the neighbours not probed (then
/// over the probed ones), one step less each; nobody gets a copy twice,
/// and `from` gets none. `random` draws the order among equals (uniform
/// `u64`s, from the caller's seeded generator): a walker must not be
/// steerable by the order a driver lists its neighbours in.
pub fn plan<N: Clone + PartialEq>(
    walkers: u8,
    steps: u8,
    probes: u8,
    visit: Visit,
    from: Option<&N>,
    view: View<N>,
    random: &mut impl FnMut() -> u64,
) -> Vec<(N, CopyKind)> {
    let View {
        mut neighbours,
        mut matching,
    } = view;
    neighbours.retain(|n| Some(n) != from);
    dedup(&mut neighbours);
    matching.retain(|n| Some(n) != from && neighbours.contains(n));
    dedup(&mut matching);
    let mut out: Vec<(N, CopyKind)> = Vec::new();
    if visit != Visit::Again {
        shuffle(&mut matching, random);
        matching.truncate(probes.into());
        out.extend(matching.into_iter().map(|n| (n, CopyKind::Probe)));
    }
    let (walkers, steps) = (walkers.min(MAX_WALKERS), steps.min(MAX_STEPS));
    if steps == 0 || walkers == 0 {
        return out;
    }
    shuffle(&mut neighbours, random);
    // Neighbours not probed first, in random order; then the probed ones.
    let probed = |n: &N| out.iter().any(|(p, _)| p == n);
    let (mut fresh, again): (Vec<N>, Vec<N>) = neighbours.into_iter().partition(|n| !probed(n));
    fresh.extend(again);
    let reach = fresh.len().min(walkers.into());
    if reach == 0 {
        return out;
    }
    let (share, extra) = (walkers as usize / reach, walkers as usize % reach);
    for (i, to) in fresh.into_iter().take(reach).enumerate() {
        let walkers = (share + usize::from(i < extra)) as u8;
        let kind = CopyKind::Walk {
            walkers,
            steps: steps - 1,
        };
        // A probed neighbour gets the walker in place of its probe.
        match out.iter_mut().find(|(p, _)| *p == to) {
            Some(slot) => slot.1 = kind,
            None => out.push((to, kind)),
        }
    }
    out
}

/// Keeps the first of equal entries (a few dozen neighbours at most).
fn dedup<N: PartialEq>(v: &mut Vec<N>) {
    let mut i = 0;
    while i < v.len() {
        if v[..i].contains(&v[i]) {
            v.remove(i);
        } else {
            i += 1;
        }
    }
}

/// Fisher–Yates with the caller's random numbers.
fn shuffle<T>(v: &mut [T], random: &mut impl FnMut() -> u64) {
    for i in (1..v.len()).rev() {
        let j = (random() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    fn counter() -> impl FnMut() -> u64 {
        let mut x = 0x1234_5678_u64;
        move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 11
        }
    }

    fn view(neighbours: impl IntoIterator<Item = u32>, matching: &[u32]) -> View<u32> {
        View {
            neighbours: neighbours.into_iter().collect(),
            matching: matching.to_vec(),
        }
    }

    fn walkers(out: &[(u32, CopyKind)]) -> u32 {
        out.iter()
            .map(|(_, k)| match k {
                CopyKind::Walk { walkers, .. } => u32::from(*walkers),
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn a_first_visit_probes_matching_neighbours_and_walks_on_elsewhere() {
        let out = plan(
            2,
            5,
            4,
            Visit::First,
            Some(&0),
            view(0..8, &[3, 5]),
            &mut counter(),
        );
        let probes: HashSet<u32> = out
            .iter()
            .filter(|(_, k)| *k == CopyKind::Probe)
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(probes, HashSet::from([3, 5]));
        let walked: Vec<u32> = out
            .iter()
            .filter(|(_, k)| matches!(k, CopyKind::Walk { .. }))
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(walked.len(), 2, "{out:?}");
        for n in &walked {
            assert!(![0, 3, 5].contains(n), "walked to {n}: back or probed");
        }
        assert!(out.iter().all(|(_, k)| !matches!(
            k,
            CopyKind::Walk { steps, .. } if *steps != 4
        )));
    }

    #[test]
    fn a_second_visit_only_walks_and_the_last_step_only_probes() {
        let again = plan(
            1,
            3,
            4,
            Visit::Again,
            Some(&0),
            view(0..8, &[3]),
            &mut counter(),
        );
        assert_eq!(again.len(), 1);
        assert!(matches!(
            again[0].1,
            CopyKind::Walk {
                walkers: 1,
                steps: 2
            }
        ));
        let last = plan(
            3,
            0,
            4,
            Visit::First,
            Some(&0),
            view(0..8, &[3, 4]),
            &mut counter(),
        );
        assert!(last.iter().all(|(_, k)| *k == CopyKind::Probe));
        assert_eq!(last.len(), 2);
    }

    #[test]
    fn probes_are_capped_and_walkers_go_to_probed_neighbours_only_when_nobody_else_is_left() {
        let out = plan(
            4,
            2,
            2,
            Visit::First,
            None,
            view(0..3, &[0, 1, 2]),
            &mut counter(),
        );
        // Two probes at most; the walkers fill the third neighbour first,
        // then replace probes.
        assert_eq!(out.len(), 3, "{out:?}");
        assert_eq!(walkers(&out), 4);
        let probes = out.iter().filter(|(_, k)| *k == CopyKind::Probe).count();
        assert!(probes <= 2);
    }

    #[test]
    fn the_seen_set_tells_first_visits_probes_and_repeats_apart() {
        let t0 = Instant::now();
        let mut seen = Seen::default();
        let walk = CopyKind::Walk {
            walkers: 1,
            steps: 3,
        };
        assert_eq!(
            observe(&mut seen, t0, 1, CopyKind::Probe),
            Some(Visit::First)
        );
        assert_eq!(observe(&mut seen, t0, 1, CopyKind::Probe), None);
        assert_eq!(observe(&mut seen, t0, 1, walk), Some(Visit::Probed));
        assert_eq!(observe(&mut seen, t0, 1, walk), Some(Visit::Again));
        assert_eq!(observe(&mut seen, t0, 1, CopyKind::Probe), None);
        assert_eq!(observe(&mut seen, t0, 2, walk), Some(Visit::First));
        assert_eq!(observe(&mut seen, t0, 3, CopyKind::Flood { ttl: 4 }), None);
    }

    #[test]
    fn each_kind_goes_on_the_wire_as_its_own_request_with_its_ttl() {
        use crate::msg::{Query, QueryKind};
        let q = MeshQuery {
            id: 9,
            ttl: 99,
            timeout_ms: 100,
            query: Query {
                kind: QueryKind::Keywords(vec!["moon".into()]),
                max_results: 5,
            },
        };
        let with_ttl = |ttl| MeshQuery { ttl, ..q.clone() };
        assert_eq!(
            CopyKind::Flood { ttl: 3 }.request(q.clone()),
            MeshRequest::Query(with_ttl(3))
        );
        assert_eq!(
            CopyKind::Walk {
                walkers: 2,
                steps: 7
            }
            .request(q.clone()),
            MeshRequest::Walk {
                query: with_ttl(7),
                walkers: 2
            }
        );
        assert_eq!(
            CopyKind::Probe.request(q.clone()),
            MeshRequest::Probe(with_ttl(0))
        );
    }

    #[test]
    fn hostile_walk_sizes_are_capped() {
        let k = CopyKind::Walk {
            walkers: 255,
            steps: 255,
        }
        .capped();
        assert_eq!(
            k,
            CopyKind::Walk {
                walkers: MAX_WALKERS,
                steps: MAX_STEPS
            }
        );
        let out = plan(
            255,
            255,
            255,
            Visit::First,
            None,
            view(0..200, &[]),
            &mut counter(),
        );
        assert_eq!(walkers(&out), u32::from(MAX_WALKERS));
    }

    proptest! {
        /// Whatever the neighbours and filters: no copy goes back to the
        /// sender, nobody gets two copies, the walkers are all passed on
        /// while anyone is left to take them, and probes stay capped.
        #[test]
        fn a_plan_keeps_walkers_and_never_sends_back(
            n in 0u32..40,
            matching in proptest::collection::vec(0u32..50, 0..30),
            walkers_n in 1u8..=MAX_WALKERS,
            steps in 0u8..=MAX_STEPS,
            probes in 0u8..8,
            from in proptest::option::of(0u32..40),
            visit in prop_oneof![Just(Visit::First), Just(Visit::Probed), Just(Visit::Again)],
            seed in any::<u64>(),
        ) {
            let mut x = seed;
            let mut random = move || { x = x.wrapping_mul(6364136223846793005).wrapping_add(1); x >> 7 };
            let out = plan(walkers_n, steps, probes, visit, from.as_ref(), view(0..n, &matching), &mut random);
            let to: Vec<u32> = out.iter().map(|(t, _)| *t).collect();
            let distinct: HashSet<u32> = to.iter().copied().collect();
            prop_assert_eq!(distinct.len(), to.len());
            prop_assert!(to.iter().all(|t| Some(*t) != from && *t < n));
            let others = (0..n).filter(|t| Some(*t) != from).count() as u32;
            if steps > 0 && others > 0 {
                prop_assert_eq!(walkers(&out), u32::from(walkers_n));
            } else {
                prop_assert_eq!(walkers(&out), 0);
            }
            let probes_sent = out.iter().filter(|(_, k)| *k == CopyKind::Probe).count();
            prop_assert!(probes_sent <= probes as usize);
            if visit == Visit::Again {
                prop_assert_eq!(probes_sent, 0);
            }
        }
    }
}
