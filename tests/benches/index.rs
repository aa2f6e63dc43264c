//! The supernode's file index at 10 million files: memory per file, the
//! registration rate, keyword and hash query latency at that size, and the
//! memory given back once the leaves have left.
//!
//! The files: 100 a leaf (so 100 000 leaves at 10 M, each at an address of
//! its own), each with a BLAKE3 hash and a name drawn from a realistic
//! vocabulary: 30 000 words of 2 to 5 syllables picked by a Zipf law (as
//! words in titles are), four or five of them, a track number and an
//! extension, about 40 bytes a name (the bench prints the mean).
//!
//! Baselines, in the same run:
//! - memory: the same entries as a plain list, as the leaves' `Register`
//!   messages decode (owner id, hash, name, size; no way to look anything
//!   up), measured the same way once the index is gone; the ratio is the
//!   index's bytes a file over the list's;
//! - hash lookups: a `std::collections::HashMap` from hash to file number,
//!   asked the same hashes.
//!
//! Memory is the growth of this process's resident set (VmRSS), with the
//! allocator the binaries use. The bench draws bytes a file against files
//! indexed, for the index and the list, into `<target>/bench-index.svg`.
//!
//! `cargo bench -p servent-tests --bench index` indexes 10 M files
//! (`SERVENT_BENCH_FILES`); invoked any other way (as `cargo test
//! --all-targets` does) it indexes 20 000, so CI stays fast.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use plotters::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use servent_proto::keywords::words;
use servent_proto::msg::FileEntry;
use servent_proto::{ContentHash, NodeId};
use servent_tests::{bench, bins};
use supernode::index::{Index, IndexLimits};

/// The binaries' allocator (supernode/src/bin/supernode.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const FULL_FILES: usize = 10_000_000;
const QUICK_FILES: usize = 20_000;
const PER_LEAF: usize = 100;
const VOCABULARY: usize = 30_000;
/// The goal (issue 15) and the largest eDonkey server's figure.
const GOAL_BYTES: f64 = 128.0;
const RAZORBACK_BYTES: f64 = 94.0;
/// Points on the memory curve.
const POINTS: usize = 10;
const QUERIES: usize = 2_000;

/// This process's resident set.
fn rss_bytes() -> Result<u64> {
    bins::rss_bytes(std::process::id()).context("no VmRSS in /proc/self/status")
}

/// mimalloc gives freed pages back when a thread next allocates: nudge it
/// until the resident set is within `slack` of `floor`, for at most 5 s.
fn settle(floor: u64, slack: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = rss_bytes()?;
    while now > floor + slack && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        for n in 0..64 {
            drop(std::hint::black_box(vec![n as u8; 4096]));
        }
        now = rss_bytes()?;
    }
    Ok(now)
}

/// The words names are made of, and their Zipf weights as a cumulative
/// table.
struct Vocabulary {
    words: Vec<String>,
    cumulative: Vec<f64>,
}

impl Vocabulary {
    fn new(rng: &mut StdRng) -> Self {
        const ONSETS: &[&str] = &[
            "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
            "br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr",
        ];
        const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "ai", "ea", "ou", "y"];
        const CODAS: &[&str] = &["", "", "", "n", "r", "s", "t", "l", "nd", "ck"];
        let mut seen = std::collections::HashSet::new();
        let mut words = Vec::with_capacity(VOCABULARY);
        while words.len() < VOCABULARY {
            let syllables = rng.random_range(1..=3);
            let mut w = String::new();
            for _ in 0..syllables {
                w.push_str(ONSETS[rng.random_range(0..ONSETS.len())]);
                w.push_str(VOWELS[rng.random_range(0..VOWELS.len())]);
                w.push_str(CODAS[rng.random_range(0..CODAS.len())]);
            }
            if seen.insert(w.clone()) {
                words.push(w);
            }
        }
        let mut total = 0.0;
        let cumulative = (1..=VOCABULARY)
            .map(|rank| {
                total += 1.0 / rank as f64;
                total
            })
            .collect();
        Self { words, cumulative }
    }

    fn pick(&self, rng: &mut StdRng) -> &str {
        let last = *self.cumulative.last().expect("words");
        let x = rng.random::<f64>() * last;
        let i = self.cumulative.partition_point(|c| *c < x);
        &self.words[i.min(self.words.len() - 1)]
    }

    /// A name like a music library's: "artist words - title words 07.ext".
    fn name(&self, rng: &mut StdRng) -> String {
        const EXTS: &[&str] = &["mp3", "flac", "ogg", "m4a", "mp3", "mp3"];
        let artist = rng.random_range(1..=2);
        let title = rng.random_range(1..=3);
        let mut name = String::new();
        for i in 0..artist {
            if i > 0 {
                name.push(' ');
            }
            name.push_str(self.pick(rng));
        }
        name.push_str(" - ");
        for i in 0..title {
            if i > 0 {
                name.push(' ');
            }
            name.push_str(self.pick(rng));
        }
        let track = rng.random_range(1..=20);
        let ext = EXTS[rng.random_range(0..EXTS.len())];
        name.push_str(&format!(" {track:02}.{ext}"));
        name
    }
}

