//! What the property tests of routing share: random meshes.

use std::collections::{HashSet, VecDeque};

use proptest::prelude::*;

/// A random connected graph of 2 to `max_nodes − 1` nodes: a random
/// spanning tree plus up to `max_extra − 1` extra edges a node.
pub fn graph(max_nodes: usize, max_extra: usize) -> impl Strategy<Value = Vec<Vec<usize>>> {
    (2usize..max_nodes, 0usize..max_extra, any::<u64>()).prop_map(|(n, extra_per_node, seed)| {
        let mut rng = seed | 1;
        let mut next = move |m: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % m as u64) as usize
        };
        let mut adj: Vec<HashSet<usize>> = vec![HashSet::new(); n];
        for v in 1..n {
            let u = next(v);
            adj[u].insert(v);
            adj[v].insert(u);
        }
        for _ in 0..n * extra_per_node {
            let (a, b) = (next(n), next(n));
            if a != b {
                adj[a].insert(b);
                adj[b].insert(a);
            }
        }
        adj.into_iter()
            .map(|s| {
                let mut v: Vec<usize> = s.into_iter().collect();
                v.sort();
                v
            })
            .collect()
    })
}

/// Hops from `from` to every node of `adj` (`usize::MAX`: not reached).
pub fn distances(adj: &[Vec<usize>], from: usize) -> Vec<usize> {
    let mut d = vec![usize::MAX; adj.len()];
    d[from] = 0;
    let mut q = VecDeque::from([from]);
    while let Some(u) = q.pop_front() {
        for &v in &adj[u] {
            if d[v] == usize::MAX {
                d[v] = d[u] + 1;
                q.push_back(v);
            }
        }
    }
    d
}
