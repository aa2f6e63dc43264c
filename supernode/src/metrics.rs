//! Counters a supernode keeps about itself, for `/metrics` and tests.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Metrics {
    /// Queries from our own leaves.
    pub leaf_queries: AtomicU64,
    /// Queries that arrived from mesh neighbours (duplicates included).
    pub mesh_queries: AtomicU64,
    /// Queries processed: answered from the index (each id once).
    pub queries_processed: AtomicU64,
    /// Query messages sent to neighbours.
    pub queries_forwarded: AtomicU64,
    /// Mesh queries dropped because their id had been seen.
    pub queries_duplicate: AtomicU64,
    /// Mesh queries seen before but forwarded again, farther (not answered again).
    pub queries_extended: AtomicU64,
    /// Queries refused by a rate limit (leaf or mesh).
    pub queries_rate_limited: AtomicU64,
    /// Hits sent back (to leaves and to neighbours).
    pub hits_returned: AtomicU64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
