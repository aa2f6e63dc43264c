//! Black-box tests of the `leaf` binary through its command-line contract
//! (docs: PRODUCT.md, "Command-line contract"): `serve`, `search --json` and
//! `get` against a real supernode, which runs in-process on `127.0.0.1:0`.
//!
//! As in hickory-dns `bin/tests/integration/server_harness.rs`, every
//! process gets its own temporary folders and port 0 and is learnt from its
//! "listening on" line, so tests run in parallel. Every wait has a deadline,
//! and guards kill what a failing test leaves running.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_leaf");
/// Starting is a key pair, a bind and a folder scan: well under a second,
/// unless the machine is very busy.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest any one `leaf` command may take here (its own timeouts are shorter).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a shared file may take to become findable: hashing, registering, indexing.
const INDEX_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(10);

/// A supernode in this process, on its own runtime, shut down on drop.
struct TestSupernode {
    node: Option<supernode::Supernode>,
    rt: tokio::runtime::Runtime,
    addr: String,
}

impl TestSupernode {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let node = rt
            .block_on(supernode::Supernode::spawn(supernode::Config::localhost()))
            .expect("supernode starts");
        let addr = node.addr().to_string();
        Self {
            node: Some(node),
            rt,
            addr,
        }
    }
}

impl Drop for TestSupernode {
    fn drop(&mut self) {
        let _in_runtime = self.rt.enter();
        self.node.take();
    }
}

/// Kills the child on drop, so that a failing test leaves no process behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A `leaf serve` that has printed its "listening on" line.
struct Serving {
    child: ChildGuard,
    id: String,
    addr: SocketAddr,
    data: PathBuf,
    /// Stdout lines after the first (the contract says there are none).
    stdout: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Serving {
    /// `leaf serve --share SHARE --listen 127.0.0.1:0 --supernode SN --data-dir DATA`.
    fn start(supernode: &TestSupernode, share: &Path, data: &Path) -> Self {
        Self::start_with(supernode, share, data, &[])
    }

    /// Like [`Serving::start`], with `extra` flags after the others.
    fn start_with(supernode: &TestSupernode, share: &Path, data: &Path, extra: &[&str]) -> Self {
        let mut args = vec![
            "serve",
            "--share",
            &path_arg(share),
            "--listen",
            "127.0.0.1:0",
            "--supernode",
            &supernode.addr,
            "--data-dir",
            &path_arg(data),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|a| a.to_string()));
        let mut child = command(&args).spawn().expect("spawn leaf serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        let child = ChildGuard(child);
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
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            data: data.to_path_buf(),
            stdout: lines,
            stderr,
        };
        let line = match me.stdout.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                panic!(
                    "no \"listening on\" line within {START_TIMEOUT:?}; stderr:\n{}",
                    me.stderr()
                )
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = me.wait_exit(START_TIMEOUT);
                panic!(
                    "leaf serve exited ({status}) before listening; stderr:\n{}",
                    me.stderr()
                )
            }
        };
        (me.id, me.addr) = parse_listening(&line);
        // Then the web UI's line, unless it is turned off.
        if !extra.contains(&"--no-ui") {
            let ui = me
                .stdout
                .recv_timeout(START_TIMEOUT)
                .expect("a \"ui on\" line after the listening line");
            let url = ui
                .strip_prefix(&format!("leaf {} ui on http://127.0.0.1:", me.id))
                .unwrap_or_else(|| panic!("not a \"leaf ID ui on URL\" line: {ui:?}"));
            let key = url.split_once("/?key=").map(|(_, k)| k).unwrap_or("");
            assert!(
                key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()),
                "no key in {ui:?}"
            );
        }
        me
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    /// Panics unless the process is still running and has printed nothing more.
    fn assert_undisturbed(&mut self) {
        if let Some(status) = self.child.0.try_wait().expect("try_wait") {
            panic!("leaf serve exited ({status}); stderr:\n{}", self.stderr());
        }
        match self.stdout.try_recv() {
            Err(TryRecvError::Empty) => {}
            other => panic!("unexpected stdout from leaf serve: {other:?}"),
        }
    }

    /// Sends SIGTERM once the process is ready to catch it, and waits for it to exit.
    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.0.id();
        wait_until_catching_sigterm(pid);
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        self.wait_exit(COMMAND_TIMEOUT)
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "leaf serve still running after {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(POLL);
        }
    }

    /// Stdout lines after the first, once the process has exited.
    fn rest_of_stdout(&self) -> Vec<String> {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let mut rest = Vec::new();
        loop {
            match self
                .stdout
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => rest.push(line),
                Err(RecvTimeoutError::Disconnected) => return rest,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("stdout still open after the process exited")
                }
            }
        }
    }
}

