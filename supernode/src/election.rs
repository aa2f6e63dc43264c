//! Growing the network: electing capable leaves to supernode, handing
//! leaves over to them, and stepping down when no longer needed.
//!
//! The decisions are `servent_proto::elect::Election`'s, a state machine
//! with no I/O, held by the node's owner (`crate::owner`), which gives it
//! the facts it needs (the load, the room of the other supernodes, the
//! moment a promoted leaf joins the mesh). This module carries its actions
//! out in tasks of their own and reports their results back to the owner.
//! Facts a leaf claims
//! (spare CPU, memory, bandwidth) come from its `Candidacy`; the facts that
//! matter most are measured here: how long its session has lasted, and
//! whether it can be reached from outside, checked by dialling its announced
//! address from a *separate* socket (a dial-back over the leaf's own
//! connection, or from the socket it already talks to, would pass through
//! any NAT mapping and prove nothing).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use servent_proto::elect::{Policy, PromoteReply, Rules, STEP_DOWN_WAIT};
use servent_proto::limits::{MAX_ERROR_MESSAGE, MAX_REPLY_FRAME};
use servent_proto::msg::{
    truncate_utf8, LeafReply, SupernodeInfo, SupernodeRequest, ALPN_TRANSFER,
};
use servent_proto::NodeId;
use tracing::{debug, info, Instrument};

use crate::owner::Command;
use crate::State;
use servent_net::{self as net, Endpoint};

/// Election settings (the `[election]` table of the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElectionConfig {
    /// Elect at all. Default true.
    pub enabled: bool,
    /// Which rules: `"need"` (elect only while the network this supernode
    /// knows is short of room, about as many as it lacks; step down when
    /// not needed) or `"overload"` (elect whenever over the high-water
    /// mark; step down only when drained). Default `"need"`.
    pub rules: Rules,
    /// Need rules: thousandths of the known capacity free under which the
    /// network is short of room. Default 80.
    pub elect_below_spare_permille: u32,
    /// Need rules: thousandths free a round of elections aims at. Default 120.
    pub target_spare_permille: u32,
    /// Need rules: an elected supernode steps down when, without it, this
    /// many thousandths would still be free. Default 160.
    pub step_down_spare_permille: u32,
    /// Need rules: an elected supernode steps down without waiting out
    /// `drain_secs` when, without it, this many thousandths would still be
    /// free. Default 200.
    pub step_down_now_spare_permille: u32,
    /// Need rules: the highest chance, thousandths, that an elected
    /// supernode steps down in one round. Default 500.
    pub step_down_chance_max_permille: u32,
    /// Need rules: least seconds between two draws to elect or step down. Default 60.
    pub round_secs: f64,
    /// Least seconds between two promotions of this node when it is a
    /// leaf (the `[role]` of a leaf reads it). Default 3600.
    pub repromote_after_secs: f64,
    /// Load (thousandths of max_leaves) at which more supernodes are needed. Default 800.
    pub high_water_permille: u32,
    /// Seconds over the high-water mark before electing. Default 10.
    pub overload_secs: f64,
    /// Up to this many more seconds, at random. Default 10.
    pub jitter_secs: f64,
    /// Least seconds between two elections. Default 30.
    pub cooldown_secs: f64,
    /// Least session age of a candidate, seconds. Default 600.
    pub min_uptime_secs: f64,
    /// Least idle CPU of a candidate, thousandths. Default 500.
    pub min_cpu_idle_permille: u16,
    /// Least available memory of a candidate, MiB. Default 512.
    pub min_mem_mib: u32,
    /// Seconds an elected supernode must be drained before stepping down. Default 300.
    pub drain_secs: f64,
    /// An elected supernode with at most this many leaves is drained. Default 0.
    pub drained_leaves: usize,
    /// Seconds between two applications of the rules. Default 0.25.
    pub tick_secs: f64,
    /// Longest wait for a dial-back, seconds. Default 5.
    pub probe_timeout_secs: f64,
    /// Seconds after which a failed dial-back is retried. Default 60.
    pub probe_retry_secs: f64,
    /// Least seconds between two dial-backs of one leaf. Default 10.
    pub probe_spacing_secs: f64,
    /// Longest wait for a promoted leaf to join the mesh, seconds. Default 10.
    pub join_timeout_secs: f64,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        let p = Policy::default();
        Self {
            enabled: true,
            rules: p.rules,
            elect_below_spare_permille: p.elect_below_spare_permille,
            target_spare_permille: p.target_spare_permille,
            step_down_spare_permille: p.step_down_spare_permille,
            step_down_now_spare_permille: p.step_down_now_spare_permille,
            step_down_chance_max_permille: p.step_down_chance_max_permille,
            round_secs: p.round.as_secs_f64(),
            repromote_after_secs: p.repromote_after.as_secs_f64(),
            high_water_permille: p.high_water_permille,
            overload_secs: p.overload_for.as_secs_f64(),
            jitter_secs: p.jitter.as_secs_f64(),
            cooldown_secs: p.cooldown.as_secs_f64(),
            min_uptime_secs: p.min_uptime.as_secs_f64(),
            min_cpu_idle_permille: p.min_cpu_idle_permille,
            min_mem_mib: p.min_mem_mib,
            drain_secs: p.drain_for.as_secs_f64(),
            drained_leaves: p.drained_leaves,
            tick_secs: p.tick.as_secs_f64(),
            probe_timeout_secs: p.probe_timeout.as_secs_f64(),
            probe_retry_secs: p.probe_retry.as_secs_f64(),
            probe_spacing_secs: p.probe_spacing.as_secs_f64(),
            join_timeout_secs: p.join_timeout.as_secs_f64(),
        }
    }
}

