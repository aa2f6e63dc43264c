//! Black-box tests of the `supernode` binary through its command-line
//! contract (docs: PRODUCT.md, "Command-line contract"): the one stdout line,
//! the identity kept in `--data-dir`, errors, the config file, and SIGTERM.
//!
//! As in hickory-dns `bin/tests/integration/server_harness.rs`, each test
//! starts its own process on `127.0.0.1:0` with its own temporary folders
//! and learns the port from the "listening on" line, so tests run in
//! parallel. Every wait has a deadline, and a guard kills the process when a
//! test fails.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use servent_net::{self as net, Endpoint, Identity};
use servent_proto::limits::{MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
use servent_proto::msg::{LeafRequest, SupernodeReply, ALPN_LEAF};
use servent_proto::NodeId;

const BIN: &str = env!("CARGO_BIN_EXE_supernode");
/// Starting is a key pair and a bind: well under a second, unless the
/// machine is very busy.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Shutdown closes connections and waits for them to drain (a few PTOs).
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

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

/// A `supernode` process that has printed its "listening on" line.
struct Running {
    child: ChildGuard,
    id: String,
    addr: SocketAddr,
    /// Stdout lines after the first (the contract says there are none).
    stdout: Receiver<String>,
    /// Everything written to stderr so far (the logs).
    stderr: Arc<Mutex<String>>,
}

impl Running {
    /// Starts `supernode ARGS` and waits for its "listening on" line.
    fn start<S: AsRef<OsStr>>(args: &[S]) -> Self {
        let mut child = command(args).spawn().expect("spawn supernode");
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
                let status = me.wait_exit(EXIT_TIMEOUT);
                panic!(
                    "supernode exited ({status}) before listening; stderr:\n{}",
                    me.stderr()
                )
            }
        };
        (me.id, me.addr) = parse_listening(&line);
        me
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    /// Sends SIGTERM once the process is ready to catch it, and waits for it to exit.
    fn terminate(&mut self) -> ExitStatus {
        wait_until_catching_sigterm(self.pid());
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {} failed", self.pid());
        self.wait_exit(EXIT_TIMEOUT)
    }

    /// Waits for the process to exit by itself; panics (and the guard kills
    /// it) if it has not within `timeout`.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "supernode still running after {timeout:?}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(POLL);
        }
    }

    /// Stdout lines after the first, once the process has exited.
    fn rest_of_stdout(&self) -> Vec<String> {
        let deadline = Instant::now() + EXIT_TIMEOUT;
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

/// `supernode <64 hex> listening on <IP:PORT>` → (id, addr).
fn parse_listening(line: &str) -> (String, SocketAddr) {
    let parts: Vec<&str> = line.split(' ').collect();
    let ["supernode", id, "listening", "on", addr] = parts[..] else {
        panic!("not a \"supernode ID listening on ADDR\" line: {line:?}");
    };
    assert!(
        id.len() == 64
            && id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
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

/// Runs `supernode ARGS` to its end (bounded) and returns its status and stderr.
fn run_to_exit<S: AsRef<OsStr>>(args: &[S]) -> (ExitStatus, String, String) {
    let mut child = command(args).spawn().expect("spawn supernode");
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let mut child = ChildGuard(child);
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "supernode {:?} did not exit within {EXIT_TIMEOUT:?}",
            args[0].as_ref()
        );
        thread::sleep(POLL);
    };
    // The pipes close when the process exits; let the readers catch up.
    let read = |buf: &Arc<Mutex<String>>| {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Arc::strong_count(buf) > 1 && Instant::now() < deadline {
            thread::sleep(POLL);
        }
        buf.lock().expect("pipe buffer").clone()
    };
    (status, read(&stdout), read(&stderr))
}

/// Asserts the contract's error shape: non-zero exit, nothing on stdout,
/// exactly one stderr line, starting with `error:`.
fn assert_one_error_line<S: AsRef<OsStr>>(args: &[S]) -> String {
    let (status, stdout, stderr) = run_to_exit(args);
    assert!(
        !status.success(),
        "expected failure, got {status}; stderr:\n{stderr}"
    );
    assert_eq!(stdout, "", "nothing on stdout on error");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("error: "),
        "expected one \"error: ...\" line on stderr, got:\n{stderr}"
    );
    lines[0].to_string()
}

fn path_arg(p: &Path) -> String {
    p.to_str().expect("utf-8 temp path").to_string()
}

