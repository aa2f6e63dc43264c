//! What a query costs, in the tokens of the query rate limits.
//!
//! Limits that count queries let one node send its whole allowance of the
//! broadest queries there are: a word in every name makes each query walk
//! the whole index. So the index stops after [`MAX_EXAMINED`] candidates,
//! and a query is charged for the work it did: one token to be asked at
//! all, one more for every [`EXAMINED_PER_TOKEN`] candidates examined and
//! for every [`RESULTS_PER_TOKEN`] hits returned. A narrow query costs 1;
//! the broadest possible one costs 1 + 10 + 5 = 16, so a node's allowance
//! buys sixteen times fewer of them, and the CPU they take is bounded by
//! the allowance, not by the index's size.

/// Candidates one query may examine in one index (the entries of its
/// rarest word, each checked against its other words).
pub const MAX_EXAMINED: usize = 10_000;
/// Candidates examined per token charged.
pub const EXAMINED_PER_TOKEN: usize = 1_000;
/// Hits returned per token charged.
pub const RESULTS_PER_TOKEN: usize = 100;

/// Tokens a query costs that examined `examined` candidates and returned
/// `results` hits: at least 1.
pub fn query_cost(examined: usize, results: usize) -> f64 {
    1.0 + (examined / EXAMINED_PER_TOKEN) as f64 + (results / RESULTS_PER_TOKEN) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_queries_cost_one_and_the_broadest_sixteen() {
        assert_eq!(query_cost(0, 0), 1.0);
        assert_eq!(query_cost(999, 99), 1.0);
        assert_eq!(
            query_cost(MAX_EXAMINED, crate::limits::MAX_RESULTS as usize),
            16.0
        );
    }
}
