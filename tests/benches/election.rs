//! Network growth by election: how long 200 leaves joining a network seeded
//! by one small supernode take until every one is attached and its file can
//! be found, beside the same 200 leaves joining dedicated supernodes that
//! were deployed beforehand (the baseline, same run); then how many
//! promotions and step-downs churn causes, and whether the network is whole
//! again after it.
//!
//! Everything runs in this process on 127.0.0.1.
//!
//! - **Baseline**: `ceil(leaves × 3 / max_leaves) + 3` dedicated supernodes
//!   (room for every leaf's 3 links), election disabled, each dialling the
//!   first and the previous one; the mesh is left to fill in (every
//!   supernode with `min(8, n - 1)` neighbours) before the first leaf
//!   starts, and that time is not counted. Each leaf is given all their
//!   addresses, in an order of its own, as a deployed network's leaves
//!   would be (`SERVENT_BENCH_BASELINE_BOOTSTRAP=one`: only the first's).
//!   Leaves may not be promoted.
//! - **Election**: one seed supernode with the same `max_leaves`, the only
//!   address every leaf is given; the seed and every elected leaf apply the
//!   election rules printed at the start (`ElectionConfig::quick()` made a
//!   little slower; `SERVENT_BENCH_ELECTION=quick`: exactly `quick()`).
//!
//! Both use the supernode defaults but for a longer search time (see
//! `SEARCH_MS`). Leaf *i* starts at *i* / rate seconds and shares one file,
//! `file i.bin`, of its own. Times are from the first leaf's start:
//! - **all attached**: every leaf has at least one supernode (first seen,
//!   polled every 100 ms);
//! - **every file found**: the end of the first search round, begun once
//!   all were attached, in which every leaf's file was found by at least
//!   one of a random sample of leaves searching at once (`Client::search`
//!   for "file" on the sample leaf's data dir, as `leaf search` without
//!   `--supernode` does);
//! - **all found by all**: the end of the first round in which every
//!   sampled leaf found every file (waited for at most `EVERYONE_WAIT` more).
//!
//! Promotions and step-downs are counted exactly, from each leaf's
//! `Role::promotions()` and whether it holds the role now (sampled every
//! 100 ms, and once more when a leaf is stopped): a running leaf that held
//! the role and no longer does stepped down. Supernode caps (leaves
//! registered ≤ `max_leaves`) are checked at every sample.
//!
//! Churn (election network only): every 3 s a random 10% of the running
//! leaves are stopped (elected supernodes among them, as chance has it) and
//! as many new leaves, each with a new file and only the seed's address,
//! start. After the churn period the same checks run on the leaves then
//! running (hits of stopped leaves' files count as stale).
//!
//! `cargo bench -p servent-tests --bench election` runs 200 leaves
//! (`SERVENT_BENCH_LEAVES`), `max_leaves` 10 (`SERVENT_BENCH_MAX_LEAVES`),
//! 20 leaf starts a second (`SERVENT_BENCH_RATE`), 30 s of churn
//! (`SERVENT_BENCH_CHURN_SECS`), a sample of 10 searchers
//! (`SERVENT_BENCH_SAMPLE`); `SERVENT_BENCH_SEED` fixes the random choices,
//! `SERVENT_BENCH_SEARCH_MS` and `SERVENT_BENCH_TTL` the supernodes' search
//! time and query TTL, `SERVENT_BENCH_ONLY=baseline|election` runs one
//! network, `SERVENT_BENCH_VERBOSE=1` prints every search round. Invoked any
//! other way (as `cargo test --all-targets` does) it grows 10 leaves with
//! `max_leaves` 3 under `ElectionConfig::quick()` and churns for 4 s, so CI
//! stays fast.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use servent_proto::limits::MAX_RESULTS;
use servent_tests::bench;
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
/// How long a supernode lets a search of its leaves run, in ms: the
/// default 3000 is too short on a loaded 2-CPU machine running hundreds of
/// nodes (searches then miss files for want of CPU, not of reach).
const SEARCH_MS: u32 = 10_000;
/// A search may take this much longer than the supernodes' search time.
const SEARCH_SLACK: Duration = Duration::from_secs(7);
/// Longest wait for all leaves to be attached and found.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Once every file has been found by someone, longest further wait for a
/// round in which every searcher finds every file.
const EVERYONE_WAIT: Duration = Duration::from_secs(20);
const MESH_TIMEOUT: Duration = Duration::from_secs(60);
/// A promotion this soon after a step-down somewhere in the network counts
/// as re-growing what was just given up.
const FLAP_WINDOW: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    bench::init_logging();
    let full = bench::full_mode();
    let params = Params::from_env(full)?;
    bench::block_on(run(params))
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
    /// Supernode settings other than the election and `max_leaves`.
    base: supernode::Config,
}