#[test]
fn prints_exactly_one_line_on_stdout_and_logs_on_stderr() {
    let data = tempfile::tempdir().unwrap();
    let mut node = Running::start(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &path_arg(data.path()),
    ]);
    assert_eq!(node.addr.ip().to_string(), "127.0.0.1");
    assert_ne!(node.addr.port(), 0, "the real port is printed, not 0");
    let status = node.terminate();
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert_eq!(
        node.rest_of_stdout(),
        Vec::<String>::new(),
        "stdout carries only the listening line"
    );
    // The default filter logs at info: those lines went to stderr.
    assert!(
        node.stderr().contains("listening"),
        "expected logs on stderr, got:\n{}",
        node.stderr()
    );
}

#[test]
fn identity_is_kept_in_the_data_dir() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let args = |d: &tempfile::TempDir| {
        [
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            path_arg(d.path()),
        ]
    };
    let mut first = Running::start(&args(&a));
    let other = Running::start(&args(&b));
    assert_ne!(first.id, other.id, "another data dir is another node");
    assert!(first.terminate().success());

    let again = Running::start(&args(&a));
    assert_eq!(
        again.id, first.id,
        "a restart on the same data dir is the same node"
    );
    assert_ne!(again.addr.port(), 0);
}

#[test]
fn bad_flags_fail_with_an_error_line() {
    let data = tempfile::tempdir().unwrap();
    let data = path_arg(data.path());
    for args in [
        vec!["--bogus"],
        vec!["--listen", "not-an-address", "--data-dir", &data],
        vec!["--max-leaves", "-3", "--data-dir", &data],
        vec!["stray-positional"],
    ] {
        let (status, stdout, stderr) = run_to_exit(&args);
        // clap's usage errors are several lines; the first is the error.
        assert!(
            !status.success(),
            "{args:?}: expected failure, got {status}"
        );
        assert_eq!(stdout, "", "{args:?}: nothing on stdout");
        assert!(
            stderr.starts_with("error: "),
            "{args:?}: stderr should start with \"error: \", got:\n{stderr}"
        );
    }
}

#[test]
fn unreadable_config_file_fails_with_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let line = assert_one_error_line(&[
        "--config",
        &path_arg(&missing),
        "--data-dir",
        &path_arg(dir.path()),
    ]);
    assert!(
        line.contains("missing.toml"),
        "the error names the file: {line}"
    );

    // A folder is not a readable file either.
    assert_one_error_line(&[
        "--config",
        &path_arg(dir.path()),
        "--data-dir",
        &path_arg(dir.path()),
    ]);
}

#[test]
fn config_file_with_an_unknown_key_or_bad_value_fails_with_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "listen = \"127.0.0.1:0\"\nmax_leafs = 5\n").unwrap();
    let line = assert_one_error_line(&[
        "--config",
        &path_arg(&unknown),
        "--data-dir",
        &path_arg(dir.path()),
    ]);
    assert!(
        line.contains("max_leafs"),
        "the error names the key: {line}"
    );

    let bad_value = dir.path().join("bad.toml");
    std::fs::write(&bad_value, "listen = \"nowhere\"\n").unwrap();
    assert_one_error_line(&[
        "--config",
        &path_arg(&bad_value),
        "--data-dir",
        &path_arg(dir.path()),
    ]);

    let not_toml = dir.path().join("garbage.toml");
    std::fs::write(&not_toml, "this is [not toml\n").unwrap();
    assert_one_error_line(&[
        "--config",
        &path_arg(&not_toml),
        "--data-dir",
        &path_arg(dir.path()),
    ]);
}

/// A leaf connection made by hand: enough to register and hold a session.
struct FakeLeaf {
    _endpoint: Endpoint,
    _conn: quinn::Connection,
    _session: (quinn::SendStream, quinn::RecvStream),
}

