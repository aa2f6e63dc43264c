//! Network growth by election: how long 200 leaves joining a network seeded
//! by one small supernode take until every one is attached and a sample of
//! them finds every file, beside the same 200 leaves joining a network of
//! dedicated supernodes deployed beforehand (the baseline, same run); then
//! how many promotions and step-downs churn causes.
//!
//! Everything runs in this process on 127.0.0.1.
//!
//! - **Baseline**: `ceil(leaves × 3 / max_leaves) + 3` dedicated supernodes
//!   (enough for every leaf's 3 links), election disabled, each dialling the
//!   first and the previous one; the mesh is left to fill in (every
//!   supernode with `min(8, n - 1)` neighbours) before the first leaf
//!   starts. Leaves may not be promoted.
//! - **Election**: one seed supernode with the same `max_leaves`; leaves may
//!   be promoted, and the seed and every elected leaf apply the election
//!   rules printed at the start (`ElectionConfig::quick()`, a little slower).
//!
//! In both, leaf *i* starts at *i* / rate seconds, knows only the first
//! (seed) supernode's address, and shares one file `file i.bin` of its own.
//! Measured from the first leaf's start: the moment every leaf has at least
//! one supernode, and the end of the first search round after it in which
//! every leaf of a random sample finds every file (`Client::search` on the
//! sample leaf's data dir, as `leaf search` without `--supernode` does, all
//! sample leaves at once).
//!
//! Promotions and step-downs are counted exactly, from each leaf's
//! `Role::promotions()` and whether it holds the role now (sampled every
//! 100 ms, and once more when a leaf is stopped): a leaf that held the role
//! and no longer does, while still running, stepped down. Supernode caps
//! (leaves registered ≤ `max_leaves`) are checked at every sample.
//!
//! Churn (election network only): every few seconds a random 10% of the
//! running leaves are stopped (elected supernodes among them, as chance
//! has it) and as many new leaves, each with a new file, start. After the
//! churn period the same attach-and-find check runs on the leaves then
//! running, for the files they share (and hits of stopped leaves' files are
//! counted as stale).
//!
//! `cargo bench -p servent-tests --bench election` runs 200 leaves
//! (`SERVENT_BENCH_LEAVES`), `max_leaves` 10 (`SERVENT_BENCH_MAX_LEAVES`),
//! 20 leaf starts a second (`SERVENT_BENCH_RATE`), 30 s of churn
//! (`SERVENT_BENCH_CHURN_SECS`), a sample of 10 searchers
//! (`SERVENT_BENCH_SAMPLE`); `SERVENT_BENCH_SEED` fixes the random choices,
//! `SERVENT_BENCH_ELECTION=quick` uses `ElectionConfig::quick()` exactly.
//! Invoked any other way (as `cargo test --all-targets` does) it grows 10
//! leaves with `max_leaves` 3 and churns for 4 s, so CI stays fast.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use servent_proto::limits::MAX_RESULTS;
use servent_tests::{supernode_with, wait_for, Client, Leaf, Supernode, TestLeaf};
use supernode::election::ElectionConfig;

const FULL_LEAVES: usize = 200;
const QUICK_LEAVES: usize = 10;
const FULL_MAX_LEAVES: usize = 10;
const QUICK_MAX_LEAVES: usize = 3;
/// Supernodes each leaf attaches to (the leaf default).
const ATTACH: usize = leaf::attach::DEFAULT_ATTACH;
/// Dedicated supernodes beyond the bare capacity for every leaf's links.
const EXTRA_DEDICATED: usize = 3;
const RATE: f64 = 20.0;
const FULL_SAMPLE: usize = 10;
const QUICK_SAMPLE: usize = 3;
const FULL_CHURN: Duration = Duration::from_secs(30);
const QUICK_CHURN: Duration = Duration::from_secs(4);
const FULL_CHURN_EVERY: Duration = Duration::from_secs(3);
const QUICK_CHURN_EVERY: Duration = Duration::from_secs(2);
/// Share of the running leaves stopped (and replaced) each churn round.
const CHURN_FRACTION: f64 = 0.10;
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
const SEARCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for all leaves to be attached and found.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
const MESH_TIMEOUT: Duration = Duration::from_secs(60);
/// A promotion this soon after a step-down somewhere in the network counts
/// as re-growing what was just given up.
const FLAP_WINDOW: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    // cargo bench passes `--bench`; cargo test passes nothing (or a filter).
    let full = std::env::args().any(|a| a == "--bench");
    let params = Params::from_env(full)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(params))
}

