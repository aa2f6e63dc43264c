//! Leaf-to-leaf download throughput against a bare quinn bulk transfer and
//! against nginx + curl over HTTPS, on loopback, in the same run.
//!
//! Ours: a source leaf shares one file of incompressible bytes, and a
//! downloader `Client` runs `get` (locate through the supernode, connect,
//! transfer, hash every byte, write the partial file, sync, rename).
//! Baseline 1: two `servent_net::Endpoint`s (the same rustls provider,
//! TLS and transport settings as ours) and one bidirectional stream on which
//! the server writes the same number of bytes from memory and the client
//! reads and discards them.
//! Baseline 2: `nginx` (one worker, `sendfile on`, TLS 1.3 only, a
//! self-signed certificate made at run time) serves the very file the source
//! leaf shares, and `curl` fetches it over HTTP/1.1 into a file, a new
//! process and connection each round. Where `nginx` or `curl` is not
//! installed, this column is skipped with a line saying so.
//! Rounds alternate ours and the baselines so that machine noise falls on
//! all of them.
//!
//! `cargo bench -p servent-tests --bench transfer` runs the full size
//! (`SERVENT_BENCH_BYTES`, default 1 GiB) for `SERVENT_BENCH_ROUNDS` rounds
//! (default 5) after one uncounted warm-up round, and prints the medians.
//! Invoked any other way (as `cargo test --all-targets` does), it makes one
//! quick 4 MiB round, so that test runs stay fast.
//!
//! CPU columns, on Linux: for leaf and quinn the CPU time of this whole
//! process (both nodes, or both endpoints, and the supernode) during the
//! round; for nginx + curl that of the curl process and the nginx worker.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use servent_net::{self as net, Endpoint, Identity};
use servent_proto::ContentHash;
use servent_tests::bench::{self, cpu_seconds, mbps, median};
use servent_tests::{random_bytes, supernode, wait_for, Client, Supernode, TestLeaf};

const FULL_BYTES: u64 = 1 << 30;
const QUICK_BYTES: u64 = 4 << 20;
const FULL_ROUNDS: usize = 5;
/// Size of the buffer the quinn baseline server sends over and over.
const PIECE: usize = 4 << 20;
const BASELINE_ALPN: &[u8] = b"servent-bench/1";
/// Hashing 1 GiB takes a few seconds in release; leave room for slow disks.
const INDEX_TIMEOUT: Duration = Duration::from_secs(300);
const LOCATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of the shared file, and its path on the nginx server.
const FILE_NAME: &str = "big.bin";
/// Longest wait for nginx to accept connections, and for it to stop.
const NGINX_START: Duration = Duration::from_secs(10);
const NGINX_STOP: Duration = Duration::from_secs(5);
/// Longest a curl download may take (1 GiB at a slow 10 MB/s is 100 s).
const CURL_TIMEOUT_SECS: u64 = 600;

fn main() -> Result<()> {
    bench::init_logging();
    let full = bench::full_mode();
    let bytes = bench::setting("SERVENT_BENCH_BYTES", full, FULL_BYTES, QUICK_BYTES)?;
    let rounds = bench::setting("SERVENT_BENCH_ROUNDS", full, FULL_ROUNDS, 1)?;
    ensure!(
        bytes > 0 && rounds > 0,
        "need at least one byte and one round"
    );
    bench::block_on(run(bytes, rounds, full))
}

/// MB/s and CPU seconds of the counted rounds of one column.
#[derive(Default)]
struct Column {
    mbps: Vec<f64>,
    cpu: Vec<f64>,
}

impl Column {
    fn push(&mut self, mbps: f64, cpu: f64) {
        self.mbps.push(mbps);
        self.cpu.push(cpu);
    }

    /// Median MB/s and median CPU seconds.
    fn medians(&mut self) -> (f64, f64) {
        (median(&mut self.mbps), median(&mut self.cpu))
    }
}

