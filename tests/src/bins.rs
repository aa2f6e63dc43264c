//! The real `supernode` and `leaf` binaries, driven through their
//! command-line contract (PRODUCT.md) by the tests that need whole
//! processes: the network-namespace lab (`tests/impair.rs`) and the soak
//! (`tests/soak.rs`).
//!
//! This crate cannot name the binaries of other packages with
//! `CARGO_BIN_EXE_*`, so [`binaries`] has them built once per test process
//! with the cargo that runs the tests, in the same target dir and profile
//! as the test executable, and finds them beside its `deps/` folder. It
//! asks for exactly what the README's test command builds
//! (`cargo test --workspace --all-targets --no-run`): a no-op under that
//! command. A narrower `cargo build -p servent-leaf` would unify the
//! dependencies' features without the dev-dependencies, rebuild some 45
//! crates beside the test build's copies (2 GB more on disk) and overwrite
//! the binaries the leaf's and supernode's own tests run.
//!
//! Every process is started with its pipes drained on threads (so it never
//! blocks on a full pipe), every wait has a deadline, and a [`Process`]
//! kills what it holds when dropped, so a failing test leaves nothing
//! running.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(10);
/// Most of a process's stderr kept for a failure message: the tail is what
/// explains an exit, and a long soak must not keep every log line.
const STDERR_KEEP: usize = 64 * 1024;

/// Where the two binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub supernode: PathBuf,
    pub leaf: PathBuf,
}

/// Builds (if needed) and finds `supernode` and `leaf`; the first call
/// runs cargo, later ones return the same answer.
pub fn binaries() -> Result<Binaries, String> {
    static ONCE: OnceLock<Result<Binaries, String>> = OnceLock::new();
    ONCE.get_or_init(build).clone()
}

fn build() -> Result<Binaries, String> {
    let exe = std::env::current_exe().map_err(|e| format!("no current exe: {e}"))?;
    // target/<profile>/deps/<test>-<hash>: the binaries go to target/<profile>/.
    let profile_dir = exe
        .parent()
        .filter(|d| d.file_name() == Some(OsStr::new("deps")))
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not in a cargo deps/ folder", exe.display()))?
        .to_path_buf();
    let profile = profile_dir
        .file_name()
        .and_then(OsStr::to_str)
        .ok_or("no profile folder name")?
        .to_string();
    let cargo = std::env::var_os("CARGO")
        .or_else(|| option_env!("CARGO").map(Into::into))
        .unwrap_or_else(|| "cargo".into());
    // The target dir is the one this test was built in, whatever the
    // environment says now (the test may be run by hand, without the
    // CARGO_TARGET_DIR its build had): target/<profile>/ or, for a build
    // with --target, target/<triple>/<profile>/. Cargo marks its root.
    let above = profile_dir.parent().ok_or("no target dir")?;
    let (target_dir, triple) = match above.join("CACHEDIR.TAG").is_file() {
        true => (above, None),
        false => (
            above.parent().ok_or("no target dir")?,
            above.file_name().and_then(OsStr::to_str),
        ),
    };
    let mut cmd = Command::new(cargo);
    cmd.args("test --workspace --all-targets --no-run".split(' '))
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // What cargo set for this test run only: inherited, some of it reaches
    // build scripts that rerun when it changes (ring's watches
    // CARGO_MANIFEST_DIR), and the outer and inner builds would then
    // rebuild each other's dependencies every run.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let per_run = [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
            "OUT_DIR",
        ]
        .contains(&key)
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_");
        if per_run {
            cmd.env_remove(key);
        }
    }
    if let Some(triple) = triple {
        cmd.args(["--target", triple]);
    }
    match profile.as_str() {
        // The test profile builds into debug/, from the dev profile.
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let started = Instant::now();
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build of the binaries failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    eprintln!(
        "binaries ready in {} ({:.1} s)",
        profile_dir.display(),
        started.elapsed().as_secs_f64()
    );
    let found = |name: &str| {
        let p = profile_dir.join(name);
        match p.is_file() {
            true => Ok(p),
            false => Err(format!("cargo built, yet {} is missing", p.display())),
        }
    };
    Ok(Binaries {
        supernode: found("supernode")?,
        leaf: found("leaf")?,
    })
}

