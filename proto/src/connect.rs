//! Reverse connect and hole punching (docs/PROTOCOL.md 10.5): a
//! downloader that cannot dial a source asks a supernode holding the
//! source's session to have the source dial it, and dials the source's
//! observed address at the same moment. Whichever handshake completes
//! first carries the download.
//!
//! Three decisions live here, each taking the time as an input:
//! - [`Connects`]: whether a supernode passes a `Connect` on, by the
//!   asker's node id, its IP address and the leaf asked for (a supernode
//!   must not become a way to make its leaves dial out without end);
//! - [`Pushes`]: whether a leaf dials a downloader its supernode names,
//!   by how many such dials it has under way and by the downloader;
//! - [`Attempts`]: when a downloader asks, and how often it tries again;
//! - [`Proxies`]: which push proxies a downloader still asks (a proxy is
//!   a claim of a hit, so an address many sources name is not asked
//!   without end).

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::rate::TokenBucket;

/// Rates of the `Connect` requests a supernode passes on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnectLimits {
    /// Per asking node id, requests per second sustained.
    pub per_asker_rate: f64,
    pub per_asker_burst: u32,
    /// Per asking IP address: this many node ids' worth (ids cost nothing).
    pub per_ip_factor: u32,
    /// Per leaf asked for, from all askers together.
    pub per_target_rate: f64,
    pub per_target_burst: u32,
}

impl Default for ConnectLimits {
    fn default() -> Self {
        Self {
            per_asker_rate: 2.0,
            per_asker_burst: 16,
            per_ip_factor: 8,
            per_target_rate: 4.0,
            per_target_burst: 16,
        }
    }
}

/// Buckets kept per key kind before the full (idle) ones are forgotten.
pub const MAX_CONNECT_BUCKETS: usize = 16 * 1024;

/// Why a supernode refuses to pass a `Connect` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// This asker (by id or by IP address) asks too often.
    Asker,
    /// The leaf asked for is asked for too often.
    Target,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Asker => "too many connect requests from you: slow down",
            Refused::Target => "that leaf is asked to connect too often: try later",
        }
    }
}

/// A supernode's admission of `Connect` requests.
#[derive(Debug, Clone)]
pub struct Connects<N> {
    limits: ConnectLimits,
    by_asker: HashMap<N, TokenBucket>,
    by_ip: HashMap<IpAddr, TokenBucket>,
    by_target: HashMap<N, TokenBucket>,
}

impl<N: Hash + Eq + Copy> Connects<N> {
    pub fn new(limits: ConnectLimits) -> Self {
        Self {
            limits,
            by_asker: HashMap::new(),
            by_ip: HashMap::new(),
            by_target: HashMap::new(),
        }
    }

    /// Whether `asker` (at `ip`; `None` for an address exempt from
    /// per-address caps) may have `target` dial it now. A refused request
    /// costs no token.
    pub fn admit(
        &mut self,
        now: Instant,
        asker: N,
        ip: Option<IpAddr>,
        target: N,
    ) -> Result<(), Refused> {
        let l = self.limits;
        let a = bucket(
            &mut self.by_asker,
            asker,
            l.per_asker_rate,
            l.per_asker_burst,
            now,
        );
        if !a.ready(now) {
            return Err(Refused::Asker);
        }
        if let Some(ip) = ip {
            let factor = f64::from(l.per_ip_factor.max(1));
            let burst = l.per_asker_burst.saturating_mul(l.per_ip_factor.max(1));
            let b = bucket(&mut self.by_ip, ip, l.per_asker_rate * factor, burst, now);
            if !b.ready(now) {
                return Err(Refused::Asker);
            }
        }
        let t = bucket(
            &mut self.by_target,
            target,
            l.per_target_rate,
            l.per_target_burst,
            now,
        );
        if !t.try_take(now) {
            return Err(Refused::Target);
        }
        if let Some(ip) = ip {
            if let Some(b) = self.by_ip.get_mut(&ip) {
                b.try_take(now);
            }
        }
        if let Some(a) = self.by_asker.get_mut(&asker) {
            a.try_take(now);
        }
        Ok(())
    }
}

/// `key`'s bucket, made full if new, at most [`MAX_CONNECT_BUCKETS`] kept.
fn bucket<K: Hash + Eq>(
    map: &mut HashMap<K, TokenBucket>,
    key: K,
    rate: f64,
    burst: u32,
    now: Instant,
) -> &mut TokenBucket {
    crate::rate::bucket_in(map, key, rate, burst, now, MAX_CONNECT_BUCKETS)
}

