//! Hits that no one source can poison: building, merging and ranking them.
//!
//! A hit lists every name and size its sources announce for one content
//! hash (`Hit::names`, each a [`NameVariant`]) and which one each source
//! announced (`Source::variant`). Both are claims, and node ids cost
//! nothing to make, so support is counted in *independent* sources:
//! distinct IP addresses first, distinct node ids second. A source is
//! listed once by node id and once by address (`IP:PORT`), and an IP
//! address has at most [`MAX_SOURCES_PER_IP`] sources in a hit, so one
//! machine cannot outvote others by making keys, and one hit cannot send a
//! downloader to the same address many times.
//!
//! Counts are never taken from the wire: every node that builds, relays or
//! merges a hit recounts them from the sources the hit lists, so a hop
//! cannot inflate them. What is displayed is the name most independent
//! sources agree on ([`HitBuilder::finish`] puts it first); ties go to the
//! name and size that sort first, a rule no source can use to win over a
//! better-supported one.
//!
//! Not here: the size a downloader believes. That comes from the sources'
//! range layers and is pinned by verified bytes (see [`crate::pin`]).

use std::collections::{HashMap, HashSet};

use crate::id::{ContentHash, NodeId};
use crate::limits::{
    MAX_NAMES_PER_HIT, MAX_NAME_BYTES, MAX_SOURCES_PER_HIT, MAX_SOURCES_PER_IP, MAX_VIA_BYTES,
};
use crate::msg::{Hit, NameVariant, Source};

/// The host part of `IP:PORT` (brackets of IPv6 removed); the whole string
/// if it is not one. Sources with the same host are not independent.
pub fn host_of(addr: &str) -> &str {
    &addr[host_span(addr)]
}

/// Where [`host_of`] is in `addr`.
fn host_span(addr: &str) -> std::ops::Range<usize> {
    match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && !host.is_empty() => {
            if host.len() >= 2 && host.starts_with('[') && host.ends_with(']') {
                1..host.len() - 1
            } else {
                0..host.len()
            }
        }
        _ => 0..addr.len(),
    }
}

/// How many independent sources announce one variant of a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Support {
    /// Distinct IP addresses.
    pub ips: usize,
    /// Distinct node ids (sources listed).
    pub ids: usize,
}

impl Support {
    /// Orders best first: more IPs, then more ids.
    fn key(self) -> (std::cmp::Reverse<usize>, std::cmp::Reverse<usize>) {
        (std::cmp::Reverse(self.ips), std::cmp::Reverse(self.ids))
    }
}

/// Support of each entry of `hit.names`, in that order. Sources naming a
/// variant that does not exist count for nothing.
pub fn support(hit: &Hit) -> Vec<Support> {
    let mut hosts: Vec<HashSet<&str>> = vec![HashSet::new(); hit.names.len()];
    let mut out = vec![Support::default(); hit.names.len()];
    for s in &hit.sources {
        let v = s.variant as usize;
        if v < out.len() {
            out[v].ids += 1;
            hosts[v].insert(host_of(&s.addr));
        }
    }
    for (o, h) in out.iter_mut().zip(hosts) {
        o.ips = h.len();
    }
    out
}

/// Independent sources of a whole hit, whatever they announce.
pub fn hit_support(hit: &Hit) -> Support {
    let ips: HashSet<&str> = hit.sources.iter().map(|s| host_of(&s.addr)).collect();
    Support {
        ips: ips.len(),
        ids: hit.sources.len(),
    }
}

/// Orders hits best supported first (stable: equals keep their order).
pub fn rank(hits: &mut [Hit]) {
    hits.sort_by_cached_key(|h| hit_support(h).key());
}

