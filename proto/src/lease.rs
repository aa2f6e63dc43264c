//! Registration leases: which leaves are registered with a supernode now,
//! and whether one more may register.
//!
//! A leaf registers on a stream of its own (`Register`, docs/PROTOCOL.md)
//! and stays registered for as long as that stream and its connection
//! live. "Lease" is the word for it; what exists is a registration
//! held by a session, not a lease with a term: there is no expiry timer,
//! the session ending is what releases it. `since` and `last_seen` are
//! kept so that a term can be added here if one is ever wanted.
//!
//! The rules, each in one step so that no check can be passed by two
//! registrations at once:
//! - **a dialable address**: the address other leaves download from is
//!   the IP the connection comes from with the port the leaf announced,
//!   and port 0 is not dialable;
//! - **a cap on leaves** (`max_leaves`): a leaf that is not registered
//!   already is turned away once the table is full (the driver answers
//!   `Full` with supernodes that have room);
//! - **a cap per address** (`per_address`, off unless set): at most so many
//!   leaves registered from one IP. The supernode sets none today (its gate
//!   caps connections per address, its index caps entries per address);
//!   the rule is here so that a cap on registrations has one place to live;
//! - **one session per node**: a node is known by its key, so a newer
//!   registration of the same node id replaces the older, whatever address
//!   it comes from; the driver closes the older session's connection. Each
//!   registration has a [`Generation`] of its own, and a session that ends
//!   releases its lease only if it still holds it ([`Leases::release`]).
//!
//! Not here: what a registered leaf may index (the index's caps), how fast
//! it may query (`rate`), and the connection itself (the driver keeps it
//! beside this table, keyed by generation).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// One registration of a node: a newer registration of the same node has
/// a greater generation. Never reused within one [`Leases`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

/// The settings of [`Leases`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Most leaves registered at once.
    pub max_leaves: usize,
    /// Most leaves registered at once from one IP address; `None`, no cap.
    pub per_address: Option<usize>,
}

/// A registered leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub generation: Generation,
    /// Where other leaves download from it: observed IP, announced port.
    pub addr: SocketAddr,
    /// When this registration was made.
    pub since: Instant,
    /// When its session was last heard from.
    pub last_seen: Instant,
}

/// What became of a `Register`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Registered as `generation`, at `addr`. `replaced`: the older
    /// registration of the same node this one replaces, whose session is
    /// to be closed (and its index entries and candidacy dropped).
    Admitted {
        generation: Generation,
        addr: SocketAddr,
        replaced: Option<Generation>,
    },
    /// No room: the table holds `max_leaves` other leaves.
    Full,
    /// Refused for what the request is.
    Refused(Refusal),
}

/// Why a `Register` was refused (the leaf gets a `BadRequest` or
/// `LimitExceeded` error; the table is full is [`Admission::Full`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("listen_port 0 is not dialable")]
    NotDialable,
    #[error("{cap} leaves are registered from this address already")]
    PerAddress { cap: usize },
}

/// Whether a leaf announcing `listen_port` can be downloaded from.
pub fn dialable(listen_port: u16) -> Result<(), Refusal> {
    match listen_port {
        0 => Err(Refusal::NotDialable),
        _ => Ok(()),
    }
}

/// The registrations of one supernode.
#[derive(Debug, Clone)]
pub struct Leases<N> {
    config: LeaseConfig,
    leases: HashMap<N, Lease>,
    /// Leases per IP address, kept only when `per_address` is set.
    per_ip: HashMap<IpAddr, usize>,
    next_generation: u64,
}

