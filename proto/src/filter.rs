//! Keyword filters: which words a supernode's leaves share, summed up as a
//! Bloom filter that its mesh neighbours check before they send it a query
//! (the idea of Gnutella's query routing tables, QRP).
//!
//! A supernode indexes its own leaves' files, so it knows every word they
//! share exactly. What its neighbours need is much less: whether a query
//! could match anything there. [`LocalFilter`] keeps the words of this
//! supernode's index, with how many entries hold each, and the filter built
//! from them; [`LocalFilter::poll_update`] says what to send a neighbour to
//! bring its copy up to date: the whole filter, or only the bits that
//! changed. [`Filter`] is a neighbour's copy, checked when it arrives and
//! after every patch.
//!
//! The filter is a plain Bloom filter of `2^log2` bits. A word sets
//! [`FILTER_HASHES`] bits, found from the BLAKE3 hash of the word's UTF-8
//! bytes (after [`crate::keywords::words`]): with `a` and `b` its first two
//! little-endian `u64`s, bit `i` (0-based) is `(a + i * (b | 1)) mod 2^log2`
//! (double hashing). Bit `n` of the filter is bit `n % 8` of byte `n / 8`.
//! Every implementation must compute the same bits, or its neighbours skip
//! it for words it holds.
//!
//! What a filter can and cannot do to the node that trusts it:
//! - it only ever says *no*, for sure, or *maybe*: a query whose words are
//!   not all in a neighbour's filter is not sent there; a *maybe* costs one
//!   message that finds nothing (the false positives, kept near 1 % by
//!   sizing the filter to its words, [`filter_log2_for`]);
//! - a lying filter can claim words the sender does not hold. That draws
//!   queries it can only answer with nothing, at most what the neighbour's
//!   query limits let through, and it never stops a query from reaching the
//!   nodes that do hold the words. A filter fuller than
//!   [`MAX_FILTER_FILL_PERMILLE`] (one that says *maybe* to nearly
//!   everything) is refused, and so is any size outside
//!   [`MIN_FILTER_LOG2`]..=[`MAX_FILTER_LOG2`] or a patch of more than
//!   [`MAX_PATCH_BITS`] bits: the driver drops the link they came on.

use std::collections::HashMap;

/// Bits a word sets.
pub const FILTER_HASHES: u64 = 4;
/// Smallest filter: 2^10 bits (128 bytes).
pub const MIN_FILTER_LOG2: u8 = 10;
/// Largest filter: 2^22 bits (512 KiB), about 700 000 words at half full.
pub const MAX_FILTER_LOG2: u8 = 22;
/// A filter with more of its bits set than this (thousandths) is refused:
/// past half full, a Bloom filter of four hashes says *maybe* to more than
/// one word in sixteen it does not hold.
pub const MAX_FILTER_FILL_PERMILLE: u32 = 500;
/// Bits one patch may flip; more changes are sent as a whole filter.
pub const MAX_PATCH_BITS: usize = 8192;
/// How often a link's sender looks for changes of its filter, at most: a
/// file registered at a supernode is probed for by its neighbours within
/// about this long.
pub const FILTER_CHECK: std::time::Duration = std::time::Duration::from_millis(500);
/// Filter frames a receiver takes from one link a second, sustained
/// (twice what an honest sender sends, one per `FILTER_CHECK`), and at
/// once; more drop the link, so that filters cost their sender's CPU.
pub const FILTER_UPDATE_RATE: f64 = 4.0;
pub const FILTER_UPDATE_BURST: u32 = 8;
/// Bits per word a filter is sized to (the next power of two up): about a
/// quarter of the bits set and 0.4 % false positives, at four hashes.
const BITS_PER_WORD: usize = 12;

/// A word's hash, from which its bits in a filter of any size follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WordKey(u64, u64);

