//! The random draws of a simulated network, all from one seeded generator
//! (or, for link latencies, from a hash of the seed and the two ends, so
//! that a link has one RTT however often it is asked for).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn rng(seed: u64, stream: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A standard normal draw (Box–Muller) from two uniforms in (0, 1].
fn normal_from(u1: f64, u2: f64) -> f64 {
    (-2.0 * u1.max(f64::MIN_POSITIVE).ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A log-normal draw with the given median and shape (sigma of the log):
/// most values near the median, a long tail above it, as measured for
/// peer-to-peer session lengths and Internet round trips.
pub fn lognormal(rng: &mut impl Rng, median: f64, sigma: f64) -> f64 {
    let (u1, u2): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
    median * (sigma * normal_from(u1, u2)).exp()
}

/// An exponential draw with the given mean (gaps of a Poisson process).
pub fn exponential(rng: &mut impl Rng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).max(f64::MIN_POSITIVE).ln()
}

/// Ranks 0..n drawn with probability proportional to 1 / (rank + 1)^s.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n.max(1));
        let mut sum = 0.0;
        for k in 0..n.max(1) {
            sum += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(sum);
        }
        for c in &mut cdf {
            *c /= sum;
        }
        Self { cdf }
    }

    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.random();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// Round-trip times between nodes: each node has an access delay, drawn
/// log-normal around half the median RTT and fixed for the whole run, and
/// a link's RTT is the sum of its two ends' (a node on a slow line is slow
/// to everyone, as on the Internet).
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub seed: u64,
    pub median_ms: f64,
    pub sigma: f64,
    /// Least RTT of any link, ms.
    pub floor_ms: f64,
}

impl Latency {
    /// Node `key`'s share of every RTT it has, in microseconds.
    pub fn access_us(&self, key: u64) -> u32 {
        let bits = splitmix64(self.seed ^ splitmix64(key));
        let u1 = ((bits >> 32) as f64 + 1.0) / 4_294_967_296.0;
        let u2 = (bits & 0xffff_ffff) as f64 / 4_294_967_296.0;
        let ms = self.median_ms / 2.0 * (self.sigma * normal_from(u1, u2)).exp();
        (ms.max(self.floor_ms / 2.0) * 1000.0).min(u32::MAX as f64) as u32
    }

    /// The RTT between `a` and `b`, microseconds.
    pub fn rtt_us(&self, a: u64, b: u64) -> u64 {
        u64::from(self.access_us(a)) + u64::from(self.access_us(b))
    }
}

/// A hasher for the simulator's maps: deterministic (no random keys) and
/// fast on the small integer keys they have. Not for anything an attacker
/// chooses keys of.
#[derive(Debug, Default, Clone, Copy)]
pub struct MixHasher(u64);

impl std::hash::Hasher for MixHasher {
    fn finish(&self) -> u64 {
        splitmix64(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = splitmix64(self.0 ^ n);
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n.into());
    }
}

/// A fast, well-mixed 64-bit hash (Steele, Lea and Flood's SplitMix64).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_low_ranks_and_stays_in_range() {
        let z = Zipf::new(1000, 1.0);
        let mut r = rng(7, 0);
        let draws: Vec<usize> = (0..10_000).map(|_| z.sample(&mut r)).collect();
        assert!(draws.iter().all(|&d| d < 1000));
        let top = draws.iter().filter(|&&d| d < 10).count();
        assert!(top > 3000, "top 10 of 1000 drew {top} of 10 000");
    }

    #[test]
    fn a_link_keeps_its_rtt_and_the_median_is_near_the_asked_one() {
        let l = Latency {
            seed: 3,
            median_ms: 60.0,
            sigma: 0.5,
            floor_ms: 2.0,
        };
        assert_eq!(l.rtt_us(1, 2), l.rtt_us(2, 1));
        let mut rtts: Vec<u64> = (0..2000).map(|i| l.rtt_us(i, i + 10_000)).collect();
        rtts.sort_unstable();
        // The sum of two log-normal halves has its median a little above.
        let median = rtts[1000] as f64 / 1000.0;
        assert!((55.0..80.0).contains(&median), "median {median} ms");
    }

    #[test]
    fn lognormal_median_is_near_the_asked_one() {
        let mut r = rng(1, 1);
        let mut v: Vec<f64> = (0..4001).map(|_| lognormal(&mut r, 20.0, 1.5)).collect();
        v.sort_by(f64::total_cmp);
        assert!((17.0..23.0).contains(&v[2000]), "median {}", v[2000]);
    }
}
