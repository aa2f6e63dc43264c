//! Query latency and throughput from a leaf through 0, 1, 3 and 7 supernode
//! hops on loopback; the 0-hop (direct, single-supernode) query is the
//! baseline of the same run.
//!
//! Both routings run in the same process, each on its own line: the flood
//! (the baseline) and the walk (`walk_flood_below` 0, walkers taking as many
//! steps as the TTL), interleaved query by query.
//!
//! Topology: a line of 11 supernodes s0 - s1 - ... - s10, each dialling only
//! its predecessor, wanting one neighbour and allowing at most two, so that
//! no shortcut forms and s_h is exactly h hops from s0 (checked before and
//! after measuring). One leaf attached only to s_h shares a file whose name
//! is a word no other file has; the asker talks to s0 and asks for that word
//! with `max_results: 1`, so the origin stops as soon as the hit arrives.
//!
//! TTL is capped at `servent_proto::route::MAX_TTL` (7) by design, so the
//! farthest hop count measured is min(10, MAX_TTL); files one hop past the
//! TTL and 10 hops away are checked to be out of reach.
//!
//! Measured for each hop count, with the hop counts interleaved query by
//! query so that machine noise falls on all of them alike:
//! - `leaf search`: `Client::search`, a new QUIC connection (handshake
//!   included) per query, as a user gets it;
//! - one open connection: a `Query` on a new stream of an already-open leaf
//!   connection, timed to the first hit and to the end of the stream;
//! - throughput: `CONCURRENCY` queries in flight on one open connection.
//!
//! `cargo bench -p servent-tests --bench query` runs the full benchmark
//! (`SERVENT_BENCH_QUERIES`, default 200 per hop count;
//! `SERVENT_BENCH_CONCURRENCY`, default 16). Invoked any other way (as
//! `cargo test --all-targets` does) it makes a few queries only.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use servent_net::{self as net, Endpoint, Identity};
use servent_proto::hop::RoutingKind;
use servent_proto::limits::{MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
use servent_proto::msg::{Hit, LeafRequest, Query, QueryKind, SupernodeReply, ALPN_LEAF};
use servent_proto::route::MAX_TTL;
use servent_proto::{ContentHash, NodeId};
use servent_tests::bench::{self, median};
use servent_tests::{hash_of, mesh_config, supernode_with, wait_for, Client, Supernode, TestLeaf};

/// Supernodes in the line: s0 .. s10, so that 10 hops exist.
const LINE: usize = 11;
/// Hop counts asked for; those above `MAX_TTL` are lowered to it.
const WANTED_HOPS: [usize; 4] = [0, 1, 3, 10];
const FULL_QUERIES: usize = 200;
const QUICK_QUERIES: usize = 3;
const FULL_CONCURRENCY: usize = 16;
const QUICK_CONCURRENCY: usize = 4;
/// Throughput batches per hop count (the median is reported).
const FULL_ROUNDS: usize = 3;
/// Unmeasured queries per hop count before measuring.
const WARMUP: usize = 5;
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Both routings in the same run: today's flood is the baseline of the walk.
const ROUTINGS: [RoutingKind; 2] = [RoutingKind::Flood, RoutingKind::Walk];

fn main() -> Result<()> {
    bench::init_logging();
    let full = bench::full_mode();
    let queries = bench::setting("SERVENT_BENCH_QUERIES", full, FULL_QUERIES, QUICK_QUERIES)?;
    let concurrency = bench::setting(
        "SERVENT_BENCH_CONCURRENCY",
        full,
        FULL_CONCURRENCY,
        QUICK_CONCURRENCY,
    )?;
    ensure!(
        queries > 0 && concurrency > 0,
        "need at least one query and one in flight"
    );
    let ttl = bench::env_or("SERVENT_BENCH_TTL", MAX_TTL)?;
    ensure!(
        (1..=MAX_TTL).contains(&ttl),
        "SERVENT_BENCH_TTL must be 1 to {MAX_TTL}"
    );
    let bench = Bench {
        ttl,
        queries,
        concurrency,
        rounds: if full { FULL_ROUNDS } else { 1 },
        warmup: if full { WARMUP } else { 1 },
    };
    bench::block_on(bench.run())
}

struct Bench {
    /// TTL of the asker's queries.
    ttl: u8,
    queries: usize,
    concurrency: usize,
    rounds: usize,
    warmup: usize,
}

/// A file somewhere in the line, and how to ask for it.
struct Target {
    hops: usize,
    word: String,
    hash: ContentHash,
    leaf: TestLeaf,
}

impl Target {
    fn query(&self) -> LeafRequest {
        LeafRequest::Query(Query {
            kind: QueryKind::Keywords(vec![self.word.clone()]),
            max_results: 1,
        })
    }

    /// True if `hits` is exactly this target's file, from its leaf.
    fn is_answer(&self, hits: &[Hit]) -> bool {
        let id = self.leaf.leaf().id();
        hits.len() == 1 && hits[0].hash == self.hash && hits[0].sources.iter().any(|s| s.id == id)
    }
}

/// One line of supernodes under one routing, its targets and its asker.
struct Line {
    routing: RoutingKind,
    sns: Vec<Supernode>,
    targets: Vec<Target>,
    /// How many of `targets` (the first ones) are within reach.
    reachable: usize,
    client: Client,
    _asker_dir: tempfile::TempDir,
    endpoint: Endpoint,
    conn: quinn::Connection,
}

impl Line {
    /// Builds the line, its target leaves and its asker, and checks that
    /// the reachable targets answer and the others do not.
    async fn start(
        routing: RoutingKind,
        ttl: u8,
        hops: &[usize],
        beyond: &[usize],
    ) -> Result<Self> {
        let sns = line(LINE, ttl, routing).await?;
        let mut targets = Vec::new();
        for &h in hops.iter().chain(beyond) {
            let word = format!("benchtarget{h}hops");
            let content = format!("the file {h} hops from the asker");
            let name = format!("{word}.txt");
            let leaf =
                TestLeaf::start_attached(&[&sns[h]], &[(name.as_str(), content.as_bytes())], 1)
                    .await;
            targets.push(Target {
                hops: h,
                word,
                hash: hash_of(content.as_bytes()),
                leaf,
            });
        }
        for t in &targets {
            t.leaf.wait_indexed(1).await;
        }
        check_layout(&sns, &targets)?;

        // The asker: a one-shot client as `leaf search` uses, and an open
        // leaf connection to s0 for the protocol-level measures.
        let asker_dir = tempfile::tempdir()?;
        let client = Client::new(asker_dir.path(), vec![sns[0].addr().to_string()])?;
        let endpoint = Endpoint::client(
            Arc::new(Identity::generate()?),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )?;
        let conn = endpoint
            .connect(sns[0].addr(), ALPN_LEAF, Some(sns[0].id()))
            .await?
            .conn;
        let line = Line {
            routing,
            sns,
            targets,
            reachable: hops.len(),
            client,
            _asker_dir: asker_dir,
            endpoint,
            conn,
        };
        line.check_reach(ttl).await?;
        Ok(line)
    }

    /// Every reachable target answers (once the neighbours' keyword
    /// filters, sent at most every 500 ms, have arrived), and the others
    /// never do.
    async fn check_reach(&self, ttl: u8) -> Result<()> {
        let (reachable, unreachable) = self.targets.split_at(self.reachable);
        for t in reachable {
            let answered = wait_for(SETUP_TIMEOUT, || async {
                ask(&self.conn, &t.query())
                    .await
                    .is_ok_and(|got| t.is_answer(&got.hits))
            })
            .await;
            ensure!(
                answered.is_ok(),
                "{}, {} hops: the one file was never found",
                self.routing,
                t.hops
            );
        }
        for t in unreachable {
            let got = ask(&self.conn, &t.query()).await?;
            ensure!(
                got.hits.is_empty(),
                "{}, {} hops is beyond reach {ttl} yet answered: {:?}",
                self.routing,
                t.hops,
                got.hits
            );
            println!(
                "{}: {} hops, no hit, as reach {ttl} intends (stream ended after {:.2} ms)",
                self.routing,
                t.hops,
                ms(got.end)
            );
        }
        Ok(())
    }

    fn reachable(&self) -> &[Target] {
        &self.targets[..self.reachable]
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"done");
        self.endpoint.close();
    }
}