/// A command for `program args`, in network namespace `netns` if given
/// (`ip netns exec` execs the program itself, so the child's pid is the
/// program's), with the log filter left at the binary's default.
pub fn command<S: AsRef<OsStr>>(netns: Option<&str>, program: &Path, args: &[S]) -> Command {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A temporary path as a command-line argument (temp paths are UTF-8 here).
pub fn path_arg(p: &Path) -> String {
    p.to_str().expect("utf-8 temp path").to_string()
}

/// A `supernode` on `127.0.0.1:0` keeping its state in `data`, once it
/// has printed its listening line.
pub fn loopback_supernode(
    bins: &Binaries,
    data: &Path,
    timeout: Duration,
) -> Result<Process, String> {
    let args = ["--listen", "127.0.0.1:0", "--data-dir", &path_arg(data)];
    Process::start(command(None, &bins.supernode, &args), "supernode", timeout)
}

/// `leaf serve` on `127.0.0.1:0` with supernode `sn`, its state in `data`,
/// sharing `share`, never promoted, with `extra` flags; once it has
/// printed its listening line.
pub fn loopback_leaf(
    bins: &Binaries,
    sn: &str,
    data: &Path,
    share: &Path,
    extra: &[&str],
    timeout: Duration,
) -> Result<Process, String> {
    let (data, share) = (path_arg(data), path_arg(share));
    let mut args = vec![
        "--supernode",
        sn,
        "--data-dir",
        &data,
        "serve",
        "--share",
        &share,
        "--listen",
        "127.0.0.1:0",
        "--no-promote",
        "--no-port-mapping",
    ];
    args.extend(extra);
    Process::start(command(None, &bins.leaf, &args), "leaf", timeout)
}

/// `leaf --supernode SN... --data-dir DATA ARGS...` in namespace `netns`.
pub fn leaf_command(
    bins: &Binaries,
    netns: &str,
    supernodes: &[String],
    data: &Path,
    args: &[&str],
) -> Command {
    let mut all = Vec::new();
    for sn in supernodes {
        all.extend(["--supernode".to_string(), sn.clone()]);
    }
    all.extend(["--data-dir".to_string(), path_arg(data)]);
    all.extend(args.iter().map(|a| a.to_string()));
    command(Some(netns), &bins.leaf, &all)
}

/// Reads a pipe to its end on a thread, keeping the last [`STDERR_KEEP`]
/// bytes or so.
fn drain(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let out = buf.clone();
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut chunk) {
            let mut s = out.lock().expect("pipe buffer");
            s.push_str(&String::from_utf8_lossy(&chunk[..n]));
            if s.len() > 2 * STDERR_KEEP {
                let mut cut = s.len() - STDERR_KEEP;
                while !s.is_char_boundary(cut) {
                    cut += 1;
                }
                s.drain(..cut);
            }
        }
    });
    buf
}

/// A long-running process (`supernode`, `leaf serve`) that has printed its
/// "listening on" line; killed on drop.
pub struct Process {
    child: Child,
    /// The node id from the "listening on" line.
    pub id: String,
    /// The address from the "listening on" line.
    pub addr: String,
    stderr: Arc<Mutex<String>>,
    /// The lines printed on stdout after the first, as they come (the
    /// reader's channel stays open while the process runs).
    stdout: Receiver<String>,
}