/// Builds one hit from sources announced one by one (by a supernode's
/// index, or from hits of several supernodes or hops), keeping every
/// bound: a source once by id and by address, at most
/// [`MAX_SOURCES_PER_IP`] per IP, names no longer than [`MAX_NAME_BYTES`];
/// and, in [`HitBuilder::finish`], at most [`MAX_SOURCES_PER_HIT`] sources
/// (one per IP first) and [`MAX_NAMES_PER_HIT`] names.
///
/// Every hop of every query builds hits, so this keeps to one hash lookup
/// per source: an address is a duplicate only of another at its host
/// (at most [`MAX_SOURCES_PER_IP`] to compare), and a source's turn in
/// the round-robin over hosts is known when it is added.
#[derive(Debug, Clone)]
pub struct HitBuilder {
    hash: ContentHash,
    names: Vec<NameVariant>,
    /// Index into `names`, filled once there are more than a few to scan.
    variant_at: HashMap<NameVariant, usize>,
    sources: Vec<Added>,
    /// Each host's first source (whose address names it) and its sources.
    hosts: Vec<Host>,
    /// Indexes of ids and hosts, filled once there are more sources than
    /// [`SCANNED`]: below that a scan is cheaper than hashing.
    ids: HashSet<NodeId>,
    host_at: HashMap<String, usize>,
}

#[derive(Debug, Clone)]
struct Added {
    id: NodeId,
    addr: String,
    via: Option<String>,
    /// Index into `names`.
    variant: usize,
    /// Index into `hosts`.
    host: usize,
    /// 1 for its host's first source, 2 for the second…
    turn: usize,
}

#[derive(Debug, Clone)]
struct Host {
    /// The source whose address names the host, and where in it.
    first: usize,
    name: std::ops::Range<usize>,
    /// Its sources (indexes into `sources`): at most
    /// [`MAX_SOURCES_PER_IP`], kept inline since every source has a host.
    at: [u32; MAX_SOURCES_PER_IP],
    len: usize,
}

impl Host {
    fn sources(&self) -> &[u32] {
        &self.at[..self.len]
    }
}

/// Names a builder finds by scanning before it keeps an index of them.
const NAMES_SCANNED: usize = 4;
/// Sources a builder checks by scanning before it indexes ids and hosts.
const SCANNED: usize = MAX_SOURCES_PER_HIT;

impl HitBuilder {
    pub fn new(hash: ContentHash) -> Self {
        Self {
            hash,
            names: Vec::new(),
            variant_at: HashMap::new(),
            sources: Vec::new(),
            hosts: Vec::new(),
            ids: HashSet::new(),
            host_at: HashMap::new(),
        }
    }

    pub fn hash(&self) -> ContentHash {
        self.hash
    }

    fn indexed(&self) -> bool {
        self.sources.len() > SCANNED
    }

    fn has_id(&self, id: &NodeId) -> bool {
        if self.indexed() {
            self.ids.contains(id)
        } else {
            self.sources.iter().any(|s| s.id == *id)
        }
    }

    fn host_named(&self, host: &str) -> Option<usize> {
        if self.indexed() {
            self.host_at.get(host).copied()
        } else {
            self.hosts.iter().position(|h| self.host_name(h) == host)
        }
    }

    fn host_name(&self, h: &Host) -> &str {
        &self.sources[h.first].addr[h.name.clone()]
    }

    /// Adds one source and what it announced; false if it is refused (a
    /// known id or address, an IP at its cap, a name too long).
    pub fn add(&mut self, id: NodeId, addr: String, variant: &NameVariant) -> bool {
        self.add_via(id, addr, None, variant)
    }

