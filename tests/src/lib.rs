//! Helpers that build whole Servent nodes in one call, for the in-process
//! network tests and the benchmarks: each starts on `127.0.0.1:0` in its own
//! temporary folders and shuts down when dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use servent_proto::ContentHash;

pub mod attack;
pub mod bench;
pub mod bins;
pub mod http;
pub mod lab;
pub mod sim;

pub use leaf::{Client, Leaf};
pub use supernode::Supernode;

/// Starts a supernode on `127.0.0.1:0` with a fresh identity.
pub async fn supernode() -> Supernode {
    supernode_with(supernode::Config::localhost()).await
}

pub async fn supernode_with(config: supernode::Config) -> Supernode {
    Supernode::spawn(config).await.expect("supernode starts")
}

/// A leaf with its own data dir and share folder, both removed on drop.
pub struct TestLeaf {
    pub leaf: Option<Leaf>,
    /// Supernodes to be attached to at once (the leaf default unless set).
    pub attach: usize,
    /// Upload rate cap in bytes a second (none unless set).
    pub max_upload_rate: Option<u64>,
    /// Serve the control API and web UI on `127.0.0.1:0` (off unless set).
    pub ui: bool,
    pub data: tempfile::TempDir,
    pub share: tempfile::TempDir,
}

impl TestLeaf {
    /// Starts a leaf sharing `files` (name, content) and registered with `supernodes`.
    pub async fn start(supernodes: &[&Supernode], files: &[(&str, &[u8])]) -> Self {
        Self::start_attached(supernodes, files, leaf::attach::DEFAULT_ATTACH).await
    }

    /// Like [`TestLeaf::start`], with uploads capped at `rate` bytes a second.
    pub async fn start_capped(
        supernodes: &[&Supernode],
        files: &[(&str, &[u8])],
        rate: u64,
    ) -> Self {
        Self::start_with(supernodes, files, leaf::attach::DEFAULT_ATTACH, Some(rate)).await
    }

    /// Like [`TestLeaf::start`], attached to at most `attach` supernodes.
    pub async fn start_attached(
        supernodes: &[&Supernode],
        files: &[(&str, &[u8])],
        attach: usize,
    ) -> Self {
        Self::start_with(supernodes, files, attach, None).await
    }

    async fn start_with(
        supernodes: &[&Supernode],
        files: &[(&str, &[u8])],
        attach: usize,
        max_upload_rate: Option<u64>,
    ) -> Self {
        let data = tempfile::tempdir().expect("tempdir");
        let share = tempfile::tempdir().expect("tempdir");
        for (name, content) in files {
            let path = share.path().join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("mkdir");
            }
            std::fs::write(path, content).expect("write shared file");
        }
        let mut me = Self {
            leaf: None,
            attach,
            max_upload_rate,
            ui: false,
            data,
            share,
        };
        me.restart(supernodes).await;
        me
    }

    /// (Re)starts the leaf process on the same data dir and share.
    pub async fn restart(&mut self, supernodes: &[&Supernode]) {
        if let Some(old) = self.leaf.take() {
            old.shutdown().await;
        }
        let addrs = supernodes.iter().map(|s| s.addr().to_string()).collect();
        let config = leaf::Config {
            attach: self.attach,
            max_upload_rate: self.max_upload_rate,
            ui: self.ui.then(|| SocketAddr::from(([127, 0, 0, 1], 0))),
            ..leaf::Config::localhost(self.data.path(), self.share.path(), addrs)
        };
        self.leaf = Some(Leaf::spawn(config).await.expect("leaf starts"));
    }

    /// Like [`TestLeaf::start`], serving the control API and web UI.
    pub async fn start_ui(supernodes: &[&Supernode], files: &[(&str, &[u8])]) -> Self {
        let mut me = Self::start(supernodes, files).await;
        me.ui = true;
        me.restart(supernodes).await;
        me
    }

    pub fn leaf(&self) -> &Leaf {
        self.leaf.as_ref().expect("leaf running")
    }

    /// A one-shot client (as `leaf search`/`leaf get` use) on this leaf's data dir.
    pub fn client(&self, supernodes: &[&Supernode]) -> Client {
        let addrs = supernodes.iter().map(|s| s.addr().to_string()).collect();
        Client::new(self.data.path(), addrs).expect("client")
    }

    /// Waits until every supernode link has indexed all `n` files.
    pub async fn wait_indexed(&self, n: u32) {
        wait_for(Duration::from_secs(10), || async {
            let l = self.leaf();
            l.share().len() == n as usize
                && !l.indexed().is_empty()
                && l.indexed().iter().all(|&i| i == n)
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "leaf did not get {n} files indexed: {:?}",
                self.leaf().indexed()
            )
        });
    }

    pub fn share_path(&self, name: &str) -> PathBuf {
        self.share.path().join(name)
    }

    /// Stops the leaf abruptly-ish (its connections close) and keeps its folders.
    pub async fn stop(&mut self) {
        if let Some(l) = self.leaf.take() {
            l.shutdown().await;
        }
    }
}