impl WordKey {
    /// The key of one normalised word (see [`crate::keywords::words`]).
    pub fn of(word: &str) -> Self {
        let h = blake3::hash(word.as_bytes());
        let b = h.as_bytes();
        let a = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        let c = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        Self(a, c)
    }

    /// The key of a file's content hash, so that a query by hash is
    /// routed by the same filters: its first two little-endian `u64`s (the
    /// hash is already uniform; no second hash is needed).
    pub fn of_hash(hash: &crate::id::ContentHash) -> Self {
        let b = &hash.0;
        let a = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        let c = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        Self(a, c)
    }

    /// The bits it sets in a filter of `2^log2` bits.
    fn bits(self, log2: u8) -> impl Iterator<Item = usize> {
        let mask = (1u64 << log2) - 1;
        let (a, step) = (self.0, self.1 | 1);
        (0..FILTER_HASHES).map(move |i| (a.wrapping_add(i.wrapping_mul(step)) & mask) as usize)
    }
}

/// Why a filter or patch from a neighbour was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("filter size 2^{0} bits is outside 2^{MIN_FILTER_LOG2}..=2^{MAX_FILTER_LOG2}")]
    Size(u8),
    #[error("filter of 2^{log2} bits needs {want} bytes, got {got}")]
    Length { log2: u8, want: usize, got: usize },
    #[error("filter is {0}‰ full, more than {MAX_FILTER_FILL_PERMILLE}‰")]
    TooFull(u32),
    #[error("patch of {0} bits, more than {MAX_PATCH_BITS}")]
    PatchTooLarge(usize),
    #[error("patch bit {bit} is outside a filter of 2^{log2} bits")]
    PatchBit { bit: u32, log2: u8 },
    #[error("patch for a filter that was never sent")]
    NoFilter,
}

/// A Bloom filter of `2^log2` bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    log2: u8,
    words: Vec<u64>,
    ones: usize,
}

impl Filter {
    /// An empty filter of `2^log2` bits (`log2` clamped to the allowed range).
    pub fn empty(log2: u8) -> Self {
        let log2 = log2.clamp(MIN_FILTER_LOG2, MAX_FILTER_LOG2);
        Self {
            log2,
            words: vec![0; (1usize << log2) / 64],
            ones: 0,
        }
    }

    /// A neighbour's filter as sent: `2^log2` bits in `bytes`, checked
    /// for size and fill before anything is kept.
    pub fn from_wire(log2: u8, bytes: &[u8]) -> Result<Self, FilterError> {
        if !(MIN_FILTER_LOG2..=MAX_FILTER_LOG2).contains(&log2) {
            return Err(FilterError::Size(log2));
        }
        let want = (1usize << log2) / 8;
        if bytes.len() != want {
            return Err(FilterError::Length {
                log2,
                want,
                got: bytes.len(),
            });
        }
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let ones = words.iter().map(|w| w.count_ones() as usize).sum();
        let f = Self { log2, words, ones };
        f.check_fill()?;
        Ok(f)
    }

    /// The filter as it goes on the wire: its size and its bytes.
    pub fn to_wire(&self) -> (u8, Vec<u8>) {
        let bytes = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        (self.log2, bytes)
    }

    pub fn log2(&self) -> u8 {
        self.log2
    }

    /// Thousandths of the bits that are set.
    pub fn fill_permille(&self) -> u32 {
        ((self.ones as u64 * 1000) >> self.log2) as u32
    }

    fn check_fill(&self) -> Result<(), FilterError> {
        match self.fill_permille() {
            f if f > MAX_FILTER_FILL_PERMILLE => Err(FilterError::TooFull(f)),
            _ => Ok(()),
        }
    }

    fn get(&self, bit: usize) -> bool {
        self.words[bit / 64] >> (bit % 64) & 1 == 1
    }

    fn flip(&mut self, bit: usize) {
        self.words[bit / 64] ^= 1 << (bit % 64);
        if self.get(bit) {
            self.ones += 1;
        } else {
            self.ones -= 1;
        }
    }