    /// [`HitBuilder::add`] with the source's push proxy ([`Source::via`];
    /// one longer than [`MAX_VIA_BYTES`] is dropped, not the source).
    pub fn add_via(
        &mut self,
        id: NodeId,
        addr: String,
        via: Option<String>,
        variant: &NameVariant,
    ) -> bool {
        let via = via.filter(|v| v.len() <= MAX_VIA_BYTES);
        if variant.name.len() > MAX_NAME_BYTES || self.has_id(&id) {
            return false;
        }
        let name = host_span(&addr);
        let found = self.host_named(&addr[name.clone()]);
        if let Some(h) = found {
            let at_host = self.hosts[h].sources();
            if at_host.len() >= MAX_SOURCES_PER_IP
                || at_host
                    .iter()
                    .any(|&i| self.sources[i as usize].addr == addr)
            {
                return false;
            }
        }
        let v = self.variant(variant);
        let index = self.sources.len();
        let host = found.unwrap_or_else(|| {
            self.hosts.push(Host {
                first: index,
                name,
                at: [0; MAX_SOURCES_PER_IP],
                len: 0,
            });
            self.hosts.len() - 1
        });
        let h = &mut self.hosts[host];
        // Below MAX_SOURCES_PER_IP (checked above); sources stay far below
        // u32::MAX, since each needs its own id.
        h.at[h.len] = index as u32;
        h.len += 1;
        let turn = h.len;
        if self.indexed() {
            self.ids.insert(id);
            if turn == 1 {
                self.host_at
                    .insert(addr[self.hosts[host].name.clone()].to_string(), host);
            }
        }
        self.sources.push(Added {
            id,
            addr,
            via,
            variant: v,
            host,
            turn,
        });
        if self.sources.len() == SCANNED + 1 {
            // From now on, look up instead of scanning.
            self.ids = self.sources.iter().map(|s| s.id).collect();
            self.host_at = self
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| (self.host_name(h).to_string(), i))
                .collect();
        }
        true
    }

    /// The index of `variant` in `names`, added if new.
    fn variant(&mut self, variant: &NameVariant) -> usize {
        let found = if self.names.len() <= NAMES_SCANNED {
            self.names.iter().position(|n| n == variant)
        } else {
            self.variant_at.get(variant).copied()
        };
        if let Some(v) = found {
            return v;
        }
        self.names.push(variant.clone());
        if self.names.len() == NAMES_SCANNED + 1 {
            for (i, n) in self.names.iter().enumerate() {
                self.variant_at.insert(n.clone(), i);
            }
        } else if self.names.len() > NAMES_SCANNED {
            self.variant_at
                .insert(variant.clone(), self.names.len() - 1);
        }
        self.names.len() - 1
    }

    /// Adds every source of another hit of the same hash (a hit of another
    /// hash adds nothing). Sources that name no variant of it are skipped.
    pub fn add_hit(&mut self, hit: &Hit) {
        if hit.hash != self.hash {
            return;
        }
        for s in &hit.sources {
            if let Some(v) = hit.names.get(s.variant as usize) {
                self.add_via(s.id, s.addr.clone(), s.via.clone(), v);
            }
        }
    }

    /// Sources added so far.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The hit: sources one per IP first (in the order added), then a
    /// second per IP, and so on, up to [`MAX_SOURCES_PER_HIT`]; its names
    /// ranked by the independent sources listed, most first, up to
    /// [`MAX_NAMES_PER_HIT`] (the sources of names cut go too). `None`
    /// without sources.
    pub fn finish(self) -> Option<Hit> {
        if self.names.len() == 1 && self.sources.len() <= MAX_SOURCES_PER_HIT {
            return self.finish_one_name();
        }
        // Round-robin over IPs: a listed cap never goes to the many ids of
        // one machine while other machines wait.
        let mut listed: Vec<usize> = (0..self.sources.len()).collect();
        if listed.len() > MAX_SOURCES_PER_HIT {
            listed.sort_by_key(|&i| (self.sources[i].turn, i));
            listed.truncate(MAX_SOURCES_PER_HIT);
            listed.sort_unstable();
        }

        // Rank the names on what is listed: sources, and distinct hosts.
        let mut sup = vec![Support::default(); self.names.len()];
        let mut seen: Vec<(usize, usize)> = listed
            .iter()
            .map(|&i| (self.sources[i].variant, self.sources[i].host))
            .collect();
        seen.sort_unstable();
        for (k, &(v, host)) in seen.iter().enumerate() {
            sup[v].ids += 1;
            if k == 0 || seen[k - 1] != (v, host) {
                sup[v].ips += 1;
            }
        }
        let mut ranked: Vec<usize> = (0..self.names.len()).filter(|&v| sup[v].ids > 0).collect();
        ranked.sort_by(|&a, &b| {
            sup[a]
                .key()
                .cmp(&sup[b].key())
                .then_with(|| self.names[a].name.cmp(&self.names[b].name))
                .then_with(|| self.names[a].size.cmp(&self.names[b].size))
        });
        ranked.truncate(MAX_NAMES_PER_HIT);
        let mut new_index = vec![None; self.names.len()];
        for (new, &old) in ranked.iter().enumerate() {
            new_index[old] = Some(new as u8);
        }
        let mut sources_in = self.sources;
        let sources: Vec<Source> = listed
            .iter()
            .filter_map(|&i| {
                let s = &mut sources_in[i];
                new_index[s.variant].map(|variant| Source {
                    id: s.id,
                    addr: std::mem::take(&mut s.addr),
                    variant,
                    via: s.via.take(),
                })
            })
            .collect();
        if sources.is_empty() {
            return None;
        }
        let mut names_in = self.names;
        let names = ranked
            .iter()
            .map(|&v| {
                std::mem::replace(
                    &mut names_in[v],
                    NameVariant {
                        name: String::new(),
                        size: 0,
                    },
                )
            })
            .collect();
        Some(Hit {
            hash: self.hash,
            names,
            sources,
        })
    }

    /// [`HitBuilder::finish`] when every source announced the one name and
    /// all are listed (most hits): nothing to rank or cut.
    fn finish_one_name(self) -> Option<Hit> {
        if self.sources.is_empty() {
            return None;
        }
        let sources = self
            .sources
            .into_iter()
            .map(|s| Source {
                id: s.id,
                addr: s.addr,
                variant: 0,
                via: s.via,
            })
            .collect();
        Some(Hit {
            hash: self.hash,
            names: self.names,
            sources,
        })
    }
}