impl Bench {
    async fn run(self) -> Result<()> {
        let ttl = self.ttl;
        let max_hops = usize::from(ttl).min(LINE - 1);
        let mut hops: Vec<usize> = WANTED_HOPS.iter().map(|&h| h.min(max_hops)).collect();
        hops.dedup();
        // Just past the TTL, and the 10 hops the issue asks about.
        let mut beyond: Vec<usize> = vec![max_hops + 1, LINE - 1];
        beyond.retain(|&h| h > max_hops && h < LINE);
        beyond.dedup();
        println!(
            "query: a line of {LINE} supernodes on loopback per routing ({}), hops {hops:?} \
             (query TTL and walk steps {ttl}, TTL capped at {MAX_TTL}), \
             {} queries per hop count, {} in flight for throughput",
            ROUTINGS.map(|r| r.to_string()).join(", "),
            self.queries,
            self.concurrency
        );
        println!("machine: {}", bench::machine());

        let mut lines = Vec::new();
        for routing in ROUTINGS {
            lines.push(Line::start(routing, ttl, &hops, &beyond).await?);
        }

        for _ in 0..self.warmup {
            for l in &lines {
                for t in l.reachable() {
                    search(&l.client, t).await?;
                    ask(&l.conn, &t.query()).await?;
                }
            }
        }

        // Every (routing, hop count), interleaved query by query so that
        // machine noise falls on all of them alike.
        let cases: Vec<(&Line, &Target)> = lines
            .iter()
            .flat_map(|l| l.reachable().iter().map(move |t| (l, t)))
            .collect();
        let n = cases.len();
        let mut searched = vec![Vec::with_capacity(self.queries); n];
        let mut first = vec![Vec::with_capacity(self.queries); n];
        let mut ended = vec![Vec::with_capacity(self.queries); n];
        for _ in 0..self.queries {
            for (i, (l, t)) in cases.iter().enumerate() {
                searched[i].push(search(&l.client, t).await?);
                let got = ask(&l.conn, &t.query()).await?;
                ensure!(
                    t.is_answer(&got.hits),
                    "{}, {} hops: wrong answer",
                    l.routing,
                    t.hops
                );
                first[i].push(got.first.context("a hit came")?);
                ended[i].push(got.end);
            }
        }

        // Throughput: `concurrency` in flight on the one connection.
        let mut rates = vec![Vec::with_capacity(self.rounds); n];
        let batch = (2 * self.queries).max(self.concurrency);
        for _ in 0..self.rounds {
            for (i, (l, t)) in cases.iter().enumerate() {
                rates[i].push(throughput(&l.conn, t, batch, self.concurrency).await?);
            }
        }

        for l in &lines {
            check_layout(&l.sns, &l.targets)?;
        }

        let searched: Vec<Stats> = searched.iter_mut().map(|v| Stats::of(v)).collect();
        let first: Vec<Stats> = first.iter_mut().map(|v| Stats::of(v)).collect();
        let ended: Vec<Stats> = ended.iter_mut().map(|v| Stats::of(v)).collect();
        let rates: Vec<f64> = rates.iter_mut().map(|v| median(v)).collect();
        let rows: Vec<(String, usize)> = cases
            .iter()
            .map(|(l, t)| (l.routing.to_string(), t.hops))
            .collect();
        // The direct query (0 hops) of the first routing is the baseline;
        // each routing's own 0-hop row is there to show it is the same.
        let direct = |v: &[f64]| v[0];

        println!();
        println!("leaf search (Client::search: new QUIC connection per query), ms:");
        latency_table(&rows, &searched);
        println!();
        println!("one open connection, new stream per query: time to first hit, ms:");
        latency_table(&rows, &first);
        println!();
        println!("one open connection: time to end of stream, ms:");
        latency_table(&rows, &ended);
        println!();
        println!(
            "throughput, {} in flight on one connection ({batch} queries a batch, median of {}):",
            self.concurrency, self.rounds
        );
        println!(
            "{:>7}  {:>4}  {:>10}  {:>9}  {:>13}",
            "routing", "hops", "queries/s", "vs direct", "vs same flood"
        );
        for ((routing, h), r) in rows.iter().zip(&rates) {
            let flood = rows
                .iter()
                .position(|(ro, ho)| ro == "flood" && ho == h)
                .map(|j| format!("{:.2}", r / rates[j]))
                .unwrap_or_default();
            println!(
                "{routing:>7}  {h:>4}  {r:>10.0}  {:>9.2}  {flood:>13}",
                r / direct(&rates)
            );
        }
        let far = *hops.last().unwrap_or(&0);
        if far > 0 {
            println!();
            for (routing, rows_of) in ROUTINGS.iter().map(|r| {
                let name = r.to_string();
                let idx: Vec<usize> = (0..rows.len()).filter(|&i| rows[i].0 == name).collect();
                (name, idx)
            }) {
                let (Some(&near), Some(&farthest)) = (rows_of.first(), rows_of.last()) else {
                    continue;
                };
                println!(
                    "{routing}, per hop (p50, {far} hops minus direct, / {far}): open connection {:.3} ms, leaf search {:.3} ms",
                    (first[farthest].p50 - first[near].p50) / far as f64,
                    (searched[farthest].p50 - searched[near].p50) / far as f64
                );
            }
        }
        drop(cases);
        drop(lines);
        Ok(())
    }
}