/// Push dials (to downloaders its supernodes name) a leaf has under way
/// at most.
pub const MAX_PUSHES_IN_FLIGHT: usize = 16;
/// Push dials a leaf makes to one downloader: per second, and at once.
pub const PUSH_RATE_PER_PEER: f64 = 1.0;
pub const PUSH_BURST_PER_PEER: u32 = 4;

/// A leaf's admission of the push dials its supernodes ask for.
#[derive(Debug, Clone)]
pub struct Pushes<N> {
    in_flight: usize,
    by_peer: HashMap<N, TokenBucket>,
}

impl<N> Default for Pushes<N> {
    fn default() -> Self {
        Self {
            in_flight: 0,
            by_peer: HashMap::new(),
        }
    }
}

impl<N: Hash + Eq + Copy> Pushes<N> {
    /// Whether to dial `peer` now; if so, [`Pushes::done`] must follow.
    pub fn admit(&mut self, now: Instant, peer: N) -> bool {
        if self.in_flight >= MAX_PUSHES_IN_FLIGHT {
            return false;
        }
        let b = bucket(
            &mut self.by_peer,
            peer,
            PUSH_RATE_PER_PEER,
            PUSH_BURST_PER_PEER,
            now,
        );
        if !b.try_take(now) {
            return false;
        }
        self.in_flight += 1;
        true
    }

    /// A dial admitted has ended (connected or not).
    pub fn done(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }
}

/// How a downloader paces reaching one source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempts {
    /// How long a direct dial runs alone before the source is also asked
    /// to dial back (a reachable source answers well within it).
    pub direct_head_start: Duration,
    /// Rounds of asking and dialling at once, at most.
    pub rounds: u32,
    /// How long the first round waits for a handshake; each next one
    /// waits twice as long as the last.
    pub first_wait: Duration,
    /// From the start of this round (from 0), the source is also reached
    /// through a tunnel its push proxy relays (docs/PROTOCOL.md 10.6), in
    /// case no punch ever gets through; the rounds go on beside it.
    pub relay_from_round: u32,
}

impl Default for Attempts {
    fn default() -> Self {
        Self {
            direct_head_start: Duration::from_millis(250),
            rounds: 3,
            first_wait: Duration::from_secs(2),
            relay_from_round: 1,
        }
    }
}

impl Attempts {
    /// How long round `n` (from 0) waits for a handshake; `None` once the
    /// rounds are used up.
    pub fn wait(&self, round: u32) -> Option<Duration> {
        (round < self.rounds).then(|| self.first_wait.saturating_mul(1 << round.min(16)))
    }

    /// Whether a relay is asked for as round `n` starts.
    pub fn relays_at(&self, round: u32) -> bool {
        round == self.relay_from_round
    }

    /// The longest a source can take to reach through every round.
    pub fn total(&self) -> Duration {
        (0..self.rounds)
            .filter_map(|r| self.wait(r))
            .fold(self.direct_head_start, |a, b| a.saturating_add(b))
    }
}

/// Asks a downloader sends to the push proxies at one IP address, at most
/// (3 rounds for each of 8 sources at once, and some to spare).
pub const MAX_PROXY_ASKS_PER_HOST: u32 = 32;
/// Proxy hosts a downloader keeps count of; beyond, it asks no new one.
pub const MAX_PROXY_HOSTS: usize = 1024;

/// A downloader's book of the push proxies it asked, by host: a host that
/// did not answer at all is not asked again, and none more than
/// [`MAX_PROXY_ASKS_PER_HOST`] times. A hit whose sources all name one
/// victim as their proxy thus costs that victim a few handshakes.
#[derive(Debug, Clone)]
pub struct Proxies<H> {
    asked: HashMap<H, u32>,
    dead: HashSet<H>,
}

impl<H> Default for Proxies<H> {
    fn default() -> Self {
        Self {
            asked: HashMap::new(),
            dead: HashSet::new(),
        }
    }
}