async fn run(bytes: u64, rounds: usize, warm_up: bool) -> Result<()> {
    println!(
        "transfer: {bytes} bytes ({:.1} MiB) leaf to leaf vs bare quinn vs nginx + curl \
         (HTTPS), loopback, {rounds} round(s){}",
        bytes as f64 / (1 << 20) as f64,
        if warm_up { " after a warm-up" } else { "" },
    );
    println!("machine: {}", bench::machine());

    let sn = supernode().await;
    let (source, hash) = source_leaf(&sn, bytes).await?;
    let downloader_data = tempfile::tempdir()?;
    let client = Client::new(downloader_data.path(), vec![sn.addr().to_string()])?;
    let out_dir = tempfile::tempdir()?;
    let baseline = Baseline::start()?;
    let https = match Tools::find() {
        Ok(tools) => {
            let server = Nginx::start(&tools.nginx, &source.share_path(FILE_NAME))?;
            println!("{}; {}", server.version, tools.curl_version);
            Some((tools, server))
        }
        Err(why) => {
            println!("nginx + curl column skipped: {why}");
            None
        }
    };

    let (mut ours, mut bare, mut web) = (Column::default(), Column::default(), Column::default());
    println!();
    print!(
        "{:>7}  {:>10}  {:>9}  {:>10}  {:>9}",
        "round", "leaf MB/s", "leaf CPU", "quinn MB/s", "quinn CPU"
    );
    if https.is_some() {
        print!("  {:>10}  {:>9}", "curl MB/s", "curl CPU");
    }
    println!();
    let (mut previous, mut previous_curl): (Option<PathBuf>, Option<PathBuf>) = (None, None);
    let first = if warm_up { 0 } else { 1 };
    for round in first..=rounds {
        // The last download is deleted just before the next one rather than
        // right after it, so that freeing its page cache does not fall into
        // another column's round.
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
        print!("{label:>7}  {a:>10.1}  {cpu_a:>8.2}s  {b:>10.1}  {cpu_b:>8.2}s");
        if round > 0 {
            ours.push(a, cpu_a);
            bare.push(b, cpu_b);
        }
        if let Some((tools, server)) = &https {
            if let Some(p) = previous_curl.take() {
                std::fs::remove_file(p)?;
            }
            let out = out_dir.path().join(format!("curl-{round}.bin"));
            let (c, cpu_c) = curl_download(tools, server, &out, bytes).await?;
            previous_curl = Some(out);
            let c = mbps(bytes, c);
            print!("  {c:>10.1}  {cpu_c:>8.2}s");
            if round > 0 {
                web.push(c, cpu_c);
            }
        }
        println!();
    }
    let ((ours, ours_cpu), (bare, bare_cpu)) = (ours.medians(), bare.medians());
    print!(
        "{:>7}  {ours:>10.1}  {ours_cpu:>8.2}s  {bare:>10.1}  {bare_cpu:>8.2}s",
        "median"
    );
    let web = https.is_some().then(|| web.medians());
    if let Some((web, web_cpu)) = web {
        print!("  {web:>10.1}  {web_cpu:>8.2}s");
    }
    println!();
    println!();
    println!("leaf/quinn ratio: {:.2}", ours / bare);
    if let Some((web, _)) = web {
        println!("leaf/curl ratio: {:.2}", ours / web);
    }

    drop(https);
    drop(source);
    Ok(())
}

/// Writes `bytes` of incompressible content into a new share, and starts a
/// leaf sharing it; returns once the supernode has indexed it.
async fn source_leaf(sn: &Supernode, bytes: u64) -> Result<(TestLeaf, ContentHash)> {
    let data = tempfile::tempdir()?;
    let share = tempfile::tempdir()?;
    let path = share.path().join(FILE_NAME);
    let hash = tokio::task::spawn_blocking(move || bench::write_file(&path, bytes)).await??;

    let mut leaf = TestLeaf {
        leaf: None,
        attach: leaf::attach::DEFAULT_ATTACH,
        max_upload_rate: None,
        ui: false,
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

/// The two programs of the HTTPS baseline.
struct Tools {
    nginx: PathBuf,
    curl: PathBuf,
    /// curl's version and TLS library, from `curl --version`.
    curl_version: String,
}

impl Tools {
    /// Finds `nginx` and `curl`, or says which one is missing.
    fn find() -> Result<Self, String> {
        // nginx lives in an sbin folder, which a user's PATH may lack.
        let nginx = find_program(
            "nginx",
            &["/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"],
        )
        .ok_or("nginx is not installed (not on PATH nor in /usr/sbin)")?;
        let curl = find_program("curl", &[]).ok_or("curl is not installed (not on PATH)")?;
        let curl_version = Command::new(&curl)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                // "curl 7.88.1 (x86_64-pc-linux-gnu) libcurl/7.88.1 OpenSSL/3.0.19 ..."
                let text = String::from_utf8_lossy(&o.stdout);
                let words: Vec<&str> = text.lines().next()?.split_whitespace().collect();
                let tls = words
                    .iter()
                    .find(|w| w.contains("SSL") || w.contains("TLS"));
                Some(match (words.get(..2), tls) {
                    (Some(name), Some(tls)) => format!("{} with {tls}", name.join(" ")),
                    (Some(name), None) => name.join(" "),
                    _ => text.trim().to_string(),
                })
            })
            .ok_or_else(|| format!("{} --version failed", curl.display()))?;
        Ok(Self {
            nginx,
            curl,
            curl_version,
        })
    }
}