/// Supernode settings for the line: no shortcuts, the longest TTL (walkers
/// take as many steps), walking even in so small a mesh, and rate limits far
/// above what the benchmark sends.
fn line_config(peers: &[&Supernode], ttl: u8, routing: RoutingKind) -> supernode::Config {
    supernode::Config {
        target_neighbors: 1,
        max_neighbors: 2,
        query_ttl: ttl,
        routing,
        walk_steps: ttl,
        walk_flood_below: 0,
        query_rate: 1e9,
        query_burst: 1_000_000,
        mesh_query_rate: 1e9,
        mesh_query_burst: 1_000_000,
        ..mesh_config(peers)
    }
}

/// s0 - s1 - ... : each dials only its predecessor.
async fn line(n: usize, ttl: u8, routing: RoutingKind) -> Result<Vec<Supernode>> {
    let mut sns: Vec<Supernode> = Vec::new();
    for _ in 0..n {
        let peers: Vec<&Supernode> = sns.last().into_iter().collect();
        sns.push(supernode_with(line_config(&peers, ttl, routing)).await);
    }
    let formed = wait_for(SETUP_TIMEOUT, || async { line_neighbours_ok(&sns) }).await;
    if formed.is_err() {
        bail!("the line of {n} supernodes ({routing}) did not form");
    }
    Ok(sns)
}