impl<H: Hash + Eq + Copy> Proxies<H> {
    /// Whether to ask the proxy at `host` now (counted if so).
    pub fn may_ask(&mut self, host: H) -> bool {
        if self.dead.contains(&host) {
            return false;
        }
        if !self.asked.contains_key(&host) && self.asked.len() >= MAX_PROXY_HOSTS {
            return false;
        }
        let n = self.asked.entry(host).or_insert(0);
        if *n >= MAX_PROXY_ASKS_PER_HOST {
            return false;
        }
        *n += 1;
        true
    }

    /// The proxy at `host` could not be reached at all.
    pub fn unreachable(&mut self, host: H) {
        if self.dead.len() < MAX_PROXY_HOSTS {
            self.dead.insert(host);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> Option<IpAddr> {
        Some(IpAddr::from([192, 0, 2, n]))
    }

    #[test]
    fn an_asker_is_held_to_its_rate_and_fresh_ids_to_their_address() {
        let mut c = Connects::new(ConnectLimits::default());
        let now = Instant::now();
        let burst = ConnectLimits::default().per_asker_burst as usize;
        let passed = (0..100u32)
            .filter(|&t| c.admit(now, 1u32, ip(1), 1000 + t).is_ok())
            .count();
        assert_eq!(passed, burst);
        // Many ids at one address share that address's cap.
        let fresh = (2..10_000u32)
            .filter(|&id| c.admit(now, id, ip(1), 100_000 + id).is_ok())
            .count();
        assert_eq!(fresh, burst * 8 - burst);
        // Another address is not held back, and time refills.
        assert!(c.admit(now, 50_000, ip(2), 7).is_ok());
        assert!(c.admit(now + Duration::from_secs(1), 1, ip(1), 8).is_ok());
    }

    #[test]
    fn a_target_is_held_to_its_rate_whoever_asks() {
        let mut c = Connects::new(ConnectLimits::default());
        let now = Instant::now();
        let passed = (0..100u32)
            .filter(|&a| c.admit(now, a, ip(a as u8), 7).is_ok())
            .count();
        assert_eq!(passed, ConnectLimits::default().per_target_burst as usize);
        assert_eq!(c.admit(now, 500, ip(200), 7), Err(Refused::Target));
        // A refusal for the target cost the asker nothing.
        assert!(c.admit(now, 500, ip(200), 8).is_ok());
    }

    #[test]
    fn a_flood_of_ids_keeps_the_buckets_bounded() {
        let mut c = Connects::new(ConnectLimits::default());
        let now = Instant::now();
        for id in 0..(3 * MAX_CONNECT_BUCKETS as u32) {
            let _ = c.admit(now, id, None, id);
        }
        assert!(c.by_asker.len() <= MAX_CONNECT_BUCKETS);
        assert!(c.by_target.len() <= MAX_CONNECT_BUCKETS);
    }

    #[test]
    fn a_leaf_caps_its_push_dials_at_once_and_per_downloader() {
        let mut p = Pushes::default();
        let now = Instant::now();
        let one = (0..10).filter(|_| p.admit(now, 1u32)).count();
        assert_eq!(one, PUSH_BURST_PER_PEER as usize);
        let more = (2..100u32).filter(|&d| p.admit(now, d)).count();
        assert_eq!(more, MAX_PUSHES_IN_FLIGHT - one);
        assert!(!p.admit(now + Duration::from_secs(60), 500));
        p.done();
        assert!(p.admit(now + Duration::from_secs(60), 500));
        assert_eq!(p.in_flight(), MAX_PUSHES_IN_FLIGHT);
    }

    #[test]
    fn a_proxy_is_asked_a_bounded_number_of_times_and_never_once_dead() {
        let mut p = Proxies::default();
        let asks = (0..100).filter(|_| p.may_ask(1u8)).count();
        assert_eq!(asks, MAX_PROXY_ASKS_PER_HOST as usize);
        assert!(p.may_ask(2));
        p.unreachable(2);
        assert!(!p.may_ask(2));
        let mut q = Proxies::default();
        let hosts = (0..5000u32).filter(|&h| q.may_ask(h)).count();
        assert_eq!(hosts, MAX_PROXY_HOSTS);
    }

    #[test]
    fn attempts_back_off_and_end() {
        let a = Attempts::default();
        assert_eq!(a.wait(0), Some(Duration::from_secs(2)));
        assert_eq!(a.wait(2), Some(Duration::from_secs(8)));
        assert_eq!(a.wait(3), None);
        assert_eq!(a.total(), Duration::from_millis(14_250));
    }
}
