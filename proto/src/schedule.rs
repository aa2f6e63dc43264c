//! The download scheduler: which range of a file each source fetches next,
//! and what becomes of a source that fails.
//!
//! A file is cut into ranges (the range layer's, docs/PROTOCOL.md §10.3).
//! A downloader keeps [`PER_SOURCE`] requests in flight on each source; each
//! request slot asks this scheduler what to do next ([`Schedule::next`]) and
//! reports how its request ended ([`Schedule::on_run_ended`]). The rules:
//!
//! - **First free range.** A slot takes the first range nobody has verified
//!   or is fetching that its source has (a partial source's `Have` bitmap
//!   limits it), so a faster source fetches more ranges.
//! - **Runs.** A free range starts a run of the free ranges after it, asked
//!   for in one request: at most [`MAX_RUN`], and at most a
//!   [`RUN_DIVISOR`]th of the ranges left, so that the work spreads over the
//!   sources and requests shrink to single ranges towards the end.
//! - **Endgame.** Once every range the source has is taken, a slot doubles
//!   up on a range in flight elsewhere: the one with the fewest fetchers
//!   (the lowest first), never one its own source fetches already. The
//!   first copy that verifies is kept, so a slow or vanished source holds
//!   nothing up.
//! - **Nothing to do.** A source with the whole file whose ranges are all
//!   done or its own is left alone ([`Action::Idle`]); a partial source is
//!   asked `Have` again after [`ScheduleConfig::have_poll`].
//! - **Failures.** A request's ranges that did not verify are free again
//!   the moment it ends. A source that answers `Unavailable` is asked again
//!   after `have_poll` (a partial one is asked `Have` first); a whole one
//!   that does so more than [`MAX_BUSY`] times in a row on one slot, and
//!   any source
//!   that fails otherwise (an error, a range that does not verify, no
//!   progress within [`ScheduleConfig::range_timeout`]), is dropped, and
//!   every range it had in flight goes back to the others.
//! - **Finished** exactly when every range is verified.
//!
//! [`SourcePool`] decides which sources a download dials, and how many at
//! once.
//!
//! Not here: streams, files and hashing. The leaf's `transfer` module asks
//! for the ranges, verifies each against the layer, writes it, and feeds
//! the results back; it also applies the patience a [`Action::Fetch`]
//! carries to each step of the request (the answer, then each range).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::ops::Range;
use std::time::{Duration, Instant};

use crate::hits::host_of;
use crate::limits::MAX_SOURCES_PER_IP;
use crate::msg::Source;
use crate::NodeId;

/// Requests each source has in flight at once, so that the round trip
/// between two requests does not idle the link.
pub const PER_SOURCE: usize = 3;
/// Most ranges asked for in one request (4 MiB).
pub const MAX_RUN: usize = 16;
/// A run is at most this fraction of the ranges left, so that the work
/// spreads over the sources and the endgame is made of single ranges.
pub const RUN_DIVISOR: usize = 16;
/// How many `Unavailable` answers in a row one slot may get from a whole
/// source (its upload slots are busy) before the source is given up.
pub const MAX_BUSY: u32 = 8;
/// Sources a download has connected or connecting at once; more wait
/// their turn.
pub const MAX_SOURCES_AT_ONCE: usize = 8;
/// Sources a download dials at one IP address in all: a hit naming many
/// sources at one machine (a third party's, say) gets it dialled no more
/// often than a hit may list it.
pub const MAX_DIALS_PER_HOST: usize = MAX_SOURCES_PER_IP;

/// Timings of the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleConfig {
    /// A source whose answer to a request, or any one range of it, takes
    /// longer than this is dropped. Default 30 s.
    pub range_timeout: Duration,
    /// How long a source with nothing wanted now (partial), or that said
    /// `Unavailable`, is left before it is asked again. Default 1 s.
    pub have_poll: Duration,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            range_timeout: Duration::from_secs(30),
            have_poll: Duration::from_secs(1),
        }
    }
}

/// One bit a range: which ranges of a file are verified, or which a
/// partial source has. Range i is bit `i % 8` (least significant first)
/// of byte `i / 8`, as in the wire's have-bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    bytes: Vec<u8>,
    len: usize,
}