impl Params {
    fn from_env(full: bool) -> Result<Self> {
        let leaves = bench::setting("SERVENT_BENCH_LEAVES", full, FULL_LEAVES, QUICK_LEAVES)?;
        let max_leaves = bench::setting(
            "SERVENT_BENCH_MAX_LEAVES",
            full,
            FULL_MAX_LEAVES,
            QUICK_MAX_LEAVES,
        )?;
        let rate = bench::env_or("SERVENT_BENCH_RATE", RATE)?;
        let sample = bench::setting("SERVENT_BENCH_SAMPLE", full, FULL_SAMPLE, QUICK_SAMPLE)?;
        let churn = Duration::from_secs_f64(bench::setting(
            "SERVENT_BENCH_CHURN_SECS",
            full,
            FULL_CHURN.as_secs_f64(),
            QUICK_CHURN.as_secs_f64(),
        )?);
        let seed = bench::env_or(
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
        // The quick run (CI) takes the quickest rules, to stay short.
        let quick_rules = match std::env::var("SERVENT_BENCH_ELECTION") {
            Ok(v) => v == "quick",
            Err(_) => !full,
        };
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
        let mut base = supernode::Config::localhost();
        base.search_time_ms = bench::env_or("SERVENT_BENCH_SEARCH_MS", SEARCH_MS)?;
        base.query_ttl = bench::env_or("SERVENT_BENCH_TTL", base.query_ttl)?;
        Ok(Self {
            base,
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

    /// A supernode's settings: `max_leaves`, electing by `rules` or not at all.
    fn supernode(&self, rules: Option<&ElectionConfig>) -> supernode::Config {
        supernode::Config {
            max_leaves: self.max_leaves,
            election: rules.cloned().unwrap_or(ElectionConfig {
                enabled: false,
                ..ElectionConfig::default()
            }),
            ..self.base.clone()
        }
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
    println!(
        "supernodes: query TTL {}, search time {} ms, {} neighbours wanted (at most {})",
        p.base.query_ttl, p.base.search_time_ms, p.base.target_neighbors, p.base.max_neighbors
    );
    println!("machine: {}", machine());
    let mut rng = Rng::new(p.seed);
    let only = std::env::var("SERVENT_BENCH_ONLY").unwrap_or_default();
    ensure!(
        ["", "baseline", "election"].contains(&only.as_str()),
        "SERVENT_BENCH_ONLY must be baseline or election"
    );

    let base = if only != "election" {
        let b = baseline(&p, &mut rng).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        Some(b)
    } else {
        None
    };
    let elect = if only != "baseline" {
        Some(election(&p, &mut rng).await?)
    } else {
        None
    };

    // Summary.
    println!();
    println!("growth, times from the first leaf's start (s):");
    println!(
        "{:<21} {:>9} {:>12} {:>16} {:>24} {:>17} {:>10}",
        "",
        "all began",
        "all attached",
        "every file found",
        "each searcher then found",
        "all found by all",
        "supernodes"
    );
    let rows = [
        ("baseline (dedicated)", base.as_ref().map(|b| &b.growth)),
        ("election (1 seed)", elect.as_ref().map(|e| &e.growth)),
    ];
    for (name, g) in rows {
        if let Some(g) = g {
            println!(
                "{name:<21} {:>9.1} {:>12} {:>16} {:>24} {:>17} {:>10}",
                g.started.as_secs_f64(),
                secs(g.settled.attached),
                secs(g.settled.searchable),
                share_found(&g.settled.found_then, g.settled.expected),
                secs(g.settled.everyone),
                g.supernodes
            );
        }
    }
    if let (Some(b), Some(e)) = (&base, &elect) {
        let (b, e) = (&b.growth, &e.growth);
        let ratio = |name: &str, bt: Option<Duration>, et: Option<Duration>| match (bt, et) {
            (Some(bt), Some(et)) => println!(
                "ratio election / baseline, {name}: {:.2}x ({:.1} s vs {:.1} s; after the last \
                 leaf began {:.1} s vs {:.1} s)",
                et.as_secs_f64() / bt.as_secs_f64(),
                et.as_secs_f64(),
                bt.as_secs_f64(),
                et.saturating_sub(e.started).as_secs_f64(),
                bt.saturating_sub(b.started).as_secs_f64(),
            ),
            _ => println!("ratio election / baseline, {name}: n/a (not reached in time)"),
        };
        ratio("all attached", b.settled.attached, e.settled.attached);
        ratio(
            "every file found",
            b.settled.searchable,
            e.settled.searchable,
        );
        ratio(
            "all found by all searchers",
            b.settled.everyone,
            e.settled.everyone,
        );
    }
    if let Some(e) = &elect {
        e.print(&p);
    }
    for (name, caps) in [
        ("baseline", base.as_ref().map(|b| b.caps)),
        ("election", elect.as_ref().map(|e| e.caps)),
    ] {
        if let Some(c) = caps {
            println!(
                "{name}: supernodes over max_leaves in {} of {} checks (most over: {})",
                c.over, c.checked, c.most_over
            );
        }
    }

    // Every leaf attached and its file found at all is the least to expect.
    let mut failed = Vec::new();
    if base
        .as_ref()
        .is_some_and(|b| b.growth.settled.searchable.is_none())
    {
        failed.push("baseline growth");
    }
    if let Some(e) = &elect {
        if e.growth.settled.searchable.is_none() {
            failed.push("election growth");
        }
        if e.churned.settled.searchable.is_none() {
            failed.push("election after churn");
        }
    }
    ensure!(
        failed.is_empty(),
        "not every leaf attached and its file found in time: {}",
        failed.join(", ")
    );
    Ok(())
}

struct Baseline {
    growth: Growth,
    caps: Caps,
}

/// The same leaves joining dedicated supernodes deployed beforehand.
async fn baseline(p: &Params, rng: &mut Rng) -> Result<Baseline> {
    let n = p.dedicated();
    let mesh_started = Instant::now();
    let dedicated = dedicated_network(p, n).await?;
    // Leaves of a deployed network are given its supernodes (each in its
    // own order); with `one`, only the first, as in the election network.
    let one = std::env::var("SERVENT_BENCH_BASELINE_BOOTSTRAP").is_ok_and(|v| v == "one");
    println!(
        "\nbaseline: {n} dedicated supernodes meshed in {:.1} s (not counted); each leaf is \
         given {}",
        mesh_started.elapsed().as_secs_f64(),
        if one {
            "the first one's address"
        } else {
            "all their addresses, in a random order"
        }
    );
    let mut addrs: Vec<String> = dedicated.iter().map(|s| s.addr().to_string()).collect();
    if one {
        addrs.truncate(1);
    }
    let net = Net::shared(dedicated.iter().map(|s| s.state().clone()).collect());
    let sampler = spawn_sampler(net.clone());
    let growth = grow(p, &net, &addrs, None, rng).await?;
    sampler.abort();
    growth.print("baseline (dedicated)");
    println!("  mesh: {}", mesh_report(&net));
    println!("  links: {}", links_report(&net));
    if growth.settled.attached.is_none() {
        let with_room: Vec<usize> = dedicated
            .iter()
            .map(|s| s.leaf_count())
            .filter(|&l| l < p.max_leaves)
            .collect();
        println!(
            "  meanwhile {} dedicated supernodes had room ({} free places)",
            with_room.len(),
            with_room.iter().map(|l| p.max_leaves - l).sum::<usize>()
        );
    }
    let caps = net.lock().expect("net").tally.caps;
    teardown(&net).await;
    drop(dedicated);
    Ok(Baseline { growth, caps })
}

struct Election {
    growth: Growth,
    churned: Churned,
    caps: Caps,
    /// Counters at the end of growth, of churn, and of settling.
    after_growth: Counters,
    end: Counters,
    /// [from, to) of growth, churn and settling, for re-growth counts.
    regrown: [usize; 3],
    twice: usize,
    most: u64,
}

impl Election {
    fn print(&self, p: &Params) {
        let growth = self.after_growth.since(&Counters::default());
        let during = self.churned.during.since(&self.after_growth);
        let settle = self.end.since(&self.churned.during);
        println!();
        println!(
            "{:<24} {:>10} {:>10} {:>14} {:>14}",
            "election network", "promotions", "step-downs", "elected quit", "re-grown ≤10s"
        );
        for (i, (name, c)) in [
            ("growth", growth),
            ("churn", during),
            ("after churn, settling", settle),
        ]
        .into_iter()
        .enumerate()
        {
            println!(
                "{name:<24} {:>10} {:>10} {:>14} {:>14}",
                c.promotions, c.demotions, c.departed_supernodes, self.regrown[i]
            );
        }
        println!(
            "leaves promoted more than once: {} (most promotions of one leaf: {}); \
             leaves holding the role: {} after growth, {} at the end",
            self.twice, self.most, self.after_growth.supernodes, self.end.supernodes
        );
        let c = &self.churned;
        println!(
            "churn: {} rounds in {} s, {} leaves stopped and as many started; leaves without a \
             supernode just before each round: {:?}",
            c.rounds,
            p.churn.as_secs_f64(),
            c.stopped,
            c.unattached
        );
        println!(
            "when the churn ended, {} leaves had no supernode; supernodes they knew, as \
             known×leaves: {}",
            c.orphans_know.len(),
            histogram(&c.orphans_know)
        );
        println!(
            "after churn ({} leaves running), from its end: all attached at {} s, every file \
             found at {} s (each searcher then found {}), all found by all at {} s; stale hits \
             (files of stopped leaves) in the last round: {}",
            c.live,
            secs(c.settled.attached),
            secs(c.settled.searchable),
            share_found(&c.settled.found_then, c.settled.expected),
            secs(c.settled.everyone),
            c.settled.stale
        );
    }
}

/// One seed supernode; the rest grown out of the leaves; then churn.
async fn election(p: &Params, rng: &mut Rng) -> Result<Election> {
    let seed = supernode_with(p.supernode(Some(&p.rules))).await;
    let net = Net::shared(vec![seed.state().clone()]);
    let sampler = spawn_sampler(net.clone());
    let bootstrap = vec![seed.addr().to_string()];
    println!();
    let growth = grow(p, &net, &bootstrap, Some(&p.rules), rng).await?;
    growth.print("election");
    println!("  mesh: {}", mesh_report(&net));
    println!("  links: {}", links_report(&net));
    let after_growth = net.lock().expect("net").snapshot();

    let churned = churn(p, &net, &bootstrap, rng).await?;
    sampler.abort();
    println!(
        "  (churn began at {:.0} s)",
        churned.start.duration_since(growth.t0).as_secs_f64()
    );
    print_timeline(&net, growth.t0);
    let end_at = Instant::now();
    let (end, regrown, (twice, most), caps) = {
        let mut n = net.lock().expect("net");
        n.sample(end_at);
        let churn_end = churned.start + p.churn;
        let regrown = [
            n.tally.regrown(growth.t0, churned.start),
            n.tally.regrown(churned.start, churn_end),
            n.tally.regrown(churn_end, end_at + SAMPLE_EVERY),
        ];
        (
            n.snapshot(),
            regrown,
            n.promoted_more_than_once(),
            n.tally.caps,
        )
    };
    teardown(&net).await;
    drop(seed);
    Ok(Election {
        growth,
        churned,
        caps,
        after_growth,
        end,
        regrown,
        twice,
        most,
    })
}

/// `n` dedicated supernodes, election off, each dialling the first and the
/// previous one; returns once every one has `min(8, n - 1)` neighbours.
async fn dedicated_network(p: &Params, n: usize) -> Result<Vec<Supernode>> {
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
                peers,
                ..p.supernode(None)
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
    p: &Params,
    serial: usize,
    bootstrap: Vec<String>,
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
        // max_leaves and peers come from the election.
        role: p.supernode(rules),
        ..leaf::Config::localhost(data.path(), share.path(), bootstrap)
    };
    let leaf = Leaf::spawn(config).await.context("leaf starts")?;
    Ok(TestLeaf {
        leaf: Some(leaf),
        attach: ATTACH,
        max_upload_rate: None,
        ui: false,
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
            "{name}: {} leaves began in {:.1} s; {} supernodes when settled",
            self.settled.expected,
            self.started.as_secs_f64(),
            self.supernodes
        );
        self.settled.print("times from the first leaf's start");
    }
}

/// Starts `p.leaves` leaves at `p.rate` a second and waits until all are
/// attached and found.
async fn grow(
    p: &Params,
    net: &Shared,
    bootstrap: &[String],
    rules: Option<&ElectionConfig>,
    rng: &mut Rng,
) -> Result<Growth> {
    let t0 = Instant::now();
    for i in 0..p.leaves {
        let at = t0 + Duration::from_secs_f64(i as f64 / p.rate);
        tokio::time::sleep_until(at.into()).await;
        let order = rng.pick(bootstrap.len(), bootstrap.len());
        let addrs = order.into_iter().map(|j| bootstrap[j].clone()).collect();
        let l = start_leaf(p, i, addrs, rules).await?;
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
    /// End of the first round (started once every leaf had been attached)
    /// in which every running leaf's file was found by some sampled leaf.
    searchable: Option<Duration>,
    /// Files each sampled leaf found in that round.
    found_then: Vec<usize>,
    /// End of the first round in which every sampled leaf found every file.
    everyone: Option<Duration>,
    rounds: usize,
    last_round: Duration,
    /// Files found by each sampled leaf in the last round.
    found: Vec<usize>,
    /// Most hits of files no running leaf shares, in the last round.
    stale: usize,
    /// Files no sampled leaf found in the last round.
    missed_by_all: usize,
    /// Running leaves with no supernode holding their file (last round).
    unindexed: usize,
    unattached: usize,
    /// How many supernodes each leaf without one knew, when given up on.
    orphans_know: Vec<usize>,
}

impl Settled {
    fn print(&self, name: &str) {
        println!(
            "  {name}: all attached at {} s; every file found at {} s (each searcher then \
             found {}); every searcher found every file at {} s; {} search rounds, the last \
             took {:.1} s",
            secs(self.attached),
            secs(self.searchable),
            share_found(&self.found_then, self.expected),
            secs(self.everyone),
            self.rounds,
            self.last_round.as_secs_f64()
        );
        if self.rounds == 0 {
            println!(
                "  never all attached: {} leaves without a supernode; supernodes they knew \
                 (their supernodes.json), as known×leaves: {}",
                self.unattached,
                histogram(&self.orphans_know)
            );
        } else if self.everyone.is_none() {
            println!(
                "  last round: {} leaves without a supernode, each searcher found {} of {} \
                 files, {} found by nobody, {} leaves with their file indexed nowhere, \
                 {} stale hits",
                self.unattached,
                share_found(&self.found, self.expected),
                self.expected,
                self.missed_by_all,
                self.unindexed,
                self.stale
            );
        }
    }
}

/// "value×count" for each value, most frequent first.
fn histogram(values: &[usize]) -> String {
    let mut counts = std::collections::BTreeMap::new();
    for v in values {
        *counts.entry(*v).or_insert(0usize) += 1;
    }
    let mut pairs: Vec<(usize, usize)> = counts.into_iter().collect();
    pairs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    if pairs.is_empty() {
        return "-".into();
    }
    pairs
        .iter()
        .map(|(v, n)| format!("{v}×{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// "min–max (mean x%)" of files found per searcher.
fn share_found(found: &[usize], expected: usize) -> String {
    if found.is_empty() {
        return "-".into();
    }
    let mean = found.iter().sum::<usize>() as f64 / found.len() as f64;
    format!(
        "{}–{} (mean {:.0}%)",
        found.iter().min().unwrap_or(&0),
        found.iter().max().unwrap_or(&0),
        100.0 * mean / expected.max(1) as f64
    )
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
                s.orphans_know = net.lock().expect("net").orphans_know();
                return s;
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
            continue;
        }
        s.attached.get_or_insert(t0.elapsed());
        let round = Instant::now();
        let timeout = Duration::from_millis(p.base.search_time_ms.into()) + SEARCH_SLACK;
        let results = search_round(dirs, timeout).await;
        s.rounds += 1;
        s.last_round = round.elapsed();
        s.found = results
            .iter()
            .map(|r| r.intersection(&expected).count())
            .collect();
        s.stale = results
            .iter()
            .map(|r| r.difference(&expected).count())
            .max()
            .unwrap_or(0);
        s.missed_by_all = expected
            .iter()
            .filter(|f| results.iter().all(|r| !r.contains(f)))
            .count();
        s.unindexed = {
            let n = net.lock().expect("net");
            n.members
                .iter()
                .filter(|m| m.leaf.leaf().indexed().iter().all(|&i| i == 0))
                .count()
        };
        if std::env::var_os("SERVENT_BENCH_VERBOSE").is_some() {
            println!(
                "  round {} at {:.1} s ({:.1} s): found {:?} of {}, missed by all {}, \
                 unindexed {}; mesh: {}",
                s.rounds,
                t0.elapsed().as_secs_f64(),
                s.last_round.as_secs_f64(),
                s.found,
                expected.len(),
                s.missed_by_all,
                s.unindexed,
                mesh_report(net)
            );
        }
        if s.missed_by_all == 0 && s.searchable.is_none() {
            s.searchable = Some(t0.elapsed());
            s.found_then = s.found.clone();
        }
        if s.found.iter().all(|&f| f == expected.len()) {
            s.everyone = Some(t0.elapsed());
            return s;
        }
        let give_up = match s.searchable {
            Some(at) => (t0 + at + EVERYONE_WAIT).min(deadline),
            None => deadline,
        };
        if Instant::now() >= give_up {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Each leaf of `dirs` searches for "file" at once; for each, how many of
/// the `expected` files it found and how many other files.
async fn search_round(dirs: Vec<PathBuf>, timeout: Duration) -> Vec<HashSet<usize>> {
    let mut tasks = tokio::task::JoinSet::new();
    for dir in dirs {
        tasks.spawn(async move {
            let client = Client::new(&dir, vec![]).ok()?;
            client
                .search(&["file".to_string()], MAX_RESULTS, timeout)
                .await
                .ok()
        });
    }
    tasks
        .join_all()
        .await
        .into_iter()
        .map(|hits| {
            hits.unwrap_or_default()
                .iter()
                .filter_map(|h| serial_of(h.name()))
                .collect()
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
    /// Supernodes known to each leaf without one, when the churn ended.
    orphans_know: Vec<usize>,
    live: usize,
    settled: Settled,
}

/// Every `p.churn_every`, stops a random 10% of the running leaves and
/// starts as many new ones; then waits for the network to settle.
async fn churn(p: &Params, net: &Shared, bootstrap: &[String], rng: &mut Rng) -> Result<Churned> {
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
            let l = start_leaf(p, next_serial, bootstrap.to_vec(), Some(&p.rules)).await?;
            net.lock().expect("net").add(next_serial, l);
            next_serial += 1;
        }
        rounds += 1;
    }
    tokio::time::sleep_until((start + p.churn).into()).await;
    let (during, orphans_know) = {
        let mut n = net.lock().expect("net");
        n.sample(Instant::now());
        (n.snapshot(), n.orphans_know())
    };
    let settled = settle(p, net, start + p.churn, rng).await;
    println!("after churn ({} s):", p.churn.as_secs_f64());
    settled.print("times from the end of the churn");
    println!("  mesh: {}", mesh_report(net));
    println!("  links: {}", links_report(net));
    let live = net.lock().expect("net").members.len();
    Ok(Churned {
        start,
        rounds,
        stopped,
        unattached,
        during,
        orphans_know,
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
    /// Promotions in [from, to) that re-grew a step-down: each step-down
    /// pairs with at most one promotion that followed it within
    /// `FLAP_WINDOW`, oldest first.
    fn regrown(&self, from: Instant, to: Instant) -> usize {
        let mut events = self.events.clone();
        events.sort_by_key(|e| e.0);
        let mut pending = std::collections::VecDeque::new();
        let mut paired = 0;
        for (at, promoted) in events {
            if !promoted {
                pending.push_back(at);
                continue;
            }
            while pending
                .front()
                .is_some_and(|d| at.saturating_duration_since(*d) > FLAP_WINDOW)
            {
                pending.pop_front();
            }
            if pending.pop_front().is_some() && at >= from && at < to {
                paired += 1;
            }
        }
        paired
    }
}

impl Net {
    /// Every supernode now: the fixed ones, then the leaves holding the role.
    fn supernode_states(&self) -> Vec<Arc<supernode::State>> {
        self.fixed
            .iter()
            .cloned()
            .chain(
                self.members
                    .iter()
                    .filter_map(|m| m.leaf.leaf().role().state()),
            )
            .collect()
    }

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

    /// For each leaf without a supernode, how many supernodes it knows.
    fn orphans_know(&self) -> Vec<usize> {
        self.members
            .iter()
            .filter(|m| m.leaf.leaf().supernodes().is_empty())
            .map(|m| leaf::attach::load_cache(m.leaf.data.path()).len())
            .collect()
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
    let leaves = state.leaf_count();
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
    println!(
        "  leaves holding the supernode role over time: {}",
        out.join(" ")
    );
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
    let files = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).map(str::to_string))
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{}, open files limit {files}", bench::machine())
}

/// The mesh as the supernodes see it now: neighbour counts, and how many
/// of the other supernodes a query can reach within its TTL.
fn mesh_report(net: &Shared) -> String {
    let states = net.lock().expect("net").supernode_states();
    let ids: Vec<servent_proto::NodeId> = states.iter().map(|s| s.id).collect();
    let index: std::collections::HashMap<servent_proto::NodeId, usize> =
        ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let adj: Vec<Vec<usize>> = states
        .iter()
        .map(|s| {
            s.neighbours()
                .iter()
                .filter_map(|(id, _)| index.get(id).copied())
                .collect()
        })
        .collect();
    let mut degrees: Vec<usize> = adj.iter().map(Vec::len).collect();
    degrees.sort_unstable();
    let ttl = states
        .first()
        .map_or(0, |s| usize::from(s.config.query_ttl));
    let n = adj.len();
    let (mut least, mut sum) = (1.0f64, 0.0f64);
    for start in 0..n {
        let mut depth = vec![usize::MAX; n];
        depth[start] = 0;
        let mut queue = std::collections::VecDeque::from([start]);
        while let Some(v) = queue.pop_front() {
            if depth[v] == ttl {
                continue;
            }
            for &w in &adj[v] {
                if depth[w] == usize::MAX {
                    depth[w] = depth[v] + 1;
                    queue.push_back(w);
                }
            }
        }
        let reached = depth.iter().filter(|&&d| d != usize::MAX).count() as f64 / n as f64;
        least = least.min(reached);
        sum += reached;
    }
    if n == 0 {
        return "no supernodes".into();
    }
    // Links one side has and the other has not (yet).
    let one_sided = adj
        .iter()
        .enumerate()
        .map(|(v, ws)| ws.iter().filter(|&&w| !adj[w].contains(&v)).count())
        .sum::<usize>();
    let mut component = vec![usize::MAX; n];
    let mut sizes = Vec::new();
    for start in 0..n {
        if component[start] != usize::MAX {
            continue;
        }
        let c = sizes.len();
        component[start] = c;
        let mut stack = vec![start];
        let mut size = 0;
        while let Some(v) = stack.pop() {
            size += 1;
            for w in adj[v]
                .iter()
                .copied()
                .chain((0..n).filter(|&u| adj[u].contains(&v)))
            {
                if component[w] == usize::MAX {
                    component[w] = c;
                    stack.push(w);
                }
            }
        }
        sizes.push(size);
    }
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let alone: Vec<usize> = states
        .iter()
        .zip(&adj)
        .filter(|(s, ws)| ws.is_empty() && s.neighbour_count() == 0)
        .map(|(s, _)| s.leaf_count())
        .collect();
    format!(
        "{n} supernodes, neighbours min/median/max {}/{}/{}, {one_sided} one-sided links, \
         {} parts (largest {}; {} without any neighbour, holding {} leaves), within TTL {ttl} \
         a supernode reaches {:.0}% of them on average (least {:.0}%)",
        degrees[0],
        degrees[n / 2],
        degrees[n - 1],
        sizes.len(),
        sizes[0],
        alone.len(),
        alone.iter().sum::<usize>(),
        100.0 * sum / n as f64,
        100.0 * least
    )
}

/// Supernode links of the leaves, and the load of the supernodes.
fn links_report(net: &Shared) -> String {
    let n = net.lock().expect("net");
    let mut per_leaf = [0usize; ATTACH + 2];
    for m in &n.members {
        let links = m.leaf.leaf().supernodes().len().min(ATTACH + 1);
        per_leaf[links] += 1;
    }
    let states = n.supernode_states();
    let registered: usize = states.iter().map(|s| s.leaf_count()).sum();
    let capacity: usize = states.iter().map(|s| s.config.max_leaves).sum();
    let high = states
        .iter()
        .filter(|s| {
            s.leaf_count() * 1000
                >= s.config.max_leaves * s.config.election.high_water_permille as usize
        })
        .count();
    format!(
        "leaves with 0/1/2/3 supernode links: {:?}; {registered} registrations in {capacity} \
         places ({:.0}% full), {high} of {} supernodes at or over the high-water mark",
        &per_leaf[..=ATTACH],
        100.0 * registered as f64 / capacity.max(1) as f64,
        states.len()
    )
}