#[derive(Debug)]
pub struct TimedOut;

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_for<F, Fut>(timeout: Duration, mut cond: F) -> Result<(), TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TimedOut);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The BLAKE3 content hash of `bytes`.
pub fn hash_of(bytes: &[u8]) -> ContentHash {
    ContentHash(*blake3::hash(bytes).as_bytes())
}

/// Deterministic pseudo-random bytes (not compressible, cheap to make).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

/// A UDP socket on `127.0.0.1:0` that drops traffic by a rule, to stand in
/// for a crashed host or a NAT in tests.
#[derive(Debug)]
pub struct FilteredSocket {
    inner: std::sync::Arc<dyn quinn::AsyncUdpSocket>,
    rule: Rule,
}

#[derive(Debug)]
enum Rule {
    /// Silent once the switch is thrown: nothing leaves, nothing arrives.
    Killable(std::sync::Arc<std::sync::atomic::AtomicBool>),
    /// A NAT with address-dependent filtering: datagrams arrive only from
    /// addresses this socket has sent to.
    Nat(std::sync::Mutex<std::collections::HashSet<std::net::SocketAddr>>),
    /// Talks to these addresses only, until the gate opens; then to all.
    Gated(
        Vec<std::net::SocketAddr>,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    ),
}

/// Opens a gated socket's gate.
#[derive(Debug, Clone)]
pub struct Gate(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Gate {
    pub fn open(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A socket that exchanges datagrams with the given addresses only until
/// its [`Gate`] opens: a node on it reaches its supernodes and nobody else,
/// neither by a dial nor by being dialled, until then.
pub struct GatedSocket;

impl GatedSocket {
    pub fn bind(only: &[std::net::SocketAddr]) -> (std::sync::Arc<FilteredSocket>, Gate) {
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        (
            FilteredSocket::bind(Rule::Gated(only.to_vec(), open.clone())),
            Gate(open),
        )
    }
}

/// Makes a killable socket go silent: a crash or a cut cable, so its peers
/// get no goodbye and must notice by themselves.
#[derive(Debug, Clone)]
pub struct KillSwitch(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl KillSwitch {
    pub fn kill(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A socket that [`KillSwitch::kill`] silences.
pub struct KillableSocket;

impl KillableSocket {
    pub fn bind() -> (std::sync::Arc<FilteredSocket>, KillSwitch) {
        let dead = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        (
            FilteredSocket::bind(Rule::Killable(dead.clone())),
            KillSwitch(dead),
        )
    }
}

/// A socket behind a simulated NAT: a node on it can dial out and be
/// answered, but nobody can dial it first, so a dial-back from a socket it
/// never talked to does not get through.
pub struct NatSocket;

impl NatSocket {
    pub fn bind() -> std::sync::Arc<FilteredSocket> {
        FilteredSocket::bind(Rule::Nat(Default::default()))
    }
}

impl FilteredSocket {
    fn bind(rule: Rule) -> std::sync::Arc<Self> {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let inner = quinn::default_runtime()
            .expect("inside a tokio runtime")
            .wrap_udp_socket(sock)
            .expect("wrap udp socket");
        std::sync::Arc::new(Self { inner, rule })
    }

    fn dead(&self) -> bool {
        matches!(&self.rule, Rule::Killable(d) if d.load(std::sync::atomic::Ordering::SeqCst))
    }

    fn admits(&self, from: &std::net::SocketAddr) -> bool {
        match &self.rule {
            Rule::Killable(_) => !self.dead(),
            Rule::Nat(table) => table.lock().expect("nat table").contains(from),
            Rule::Gated(only, open) => {
                open.load(std::sync::atomic::Ordering::SeqCst) || only.contains(from)
            }
        }
    }
}

impl quinn::AsyncUdpSocket for FilteredSocket {
    fn create_io_poller(self: std::sync::Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> std::io::Result<()> {
        match &self.rule {
            Rule::Killable(_) if self.dead() => return Ok(()),
            Rule::Nat(table) => {
                table
                    .lock()
                    .expect("nat table")
                    .insert(transmit.destination);
            }
            Rule::Gated(..) if !self.admits(&transmit.destination) => return Ok(()),
            Rule::Killable(_) | Rule::Gated(..) => {}
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context<'_>,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                std::task::Poll::Ready(Ok(n)) => {
                    // Keep the admitted datagrams, in order, at the front.
                    let mut kept = 0;
                    for i in 0..n {
                        if self.admits(&meta[i].addr) {
                            if kept != i {
                                meta.swap(kept, i);
                                bufs.swap(kept, i);
                            }
                            kept += 1;
                        }
                    }
                    if kept > 0 {
                        return std::task::Poll::Ready(Ok(kept));
                    }
                }
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A supernode that [`KillSwitch::kill`] silences without goodbye.
pub async fn killable_supernode(config: supernode::Config) -> (Supernode, KillSwitch) {
    let (socket, switch) = KillableSocket::bind();
    let node = Supernode::spawn_on_socket(config, socket)
        .await
        .expect("supernode starts");
    (node, switch)
}

/// A mesh test configuration: loopback, port 0, bootstrapping from `peers`.
pub fn mesh_config(peers: &[&Supernode]) -> supernode::Config {
    supernode::Config {
        peers: peers.iter().map(|p| p.addr().to_string()).collect(),
        ..supernode::Config::localhost()
    }
}
