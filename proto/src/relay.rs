//! Relayed connections, the last resort (docs/PROTOCOL.md 10.6): when two
//! leaves can reach each other neither directly, nor by a reverse connect,
//! nor by a punch, a supernode holding both their sessions splices a
//! stream from each into a *circuit*, and the two run their own QUIC
//! connection through it. The relay sees only that connection's
//! ciphertext.
//!
//! A relay spends its own bandwidth on others, so every circuit has a
//! budget, as in libp2p's circuit relay v2: bytes, duration and rate per
//! circuit, and circuits and rate per supernode, per leaf and per asking
//! IP address. Beyond a count, a circuit is refused, not queued; beyond
//! its bytes or its duration, it ends; its rate is held by making the
//! carrier wait before it forwards more ([`Carry::After`]), so nothing is
//! buffered beyond the one chunk in hand.
//!
//! [`Relays`] decides; the supernode only moves the bytes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::rate::TokenBucket;
use crate::NodeId;

/// What a supernode relays, and how much. Operators can turn relaying off
/// or lower any cap in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Whether this supernode relays at all. Default on.
    pub enabled: bool,
    /// Circuits open at once. Default 64.
    pub max_circuits: usize,
    /// Circuits open at once with one leaf at either end. Default 4.
    pub max_circuits_per_leaf: usize,
    /// Circuits open at once asked for from one IP address (node ids cost
    /// nothing to make). Default 8.
    pub max_circuits_per_ip: usize,
    /// Bytes one circuit carries, both ways together, before it ends.
    /// Default 4 GiB.
    pub circuit_bytes: u64,
    /// How long one circuit lasts at most. Default 1 hour.
    pub circuit_duration: Duration,
    /// How long a circuit may carry nothing either way before it ends (a
    /// live connection through it sends a keep-alive every 2 s). Default
    /// 30 s.
    pub circuit_idle: Duration,
    /// Bytes per second one circuit carries, both ways together. Default
    /// 16 MiB/s.
    pub circuit_rate: u32,
    /// Bytes per second all circuits carry together. Default 64 MiB/s.
    pub total_rate: u32,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            enabled: true,
            max_circuits: 64,
            max_circuits_per_leaf: 4,
            max_circuits_per_ip: 8,
            circuit_bytes: 4 << 30,
            circuit_duration: Duration::from_secs(3600),
            circuit_idle: Duration::from_secs(30),
            circuit_rate: 16 << 20,
            total_rate: 64 << 20,
        }
    }
}

/// Why a circuit is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Relaying is turned off here.
    Disabled,
    /// As many circuits as this supernode carries are open.
    Full,
    /// One of the two leaves is at either end of as many as it may be.
    Leaf,
    /// The asker's IP address has as many open as it may.
    Ip,
    /// A leaf cannot be relayed to itself.
    Itself,
}

impl Refusal {
    /// The reason sent in the `Error` answer.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Disabled => "relaying is turned off here",
            Refusal::Full => "relay full",
            Refusal::Leaf => "too many relayed connections for that leaf",
            Refusal::Ip => "too many relayed connections from this address",
            Refusal::Itself => "that is you",
        }
    }
}

/// One circuit, as [`Relays::open`] numbered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CircuitId(u64);

/// What the carrier does with a chunk it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Forward it once this long has passed (zero: now).
    After(Duration),
    /// Do not forward it: the circuit has used its bytes or its time, or
    /// is not open. End it.
    End(Ended),
}

/// Why a circuit ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Bytes,
    Duration,
    /// Nothing either way for [`RelayLimits::circuit_idle`].
    Idle,
    Closed,
}

#[derive(Debug)]
struct Circuit {
    ends: [NodeId; 2],
    ip: IpAddr,
    opened: Instant,
    bytes: u64,
    rate: TokenBucket,
}

/// The circuits a supernode carries, and their budgets.
#[derive(Debug)]
pub struct Relays {
    limits: RelayLimits,
    open: HashMap<CircuitId, Circuit>,
    per_leaf: HashMap<NodeId, usize>,
    per_ip: HashMap<IpAddr, usize>,
    total: TokenBucket,
    next: u64,
}

impl Relays {
    pub fn new(limits: RelayLimits, now: Instant) -> Self {
        Self {
            limits,
            open: HashMap::new(),
            per_leaf: HashMap::new(),
            per_ip: HashMap::new(),
            total: TokenBucket::new(f64::from(limits.total_rate), limits.total_rate, now),
            next: 0,
        }
    }

    pub fn limits(&self) -> &RelayLimits {
        &self.limits
    }

    /// Circuits open now.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Opens a circuit from `from` (asking from `ip`) to `to`, or says why
    /// not. Every open circuit must be [`Relays::close`]d.
    pub fn open(
        &mut self,
        now: Instant,
        from: NodeId,
        ip: IpAddr,
        to: NodeId,
    ) -> Result<CircuitId, Refusal> {
        let l = &self.limits;
        if !l.enabled {
            return Err(Refusal::Disabled);
        }
        if from == to {
            return Err(Refusal::Itself);
        }
        if self.open.len() >= l.max_circuits {
            return Err(Refusal::Full);
        }
        let count = |id: &NodeId| self.per_leaf.get(id).copied().unwrap_or(0);
        if count(&from) >= l.max_circuits_per_leaf || count(&to) >= l.max_circuits_per_leaf {
            return Err(Refusal::Leaf);
        }
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= l.max_circuits_per_ip {
            return Err(Refusal::Ip);
        }
        let id = CircuitId(self.next);
        self.next += 1;
        for end in [from, to] {
            *self.per_leaf.entry(end).or_default() += 1;
        }
        *self.per_ip.entry(ip).or_default() += 1;
        let rate = TokenBucket::new(f64::from(l.circuit_rate), l.circuit_rate, now);
        self.open.insert(
            id,
            Circuit {
                ends: [from, to],
                ip,
                opened: now,
                bytes: 0,
                rate,
            },
        );
        Ok(id)
    }