/// Registers a fresh identity with the supernode at `addr` (which must prove
/// it is `expected`) and returns the session, or the supernode's refusal.
async fn register(addr: SocketAddr, expected: &str) -> Result<FakeLeaf, SupernodeReply> {
    let expected: NodeId = expected.parse().expect("printed id parses");
    let endpoint = Endpoint::client(Arc::new(Identity::generate().expect("identity")), addr)
        .expect("client endpoint");
    let peer = endpoint
        .connect(addr, ALPN_LEAF, Some(expected))
        .await
        .expect("connect to the supernode");
    let (mut send, mut recv) = peer.conn.open_bi().await.expect("open the session stream");
    let hello = LeafRequest::Register { listen_port: 9 };
    net::write_frame(&mut send, &hello, MAX_REQUEST_FRAME)
        .await
        .expect("send Register");
    let reply = tokio::time::timeout(
        EXIT_TIMEOUT,
        net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME),
    )
    .await
    .expect("an answer to Register in time");
    match reply {
        Ok(Some(SupernodeReply::Registered { .. })) => Ok(FakeLeaf {
            _endpoint: endpoint,
            _conn: peer.conn,
            _session: (send, recv),
        }),
        Ok(Some(refusal @ (SupernodeReply::Full(_) | SupernodeReply::Error(_)))) => Err(refusal),
        other => panic!("unexpected answer to Register: {other:?}"),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

#[test]
fn config_file_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("state");
    let config = dir.path().join("supernode.toml");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nmax_leaves = 1\ndata_dir = {:?}\n",
        path_arg(&data)
    );
    std::fs::write(&config, toml).unwrap();

    // No flags but --config: listen, max_leaves and data_dir all come from the file.
    let mut node = Running::start(&["--config", &path_arg(&config)]);
    assert_eq!(
        node.addr.ip().to_string(),
        "127.0.0.1",
        "listen from the file, not the 0.0.0.0:7400 default"
    );
    let rt = runtime();
    rt.block_on(async {
        let _first = register(node.addr, &node.id)
            .await
            .expect("the first leaf fits");
        let refused = register(node.addr, &node.id)
            .await
            .err()
            .expect("max_leaves = 1 refuses a second leaf");
        assert!(matches!(refused, SupernodeReply::Full(_)), "{refused:?}");
    });
    assert!(node.terminate().success());

    // The identity went to the data_dir of the file.
    let same = Running::start(&["--listen", "127.0.0.1:0", "--data-dir", &path_arg(&data)]);
    assert_eq!(
        same.id, node.id,
        "data_dir from the config file holds the identity"
    );
}

#[test]
fn flags_override_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("supernode.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nmax_leaves = 1\n").unwrap();
    let node = Running::start(&[
        "--config",
        &path_arg(&config),
        "--max-leaves",
        "2",
        "--data-dir",
        &path_arg(dir.path()),
    ]);
    runtime().block_on(async {
        let _first = register(node.addr, &node.id).await.expect("first leaf");
        let _second = register(node.addr, &node.id)
            .await
            .expect("--max-leaves 2 beats max_leaves = 1");
        let refused = register(node.addr, &node.id)
            .await
            .err()
            .expect("a third leaf is refused");
        assert!(matches!(refused, SupernodeReply::Full(_)), "{refused:?}");
    });
}

#[test]
fn sigterm_exits_cleanly_even_with_a_leaf_connected() {
    let data = tempfile::tempdir().unwrap();
    let mut node = Running::start(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &path_arg(data.path()),
    ]);
    let rt = runtime();
    let leaf = rt
        .block_on(register(node.addr, &node.id))
        .expect("leaf registers");
    let started = Instant::now();
    let status = node.terminate();
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}; stderr:\n{}",
        node.stderr()
    );
    assert!(
        started.elapsed() < EXIT_TIMEOUT,
        "took {:?}",
        started.elapsed()
    );
    drop(leaf);
}

/// Longest wait for one HTTP answer.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long three supernodes may take to link up with each other.
const MESH_TIMEOUT: Duration = Duration::from_secs(30);

/// A TCP port that was free a moment ago. The binary prints only its QUIC
/// address, so the test must choose the HTTP port; another process could
/// take it in between, which is unlikely enough on a test machine.
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

