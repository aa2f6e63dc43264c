//! Which size a download believes, and which sources lied about it.
//!
//! A hit's size is what whoever announced it says, and a source's
//! `Ranges` reply is only what that source says: neither is believed. The
//! range layer, once it verifies against the content hash, fixes the
//! number of ranges (docs/PROTOCOL.md §10.3) but not where in the last
//! range the file ends; that is pinned only when the last range's bytes
//! verify against its CV, because the range's length enters its CV. So a
//! downloader records every source's claim here, fetches the layer and the
//! last range at the best-supported size from a source that claims it
//! ([`SizeClaims::next_pin`]), and reports what verified. Until a size is
//! pinned, a source that claims another is a [`Verdict::Suspect`], never
//! dropped for it; once pinned (or once the layer rules its size out), it
//! is a [`Verdict::Liar`]. A source whose own bytes or layer fail to verify
//! for its own claim is a liar at once ([`SizeClaims::refute`]).
//!
//! Support is counted as in [`crate::hits`]: distinct IP addresses, then
//! distinct sources. It only orders what is tried first; proof decides.

use std::collections::HashSet;

use crate::limits::RANGE_SIZE;

/// Ranges of a file of `size` bytes (at least one).
pub fn ranges_of(size: u64) -> u64 {
    size.div_ceil(RANGE_SIZE).max(1)
}

/// What is known of one source's size claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It claims the pinned size.
    Agrees,
    /// Nothing is pinned yet and nothing rules its claim out.
    Suspect,
    /// Its claim is proven wrong: by the pinned size, by the verified
    /// layer's number of ranges, or by its own bytes.
    Liar,
    /// No claim of it is recorded.
    Unknown,
}

#[derive(Debug, Clone)]
struct Claim<K> {
    key: K,
    host: String,
    size: u64,
    has_last: bool,
    refuted: bool,
}

/// Every source's size claim for one download, and what is proven.
#[derive(Debug, Clone)]
pub struct SizeClaims<K> {
    claims: Vec<Claim<K>>,
    ranges: Option<u64>,
    pinned: Option<u64>,
}

impl<K> Default for SizeClaims<K> {
    fn default() -> Self {
        Self {
            claims: Vec::new(),
            ranges: None,
            pinned: None,
        }
    }
}

