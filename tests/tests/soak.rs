//! Soak: two real `supernode` processes, a few stable `leaf serve`s, and
//! leaves joining and leaving every second (each second one new leaf with
//! a fresh identity starts and the oldest of the churning ones stops, by
//! SIGTERM or SIGKILL in turn), for `SERVENT_SOAK_SECS` seconds (default
//! 300, as in CI; 3600 by hand), while a client keeps searching for the
//! stable leaves' files.
//!
//! Each supernode's resident memory (`VmRSS`) and open file descriptors
//! are sampled after a warm-up and at the end, with the churn running
//! both times, and must end within 10 % of where they started. A small
//! absolute floor (4 MiB of RSS, 4 descriptors) keeps a tiny baseline from
//! making the test flaky: a supernode starts at about 13 MiB, where 10 % is
//! a few new threads' stacks and malloc arenas; the floor is no larger, so
//! that a leak of a few MiB an hour still shows in an hour's run. At least
//! 99 % of the searches must succeed. The figures are printed as JSON
//! lines, with each supernode's samples over the soak.
//!
//! Real processes, not in-process nodes, because the test process's own
//! RSS would include every node and this harness; on loopback, so it needs
//! nothing of the machine but /proc.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use servent_tests::bins::{self, Binaries, Process};

const DEFAULT_SECS: u64 = 300;
const MIN_SECS: u64 = 20;
const STABLE_LEAVES: usize = 3;
/// Churning leaves alive at once, once the churn is under way.
const CHURN_LIVE: usize = 5;
const CHURN_EVERY: Duration = Duration::from_secs(1);
const SEARCH_EVERY: Duration = Duration::from_millis(500);
const SAMPLES: u64 = 10;
/// Growth allowed, as a share of the baseline (RSS and descriptors alike).
const GROWTH_SHARE: f64 = 0.10;
const RSS_FLOOR: u64 = 4 << 20;
const FDS_FLOOR: usize = 4;
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a leaf told to stop may take before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const INDEX_TIMEOUT: Duration = Duration::from_secs(30);
const SEARCH_SECS: &str = "5";
const SEARCH_LIMIT: Duration = Duration::from_secs(20);

fn soak_secs() -> u64 {
    match std::env::var("SERVENT_SOAK_SECS") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("SERVENT_SOAK_SECS={v:?}: {e}"))
            .max(MIN_SECS),
        Err(_) => DEFAULT_SECS,
    }
}

fn path_arg(p: &Path) -> String {
    p.to_str().expect("utf-8 temp path").to_string()
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    l.local_addr().expect("local addr").port()
}

/// `GET path` over HTTP/1.1 → the body parsed as JSON (bounded wait).
fn get_json(addr: SocketAddr, path: &str) -> Option<Value> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = Vec::new();
    s.take(1 << 20).read_to_end(&mut body).ok()?;
    let text = String::from_utf8_lossy(&body);
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

/// A supernode process and where its `/status` is.
struct Supernode {
    proc: Process,
    http: SocketAddr,
}

impl Supernode {
    fn start(bins: &Binaries, data: &Path, peers: &[String]) -> Self {
        let http = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let mut args = vec![
            "--listen".to_string(),
            "127.0.0.1:0".to_string(),
            "--data-dir".to_string(),
            path_arg(data),
            "--http".to_string(),
            http.to_string(),
        ];
        for p in peers {
            args.extend(["--peer".to_string(), p.clone()]);
        }
        let proc = Process::start(
            bins::command(None, &bins.supernode, &args),
            "supernode",
            START_TIMEOUT,
        )
        .expect("supernode starts");
        Self { proc, http }
    }

    fn sample(&self) -> Sample {
        let pid = self.proc.pid();
        Sample {
            rss: bins::rss_bytes(pid).expect("supernode VmRSS"),
            fds: bins::open_fds(pid).expect("supernode fds"),
        }
    }

    /// (`leaves`, `files`) from `/status`.
    fn status(&self) -> Option<(u64, u64)> {
        let v = get_json(self.http, "/status")?;
        Some((v["leaves"].as_u64()?, v["files"].as_u64()?))
    }
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    rss: u64,
    fds: usize,
}

/// A `leaf serve` with its own folders (removed when it is dropped).
struct TestLeaf {
    proc: Process,
    _dir: tempfile::TempDir,
}

fn start_leaf(bins: &Binaries, supernodes: &[String], name: &str, content: &[u8]) -> TestLeaf {
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, share) = (dir.path().join("data"), dir.path().join("share"));
    std::fs::create_dir_all(&share).expect("mkdir share");
    std::fs::write(share.join(name), content).expect("shared file");
    let mut args = Vec::new();
    for sn in supernodes {
        args.extend(["--supernode".to_string(), sn.clone()]);
    }
    args.extend([
        "--data-dir".to_string(),
        path_arg(&data),
        "serve".to_string(),
        "--share".to_string(),
        path_arg(&share),
        "--listen".to_string(),
        "127.0.0.1:0".to_string(),
        "--no-promote".to_string(),
    ]);
    let proc = Process::start(
        bins::command(None, &bins.leaf, &args),
        "leaf",
        START_TIMEOUT,
    )
    .expect("leaf serve starts");
    TestLeaf { proc, _dir: dir }
}