struct Params {
    leaves: usize,
    max_leaves: usize,
    rate: f64,
    sample: usize,
    churn: Duration,
    churn_every: Duration,
    seed: u64,
    rules: ElectionConfig,
    rules_name: &'static str,
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .with_context(|| format!("{name} must be a number")),
        Err(_) => Ok(default),
    }
}

impl Params {
    fn from_env(full: bool) -> Result<Self> {
        let leaves = env(
            "SERVENT_BENCH_LEAVES",
            if full { FULL_LEAVES } else { QUICK_LEAVES },
        )?;
        let max_leaves = env(
            "SERVENT_BENCH_MAX_LEAVES",
            if full {
                FULL_MAX_LEAVES
            } else {
                QUICK_MAX_LEAVES
            },
        )?;
        let rate = env("SERVENT_BENCH_RATE", RATE)?;
        let sample = env(
            "SERVENT_BENCH_SAMPLE",
            if full { FULL_SAMPLE } else { QUICK_SAMPLE },
        )?;
        let churn = Duration::from_secs_f64(env(
            "SERVENT_BENCH_CHURN_SECS",
            if full { FULL_CHURN } else { QUICK_CHURN }.as_secs_f64(),
        )?);
        let seed = env(
            "SERVENT_BENCH_SEED",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        )?;
        ensure!(
            (1..=MAX_RESULTS as usize).contains(&leaves),
            "SERVENT_BENCH_LEAVES must be 1 to {MAX_RESULTS} (one search must see every file)"
        );
        ensure!(
            max_leaves >= 1,
            "SERVENT_BENCH_MAX_LEAVES must be at least 1"
        );
        ensure!(
            rate > 0.0 && rate.is_finite(),
            "SERVENT_BENCH_RATE must be positive"
        );
        ensure!(sample >= 1, "SERVENT_BENCH_SAMPLE must be at least 1");
        let quick_rules = std::env::var("SERVENT_BENCH_ELECTION").is_ok_and(|v| v == "quick");
        let (rules, rules_name) = if quick_rules {
            (ElectionConfig::quick(), "ElectionConfig::quick()")
        } else {
            (
                ElectionConfig {
                    overload_secs: 1.0,
                    jitter_secs: 1.0,
                    cooldown_secs: 2.0,
                    min_uptime_secs: 2.0,
                    drain_secs: 5.0,
                    ..ElectionConfig::quick()
                },
                "quick() slowed down",
            )
        };
        Ok(Self {
            leaves,
            max_leaves,
            rate,
            sample: sample.min(leaves),
            churn,
            churn_every: if full {
                FULL_CHURN_EVERY
            } else {
                QUICK_CHURN_EVERY
            },
            seed,
            rules,
            rules_name,
        })
    }

    fn dedicated(&self) -> usize {
        (self.leaves * ATTACH).div_ceil(self.max_leaves) + EXTRA_DEDICATED
    }
}