/// Whether each supernode's neighbours are exactly its two line neighbours.
fn line_neighbours_ok(sns: &[Supernode]) -> bool {
    sns.iter().enumerate().all(|(i, s)| {
        let mut want: HashSet<NodeId> = HashSet::new();
        if i > 0 {
            want.insert(sns[i - 1].id());
        }
        if let Some(next) = sns.get(i + 1) {
            want.insert(next.id());
        }
        s.neighbours().into_iter().collect::<HashSet<_>>() == want
    })
}

/// The line has no shortcut and each target leaf is attached to its own
/// supernode only.
fn check_layout(sns: &[Supernode], targets: &[Target]) -> Result<()> {
    ensure!(line_neighbours_ok(sns), "the line changed shape");
    for t in targets {
        let attached: Vec<NodeId> = t.leaf.leaf().supernodes().iter().map(|s| s.0).collect();
        ensure!(
            attached == [sns[t.hops].id()],
            "the leaf {} hops away is attached to {attached:?}",
            t.hops
        );
    }
    Ok(())
}

/// One `leaf search` for the target's word, timed; checks the answer.
async fn search(client: &Client, t: &Target) -> Result<Duration> {
    let started = Instant::now();
    let hits = client
        .search(std::slice::from_ref(&t.word), 1, QUERY_TIMEOUT)
        .await?;
    let took = started.elapsed();
    ensure!(
        t.is_answer(&hits),
        "leaf search {} hops: expected the one file, got {hits:?}",
        t.hops
    );
    Ok(took)
}