/// Merges hits of several supernodes or hops by hash, in the order their
/// hashes first appear; each merged hit is rebuilt (see [`HitBuilder`]).
pub fn merge(hits: impl IntoIterator<Item = Hit>) -> Vec<Hit> {
    let mut at: HashMap<ContentHash, usize> = HashMap::new();
    let mut builders: Vec<HitBuilder> = Vec::new();
    for hit in hits {
        let i = *at.entry(hit.hash).or_insert_with(|| {
            builders.push(HitBuilder::new(hit.hash));
            builders.len() - 1
        });
        builders[i].add_hit(&hit);
    }
    builders
        .into_iter()
        .filter_map(HitBuilder::finish)
        .collect()
}

/// Keeps the sources of `hit` that `keep` accepts, rebuilt; `None` if
/// none is left.
pub fn retain_sources(hit: Hit, mut keep: impl FnMut(&Source) -> bool) -> Option<Hit> {
    let mut b = HitBuilder::new(hit.hash);
    for s in hit.sources {
        if let Some(v) = hit.names.get(s.variant as usize) {
            if keep(&s) {
                b.add_via(s.id, s.addr, s.via, v);
            }
        }
    }
    b.finish()
}

impl Hit {
    /// The name to display: the one most independent sources announce
    /// (first in a hit built by [`HitBuilder`]); empty if none.
    pub fn name(&self) -> &str {
        self.names.first().map_or("", |v| v.name.as_str())
    }

    /// The size announced with [`Hit::name`]: a claim, for display only.
    pub fn size(&self) -> u64 {
        self.names.first().map_or(0, |v| v.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn v(name: &str, size: u64) -> NameVariant {
        NameVariant {
            name: name.into(),
            size,
        }
    }

    const H: ContentHash = ContentHash([7; 32]);

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("192.0.2.1:7401"), "192.0.2.1");
        assert_eq!(host_of("[2001:db8::1]:7401"), "2001:db8::1");
        assert_eq!(host_of("nonsense"), "nonsense");
        assert_eq!(host_of(":7401"), ":7401");
    }