async fn run(p: Params) -> Result<()> {
    let r = &p.rules;
    println!(
        "election: {} leaves at {} starts/s, max_leaves {}, {} supernode links a leaf, \
         sample of {} searchers, seed {}",
        p.leaves, p.rate, p.max_leaves, ATTACH, p.sample, p.seed
    );
    println!(
        "election rules ({}): high water {}‰, overload {} s + up to {} s jitter, cooldown {} s, \
         min uptime {} s, drained at ≤{} leaves for {} s",
        p.rules_name,
        r.high_water_permille,
        r.overload_secs,
        r.jitter_secs,
        r.cooldown_secs,
        r.min_uptime_secs,
        r.drained_leaves,
        r.drain_secs
    );
    println!("machine: {}", machine());
    let mut rng = Rng::new(p.seed);

    let only = std::env::var("SERVENT_BENCH_ONLY").unwrap_or_default();
    if only == "baseline" {
        let dedicated = dedicated_network(p.dedicated(), p.max_leaves).await?;
        let net = Net::shared(dedicated.iter().map(|s| s.state().clone()).collect());
        let sampler = spawn_sampler(net.clone());
        let bootstrap = dedicated[0].addr().to_string();
        let base = grow(&p, &net, &bootstrap, None, &mut rng).await?;
        sampler.abort();
        base.print("baseline (dedicated)");
        debug_unattached(&net, &dedicated);
        return Ok(());
    }
    // Baseline: the capacity is deployed before anyone joins.
    let n_dedicated = p.dedicated();
    let mesh_started = Instant::now();
    let dedicated = dedicated_network(n_dedicated, p.max_leaves).await?;
    let mesh_took = mesh_started.elapsed();
    println!(
        "\nbaseline: {n_dedicated} dedicated supernodes meshed in {:.1} s (not counted)",
        mesh_took.as_secs_f64()
    );
    let net = Net::shared(dedicated.iter().map(|s| s.state().clone()).collect());
    let sampler = spawn_sampler(net.clone());
    let bootstrap = dedicated[0].addr().to_string();
    let base = grow(&p, &net, &bootstrap, None, &mut rng).await?;
    sampler.abort();
    base.print("baseline (dedicated)");
    let base_caps = net.lock().expect("net").tally.caps;
    teardown(&net).await;
    drop(dedicated);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Election: one seed, the rest grown out of the leaves.
    let seed = supernode_with(supernode::Config {
        max_leaves: p.max_leaves,
        election: p.rules.clone(),
        ..supernode::Config::localhost()
    })
    .await;
    let net = Net::shared(vec![seed.state().clone()]);
    let sampler = spawn_sampler(net.clone());
    let bootstrap = seed.addr().to_string();
    let grown = grow(&p, &net, &bootstrap, Some(&p.rules), &mut rng).await?;
    println!();
    grown.print("election");
    let after_growth = net.lock().expect("net").snapshot();
    print_timeline(&net, grown.t0);

    // Churn.
    let churned = churn(&p, &net, &bootstrap, &mut rng).await?;
    sampler.abort();
    let end = {
        let mut n = net.lock().expect("net");
        n.sample(Instant::now());
        n.snapshot()
    };

    // Summary.
    println!();
    println!("growth, time from the first leaf's start (s):");
    println!(
        "{:<22} {:>9} {:>13} {:>15} {:>11}",
        "", "all began", "all attached", "all found", "supernodes"
    );
    for (name, g) in [
        ("baseline (dedicated)", &base),
        ("election (1 seed)", &grown),
    ] {
        println!(
            "{name:<22} {:>9.1} {:>13} {:>15} {:>11}",
            g.started.as_secs_f64(),
            secs(g.settled.attached),
            secs(g.settled.searchable),
            g.supernodes
        );
    }
    match (base.settled.searchable, grown.settled.searchable) {
        (Some(b), Some(e)) => {
            println!(
                "ratio election / baseline: all found {:.2}×; after the last leaf began {:.2}× \
                 ({:.1} s vs {:.1} s)",
                e.as_secs_f64() / b.as_secs_f64(),
                e.saturating_sub(grown.started).as_secs_f64()
                    / b.saturating_sub(base.started).as_secs_f64().max(1e-3),
                e.saturating_sub(grown.started).as_secs_f64(),
                b.saturating_sub(base.started).as_secs_f64(),
            );
        }
        _ => println!("ratio: n/a (a network did not get there in time)"),
    }
    if let (Some(b), Some(e)) = (base.settled.attached, grown.settled.attached) {
        println!(
            "ratio election / baseline: all attached {:.2}×",
            e.as_secs_f64() / b.as_secs_f64()
        );
    }
    let growth = after_growth.since(&Counters::default());
    let during = churned.during.since(&after_growth);
    let settle = end.since(&churned.during);
    println!();
    println!(
        "{:<28} {:>10} {:>10} {:>19} {:>17}",
        "election network", "promotions", "step-downs", "elected left (stop)", "re-grown ≤10 s"
    );
    for (name, c, from, to) in [
        ("growth", growth, grown.t0, churned.start),
        ("churn", during, churned.start, churned.start + p.churn),
        (
            "after churn, settling",
            settle,
            churned.start + p.churn,
            Instant::now(),
        ),
    ] {
        let regrown = net.lock().expect("net").tally.regrown(from, to);
        println!(
            "{name:<28} {:>10} {:>10} {:>19} {:>17}",
            c.promotions, c.demotions, c.departed_supernodes, regrown
        );
    }
    let (twice, most) = net.lock().expect("net").promoted_more_than_once();
    println!(
        "leaves promoted more than once: {twice} (most promotions of one leaf: {most}); \
         elected supernodes now: {}",
        end.supernodes
    );
    println!(
        "churn: {} rounds, {} leaves stopped and {} started; leaves without a supernode just \
         before each round: {:?}",
        churned.rounds, churned.stopped, churned.stopped, churned.unattached
    );
    println!(
        "after churn ({} leaves running): all attached {}, all found {} (s after churn ended); \
         stale hits (files of stopped leaves) in the last round: {}",
        churned.live,
        secs(churned.settled.attached),
        secs(churned.settled.searchable),
        churned.settled.stale
    );
    let caps = net.lock().expect("net").tally.caps;
    for (name, c) in [("baseline", base_caps), ("election", caps)] {
        println!(
            "{name}: supernodes over max_leaves in {} of {} checks (most over: {})",
            c.over, c.checked, c.most_over
        );
    }
    teardown(&net).await;
    drop(seed);

    ensure!(
        base.settled.searchable.is_some(),
        "baseline: not all leaves attached and found in time"
    );
    ensure!(
        grown.settled.searchable.is_some(),
        "election: not all leaves attached and found in time"
    );
    ensure!(
        churned.settled.searchable.is_some(),
        "after churn: not all leaves attached and found in time"
    );
    Ok(())
}

