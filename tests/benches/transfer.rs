//! Leaf-to-leaf download throughput against a bare quinn bulk transfer, on
//! loopback, in the same run.
//!
//! Ours: a source leaf shares one file of incompressible bytes, and a
//! downloader `Client` runs `get` (locate through the supernode, connect,
//! transfer, hash every byte, write the partial file, sync, rename).
//! Baseline: two `supernode::net::Endpoint`s (the same rustls provider, TLS
//! and transport settings as ours) and one bidirectional stream on which the
//! server writes the same number of bytes from memory and the client reads
//! and discards them. Rounds alternate ours and baseline so that machine
//! noise falls on both.
//!
//! `cargo bench -p servent-tests --bench transfer` runs the full size
//! (`SERVENT_BENCH_BYTES`, default 1 GiB) for `SERVENT_BENCH_ROUNDS` rounds
//! (default 5) after one uncounted warm-up round, and prints the medians.
//! Invoked any other way (as `cargo test --all-targets` does), it makes one
//! quick 4 MiB round, so that test runs stay fast.
//!
//! CPU columns are the CPU time of the whole process (both nodes, or both
//! endpoints, and the supernode) during the round, on Linux.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use servent_proto::ContentHash;
use servent_tests::{random_bytes, supernode, wait_for, Client, Supernode, TestLeaf};
use supernode::net::{self, Endpoint, Identity};

const FULL_BYTES: u64 = 1 << 30;
const QUICK_BYTES: u64 = 4 << 20;
const FULL_ROUNDS: usize = 5;
/// Size of the pieces the test file is written in, and of the buffer the
/// baseline server sends over and over.
const PIECE: usize = 4 << 20;
const BASELINE_ALPN: &[u8] = b"servent-bench/1";
/// Hashing 1 GiB takes a few seconds in release; leave room for slow disks.
const INDEX_TIMEOUT: Duration = Duration::from_secs(300);
const LOCATE_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    // cargo bench passes `--bench`; cargo test passes nothing (or a filter).
    let full = std::env::args().any(|a| a == "--bench");
    let bytes = match std::env::var("SERVENT_BENCH_BYTES") {
        Ok(v) => v
            .parse()
            .context("SERVENT_BENCH_BYTES must be a number of bytes")?,
        Err(_) if full => FULL_BYTES,
        Err(_) => QUICK_BYTES,
    };
    let rounds = match std::env::var("SERVENT_BENCH_ROUNDS") {
        Ok(v) => v.parse().context("SERVENT_BENCH_ROUNDS must be a number")?,
        Err(_) if full => FULL_ROUNDS,
        Err(_) => 1,
    };
    ensure!(
        bytes > 0 && rounds > 0,
        "need at least one byte and one round"
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(bytes, rounds, full))
}

async fn run(bytes: u64, rounds: usize, warm_up: bool) -> Result<()> {
    println!(
        "transfer: {bytes} bytes ({:.1} MiB) leaf to leaf vs bare quinn, loopback, \
         {rounds} round(s){}",
        bytes as f64 / (1 << 20) as f64,
        if warm_up { " after a warm-up" } else { "" },
    );

    let sn = supernode().await;
    let (source, hash) = source_leaf(&sn, bytes).await?;
    let downloader_data = tempfile::tempdir()?;
    let client = Client::new(downloader_data.path(), vec![sn.addr().to_string()])?;
    let out_dir = tempfile::tempdir()?;
    let baseline = Baseline::start()?;

    // MB/s and CPU seconds of each counted round.
    let (mut ours, mut ours_cpu, mut bare, mut bare_cpu) = (vec![], vec![], vec![], vec![]);
    println!();
    println!(
        "{:>7}  {:>10}  {:>9}  {:>10}  {:>9}",
        "round", "leaf MB/s", "leaf CPU", "quinn MB/s", "quinn CPU"
    );
    let mut previous: Option<PathBuf> = None;
    let first = if warm_up { 0 } else { 1 };
    for round in first..=rounds {
        // The last download is deleted just before the next one rather than
        // right after it: see "Freed memory" in docs/BENCHMARKS.md.
        if let Some(p) = previous.take() {
            std::fs::remove_file(p)?;
        }
        let out = out_dir.path().join(format!("download-{round}.bin"));
        let cpu = cpu_seconds();
        let a = leaf_download(&client, hash, &out, bytes).await?;
        let cpu_a = cpu_seconds() - cpu;
        previous = Some(out);
        let cpu = cpu_seconds();
        let b = baseline.transfer(bytes).await?;
        let cpu_b = cpu_seconds() - cpu;
        let label = if round == 0 {
            "warm-up".to_string()
        } else {
            round.to_string()
        };
        let (a, b) = (mbps(bytes, a), mbps(bytes, b));
        println!("{label:>7}  {a:>10.1}  {cpu_a:>8.2}s  {b:>10.1}  {cpu_b:>8.2}s");
        if round > 0 {
            ours.push(a);
            ours_cpu.push(cpu_a);
            bare.push(b);
            bare_cpu.push(cpu_b);
        }
    }
    let (ours, bare) = (median(&mut ours), median(&mut bare));
    println!(
        "{:>7}  {ours:>10.1}  {:>8.2}s  {bare:>10.1}  {:>8.2}s",
        "median",
        median(&mut ours_cpu),
        median(&mut bare_cpu)
    );
    println!();
    println!("leaf/quinn ratio: {:.2}", ours / bare);

    drop(source);
    Ok(())
}