fn command<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        // The default log filter is part of what is tested: logs must not reach stdout.
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Reads a pipe to its end on a thread, so the child never blocks on a full pipe.
fn drain(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let out = buf.clone();
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n @ 1..) = pipe.read(&mut chunk) {
            out.lock()
                .expect("pipe buffer")
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    });
    buf
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `leaf <64 hex> listening on <IP:PORT>` → (id, addr).
fn parse_listening(line: &str) -> (String, SocketAddr) {
    let parts: Vec<&str> = line.split(' ').collect();
    let ["leaf", id, "listening", "on", addr] = parts[..] else {
        panic!("not a \"leaf ID listening on ADDR\" line: {line:?}");
    };
    assert!(
        is_hex64(id),
        "node id is not 64 lowercase hex digits: {id:?}"
    );
    let addr: SocketAddr = addr
        .parse()
        .unwrap_or_else(|e| panic!("bad address {addr:?}: {e}"));
    (id.to_string(), addr)
}

/// Waits until the process has installed its SIGTERM handler (Linux
/// `/proc/PID/status`, `SigCgt`), so that the signal tests a graceful
/// shutdown rather than the default action. The binary prints its line a
/// moment before it installs the handler; without /proc this returns at once.
fn wait_until_catching_sigterm(pid: u32) {
    const SIGTERM_BIT: u64 = 1 << (15 - 1);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return;
        };
        let caught = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok());
        match caught {
            Some(mask) if mask & SIGTERM_BIT != 0 => return,
            None => return,
            Some(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} never installed a SIGTERM handler"
        );
        thread::sleep(POLL);
    }
}

/// What a finished one-shot command did.
#[derive(Debug)]
struct Outcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    took: Duration,
}

impl Outcome {
    fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "expected success, got {}; stderr:\n{}",
            self.status,
            self.stderr
        );
        self
    }

    /// The contract's error shape: non-zero exit, nothing on stdout, and one
    /// `error:` line, the last on stderr (logs may come before it).
    fn assert_error(&self) -> &str {
        assert!(
            !self.status.success(),
            "expected failure, got {}; stdout:\n{}",
            self.status,
            self.stdout
        );
        assert_eq!(self.stdout, "", "nothing on stdout on error");
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "expected one \"error: ...\" line, stderr:\n{}",
            self.stderr
        );
        assert_eq!(
            self.stderr.lines().last(),
            Some(errors[0]),
            "the error line comes last:\n{}",
            self.stderr
        );
        errors[0]
    }
}

/// Runs `leaf ARGS` to its end, bounded by `COMMAND_TIMEOUT`.
fn run<S: AsRef<OsStr>>(args: &[S]) -> Outcome {
    run_with(command(args))
}