impl Bitmap {
    pub fn new(len: usize) -> Self {
        Self {
            bytes: vec![0; len.div_ceil(8)],
            len,
        }
    }

    /// `None` unless `bytes` is exactly the size of a `len`-range bitmap
    /// with no bit set past the end.
    pub fn from_bytes(bytes: Vec<u8>, len: usize) -> Option<Self> {
        if bytes.len() != len.div_ceil(8) {
            return None;
        }
        let spare = len % 8;
        if spare != 0 && bytes.last().is_some_and(|b| b >> spare != 0) {
            return None;
        }
        Some(Self { bytes, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.len && self.bytes[i / 8] & (1 << (i % 8)) != 0
    }

    pub fn set(&mut self, i: usize) {
        if i < self.len {
            self.bytes[i / 8] |= 1 << (i % 8);
        }
    }

    pub fn clear(&mut self, i: usize) {
        if i < self.len {
            self.bytes[i / 8] &= !(1 << (i % 8));
        }
    }

    pub fn count(&self) -> usize {
        self.bytes.iter().map(|b| b.count_ones() as usize).sum()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// How a request for a run of ranges ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every range of the run arrived and verified.
    Delivered,
    /// The source answered `Unavailable`: a partial source lacks a range
    /// after all, or a whole one has no upload slot free.
    Unavailable,
    /// Anything else: an error, a range that did not verify, or no progress
    /// within the patience of the request.
    Failed,
}

/// What a slot waits for before it asks [`Schedule::next`] again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Nothing: ask again.
    Claim,
    /// Ask the source `Have` and report it with [`Schedule::on_have`] first.
    AskHave,
}

/// What a request slot of a source does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask for these consecutive ranges in one request; give the source up
    /// if its answer, or any one range, takes longer than `patience`.
    Fetch {
        run: Range<usize>,
        patience: Duration,
    },
    /// Do nothing until `until`, then as `then` says.
    Wait { until: Instant, then: Then },
    /// Nothing more for this slot from this source.
    Idle,
    /// Every range is verified.
    Finished,
    /// The source is given up; its ranges went back to the others.
    Drop,
}

/// A source fetching: what it has, and how often each slot heard
/// `Unavailable` in a row.
#[derive(Debug)]
struct Fetcher {
    /// `None`: all of it.
    has: Option<Bitmap>,
    busy: Vec<u32>,
}

/// The scheduler of one download; `S` names a source.
#[derive(Debug)]
pub struct Schedule<S> {
    config: ScheduleConfig,
    done: Bitmap,
    /// Sources fetching each range in flight (more than one only in the
    /// endgame). Never a verified range.
    in_flight: BTreeMap<usize, Vec<S>>,
    /// Every range below this one is done or in flight.
    cursor: usize,
    /// Ranges nobody has verified yet.
    left: usize,
    sources: HashMap<S, Fetcher>,
}

impl<S: Copy + Eq + Hash> Schedule<S> {
    /// A download of `done.len()` ranges, of which those set in `done` are
    /// verified already (resumed).
    pub fn new(done: Bitmap, config: ScheduleConfig) -> Self {
        Self {
            config,
            left: done.len() - done.count(),
            done,
            in_flight: BTreeMap::new(),
            cursor: 0,
            sources: HashMap::new(),
        }
    }

    pub fn config(&self) -> &ScheduleConfig {
        &self.config
    }

    /// Ranges of the file.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// Ranges not verified yet.
    pub fn left(&self) -> usize {
        self.left
    }

    pub fn is_finished(&self) -> bool {
        self.left == 0
    }

    pub fn is_done(&self, index: usize) -> bool {
        self.done.get(index)
    }

    /// The verified ranges.
    pub fn done(&self) -> &Bitmap {
        &self.done
    }

    /// The sources fetching range `index` now.
    pub fn fetchers(&self, index: usize) -> &[S] {
        self.in_flight.get(&index).map_or(&[], Vec::as_slice)
    }

    /// Ranges in flight, each with its fetchers, lowest first.
    pub fn in_flight(&self) -> impl Iterator<Item = (usize, &[S])> + '_ {
        self.in_flight.iter().map(|(i, by)| (*i, by.as_slice()))
    }