/// `n` dedicated supernodes, election off, each dialling the first and the
/// previous one; returns once every one has `min(8, n - 1)` neighbours.
async fn dedicated_network(n: usize, max_leaves: usize) -> Result<Vec<Supernode>> {
    let mut sns: Vec<Supernode> = Vec::with_capacity(n);
    for i in 0..n {
        let mut peers = Vec::new();
        if let Some(first) = sns.first() {
            peers.push(first.addr().to_string());
        }
        if i > 1 {
            peers.push(sns[i - 1].addr().to_string());
        }
        sns.push(
            supernode_with(supernode::Config {
                max_leaves,
                peers,
                election: ElectionConfig {
                    enabled: false,
                    ..ElectionConfig::default()
                },
                ..supernode::Config::localhost()
            })
            .await,
        );
    }
    let want = sns[0].state().config.target_neighbors.min(n - 1);
    let meshed = wait_for(MESH_TIMEOUT, || async {
        sns.iter().all(|s| s.neighbours().len() >= want)
    })
    .await;
    if meshed.is_err() {
        let least = sns.iter().map(|s| s.neighbours().len()).min().unwrap_or(0);
        println!(
            "warning: the dedicated mesh did not fill in (least neighbours {least}, wanted {want})"
        );
    }
    Ok(sns)
}