impl<K: Clone + Eq> SizeClaims<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records (or replaces) `key`'s claim: the file is `size` bytes, and
    /// it has the last range (`has_last`) to prove it. `host` is its IP.
    pub fn claim(&mut self, key: K, host: &str, size: u64, has_last: bool) -> Verdict {
        let refuted = self.find(&key).is_some_and(|c| c.refuted && c.size == size);
        self.forget(&key);
        self.claims.push(Claim {
            key: key.clone(),
            host: host.to_string(),
            size,
            has_last,
            refuted,
        });
        self.verdict(&key)
    }

    /// Drops `key`'s claim (it went away; that proves nothing).
    pub fn forget(&mut self, key: &K) {
        self.claims.retain(|c| c.key != *key);
    }

    /// `key` sent a layer or bytes that do not verify for its own claim.
    pub fn refute(&mut self, key: &K) {
        if let Some(c) = self.claims.iter_mut().find(|c| c.key == *key) {
            c.refuted = true;
        }
    }

    /// A layer of `ranges` CVs verified against the hash.
    pub fn layer_verified(&mut self, ranges: u64) {
        self.ranges = Some(ranges);
    }

    /// The last range verified with the file ending at `size`.
    pub fn pin(&mut self, size: u64) {
        self.ranges = Some(ranges_of(size));
        self.pinned = Some(size);
    }

    pub fn pinned(&self) -> Option<u64> {
        self.pinned
    }

    /// Ranges of the verified layer, if one verified.
    pub fn ranges(&self) -> Option<u64> {
        self.ranges
    }

    fn find(&self, key: &K) -> Option<&Claim<K>> {
        self.claims.iter().find(|c| c.key == *key)
    }

    /// Whether a claim of `size` is ruled out by what is proven.
    fn impossible(&self, size: u64) -> bool {
        self.pinned.is_some_and(|p| p != size) || self.ranges.is_some_and(|r| r != ranges_of(size))
    }

    fn verdict_of(&self, c: &Claim<K>) -> Verdict {
        if c.refuted || self.impossible(c.size) {
            Verdict::Liar
        } else if self.pinned == Some(c.size) {
            Verdict::Agrees
        } else {
            Verdict::Suspect
        }
    }

    pub fn verdict(&self, key: &K) -> Verdict {
        self.find(key)
            .map_or(Verdict::Unknown, |c| self.verdict_of(c))
    }

    /// The sizes still possible, best supported first (more distinct
    /// hosts, then more sources, then the smaller size: its layer is the
    /// cheaper one to fetch).
    fn candidates(&self) -> Vec<u64> {
        let mut sizes: Vec<(u64, HashSet<&str>, usize)> = Vec::new();
        for c in self
            .claims
            .iter()
            .filter(|c| self.verdict_of(c) != Verdict::Liar)
        {
            match sizes.iter_mut().find(|(s, _, _)| *s == c.size) {
                Some((_, hosts, n)) => {
                    hosts.insert(&c.host);
                    *n += 1;
                }
                None => sizes.push((c.size, HashSet::from([c.host.as_str()]), 1)),
            }
        }
        sizes.sort_by(|a, b| (b.1.len(), b.2).cmp(&(a.1.len(), a.2)).then(a.0.cmp(&b.0)));
        sizes.into_iter().map(|(s, _, _)| s).collect()
    }

    /// Which size to try to pin next and the source to fetch the last
    /// range (and the layer, if none verified yet) from: the best
    /// supported size that a source with the last range claims. `None`
    /// once pinned, or while no such source is known.
    pub fn next_pin(&self) -> Option<(K, u64)> {
        if self.pinned.is_some() {
            return None;
        }
        self.candidates().into_iter().find_map(|size| {
            self.claims
                .iter()
                .find(|c| c.size == size && c.has_last && !c.refuted)
                .map(|c| (c.key.clone(), size))
        })
    }

    /// The pinned size, or else the best supported possible one: what a
    /// download of sources none of which has the last range goes on with
    /// (the last range proves it or not when it comes).
    pub fn best(&self) -> Option<u64> {
        self.pinned.or_else(|| self.candidates().first().copied())
    }

    /// Every source whose claim is proven wrong.
    pub fn liars(&self) -> impl Iterator<Item = &K> {
        self.claims
            .iter()
            .filter(|c| self.verdict_of(c) == Verdict::Liar)
            .map(|c| &c.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: u64 = RANGE_SIZE;

    #[test]
    fn a_disagreeing_source_is_a_suspect_until_the_size_is_pinned() {
        let mut c = SizeClaims::new();
        // The liar answers first.
        assert_eq!(c.claim("liar", "10.0.0.9", 300_000, true), Verdict::Suspect);
        assert_eq!(c.claim("a", "10.0.0.1", 300_001, true), Verdict::Suspect);
        assert_eq!(c.claim("b", "10.0.0.2", 300_001, true), Verdict::Suspect);
        // Best supported first.
        assert_eq!(c.next_pin(), Some(("a", 300_001)));
        c.layer_verified(ranges_of(300_001));
        // Same number of ranges: still only a suspect.
        assert_eq!(c.verdict(&"liar"), Verdict::Suspect);
        c.pin(300_001);
        assert_eq!(c.verdict(&"liar"), Verdict::Liar);
        assert_eq!(c.verdict(&"a"), Verdict::Agrees);
        assert_eq!(c.liars().copied().collect::<Vec<_>>(), vec!["liar"]);
        assert_eq!(c.next_pin(), None);
        // A late claim is judged at once.
        assert_eq!(c.claim("late", "10.0.0.3", 5, true), Verdict::Liar);
        assert_eq!(c.claim("ok", "10.0.0.4", 300_001, false), Verdict::Agrees);
    }

    #[test]
    fn a_refuted_pin_moves_to_the_next_size() {
        let mut c = SizeClaims::new();
        c.claim("liar", "10.0.0.9", 3 * R, true);
        c.claim("liar2", "10.0.0.8", 3 * R, true);
        c.claim("a", "10.0.0.1", 3 * R - 1, true);
        assert_eq!(c.next_pin(), Some(("liar", 3 * R)));
        c.layer_verified(3);
        c.refute(&"liar");
        // One source each left: the smaller size (the cheaper layer) first.
        assert_eq!(c.next_pin(), Some(("a", 3 * R - 1)));
        c.pin(3 * R - 1);
        assert_eq!(c.liars().count(), 2);
    }

    #[test]
    fn the_layer_rules_out_another_number_of_ranges() {
        let mut c = SizeClaims::new();
        c.claim("big", "10.0.0.9", 100 * R, true);
        c.claim("a", "10.0.0.1", 2 * R, false);
        assert_eq!(c.next_pin(), Some(("big", 100 * R)));
        // A partial source's layer proves two ranges: "big" is a liar
        // without a byte of its content.
        c.layer_verified(2);
        assert_eq!(c.verdict(&"big"), Verdict::Liar);
        // Nobody has the last range: nothing to pin, go on with the best.
        assert_eq!(c.next_pin(), None);
        assert_eq!(c.best(), Some(2 * R));
    }

    #[test]
    fn sources_that_went_away_are_forgotten_not_blamed() {
        let mut c = SizeClaims::new();
        c.claim(1, "h", 10, true);
        c.forget(&1);
        assert_eq!(c.verdict(&1), Verdict::Unknown);
        assert_eq!(c.next_pin(), None);
        assert_eq!(c.best(), None);
    }
}
