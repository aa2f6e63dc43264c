//! How much of a source's upload capacity one downloader may hold.
//!
//! A source serves a limited number of ranges at once (its upload slots).
//! Without a per-peer rule, one downloader that opens streams and never
//! reads them holds every slot, and every other download from that source
//! fails. So each request that touches content (`Layer`, `Have`, `Range`)
//! counts against its peer's node id and against its IP address (an IPv6
//! /64 counts as one address, as in [`crate::admit`]), and a request over
//! either cap is refused at once, never queued: it would only wait behind
//! the same peer's other requests. Node ids cost nothing to make, hence
//! the address cap; exempt addresses (local test networks) skip it.
//!
//! Not here: the slots themselves, their queue and its deadline, which the
//! leaf's upload driver holds.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::admit::AddressKey;
use crate::NodeId;

/// Caps on the requests one downloader has open at one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadLimits {
    /// Requests open at once from one node id.
    pub per_peer: usize,
    /// Requests open at once from one IP address or IPv6 /64.
    pub per_address: usize,
    /// Addresses the per-address cap does not apply to.
    pub exempt: Vec<IpAddr>,
}

impl Default for UploadLimits {
    /// 6 per node id (a downloader keeps 3 ranges and a `Have` in flight
    /// per source) and 8 per address: one host holds at most half of a
    /// source's 16 slots.
    fn default() -> Self {
        Self {
            per_peer: 6,
            per_address: 8,
            exempt: Vec::new(),
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// This node id has its share of requests open already.
    Peer,
    /// This address has its share of requests open already.
    Address,
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Busy::Peer => "too many requests open from this node",
            Busy::Address => "too many requests open from this address",
        })
    }
}

/// The requests open at one source, by peer and by address.
#[derive(Debug, Default)]
pub struct UploadLoad {
    limits: UploadLimits,
    exempt: Vec<AddressKey>,
    by_peer: HashMap<NodeId, usize>,
    by_address: HashMap<AddressKey, usize>,
}

impl UploadLoad {
    pub fn new(limits: UploadLimits) -> Self {
        Self {
            exempt: limits.exempt.iter().map(|ip| AddressKey::of(*ip)).collect(),
            limits,
            by_peer: HashMap::new(),
            by_address: HashMap::new(),
        }
    }

    /// Counts a request of `peer` from `ip` as open, unless that would
    /// take either over its cap. Every `Ok` needs one [`UploadLoad::end`].
    pub fn try_begin(&mut self, peer: NodeId, ip: IpAddr) -> Result<(), Busy> {
        let key = AddressKey::of(ip);
        if self.by_peer.get(&peer).copied().unwrap_or(0) >= self.limits.per_peer {
            return Err(Busy::Peer);
        }
        let exempt = self.exempt.contains(&key);
        if !exempt && self.by_address.get(&key).copied().unwrap_or(0) >= self.limits.per_address {
            return Err(Busy::Address);
        }
        *self.by_peer.entry(peer).or_insert(0) += 1;
        *self.by_address.entry(key).or_insert(0) += 1;
        Ok(())
    }

    /// A request counted by [`UploadLoad::try_begin`] is over.
    pub fn end(&mut self, peer: NodeId, ip: IpAddr) {
        fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
            if let Some(n) = map.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
        release(&mut self.by_peer, peer);
        release(&mut self.by_address, AddressKey::of(ip));
    }

    /// Requests open now, from everyone.
    pub fn open(&self) -> usize {
        self.by_peer.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn one_peer_cannot_hold_more_than_its_share() {
        let mut load = UploadLoad::new(UploadLimits::default());
        let (attacker, at) = (NodeId([1; 32]), ip("192.0.2.1"));
        for _ in 0..6 {
            load.try_begin(attacker, at).unwrap();
        }
        assert_eq!(load.try_begin(attacker, at), Err(Busy::Peer));
        // Fresh ids from the same address get the address's remainder only.
        load.try_begin(NodeId([2; 32]), at).unwrap();
        load.try_begin(NodeId([3; 32]), at).unwrap();
        assert_eq!(load.try_begin(NodeId([4; 32]), at), Err(Busy::Address));
        // Someone else is served; an ended request frees its place.
        load.try_begin(NodeId([9; 32]), ip("192.0.2.2")).unwrap();
        load.end(attacker, at);
        load.try_begin(NodeId([4; 32]), at).unwrap();
        assert_eq!(load.open(), 9);
    }

    #[test]
    fn exempt_addresses_have_only_the_per_peer_cap() {
        let mut load = UploadLoad::new(UploadLimits {
            exempt: vec![ip("127.0.0.1")],
            ..UploadLimits::default()
        });
        for n in 0..20u8 {
            load.try_begin(NodeId([n; 32]), ip("127.0.0.1")).unwrap();
        }
        for n in 0..20u8 {
            load.end(NodeId([n; 32]), ip("127.0.0.1"));
        }
        assert_eq!(load.open(), 0);
        assert!(load.by_address.is_empty() && load.by_peer.is_empty());
    }
}