/// A leaf of the benchmark: serial `i` shares `file i.bin`.
async fn start_leaf(
    serial: usize,
    bootstrap: &str,
    rules: Option<&ElectionConfig>,
) -> Result<TestLeaf> {
    let data = tempfile::tempdir()?;
    let share = tempfile::tempdir()?;
    std::fs::write(
        share.path().join(file_name(serial)),
        format!("content of file {serial}"),
    )?;
    let config = leaf::Config {
        no_promote: rules.is_none(),
        role: supernode::Config {
            election: rules.cloned().unwrap_or_default(),
            ..supernode::Config::localhost()
        },
        ..leaf::Config::localhost(data.path(), share.path(), vec![bootstrap.to_string()])
    };
    let leaf = Leaf::spawn(config).await.context("leaf starts")?;
    Ok(TestLeaf {
        leaf: Some(leaf),
        attach: ATTACH,
        data,
        share,
    })
}

fn file_name(serial: usize) -> String {
    format!("file {serial}.bin")
}

fn serial_of(name: &str) -> Option<usize> {
    name.strip_prefix("file ")?
        .strip_suffix(".bin")?
        .parse()
        .ok()
}

struct Growth {
    t0: Instant,
    /// When the last leaf had been started.
    started: Duration,
    settled: Settled,
    /// Supernodes at the end (dedicated, or seed + elected).
    supernodes: usize,
}

impl Growth {
    fn print(&self, name: &str) {
        println!(
            "{name}: {} leaves began in {:.1} s; all attached at {} s; all found at {} s \
             ({} search rounds, the last took {:.2} s); {} supernodes",
            self.settled.expected,
            self.started.as_secs_f64(),
            secs(self.settled.attached),
            secs(self.settled.searchable),
            self.settled.rounds,
            self.settled.last_round.as_secs_f64(),
            self.supernodes
        );
        if self.settled.searchable.is_none() {
            println!(
                "  not there in time: {} leaves without a supernode; the last round found {:?} of {}",
                self.settled.unattached, self.settled.found, self.settled.expected
            );
        }
    }
}

/// Starts `p.leaves` leaves at `p.rate` a second and waits until all are
/// attached and found.
async fn grow(
    p: &Params,
    net: &Shared,
    bootstrap: &str,
    rules: Option<&ElectionConfig>,
    rng: &mut Rng,
) -> Result<Growth> {
    let t0 = Instant::now();
    for i in 0..p.leaves {
        let at = t0 + Duration::from_secs_f64(i as f64 / p.rate);
        tokio::time::sleep_until(at.into()).await;
        let l = start_leaf(i, bootstrap, rules).await?;
        net.lock().expect("net").add(i, l);
    }
    let started = t0.elapsed();
    let settled = settle(p, net, t0, rng).await;
    let supernodes = {
        let mut n = net.lock().expect("net");
        n.sample(Instant::now());
        n.supernodes + n.fixed.len()
    };
    Ok(Growth {
        t0,
        started,
        settled,
        supernodes,
    })
}

#[derive(Debug, Default)]
struct Settled {
    expected: usize,
    /// When every running leaf had a supernode (first seen).
    attached: Option<Duration>,
    /// End of the first round in which every sampled leaf found every file.
    searchable: Option<Duration>,
    rounds: usize,
    last_round: Duration,
    /// Files found by each sampled leaf in the last round.
    found: Vec<usize>,
    /// Most hits of files no running leaf shares, in the last round.
    stale: usize,
    unattached: usize,
}

