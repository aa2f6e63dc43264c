//! `Connect`: a leaf asks that one of our leaves dial it (reverse connect
//! and hole punching, docs/PROTOCOL.md 10.5). Whether the request is
//! passed on is `servent_proto::connect::Connects`; this module carries it
//! between the asker's stream and the leaf's session.
//!
//! The address the leaf is told to dial is the one this supernode observes
//! the asker's connection come from, never one the asker names: a
//! supernode cannot be used to make its leaves dial a third party.

use std::sync::Arc;
use std::time::{Duration, Instant};

use servent_net::{canonical, Peer};
use servent_proto::msg::{ErrorCode, ErrorReply, LeafReply, SupernodeReply, SupernodeRequest};
use servent_proto::NodeId;
use tracing::debug;

use crate::owner::Command;
use crate::State;

/// Longest wait for the leaf asked to say it will dial (`Connect`) or
/// take the relayed connection (`Relay`).
pub(crate) const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `asker` may have something asked of our leaf `to` (a
/// `Connect`, or a `Relay`: both share the rates of
/// `servent_proto::connect::Connects`), and that leaf's session if so.
pub(crate) async fn admit(
    state: &Arc<State>,
    asker: &Peer,
    to: NodeId,
) -> Result<quinn::Connection, ErrorReply> {
    if to == asker.id {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            "asked to connect to itself",
        ));
    }
    let ip = canonical(asker.conn.remote_address()).ip();
    let exempt = state.config.exempt_ips.contains(&ip);
    let admitted = state.connects.lock().expect("connect limits lock").admit(
        Instant::now(),
        asker.id,
        (!exempt).then_some(ip),
        to,
    );
    if let Err(r) = admitted {
        return Err(ErrorReply::new(ErrorCode::RateLimited, r.reason()));
    }
    state
        .ask(|reply| Command::Session { id: to, reply })
        .await
        .flatten()
        .ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::NotFound,
                format!("{} is not a leaf of this supernode", to.short()),
            )
        })
}

/// Passes `asker`'s request on to our leaf `to`, and answers with where
/// that leaf dials from.
pub(crate) async fn connect(
    state: &Arc<State>,
    asker: &Peer,
    to: NodeId,
) -> Result<SupernodeReply, ErrorReply> {
    let refused = |code, message: String| {
        state.metrics.connects_refused.inc();
        ErrorReply::new(code, message)
    };
    let session = admit(state, asker, to).await.inspect_err(|_| {
        state.metrics.connects_refused.inc();
    })?;
    let observed = canonical(asker.conn.remote_address());
    let from = canonical(session.remote_address());
    let request = SupernodeRequest::Connect {
        peer: asker.id,
        addr: observed.to_string(),
    };
    let answer = tokio::time::timeout(
        ANSWER_TIMEOUT,
        crate::election::ask_leaf(Some(&session), &request),
    )
    .await;
    match answer {
        Ok(Ok(LeafReply::Accepted)) => {
            state.metrics.connects_passed.inc();
            debug!(asker = %asker.id.short(), %observed, leaf = %to.short(), %from, "connect passed on");
            Ok(SupernodeReply::Connecting {
                addr: from.to_string(),
            })
        }
        Ok(Ok(LeafReply::Declined(why))) => {
            Err(refused(ErrorCode::Unavailable, format!("declined: {why}")))
        }
        Ok(Err(e)) => Err(refused(
            ErrorCode::Unavailable,
            format!("leaf did not answer: {e}"),
        )),
        Err(_) => Err(refused(
            ErrorCode::Unavailable,
            "leaf did not answer in time".into(),
        )),
    }
}