impl ElectionConfig {
    pub fn policy(&self) -> Policy {
        // NaN and negative values mean zero; absurdly large ones are capped.
        let secs = |s: f64| {
            Duration::from_secs_f64(if s.is_finite() {
                s.clamp(0.0, 1e9)
            } else {
                0.0
            })
        };
        Policy {
            rules: self.rules,
            elect_below_spare_permille: self.elect_below_spare_permille,
            target_spare_permille: self.target_spare_permille,
            step_down_spare_permille: self.step_down_spare_permille,
            step_down_now_spare_permille: self.step_down_now_spare_permille,
            step_down_chance_max_permille: self.step_down_chance_max_permille,
            round: secs(self.round_secs),
            repromote_after: secs(self.repromote_after_secs),
            high_water_permille: self.high_water_permille,
            overload_for: secs(self.overload_secs),
            jitter: secs(self.jitter_secs),
            cooldown: secs(self.cooldown_secs),
            min_uptime: secs(self.min_uptime_secs),
            min_cpu_idle_permille: self.min_cpu_idle_permille,
            min_mem_mib: self.min_mem_mib,
            drain_for: secs(self.drain_secs),
            drained_leaves: self.drained_leaves,
            tick: secs(self.tick_secs),
            probe_timeout: secs(self.probe_timeout_secs),
            probe_retry: secs(self.probe_retry_secs),
            probe_spacing: secs(self.probe_spacing_secs),
            join_timeout: secs(self.join_timeout_secs),
        }
    }

    /// Quick rules for tests and demos: seconds instead of minutes.
    pub fn quick() -> Self {
        Self {
            overload_secs: 1.0,
            jitter_secs: 1.0,
            cooldown_secs: 3.0,
            round_secs: 3.0,
            min_uptime_secs: 0.5,
            min_cpu_idle_permille: 0,
            min_mem_mib: 0,
            drain_secs: 2.0,
            ..Self::default()
        }
    }
}

/// Dials `id` back at `addr` and reports to the core.
pub(crate) fn spawn_probe(
    state: &Arc<State>,
    probe: &Endpoint,
    id: NodeId,
    addr: SocketAddr,
    timeout: Duration,
) {
    let (state, probe) = (state.clone(), probe.clone());
    tokio::spawn(
        async move {
            let reachable =
                tokio::time::timeout(timeout, probe.connect(addr, ALPN_TRANSFER, Some(id)))
                    .await
                    .is_ok_and(|r| match r {
                        Ok(peer) => {
                            peer.conn.close(0u32.into(), b"dial-back done");
                            true
                        }
                        Err(e) => {
                            debug!(leaf = %id.short(), %addr, error = %e, "dial-back failed");
                            false
                        }
                    });
            match reachable {
                true => state.metrics.dial_backs_reached.inc(),
                false => state.metrics.dial_backs_failed.inc(),
            };
            let probed = Command::Probed {
                id,
                addr,
                reachable,
            };
            state.send(probed).await;
            debug!(leaf = %id.short(), %addr, reachable, "dial-back");
        }
        .in_current_span(),
    );
}

/// Sends `req` to a leaf of ours over its connection and waits for its answer.
pub(crate) async fn ask_leaf(
    conn: Option<&quinn::Connection>,
    req: &SupernodeRequest,
) -> Result<LeafReply, String> {
    let conn = conn.ok_or("leaf is gone")?;
    ask_leaf_on(conn, req, true).await.map(|(reply, ..)| reply)
}