/// Waits until every running leaf is attached and a random sample of them
/// finds every running leaf's file; times are from `t0`.
async fn settle(p: &Params, net: &Shared, t0: Instant, rng: &mut Rng) -> Settled {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut s = Settled::default();
    loop {
        let (unattached, expected, dirs) = {
            let n = net.lock().expect("net");
            let expected: HashSet<usize> = n.members.iter().map(|m| m.serial).collect();
            let dirs: Vec<PathBuf> = rng
                .pick(n.members.len(), p.sample)
                .into_iter()
                .map(|i| n.members[i].leaf.data.path().to_path_buf())
                .collect();
            (n.unattached(), expected, dirs)
        };
        s.expected = expected.len();
        s.unattached = unattached;
        if unattached > 0 {
            if Instant::now() >= deadline {
                return s;
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
            continue;
        }
        s.attached.get_or_insert(t0.elapsed());
        let round = Instant::now();
        let results = search_round(dirs, &expected).await;
        s.rounds += 1;
        s.last_round = round.elapsed();
        s.found = results.iter().map(|r| r.0).collect();
        s.stale = results.iter().map(|r| r.1).max().unwrap_or(0);
        let all_found = results.iter().all(|r| r.0 == expected.len());
        if all_found && net.lock().expect("net").unattached() == 0 {
            s.searchable = Some(t0.elapsed());
            return s;
        }
        if Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each leaf of `dirs` searches for "file" at once; for each, how many of
/// the `expected` files it found and how many other files.
async fn search_round(dirs: Vec<PathBuf>, expected: &HashSet<usize>) -> Vec<(usize, usize)> {
    let mut tasks = tokio::task::JoinSet::new();
    for dir in dirs {
        tasks.spawn(async move {
            let client = Client::new(&dir, vec![]).ok()?;
            client
                .search(&["file".to_string()], MAX_RESULTS, SEARCH_TIMEOUT)
                .await
                .ok()
        });
    }
    tasks
        .join_all()
        .await
        .into_iter()
        .map(|hits| {
            let serials: HashSet<usize> = hits
                .unwrap_or_default()
                .iter()
                .filter_map(|h| serial_of(&h.name))
                .collect();
            let found = serials.intersection(expected).count();
            (found, serials.len() - found)
        })
        .collect()
}

struct Churned {
    start: Instant,
    rounds: usize,
    stopped: usize,
    unattached: Vec<usize>,
    /// Counters at the end of the churn period.
    during: Counters,
    live: usize,
    settled: Settled,
}

/// Every `p.churn_every`, stops a random 10% of the running leaves and
/// starts as many new ones; then waits for the network to settle.
async fn churn(p: &Params, net: &Shared, bootstrap: &str, rng: &mut Rng) -> Result<Churned> {
    let start = Instant::now();
    let mut next_serial = p.leaves;
    let mut rounds = 0;
    let mut stopped = 0;
    let mut unattached = Vec::new();
    let planned = ((p.churn.as_secs_f64() / p.churn_every.as_secs_f64()) as u32).max(1);
    for r in 0..planned {
        tokio::time::sleep_until((start + p.churn_every * r).into()).await;
        let gone: Vec<Member> = {
            let mut n = net.lock().expect("net");
            unattached.push(n.unattached());
            let k = ((n.members.len() as f64 * CHURN_FRACTION).round() as usize).max(1);
            let mut picked = rng.pick(n.members.len(), k);
            picked.sort_unstable_by(|a, b| b.cmp(a));
            let now = Instant::now();
            picked.into_iter().map(|i| n.remove(i, now)).collect()
        };
        let k = gone.len();
        stopped += k;
        // Stopped as a process exits: its connections close.
        drop(gone);
        let t = Instant::now();
        for j in 0..k {
            let at = t + Duration::from_secs_f64(j as f64 / p.rate);
            tokio::time::sleep_until(at.into()).await;
            let l = start_leaf(next_serial, bootstrap, Some(&p.rules)).await?;
            net.lock().expect("net").add(next_serial, l);
            next_serial += 1;
        }
        rounds += 1;
    }
    tokio::time::sleep_until((start + p.churn).into()).await;
    let during = {
        let mut n = net.lock().expect("net");
        n.sample(Instant::now());
        n.snapshot()
    };
    let settled = settle(p, net, start + p.churn, rng).await;
    let live = net.lock().expect("net").members.len();
    Ok(Churned {
        start,
        rounds,
        stopped,
        unattached,
        during,
        live,
        settled,
    })
}

async fn teardown(net: &Shared) {
    let members: Vec<Member> = std::mem::take(&mut net.lock().expect("net").members);
    drop(members);
    tokio::time::sleep(Duration::from_millis(500)).await;
}

type Shared = Arc<Mutex<Net>>;

/// The running leaves and what has been seen of them.
struct Net {
    members: Vec<Member>,
    /// Supernodes that are not leaves (the seed, the dedicated ones).
    fixed: Vec<Arc<supernode::State>>,
    /// Leaves holding the supernode role at the last sample.
    supernodes: usize,
    tally: Tally,
}

struct Member {
    serial: usize,
    leaf: TestLeaf,
    promotions: u64,
    supernode: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    promotions: u64,
    demotions: u64,
    departed_supernodes: u64,
    supernodes: usize,
}

impl Counters {
    fn since(&self, before: &Counters) -> Counters {
        Counters {
            promotions: self.promotions - before.promotions,
            demotions: self.demotions - before.demotions,
            departed_supernodes: self.departed_supernodes - before.departed_supernodes,
            supernodes: self.supernodes,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Caps {
    checked: u64,
    over: u64,
    most_over: usize,
}

#[derive(Default)]
struct Tally {
    counters: Counters,
    /// (when, promoted: true / stepped down: false).
    events: Vec<(Instant, bool)>,
    /// Promotions of each stopped leaf.
    departed_promotions: Vec<u64>,
    caps: Caps,
    /// (when, leaves holding the role), on every change.
    series: Vec<(Instant, usize)>,
}

impl Tally {
    /// Promotions in [from, to) that came within `FLAP_WINDOW` of a step-down.
    fn regrown(&self, from: Instant, to: Instant) -> usize {
        self.events
            .iter()
            .filter(|(t, promoted)| *promoted && *t >= from && *t < to)
            .filter(|(t, _)| {
                self.events.iter().any(|(d, promoted)| {
                    !*promoted && d <= t && t.saturating_duration_since(*d) <= FLAP_WINDOW
                })
            })
            .count()
    }
}

impl Net {
    fn shared(fixed: Vec<Arc<supernode::State>>) -> Shared {
        Arc::new(Mutex::new(Net {
            members: Vec::new(),
            fixed,
            supernodes: 0,
            tally: Tally::default(),
        }))
    }

    fn add(&mut self, serial: usize, leaf: TestLeaf) {
        self.members.push(Member {
            serial,
            leaf,
            promotions: 0,
            supernode: false,
        });
    }

    fn unattached(&self) -> usize {
        self.members
            .iter()
            .filter(|m| m.leaf.leaf().supernodes().is_empty())
            .count()
    }

    /// Takes member `i` out, counting it one last time.
    fn remove(&mut self, i: usize, now: Instant) -> Member {
        observe(&mut self.members[i], now, &mut self.tally);
        let m = self.members.swap_remove(i);
        if m.supernode {
            self.tally.counters.departed_supernodes += 1;
        }
        self.tally.departed_promotions.push(m.promotions);
        m
    }

    /// Counts promotions and step-downs since the last sample; checks caps.
    fn sample(&mut self, now: Instant) {
        let mut holding = 0;
        for m in &mut self.members {
            observe(m, now, &mut self.tally);
            holding += usize::from(m.supernode);
            if let Some(state) = m.leaf.leaf().role().state() {
                check_cap(&state, &mut self.tally.caps);
            }
        }
        for state in &self.fixed {
            check_cap(state, &mut self.tally.caps);
        }
        if holding != self.supernodes || self.tally.series.is_empty() {
            self.tally.series.push((now, holding));
        }
        self.supernodes = holding;
    }

    fn snapshot(&self) -> Counters {
        Counters {
            supernodes: self.supernodes,
            ..self.tally.counters
        }
    }

    /// Leaves (running or stopped) promoted more than once, and the most
    /// promotions of one leaf.
    fn promoted_more_than_once(&self) -> (usize, u64) {
        let all = self
            .members
            .iter()
            .map(|m| m.promotions)
            .chain(self.tally.departed_promotions.iter().copied());
        all.fold((0, 0), |(n, most), p| (n + usize::from(p > 1), most.max(p)))
    }
}

fn check_cap(state: &supernode::State, caps: &mut Caps) {
    let leaves = state.leaves.len();
    caps.checked += 1;
    if leaves > state.config.max_leaves {
        caps.over += 1;
        caps.most_over = caps.most_over.max(leaves - state.config.max_leaves);
    }
}

/// Reads a leaf's promotions and role and counts what changed: every new
/// promotion, and every time in the role that has ended.
fn observe(m: &mut Member, now: Instant, tally: &mut Tally) {
    let role = m.leaf.leaf().role();
    // The count goes up under the role's lock, with the role taken: read
    // it on both sides of the role for a consistent pair.
    let (promotions, supernode) = loop {
        let before = role.promotions();
        let holds = role.is_supernode();
        if role.promotions() == before {
            break (before, holds);
        }
    };
    let new = promotions - m.promotions;
    let ended = (u64::from(m.supernode) + new).saturating_sub(u64::from(supernode));
    for _ in 0..new {
        tally.events.push((now, true));
    }
    for _ in 0..ended {
        tally.events.push((now, false));
    }
    tally.counters.promotions += new;
    tally.counters.demotions += ended;
    m.promotions = promotions;
    m.supernode = supernode;
}

fn spawn_sampler(net: Shared) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            net.lock().expect("net").sample(Instant::now());
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    })
}

/// Leaves holding the role every 5 s of growth.
fn print_timeline(net: &Shared, t0: Instant) {
    let n = net.lock().expect("net");
    let series = &n.tally.series;
    let Some(&(last, _)) = series.last() else {
        return;
    };
    let mut out = Vec::new();
    let mut at = t0;
    loop {
        let held = series
            .iter()
            .take_while(|(t, _)| *t <= at)
            .last()
            .map_or(0, |&(_, h)| h);
        out.push(format!("{}s:{held}", at.duration_since(t0).as_secs()));
        if at >= last {
            break;
        }
        at += Duration::from_secs(5);
    }
    println!("  elected supernodes over time: {}", out.join(" "));
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".into(), |d| format!("{:.1}", d.as_secs_f64()))
}

/// xorshift64*: a reproducible choice of leaves without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// `k` distinct indices below `n` (all of them if `k >= n`).
    fn pick(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        let k = k.min(n);
        for i in 0..k {
            let j = i + (self.next() % (n - i) as u64) as usize;
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into());
    let files = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{cpus} CPUs, {model}, load average {load}, open files limit {files}")
}

fn debug_unattached(net: &Shared, sns: &[Supernode]) {
    let n = net.lock().expect("net");
    let loads: Vec<usize> = sns.iter().map(|s| s.leaf_count()).collect();
    println!("dedicated loads: {loads:?}");
    let nb: Vec<usize> = sns.iter().map(|s| s.neighbours().len()).collect();
    println!("dedicated neighbours: {nb:?}");
    let links: Vec<usize> = n
        .members
        .iter()
        .map(|m| m.leaf.leaf().supernodes().len())
        .collect();
    println!("links per leaf: {links:?}");
    for m in n
        .members
        .iter()
        .filter(|m| m.leaf.leaf().supernodes().is_empty())
        .take(3)
    {
        let cache = leaf::attach::load_cache(m.leaf.data.path());
        println!(
            "unattached leaf {} knows {} supernodes",
            m.serial,
            cache.len()
        );
    }
}
