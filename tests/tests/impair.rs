//! The real binaries over an impaired network: 2 supernodes and 3 leaves,
//! each in a network namespace of its own, joined by a router namespace
//! that drops 5 % of the packets each way and caps every link at 20 Mbit/s
//! each way (`servent_tests::lab`). With those, at least 99 % of 100
//! searches must find what they look for, and a 64 MiB download must
//! complete and verify. The figures are printed as JSON lines.
//!
//! Needs root, `ip netns`, `iptables` and `tc`; without them it says why
//! and passes without running. CI runs as root and has all three.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use servent_tests::bins::{self, path_arg, Process};
use servent_tests::lab::{self, Host, Lab};

/// Share of packets dropped, each way.
const LOSS: f64 = 0.05;
/// Rate cap of every link, each way.
const RATE: &str = "20mbit";
const RATE_BITS: f64 = 20e6;
/// Searches measured, and how many run at once.
const SEARCHES: usize = 100;
const SEARCHERS: usize = 4;
const BIG: u64 = 64 << 20;
const SUPERNODE_PORT: u16 = 7400;
const LEAF_PORT: u16 = 7401;

/// Starting is a key pair, a bind and a folder scan (64 MiB hashed).
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Until every shared file is findable, on the unimpaired network.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// `leaf search --timeout`, and the longest one search process may run.
const SEARCH_SECS: &str = "5";
const SEARCH_LIMIT: Duration = Duration::from_secs(20);
/// 64 MiB at 20 Mbit/s takes 27 s; loss slows QUIC's congestion control.
const DOWNLOAD_LIMIT: Duration = Duration::from_secs(240);

