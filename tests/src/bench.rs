//! What the benchmarks in `tests/benches/` share: full or quick mode,
//! settings from the environment, a few statistics and units, the process's
//! CPU time, the machine they ran on, and a large incompressible test file.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use servent_proto::ContentHash;

use crate::random_bytes;

/// Pieces a test file is written (and hashed) in.
const PIECE: usize = 4 << 20;

/// True for a full run: `cargo bench` passes `--bench` to a `harness = false`
/// target, `cargo test` passes nothing (or a filter), and its run is then a
/// quick one, so that test runs stay fast.
pub fn full_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Logs to stderr, filtered by `RUST_LOG`, when it is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .try_init();
    }
}

/// The setting `name` from the environment, or `default` when it is unset.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .with_context(|| format!("{name} must be a number, not {v:?}")),
        Err(_) => Ok(default),
    }
}

/// The setting `name` from the environment, or else the default of a full
/// run or of a quick one.
pub fn setting<T: std::str::FromStr>(
    name: &str,
    full: bool,
    full_default: T,
    quick_default: T,
) -> Result<T> {
    env_or(name, if full { full_default } else { quick_default })
}

/// Runs a bench's body on a multi-threaded runtime, as nodes run.
pub fn block_on(body: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(body)
}

/// The median of `v` (sorted in place); NaN when `v` is empty.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Megabytes (10^6 bytes) per second.
pub fn mbps(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

/// CPU time (user + system, all threads) this process has used so far, from
/// `/proc/self/stat`; 0 where that is unavailable.
pub fn cpu_seconds() -> f64 {
    proc_cpu_seconds("self", false)
}

/// CPU time used so far by this process's children that it has waited for
/// (user + system); 0 where that is unavailable.
pub fn children_cpu_seconds() -> f64 {
    proc_cpu_seconds("self", true)
}

/// CPU time process `pid` has used so far (user + system); 0 where that is
/// unavailable.
pub fn pid_cpu_seconds(pid: u32) -> f64 {
    proc_cpu_seconds(&pid.to_string(), false)
}

/// The processes whose parent is `pid`, from `/proc`.
pub fn child_pids(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| stat_fields(&s).get(1)?.parse::<u32>().ok())
                == Some(pid)
        })
        .collect()
}

/// The fields of a `/proc/PID/stat` line after the command name (which may
/// hold spaces), starting with `state`.
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect()
}

/// utime + stime (or, with `children`, cutime + cstime) of `/proc/PID/stat`,
/// in clock ticks of 1/100 s.
fn proc_cpu_seconds(pid: &str, children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // utime, stime, cutime and cstime are the 12th to 15th fields after the
    // command name.
    let skip = if children { 13 } else { 11 };
    let ticks: u64 = stat_fields(&stat)
        .iter()
        .skip(skip)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

/// "N CPUs, MODEL, load average A B C", from the standard library and `/proc`:
/// other work on the machine shows in these figures.
pub fn machine() -> String {
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
    format!("{cpus} CPUs, {model}, load average {load}")
}

/// Writes `bytes` of deterministic incompressible content to `path`, piece
/// by piece (so that a GiB never sits in memory), syncs it, and returns its
/// content hash.
pub fn write_file(path: &Path, bytes: u64) -> Result<ContentHash> {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?,
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn mbps_is_decimal_megabytes() {
        assert_eq!(mbps(10_000_000, Duration::from_secs(2)), 5.0);
    }

    #[test]
    fn written_file_hashes_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        let hash = write_file(&path, (PIECE + 5) as u64).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), PIECE + 5);
        assert_eq!(hash, crate::hash_of(&bytes));
    }
}
