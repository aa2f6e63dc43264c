//! Whole queries through a simulated mesh: every supernode runs the real
//! hop state machine (`servent_proto::hop`), messages take a per-link
//! latency on a virtual clock, and each node holds one file of its own
//! (or, for walks, only the nodes named hold one, and their keyword
//! filters say so). This is how a simulator drives the core, in miniature.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use servent_proto::filter::{Filter, LocalFilter, WordKey};
use servent_proto::hits::HitBuilder;
use servent_proto::hop::{Action, Arrival, HopConfig, HopNode, HopQuery, LeafQuery, Local};
use servent_proto::msg::{Hit, MeshQuery, NameVariant, Query, QueryKind};
use servent_proto::walk::{CopyKind, View, WalkConfig};
use servent_proto::{ContentHash, NodeId};

const MS: Duration = Duration::from_millis(1);
const SEARCH_TIME: Duration = Duration::from_secs(3);

/// The one file node `v` holds.
fn file(v: usize) -> Hit {
    let mut b = HitBuilder::new(ContentHash([v as u8; 32]));
    let variant = NameVariant {
        name: format!("blue moon {v}.mp3"),
        size: 1000 + v as u64,
    };
    b.add(NodeId([v as u8; 32]), format!("10.{v}.0.1:7401"), &variant);
    b.finish().expect("a source")
}

enum Ev {
    /// A copy of the query reaches `to` on a stream `parent` opened.
    Arrive {
        to: usize,
        from: usize,
        mq: MeshQuery,
        kind: CopyKind,
        parent: usize,
    },
    Hits {
        inst: usize,
        from: usize,
        hits: Vec<Hit>,
    },
    Ended {
        inst: usize,
        from: usize,
    },
    Timer {
        inst: usize,
    },
}

/// One query at one node.
struct Inst {
    node: usize,
    q: HopQuery<usize>,
    /// The instance whose stream this copy came on (none at the origin).
    parent: Option<usize>,
    /// The parent cancelled this copy: what it sends goes nowhere.
    cancelled: bool,
    timer: Option<Instant>,
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    /// Files the origin's leaf was sent, and when each first came.
    found: BTreeMap<usize, Duration>,
    /// When the origin finished the leaf's stream.
    finished: Option<Duration>,
    /// Query messages sent over the mesh.
    messages: usize,
    /// How often each node answered from its index.
    answered: Vec<usize>,
    /// Walker copies and probes sent (walks only).
    walker_copies: usize,
    probes: usize,
}

struct Sim<'a> {
    adj: &'a [Vec<usize>],
    /// Which nodes hold a file (all, for floods).
    holds: Vec<bool>,
    /// Each node's keyword filter (walks only).
    filters: Vec<Filter>,
    walk: Option<WalkConfig>,
    seed: u64,
    t0: Instant,
    nodes: Vec<HopNode<usize>>,
    insts: Vec<Inst>,
    children: HashMap<(usize, usize), usize>,
    queue: BTreeMap<(Duration, u64), Ev>,
    seq: u64,
    out: Outcome,
}

