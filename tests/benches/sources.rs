//! A download from four rate-limited sources at once, on loopback: does the
//! downloader get the sum of their upload rates?
//!
//! Four source leaves share the same file of incompressible bytes, each
//! started with `max_upload_rate = Some(R)`. Once the supernode has indexed
//! all four (a hash query names four sources), a downloader `Client` runs
//! `get` as `leaf get` does; its wall time, locate included, gives the
//! aggregate rate, printed beside the ideal 4 × R and their ratio (the
//! target is at least 0.9). The baseline is arithmetic here: the sources'
//! caps, which loopback and the CPU exceed many times over (see the transfer
//! bench). Each round also shows how many bytes each source uploaded.
//!
//! `cargo bench -p servent-tests --bench sources` runs R = 25 MB/s
//! (`SERVENT_BENCH_RATE`, bytes a second) with a 1 GB file
//! (`SERVENT_BENCH_BYTES`), which takes about 10 s at 4 × R, for 3 rounds
//! (`SERVENT_BENCH_ROUNDS`), and prints the median. Invoked any other way (as
//! `cargo test --all-targets` does), it makes one quick round: 8 MiB at
//! R = 4 MB/s.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use servent_proto::ContentHash;
use servent_tests::bench::{self, cpu_seconds, mbps, median};
use servent_tests::{supernode, wait_for, Client, Leaf, Supernode};

const SOURCES: usize = 4;
const FULL_RATE: u64 = 25_000_000;
const QUICK_RATE: u64 = 4_000_000;
/// About 10 s at 4 × 25 MB/s.
const FULL_BYTES: u64 = 1_000_000_000;
const QUICK_BYTES: u64 = 8 << 20;
const FULL_ROUNDS: usize = 3;
/// The aggregate rate, as a share of 4 × R, that the download should reach.
const TARGET: f64 = 0.9;
const FILE_NAME: &str = "big.bin";
/// Four leaves hash 1 GB at once; leave room for slow disks.
const INDEX_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for a hash query to name all four sources.
const LOCATE_WAIT: Duration = Duration::from_secs(30);
const LOCATE_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    bench::init_logging();
    let full = bench::full_mode();
    let rate = bench::setting("SERVENT_BENCH_RATE", full, FULL_RATE, QUICK_RATE)?;
    let bytes = bench::setting("SERVENT_BENCH_BYTES", full, FULL_BYTES, QUICK_BYTES)?;
    let rounds = bench::setting("SERVENT_BENCH_ROUNDS", full, FULL_ROUNDS, 1)?;
    ensure!(
        rate > 0 && bytes > 0 && rounds > 0,
        "need a positive rate, at least one byte and one round"
    );
    bench::block_on(run(rate, bytes, rounds))
}

/// A source leaf with its own data dir and share folder.
struct Source {
    leaf: Leaf,
    _data: tempfile::TempDir,
    _share: tempfile::TempDir,
}

impl Source {
    /// Bytes of file content this source has uploaded so far.
    fn uploaded(&self) -> u64 {
        self.leaf.uploads().bytes.get()
    }
}