    #[test]
    fn a_lone_lowest_id_does_not_choose_the_name() {
        let mut b = HitBuilder::new(H);
        // The liar sorts first and comes first.
        assert!(b.add(id(0), "10.0.0.9:1".into(), &v("LYING NAME.exe", 300_000)));
        assert!(b.add(id(5), "10.0.0.1:1".into(), &v("bluemoon.mp3", 300_001)));
        assert!(b.add(id(6), "10.0.0.2:1".into(), &v("bluemoon.mp3", 300_001)));
        let hit = b.finish().unwrap();
        assert_eq!(hit.name(), "bluemoon.mp3");
        assert_eq!(hit.size(), 300_001);
        assert_eq!(hit.names.len(), 2);
        assert_eq!(
            support(&hit),
            vec![Support { ips: 2, ids: 2 }, Support { ips: 1, ids: 1 }]
        );
        let liar = hit.sources.iter().find(|s| s.id == id(0)).unwrap();
        assert_eq!(hit.names[liar.variant as usize].name, "LYING NAME.exe");
    }

    #[test]
    fn many_ids_on_one_machine_are_one_vote_and_one_address_one_source() {
        let mut b = HitBuilder::new(H);
        b.add(id(1), "10.0.0.1:1".into(), &v("honest", 1));
        b.add(id(2), "10.0.0.2:1".into(), &v("honest", 1));
        let mut taken = 0;
        for i in 10..80u8 {
            // Same address: only the first is listed.
            taken += b.add(id(i), "10.0.0.9:1".into(), &v("sybil", 1)) as usize;
        }
        assert_eq!(taken, 1);
        for i in 80..150u8 {
            taken += b.add(id(i), format!("10.0.0.9:{i}"), &v("sybil", 1)) as usize;
        }
        assert_eq!(taken, MAX_SOURCES_PER_IP);
        let hit = b.finish().unwrap();
        assert_eq!(hit.name(), "honest");
        assert_eq!(hit.sources.len(), 2 + MAX_SOURCES_PER_IP);
        assert_eq!(hit_support(&hit).ips, 3);
    }

    #[test]
    fn merging_dedupes_by_id_and_address_and_recounts() {
        let a = Hit {
            hash: H,
            names: vec![v("x", 1)],
            sources: vec![
                Source {
                    id: id(1),
                    addr: "10.0.0.1:1".into(),
                    variant: 0,
                    via: None,
                },
                // Names a variant that is not there: dropped.
                Source {
                    id: id(3),
                    addr: "10.0.0.3:1".into(),
                    variant: 4,
                    via: None,
                },
            ],
        };
        let b = Hit {
            hash: H,
            names: vec![v("y", 1), v("x", 1)],
            sources: vec![
                Source {
                    id: id(1),
                    addr: "10.0.0.5:1".into(),
                    variant: 0,
                    via: None,
                },
                Source {
                    id: id(2),
                    addr: "10.0.0.1:1".into(),
                    variant: 0,
                    via: None,
                },
                Source {
                    id: id(4),
                    addr: "10.0.0.4:1".into(),
                    variant: 1,
                    via: None,
                },
            ],
        };
        let other = Hit {
            hash: ContentHash([8; 32]),
            ..a.clone()
        };
        let merged = merge([a, other, b]);
        assert_eq!(merged.len(), 2);
        let m = &merged[0];
        assert_eq!(m.sources.len(), 2, "{m:?}");
        assert_eq!(m.names, vec![v("x", 1)]);
        assert!(m.sources.iter().all(|s| s.variant == 0));
    }