    /// When circuit `id` ends by its duration, if it is open.
    pub fn deadline(&self, id: CircuitId) -> Option<Instant> {
        let c = self.open.get(&id)?;
        Some(c.opened + self.limits.circuit_duration)
    }

    /// The carrier of circuit `id` read `n` bytes (either way): whether,
    /// and when, it forwards them.
    pub fn carry(&mut self, now: Instant, id: CircuitId, n: usize) -> Carry {
        let Some(c) = self.open.get_mut(&id) else {
            return Carry::End(Ended::Closed);
        };
        if now >= c.opened + self.limits.circuit_duration {
            return Carry::End(Ended::Duration);
        }
        let n64 = n as u64;
        if c.bytes.saturating_add(n64) > self.limits.circuit_bytes {
            return Carry::End(Ended::Bytes);
        }
        c.bytes += n64;
        let own = c.rate.take_many(n as f64, now);
        let all = self.total.take_many(n as f64, now);
        Carry::After(own.max(all))
    }

    /// Bytes circuit `id` carried so far.
    pub fn carried(&self, id: CircuitId) -> Option<u64> {
        self.open.get(&id).map(|c| c.bytes)
    }

    /// Ends circuit `id`, freeing its place in every count.
    pub fn close(&mut self, id: CircuitId) {
        let Some(c) = self.open.remove(&id) else {
            return;
        };
        for end in c.ends {
            decrement(&mut self.per_leaf, end);
        }
        decrement(&mut self.per_ip, c.ip);
    }
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn small() -> RelayLimits {
        RelayLimits {
            max_circuits: 4,
            max_circuits_per_leaf: 2,
            max_circuits_per_ip: 3,
            circuit_bytes: 1000,
            circuit_duration: Duration::from_secs(60),
            circuit_rate: 100,
            total_rate: 150,
            ..RelayLimits::default()
        }
    }

    #[test]
    fn circuits_beyond_a_count_are_refused_not_queued_and_closing_frees_them() {
        let t = Instant::now();
        let mut r = Relays::new(small(), t);
        let a = r.open(t, id(1), ip(1), id(2)).unwrap();
        r.open(t, id(1), ip(1), id(3)).unwrap();
        // Leaf 1 is at the end of two: a third is refused, from any IP.
        assert_eq!(r.open(t, id(1), ip(2), id(4)), Err(Refusal::Leaf));
        assert_eq!(r.open(t, id(5), ip(2), id(1)), Err(Refusal::Leaf));
        // IP 1 asked for two; one more is its last.
        r.open(t, id(6), ip(1), id(7)).unwrap();
        assert_eq!(r.open(t, id(8), ip(1), id(9)), Err(Refusal::Ip));
        r.open(t, id(8), ip(2), id(9)).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(r.open(t, id(10), ip(3), id(11)), Err(Refusal::Full));
        r.close(a);
        r.close(a);
        assert_eq!(r.len(), 3);
        r.open(t, id(1), ip(3), id(12)).unwrap();
        assert_eq!(r.open(t, id(13), ip(4), id(14)), Err(Refusal::Full));
    }

    #[test]
    fn a_leaf_is_not_relayed_to_itself_and_a_relay_turned_off_relays_nothing() {
        let t = Instant::now();
        let mut r = Relays::new(small(), t);
        assert_eq!(r.open(t, id(1), ip(1), id(1)), Err(Refusal::Itself));
        let off = RelayLimits {
            enabled: false,
            ..small()
        };
        let mut r = Relays::new(off, t);
        assert_eq!(r.open(t, id(1), ip(1), id(2)), Err(Refusal::Disabled));
        assert!(r.is_empty());
    }

    #[test]
    fn a_circuit_ends_at_its_bytes_or_its_duration() {
        let t = Instant::now();
        let mut r = Relays::new(small(), t);
        let c = r.open(t, id(1), ip(1), id(2)).unwrap();
        assert!(matches!(r.carry(t, c, 600), Carry::After(_)));
        assert!(matches!(r.carry(t, c, 400), Carry::After(_)));
        assert_eq!(r.carried(c), Some(1000));
        assert_eq!(r.carry(t, c, 1), Carry::End(Ended::Bytes));
        let d = r.open(t, id(3), ip(1), id(4)).unwrap();
        assert_eq!(r.deadline(d), Some(t + Duration::from_secs(60)));
        let late = t + Duration::from_secs(60);
        assert_eq!(r.carry(late, d, 1), Carry::End(Ended::Duration));
        r.close(d);
        assert_eq!(r.carry(late, d, 1), Carry::End(Ended::Closed));
    }

    #[test]
    fn the_rate_is_held_by_waiting_per_circuit_and_for_all_together() {
        let t = Instant::now();
        let mut r = Relays::new(small(), t);
        let c = r.open(t, id(1), ip(1), id(2)).unwrap();
        // The first second's worth goes at once; the next waits its time.
        assert_eq!(r.carry(t, c, 100), Carry::After(Duration::ZERO));
        assert_eq!(r.carry(t, c, 50), Carry::After(Duration::from_millis(500)));
        // Another circuit has its own rate, but all share 150 B/s: the
        // total is spent, so it waits too.
        let d = r.open(t, id(3), ip(2), id(4)).unwrap();
        assert_eq!(r.carry(t, d, 75), Carry::After(Duration::from_millis(500)));
        // Paid back in time.
        let later = t + Duration::from_secs(2);
        assert_eq!(r.carry(later, d, 10), Carry::After(Duration::ZERO));
    }
}