struct Answer {
    /// Time to the first frame with a hit in it.
    first: Option<Duration>,
    /// Time to the end of the reply stream.
    end: Duration,
    hits: Vec<Hit>,
}

/// One query on a new stream of the open connection `conn`.
async fn ask(conn: &quinn::Connection, request: &LeafRequest) -> Result<Answer> {
    tokio::time::timeout(QUERY_TIMEOUT, ask_inner(conn, request))
        .await
        .context("the query did not end in time")?
}

async fn ask_inner(conn: &quinn::Connection, request: &LeafRequest) -> Result<Answer> {
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    net::write_frame(&mut send, request, MAX_REQUEST_FRAME).await?;
    send.finish()?;
    let mut first = None;
    let mut hits = Vec::new();
    while let Some(reply) = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME).await? {
        match reply {
            SupernodeReply::Hits(batch) => {
                if first.is_none() && !batch.is_empty() {
                    first = Some(started.elapsed());
                }
                hits.extend(batch);
            }
            SupernodeReply::Error(e) => bail!("query refused: {e}"),
            other => bail!("unexpected reply {other:?}"),
        }
    }
    Ok(Answer {
        first,
        end: started.elapsed(),
        hits,
    })
}

/// `total` queries for `t`, `in_flight` at a time on `conn`; queries/s.
async fn throughput(
    conn: &quinn::Connection,
    t: &Target,
    total: usize,
    in_flight: usize,
) -> Result<f64> {
    let request = Arc::new(t.query());
    let tickets = Arc::new(AtomicUsize::new(total));
    let id = t.leaf.leaf().id();
    let hash = t.hash;
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight.min(total) {
        let (conn, request, tickets) = (conn.clone(), request.clone(), tickets.clone());
        workers.spawn(async move {
            let mut done = 0usize;
            while tickets
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let got = ask(&conn, &request).await?;
                ensure!(
                    got.hits.len() == 1
                        && got.hits[0].hash == hash
                        && got.hits[0].sources.iter().any(|s| s.id == id),
                    "wrong answer under load: {:?}",
                    got.hits
                );
                done += 1;
            }
            Ok::<usize, anyhow::Error>(done)
        });
    }
    let mut done = 0;
    while let Some(r) = workers.join_next().await {
        done += r??;
    }
    let took = started.elapsed();
    ensure!(done == total, "{done} of {total} queries answered");
    Ok(total as f64 / took.as_secs_f64())
}

/// Latency summary, in milliseconds.
struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

impl Stats {
    fn of(v: &mut [Duration]) -> Self {
        v.sort();
        let at = |q: f64| {
            // Nearest rank.
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            ms(v[rank - 1])
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            mean: v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64,
        }
    }
}

fn latency_table(rows: &[(String, usize)], stats: &[Stats]) {
    println!(
        "{:>7}  {:>4}  {:>8}  {:>8}  {:>8}  {:>13}",
        "routing", "hops", "p50", "p99", "mean", "p50 vs direct"
    );
    for ((routing, h), s) in rows.iter().zip(stats) {
        println!(
            "{routing:>7}  {h:>4}  {:>8.3}  {:>8.3}  {:>8.3}  {:>13.2}",
            s.p50,
            s.p99,
            s.mean,
            s.p50 / stats[0].p50
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