    fn set(&mut self, bit: usize) {
        if !self.get(bit) {
            self.flip(bit);
        }
    }

    /// Sets `key`'s bits.
    pub fn insert(&mut self, key: WordKey) {
        for bit in key.bits(self.log2) {
            self.set(bit);
        }
    }

    /// Whether `key`'s word may be held (false: it surely is not).
    pub fn may_hold(&self, key: WordKey) -> bool {
        key.bits(self.log2).all(|bit| self.get(bit))
    }

    /// Whether a query for all of `keys` may match (no words: anything may).
    pub fn may_match(&self, keys: &[WordKey]) -> bool {
        keys.iter().all(|k| self.may_hold(*k))
    }

    /// Flips the bits a neighbour's patch names, refusing a patch that is
    /// too large, names a bit outside the filter, or leaves it too full
    /// (the filter is then unchanged).
    pub fn apply(&mut self, patch: &[u32]) -> Result<(), FilterError> {
        if patch.len() > MAX_PATCH_BITS {
            return Err(FilterError::PatchTooLarge(patch.len()));
        }
        let size = 1u64 << self.log2;
        if let Some(&bit) = patch.iter().find(|&&b| u64::from(b) >= size) {
            return Err(FilterError::PatchBit {
                bit,
                log2: self.log2,
            });
        }
        for &bit in patch {
            self.flip(bit as usize);
        }
        if let Err(e) = self.check_fill() {
            for &bit in patch {
                self.flip(bit as usize);
            }
            return Err(e);
        }
        Ok(())
    }

    /// The bits that differ from `other` (of the same size), in order.
    fn diff(&self, other: &Filter) -> Vec<u32> {
        let mut out = Vec::new();
        for (i, (a, b)) in self.words.iter().zip(&other.words).enumerate() {
            let mut x = a ^ b;
            while x != 0 {
                let bit = x.trailing_zeros();
                out.push(i as u32 * 64 + bit);
                x &= x - 1;
            }
        }
        out
    }
}

/// The filter size, as `log2` of its bits, for `words` distinct words.
pub fn filter_log2_for(words: usize) -> u8 {
    let bits = words
        .saturating_mul(BITS_PER_WORD)
        .max(1)
        .next_power_of_two();
    (bits.trailing_zeros() as u8).clamp(MIN_FILTER_LOG2, MAX_FILTER_LOG2)
}

/// What to send a neighbour so that its copy equals ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The whole filter (the first one, or one of another size).
    Full(Filter),
    /// Bits to flip in the copy sent before.
    Patch(Vec<u32>),
}

/// This supernode's own filter, over the words of its index.
///
/// Adding a word sets its bits at once. Removing the last entry of a word
/// marks the filter for a rebuild from the words still held (a Bloom
/// filter cannot unset one word's bits, which others may share), done at
/// the next [`LocalFilter::poll_update`]: at most once per gossip round,
/// however many leaves left.
#[derive(Debug, Clone)]
pub struct LocalFilter {
    /// Entries of the index holding each word.
    words: HashMap<WordKey, u32>,
    current: Filter,
    /// A word went: `current` may hold bits no word sets.
    stale: bool,
    /// What the neighbours were last sent, for a driver that sends each
    /// the same ([`LocalFilter::poll_update`]).
    sender: FilterSender,
}

impl Default for LocalFilter {
    fn default() -> Self {
        Self {
            words: HashMap::new(),
            current: Filter::empty(MIN_FILTER_LOG2),
            stale: false,
            sender: FilterSender::default(),
        }
    }
}

impl LocalFilter {
    /// One more index entry holds `key`'s word.
    pub fn add(&mut self, key: WordKey) {
        let n = self.words.entry(key).or_insert(0);
        *n += 1;
        if *n == 1 {
            self.current.insert(key);
        }
    }

