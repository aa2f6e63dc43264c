//! `Relay`: the last resort for two leaves that cannot reach each other
//! (docs/PROTOCOL.md 10.6). A leaf asks on a stream; this supernode opens
//! a stream on the session of the leaf asked for, and, once that leaf
//! accepts, splices the two. The leaves run their own QUIC connection
//! through the splice (`servent_net::tunnel`), so what passes here is
//! ciphertext. The budgets are `servent_proto::relay::Relays`'; this
//! module moves the bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use servent_net::{self as net, canonical, Peer};
use servent_proto::limits::MAX_REPLY_FRAME;
use servent_proto::msg::{ErrorCode, ErrorReply, LeafReply, SupernodeReply, SupernodeRequest};
use servent_proto::relay::{Carry, CircuitId, Ended, RelayLimits};
use servent_proto::NodeId;
use tracing::debug;

use crate::State;

/// Most bytes read from one side before they are forwarded: the one chunk
/// a direction holds.
const CHUNK: usize = 64 * 1024;

/// Relay settings (the `[relay]` table of the config file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Relay connections between leaves that reach each other no other
    /// way. Default true.
    pub enabled: bool,
    /// Circuits open at once. Default 64.
    pub max_circuits: usize,
    /// Circuits open at once with one leaf at either end. Default 4.
    pub max_circuits_per_leaf: usize,
    /// Circuits open at once asked for from one IP address. Default 8.
    pub max_circuits_per_ip: usize,
    /// Bytes a circuit carries (both ways) before it ends. Default 4 GiB.
    pub circuit_bytes: u64,
    /// Seconds a circuit lasts at most. Default 3600.
    pub circuit_secs: u64,
    /// Seconds a circuit may carry nothing before it ends. Default 30.
    pub circuit_idle_secs: u64,
    /// Bytes per second one circuit carries. Default 16 MiB/s.
    pub circuit_rate: u32,
    /// Bytes per second all circuits carry together. Default 64 MiB/s.
    pub total_rate: u32,
}

impl Default for RelayConfig {
    fn default() -> Self {
        let d = RelayLimits::default();
        Self {
            enabled: d.enabled,
            max_circuits: d.max_circuits,
            max_circuits_per_leaf: d.max_circuits_per_leaf,
            max_circuits_per_ip: d.max_circuits_per_ip,
            circuit_bytes: d.circuit_bytes,
            circuit_secs: d.circuit_duration.as_secs(),
            circuit_idle_secs: d.circuit_idle.as_secs(),
            circuit_rate: d.circuit_rate,
            total_rate: d.total_rate,
        }
    }
}

impl RelayConfig {
    pub fn limits(&self) -> RelayLimits {
        RelayLimits {
            enabled: self.enabled,
            max_circuits: self.max_circuits,
            max_circuits_per_leaf: self.max_circuits_per_leaf,
            max_circuits_per_ip: self.max_circuits_per_ip,
            circuit_bytes: self.circuit_bytes,
            circuit_duration: Duration::from_secs(self.circuit_secs),
            circuit_idle: Duration::from_secs(self.circuit_idle_secs),
            circuit_rate: self.circuit_rate,
            total_rate: self.total_rate,
        }
    }
}

/// An open circuit's place in the counts, freed however the relay ends.
struct Open<'a> {
    state: &'a State,
    id: CircuitId,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.state.relays.lock().expect("relay lock").close(self.id);
    }
}