impl Sim<'_> {
    /// One-way latency of the link between `a` and `b`: 5 to 49 ms.
    fn latency(&self, a: usize, b: usize) -> Duration {
        let (a, b) = (a.min(b) as u64, a.max(b) as u64);
        let mut x = self.seed ^ (a << 32 | b);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        MS * (5 + (x % 45) as u32)
    }

    fn at(&mut self, when: Instant, ev: Ev) {
        self.seq += 1;
        self.queue
            .insert((when.duration_since(self.t0), self.seq), ev);
    }

    fn local(&mut self, node: usize, q: &HopQuery<usize>) -> Local {
        if q.lookup().is_none() {
            return Local::default();
        }
        self.out.answered[node] += 1;
        if !self.holds[node] {
            return Local::default();
        }
        Local {
            hits: vec![file(node)],
            examined: 1,
            found: 1,
        }
    }

    /// What a walker sees at `node`.
    fn view(&self, node: usize, keys: &[WordKey]) -> View<usize> {
        let neighbours = self.adj[node].clone();
        let matching = neighbours
            .iter()
            .copied()
            .filter(|&n| self.filters[n].may_match(keys))
            .collect();
        View {
            neighbours,
            matching,
        }
    }

    fn spawn(&mut self, now: Instant, node: usize, mut q: HopQuery<usize>, parent: Option<usize>) {
        let local = self.local(node, &q);
        self.nodes[node].handle_local(now, &mut q, local);
        self.insts.push(Inst {
            node,
            q,
            parent,
            cancelled: false,
            timer: None,
        });
        self.act(now, self.insts.len() - 1);
    }

    /// Carries out what instance `i` asks for, and sets its timer.
    fn act(&mut self, now: Instant, i: usize) {
        let node = self.insts[i].node;
        let parent = self.insts[i].parent;
        let to_parent = parent.filter(|_| !self.insts[i].cancelled);
        while let Some(a) = self.insts[i].q.poll_action() {
            match a {
                Action::Forward { to, copy, budget } => {
                    self.out.messages += 1;
                    let ttl = match copy {
                        CopyKind::Flood { ttl } => ttl,
                        CopyKind::Walk { steps, .. } => {
                            self.out.walker_copies += 1;
                            steps
                        }
                        CopyKind::Probe => {
                            self.out.probes += 1;
                            0
                        }
                    };
                    let mq = MeshQuery {
                        id: self.insts[i].q.id(),
                        ttl,
                        timeout_ms: budget.as_millis() as u32,
                        query: query(),
                    };
                    let when = now + self.latency(node, to);
                    self.at(
                        when,
                        Ev::Arrive {
                            to,
                            from: node,
                            mq,
                            kind: copy,
                            parent: i,
                        },
                    );
                }
                Action::SendHits { hits } => match (parent, to_parent) {
                    (None, _) => {
                        for h in hits {
                            let v = h.hash.0[0] as usize;
                            self.out.found.entry(v).or_insert(now - self.t0);
                        }
                    }
                    (Some(_), Some(p)) => {
                        let when = now + self.latency(node, self.insts[p].node);
                        self.at(
                            when,
                            Ev::Hits {
                                inst: p,
                                from: node,
                                hits,
                            },
                        );
                    }
                    (Some(_), None) => {}
                },
                Action::Charge { tokens } => {
                    if let Some(p) = parent {
                        let from = self.insts[p].node;
                        self.nodes[node].charge(now, &from, tokens);
                    }
                }
                Action::Cancel { neighbour } => {
                    if let Some(&c) = self.children.get(&(i, neighbour)) {
                        self.insts[c].cancelled = true;
                    }
                }
                Action::Finish => match (parent, to_parent) {
                    (None, _) => self.out.finished = Some(now - self.t0),
                    (Some(_), Some(p)) => {
                        let when = now + self.latency(node, self.insts[p].node);
                        self.at(
                            when,
                            Ev::Ended {
                                inst: p,
                                from: node,
                            },
                        );
                    }
                    (Some(_), None) => {}
                },
                Action::NotForwarded { .. } => {}
            }
        }
        let next = self.insts[i].q.poll_timeout();
        if let Some(t) = next.filter(|_| next != self.insts[i].timer) {
            self.insts[i].timer = next;
            self.at(t, Ev::Timer { inst: i });
        }
    }

    fn run(&mut self) {
        while let Some(((offset, _), ev)) = self.queue.pop_first() {
            let now = self.t0 + offset;
            let i = match ev {
                Ev::Arrive {
                    to,
                    from,
                    mq,
                    kind,
                    parent,
                } => {
                    let adj = self.adj;
                    let arrival = match (self.walk, kind) {
                        (Some(walk), CopyKind::Walk { .. } | CopyKind::Probe) => {
                            let view = self.view(to, &servent_proto::walk::keys(&lookup()));
                            self.nodes[to].from_neighbour_walked(
                                &walk,
                                now,
                                from,
                                &mq,
                                kind,
                                |_| view,
                            )
                        }
                        _ => self.nodes[to].from_neighbour(now, from, &mq, || adj[to].clone()),
                    };
                    match arrival {
                        Arrival::Accepted(q) => {
                            self.children.insert((parent, to), self.insts.len());
                            self.spawn(now, to, *q, Some(parent));
                        }
                        // A duplicate: FIN and no frame.
                        _ => {
                            let when = now + self.latency(to, from);
                            self.at(
                                when,
                                Ev::Ended {
                                    inst: parent,
                                    from: to,
                                },
                            );
                        }
                    }
                    continue;
                }
                Ev::Hits { inst, from, hits } => {
                    self.insts[inst].q.handle_hits(now, &from, hits);
                    inst
                }
                Ev::Ended { inst, from } => {
                    self.insts[inst].q.handle_ended(now, &from);
                    inst
                }
                Ev::Timer { inst } => {
                    if self.insts[inst].timer != Some(now) {
                        continue;
                    }
                    self.insts[inst].timer = None;
                    let node = self.insts[inst].node;
                    self.nodes[node].handle_timeout(now, &mut self.insts[inst].q);
                    inst
                }
            };
            self.act(now, i);
        }
    }
}