    /// One entry holding `key`'s word went.
    pub fn remove(&mut self, key: WordKey) {
        if let Some(n) = self.words.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.words.remove(&key);
                self.stale = true;
            }
        }
    }

    /// Gives back memory once most words went: the word table shrinks, and
    /// a filter four times too big is rebuilt at its size (not otherwise:
    /// that waits for [`LocalFilter::filter`]).
    pub fn shrink(&mut self) {
        if self.words.len() * 4 < self.words.capacity() {
            self.words.shrink_to(self.words.len() * 2);
        }
        if filter_log2_for(self.words.len()) + 2 <= self.current.log2 {
            self.filter();
        }
    }

    /// Distinct words held.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Whether the index may hold `key`'s word (exact: from the words).
    pub fn holds(&self, key: WordKey) -> bool {
        self.words.contains_key(&key)
    }

    /// The filter as it stands, rebuilt first if words went or it no
    /// longer suits the number of words (too full, or four times too big).
    pub fn filter(&mut self) -> &Filter {
        let want = filter_log2_for(self.words.len());
        if self.stale || want > self.current.log2 || want + 2 <= self.current.log2 {
            let mut f = Filter::empty(want);
            for key in self.words.keys() {
                f.insert(*key);
            }
            self.current = f;
            self.stale = false;
        }
        &self.current
    }

    /// What the neighbours need to catch up with the filter as it stands,
    /// if anything; from then on it counts as sent. A neighbour that
    /// joins later is sent [`LocalFilter::sent`] whole.
    pub fn poll_update(&mut self) -> Option<Update> {
        self.filter();
        self.sender.update(&self.current)
    }

    /// The filter as the neighbours were last sent it.
    pub fn sent(&self) -> Option<&Filter> {
        self.sender.sent()
    }
}

/// What one neighbour was last sent of a filter that changes, so that the
/// next update is a patch of what changed since (a driver with a writer
/// per link keeps one per link, and never needs the updates in between).
#[derive(Debug, Clone, Default)]
pub struct FilterSender {
    sent: Option<Filter>,
}

impl FilterSender {
    /// What to send for the neighbour's copy to equal `current`, if
    /// anything; from then on it counts as sent.
    pub fn update(&mut self, current: &Filter) -> Option<Update> {
        let update = match &mut self.sent {
            Some(s) if s.log2 == current.log2 => {
                let patch = current.diff(s);
                if patch.is_empty() {
                    return None;
                }
                s.clone_from(current);
                if patch.len() > MAX_PATCH_BITS {
                    Update::Full(current.clone())
                } else {
                    Update::Patch(patch)
                }
            }
            _ => {
                self.sent = Some(current.clone());
                Update::Full(current.clone())
            }
        };
        Some(update)
    }

    /// The filter as the neighbour was last sent it.
    pub fn sent(&self) -> Option<&Filter> {
        self.sent.as_ref()
    }
}

/// A neighbour's filter as its updates built it; refused updates leave it
/// as it was, and the driver drops the link they came on.
#[derive(Debug, Clone, Default)]
pub struct FilterCopy {
    filter: Option<Filter>,
}

impl FilterCopy {
    /// A whole filter (`log2`, its bytes), checked before it replaces the
    /// copy.
    pub fn handle_full(&mut self, log2: u8, bytes: &[u8]) -> Result<&Filter, FilterError> {
        let f = Filter::from_wire(log2, bytes)?;
        Ok(self.filter.insert(f))
    }

    /// A patch: the bits to flip in the copy (refused before any whole
    /// filter came).
    pub fn handle_patch(&mut self, bits: &[u32]) -> Result<&Filter, FilterError> {
        let f = self.filter.as_mut().ok_or(FilterError::NoFilter)?;
        f.apply(bits)?;
        Ok(f)
    }

    /// The copy as it stands; `None` before the first whole filter.
    pub fn filter(&self) -> Option<&Filter> {
        self.filter.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u32) -> WordKey {
        WordKey::of(&format!("word{n}"))
    }