fn run_with(mut cmd: Command) -> Outcome {
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn leaf");
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let mut child = ChildGuard(child);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            started.elapsed() < COMMAND_TIMEOUT,
            "{cmd:?} did not exit within {COMMAND_TIMEOUT:?}; stderr:\n{}",
            stderr.lock().expect("stderr buffer")
        );
        thread::sleep(POLL);
    };
    let took = started.elapsed();
    // The pipes close when the process exits; let the readers catch up.
    let read = |buf: &Arc<Mutex<String>>| {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
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

fn path_arg(p: &Path) -> String {
    p.to_str().expect("utf-8 temp path").to_string()
}

/// `leaf --supernode SUPERNODE --data-dir DATA ARGS...`, ready to run.
fn leaf_at(supernode: &str, data: &Path, args: &[&str]) -> Command {
    let mut all = vec!["--supernode".to_string(), supernode.to_string()];
    all.extend(["--data-dir".to_string(), path_arg(data)]);
    all.extend(args.iter().map(|a| a.to_string()));
    command(&all)
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Deterministic, incompressible bytes.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `leaf --supernode SN --data-dir DATA search --json --timeout 2 WORDS...`,
/// which must succeed; its lines parsed and checked for the contract's fields.
fn search_json(supernode: Option<&TestSupernode>, data: &Path, words: &[&str]) -> Vec<Value> {
    let mut args: Vec<String> = Vec::new();
    if let Some(sn) = supernode {
        args.extend(["--supernode".into(), sn.addr.clone()]);
    }
    args.extend([
        "--data-dir".into(),
        path_arg(data),
        "search".into(),
        "--json".into(),
    ]);
    args.extend(["--timeout".into(), "2".into()]);
    args.extend(words.iter().map(|w| w.to_string()));
    parse_hits(run(&args).assert_success())
}

fn parse_hits(out: &Outcome) -> Vec<Value> {
    out.stdout
        .lines()
        .map(|line| {
            let hit: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            assert!(
                hit["hash"].as_str().is_some_and(is_hex64),
                "hash is 64 lowercase hex: {hit}"
            );
            assert!(hit["name"].is_string(), "name is a string: {hit}");
            assert!(hit["size"].is_u64(), "size is a number: {hit}");
            assert!(
                hit["sources"].as_u64().is_some_and(|n| n >= 1),
                "sources is a count >= 1: {hit}"
            );
            hit
        })
        .collect()
}

/// Polls `search` until a hit for `hash` with `sources` sources appears.
fn wait_for_hit(
    supernode: &TestSupernode,
    data: &Path,
    word: &str,
    hash: &str,
    sources: u64,
) -> Value {
    let deadline = Instant::now() + INDEX_TIMEOUT;
    let mut last = Vec::new();
    for _ in 0..500 {
        last = search_json(Some(supernode), data, &[word]);
        if let Some(hit) = last
            .iter()
            .find(|h| h["hash"] == hash && h["sources"] == sources)
        {
            return hit.clone();
        }
        if Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("no hit {hash} with {sources} sources for {word:?} within {INDEX_TIMEOUT:?}; last answer: {last:?}")
}

/// A folder with `files` (name, content) in it.
fn share_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write shared file");
    }
    dir
}

/// Two serving leaves on one supernode: A shares `alpha-report.txt` and B
/// `beta-notes.bin`, and both share the same bytes as `gamma.dat`.
struct Network {
    // Declared first so the leaves go before the supernode.
    a: Serving,
    b: Serving,
    supernode: TestSupernode,
    alpha: Vec<u8>,
    beta: Vec<u8>,
    gamma: Vec<u8>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Network {
    fn start() -> Self {
        let supernode = TestSupernode::start();
        let alpha = b"alpha: quarterly numbers\n".repeat(40);
        // Several transfer chunks, so a download is more than one read.
        let beta = pseudo_random(1_300_000, 7);
        let gamma = pseudo_random(10_000, 11);
        let share_a = share_with(&[("alpha-report.txt", &alpha), ("gamma.dat", &gamma)]);
        let share_b = share_with(&[("beta-notes.bin", &beta), ("gamma.dat", &gamma)]);
        let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Serving::start(&supernode, share_a.path(), data_a.path());
        let b = Serving::start(&supernode, share_b.path(), data_b.path());
        assert_ne!(a.id, b.id, "two data dirs, two nodes");
        Self {
            a,
            b,
            supernode,
            alpha,
            beta,
            gamma,
            _dirs: vec![share_a, share_b, data_a, data_b],
        }
    }

    /// Waits until every shared file is findable from `data`.
    fn wait_indexed(&self, data: &Path) {
        wait_for_hit(&self.supernode, data, "alpha", &blake3_hex(&self.alpha), 1);
        wait_for_hit(&self.supernode, data, "beta", &blake3_hex(&self.beta), 1);
        wait_for_hit(&self.supernode, data, "gamma", &blake3_hex(&self.gamma), 2);
    }
}

#[test]
fn serve_prints_its_listening_and_ui_lines_and_stops_on_sigterm() {
    let supernode = TestSupernode::start();
    let (share, data) = (share_with(&[("x.txt", b"x")]), tempfile::tempdir().unwrap());
    let mut leaf = Serving::start(&supernode, share.path(), data.path());
    assert_eq!(leaf.addr.ip().to_string(), "127.0.0.1");
    assert_ne!(leaf.addr.port(), 0, "the real port is printed, not 0");
    let status = leaf.terminate();
    assert!(
        status.success(),
        "exit after SIGTERM: {status}; stderr:\n{}",
        leaf.stderr()
    );
    assert_eq!(
        leaf.rest_of_stdout(),
        Vec::<String>::new(),
        "stdout carries only the listening line and the UI's"
    );

    // Same data dir, same node.
    let again = Serving::start(&supernode, share.path(), data.path());
    assert_eq!(again.id, leaf.id);
}

#[test]
fn search_prints_json_hits_whose_hash_is_the_blake3_of_the_content() {
    let net = Network::start();
    let sn = net.supernode.addr.as_str();
    let me = tempfile::tempdir().unwrap();
    net.wait_indexed(me.path());

    let alpha = search_json(Some(&net.supernode), me.path(), &["alpha"]);
    assert_eq!(alpha.len(), 1, "{alpha:?}");
    assert_eq!(alpha[0]["hash"], blake3_hex(&net.alpha));
    assert_eq!(alpha[0]["name"], "alpha-report.txt");
    assert_eq!(alpha[0]["size"], net.alpha.len() as u64);
    assert_eq!(alpha[0]["sources"], 1);

    let beta = search_json(Some(&net.supernode), me.path(), &["BETA", "notes"]);
    assert_eq!(beta.len(), 1, "{beta:?}");
    assert_eq!(beta[0]["hash"], blake3_hex(&net.beta));
    assert_eq!(beta[0]["name"], "beta-notes.bin");
    assert_eq!(beta[0]["size"], net.beta.len() as u64);

    // The same bytes on two leaves are one hit with two sources.
    let gamma = search_json(Some(&net.supernode), me.path(), &["gamma"]);
    assert_eq!(gamma.len(), 1, "{gamma:?}");
    assert_eq!(gamma[0]["hash"], blake3_hex(&net.gamma));
    assert_eq!(gamma[0]["sources"], 2);

    // Every word must match.
    let none = search_json(Some(&net.supernode), me.path(), &["alpha", "notes"]);
    assert_eq!(none, Vec::<Value>::new());

    // Global flags may also follow the subcommand.
    let dir = path_arg(me.path());
    let after = run(&[
        "search",
        "--json",
        "alpha",
        "--supernode",
        sn,
        "--data-dir",
        &dir,
    ]);
    assert_eq!(parse_hits(after.assert_success()), alpha);

    // Without --json: one line a hit too, led by the hash.
    let plain = run_with(leaf_at(sn, me.path(), &["search", "alpha"]));
    let lines: Vec<&str> = plain.assert_success().stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with(&blake3_hex(&net.alpha)), "{lines:?}");
}

#[test]
fn search_for_a_word_nobody_has_prints_nothing_and_succeeds() {
    let net = Network::start();
    let sn = net.supernode.addr.as_str();
    let me = tempfile::tempdir().unwrap();
    // Only once the network is known to answer does silence mean "no hits".
    net.wait_indexed(me.path());
    for args in [&["search", "--json", "zebra"][..], &["search", "zebra"]] {
        let out = run_with(leaf_at(sn, me.path(), args));
        out.assert_success();
        assert_eq!(out.stdout, "", "{args:?}: no hits, no lines");
    }
}

#[test]
fn get_writes_verified_bytes_and_fails_cleanly_for_an_unknown_hash() {
    let net = Network::start();
    let sn = net.supernode.addr.as_str();
    let me = tempfile::tempdir().unwrap();
    net.wait_indexed(me.path());
    let downloads = tempfile::tempdir().unwrap();
    let get = |out: &Path, hash: &str| {
        run_with(leaf_at(
            sn,
            me.path(),
            &["get", "--out", &path_arg(out), hash],
        ))
    };

    let out = downloads.path().join("beta copy.bin");
    let got = get(&out, &blake3_hex(&net.beta));
    got.assert_success();
    assert_eq!(got.stdout, "", "get prints nothing on stdout");
    assert!(
        std::fs::read(&out).expect("the --out file exists") == net.beta,
        "downloaded bytes differ"
    );

    // --json: progress events, then one "done" event, on stdout.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = elsewhere.path().join("beta json.bin");
    let got = run_with(leaf_at(
        sn,
        me.path(),
        &[
            "get",
            "--json",
            "--out",
            &path_arg(&out),
            &blake3_hex(&net.beta),
        ],
    ));
    got.assert_success();
    let events: Vec<Value> = got
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    let last = events.last().expect("a done event");
    assert_eq!(last["event"], "done", "{}", got.stdout);
    assert_eq!(last["size"], net.beta.len() as u64);
    assert!(events[..events.len() - 1]
        .iter()
        .all(|e| e["event"] == "progress" && e["size"] == net.beta.len() as u64));
    assert!(std::fs::read(&out).unwrap() == net.beta);

    // Two sources: either will do.
    let out = downloads.path().join("gamma");
    get(&out, &blake3_hex(&net.gamma)).assert_success();
    assert!(
        std::fs::read(&out).unwrap() == net.gamma,
        "downloaded bytes differ"
    );

    // Without --out: the hit's name, in the current folder.
    let here = tempfile::tempdir().unwrap();
    let mut cmd = leaf_at(sn, me.path(), &["get", &blake3_hex(&net.alpha)]);
    cmd.current_dir(here.path());
    run_with(cmd).assert_success();
    let named = here.path().join("alpha-report.txt");
    assert!(
        std::fs::read(named).unwrap() == net.alpha,
        "downloaded bytes differ"
    );

    // Nobody has this: an error, and nothing written.
    let unknown = blake3_hex(b"content nobody shares");
    let missing = downloads.path().join("missing.bin");
    let failed = get(&missing, &unknown);
    let line = failed.assert_error();
    assert!(line.contains(&unknown), "the error names the hash: {line}");
    assert!(!missing.exists(), "nothing is written for a failed get");
    // With logs off, the error is the only line on stderr.
    let mut cmd = leaf_at(
        sn,
        me.path(),
        &["get", "--out", &path_arg(&missing), &unknown],
    );
    cmd.env("RUST_LOG", "off");
    let quiet = run_with(cmd);
    quiet.assert_error();
    assert_eq!(quiet.stderr.lines().count(), 1, "{}", quiet.stderr);
    let mut left: Vec<String> = std::fs::read_dir(downloads.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["beta copy.bin", "gamma"],
        "no partial files left behind"
    );

    // Not a hash at all: a usage error.
    let bad = get(&missing, "not-a-hash");
    assert!(
        !bad.status.success() && bad.stderr.starts_with("error: "),
        "{bad:?}"
    );
    assert!(!missing.exists());
}

#[test]
fn search_and_get_share_the_data_dir_of_a_running_serve_without_disturbing_it() {
    let mut net = Network::start();
    let sn = net.supernode.addr.clone();
    let observer = tempfile::tempdir().unwrap();
    net.wait_indexed(observer.path());
    let a_data = net.a.data.clone();
    let downloads = tempfile::tempdir().unwrap();

    // On A's data dir, with A serving: find and fetch B's file...
    let hits = search_json(Some(&net.supernode), &a_data, &["beta"]);
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert_eq!(hits[0]["hash"], blake3_hex(&net.beta));
    let out = path_arg(&downloads.path().join("beta"));
    run_with(leaf_at(
        &sn,
        &a_data,
        &["get", "--out", &out, &blake3_hex(&net.beta)],
    ))
    .assert_success();
    assert!(
        std::fs::read(&out).unwrap() == net.beta,
        "downloaded bytes differ"
    );

    // ...and, with the supernodes `serve` remembered, A's own file from A itself.
    let hits = search_json(None, &a_data, &["alpha"]);
    assert_eq!(hits.len(), 1, "{hits:?}");
    let out = path_arg(&downloads.path().join("alpha"));
    let hash = blake3_hex(&net.alpha);
    run(&[
        "--data-dir",
        &path_arg(&a_data),
        "get",
        "--out",
        &out,
        &hash,
    ])
    .assert_success();
    assert!(
        std::fs::read(&out).unwrap() == net.alpha,
        "downloaded bytes differ"
    );

    // A still runs, said nothing more, is still registered and still serves.
    net.a.assert_undisturbed();
    net.b.assert_undisturbed();
    let hit = wait_for_hit(&net.supernode, observer.path(), "alpha", &hash, 1);
    assert_eq!(hit["name"], "alpha-report.txt");
    let out = path_arg(&downloads.path().join("alpha again"));
    run_with(leaf_at(
        &sn,
        observer.path(),
        &["get", "--out", &out, &hash],
    ))
    .assert_success();
    assert!(
        std::fs::read(&out).unwrap() == net.alpha,
        "downloaded bytes differ"
    );
    net.a.assert_undisturbed();
    assert!(
        net.a.terminate().success(),
        "A still stops cleanly; stderr:\n{}",
        net.a.stderr()
    );
}

#[test]
fn search_and_get_with_no_supernode_there_fail_in_bounded_time() {
    let data = tempfile::tempdir().unwrap();
    let target = data.path().join("out");
    let hash = blake3_hex(b"anything");
    // Nothing answers on UDP port 1, so each command gives up after its
    // --timeout (default 5 s; shorter here to keep the test quick). Both
    // run at once, on one data dir, which is allowed.
    let (search, get) = thread::scope(|s| {
        let search = s.spawn(|| {
            let args = ["search", "--json", "--timeout", "2", "alpha"];
            run_with(leaf_at("127.0.0.1:1", data.path(), &args))
        });
        let get = s.spawn(|| {
            let args = ["get", "--timeout", "1", "--out", &path_arg(&target), &hash];
            run_with(leaf_at("127.0.0.1:1", data.path(), &args))
        });
        (
            search.join().expect("search thread"),
            get.join().expect("get thread"),
        )
    });
    let line = search.assert_error();
    assert!(
        line.contains("127.0.0.1:1"),
        "the error names the supernode: {line}"
    );
    assert!(
        search.took < Duration::from_secs(10),
        "took {:?}",
        search.took
    );
    get.assert_error();
    assert!(get.took < Duration::from_secs(10), "took {:?}", get.took);
    assert!(!target.exists());
}

#[test]
fn commands_without_any_supernode_fail_with_an_error_line() {
    let data = tempfile::tempdir().unwrap();
    let dir = path_arg(data.path());
    let share = share_with(&[("x.txt", b"x")]);
    // A fresh data dir remembers no supernode.
    run(&["--data-dir", &dir, "search", "alpha"]).assert_error();
    let serve = [
        "--data-dir",
        &dir,
        "serve",
        "--share",
        &path_arg(share.path()),
        "--listen",
        "127.0.0.1:0",
    ];
    let line = run(&serve).assert_error().to_string();
    assert!(
        line.contains("--supernode"),
        "the error says what to do: {line}"
    );
    let bad = run(&["--data-dir", &dir, "frobnicate"]);
    assert!(
        !bad.status.success() && bad.stderr.starts_with("error: "),
        "{bad:?}"
    );
}

/// Longest wait for one HTTP answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP port that was free a moment ago. `leaf serve` prints only its
/// QUIC address, so the test must choose the HTTP port; another process
/// could take it in between, which is unlikely enough on a test machine.
fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// `GET path` over HTTP/1.1 on its own connection: (status code, body).
/// A dozen lines of client rather than a dependency; every wait is bounded.
fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to http {addr}: {e}"));
    s.set_read_timeout(Some(HTTP_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(HTTP_TIMEOUT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("read the answer to GET {path}: {e}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header block in {raw:?}"));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "this client reads whole bodies only: {head}"
    );
    (code, body.to_string())
}

/// The value of the unlabelled sample `name` in a Prometheus text body.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[test]
fn serve_http_reports_status_and_metrics() {
    let supernode = TestSupernode::start();
    let supernode_id = supernode.node.as_ref().expect("running").id().to_string();
    let share = share_with(&[("one.txt", b"one"), ("two.txt", b"two")]);
    let data = tempfile::tempdir().unwrap();
    let http = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let mut leaf = Serving::start_with(
        &supernode,
        share.path(),
        data.path(),
        &["--http", &http.to_string(), "--no-promote"],
    );

    // The HTTP endpoint is up before the "listening on" line; hashing and
    // registering take a moment more.
    let deadline = Instant::now() + INDEX_TIMEOUT;
    let status = loop {
        let (code, body) = http_get(http, "/status");
        assert_eq!(code, 200, "GET /status: {body}");
        let status: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"));
        let attached = status["supernodes"]
            .as_array()
            .is_some_and(|s| !s.is_empty());
        if attached && status["shared_files"] == 2 {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "not attached with 2 files after {INDEX_TIMEOUT:?}: {status}\nstderr:\n{}",
            leaf.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["id"], leaf.id.as_str(), "{status}");
    assert_eq!(status["role"], "leaf", "{status}");
    assert_eq!(status["listen"], leaf.addr.to_string(), "{status}");
    assert_eq!(
        status["supernodes"],
        serde_json::json!([{"id": supernode_id, "addr": supernode.addr}]),
        "{status}"
    );
    for field in [
        "files_to_hash",
        "files_hashed",
        "bytes_to_hash",
        "bytes_hashed",
    ] {
        assert!(
            status["hashing"][field].is_u64(),
            "hashing.{field}: {status}"
        );
    }

    let (code, metrics) = http_get(http, "/metrics");
    assert_eq!(code, 200, "{metrics}");
    assert!(
        metrics
            .lines()
            .filter(|l| l.starts_with("servent_"))
            .count()
            >= 5,
        "servent_ samples expected:\n{metrics}"
    );
    assert_eq!(
        sample(&metrics, "servent_shared_files"),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "servent_attached_supernodes"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "servent_uploads_total"),
        Some(0.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "servent_uploaded_bytes_total"),
        Some(0.0),
        "{metrics}"
    );

    // The endpoint prints nothing: stdout is still the one line.
    leaf.assert_undisturbed();
    assert!(leaf.terminate().success(), "stderr:\n{}", leaf.stderr());
    assert_eq!(leaf.rest_of_stdout(), Vec::<String>::new());
}

#[test]
fn get_without_out_makes_hostile_names_safe_in_the_current_folder() {
    let supernode = TestSupernode::start();
    // Names a Linux share can hold that are dangerous elsewhere.
    let files: &[(&str, &[u8])] = &[("CON", b"device"), ("evil?.txt", b"question")];
    let share = share_with(files);
    let data = tempfile::tempdir().unwrap();
    let _serving = Serving::start(&supernode, share.path(), data.path());
    let me = tempfile::tempdir().unwrap();
    let here = tempfile::tempdir().unwrap();
    for ((_, content), (word, safe)) in files.iter().zip([("con", "_CON"), ("evil", "evil.txt")]) {
        wait_for_hit(&supernode, me.path(), word, &blake3_hex(content), 1);
        let mut cmd = leaf_at(&supernode.addr, me.path(), &["get", &blake3_hex(content)]);
        cmd.current_dir(here.path());
        run_with(cmd).assert_success();
        assert!(std::fs::read(here.path().join(safe)).unwrap() == *content);
    }
    let mut names: Vec<String> = std::fs::read_dir(here.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into())
        .collect();
    names.sort();
    assert_eq!(names, ["_CON", "evil.txt"], "nothing else written");
}

#[test]
fn get_killed_halfway_continues_from_its_verified_ranges() {
    let supernode = TestSupernode::start();
    let size = 16usize << 20;
    let content = pseudo_random(size, 21);
    let hash = blake3_hex(&content);
    let share = share_with(&[("video.mp4", &content)]);
    let data = tempfile::tempdir().unwrap();
    // A capped source makes the first run slow enough to kill halfway.
    let _serving = Serving::start_with(
        &supernode,
        share.path(),
        data.path(),
        &["--max-upload-rate", "8000000"],
    );
    let me = tempfile::tempdir().unwrap();
    wait_for_hit(&supernode, me.path(), "video", &hash, 1);
    let downloads = tempfile::tempdir().unwrap();
    let out = downloads.path().join("video.mp4");
    let args = ["get", "--json", "--out", &path_arg(&out), &hash];

    let mut first = leaf_at(&supernode.addr, me.path(), &args).spawn().unwrap();
    let _stderr = drain(first.stderr.take().unwrap());
    let lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    for line in lines {
        let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
        assert_eq!(event["event"], "progress", "killed before the end: {event}");
        if event["verified"].as_u64().unwrap() >= size as u64 / 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress");
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    assert!(!out.exists());

    let second = run_with(leaf_at(&supernode.addr, me.path(), &args));
    second.assert_success();
    let done: Value = serde_json::from_str(second.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(done["event"], "done");
    let fetched = done["fetched"].as_u64().unwrap();
    assert!(
        fetched <= size as u64 * 6 / 10,
        "fetched {fetched} of {size} again"
    );
    assert!(std::fs::read(&out).unwrap() == content);
}

#[test]
fn serve_skips_a_disguised_name_and_logs_it_escaped() {
    let supernode = TestSupernode::start();
    // Shown raw, "\u{202e}gpj.exe" reads "exe.jpg".
    let share = share_with(&[("\u{202e}gpj.exe", b"disguised"), ("plain.txt", b"plain")]);
    let data = tempfile::tempdir().unwrap();
    let mut serving = Serving::start(&supernode, share.path(), data.path());
    let me = tempfile::tempdir().unwrap();
    wait_for_hit(&supernode, me.path(), "plain", &blake3_hex(b"plain"), 1);
    assert_eq!(
        search_json(Some(&supernode), me.path(), &["gpj"]),
        Vec::<Value>::new()
    );
    // The scan warned before it announced: the line is there or on its way.
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while !serving.stderr().contains("not shared") && Instant::now() < deadline {
        thread::sleep(POLL);
    }
    let stderr = serving.stderr();
    assert!(
        stderr.contains("not shared: its name cannot be announced")
            && stderr.contains("\\u{202e}gpj.exe"),
        "{stderr}"
    );
    assert!(
        !stderr.contains('\u{202e}'),
        "a raw bidi control on stderr: {stderr:?}"
    );
    assert!(
        serving.terminate().success(),
        "stderr:\n{}",
        serving.stderr()
    );
}
