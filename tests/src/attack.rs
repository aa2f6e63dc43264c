//! What the hostile-peer tests (`tests/tests/hostile*.rs`) share: an
//! attacker's endpoint on a loopback address of its own, a thread and
//! runtime for it to run on, one lock so that tests measuring honest
//! latency under attack run one at a time, and percentiles.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use servent_net::{Endpoint, Identity};

/// These tests measure honest latency and rate under attack: hold this
/// for a whole test, so that one test's attack is not another's noise.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// An endpoint with a fresh node id on `ip`, port 0: an attacker's on
/// 127.0.0.2 and up (where the per-address limits apply), an honest one on
/// the exempt 127.0.0.1. It accepts `alpns` and dials any.
pub fn endpoint_on(ip: &str, alpns: &[&[u8]]) -> Endpoint {
    let identity = Arc::new(Identity::generate().expect("identity"));
    let at: SocketAddr = format!("{ip}:0").parse().expect("an IP address");
    Endpoint::bind(identity, at, alpns).expect("bind a loopback address")
}

/// Runs `attack` on a thread and runtime of its own, as another process
/// would: the attacker's own work (it makes the handshakes it floods
/// with) then competes with the honest nodes for the machine's cores, not
/// for their runtime's threads.
pub fn elsewhere<T: Send + 'static>(
    attack: impl Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("attacker runtime")
            .block_on(attack)
    })
}

/// The `p`th percentile of `times` (nearest rank), zero if empty.
pub fn percentile(times: &[Duration], p: usize) -> Duration {
    if times.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// The 95th percentile of `times`.
pub fn p95(times: &[Duration]) -> Duration {
    percentile(times, 95)
}