    #[test]
    fn names_and_sources_are_capped_and_indices_stay_valid() {
        let mut b = HitBuilder::new(H);
        for i in 0..200u8 {
            let name = format!("name {}", i % 20);
            b.add(id(i), format!("10.0.{i}.1:1"), &v(&name, i as u64 % 3));
        }
        assert!(!b.add(
            id(250),
            "10.1.1.1:1".into(),
            &v(&"n".repeat(MAX_NAME_BYTES + 1), 1)
        ));
        let hit = b.finish().unwrap();
        assert!(hit.names.len() <= MAX_NAMES_PER_HIT);
        assert!(hit.sources.len() <= MAX_SOURCES_PER_HIT);
        assert!(hit
            .sources
            .iter()
            .all(|s| (s.variant as usize) < hit.names.len()));
        let sup = support(&hit);
        assert!(sup.windows(2).all(|w| w[0].key() <= w[1].key()));
    }

    #[test]
    fn retaining_sources_rebuilds_the_hit() {
        let mut b = HitBuilder::new(H);
        b.add(id(1), "10.0.0.1:1".into(), &v("a", 1));
        b.add(id(2), "10.0.0.2:1".into(), &v("b", 1));
        b.add(id(3), "10.0.0.3:1".into(), &v("b", 1));
        let hit = b.finish().unwrap();
        assert_eq!(hit.name(), "b");
        let only_a = retain_sources(hit.clone(), |s| s.id == id(1)).unwrap();
        assert_eq!(only_a.names, vec![v("a", 1)]);
        assert_eq!(only_a.sources[0].variant, 0);
        assert!(retain_sources(hit, |_| false).is_none());
    }

    #[test]
    fn hits_rank_by_independent_sources() {
        let one = |n: u8, hosts: &[u8]| {
            let mut b = HitBuilder::new(ContentHash([n; 32]));
            for (i, h) in hosts.iter().enumerate() {
                b.add(id(n * 10 + i as u8), format!("10.0.0.{h}:{i}"), &v("f", 1));
            }
            b.finish().unwrap()
        };
        let mut hits = vec![one(1, &[1, 1, 1]), one(2, &[1, 2]), one(3, &[3])];
        rank(&mut hits);
        let order: Vec<u8> = hits.iter().map(|h| h.hash.0[0]).collect();
        assert_eq!(order, vec![2, 1, 3]);
    }

    proptest::proptest! {
        /// A built hit keeps every bound, and rebuilding it (as each hop
        /// does with what it relays) changes nothing: one name or many,
        /// few sources or more than are listed.
        #[test]
        fn a_built_hit_keeps_its_bounds_and_rebuilds_to_itself(
            one_name in proptest::bool::ANY,
            added in proptest::collection::vec((0u8..=255, 0u8..30, 0u16..12, 0u8..10), 0..200),
        ) {
            let mut b = HitBuilder::new(H);
            for (n, host, port, name) in added {
                let name = if one_name { 0 } else { name };
                b.add(id(n), format!("192.0.2.{host}:{}", 7000 + port), &v(&format!("f{name}"), 1));
            }
            let Some(hit) = b.finish() else {
                return Ok(());
            };
            proptest::prop_assert!(hit.sources.len() <= MAX_SOURCES_PER_HIT);
            proptest::prop_assert!(hit.names.len() <= MAX_NAMES_PER_HIT);
            proptest::prop_assert!(hit.sources.iter().all(|s| (s.variant as usize) < hit.names.len()));
            let ids: HashSet<NodeId> = hit.sources.iter().map(|s| s.id).collect();
            let addrs: HashSet<&str> = hit.sources.iter().map(|s| s.addr.as_str()).collect();
            proptest::prop_assert_eq!(ids.len(), hit.sources.len());
            proptest::prop_assert_eq!(addrs.len(), hit.sources.len());
            let mut per_host: HashMap<&str, usize> = HashMap::new();
            for s in &hit.sources {
                *per_host.entry(host_of(&s.addr)).or_default() += 1;
            }
            proptest::prop_assert!(per_host.values().all(|&n| n <= MAX_SOURCES_PER_IP));
            let again = retain_sources(hit.clone(), |_| true);
            proptest::prop_assert_eq!(again, Some(hit));
        }
    }
}