    /// Whether `source` fetches from this schedule.
    pub fn has_source(&self, source: &S) -> bool {
        self.sources.contains_key(source)
    }

    /// A source starts fetching; `has` is its have-bitmap (`None`: the
    /// whole file).
    pub fn add_source(&mut self, source: S, has: Option<Bitmap>) {
        self.sources.insert(
            source,
            Fetcher {
                has,
                busy: vec![0; PER_SOURCE],
            },
        );
    }

    /// What a source has now (its answer to `Have`).
    pub fn on_have(&mut self, source: S, has: Option<Bitmap>) {
        if let Some(f) = self.sources.get_mut(&source) {
            f.has = has;
        }
    }

    /// What slot `slot` of `source` does next: the ranges it claims, or
    /// why it has none. Every slot of a source claims alike; the slot
    /// matters only to [`Schedule::on_run_ended`], which counts its
    /// `Unavailable` answers.
    pub fn next(&mut self, now: Instant, source: S, slot: usize) -> Action {
        let _ = slot;
        if self.left == 0 {
            return Action::Finished;
        }
        let Some(has) = self.sources.get_mut(&source).map(|f| f.has.take()) else {
            return Action::Drop;
        };
        let pick = self.claim(source, has.as_ref());
        let partial = has.is_some();
        if let Some(f) = self.sources.get_mut(&source) {
            f.has = has;
        }
        match pick {
            Some(run) => Action::Fetch {
                run,
                patience: self.config.range_timeout,
            },
            // A whole source with nothing to do is done; a partial one may
            // have more later.
            None if !partial => Action::Idle,
            None => Action::Wait {
                until: now + self.config.have_poll,
                then: Then::AskHave,
            },
        }
    }

    /// Range `index` arrived and verified. True if it was not verified
    /// before (a copy in the endgame may come second).
    pub fn on_verified(&mut self, index: usize) -> bool {
        if index >= self.done.len() || self.done.get(index) {
            return false;
        }
        self.done.set(index);
        self.left -= 1;
        // Its other fetchers go on (their copies are ignored): no range is
        // both verified and in flight.
        self.in_flight.remove(&index);
        true
    }

    /// The request of `slot` for `run` ended: what did not verify is free
    /// again, and the slot's next step.
    pub fn on_run_ended(
        &mut self,
        now: Instant,
        source: S,
        slot: usize,
        run: Range<usize>,
        outcome: Outcome,
    ) -> Action {
        for index in run {
            self.release(index, source);
        }
        let Some(f) = self.sources.get_mut(&source) else {
            return Action::Drop;
        };
        if f.busy.len() <= slot {
            f.busy.resize(slot + 1, 0);
        }
        match outcome {
            Outcome::Delivered => {
                f.busy[slot] = 0;
                self.next(now, source, slot)
            }
            // A partial source that lacks a range after all (its state
            // lags what it told us, or its own download restarted): ask
            // what it has now instead of dropping it.
            Outcome::Unavailable if f.has.is_some() => Action::Wait {
                until: now + self.config.have_poll,
                then: Then::AskHave,
            },
            // A whole source whose upload slots are all taken: ask again a
            // little later, a few times, before giving up on it.
            Outcome::Unavailable if f.busy[slot] < MAX_BUSY => {
                f.busy[slot] += 1;
                Action::Wait {
                    until: now + self.config.have_poll,
                    then: Then::Claim,
                }
            }
            Outcome::Unavailable | Outcome::Failed => {
                self.remove_source(source);
                Action::Drop
            }
        }
    }

    /// A source is gone (dropped, failed, or done): every range it had in
    /// flight is free again unless another source fetches it too.
    pub fn remove_source(&mut self, source: S) {
        self.sources.remove(&source);
        let held: Vec<usize> = self
            .in_flight
            .iter()
            .filter(|(_, by)| by.contains(&source))
            .map(|(i, _)| *i)
            .collect();
        for index in held {
            self.release(index, source);
        }
    }

