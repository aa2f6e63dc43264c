//! Helpers that build whole Servent nodes in one call, for the in-process
//! network tests and the benchmarks: each starts on `127.0.0.1:0` in its own
//! temporary folders and shuts down when dropped.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use servent_proto::ContentHash;

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
    pub data: tempfile::TempDir,
    pub share: tempfile::TempDir,
}

impl TestLeaf {
    /// Starts a leaf sharing `files` (name, content) and registered with `supernodes`.
    pub async fn start(supernodes: &[&Supernode], files: &[(&str, &[u8])]) -> Self {
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
        let config = leaf::Config::localhost(self.data.path(), self.share.path(), addrs);
        self.leaf = Some(Leaf::spawn(config).await.expect("leaf starts"));
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