impl Process {
    /// Spawns `cmd` and waits up to `timeout` for its
    /// `"<role> <ID> listening on <ADDR>"` line.
    pub fn start(mut cmd: Command, role: &str, timeout: Duration) -> Result<Self, String> {
        let mut child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut me = Self {
            child,
            id: String::new(),
            addr: String::new(),
            stderr,
            stdout: lines,
        };
        let line = match me.stdout.recv_timeout(timeout) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "{role}: no \"listening on\" line within {timeout:?}; stderr:\n{}",
                    me.stderr()
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = me.wait_exit(timeout);
                return Err(format!(
                    "{role} exited ({status:?}) before listening; stderr:\n{}",
                    me.stderr()
                ));
            }
        };
        let parts: Vec<&str> = line.split(' ').collect();
        match parts[..] {
            [r, id, "listening", "on", addr] if r == role => {
                me.id = id.to_string();
                me.addr = addr.to_string();
                Ok(me)
            }
            _ => Err(format!(
                "not a \"{role} ID listening on ADDR\" line: {line:?}"
            )),
        }
    }

    /// The next line the process prints on stdout, waiting up to
    /// `timeout`.
    pub fn next_line(&self, timeout: Duration) -> Option<String> {
        self.stdout.recv_timeout(timeout).ok()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last of what the process wrote on stderr.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    /// Waits up to `timeout` for the process to write `needle` on stderr
    /// (looking every 100 ms); whether it did.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.stderr().contains(needle) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// Asks the process to stop (SIGTERM), without waiting.
    pub fn signal_term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Asks the process to stop (SIGTERM) and waits up to `timeout` for it
    /// to exit, then kills it. Returns whether it exited by itself.
    pub fn terminate(mut self, timeout: Duration) -> bool {
        self.signal_term();
        self.wait_exit(timeout).is_some()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What a one-shot command (`leaf search`, `leaf get`) did.
#[derive(Debug)]
pub struct Outcome {
    /// `None` when it ran past its deadline and was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Runs `cmd` to its end, killing it if it takes longer than `timeout`.
pub fn run(mut cmd: Command, timeout: Duration) -> Outcome {
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                status: None,
                stdout: String::new(),
                stderr: format!("spawn failed: {e}"),
                took: started.elapsed(),
            }
        }
    };
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() < timeout => thread::sleep(POLL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let took = started.elapsed();
    // The pipes close with the process; let the readers catch up (bounded).
    let read = |buf: &Arc<Mutex<String>>| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(buf) > 1 && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        buf.lock().expect("pipe buffer").clone()
    };
    Outcome {
        status,
        stdout: read(&stdout),
        stderr: read(&stderr),
        took,
    }
}

/// Whether `leaf search --json` printed a hit for `hash`.
pub fn has_hit(stdout: &str, hash: &str) -> bool {
    stdout.lines().any(|line| {
        serde_json::from_str::<serde_json::Value>(line)
            .is_ok_and(|v| v["hash"].as_str() == Some(hash))
    })
}

/// The `done` line of a `leaf get --json`, parsed.
fn done_of(stdout: &str) -> Option<serde_json::Value> {
    stdout.lines().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v["event"] == "done").then_some(v)
    })
}

/// How `leaf get --json` reached its first source (`direct`, `reversed`,
/// `punched` or `relayed`), from its `done` line.
pub fn route_of(stdout: &str) -> Option<String> {
    done_of(stdout)?["route"].as_str().map(String::from)
}

/// How long after it started `leaf get --json` had the first range of the
/// file's data, verified, from its `done` line.
pub fn first_byte_of(stdout: &str) -> Option<Duration> {
    done_of(stdout)?["first_byte_secs"]
        .as_f64()
        .map(Duration::from_secs_f64)
}

/// Resident memory of process `pid` in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024)
}

/// Open file descriptors of process `pid` (entries of `/proc/PID/fd`).
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The `q`-quantile (0..=1) of `sorted`, by nearest rank; zero if empty.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Writes a file of `len` deterministic incompressible bytes without
/// holding them all in memory; returns its BLAKE3 hash in hex.
pub fn write_random_file(path: &Path, len: u64, seed: u64) -> std::io::Result<String> {
    use std::io::Write;
    const CHUNK: usize = 1 << 20;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut hasher = blake3::Hasher::new();
    let mut left = len;
    let mut n = 0u64;
    while left > 0 {
        let take = left.min(CHUNK as u64) as usize;
        let chunk = crate::random_bytes(take, seed.wrapping_add(n));
        hasher.update(&chunk);
        file.write_all(&chunk)?;
        left -= take as u64;
        n += 1;
    }
    file.flush()?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// A temporary folder, removed on drop, that makes named folders inside
/// it: the data dirs and shares of a test's nodes.
pub struct Scratch(tempfile::TempDir);

impl Scratch {
    pub fn new() -> Result<Self, String> {
        tempfile::tempdir()
            .map(Self)
            .map_err(|e| format!("no temporary dir: {e}"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// The folder `name` inside, made if it is not there yet.
    pub fn dir(&self, name: &str) -> Result<PathBuf, String> {
        let p = self.0.path().join(name);
        std::fs::create_dir_all(&p).map_err(|e| format!("mkdir {}: {e}", p.display()))?;
        Ok(p)
    }
}

/// The BLAKE3 hash of a file, in hex, read in pieces.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(hasher.finalize().to_hex().to_string())
}