#[test]
fn searches_and_a_download_survive_loss_and_a_rate_cap() {
    if let Some(why) = lab::unavailable() {
        eprintln!("SKIPPED searches_and_a_download_survive_loss_and_a_rate_cap: {why}");
        return;
    }
    let bins = bins::binaries().expect("the binaries build");
    let tmp = servent_tests::bins::Scratch::new().expect("tempdir");
    let dir = |name: &str| tmp.dir(name).expect("mkdir");
    // Processes are declared after the lab, so they are killed before its
    // namespaces go (the lab would kill them anyway).
    let mut lab = Lab::new().expect("lab router");
    let (sn_addrs, mut procs) = lab
        .start_supernodes(&bins, 2, SUPERNODE_PORT, tmp.path(), START_TIMEOUT, &[])
        .expect("supernodes start");
    let leaf_hosts: Vec<Host> = ["a", "b", "c"]
        .iter()
        .map(|n| lab.add_host(&format!("leaf{n}")).expect("leaf host"))
        .collect();

    // Leaf a and b share the big file (two sources); each leaf has a small one.
    let big_share = dir("share-a");
    let big_hash =
        bins::write_random_file(&big_share.join("impair-big.bin"), BIG, 7).expect("big file");
    let mut small = Vec::new();
    for (k, word) in ["alpha", "beta", "gamma"].iter().enumerate() {
        let share = dir(&format!("share-{}", ["a", "b", "c"][k]));
        if k == 1 {
            std::fs::hard_link(
                big_share.join("impair-big.bin"),
                share.join("impair-big.bin"),
            )
            .expect("link the big file");
        }
        let content = servent_tests::random_bytes(4096 + k, 100 + k as u64);
        std::fs::write(share.join(format!("impair-{word}.txt")), &content).expect("small file");
        small.push((
            word.to_string(),
            blake3::hash(&content).to_hex().to_string(),
        ));
        let data = dir(&format!("leaf-{k}"));
        let listen = format!("0.0.0.0:{LEAF_PORT}");
        let cmd = bins::leaf_command(
            &bins,
            &leaf_hosts[k].netns,
            &sn_addrs,
            &data,
            &[
                "serve",
                "--share",
                &path_arg(&share),
                "--listen",
                &listen,
                "--no-promote",
            ],
        );
        procs.push(Process::start(cmd, "leaf", START_TIMEOUT).expect("leaf serve starts"));
    }

    // Searches and the download run from leaf c's host, on data dirs of
    // their own.
    let searcher = &leaf_hosts[2];
    let search = |data: &Path, word: &str| {
        let cmd = bins::leaf_command(
            &bins,
            &searcher.netns,
            &sn_addrs,
            data,
            &["search", "--json", "--timeout", SEARCH_SECS, word],
        );
        bins::run(cmd, SEARCH_LIMIT)
    };

    // Ready once, unimpaired, every small file is found and the big one
    // has both its sources.
    let ready_dir = dir("client-ready");
    let started = Instant::now();
    loop {
        let smalls = small
            .iter()
            .all(|(word, hash)| bins::has_hit(&search(&ready_dir, word).stdout, hash));
        let big = search(&ready_dir, "big");
        let big_sources = big.stdout.lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            (v["hash"].as_str() == Some(&big_hash)).then(|| v["sources"].as_u64())?
        });
        if smalls && big_sources == Some(2) {
            break;
        }
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "network not ready within {READY_TIMEOUT:?} (big file sources: {big_sources:?}); \
             last search stderr:\n{}",
            big.stderr
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "network ready in {:.1} s; impairing: {:.0} % loss, {RATE}",
        started.elapsed().as_secs_f64(),
        LOSS * 100.0
    );
    lab.impair(LOSS, RATE).expect("impair the lab");

    // Searches for leaf a's and leaf b's small files (other hosts than the
    // searcher's), a few at a time.
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(bool, Duration, String)>> = Mutex::new(Vec::new());
    // A data dir (so a node id) per search: four workers asking one after
    // another would go over one node's query limit (10 a second, bursts of
    // 20) when the network is fast, and this test is about loss.
    let search_dirs: Vec<_> = (0..SEARCHES)
        .map(|i| dir(&format!("client-search-{i}")))
        .collect();
    let searches_started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..SEARCHERS {
            let (next, results, small, search) = (&next, &results, &small, &search);
            let search_dirs = &search_dirs;
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= SEARCHES {
                    return;
                }
                let (word, hash) = &small[i % 2];
                let out = search(&search_dirs[i], word);
                let ok = out.success() && bins::has_hit(&out.stdout, hash);
                let why = match ok {
                    true => String::new(),
                    false => format!(
                        "search {i} ({word}): {:?} after {:?}, stdout {:?}, stderr tail {:?}",
                        out.status,
                        out.took,
                        out.stdout,
                        tail(&out.stderr, 400)
                    ),
                };
                results.lock().expect("results").push((ok, out.took, why));
            });
        }
    });
    let searches_took = searches_started.elapsed();
    let results = results.into_inner().expect("results");
    let ok = results.iter().filter(|r| r.0).count();
    let mut took: Vec<Duration> = results.iter().map(|r| r.1).collect();
    took.sort();
    let rate = ok as f64 / SEARCHES as f64;
    println!(
        "{}",
        serde_json::json!({
            "test": "impair", "figure": "searches", "loss": LOSS, "rate": RATE,
            "n": SEARCHES, "concurrent": SEARCHERS, "ok": ok, "success_rate": rate,
            "p50_ms": bins::quantile(&took, 0.5).as_millis() as u64,
            "p95_ms": bins::quantile(&took, 0.95).as_millis() as u64,
            "max_ms": bins::quantile(&took, 1.0).as_millis() as u64,
            "total_s": searches_took.as_secs_f64(),
        })
    );
    for (_, _, why) in results.iter().filter(|r| !r.0) {
        eprintln!("failed {why}");
    }

    // The big file, from leaves a and b to c's host.
    let out_file = tmp.path().join("downloaded.bin");
    let get = bins::leaf_command(
        &bins,
        &searcher.netns,
        &sn_addrs,
        &dir("client-get"),
        &[
            "get",
            "--out",
            &path_arg(&out_file),
            "--timeout",
            "10",
            &big_hash,
        ],
    );
    let got = bins::run(get, DOWNLOAD_LIMIT);
    let got_hash = match got.success() {
        true => bins::hash_file(&out_file).ok(),
        false => None,
    };
    let verified = got_hash.as_deref() == Some(big_hash.as_str());
    let secs = got.took.as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "test": "impair", "figure": "download", "loss": LOSS, "rate": RATE,
            "bytes": BIG, "ok": got.success(), "verified": verified, "secs": secs,
            "mbit_per_s": BIG as f64 * 8.0 / secs / 1e6,
            "share_of_cap": BIG as f64 * 8.0 / secs / RATE_BITS,
        })
    );
    if let Some((seen, dropped)) = lab.packet_counts() {
        println!(
            "{}",
            serde_json::json!({
                "test": "impair", "figure": "router_packets", "forwarded_or_dropped": seen,
                "dropped": dropped, "dropped_share": dropped as f64 / seen.max(1) as f64,
            })
        );
    }

    for p in &mut procs {
        assert!(
            p.running(),
            "a node exited under impairment; stderr:\n{}",
            p.stderr()
        );
    }
    assert!(
        ok * 100 >= SEARCHES * 99,
        "only {ok} of {SEARCHES} searches succeeded under {LOSS} loss and {RATE}"
    );
    assert!(
        got.success(),
        "leaf get failed ({:?} after {:?}); stderr tail:\n{}",
        got.status,
        got.took,
        tail(&got.stderr, 2000)
    );
    assert!(
        verified,
        "downloaded file hashes to {got_hash:?}, not {big_hash}"
    );
}

/// The last `n` bytes or so of `s`.
fn tail(s: &str, n: usize) -> &str {
    let mut cut = s.len().saturating_sub(n);
    while !s.is_char_boundary(cut) {
        cut += 1;
    }
    &s[cut..]
}