    /// A neighbour's copy, kept up to date from the updates alone.
    fn follow(copy: &mut FilterCopy, update: Update) {
        match update {
            Update::Full(f) => {
                let (log2, bytes) = f.to_wire();
                copy.handle_full(log2, &bytes).expect("valid filter");
            }
            Update::Patch(p) => {
                copy.handle_patch(&p).expect("valid patch");
            }
        }
    }

    #[test]
    fn a_copy_refuses_a_patch_before_a_filter_and_keeps_itself_on_a_bad_update() {
        let mut copy = FilterCopy::default();
        assert_eq!(copy.handle_patch(&[1]), Err(FilterError::NoFilter));
        let mut f = Filter::empty(MIN_FILTER_LOG2);
        f.insert(key(1));
        let (log2, bytes) = f.to_wire();
        copy.handle_full(log2, &bytes).expect("a valid filter");
        assert!(copy.handle_full(log2, &bytes[1..]).is_err(), "short");
        assert!(copy.handle_full(30, &bytes).is_err(), "no such size");
        assert!(copy.handle_patch(&[1 << 10]).is_err(), "outside");
        let all: Vec<u32> = (0..1 << 10).collect();
        assert!(copy.handle_patch(&all).is_err(), "too full");
        assert_eq!(copy.filter(), Some(&f), "unchanged by what it refused");
    }

    #[test]
    fn bits_follow_the_documented_formula() {
        // blake3("abc") starts 6437b3ac38465133 ffb63b75273a8db5 (hex).
        let k = WordKey::of("abc");
        let a = u64::from_le_bytes([0x64, 0x37, 0xb3, 0xac, 0x38, 0x46, 0x51, 0x33]);
        let b = u64::from_le_bytes([0xff, 0xb6, 0x3b, 0x75, 0x27, 0x3a, 0x8d, 0xb5]);
        assert_eq!(k, WordKey(a, b));
        let bits: Vec<usize> = k.bits(10).collect();
        let want: Vec<usize> = (0..4u64)
            .map(|i| (a.wrapping_add(i.wrapping_mul(b | 1)) % 1024) as usize)
            .collect();
        assert_eq!(bits, want);
    }

    #[test]
    fn words_held_always_match_and_others_rarely_do() {
        let mut local = LocalFilter::default();
        for n in 0..5_000 {
            local.add(key(n));
        }
        let f = local.filter().clone();
        assert!((0..5_000).all(|n| f.may_hold(key(n))));
        let false_positives = (5_000..105_000).filter(|&n| f.may_hold(key(n))).count();
        // Sized to 12 bits a word, rounded up: under 1 % false positives.
        assert!(false_positives < 1_000, "{false_positives} of 100 000");
        assert!(f.fill_permille() < 350, "{}‰", f.fill_permille());
    }

    #[test]
    fn a_query_matches_only_if_every_word_may_be_held() {
        let mut local = LocalFilter::default();
        local.add(key(1));
        local.add(key(2));
        let f = local.filter();
        assert!(f.may_match(&[key(1), key(2)]));
        assert!(!f.may_match(&[key(1), key(3)]) || f.may_hold(key(3)));
        assert!(f.may_match(&[]));
    }

    #[test]
    fn a_word_is_gone_only_when_its_last_entry_goes() {
        let mut local = LocalFilter::default();
        local.add(key(1));
        local.add(key(1));
        local.remove(key(1));
        assert!(local.filter().may_hold(key(1)));
        local.remove(key(1));
        assert!(!local.holds(key(1)));
        assert!(!local.filter().may_hold(key(1)));
        // Removing a word never held changes nothing.
        local.remove(key(9));
        assert!(local.is_empty());
    }

