//! The simulator's clock and event queue: virtual microseconds, events in
//! time order and, at one time, in the order they were scheduled, so that
//! a run depends on nothing but its seed and its scenario.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// Virtual time, in microseconds since the start of the run.
pub type Micros = u64;

pub fn micros(d: Duration) -> Micros {
    d.as_micros().min(u64::MAX as u128) as u64
}

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
    heap: BinaryHeap<Entry<E>>,
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
            heap: BinaryHeap::new(),
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
        self.heap.push(Entry {
            at,
            seq: self.seq,
            event,
        });
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

    /// The next event, unless it is later than `until`.
    pub fn pop(&mut self, until: Micros) -> Option<E> {
        if self.heap.peek()?.at > until {
            return None;
        }
        let e = self.heap.pop()?;
        self.now = e.at;
        self.processed += 1;
        Some(e.event)
    }

    pub fn processed(&self) -> u64 {
        self.processed
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
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
}