/// Writes `bytes` of incompressible content into a new share, piece by piece,
/// and starts a leaf sharing it; returns once the supernode has indexed it.
async fn source_leaf(sn: &Supernode, bytes: u64) -> Result<(TestLeaf, ContentHash)> {
    let data = tempfile::tempdir()?;
    let share = tempfile::tempdir()?;
    let path = share.path().join("big.bin");
    let hash = tokio::task::spawn_blocking(move || write_file(&path, bytes)).await??;

    let mut leaf = TestLeaf {
        leaf: None,
        attach: leaf::attach::DEFAULT_ATTACH,
        data,
        share,
    };
    let started = Instant::now();
    leaf.restart(&[sn]).await;
    let indexed = wait_for(INDEX_TIMEOUT, || async {
        let l = leaf.leaf();
        l.share().len() == 1 && !l.indexed().is_empty() && l.indexed().iter().all(|&n| n == 1)
    })
    .await;
    if indexed.is_err() {
        bail!(
            "the source leaf did not get its file indexed within {} s",
            INDEX_TIMEOUT.as_secs()
        );
    }
    eprintln!(
        "source leaf hashed and indexed {bytes} bytes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((leaf, hash))
}

fn write_file(path: &Path, bytes: u64) -> Result<ContentHash> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut hasher = blake3::Hasher::new();
    let mut left = bytes;
    let mut seed = 1;
    while left > 0 {
        let piece = random_bytes(PIECE.min(left as usize), seed);
        hasher.update(&piece);
        f.write_all(&piece)?;
        left -= piece.len() as u64;
        seed += 1;
    }
    f.into_inner()?.sync_all()?;
    Ok(ContentHash(*hasher.finalize().as_bytes()))
}

/// One `get` into `out`, timed; checks the size.
async fn leaf_download(
    client: &Client,
    hash: ContentHash,
    out: &Path,
    bytes: u64,
) -> Result<Duration> {
    let started = Instant::now();
    let got: PathBuf = client.get(hash, Some(out), LOCATE_TIMEOUT).await?;
    let took = started.elapsed();
    let len = std::fs::metadata(&got)?.len();
    ensure!(len == bytes, "downloaded {len} bytes, expected {bytes}");
    Ok(took)
}

/// Two bare endpoints with our TLS and transport settings, and a server that
/// sends as many bytes from memory as each request asks for.
struct Baseline {
    server: Endpoint,
    client: Endpoint,
    server_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Baseline {
    fn start() -> Result<Self> {
        let server = Endpoint::bind(
            Arc::new(Identity::generate()?),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &[BASELINE_ALPN],
        )?;
        let server_addr = server.local_addr()?;
        let client = Endpoint::client(Arc::new(Identity::generate()?), server_addr)?;
        let buf = Bytes::from(random_bytes(PIECE, 0xBA5E));
        let task = tokio::spawn(serve_baseline(server.clone(), buf));
        Ok(Self {
            server,
            client,
            server_addr,
            task,
        })
    }

    /// Connects, asks for `bytes`, reads and discards them; timed like ours
    /// from before the connection to the last byte.
    async fn transfer(&self, bytes: u64) -> Result<Duration> {
        let started = Instant::now();
        let peer = self
            .client
            .connect(self.server_addr, BASELINE_ALPN, Some(self.server.id()))
            .await?;
        let (mut send, mut recv) = peer.conn.open_bi().await?;
        send.write_all(&bytes.to_le_bytes()).await?;
        send.finish()?;
        let mut got = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            got += chunk.bytes.len() as u64;
        }
        let took = started.elapsed();
        peer.conn.close(0u32.into(), b"done");
        ensure!(
            got == bytes,
            "baseline received {got} bytes, expected {bytes}"
        );
        Ok(took)
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        self.task.abort();
        self.server.close();
        self.client.close();
    }
}

async fn serve_baseline(endpoint: Endpoint, buf: Bytes) {
    while let Some(incoming) = endpoint.quinn().accept().await {
        let buf = buf.clone();
        tokio::spawn(async move {
            let Ok(peer) = net::accept(incoming).await else {
                return;
            };
            while let Ok((mut send, mut recv)) = peer.conn.accept_bi().await {
                let mut len = [0u8; 8];
                if recv.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut left = u64::from_le_bytes(len);
                while left > 0 {
                    let n = buf.len().min(left as usize);
                    if send.write_chunk(buf.slice(..n)).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = send.finish();
                let _ = send.stopped().await;
            }
        });
    }
}

/// CPU time (user + system, all threads) this process has used so far, from
/// `/proc/self/stat` in clock ticks of 1/100 s; 0 where that is unavailable.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at `state`;
    // utime and stime are the 12th and 13th of them.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// Megabytes (10^6 bytes) per second.
fn mbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}
