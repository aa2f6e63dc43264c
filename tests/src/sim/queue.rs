//! The simulator's clock and event queue: virtual microseconds, events in
//! time order and, at one time, in the order they were scheduled, so that
//! a run depends on nothing but its seed and its scenario.
//!
//! A calendar queue: the next [`SLOTS`] milliseconds each have a bucket,
//! filled as events are scheduled and sorted only when the clock reaches
//! them, so that scheduling costs a push and the order is settled among
//! the few hundred events of one millisecond instead of across the whole
//! queue (at 100 000 leaves a binary heap over all of it was a third of
//! the run). Events further ahead wait in a heap until their millisecond
//! comes.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// Virtual time, in microseconds since the start of the run.
pub type Micros = u64;

pub fn micros(d: Duration) -> Micros {
    d.as_micros().min(u64::MAX as u128) as u64
}

/// Width of one bucket.
const BUCKET: Micros = 1_000;
/// Buckets ahead of the clock: 65.5 s, longer than most timers.
const SLOTS: u64 = 1 << 16;
/// Events a bucket keeps room for between turns.
const KEPT_CAPACITY: usize = 64;

struct Entry<E> {
    at: Micros,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        // BinaryHeap is a max-heap: the earliest entry must compare greatest.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Events waiting for their time, and the time now.
pub struct Queue<E> {
    /// The events of bucket `cursor` and earlier, in order.
    current: BinaryHeap<Entry<E>>,
    /// Bucket `b` (for `cursor < b < cursor + SLOTS`) at `b % SLOTS`.
    wheel: Vec<Vec<Entry<E>>>,
    /// Events in `wheel`.
    in_wheel: usize,
    /// Events at `cursor + SLOTS` buckets or later.
    far: BinaryHeap<Entry<E>>,
    /// The bucket whose events are in `current`.
    cursor: u64,
    seq: u64,
    now: Micros,
    /// The `Instant` that virtual time 0 stands for: the cores take
    /// `Instant`s, and only differences between them mean anything.
    base: Instant,
    processed: u64,
}

impl<E> Queue<E> {
    pub fn new(base: Instant) -> Self {
        Self {
            current: BinaryHeap::new(),
            wheel: (0..SLOTS).map(|_| Vec::new()).collect(),
            in_wheel: 0,
            far: BinaryHeap::new(),
            cursor: 0,
            seq: 0,
            now: 0,
            base,
            processed: 0,
        }
    }

    pub fn now(&self) -> Micros {
        self.now
    }

    /// The time now as the cores see it.
    pub fn instant(&self) -> Instant {
        self.base + Duration::from_micros(self.now)
    }

    /// The virtual time an `Instant` from a core stands for.
    pub fn from_instant(&self, at: Instant) -> Micros {
        micros(at.saturating_duration_since(self.base))
    }

    pub fn at(&mut self, at: Micros, event: E) {
        let at = at.max(self.now);
        self.seq += 1;
        let entry = Entry {
            at,
            seq: self.seq,
            event,
        };
        let bucket = at / BUCKET;
        if bucket <= self.cursor {
            self.current.push(entry);
        } else if bucket < self.cursor + SLOTS {
            self.wheel[(bucket % SLOTS) as usize].push(entry);
            self.in_wheel += 1;
        } else {
            self.far.push(entry);
        }
    }

    pub fn after(&mut self, delay: Micros, event: E) {
        self.at(self.now.saturating_add(delay), event);
    }

    /// Schedules `event` at the virtual time of `at` (at the earliest the
    /// next microsecond) unless `pending` names an earlier wake still to
    /// come, and records it in `pending`: the timer of a core's
    /// `poll_timeout`, where a wake made stale by a newer one finds
    /// nothing due.
    pub fn arm(&mut self, pending: &mut Option<Micros>, at: Instant, event: E) {
        let t = self.from_instant(at).max(self.now + 1);
        if pending.is_none_or(|w| w > t || w < self.now) {
            *pending = Some(t);
            self.at(t, event);
        }
    }

    /// Moves the cursor to the next bucket that holds anything, loading
    /// its events into `current`. False when nothing is queued.
    fn advance(&mut self) -> bool {
        while self.current.is_empty() {
            if self.in_wheel == 0 {
                // Only far events are left: jump to the first of them.
                let Some(first) = self.far.peek() else {
                    return false;
                };
                self.cursor = self.cursor.max(first.at / BUCKET - 1);
            }
            self.cursor += 1;
            let slot = &mut self.wheel[(self.cursor % SLOTS) as usize];
            if !slot.is_empty() {
                self.in_wheel -= slot.len();
                let mut events = std::mem::take(slot);
                self.current.extend(events.drain(..));
                // Keep a bucket's allocation for its next turn, unless a
                // burst made it large: 65 536 buckets each holding their
                // busiest millisecond's room would be gigabytes.
                if events.capacity() <= KEPT_CAPACITY {
                    *slot = events;
                }
            }
            while self
                .far
                .peek()
                .is_some_and(|e| e.at / BUCKET <= self.cursor)
            {
                let e = self.far.pop().expect("peeked");
                self.current.push(e);
            }
        }
        true
    }

    /// The next event, unless it is later than `until`.
    pub fn pop(&mut self, until: Micros) -> Option<E> {
        if !self.advance() || self.current.peek()?.at > until {
            return None;
        }
        let e = self.current.pop()?;
        self.now = e.at;
        self.processed += 1;
        Some(e.event)
    }

    pub fn processed(&self) -> u64 {
        self.processed
    }

    pub fn len(&self) -> usize {
        self.current.len() + self.in_wheel + self.far.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_in_time_order_then_in_scheduling_order() {
        let mut q = Queue::new(Instant::now());
        q.at(20, "c");
        q.at(10, "a");
        q.at(10, "b");
        assert_eq!(q.pop(100), Some("a"));
        assert_eq!(q.pop(100), Some("b"));
        assert_eq!(q.now(), 10);
        assert_eq!(q.pop(15), None);
        assert_eq!(q.pop(100), Some("c"));
        assert_eq!(q.pop(100), None);
    }

    /// The calendar gives exactly a binary heap's order, whatever the mix
    /// of near, far and same-time events, and events scheduled while
    /// others are taken.
    #[test]
    fn same_order_as_one_heap() {
        let mut q = Queue::new(Instant::now());
        let mut reference = BinaryHeap::new();
        let mut seq = 0u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut got = Vec::new();
        let mut want = Vec::new();
        for round in 0..20_000u64 {
            let n = next() % 3;
            for _ in 0..n {
                let delay = match next() % 4 {
                    0 => 0,
                    1 => next() % 2_000,
                    2 => next() % 5_000_000,
                    _ => next() % 200_000_000,
                };
                let at = q.now() + delay;
                q.at(at, round);
                seq += 1;
                reference.push(Entry {
                    at,
                    seq,
                    event: round,
                });
            }
            if let Some(e) = q.pop(u64::MAX) {
                got.push((q.now(), e));
                let r = reference.pop().expect("same length");
                want.push((r.at, r.event));
            }
        }
        while let Some(e) = q.pop(u64::MAX) {
            got.push((q.now(), e));
            let r = reference.pop().expect("same length");
            want.push((r.at, r.event));
        }
        assert!(reference.is_empty() && q.is_empty());
        assert_eq!(got, want);
    }
}