impl<N: Copy + Eq + Hash> Leases<N> {
    pub fn new(config: LeaseConfig) -> Self {
        Self {
            config,
            leases: HashMap::new(),
            per_ip: HashMap::new(),
            next_generation: 1,
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// Node `id`, whose connection comes from `observed`, asks to register
    /// and to be downloaded from at `listen_port` of that address.
    pub fn register(
        &mut self,
        now: Instant,
        id: N,
        observed: SocketAddr,
        listen_port: u16,
    ) -> Admission {
        if let Err(e) = dialable(listen_port) {
            return Admission::Refused(e);
        }
        let old = self.leases.get(&id);
        if old.is_none() && self.leases.len() >= self.config.max_leaves {
            return Admission::Full;
        }
        let ip = observed.ip();
        if let Some(cap) = self.config.per_address {
            // The older session of the same node gives its place up.
            let mine = old.is_some_and(|l| l.addr.ip() == ip);
            let held = self.per_ip.get(&ip).copied().unwrap_or(0);
            if !mine && held >= cap {
                return Admission::Refused(Refusal::PerAddress { cap });
            }
        }
        let generation = Generation(self.next_generation);
        self.next_generation += 1;
        let addr = SocketAddr::new(ip, listen_port);
        let lease = Lease {
            generation,
            addr,
            since: now,
            last_seen: now,
        };
        let replaced = self.leases.insert(id, lease).map(|old| {
            self.uncount(old.addr.ip());
            old.generation
        });
        if self.config.per_address.is_some() {
            *self.per_ip.entry(ip).or_insert(0) += 1;
        }
        Admission::Admitted {
            generation,
            addr,
            replaced,
        }
    }

    /// The session of `id`'s registration `generation` has ended: its
    /// lease goes, unless a newer registration holds it (then nothing
    /// happens and `None` is returned).
    pub fn release(&mut self, id: &N, generation: Generation) -> Option<Lease> {
        if !self.is_current(id, generation) {
            return None;
        }
        let lease = self.leases.remove(id)?;
        self.uncount(lease.addr.ip());
        Some(lease)
    }

    /// Whether `generation` is `id`'s registration now.
    pub fn is_current(&self, id: &N, generation: Generation) -> bool {
        self.leases
            .get(id)
            .is_some_and(|l| l.generation == generation)
    }

    /// `id`'s session `generation` was heard from at `now`; false if that
    /// registration is no longer current (its session should end).
    pub fn touch(&mut self, now: Instant, id: &N, generation: Generation) -> bool {
        match self.leases.get_mut(id) {
            Some(l) if l.generation == generation => {
                l.last_seen = l.last_seen.max(now);
                true
            }
            _ => false,
        }
    }

    pub fn get(&self, id: &N) -> Option<&Lease> {
        self.leases.get(id)
    }

    /// Where other leaves download from `id`, if it is registered.
    /// The connection of `id`'s registration `generation` now comes from
    /// `observed` (the leaf's address changed, and QUIC migrated the
    /// connection): it is downloaded from that IP address from now on, at
    /// the same port. Returns the old and new address if it changed;
    /// `None` if nothing did, or the registration is not current. A move
    /// to an IP address already at its per-address cap is refused: the
    /// session should end (the leaf registers again elsewhere).
    pub fn moved(
        &mut self,
        id: &N,
        generation: Generation,
        observed: SocketAddr,
    ) -> Result<Option<(SocketAddr, SocketAddr)>, Refusal> {
        let Some(lease) = self.leases.get(id).filter(|l| l.generation == generation) else {
            return Ok(None);
        };
        let (old, ip) = (lease.addr, observed.ip());
        if old.ip() == ip {
            return Ok(None);
        }
        if let Some(cap) = self.config.per_address {
            if self.per_ip.get(&ip).copied().unwrap_or(0) >= cap {
                return Err(Refusal::PerAddress { cap });
            }
        }
        let new = SocketAddr::new(ip, old.port());
        if let Some(l) = self.leases.get_mut(id) {
            l.addr = new;
        }
        if self.config.per_address.is_some() {
            self.uncount(old.ip());
            *self.per_ip.entry(ip).or_insert(0) += 1;
        }
        Ok(Some((old, new)))
    }

    pub fn addr(&self, id: &N) -> Option<SocketAddr> {
        self.leases.get(id).map(|l| l.addr)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&N, &Lease)> {
        self.leases.iter()
    }

    /// Leaves registered now.
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    pub fn max_leaves(&self) -> usize {
        self.config.max_leaves
    }

    /// How many more leaves may register.
    pub fn room(&self) -> usize {
        self.config.max_leaves.saturating_sub(self.leases.len())
    }

    /// Leases registered from `ip` now (counted only with a per-address cap).
    pub fn from_address(&self, ip: IpAddr) -> usize {
        self.per_ip.get(&ip).copied().unwrap_or(0)
    }

    fn uncount(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: u8, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::from([192, 0, 2, ip]), port)
    }

    fn leases(max_leaves: usize, per_address: Option<usize>) -> Leases<u8> {
        Leases::new(LeaseConfig {
            max_leaves,
            per_address,
        })
    }

    fn generation(a: &Admission) -> Generation {
        match a {
            Admission::Admitted { generation, .. } => *generation,
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[test]
    fn registers_at_the_observed_ip_and_the_announced_port() {
        let mut t = leases(2, None);
        let now = Instant::now();
        let a = t.register(now, 1, at(9, 5555), 7401);
        assert_eq!(
            a,
            Admission::Admitted {
                generation: Generation(1),
                addr: at(9, 7401),
                replaced: None
            }
        );
        assert_eq!(t.addr(&1), Some(at(9, 7401)));
        assert_eq!((t.len(), t.room()), (1, 1));
        assert_eq!(
            t.register(now, 2, at(9, 5555), 0),
            Admission::Refused(Refusal::NotDialable)
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn full_turns_new_leaves_away_but_not_a_registered_one() {
        let mut t = leases(2, None);
        let now = Instant::now();
        generation(&t.register(now, 1, at(1, 1), 7401));
        generation(&t.register(now, 2, at(2, 1), 7401));
        assert_eq!(t.register(now, 3, at(3, 1), 7401), Admission::Full);
        assert_eq!(t.room(), 0);
        // The same node from a new connection, even a new address.
        let again = t.register(now, 2, at(7, 1), 7401);
        assert!(matches!(
            again,
            Admission::Admitted {
                replaced: Some(Generation(2)),
                ..
            }
        ));
        assert_eq!(t.len(), 2);
        assert_eq!(t.addr(&2), Some(at(7, 7401)));
    }

    #[test]
    fn only_the_current_session_releases() {
        let mut t = leases(4, None);
        let now = Instant::now();
        let old = generation(&t.register(now, 1, at(1, 1), 7401));
        let new = generation(&t.register(now, 1, at(1, 2), 7401));
        assert!(new > old);
        assert!(!t.is_current(&1, old) && t.is_current(&1, new));
        // The replaced session ends later: the new one stays.
        assert_eq!(t.release(&1, old), None);
        assert!(!t.touch(now, &1, old));
        assert_eq!(t.len(), 1);
        let later = now + std::time::Duration::from_secs(1);
        assert!(t.touch(later, &1, new));
        assert_eq!(
            t.get(&1).map(|l| (l.since, l.last_seen)),
            Some((now, later))
        );
        assert_eq!(t.release(&1, new).map(|l| l.generation), Some(new));
        assert!(t.is_empty());
        assert_eq!(t.release(&1, new), None);
    }

    #[test]
    fn per_address_cap_counts_a_replaced_session_once() {
        let mut t = leases(10, Some(2));
        let now = Instant::now();
        generation(&t.register(now, 1, at(1, 1), 7401));
        generation(&t.register(now, 2, at(1, 2), 7401));
        assert_eq!(
            t.register(now, 3, at(1, 3), 7401),
            Admission::Refused(Refusal::PerAddress { cap: 2 })
        );
        // A node already registered from there may come back from there.
        generation(&t.register(now, 2, at(1, 9), 7401));
        assert_eq!(t.from_address(at(1, 0).ip()), 2);
        // It moves away: its place at the old address is free.
        let g = generation(&t.register(now, 2, at(5, 9), 7401));
        assert_eq!(t.from_address(at(1, 0).ip()), 1);
        generation(&t.register(now, 3, at(1, 3), 7401));
        t.release(&2, g);
        assert_eq!(t.from_address(at(5, 0).ip()), 0);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashSet;

        #[derive(Debug, Clone)]
        enum Op {
            Register {
                id: u8,
                ip: u8,
                port: u16,
            },
            /// Releases `id` with the generation it got `back` registrations ago.
            Release {
                id: u8,
                back: usize,
            },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (0u8..12, 0u8..4, 0u16..3).prop_map(|(id, ip, port)| Op::Register { id, ip, port }),
                (0u8..12, 0usize..3).prop_map(|(id, back)| Op::Release { id, back }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn caps_hold_and_one_generation_per_node(
                max_leaves in 0usize..6,
                per_address in proptest::option::of(1usize..4),
                ops in proptest::collection::vec(op(), 0..80),
            ) {
                let mut t = leases(max_leaves, per_address);
                let now = Instant::now();
                let mut issued: HashMap<u8, Vec<Generation>> = HashMap::new();
                let mut all = HashSet::new();
                for op in ops {
                    match op {
                        Op::Register { id, ip, port } => {
                            let before = t.get(&id).map(|l| l.generation);
                            match t.register(now, id, at(ip, 1000), port) {
                                Admission::Admitted { generation, addr, replaced } => {
                                    prop_assert!(port != 0);
                                    prop_assert_eq!(addr, at(ip, port));
                                    prop_assert_eq!(replaced, before);
                                    prop_assert!(all.insert(generation), "generation reused");
                                    issued.entry(id).or_default().push(generation);
                                }
                                Admission::Full => {
                                    prop_assert!(before.is_none());
                                    prop_assert!(t.len() >= max_leaves);
                                }
                                Admission::Refused(_) => {}
                            }
                            // A registered node stays registered, whatever
                            // its new request got.
                            if before.is_some() {
                                prop_assert!(t.get(&id).is_some());
                            }
                        }
                        Op::Release { id, back } => {
                            let gens = issued.get(&id).cloned().unwrap_or_default();
                            let Some(g) = gens.iter().rev().nth(back).copied() else { continue };
                            let current = t.is_current(&id, g);
                            let released = t.release(&id, g);
                            prop_assert_eq!(released.is_some(), current);
                            if !current {
                                prop_assert_eq!(t.get(&id).is_some_and(|l| l.generation == g), false);
                            }
                        }
                    }
                    prop_assert!(t.len() <= max_leaves);
                    prop_assert_eq!(t.room(), max_leaves - t.len());
                    let mut by_ip: HashMap<IpAddr, usize> = HashMap::new();
                    for (id, lease) in t.iter() {
                        // The one generation held is the newest issued.
                        prop_assert_eq!(issued[id].last(), Some(&lease.generation));
                        *by_ip.entry(lease.addr.ip()).or_default() += 1;
                    }
                    if let Some(cap) = per_address {
                        for (ip, n) in &by_ip {
                            prop_assert!(*n <= cap);
                            prop_assert_eq!(t.from_address(*ip), *n);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_moved_session_is_given_out_at_its_new_address_and_counted_there() {
        let t0 = Instant::now();
        let mut l: Leases<u8> = Leases::new(LeaseConfig {
            max_leaves: 10,
            per_address: Some(1),
        });
        let a: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let Admission::Admitted { generation, .. } = l.register(t0, 1, a, 7401) else {
            panic!("admitted")
        };
        // Same IP, new port (a NAT rebinding): still the listening port.
        assert_eq!(
            l.moved(&1, generation, "192.0.2.1:6000".parse().unwrap()),
            Ok(None)
        );
        let b: SocketAddr = "198.51.100.9:40000".parse().unwrap();
        assert_eq!(
            l.moved(&1, generation, b),
            Ok(Some((
                "192.0.2.1:7401".parse().unwrap(),
                "198.51.100.9:7401".parse().unwrap()
            )))
        );
        assert_eq!(l.addr(&1), Some("198.51.100.9:7401".parse().unwrap()));
        // The old address is free again, the new one taken.
        assert!(matches!(
            l.register(t0, 2, a, 7401),
            Admission::Admitted { .. }
        ));
        assert!(matches!(l.register(t0, 3, b, 7401), Admission::Refused(_)));
        // Onto an address at its cap: refused.
        assert_eq!(
            l.moved(&1, generation, a),
            Err(Refusal::PerAddress { cap: 1 })
        );
        // An old generation moves nothing.
        assert_eq!(l.moved(&1, Generation(999), a), Ok(None));
    }
}