async fn run(rate: u64, bytes: u64, rounds: usize) -> Result<()> {
    let ideal = SOURCES as f64 * rate as f64 / 1e6;
    println!(
        "sources: {bytes} bytes ({:.1} MiB) from {SOURCES} sources capped at {:.1} MB/s each \
         (4 x R = {ideal:.1} MB/s), loopback, {rounds} round(s)",
        bytes as f64 / (1 << 20) as f64,
        rate as f64 / 1e6,
    );
    println!("machine: {}", bench::machine());

    let sn = supernode().await;
    let file_dir = tempfile::tempdir()?;
    let file = file_dir.path().join(FILE_NAME);
    let hash = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || bench::write_file(&file, bytes)).await??
    };
    let started = Instant::now();
    let mut sources = Vec::new();
    for _ in 0..SOURCES {
        sources.push(source(&sn, &file, rate).await?);
    }
    let indexed = wait_for(INDEX_TIMEOUT, || async {
        sources.iter().all(|s| {
            let l = &s.leaf;
            l.share().len() == 1 && !l.indexed().is_empty() && l.indexed().iter().all(|&n| n == 1)
        })
    })
    .await;
    if indexed.is_err() {
        bail!(
            "the sources did not all get their file indexed within {} s",
            INDEX_TIMEOUT.as_secs()
        );
    }
    let downloader_data = tempfile::tempdir()?;
    let client = Client::new(downloader_data.path(), vec![sn.addr().to_string()])?;
    let located = wait_for(LOCATE_WAIT, || async {
        matches!(
            client.locate(hash, LOCATE_TIMEOUT).await,
            Ok(Some(hit)) if hit.sources.len() == SOURCES
        )
    })
    .await;
    if located.is_err() {
        bail!(
            "a hash query did not name all {SOURCES} sources within {} s",
            LOCATE_WAIT.as_secs()
        );
    }
    eprintln!(
        "{SOURCES} sources hashed and indexed {bytes} bytes in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let out_dir = tempfile::tempdir()?;
    let mut got = Vec::new();
    println!();
    println!(
        "{:>6}  {:>9}  {:>8}  {:>8}  bytes uploaded by each source (MB)",
        "round", "MB/s", "of 4 x R", "CPU"
    );
    let mut previous: Option<PathBuf> = None;
    for round in 1..=rounds {
        // As in the transfer bench: delete the last download just before the
        // next one.
        if let Some(p) = previous.take() {
            std::fs::remove_file(p)?;
        }
        let out = out_dir.path().join(format!("download-{round}.bin"));
        let before: Vec<u64> = sources.iter().map(Source::uploaded).collect();
        let cpu = cpu_seconds();
        let took = download(&client, hash, &out, bytes).await?;
        let cpu = cpu_seconds() - cpu;
        previous = Some(out);
        let split = sources
            .iter()
            .zip(&before)
            .map(|(s, b)| format!("{:.1}", (s.uploaded() - b) as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(" / ");
        let m = mbps(bytes, took);
        println!(
            "{round:>6}  {m:>9.1}  {:>8.2}  {cpu:>7.2}s  {split}",
            m / ideal
        );
        got.push(m);
    }
    let m = median(&mut got);
    println!();
    println!("median aggregate: {m:.1} MB/s; 4 x R: {ideal:.1} MB/s");
    println!(
        "aggregate/(4 x R) ratio: {:.2} (target >= {TARGET})",
        m / ideal
    );

    for s in sources {
        s.leaf.shutdown().await;
    }
    Ok(())
}

/// Starts a leaf that shares `file` (hard-linked into a share folder of its
/// own) and uploads at most `rate` bytes a second.
async fn source(sn: &Supernode, file: &Path, rate: u64) -> Result<Source> {
    let data = tempfile::tempdir()?;
    let share = tempfile::tempdir()?;
    let name = file.file_name().context("the file has no name")?;
    let link = share.path().join(name);
    if std::fs::hard_link(file, &link).is_err() {
        std::fs::copy(file, &link)?;
    }
    let config = leaf::Config {
        max_upload_rate: Some(rate),
        no_promote: true,
        ..leaf::Config::localhost(data.path(), share.path(), vec![sn.addr().to_string()])
    };
    let leaf = Leaf::spawn(config).await?;
    Ok(Source {
        leaf,
        _data: data,
        _share: share,
    })
}

/// One `get` into `out`, timed from before the locate to the renamed file;
/// checks the size.
async fn download(client: &Client, hash: ContentHash, out: &Path, bytes: u64) -> Result<Duration> {
    let started = Instant::now();
    let got = client.get(hash, Some(out), LOCATE_TIMEOUT).await?;
    let took = started.elapsed();
    let len = std::fs::metadata(&got)?.len();
    ensure!(len == bytes, "downloaded {len} bytes, expected {bytes}");
    Ok(took)
}