/// Relays `asker`'s stream (`send`/`recv`, its `Relay` frame read) to our
/// leaf `to`, until either end closes or the circuit's budget ends it. An
/// error is the answer to send instead of `Relaying`.
pub(crate) async fn relay(
    state: &Arc<State>,
    asker: &Peer,
    to: NodeId,
    send: &mut quinn::SendStream,
    recv: quinn::RecvStream,
) -> Result<(), ErrorReply> {
    let refused = |code, message: String| {
        state.metrics.relays_refused.inc();
        ErrorReply::new(code, message)
    };
    // Each `Relay` asks something of our leaf, as a `Connect` does: the
    // same rates hold for both, together.
    let session = crate::connect::admit(state, asker, to)
        .await
        .inspect_err(|_| {
            state.metrics.relays_refused.inc();
        })?;
    let ip = canonical(asker.conn.remote_address()).ip();
    let opened = state
        .relays
        .lock()
        .expect("relay lock")
        .open(Instant::now(), asker.id, ip, to);
    let id = match opened {
        Ok(id) => id,
        Err(r) => return Err(refused(ErrorCode::RateLimited, r.reason().into())),
    };
    let open = Open {
        state: state.as_ref(),
        id,
    };
    // Our side stays open: it is the tunnel's.
    let request = SupernodeRequest::Relay { peer: asker.id };
    let asked = async {
        match crate::election::ask_leaf_on(&session, &request, false).await? {
            (LeafReply::Accepted, send, recv) => Ok((send, recv)),
            (LeafReply::Declined(why), ..) => Err(format!("declined: {why}")),
        }
    };
    let (leaf_send, leaf_recv) =
        match tokio::time::timeout(crate::connect::ANSWER_TIMEOUT, asked).await {
            Ok(Ok(streams)) => streams,
            Ok(Err(why)) => return Err(refused(ErrorCode::Unavailable, why)),
            Err(_) => {
                return Err(refused(
                    ErrorCode::Unavailable,
                    "leaf did not answer in time".into(),
                ))
            }
        };
    if net::write_frame(send, &SupernodeReply::Relaying, MAX_REPLY_FRAME)
        .await
        .is_err()
    {
        return Ok(());
    }
    state.metrics.relays_opened.inc();
    debug!(asker = %asker.id.short(), leaf = %to.short(), "relaying");
    let (deadline, idle) = {
        let relays = state.relays.lock().expect("relay lock");
        (relays.deadline(id), relays.limits().circuit_idle)
    };
    let until = tokio::time::Instant::from_std(deadline.unwrap_or_else(Instant::now));
    let mut leaf_send = leaf_send;
    // When either direction last carried a chunk.
    let last = std::sync::Mutex::new(tokio::time::Instant::now());
    let idled = async {
        loop {
            let at = *last.lock().expect("relay clock") + idle;
            tokio::time::sleep_until(at).await;
            if *last.lock().expect("relay clock") + idle <= tokio::time::Instant::now() {
                return Ended::Idle;
            }
        }
    };
    let ended = tokio::select! {
        e = carry(state, id, recv, &mut leaf_send, &last) => e,
        e = carry(state, id, leaf_recv, send, &last) => e,
        _ = tokio::time::sleep_until(until) => Ended::Duration,
        e = idled => e,
    };
    debug!(asker = %asker.id.short(), leaf = %to.short(), ?ended, "relay ended");
    let _ = leaf_send.finish();
    drop(open);
    Ok(())
}

/// Forwards `from` to `to` within circuit `id`'s budget, until either
/// stream ends or the budget does.
async fn carry(
    state: &State,
    id: CircuitId,
    mut from: quinn::RecvStream,
    to: &mut quinn::SendStream,
    last: &std::sync::Mutex<tokio::time::Instant>,
) -> Ended {
    loop {
        let chunk = match from.read_chunk(CHUNK, true).await {
            Ok(Some(c)) => c.bytes,
            Ok(None) | Err(_) => return Ended::Closed,
        };
        *last.lock().expect("relay clock") = tokio::time::Instant::now();
        let decision =
            state
                .relays
                .lock()
                .expect("relay lock")
                .carry(Instant::now(), id, chunk.len());
        match decision {
            Carry::After(wait) => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            Carry::End(why) => {
                let _ = from.stop(0u32.into());
                return why;
            }
        }
        state.metrics.relayed_bytes.inc_by(chunk.len() as u64);
        if to.write_chunk(chunk).await.is_err() {
            return Ended::Closed;
        }
    }
}
