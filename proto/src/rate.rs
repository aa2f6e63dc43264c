//! A token bucket: the pure decision behind every rate limit. The caller
//! passes the time, so tests need no clock.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// Starts full: `burst` requests at once, then `rate_per_sec` sustained.
    pub fn new(rate_per_sec: f64, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate_per_sec,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Whether the bucket would be full again at `now`: forgetting it then
    /// changes nothing.
    pub fn is_full_at(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.tokens + elapsed.as_secs_f64() * self.rate_per_sec >= self.burst
    }

    /// Whether [`TokenBucket::try_take`] would succeed at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        (self.tokens + elapsed.as_secs_f64() * self.rate_per_sec).min(self.burst) >= 1.0
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate_per_sec).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens at once, going into debt if there are not enough,
    /// and says how long the caller must wait before acting so that the
    /// rate holds: the time to pay back the debt. Callers that take in
    /// turn (a fair queue) share the rate fairly.
    pub fn take_many(&mut self, n: f64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate_per_sec).min(self.burst);
        self.tokens -= n;
        if self.tokens >= 0.0 || self.rate_per_sec <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate_per_sec)
        }
    }

    /// How long until a token is available.
    pub fn wait_time(&self) -> Duration {
        if self.tokens >= 1.0 || self.rate_per_sec <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((1.0 - self.tokens) / self.rate_per_sec)
    }
}

/// `key`'s bucket in `map`, made full if new. At `max` buckets, a new
/// key first makes the map forget the full ones (forgetting a full bucket
/// changes nothing), and, if every one is busy (a flood of keys), all of
/// them rather than grow.
pub fn bucket_in<K: std::hash::Hash + Eq>(
    map: &mut std::collections::HashMap<K, TokenBucket>,
    key: K,
    rate: f64,
    burst: u32,
    now: Instant,
    max: usize,
) -> &mut TokenBucket {
    if map.len() >= max && !map.contains_key(&key) {
        map.retain(|_, b| !b.is_full_at(now));
        if map.len() >= max {
            map.clear();
        }
    }
    map.entry(key)
        .or_insert_with(|| TokenBucket::new(rate, burst, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_sustained_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 3, t0);
        assert!(b.try_take(t0) && b.try_take(t0) && b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(!b.try_take(t0 + Duration::from_millis(400)));
        assert!(b.try_take(t0 + Duration::from_millis(600)));
        // Long idleness refills only up to the burst.
        let later = t0 + Duration::from_secs(100);
        assert!((0..3).all(|_| b.try_take(later)));
        assert!(!b.try_take(later));
    }

    #[test]
    fn taking_many_goes_into_debt_and_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 1000, t0);
        assert_eq!(b.take_many(600.0, t0), Duration::ZERO);
        // 400 left; 1000 more is 600 of debt: 0.6 s at 1000/s.
        let wait = b.take_many(1000.0, t0);
        assert!((wait.as_secs_f64() - 0.6).abs() < 1e-9, "{wait:?}");
        // Once the debt is paid, the next taker waits only for its own.
        let wait = b.take_many(500.0, t0 + Duration::from_millis(600));
        assert!((wait.as_secs_f64() - 0.5).abs() < 1e-9, "{wait:?}");
    }
}
