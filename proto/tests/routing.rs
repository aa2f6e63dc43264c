//! Property tests of query routing on random meshes of up to 300
//! supernodes: each runs the real routing decisions of `servent_proto::route`,
//! and messages are delivered in order, one hop at a time.

mod common;

use std::collections::VecDeque;
use std::time::Instant;

use proptest::prelude::*;
use servent_proto::route::{on_query, QueryAction, Seen};

fn graph() -> impl Strategy<Value = Vec<Vec<usize>>> {
    common::graph(300, 4)
}

struct Outcome {
    processed: Vec<usize>,
    messages: usize,
}

/// Floods one query from `origin` with `ttl`, as every supernode would,
/// delivering messages in hop order (`shuffle: None`) or in an order
/// scrambled by the seed (copies overtaking each other).
fn flood(adj: &[Vec<usize>], origin: usize, ttl: u8, id: u64, shuffle: Option<u64>) -> Outcome {
    let now = Instant::now();
    let mut seen: Vec<Seen> = adj.iter().map(|_| Seen::default()).collect();
    let mut processed = vec![0usize; adj.len()];
    let mut messages = 0;
    let mut queue = VecDeque::new();
    if let QueryAction::Process { forward, ttl } =
        on_query(&mut seen[origin], now, id, ttl, None, || {
            adj[origin].clone()
        })
    {
        processed[origin] += 1;
        for to in forward {
            queue.push_back((origin, to, ttl));
        }
    }
    let mut rng = shuffle.unwrap_or(0) | 1;
    loop {
        let next = match shuffle {
            None => queue.pop_front(),
            Some(_) if queue.is_empty() => None,
            Some(_) => {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng % queue.len() as u64) as usize;
                queue.swap_remove_back(i)
            }
        };
        let Some((from, at, ttl)) = next else { break };
        messages += 1;
        match on_query(&mut seen[at], now, id, ttl, Some(&from), || adj[at].clone()) {
            QueryAction::Duplicate => {}
            QueryAction::Process { forward, ttl } => {
                processed[at] += 1;
                for to in forward {
                    queue.push_back((at, to, ttl));
                }
            }
            QueryAction::Extend { forward, ttl } => {
                for to in forward {
                    queue.push_back((at, to, ttl));
                }
            }
        }
    }
    Outcome {
        processed,
        messages,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn flooding_reaches_exactly_the_ttl_ball_once_each(adj in graph(), origin_seed in any::<usize>(), ttl in 1u8..7, id in any::<u64>()) {
        let origin = origin_seed % adj.len();
        let out = flood(&adj, origin, ttl, id, None);
        let dist = common::distances(&adj, origin);
        let links: usize = adj.iter().map(Vec::len).sum::<usize>() / 2;
        for (v, &times) in out.processed.iter().enumerate() {
            let msg = format!("supernode {v} at distance {} with ttl {ttl} processed it {times} times", dist[v]);
            prop_assert!(times <= 1, "{}", msg);
            let within = dist[v] <= ttl as usize;
            prop_assert_eq!(times == 1, within, "{}", msg);
        }
        let msg = format!("{} messages on {links} links", out.messages);
        prop_assert!(out.messages <= 2 * links, "{}", msg);
    }

    #[test]
    fn in_any_delivery_order_the_whole_ttl_ball_is_reached_and_answered_once(
        adj in graph(), origin_seed in any::<usize>(), ttl in 1u8..7, id in any::<u64>(), order in any::<u64>()
    ) {
        let origin = origin_seed % adj.len();
        let out = flood(&adj, origin, ttl, id, Some(order));
        let dist = common::distances(&adj, origin);
        let links: usize = adj.iter().map(Vec::len).sum::<usize>() / 2;
        for (v, &times) in out.processed.iter().enumerate() {
            let msg = format!("supernode {v} at distance {} with ttl {ttl} processed it {times} times", dist[v]);
            prop_assert_eq!(times == 1, dist[v] <= ttl as usize, "{}", msg);
            prop_assert!(times <= 1, "{}", msg);
        }
        // Extensions are bounded: at most one per TTL level on each link direction.
        let msg = format!("{} messages on {links} links", out.messages);
        prop_assert!(out.messages <= 2 * links * ttl as usize, "{}", msg);
    }

    #[test]
    fn a_second_copy_of_a_query_is_never_processed(adj in graph(), id in any::<u64>(), ttls in proptest::collection::vec(0u8..10, 1..20)) {
        let now = Instant::now();
        let mut seen = Seen::default();
        let first = on_query(&mut seen, now, id, 3, Some(&adj[0].first().copied().unwrap_or(1)), || adj[0].clone());
        let processed = matches!(first, QueryAction::Process { .. });
        prop_assert!(processed);
        let mut best = 3;
        for (i, ttl) in ttls.into_iter().enumerate() {
            let from = adj[0][i % adj[0].len()];
            let action = on_query(&mut seen, now, id, ttl, Some(&from), || adj[0].clone());
            let again = matches!(action, QueryAction::Process { .. });
            prop_assert!(!again, "answered twice");
            let extended = matches!(action, QueryAction::Extend { .. });
            let farther = ttl.min(7) > best && ttl.min(7) > 1;
            prop_assert_eq!(extended, farther, "ttl {} after best {}", ttl, best);
            best = best.max(ttl.min(7));
        }
    }
}