    /// The run `source` (which has the ranges in `has`, or all) should
    /// fetch next, claimed for it: the first range nobody has; once every
    /// range it has is taken (the endgame), one in flight elsewhere with
    /// the fewest fetchers.
    fn claim(&mut self, source: S, has: Option<&Bitmap>) -> Option<Range<usize>> {
        let n = self.done.len();
        let free = |r: &Self, i: usize| !r.done.get(i) && !r.in_flight.contains_key(&i);
        while self.cursor < n && !free(self, self.cursor) {
            self.cursor += 1;
        }
        let first = match has {
            None => (self.cursor < n).then_some(self.cursor),
            Some(has) => (self.cursor..n).find(|&i| has.get(i) && free(self, i)),
        }
        .or_else(|| {
            self.in_flight
                .iter()
                .filter(|(i, by)| !by.contains(&source) && has.is_none_or(|h| h.get(**i)))
                .min_by_key(|(i, by)| (by.len(), **i))
                .map(|(i, _)| *i)
        })?;
        // A free range starts a run of free ranges: fewer, longer requests
        // while much is left, single ranges towards the end.
        let mut end = first + 1;
        if !self.in_flight.contains_key(&first) {
            let longest = (self.left / RUN_DIVISOR).clamp(1, MAX_RUN);
            while end < n
                && end - first < longest
                && has.is_none_or(|h| h.get(end))
                && free(self, end)
            {
                end += 1;
            }
        }
        for i in first..end {
            self.in_flight.entry(i).or_default().push(source);
        }
        Some(first..end)
    }

    fn release(&mut self, index: usize, source: S) {
        if let Some(by) = self.in_flight.get_mut(&index) {
            by.retain(|s| *s != source);
            if by.is_empty() {
                self.in_flight.remove(&index);
                // Not verified: free for the next claim again.
                self.cursor = self.cursor.min(index);
            }
        }
    }
}

/// The sources a download may dial: each once by node id and once by
/// address, at most [`MAX_DIALS_PER_HOST`] at one IP address, however
/// many a hit or a repeated query names, and [`MAX_SOURCES_AT_ONCE`] at a
/// time. What keeps a hit from turning a downloader against a third party.
#[derive(Debug, Default)]
pub struct SourcePool {
    queue: VecDeque<Source>,
    ids: HashSet<NodeId>,
    addrs: HashSet<String>,
    hosts: HashMap<String, usize>,
}

impl SourcePool {
    /// Queues `source` unless its id or address was offered before or its
    /// IP has had its share of dials.
    pub fn offer(&mut self, source: Source) -> bool {
        if self.ids.contains(&source.id) || self.addrs.contains(&source.addr) {
            return false;
        }
        let host = host_of(&source.addr).to_string();
        let dials = self.hosts.entry(host).or_insert(0);
        if *dials >= MAX_DIALS_PER_HOST {
            return false;
        }
        *dials += 1;
        self.ids.insert(source.id);
        self.addrs.insert(source.addr.clone());
        self.queue.push_back(source);
        true
    }

    /// The next source to dial while `busy` are connected or connecting:
    /// none once [`MAX_SOURCES_AT_ONCE`] are.
    pub fn next(&mut self, busy: usize) -> Option<Source> {
        if busy >= MAX_SOURCES_AT_ONCE {
            return None;
        }
        self.queue.pop_front()
    }

