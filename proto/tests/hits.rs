//! Property tests of `servent_proto::hits` on random announcements (ids,
//! addresses and names drawn from small pools, so that duplicates, shared
//! machines and competing names are common) and of `servent_proto::pin`
//! on random size claims.

use std::collections::{HashMap, HashSet};

use proptest::prelude::*;
use servent_proto::hits::{self, host_of, support, HitBuilder};
use servent_proto::limits::{MAX_NAMES_PER_HIT, MAX_SOURCES_PER_HIT, MAX_SOURCES_PER_IP};
use servent_proto::msg::{Hit, NameVariant};
use servent_proto::pin::{SizeClaims, Verdict};
use servent_proto::{ContentHash, NodeId};

const H: ContentHash = ContentHash([9; 32]);

/// (id, host, port, variant) drawn from small pools.
fn announcements() -> impl Strategy<Value = Vec<(u8, u8, u8, u8)>> {
    prop::collection::vec((any::<u8>(), 0u8..24, 0u8..12, 0u8..12), 0..300)
}

fn variant(v: u8) -> NameVariant {
    NameVariant {
        name: format!("name {}", v % 6),
        size: (v / 6) as u64,
    }
}

fn build(list: &[(u8, u8, u8, u8)]) -> Option<Hit> {
    let mut b = HitBuilder::new(H);
    for &(id, host, port, v) in list {
        b.add(
            NodeId([id; 32]),
            format!("10.0.0.{host}:{port}"),
            &variant(v),
        );
    }
    b.finish()
}

fn check_bounds(hit: &Hit) {
    assert!(!hit.sources.is_empty());
    assert!(hit.sources.len() <= MAX_SOURCES_PER_HIT);
    assert!(!hit.names.is_empty() && hit.names.len() <= MAX_NAMES_PER_HIT);
    let ids: HashSet<_> = hit.sources.iter().map(|s| s.id).collect();
    let addrs: HashSet<_> = hit.sources.iter().map(|s| &s.addr).collect();
    assert_eq!(ids.len(), hit.sources.len(), "an id twice");
    assert_eq!(addrs.len(), hit.sources.len(), "an address twice");
    let mut per_host: HashMap<&str, usize> = HashMap::new();
    for s in &hit.sources {
        *per_host.entry(host_of(&s.addr)).or_default() += 1;
        assert!((s.variant as usize) < hit.names.len());
    }
    assert!(per_host.values().all(|&n| n <= MAX_SOURCES_PER_IP));
    let names: HashSet<_> = hit.names.iter().collect();
    assert_eq!(names.len(), hit.names.len(), "a variant twice");
    // Best supported first, and every variant listed has a source.
    let sup = support(hit);
    assert!(sup.iter().all(|s| s.ids > 0));
    assert!(sup
        .windows(2)
        .all(|w| (w[0].ips, w[0].ids) >= (w[1].ips, w[1].ids)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_built_hit_keeps_every_bound(list in announcements()) {
        if let Some(hit) = build(&list) {
            check_bounds(&hit);
        } else {
            prop_assert!(list.is_empty());
        }
    }

    #[test]
    fn merging_is_idempotent_and_keeps_the_bounds(a in announcements(), b in announcements()) {
        let (ha, hb) = (build(&a), build(&b));
        let parts: Vec<Hit> = ha.iter().chain(hb.iter()).cloned().collect();
        let merged = hits::merge(parts.clone());
        prop_assert!(merged.len() <= 1);
        if let Some(m) = merged.first() {
            check_bounds(m);
            // Rebuilding a built hit changes nothing.
            prop_assert_eq!(&hits::merge([m.clone()])[0], m);
        }
    }

    /// The point of it all: one more source, with a name of its own and
    /// an id of its own (below nearly every other), never changes the
    /// name shown when at least two machines agree on it.
    #[test]
    fn one_source_cannot_choose_the_name_shown(list in announcements(), port in any::<u8>()) {
        let Some(hit) = build(&list) else { return Ok(()) };
        let shown = hit.names[0].clone();
        prop_assume!(support(&hit)[0].ips >= 2);
        // (A full hit has to cut someone to list it: that is the cap's
        // doing, not the liar's.)
        prop_assume!(hit.sources.len() < MAX_SOURCES_PER_HIT);
        let mut b = HitBuilder::new(H);
        let mut lowest = [0; 32];
        lowest[31] = 1;
        b.add(NodeId(lowest), format!("192.0.2.1:{port}"), &NameVariant {
            name: "LYING NAME.exe".into(),
            size: 1,
        });
        b.add_hit(&hit);
        let poisoned = b.finish().unwrap();
        prop_assert_eq!(&poisoned.names[0], &shown);
    }

    /// Whatever the claims and the order they come in, a pinned size
    /// makes liars of exactly the sources that claimed another.
    #[test]
    fn pinning_blames_exactly_the_other_claims(
        claims in prop::collection::vec((0u8..40, 0u8..8, 0u64..4, any::<bool>()), 1..40),
        truth in 0u64..4,
    ) {
        let mut c = SizeClaims::new();
        let mut last: HashMap<u8, u64> = HashMap::new();
        for &(key, host, size, has_last) in &claims {
            c.claim(key, &host.to_string(), 1000 + size, has_last);
            last.insert(key, 1000 + size);
        }
        // Nothing is a liar before anything is proven.
        prop_assert_eq!(c.liars().count(), 0);
        c.pin(1000 + truth);
        for (key, size) in last {
            let want = if size == 1000 + truth { Verdict::Agrees } else { Verdict::Liar };
            prop_assert_eq!(c.verdict(&key), want);
        }
    }
}