fn search(bins: &Binaries, supernodes: &[String], data: &Path, word: &str) -> bins::Outcome {
    let mut args = Vec::new();
    for sn in supernodes {
        args.extend(["--supernode".to_string(), sn.clone()]);
    }
    args.extend([
        "--data-dir".to_string(),
        path_arg(data),
        "search".to_string(),
        "--json".to_string(),
        "--timeout".to_string(),
        SEARCH_SECS.to_string(),
        word.to_string(),
    ]);
    bins::run(bins::command(None, &bins.leaf, &args), SEARCH_LIMIT)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[test]
fn supernodes_hold_steady_under_leaf_churn() {
    if let Err(e) = std::fs::read_to_string("/proc/self/status") {
        eprintln!("SKIPPED supernodes_hold_steady_under_leaf_churn: no /proc to sample ({e})");
        return;
    }
    let secs = soak_secs();
    let duration = Duration::from_secs(secs);
    // Long enough that the churn is in full swing and the allocator has
    // grown its arenas; the baseline is taken then.
    let warm_up = Duration::from_secs((secs / 5).clamp(10, 120));
    let bins = bins::binaries().expect("the binaries build");
    let tmp = tempfile::tempdir().expect("tempdir");

    let first = Supernode::start(&bins, &tmp.path().join("sn0"), &[]);
    let meet_first = std::slice::from_ref(&first.proc.addr);
    let second = Supernode::start(&bins, &tmp.path().join("sn1"), meet_first);
    let mut supernodes = [first, second];
    let sn_addrs: Vec<String> = supernodes.iter().map(|s| s.proc.addr.clone()).collect();

    let mut stable = Vec::new();
    let mut wanted = Vec::new();
    for k in 0..STABLE_LEAVES {
        let content = servent_tests::random_bytes(8192 + k, 500 + k as u64);
        let word = format!("stable{k}");
        stable.push(start_leaf(
            &bins,
            &sn_addrs,
            &format!("soak-{word}.txt"),
            &content,
        ));
        wanted.push((word, blake3::hash(&content).to_hex().to_string()));
    }
    let client = tmp.path().join("client");
    let started = Instant::now();
    loop {
        let found = wanted
            .iter()
            .all(|(w, h)| bins::has_hit(&search(&bins, &sn_addrs, &client, w).stdout, h));
        if found {
            break;
        }
        assert!(
            started.elapsed() < INDEX_TIMEOUT,
            "the stable leaves' files were not all findable within {INDEX_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Searches run on their own thread for the whole soak.
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<(bool, Duration, String)>>> = Arc::default();
    let searcher = {
        let (bins, sn_addrs, stop, outcomes) = (
            bins.clone(),
            sn_addrs.clone(),
            stop.clone(),
            outcomes.clone(),
        );
        let wanted = wanted.clone();
        let limit = duration + Duration::from_secs(60);
        std::thread::spawn(move || {
            let began = Instant::now();
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) && began.elapsed() < limit {
                let (word, hash) = &wanted[i % wanted.len()];
                let out = search(&bins, &sn_addrs, &client, word);
                let ok = out.success() && bins::has_hit(&out.stdout, hash);
                let why = match ok {
                    true => String::new(),
                    false => format!(
                        "search {i} ({word}): {:?} after {:?}, stdout {:?}, stderr {:?}",
                        out.status, out.took, out.stdout, out.stderr
                    ),
                };
                outcomes.lock().expect("outcomes").push((ok, out.took, why));
                i += 1;
                std::thread::sleep(SEARCH_EVERY.saturating_sub(out.took));
            }
        })
    };

    // The churn, one step a second, sampling as it goes.
    let mut churn: VecDeque<TestLeaf> = VecDeque::new();
    let mut stopping: VecDeque<(Instant, TestLeaf)> = VecDeque::new();
    let (mut joined, mut left_term, mut left_kill, mut stop_overdue) = (0u64, 0u64, 0u64, 0u64);
    let mut baseline: Option<Vec<Sample>> = None;
    let mut series: Vec<Vec<Sample>> = vec![Vec::new(); supernodes.len()];
    let sample_every = (duration - warm_up) / SAMPLES as u32;
    let mut next_sample = warm_up;
    let soak_started = Instant::now();
    let mut tick = soak_started;
    let mut ticks = 0u64;
    while soak_started.elapsed() < duration {
        ticks += 1;
        assert!(ticks <= secs * 2 + 10, "the churn loop ran past its bound");
        for sn in supernodes.iter_mut() {
            assert!(
                sn.proc.running(),
                "a supernode exited; stderr:\n{}",
                sn.proc.stderr()
            );
        }
        let content = servent_tests::random_bytes(2048, 10_000 + joined);
        churn.push_back(start_leaf(
            &bins,
            &sn_addrs,
            &format!("soak-churn{joined}.txt"),
            &content,
        ));
        joined += 1;
        if churn.len() > CHURN_LIVE {
            let leaving = churn.pop_front().expect("a churning leaf");
            // In turn: a goodbye, and a crash the supernodes must notice.
            if (left_term + left_kill) % 2 == 0 {
                leaving.proc.signal_term();
                stopping.push_back((Instant::now(), leaving));
                left_term += 1;
            } else {
                drop(leaving);
                left_kill += 1;
            }
        }
        // Reap the leaves that were told to stop; kill those too slow to.
        while let Some((since, leaf)) = stopping.front_mut() {
            if !leaf.proc.running() {
                stopping.pop_front();
            } else if since.elapsed() > STOP_TIMEOUT {
                stop_overdue += 1;
                stopping.pop_front();
            } else {
                break;
            }
        }
        let now = soak_started.elapsed();
        if now >= next_sample {
            let samples: Vec<Sample> = supernodes.iter().map(Supernode::sample).collect();
            for (s, sample) in series.iter_mut().zip(&samples) {
                s.push(*sample);
            }
            baseline.get_or_insert(samples);
            next_sample += sample_every;
        }
        tick += CHURN_EVERY;
        // Pacing, not waiting on a condition: the churn's rate is the test.
        std::thread::sleep(tick.saturating_duration_since(Instant::now()));
    }
    // The end sample, with the churn still at its full size.
    let end: Vec<Sample> = supernodes.iter().map(Supernode::sample).collect();
    let statuses: Vec<_> = supernodes.iter().map(Supernode::status).collect();
    stop.store(true, Ordering::SeqCst);
    searcher.join().expect("searcher thread");
    let baseline = baseline.expect("a sample after the warm-up");

    let outcomes = std::mem::take(&mut *outcomes.lock().expect("outcomes"));
    let ok = outcomes.iter().filter(|o| o.0).count();
    let mut took: Vec<Duration> = outcomes.iter().map(|o| o.1).collect();
    took.sort();
    println!(
        "{}",
        json!({
            "test": "soak", "figure": "churn", "secs": secs, "warm_up_s": warm_up.as_secs(),
            "stable_leaves": STABLE_LEAVES, "churn_live": CHURN_LIVE, "joined": joined,
            "left_sigterm": left_term, "left_sigkill": left_kill,
            "sigterm_overdue": stop_overdue,
        })
    );
    println!(
        "{}",
        json!({
            "test": "soak", "figure": "searches", "n": outcomes.len(), "ok": ok,
            "success_rate": ok as f64 / outcomes.len().max(1) as f64,
            "p50_ms": bins::quantile(&took, 0.5).as_millis() as u64,
            "p95_ms": bins::quantile(&took, 0.95).as_millis() as u64,
            "max_ms": bins::quantile(&took, 1.0).as_millis() as u64,
        })
    );
    let mut grown = Vec::new();
    for (i, (start, end)) in baseline.iter().zip(&end).enumerate() {
        let rss_allowed = start.rss + ((start.rss as f64 * GROWTH_SHARE) as u64).max(RSS_FLOOR);
        let fds_allowed = start.fds + ((start.fds as f64 * GROWTH_SHARE) as usize).max(FDS_FLOOR);
        println!(
            "{}",
            json!({
                "test": "soak", "figure": "supernode", "index": i,
                "rss_start_mib": mib(start.rss), "rss_end_mib": mib(end.rss),
                "rss_allowed_mib": mib(rss_allowed),
                "rss_growth": end.rss as f64 / start.rss as f64 - 1.0,
                "fds_start": start.fds, "fds_end": end.fds, "fds_allowed": fds_allowed,
                "rss_series_mib": series[i].iter().map(|s| (mib(s.rss) * 10.0).round() / 10.0)
                    .collect::<Vec<_>>(),
                "fds_series": series[i].iter().map(|s| s.fds).collect::<Vec<_>>(),
                "status_leaves_files": statuses[i],
            })
        );
        if end.rss > rss_allowed {
            grown.push(format!(
                "supernode {i}: RSS {:.1} MiB -> {:.1} MiB (allowed {:.1})",
                mib(start.rss),
                mib(end.rss),
                mib(rss_allowed)
            ));
        }
        if end.fds > fds_allowed {
            grown.push(format!(
                "supernode {i}: open fds {} -> {} (allowed {fds_allowed})",
                start.fds, end.fds
            ));
        }
    }
    for o in outcomes.iter().filter(|o| !o.0) {
        eprintln!("failed {}", o.2);
    }
    assert!(
        ok * 100 >= outcomes.len() * 99 && !outcomes.is_empty(),
        "only {ok} of {} searches succeeded during the soak",
        outcomes.len()
    );
    assert!(
        grown.is_empty(),
        "grew over the soak:\n{}",
        grown.join("\n")
    );
    drop(stable);
}