    /// No source waits to be dialled.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(n: usize, done: &[usize]) -> Schedule<u32> {
        let mut bits = Bitmap::new(n);
        done.iter().for_each(|&i| bits.set(i));
        Schedule::new(bits, ScheduleConfig::default())
    }

    fn bits(n: usize, set: impl IntoIterator<Item = usize>) -> Bitmap {
        let mut b = Bitmap::new(n);
        set.into_iter().for_each(|i| b.set(i));
        b
    }

    fn run(a: Action) -> Range<usize> {
        match a {
            Action::Fetch { run, .. } => run,
            other => panic!("no run: {other:?}"),
        }
    }

    fn one(a: Action) -> usize {
        let r = run(a);
        assert_eq!(r.len(), 1, "run {r:?}");
        r.start
    }

    #[test]
    fn ranges_go_in_order_then_to_the_endgame_and_back_when_released() {
        let t = Instant::now();
        let mut s = schedule(5, &[1]);
        s.add_source(0, None);
        s.add_source(1, None);
        assert_eq!(s.left(), 4);
        // Sources 0 and 1 take the free ranges in order, skipping the done one.
        assert_eq!(one(s.next(t, 0, 0)), 0);
        assert_eq!(one(s.next(t, 1, 0)), 2);
        assert_eq!(one(s.next(t, 0, 1)), 3);
        assert_eq!(one(s.next(t, 1, 1)), 4);
        // Endgame: source 1 doubles up on the first range only source 0 has.
        assert_eq!(one(s.next(t, 1, 2)), 0);
        // Source 0 doubles up on source 1's, fewest fetchers first.
        assert_eq!(one(s.next(t, 0, 2)), 2);
        assert_eq!(one(s.next(t, 0, 3)), 4);
        assert_eq!(one(s.next(t, 1, 3)), 3);
        assert_eq!(s.fetchers(0), &[0, 1]);
        // Both fetch every range left: nothing for whole sources.
        assert_eq!(s.next(t, 0, 4), Action::Idle);
        assert_eq!(s.next(t, 1, 4), Action::Idle);
        // Source 1 goes, then source 0 gives up range 2 (busy): it is free
        // again, first in line.
        s.remove_source(1);
        assert_eq!(s.fetchers(2), &[0]);
        assert!(matches!(
            s.on_run_ended(t, 0, 2, 2..3, Outcome::Unavailable),
            Action::Wait { .. }
        ));
        s.add_source(3, None);
        assert_eq!(one(s.next(t, 3, 0)), 2);
    }

    #[test]
    fn requests_take_runs_of_free_ranges_that_shrink_towards_the_end() {
        let t = Instant::now();
        let mut s = schedule(400, &[20]);
        s.add_source(0, None);
        s.add_source(1, None);
        // 399 left: runs of at most 16, stopping at a done range.
        assert_eq!(run(s.next(t, 0, 0)), 0..16);
        assert_eq!(run(s.next(t, 1, 0)), 16..20);
        assert_eq!(run(s.next(t, 0, 1)), 21..37);
        // A partial source's run stops where its ranges do.
        s.add_source(2, Some(bits(400, 37..40)));
        assert_eq!(run(s.next(t, 2, 0)), 37..40);

        // With 40 left, runs are 40 / 16 = 2 long; with fewer than 32 left,
        // single ranges.
        let mut s = schedule(100, &(0..60).collect::<Vec<_>>());
        s.add_source(0, None);
        assert_eq!(run(s.next(t, 0, 0)), 60..62);
        for i in 60..70 {
            s.on_verified(i);
        }
        assert_eq!(s.left(), 30);
        assert_eq!(run(s.next(t, 0, 1)), 70..71);
    }

    #[test]
    fn the_endgame_picks_the_fewest_fetchers_and_never_the_same_source_twice() {
        let t = Instant::now();
        let mut s = schedule(3, &[]);
        for src in 0..4 {
            s.add_source(src, None);
        }
        assert_eq!(one(s.next(t, 0, 0)), 0);
        assert_eq!(one(s.next(t, 1, 0)), 1);
        assert_eq!(one(s.next(t, 2, 0)), 2);
        // Every range is taken, each by one source: the lowest first.
        assert_eq!(one(s.next(t, 3, 0)), 0);
        // Range 0 has two fetchers now: source 3 goes to 1, then 2.
        assert_eq!(one(s.next(t, 3, 1)), 1);
        assert_eq!(one(s.next(t, 3, 2)), 2);
        // Source 0 fetches 0 already: the fewest fetchers among 1 and 2.
        assert_eq!(one(s.next(t, 0, 1)), 1);
        assert_eq!(one(s.next(t, 0, 2)), 2);
        assert_eq!(s.next(t, 0, 3), Action::Idle);
        for i in 0..3 {
            let by = s.fetchers(i);
            let unique: HashSet<_> = by.iter().collect();
            assert_eq!(unique.len(), by.len(), "range {i}: {by:?}");
        }
    }

    #[test]
    fn a_partial_source_gets_only_ranges_it_has_and_is_asked_again() {
        let t = Instant::now();
        let poll = ScheduleConfig::default().have_poll;
        let mut s = schedule(6, &[]);
        s.add_source(7, Some(bits(6, [4])));
        s.add_source(8, None);
        assert_eq!(one(s.next(t, 7, 0)), 4);
        assert_eq!(
            s.next(t, 7, 1),
            Action::Wait {
                until: t + poll,
                then: Then::AskHave
            }
        );
        assert_eq!(run(s.next(t, 8, 0)), 0..1);
        // In the endgame too, only what it has.
        for i in [1, 2, 3, 5] {
            assert_eq!(one(s.next(t, 8, 1 + i)), i);
        }
        assert!(matches!(s.next(t, 7, 1), Action::Wait { .. }));
        // It has more now.
        s.on_have(7, Some(bits(6, [0, 4])));
        assert_eq!(one(s.next(t, 7, 1)), 0);
    }

    #[test]
    fn a_failed_or_refused_range_is_free_again() {
        let t = Instant::now();
        let poll = ScheduleConfig::default().have_poll;
        let mut s = schedule(40, &[]);
        s.add_source(0, None);
        s.add_source(1, None);
        s.add_source(2, Some(bits(40, 0..40)));
        assert_eq!(run(s.next(t, 0, 0)), 0..2);
        assert_eq!(run(s.next(t, 1, 0)), 2..4);
        assert_eq!(run(s.next(t, 2, 0)), 4..6);
        // A whole source that is busy: its ranges go back, it is asked again.
        assert_eq!(
            s.on_run_ended(t, 0, 0, 0..2, Outcome::Unavailable),
            Action::Wait {
                until: t + poll,
                then: Then::Claim
            }
        );
        assert!(s.fetchers(0).is_empty());
        // A partial one that lacks a range after all: asked `Have`.
        assert_eq!(
            s.on_run_ended(t, 2, 0, 4..6, Outcome::Unavailable),
            Action::Wait {
                until: t + poll,
                then: Then::AskHave
            }
        );
        // A source that fails (or times out) is dropped, and its ranges
        // are the first free.
        assert_eq!(s.on_run_ended(t, 1, 0, 2..4, Outcome::Failed), Action::Drop);
        assert!(!s.has_source(&1));
        assert_eq!(s.next(t, 1, 0), Action::Drop);
        assert_eq!(run(s.next(t, 0, 0)), 0..2);
        assert_eq!(run(s.next(t, 0, 1)), 2..4);
        // Every range the patience of a request bounds.
        assert_eq!(
            s.next(t, 0, 2),
            Action::Fetch {
                run: 4..6,
                patience: ScheduleConfig::default().range_timeout
            }
        );
    }

    #[test]
    fn a_busy_whole_source_is_given_up_after_max_busy_refusals_in_a_row() {
        let t = Instant::now();
        let mut s = schedule(4, &[]);
        s.add_source(0, None);
        for _ in 0..MAX_BUSY {
            let r = run(s.next(t, 0, 0));
            assert!(matches!(
                s.on_run_ended(t, 0, 0, r, Outcome::Unavailable),
                Action::Wait {
                    then: Then::Claim,
                    ..
                }
            ));
        }
        // A delivery resets the count.
        let r = run(s.next(t, 0, 0));
        r.clone().for_each(|i| assert!(s.on_verified(i)));
        assert!(matches!(
            s.on_run_ended(t, 0, 0, r, Outcome::Delivered),
            Action::Fetch { .. }
        ));
        let mut s = schedule(4, &[]);
        s.add_source(0, None);
        for _ in 0..MAX_BUSY {
            let r = run(s.next(t, 0, 0));
            s.on_run_ended(t, 0, 0, r, Outcome::Unavailable);
        }
        let r = run(s.next(t, 0, 0));
        assert_eq!(
            s.on_run_ended(t, 0, 0, r, Outcome::Unavailable),
            Action::Drop
        );
    }

    #[test]
    fn a_dropped_source_releases_everything_it_had() {
        let t = Instant::now();
        let mut s = schedule(3, &[]);
        s.add_source(0, None);
        s.add_source(1, None);
        for slot in 0..3 {
            s.next(t, 0, slot);
        }
        // Source 1 doubles up on range 0 in the endgame.
        assert_eq!(one(s.next(t, 1, 0)), 0);
        s.remove_source(0);
        assert_eq!(s.fetchers(0), &[1]);
        assert!(s.fetchers(1).is_empty() && s.fetchers(2).is_empty());
        assert_eq!(one(s.next(t, 1, 1)), 1);
        assert_eq!(one(s.next(t, 1, 2)), 2);
    }

    #[test]
    fn finished_exactly_when_every_range_is_verified() {
        let t = Instant::now();
        let mut s = schedule(3, &[1]);
        s.add_source(0, None);
        assert!(!s.is_finished());
        assert!(s.on_verified(0));
        assert!(!s.on_verified(0), "a second copy");
        assert!(!s.on_verified(9), "past the end");
        assert!(!s.is_finished());
        assert_ne!(s.next(t, 0, 0), Action::Finished);
        assert!(s.on_verified(2));
        assert!(s.is_finished());
        assert_eq!(s.next(t, 0, 0), Action::Finished);
        assert_eq!(s.in_flight().count(), 0);
        // Nothing left to fetch from the start: finished at once.
        let mut s = schedule(2, &[0, 1]);
        s.add_source(0, None);
        assert_eq!(s.next(t, 0, 0), Action::Finished);
    }

    #[test]
    fn the_pool_dials_each_address_once_and_few_per_host() {
        let source = |i: u8, addr: &str| Source {
            id: NodeId([i; 32]),
            addr: addr.into(),
            variant: 0,
            via: None,
        };
        let mut pool = SourcePool::default();
        assert!(pool.offer(source(0, "10.0.0.1:1")));
        // Another id at the same address, the same id elsewhere: no.
        assert!(!pool.offer(source(1, "10.0.0.1:1")));
        assert!(!pool.offer(source(0, "10.0.0.2:1")));
        // Many ports of one machine: a few only.
        let taken = (2..100u8)
            .filter(|&i| pool.offer(source(i, &format!("10.0.0.1:{i}"))))
            .count();
        assert_eq!(taken, MAX_DIALS_PER_HOST - 1);
        assert!(pool.offer(source(200, "[2001:db8::1]:7")));
        // No more than MAX_SOURCES_AT_ONCE busy at once.
        assert!(pool.next(MAX_SOURCES_AT_ONCE).is_none());
        let mut n = 0;
        while pool.next(0).is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_DIALS_PER_HOST + 1);
        // Once dialled, never again in this download.
        assert!(!pool.offer(source(0, "10.0.0.1:1")));
        assert!(pool.is_empty());
    }

    /// A step of the property test's downloader.
    #[derive(Debug, Clone)]
    enum Step {
        /// A slot of a source asks what to do (if it is not busy).
        Next(u32, usize),
        /// The oldest request of a source ends so; `verified` of its
        /// ranges verified first.
        End(u32, Outcome, usize),
        /// A source says what it has now.
        Have(u32, Vec<bool>),
        /// A source vanishes.
        Gone(u32),
    }

    const N: usize = 24;
    const SOURCES: u32 = 4;

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let src = 0..SOURCES;
        prop_oneof![
            4 => (src.clone(), 0..PER_SOURCE).prop_map(|(s, k)| Step::Next(s, k)),
            4 => (
                src.clone(),
                prop_oneof![
                    6 => Just(Outcome::Delivered),
                    2 => Just(Outcome::Unavailable),
                    1 => Just(Outcome::Failed)
                ],
                0..MAX_RUN + 1
            )
                .prop_map(|(s, o, v)| Step::End(s, o, v)),
            1 => (src.clone(), proptest::collection::vec(any::<bool>(), N))
                .prop_map(|(s, h)| Step::Have(s, h)),
            1 => src.prop_map(Step::Gone),
        ]
    }

    /// What the scheduler promises, whatever happened.
    fn check(s: &Schedule<u32>, held: &HashMap<(u32, usize), Range<usize>>) {
        for (i, by) in s.in_flight() {
            assert!(!s.is_done(i), "range {i} is done and in flight");
            let unique: HashSet<_> = by.iter().collect();
            assert_eq!(
                unique.len(),
                by.len(),
                "range {i} twice by one source: {by:?}"
            );
        }
        for src in 0..SOURCES {
            let mut seen = HashSet::new();
            for ((s2, _), r) in held.iter().filter(|((s2, _), _)| *s2 == src) {
                for i in r.clone() {
                    assert!(seen.insert(i), "source {s2} holds range {i} twice");
                }
            }
        }
        assert_eq!(s.left(), s.len() - s.done().count());
    }

    proptest::proptest! {
        #[test]
        fn any_events_keep_the_books_and_an_honest_source_finishes(
            resumed in proptest::collection::vec(proptest::prelude::any::<bool>(), N),
            steps in proptest::collection::vec(step(), 0..200),
        ) {
            let t0 = Instant::now();
            let mut done = Bitmap::new(N);
            (0..N).filter(|&i| resumed[i]).for_each(|i| done.set(i));
            let mut s = Schedule::new(done, ScheduleConfig::default());
            // Source 0 is honest and has everything; the others are
            // partial, flaky or vanish.
            s.add_source(0, None);
            for src in 1..SOURCES {
                s.add_source(src, Some(Bitmap::new(N)));
            }
            let mut held: HashMap<(u32, usize), Range<usize>> = HashMap::new();
            for (k, st) in steps.into_iter().enumerate() {
                let now = t0 + Duration::from_millis(k as u64);
                match st {
                    Step::Next(src, slot) if !held.contains_key(&(src, slot)) => {
                        if let Action::Fetch { run, .. } = s.next(now, src, slot) {
                            assert!(run.clone().all(|i| !s.is_done(i)));
                            held.insert((src, slot), run);
                        }
                    }
                    Step::Next(..) => {}
                    Step::End(src, outcome, verified) => {
                        let slot = (0..PER_SOURCE).find(|k| held.contains_key(&(src, *k)));
                        let Some(slot) = slot else { continue };
                        let run = held.remove(&(src, slot)).expect("held");
                        // The honest source never fails.
                        let outcome = if src == 0 { Outcome::Delivered } else { outcome };
                        let upto = match outcome {
                            Outcome::Delivered => run.end,
                            _ => (run.start + verified).min(run.end),
                        };
                        for i in run.start..upto {
                            s.on_verified(i);
                        }
                        match s.on_run_ended(now, src, slot, run, outcome) {
                            Action::Fetch { run, .. } => {
                                held.insert((src, slot), run);
                            }
                            Action::Drop => held.retain(|(s2, _), _| *s2 != src),
                            _ => {}
                        }
                    }
                    Step::Have(src, has) if src != 0 => {
                        let mut b = Bitmap::new(N);
                        (0..N).filter(|&i| has[i]).for_each(|i| b.set(i));
                        s.on_have(src, Some(b));
                    }
                    Step::Have(..) => {}
                    Step::Gone(src) if src != 0 => {
                        s.remove_source(src);
                        held.retain(|(s2, _), _| *s2 != src);
                    }
                    Step::Gone(_) => {}
                }
                check(&s, &held);
            }
            // The others go; the honest source alone finishes the file.
            for src in 1..SOURCES {
                s.remove_source(src);
            }
            held.retain(|(src, _), _| *src == 0);
            let t = t0 + Duration::from_secs(1);
            for _ in 0..=N * PER_SOURCE * 2 {
                if s.is_finished() {
                    break;
                }
                for slot in 0..PER_SOURCE {
                    let next = match held.remove(&(0, slot)) {
                        Some(run) => {
                            run.clone().for_each(|i| {
                                s.on_verified(i);
                            });
                            s.on_run_ended(t, 0, slot, run, Outcome::Delivered)
                        }
                        None => s.next(t, 0, slot),
                    };
                    if let Action::Fetch { run, .. } = next {
                        held.insert((0, slot), run);
                    }
                    check(&s, &held);
                }
            }
            proptest::prop_assert!(s.is_finished(), "left {}", s.left());
            proptest::prop_assert_eq!(s.in_flight().count(), 0);
            proptest::prop_assert_eq!(s.next(t, 0, 0), Action::Finished);
        }
    }
}