/// Sends `req` on a new stream of `conn` (our side finished after it if
/// `finish`) and reads the leaf's answer; the stream stays the caller's.
pub(crate) async fn ask_leaf_on(
    conn: &quinn::Connection,
    req: &SupernodeRequest,
    finish: bool,
) -> Result<(LeafReply, quinn::SendStream, quinn::RecvStream), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    net::write_frame(&mut send, req, MAX_REPLY_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    if finish {
        let _ = send.finish();
    }
    match net::read_first_frame::<LeafReply>(&mut recv, MAX_REPLY_FRAME).await {
        Ok(Some(r)) => Ok((r, send, recv)),
        Ok(None) => Err("no answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn role_max_leaves(state: &State) -> u32 {
    state.config.max_leaves.min(u32::MAX as usize) as u32
}

/// Asks `id` (on `conn`, if it is still registered) to become a supernode
/// and reports its answer to the core.
pub(crate) fn spawn_promote(state: &Arc<State>, id: NodeId, conn: Option<quinn::Connection>) {
    let state = state.clone();
    tokio::spawn(async move { promote(&state, id, conn).await }.in_current_span());
}

async fn promote(state: &State, id: NodeId, conn: Option<quinn::Connection>) {
    let max_leaves = role_max_leaves(state);
    let promote = SupernodeRequest::Promote { max_leaves };
    let reply = match ask_leaf(conn.as_ref(), &promote).await {
        Ok(LeafReply::Accepted) => {
            state.promotions.fetch_add(1, Ordering::Relaxed);
            info!(leaf = %id.short(), "leaf promoted to supernode");
            PromoteReply::Accepted
        }
        Ok(LeafReply::Declined(mut why)) => {
            // Text for people, from a leaf: no longer than an error message.
            truncate_utf8(&mut why, MAX_ERROR_MESSAGE);
            info!(leaf = %id.short(), %why, "promotion declined");
            PromoteReply::Declined
        }
        Err(e) => {
            debug!(leaf = %id.short(), error = %e, "promotion failed");
            PromoteReply::Failed
        }
    };
    // It dials us as its first peer: the owner sees it join the mesh.
    state.send(Command::PromoteReply { id, reply }).await;
}

/// Moves `movers` (some of our leaves, not the new supernode itself) to
/// `to`, which has joined the mesh from `addr`, one after the other.
pub(crate) fn spawn_hand_over(
    state: &Arc<State>,
    to: NodeId,
    addr: SocketAddr,
    movers: Vec<quinn::Connection>,
) {
    let state = state.clone();
    tokio::spawn(async move { hand_over(&state, to, addr, movers).await }.in_current_span());
}

async fn hand_over(state: &State, to: NodeId, addr: SocketAddr, movers: Vec<quinn::Connection>) {
    let info = SupernodeInfo {
        id: to,
        addr: addr.to_string(),
        leaves: 0,
        max_leaves: role_max_leaves(state),
        age_secs: 0,
    };
    let mut moved = 0;
    for conn in &movers {
        let rehome = SupernodeRequest::Rehome(vec![info.clone()]);
        if let Ok(LeafReply::Accepted) = ask_leaf(Some(conn), &rehome).await {
            moved += 1;
        }
    }
    info!(to = %to.short(), moved, "leaves handed over");
    state.send(Command::HandedOver { to }).await;
}

/// Sends every leaf (`leaves`) to `elsewhere`, waits until they have left
/// (at most [`STEP_DOWN_WAIT`]; meanwhile their files stay searchable
/// here), then tells the owner of the role to stop it.
pub(crate) fn spawn_step_down(
    state: &Arc<State>,
    elsewhere: Vec<SupernodeInfo>,
    leaves: Vec<quinn::Connection>,
) {
    let state = state.clone();
    tokio::spawn(
        async move {
            info!(leaves = leaves.len(), "drained: stepping down to leaf");
            for conn in &leaves {
                let rehome = SupernodeRequest::Rehome(elsewhere.clone());
                let _ = ask_leaf(Some(conn), &rehome).await;
            }
            let gone = async {
                for conn in &leaves {
                    conn.closed().await;
                }
            };
            if tokio::time::timeout(STEP_DOWN_WAIT, gone).await.is_err() {
                let left = leaves.iter().filter(|c| c.close_reason().is_none()).count();
                info!(left, "stepping down with leaves still attached");
            }
            let _ = state.stepped_down.send(true);
        }
        .in_current_span(),
    );
}
