//! Supernode election, as pure decisions: when a supernode should grow the
//! network by promoting one of its leaves, which leaf, and when an elected
//! supernode should step down. The caller passes the time and the facts.
//!
//! Damping: a supernode elects only after being over its high-water mark
//! for a randomised wait, and at most once per cool-down, so that a burst of
//! joins does not promote a crowd at once; an elected supernode steps down
//! only after holding no more than `drained_leaves` leaves for `drain_for`.

use std::time::{Duration, Instant};

/// The rules, with their defaults (see docs/PROTOCOL.md).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
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
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            high_water_permille: 800,
            overload_for: Duration::from_secs(10),
            jitter: Duration::from_secs(10),
            cooldown: Duration::from_secs(30),
            min_uptime: Duration::from_secs(600),
            min_cpu_idle_permille: 500,
            min_mem_mib: 512,
            drained_leaves: 0,
            drain_for: Duration::from_secs(300),
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
    drained_since: Option<Instant>,
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

    /// Records that an election was made (whether or not a leaf accepted):
    /// the cool-down starts and a new overload episode must begin.
    pub fn elected(&mut self, now: Instant) {
        self.last_election = Some(now);
        self.overloaded_since = None;
    }
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
}
