//! Admission of incoming connections: the decision a node makes about a
//! QUIC `Initial` before it spends a handshake on it.
//!
//! Four rules, checked in this order, each answering one cheap attack:
//! - **a total cap** on connections of every kind, registered or not;
//! - **a cap per address**, so that one host cannot take every slot (an
//!   IPv4 address, or an IPv6 /64: one subscriber's prefix, which costs
//!   nothing to fill with addresses);
//! - **a handshake rate**, in all and per address: a handshake costs a
//!   signature and its verification, and a flood of them is the cheapest
//!   way to spend a node's CPU;
//! - **address validation under load**: once the node holds more than a
//!   set share of its slots, an `Initial` from an address not yet proven is
//!   answered with a QUIC Retry, so that a spoofed source address cannot
//!   hold a slot or a handshake at all.
//!
//! Addresses listed as exempt skip the per-address rules (tests run many
//! honest nodes on `127.0.0.1`; an operator may list a trusted proxy). The
//! total cap and the total rate apply to everyone.
//!
//! Not here: what a connection may do once it is up (streams, frames,
//! queries); that is each protocol's rules.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::rate::TokenBucket;

/// The settings of [`Admission`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdmitConfig {
    /// Most connections at once, of every kind.
    pub max_connections: usize,
    /// Most connections at once from one address (IPv4) or /64 (IPv6).
    pub per_address: usize,
    /// Handshakes a second in all, sustained.
    pub handshake_rate: f64,
    /// Handshakes at once in all before the rate applies.
    pub handshake_burst: u32,
    /// Handshakes a second from one address, sustained.
    pub handshake_rate_per_address: f64,
    /// Handshakes at once from one address before its rate applies.
    pub handshake_burst_per_address: u32,
    /// Above this many open connections, unvalidated addresses get a Retry.
    pub retry_above: usize,
    /// Addresses the per-address rules do not apply to.
    pub exempt: Vec<IpAddr>,
}

/// What to do with an incoming connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Go on with the handshake; call [`Admission::on_closed`] when the
    /// connection ends, whatever way it ends.
    Accept,
    /// Answer with a QUIC Retry: the peer must prove it receives at the
    /// address it sends from. Nothing is held for it.
    Retry,
    /// Refuse it, for this reason. Nothing is held for it.
    Refuse(Refused),
}

/// Why a connection attempt was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every connection slot is taken.
    Full,
    /// The address holds its share of the slots already.
    AddressFull,
    /// Handshakes come faster than the node's rate, in all.
    TooFast,
    /// Handshakes from this address come faster than its rate.
    AddressTooFast,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::Full => "every connection slot is taken",
            Refused::AddressFull => "too many connections from this address",
            Refused::TooFast => "too many handshakes",
            Refused::AddressTooFast => "too many handshakes from this address",
        })
    }
}

/// The unit of the per-address rules: an IPv4 address, or the /64 prefix
/// of an IPv6 one (IPv4-mapped IPv6 addresses count as IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressKey {
    V4(u32),
    /// The upper 64 bits.
    V6(u64),
}

impl AddressKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(u32::from(v4)),
            IpAddr::V6(v6) => Self::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// Per-address buckets kept before the full (idle) ones are forgotten.
const MAX_BUCKETS: usize = 16 * 1024;

/// The admission state of one endpoint.
#[derive(Debug)]
pub struct Admission {
    config: AdmitConfig,
    exempt: Vec<AddressKey>,
    open: usize,
    per_address: HashMap<AddressKey, usize>,
    handshakes: TokenBucket,
    address_handshakes: HashMap<AddressKey, TokenBucket>,
}

impl Admission {
    pub fn new(config: AdmitConfig, now: Instant) -> Self {
        Self {
            exempt: config.exempt.iter().map(|ip| AddressKey::of(*ip)).collect(),
            handshakes: TokenBucket::new(config.handshake_rate, config.handshake_burst, now),
            config,
            open: 0,
            per_address: HashMap::new(),
            address_handshakes: HashMap::new(),
        }
    }

    /// Decides on an attempt from `ip`; `validated` says whether the peer
    /// has already proven its address (it answered our Retry).
    pub fn on_incoming(&mut self, now: Instant, ip: IpAddr, validated: bool) -> Admit {
        let key = AddressKey::of(ip);
        let exempt = self.exempt.contains(&key);
        if self.open >= self.config.max_connections {
            return Admit::Refuse(Refused::Full);
        }
        if !exempt && self.per_address.get(&key).copied().unwrap_or(0) >= self.config.per_address {
            return Admit::Refuse(Refused::AddressFull);
        }
        if !validated && self.open >= self.config.retry_above {
            return Admit::Retry;
        }
        if !self.handshakes.ready(now) {
            return Admit::Refuse(Refused::TooFast);
        }
        if !exempt {
            if self.address_handshakes.len() >= MAX_BUCKETS {
                self.address_handshakes.retain(|_, b| !b.is_full_at(now));
            }
            let (rate, burst) = (
                self.config.handshake_rate_per_address,
                self.config.handshake_burst_per_address,
            );
            let bucket = self
                .address_handshakes
                .entry(key)
                .or_insert_with(|| TokenBucket::new(rate, burst, now));
            if !bucket.try_take(now) {
                return Admit::Refuse(Refused::AddressTooFast);
            }
        }
        self.handshakes.try_take(now);
        self.open += 1;
        *self.per_address.entry(key).or_insert(0) += 1;
        Admit::Accept
    }