fn hash_of(i: usize) -> ContentHash {
    ContentHash(*blake3::hash(&(i as u64).to_le_bytes()).as_bytes())
}

fn leaf_of(j: usize) -> (NodeId, IpAddr) {
    let id = NodeId(*blake3::hash(format!("leaf {j}").as_bytes()).as_bytes());
    let ip = IpAddr::V4(Ipv4Addr::from(0x0A00_0000u32 + j as u32));
    (id, ip)
}

/// Leaf `j`'s files, the same each time they are made.
fn files_of(vocabulary: &Vocabulary, j: usize) -> Vec<FileEntry> {
    let mut rng = StdRng::seed_from_u64(j as u64);
    (j * PER_LEAF..(j + 1) * PER_LEAF)
        .map(|i| FileEntry {
            hash: hash_of(i),
            name: vocabulary.name(&mut rng),
            size: rng.random_range(1u64 << 20..64 << 20),
        })
        .collect()
}

fn quantile_us(sorted: &[Duration], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn latencies(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    (quantile_us(&v, 0.5), quantile_us(&v, 0.99))
}

fn main() -> Result<()> {
    let full = bench::full_mode();
    let files: usize = bench::setting("SERVENT_BENCH_FILES", full, FULL_FILES, QUICK_FILES)?;
    let leaves = files.div_ceil(PER_LEAF);
    let files = leaves * PER_LEAF;
    let vocabulary = Vocabulary::new(&mut StdRng::seed_from_u64(15));
    println!(
        "index bench: {files} files from {leaves} leaves, {}",
        bench::machine()
    );
    let step = leaves.div_ceil(POINTS).max(1);

    // The index.
    let base = rss_bytes()?;
    let index = Index::new(IndexLimits {
        files_per_leaf: PER_LEAF,
        entries: usize::MAX,
        entries_per_ip: usize::MAX,
        exempt: Vec::new(),
    });
    let mut curve = Vec::new();
    let mut adding = Duration::ZERO;
    for j in 0..leaves {
        let (id, ip) = leaf_of(j);
        let batch = files_of(&vocabulary, j);
        let t = Instant::now();
        index.add(id, ip, &batch).context("within the caps")?;
        adding += t.elapsed();
        if (j + 1) % step == 0 || j + 1 == leaves {
            let n = (j + 1) * PER_LEAF;
            curve.push((n, (rss_bytes()?.saturating_sub(base)) as f64 / n as f64));
        }
    }
    let filled = rss_bytes()?;
    let index_bytes = curve.last().expect("points").1;
    ensure!(
        index.entry_count() == files,
        "{} entries",
        index.entry_count()
    );
    ensure!(index.file_count() == files, "{} files", index.file_count());

    // Keyword queries: a word of the vocabulary (as often as names hold
    // it), and two words of a name indexed (a hit guaranteed).
    let mut rng = StdRng::seed_from_u64(99);
    let mut one_word = Vec::with_capacity(QUERIES);
    let mut two_words = Vec::with_capacity(QUERIES);
    let mut found = 0usize;
    for _ in 0..QUERIES {
        let q = vec![vocabulary.pick(&mut rng).to_string()];
        let t = Instant::now();
        found += index.search(&q, 100).found.len();
        one_word.push(t.elapsed());
        let j = rng.random_range(0..leaves);
        let name = &files_of(&vocabulary, j)[rng.random_range(0..PER_LEAF)].name;
        let w = words(name);
        let q = vec![w[0].clone(), w[w.len() - 2].clone()];
        let t = Instant::now();
        let hits = index.search(&q, 100).found.len();
        two_words.push(t.elapsed());
        ensure!(hits > 0, "no hit for {q:?}");
    }
    // Hash queries, beside a std HashMap from hash to number.
    let asked: Vec<ContentHash> = (0..QUERIES * 5)
        .map(|_| hash_of(rng.random_range(0..files)))
        .collect();
    let mut by_hash = Vec::with_capacity(asked.len());
    for h in &asked {
        let t = Instant::now();
        let f = index.get(h);
        by_hash.push(t.elapsed());
        ensure!(f.is_some_and(|f| f.owners.len() == 1), "hash not found");
    }
    let map: HashMap<ContentHash, u32> = (0..files).map(|i| (hash_of(i), i as u32)).collect();
    let mut by_map = Vec::with_capacity(asked.len());
    for h in &asked {
        let t = Instant::now();
        let f = std::hint::black_box(map.get(h));
        by_map.push(t.elapsed());
        ensure!(f.is_some(), "hash not in the map");
    }
    drop(map);

    // The leaves leave.
    let t = Instant::now();
    for j in 0..leaves {
        index.remove_owner(leaf_of(j).0);
    }
    let removing = t.elapsed();
    ensure!(
        index.entry_count() == 0 && index.file_count() == 0,
        "purged"
    );
    let grown = filled.saturating_sub(base);
    let left = settle(base, grown / 20)?;

    // The baseline: the entries as a plain list.
    // Measured after the index, from what is resident then: pages the
    // index gave back to the allocator but not to the system would count
    // for the list, never for the index.
    let start = rss_bytes()?;
    let mut list: Vec<(NodeId, FileEntry)> = Vec::with_capacity(files);
    let mut list_curve = Vec::new();
    let mut name_bytes = 0usize;
    for j in 0..leaves {
        let (id, _) = leaf_of(j);
        for e in files_of(&vocabulary, j) {
            name_bytes += e.name.len();
            list.push((id, e));
        }
        if (j + 1) % step == 0 || j + 1 == leaves {
            let n = (j + 1) * PER_LEAF;
            list_curve.push((n, rss_bytes()?.saturating_sub(start) as f64 / n as f64));
        }
    }
    let list_bytes = list_curve.last().expect("points").1;
    drop(std::hint::black_box(list));

    let (w1_50, w1_99) = latencies(one_word);
    let (w2_50, w2_99) = latencies(two_words);
    let (h50, h99) = latencies(by_hash);
    let (m50, m99) = latencies(by_map);
    println!(
        "names: {:.1} bytes on average, {VOCABULARY} words in the vocabulary",
        name_bytes as f64 / files as f64
    );
    println!("| what | index | baseline | ratio |");
    println!("|---|---:|---:|---:|");
    println!(
        "| bytes a file at {files} files | {index_bytes:.0} | plain list {list_bytes:.0} | {:.2} |",
        index_bytes / list_bytes
    );
    println!(
        "| hash query p50 / p99 (µs) | {h50:.2} / {h99:.2} | std HashMap {m50:.2} / {m99:.2} | {:.1} |",
        h50 / m50.max(1e-3)
    );
    println!("| keyword query, one word, p50 / p99 (µs) | {w1_50:.1} / {w1_99:.1} | | |");
    println!(
        "| keyword query, two words of a name, p50 / p99 (µs) | {w2_50:.1} / {w2_99:.1} | | |"
    );
    println!(
        "| registrations (files/s) | {:.0} | | |",
        files as f64 / adding.as_secs_f64()
    );
    println!(
        "| all leaves leave (s) | {:.2} | | |",
        removing.as_secs_f64()
    );
    println!(
        "| RSS: before, filled, after the leaves left (MiB) | {:.0} / {:.0} / {:.0} | | |",
        base as f64 / 1048576.0,
        filled as f64 / 1048576.0,
        left as f64 / 1048576.0
    );
    println!(
        "goal: {GOAL_BYTES:.0} bytes a file (Razorback2, the largest eDonkey server: ~{RAZORBACK_BYTES:.0}); \
         one-word queries found {found} files in all"
    );
    let svg = draw(&curve, &list_curve)?;
    let out = figure_path();
    std::fs::write(&out, svg).with_context(|| format!("{}", out.display()))?;
    println!("memory curve: {}", out.display());
    // Only a large index says whether memory goes back: a small one
    // lives in pages the allocator keeps anyway.
    ensure!(
        grown < 64 << 20 || left <= base + grown / 4,
        "{} MiB still held after the leaves left",
        left.saturating_sub(base) >> 20
    );
    Ok(())
}

/// `<target>/bench-index.svg`: beside the bench binary's own folder.
fn figure_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/index-<hash>
    let target = exe
        .ancestors()
        .nth(3)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    target.join("bench-index.svg")
}

fn draw(index: &[(usize, f64)], list: &[(usize, f64)]) -> Result<String> {
    let most = index
        .iter()
        .chain(list)
        .map(|p| p.1)
        .fold(GOAL_BYTES, f64::max);
    let files = index.last().map_or(1, |p| p.0) as f64;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Index memory per file", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..files * 1.02, 0f64..most * 1.15)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("files indexed")
            .y_desc("bytes of RSS a file")
            .x_label_formatter(&|x| format!("{:.1} M", x / 1e6))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let series = [
            ("index", index, RGBColor(31, 119, 180)),
            ("plain list of the entries", list, RGBColor(255, 127, 14)),
        ];
        for (label, points, colour) in series {
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|(n, b)| (*n as f64, *b)),
                    colour.stroke_width(2),
                ))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
        }
        chart
            .draw_series(LineSeries::new(
                [(0.0, GOAL_BYTES), (files * 1.02, GOAL_BYTES)],
                BLACK.mix(0.5),
            ))
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .label("goal, 128 B")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(svg)
}