fn query() -> Query {
    Query {
        kind: QueryKind::Keywords(vec!["blue".into(), "moon".into()]),
        max_results: 500,
    }
}

fn lookup() -> servent_proto::hop::Lookup {
    servent_proto::hop::check(&query()).expect("a valid query")
}

/// Runs one query of a leaf of node 0 with `ttl` and `wanted` results.
fn search(adj: &[Vec<usize>], seed: u64, ttl: u8, wanted: u32) -> Outcome {
    run_search(adj, seed, ttl, wanted, None, &vec![true; adj.len()])
}

/// Runs one query of a leaf of node 0, walked with `walk`, for the file
/// that only the nodes in `holders` hold.
fn walk_search(
    adj: &[Vec<usize>],
    seed: u64,
    walk: WalkConfig,
    wanted: u32,
    holders: &[usize],
) -> Outcome {
    let holds: Vec<bool> = (0..adj.len()).map(|v| holders.contains(&v)).collect();
    run_search(adj, seed, 0, wanted, Some(walk), &holds)
}

fn run_search(
    adj: &[Vec<usize>],
    seed: u64,
    ttl: u8,
    wanted: u32,
    walk: Option<WalkConfig>,
    holds: &[bool],
) -> Outcome {
    let t0 = Instant::now();
    let filters = holds
        .iter()
        .map(|&h| {
            let mut f = LocalFilter::default();
            if h {
                for w in ["blue", "moon", "mp3"] {
                    f.add(WordKey::of(w));
                }
            }
            f.filter().clone()
        })
        .collect();
    let mut sim = Sim {
        adj,
        holds: holds.to_vec(),
        filters,
        walk,
        seed,
        t0,
        nodes: (0..adj.len())
            .map(|v| {
                let mut n = HopNode::new(HopConfig::default(), 200.0, 400);
                n.seed(seed ^ v as u64);
                n
            })
            .collect(),
        insts: Vec::new(),
        children: HashMap::new(),
        queue: BTreeMap::new(),
        seq: 0,
        out: Outcome {
            found: BTreeMap::new(),
            finished: None,
            messages: 0,
            answered: vec![0; adj.len()],
            walker_copies: 0,
            probes: 0,
        },
    };
    let q = Query {
        max_results: wanted,
        ..query()
    };
    let ask = LeafQuery {
        leaf: usize::MAX,
        id: seed,
        query: &q,
        ttl,
        search_time: SEARCH_TIME,
    };
    let arrival = match walk {
        Some(walk) => {
            let view = sim.view(0, &servent_proto::walk::keys(&lookup()));
            sim.nodes[0].from_leaf_walked(&walk, t0, ask, |_| view)
        }
        None => sim.nodes[0].from_leaf(t0, ask, || adj[0].clone()),
    };
    let Arrival::Accepted(root) = arrival else {
        panic!("a leaf's valid query is accepted");
    };
    sim.spawn(t0, 0, *root, None);
    sim.run();
    sim.out
}

fn line(n: usize) -> Vec<Vec<usize>> {
    (0..n)
        .map(|v| {
            let mut a = Vec::new();
            if v > 0 {
                a.push(v - 1);
            }
            if v + 1 < n {
                a.push(v + 1);
            }
            a
        })
        .collect()
}

#[test]
fn a_query_reaches_its_ttl_and_no_farther() {
    let out = search(&line(7), 1, 4, 500);
    assert_eq!(
        out.found.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3, 4]
    );
    assert_eq!(out.answered, [1, 1, 1, 1, 1, 0, 0]);
    // One copy a link out, along the line: 4 links within reach.
    assert_eq!(out.messages, 4);
    assert!(out.finished.unwrap() < SEARCH_TIME, "everyone answered");
}

#[test]
fn the_origin_stops_widening_once_it_has_enough() {
    // A star: the origin in the middle, 30 neighbours with a file each.
    let mut adj = vec![(1..31).collect::<Vec<_>>()];
    adj.extend((1..31).map(|_| vec![0]));
    let all = search(&adj, 2, 4, 500);
    assert_eq!(all.found.len(), 31);
    assert_eq!(all.messages, 30);
    // Its own file and two neighbours' are enough: 1, then 2 asked.
    let few = search(&adj, 2, 4, 3);
    assert_eq!(few.found.len(), 3);
    assert_eq!(few.messages, 3);
}