fn get_status(addr: SocketAddr) -> serde_json::Value {
    let (code, body) = http_get(addr, "/status");
    assert_eq!(code, 200, "GET /status: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

/// The value of the unlabelled sample `name` in a Prometheus text body.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

/// `supernode --listen 127.0.0.1:0 --data-dir DIR --http 127.0.0.1:PORT EXTRA...`.
fn start_with_http(data: &Path, extra: &[String]) -> (Running, SocketAddr) {
    let http = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
    let mut args = vec![
        "--listen".to_string(),
        "127.0.0.1:0".into(),
        "--data-dir".into(),
        path_arg(data),
        "--http".into(),
        http.to_string(),
    ];
    args.extend(extra.iter().cloned());
    // The HTTP endpoint is up before the "listening on" line is printed.
    (Running::start(&args), http)
}

#[test]
fn http_serves_status_and_metrics() {
    let data = tempfile::tempdir().unwrap();
    let (mut node, http) = start_with_http(data.path(), &[]);

    let status = get_status(http);
    assert_eq!(status["id"], node.id.as_str(), "{status}");
    assert_eq!(status["role"], "supernode", "{status}");
    assert_eq!(status["listen"], node.addr.to_string(), "{status}");
    assert_eq!(status["leaves"], 0, "{status}");
    assert_eq!(status["files"], 0, "{status}");
    assert_eq!(status["neighbors"], serde_json::json!([]), "{status}");

    let rt = runtime();
    let leaf = rt
        .block_on(register(node.addr, &node.id))
        .expect("leaf registers");
    let status = get_status(http);
    assert_eq!(
        status["leaves"], 1,
        "a registered leaf is counted: {status}"
    );

    let (code, metrics) = http_get(http, "/metrics");
    assert_eq!(code, 200, "{metrics}");
    let ours: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("servent_"))
        .collect();
    assert!(ours.len() >= 10, "servent_ samples expected:\n{metrics}");
    assert_eq!(sample(&metrics, "servent_leaves"), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, "servent_files"), Some(0.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "servent_neighbors"),
        Some(0.0),
        "{metrics}"
    );
    for counter in [
        "servent_leaf_queries_total",
        "servent_mesh_queries_total",
        "servent_queries_forwarded_total",
        "servent_queries_duplicate_total",
        "servent_queries_extended_total",
        "servent_queries_rate_limited_total",
        "servent_queries_processed_total",
        "servent_hits_returned_total",
    ] {
        assert_eq!(
            sample(&metrics, counter),
            Some(0.0),
            "{counter}:\n{metrics}"
        );
    }
    let bytes_in = sample(&metrics, "servent_received_bytes_total").expect("bytes in");
    let bytes_out = sample(&metrics, "servent_sent_bytes_total").expect("bytes out");
    assert!(
        bytes_in > 0.0 && bytes_out > 0.0,
        "the leaf's handshake and registration: {bytes_in} in, {bytes_out} out"
    );

    assert_eq!(http_get(http, "/nothing-here").0, 404);
    drop(leaf);
    assert!(node.terminate().success(), "stderr:\n{}", node.stderr());
    assert!(
        std::net::TcpStream::connect_timeout(&http, HTTP_TIMEOUT).is_err(),
        "the HTTP endpoint stops with the process"
    );
}

#[test]
fn an_http_address_in_use_fails_with_one_error_line() {
    let data = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let line = assert_one_error_line(&[
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &path_arg(data.path()),
        "--http",
        &addr,
    ]);
    assert!(
        line.contains("HTTP") && line.contains(&addr),
        "the error names what failed: {line}"
    );
}

#[test]
fn three_supernodes_mesh_and_status_shows_each_ones_two_neighbors() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, a_http) = start_with_http(dirs[0].path(), &[]);
    let (b, b_http) = start_with_http(dirs[1].path(), &["--peer".into(), a.addr.to_string()]);
    let (c, c_http) = start_with_http(
        dirs[2].path(),
        &[
            "--peer".into(),
            a.addr.to_string(),
            "--peer".into(),
            b.addr.to_string(),
        ],
    );
    let nodes = [(&a, a_http), (&b, b_http), (&c, c_http)];

    let deadline = Instant::now() + MESH_TIMEOUT;
    for (node, http) in nodes {
        let status = loop {
            let status = get_status(http);
            if status["neighbors"].as_array().is_some_and(|n| n.len() == 2) {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "supernode {} has not 2 neighbours after {MESH_TIMEOUT:?}: {status}\nstderr:\n{}",
                node.addr,
                node.stderr()
            );
            thread::sleep(Duration::from_millis(100));
        };
        // Each one's neighbours are the other two, by id and listening address.
        let mut got: Vec<(String, String)> = status["neighbors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["id"].as_str().expect("id").to_string(),
                    n["addr"].as_str().expect("addr").to_string(),
                )
            })
            .collect();
        got.sort();
        let mut want: Vec<(String, String)> = nodes
            .iter()
            .filter(|(other, _)| other.id != node.id)
            .map(|(other, _)| (other.id.clone(), other.addr.to_string()))
            .collect();
        want.sort();
        assert_eq!(got, want, "neighbours of {}", node.addr);
        let (_, metrics) = http_get(http, "/metrics");
        assert_eq!(
            sample(&metrics, "servent_neighbors"),
            Some(2.0),
            "{metrics}"
        );
    }
}