/// `name` in a folder of PATH or of `extra`, if it is there.
fn find_program(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// An nginx master process (and its one worker) serving one file over HTTPS
/// on 127.0.0.1, with its configuration, certificate, pid file and logs in a
/// folder of its own; stopped when dropped.
struct Nginx {
    child: Child,
    program: PathBuf,
    /// `nginx -v`'s line.
    version: String,
    url: String,
    workers: Vec<u32>,
    dir: tempfile::TempDir,
}

impl Nginx {
    fn start(program: &Path, file: &Path) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let root = file.parent().context("the shared file has no folder")?;
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .context("the shared file has no name")?;
        let version = Command::new(program)
            .arg("-v")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .with_context(|| format!("cannot run {}", program.display()))?;

        let cert = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
        ])?;
        std::fs::write(d.join("cert.pem"), cert.cert.pem())?;
        std::fs::write(d.join("key.pem"), cert.signing_key.serialize_pem())?;

        // A free port: bind one, then let it go for nginx to take.
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        // As root, nginx's worker would run as `nobody`, who may not enter
        // the share's private temporary folder.
        let user = if running_as_root() {
            "user root;\n"
        } else {
            ""
        };
        let p = d.display();
        let conf = format!(
            "{user}worker_processes 1;\n\
             pid {p}/nginx.pid;\n\
             error_log {p}/error.log warn;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
             \x20   access_log {p}/access.log;\n\
             \x20   client_body_temp_path {p}/body;\n\
             \x20   proxy_temp_path {p}/proxy;\n\
             \x20   fastcgi_temp_path {p}/fastcgi;\n\
             \x20   uwsgi_temp_path {p}/uwsgi;\n\
             \x20   scgi_temp_path {p}/scgi;\n\
             \x20   default_type application/octet-stream;\n\
             \x20   sendfile on;\n\
             \x20   tcp_nopush on;\n\
             \x20   server {{\n\
             \x20       listen 127.0.0.1:{port} ssl;\n\
             \x20       ssl_protocols TLSv1.3;\n\
             \x20       ssl_certificate {p}/cert.pem;\n\
             \x20       ssl_certificate_key {p}/key.pem;\n\
             \x20       root {root};\n\
             \x20   }}\n\
             }}\n",
            root = root.display(),
        );
        std::fs::write(d.join("nginx.conf"), conf)?;

        let child = Command::new(program)
            .args(Self::args(d))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr.log"))?)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        // From here on, dropping `me` stops nginx, on errors too.
        let mut me = Self {
            child,
            program: program.to_path_buf(),
            version,
            url: format!("https://127.0.0.1:{port}/{name}"),
            workers: Vec::new(),
            dir,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + NGINX_START;
        loop {
            if let Some(status) = me.child.try_wait()? {
                bail!("nginx exited at start ({status}): {}", me.logs());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx did not accept connections on {addr} within {} s: {}",
                    NGINX_START.as_secs(),
                    me.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        me.workers = bench::child_pids(me.child.id());
        Ok(me)
    }

    /// The options that point nginx at this folder's configuration and log.
    fn args(dir: &Path) -> [std::ffi::OsString; 6] {
        let mut prefix = dir.as_os_str().to_owned();
        prefix.push("/");
        [
            "-p".into(),
            prefix,
            "-c".into(),
            dir.join("nginx.conf").into(),
            "-e".into(),
            dir.join("error.log").into(),
        ]
    }

    /// What nginx said at start, for an error message.
    fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("stderr.log"), read("error.log"))
            .trim()
            .to_string()
    }

    /// CPU seconds the workers have used so far.
    fn workers_cpu(&self) -> f64 {
        self.workers
            .iter()
            .map(|&w| bench::pid_cpu_seconds(w))
            .sum()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // `nginx -s stop` has the master stop its workers; killing the
        // master alone would leave the worker running.
        let _ = Command::new(&self.program)
            .args(Self::args(self.dir.path()))
            .args(["-s", "stop"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + NGINX_STOP;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// One curl download from `server` into `out`, timed from starting curl to
/// its exit; checks the size. Returns the time and the CPU seconds curl and
/// the nginx worker used.
async fn curl_download(
    tools: &Tools,
    server: &Nginx,
    out: &Path,
    bytes: u64,
) -> Result<(Duration, f64)> {
    let mut curl = Command::new(&tools.curl);
    curl.args(["-sS", "-k", "--http1.1", "--tlsv1.3"])
        .args(["--max-time", &CURL_TIMEOUT_SECS.to_string()])
        .arg("-o")
        .arg(out)
        .arg(&server.url)
        .stdin(Stdio::null());
    let worker_cpu = server.workers_cpu();
    let (took, curl_cpu, output) = tokio::task::spawn_blocking(move || {
        let cpu = bench::children_cpu_seconds();
        let started = Instant::now();
        let output = curl.output();
        let took = started.elapsed();
        (took, bench::children_cpu_seconds() - cpu, output)
    })
    .await?;
    let cpu = curl_cpu + server.workers_cpu() - worker_cpu;
    let output = output.with_context(|| format!("cannot run {}", tools.curl.display()))?;
    ensure!(
        output.status.success(),
        "curl failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let len = std::fs::metadata(out)?.len();
    ensure!(
        len == bytes,
        "curl downloaded {len} bytes, expected {bytes}"
    );
    Ok((took, cpu))
}