/// A random connected graph of up to 60 nodes.
fn graph() -> impl Strategy<Value = Vec<Vec<usize>>> {
    common::graph(60, 3)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever order copies arrive in (latencies differ per link), a
    /// query finds the file of every node within its TTL and of none
    /// beyond, each node answers it at most once, the origin finishes
    /// before its search time once everyone has answered, and the same
    /// seed gives the same run.
    #[test]
    fn a_query_finds_everything_within_its_ttl_once(
        adj in graph(),
        seed in any::<u64>(),
        ttl in 1u8..5,
    ) {
        let out = search(&adj, seed, ttl, 500);
        let d = common::distances(&adj, 0);
        let within: Vec<usize> = (0..adj.len()).filter(|&v| d[v] <= ttl as usize).collect();
        prop_assert_eq!(out.found.keys().copied().collect::<Vec<_>>(), within.clone());
        for (v, &n) in out.answered.iter().enumerate() {
            prop_assert_eq!(n, usize::from(within.contains(&v)), "node {} answered {} times", v, n);
        }
        prop_assert!(out.finished.is_some_and(|t| t < SEARCH_TIME));
        let links: usize = adj.iter().map(Vec::len).sum::<usize>() / 2;
        // Twice the links, plus at most one extension per link,
        // direction and TTL level.
        prop_assert!(out.messages <= 2 * links * ttl as usize, "{} messages, {} links", out.messages, links);
        prop_assert_eq!(search(&adj, seed, ttl, 500), out);
    }
}

const WALK: WalkConfig = WalkConfig {
    walkers: 4,
    steps: 6,
    probes: 4,
    flood_below: 0,
};

#[test]
fn a_walk_finds_a_holder_next_to_any_node_it_visits_on_a_line() {
    // On a line a walker can only go on: with 6 steps it visits nodes 1
    // to 6, and their probes reach node 7; node 8 is beyond.
    let adj = line(12);
    let near = walk_search(&adj, 1, WALK, 500, &[7]);
    assert_eq!(near.found.keys().copied().collect::<Vec<_>>(), [7]);
    let far = walk_search(&adj, 1, WALK, 500, &[8]);
    assert!(far.found.is_empty());
    // One walker copy a step; a probe only where the filter says maybe.
    assert_eq!(near.walker_copies, 6);
    assert_eq!(near.probes, 1);
    assert!(near.finished.unwrap() < SEARCH_TIME);
}

#[test]
fn a_walk_stops_as_soon_as_the_origin_has_enough() {
    // A star of 30 holders: the origin probes 4, walks 4, and stops at 3
    // files without waiting for the rest.
    let mut adj = vec![(1..31).collect::<Vec<_>>()];
    adj.extend((1..31).map(|_| vec![0]));
    let holders: Vec<usize> = (1..31).collect();
    let out = walk_search(&adj, 3, WALK, 3, &holders);
    assert!(out.found.len() >= 3, "{out:?}");
    assert!(out.messages <= 8, "{} messages", out.messages);
    let finished = out.finished.expect("finished");
    let mut times: Vec<Duration> = out.found.values().copied().collect();
    times.sort();
    let third = times[2];
    assert_eq!(finished, third, "finished the moment the third came");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whatever the mesh: a walk costs at most `walkers × steps` walker
    /// copies and `probes` probes a visit, each node answers at most once,
    /// a holder next to the origin is always found, every file found is a
    /// holder's, and the same seed gives the same run.
    #[test]
    fn a_walk_is_bounded_and_finds_what_is_next_to_it(
        adj in common::graph(60, 4),
        seed in any::<u64>(),
        holder in 1usize..60,
    ) {
        let holder = holder % adj.len();
        let out = walk_search(&adj, seed, WALK, 500, &[holder]);
        let visits = usize::from(WALK.walkers) * usize::from(WALK.steps);
        prop_assert!(out.walker_copies <= visits, "{} walker copies", out.walker_copies);
        prop_assert!(out.probes <= (visits + 1) * usize::from(WALK.probes));
        prop_assert!(out.answered.iter().all(|&n| n <= 1), "{:?}", out.answered);
        prop_assert!(out.found.keys().all(|&v| v == holder));
        if holder != 0 && adj[0].contains(&holder) {
            prop_assert!(out.found.contains_key(&holder), "a neighbour's file is probed for");
        }
        prop_assert!(out.finished.is_some_and(|t| t < SEARCH_TIME));
        prop_assert_eq!(walk_search(&adj, seed, WALK, 500, &[holder]), out);
    }
}