    #[test]
    fn small_changes_go_as_patches_and_a_new_size_as_a_whole_filter() {
        let mut local = LocalFilter::default();
        local.add(key(1));
        assert!(matches!(local.poll_update(), Some(Update::Full(_))));
        assert_eq!(local.poll_update(), None);
        local.add(key(2));
        match local.poll_update() {
            Some(Update::Patch(p)) => assert!(!p.is_empty() && p.len() <= 4),
            other => panic!("expected a patch, got {other:?}"),
        }
        for n in 3..1_000 {
            local.add(key(n));
        }
        match local.poll_update() {
            Some(Update::Full(f)) => assert_eq!(f.log2(), filter_log2_for(999)),
            other => panic!("expected a full filter, got {other:?}"),
        }
    }

    #[test]
    fn hostile_filters_and_patches_are_refused() {
        assert_eq!(Filter::from_wire(9, &[0; 64]), Err(FilterError::Size(9)));
        assert_eq!(Filter::from_wire(23, &[]), Err(FilterError::Size(23)));
        assert_eq!(
            Filter::from_wire(10, &[0; 100]),
            Err(FilterError::Length {
                log2: 10,
                want: 128,
                got: 100
            })
        );
        // All ones: says "maybe" to every word.
        assert_eq!(
            Filter::from_wire(10, &[0xff; 128]),
            Err(FilterError::TooFull(1000))
        );
        let mut f = Filter::from_wire(10, &[0; 128]).expect("empty filter");
        assert_eq!(
            f.apply(&[1024]),
            Err(FilterError::PatchBit {
                bit: 1024,
                log2: 10
            })
        );
        let too_many: Vec<u32> = (0..MAX_PATCH_BITS as u32 + 1).map(|b| b % 1024).collect();
        assert_eq!(
            f.apply(&too_many),
            Err(FilterError::PatchTooLarge(MAX_PATCH_BITS + 1))
        );
        // A patch that would fill it past the limit is refused whole.
        let fill: Vec<u32> = (0..600).collect();
        assert_eq!(f.apply(&fill), Err(FilterError::TooFull(585)));
        assert_eq!(f.fill_permille(), 0);
        assert!(f.apply(&(0..500).collect::<Vec<_>>()).is_ok());
    }

    proptest! {
        /// Whatever the order of adds and removes, a neighbour that applies
        /// every update holds exactly our filter, and that filter says
        /// *maybe* to every word we hold.
        #[test]
        fn a_neighbour_following_the_updates_has_our_filter(
            steps in proptest::collection::vec((any::<bool>(), 0u32..300, any::<bool>()), 1..400),
        ) {
            let mut local = LocalFilter::default();
            let mut copy = FilterCopy::default();
            // A link whose writer only looks every third round.
            let (mut late, mut late_copy, mut round) =
                (FilterSender::default(), FilterCopy::default(), 0u32);
            let mut held: HashMap<u32, u32> = HashMap::new();
            for (add, n, poll) in steps {
                if add {
                    local.add(key(n));
                    *held.entry(n).or_default() += 1;
                } else if let Some(c) = held.get_mut(&n) {
                    local.remove(key(n));
                    *c -= 1;
                    if *c == 0 {
                        held.remove(&n);
                    }
                }
                if poll {
                    if let Some(u) = local.poll_update() {
                        follow(&mut copy, u);
                    }
                    prop_assert_eq!(copy.filter(), local.sent());
                    round += 1;
                    if round % 3 == 0 {
                        if let Some(u) = late.update(local.filter()) {
                            follow(&mut late_copy, u);
                        }
                        prop_assert_eq!(late_copy.filter(), late.sent());
                    }
                }
            }
            if let Some(u) = local.poll_update() {
                follow(&mut copy, u);
            }
            if let Some(u) = late.update(local.filter()) {
                follow(&mut late_copy, u);
            }
            prop_assert_eq!(late_copy.filter(), Some(local.filter()));
            let copy = copy.filter().expect("something was sent").clone();
            prop_assert_eq!(&copy, local.filter());
            for n in held.keys() {
                prop_assert!(copy.may_hold(key(*n)));
            }
            prop_assert_eq!(local.len(), held.len());
        }
    }
}