    /// A connection admitted from `ip` has ended (or its handshake failed).
    pub fn on_closed(&mut self, ip: IpAddr) {
        let key = AddressKey::of(ip);
        self.open = self.open.saturating_sub(1);
        if let Some(n) = self.per_address.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_address.remove(&key);
            }
        }
    }

    /// Connections admitted and not yet closed.
    pub fn open(&self) -> usize {
        self.open
    }

    /// Connections admitted from `ip`'s address (or /64) and not yet closed.
    pub fn open_from(&self, ip: IpAddr) -> usize {
        self.per_address
            .get(&AddressKey::of(ip))
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config() -> AdmitConfig {
        AdmitConfig {
            max_connections: 10,
            per_address: 3,
            handshake_rate: 100.0,
            handshake_burst: 100,
            handshake_rate_per_address: 1.0,
            handshake_burst_per_address: 5,
            retry_above: 8,
            exempt: vec!["127.0.0.1".parse().unwrap()],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_address_gets_its_share_and_no_more() {
        let now = Instant::now();
        let mut a = Admission::new(config(), now);
        let attacker = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(a.on_incoming(now, attacker, false), Admit::Accept);
        }
        assert_eq!(
            a.on_incoming(now, attacker, false),
            Admit::Refuse(Refused::AddressFull)
        );
        // Others are not held back, and a closed slot is free again.
        assert_eq!(a.on_incoming(now, ip("192.0.2.2"), false), Admit::Accept);
        a.on_closed(attacker);
        assert_eq!(a.open_from(attacker), 2);
        assert_eq!(a.on_incoming(now, attacker, false), Admit::Accept);
        assert_eq!(a.open(), 4);
    }

    #[test]
    fn an_ipv6_slash_64_is_one_address() {
        let now = Instant::now();
        let mut a = Admission::new(config(), now);
        for n in 1..=3 {
            let addr = ip(&format!("2001:db8:1:2::{n}"));
            assert_eq!(a.on_incoming(now, addr, false), Admit::Accept);
        }
        assert_eq!(
            a.on_incoming(now, ip("2001:db8:1:2:ffff::9"), false),
            Admit::Refuse(Refused::AddressFull)
        );
        assert_eq!(
            a.on_incoming(now, ip("2001:db8:1:3::1"), false),
            Admit::Accept
        );
        // IPv4-mapped is the IPv4 address, not a prefix of its own.
        assert_eq!(
            AddressKey::of(ip("::ffff:192.0.2.1")),
            AddressKey::of(ip("192.0.2.1"))
        );
        assert_ne!(AddressKey::of(ip("::1")), AddressKey::of(ip("0.0.0.1")));
    }

    #[test]
    fn handshakes_per_address_are_rate_limited() {
        let now = Instant::now();
        let mut a = Admission::new(config(), now);
        let attacker = ip("192.0.2.1");
        // Connect and close at once, over and over: the slot cap never
        // bites, the handshake rate does.
        let mut accepted = 0;
        for _ in 0..20 {
            if a.on_incoming(now, attacker, false) == Admit::Accept {
                accepted += 1;
                a.on_closed(attacker);
            }
        }
        assert_eq!(accepted, 5, "the burst, then nothing");
        assert_eq!(
            a.on_incoming(now, attacker, false),
            Admit::Refuse(Refused::AddressTooFast)
        );
        assert_eq!(
            a.on_incoming(now + Duration::from_secs(1), attacker, false),
            Admit::Accept
        );
    }

    #[test]
    fn exempt_addresses_skip_the_per_address_rules_only() {
        let now = Instant::now();
        let mut a = Admission::new(config(), now);
        let local = ip("127.0.0.1");
        for _ in 0..8 {
            assert_eq!(a.on_incoming(now, local, true), Admit::Accept);
        }
        // 127.0.0.2 is another address, not exempt.
        for _ in 0..2 {
            assert_eq!(a.on_incoming(now, ip("127.0.0.2"), true), Admit::Accept);
        }
        assert_eq!(
            a.on_incoming(now, local, true),
            Admit::Refuse(Refused::Full),
            "the total cap binds everyone"
        );
    }

    #[test]
    fn under_load_unvalidated_addresses_are_asked_to_retry() {
        let now = Instant::now();
        let mut a = Admission::new(config(), now);
        for n in 1..=8 {
            let addr = ip(&format!("192.0.2.{n}"));
            assert_eq!(a.on_incoming(now, addr, false), Admit::Accept);
        }
        let late = ip("198.51.100.1");
        assert_eq!(a.on_incoming(now, late, false), Admit::Retry);
        assert_eq!(a.open(), 8, "a Retry holds nothing");
        assert_eq!(a.on_incoming(now, late, true), Admit::Accept);
    }

    #[test]
    fn the_total_handshake_rate_binds_many_addresses() {
        let now = Instant::now();
        let mut a = Admission::new(
            AdmitConfig {
                max_connections: 10_000,
                retry_above: 10_000,
                handshake_burst: 50,
                ..config()
            },
            now,
        );
        let accepted = (0..200u32)
            .filter(|n| {
                let addr = IpAddr::from([10, 0, (n / 256) as u8, (n % 256) as u8]);
                a.on_incoming(now, addr, false) == Admit::Accept
            })
            .count();
        assert_eq!(accepted, 50);
    }
}
