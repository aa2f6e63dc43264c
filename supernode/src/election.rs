//! Growing the network: electing capable leaves to supernode, handing
//! leaves over to them, and stepping down when no longer needed.
//!
//! The decisions are `servent_proto::elect::Election`'s, a state machine
//! with no I/O; this module is its driver: it gathers the facts the core
//! needs (the load, the room of the other supernodes, whether a promoted
//! leaf has joined the mesh), carries out its actions, and reports their
//! results back. Facts a leaf claims
//! (spare CPU, memory, bandwidth) come from its `Candidacy`; the facts that
//! matter most are measured here: how long its session has lasted, and
//! whether it can be reached from outside, checked by dialling its announced
//! address from a *separate* socket (a dial-back over the leaf's own
//! connection, or from the socket it already talks to, would pass through
//! any NAT mapping and prove nothing).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;
use servent_proto::elect::{self, Action, Load, Policy, PromoteReply, Room};
use servent_proto::limits::{MAX_ERROR_MESSAGE, MAX_REPLY_FRAME};
use servent_proto::msg::{
    truncate_utf8, Candidacy, LeafReply, SupernodeInfo, SupernodeRequest, ALPN_TRANSFER,
};
use servent_proto::NodeId;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn, Instrument};

use crate::net::{self, Endpoint};
use crate::State;

/// How often the driver looks for a promoted leaf among its neighbours.
const JOIN_POLL: Duration = Duration::from_millis(100);

/// Election settings (the `[election]` table of the config file).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElectionConfig {
    /// Elect at all. Default true.
    pub enabled: bool,
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
            min_uptime_secs: 0.5,
            min_cpu_idle_permille: 0,
            min_mem_mib: 0,
            drain_secs: 2.0,
            ..Self::default()
        }
    }
}

/// Election state of one supernode: the core, and what its driver needs.
pub struct Election {
    core: Mutex<elect::Election<NodeId>>,
    /// Wakes the driver when a task it started has reported to the core.
    wake: Notify,
    /// This supernode was a leaf once, and may step down.
    pub elected: bool,
    /// Set when it has stepped down: its owner stops the role.
    pub stepped_down: watch::Sender<bool>,
    pub promotions: AtomicU64,
}

impl Election {
    pub fn new(config: &ElectionConfig, elected: bool) -> Self {
        Self {
            core: Mutex::new(elect::Election::new(
                config.policy(),
                elected,
                rand::random(),
                Instant::now(),
            )),
            wake: Notify::new(),
            elected,
            stepped_down: watch::channel(false).0,
            promotions: Default::default(),
        }
    }

    fn core(&self) -> MutexGuard<'_, elect::Election<NodeId>> {
        self.core.lock().expect("election lock")
    }

    /// Records a leaf's candidacy; `since` is when its session began.
    pub fn offer(&self, id: NodeId, candidacy: Candidacy, since: Instant, addr: SocketAddr) {
        self.core().offer(id, candidacy, since, addr);
    }

    /// Whether a leaf's dial-back succeeded: `None` if it has not offered
    /// itself, `Some(None)` if not checked yet.
    pub fn reachable(&self, id: &NodeId) -> Option<Option<bool>> {
        self.core().reachable(id)
    }

    /// Forgets a leaf whose session ended.
    pub fn withdraw(&self, id: &NodeId) {
        self.core().withdraw(id);
    }
}

/// Carries the election core's actions out until `stop` fires or it steps
/// down: dial-backs, `Promote`, hand-overs and the step-down are made here,
/// and their results reported back to it.
pub async fn run(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    if !state.config.election.enabled {
        return;
    }
    // Dial-backs go out from a socket of their own.
    let probe = match state.endpoint().map(|e| e.sibling_client()) {
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            warn!(error = %e, "no socket for dial-backs; not electing");
            return;
        }
        None => return,
    };
    let election = &state.election;
    loop {
        let (due, joining) = {
            let core = election.core();
            (core.poll_timeout(), core.awaiting_join())
        };
        let Some(mut due) = due else { return };
        if joining.is_some() {
            // The mesh tells no one when a neighbour arrives: look.
            due = due.min(Instant::now() + JOIN_POLL);
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep_until(due.into()) => {}
            _ = election.wake.notified() => {}
        }
        let now = Instant::now();
        let joining = election.core().awaiting_join();
        if let Some(id) = joining {
            let addr = state.mesh.neighbour_addr(&id);
            if let Some(addr) = addr {
                election
                    .core()
                    .handle_joined(now, id, addr, state.leaves.len());
            }
        }
        let others: Vec<Room> = state
            .mesh
            .for_leaves(true, now)
            .iter()
            .map(|i| Room {
                leaves: i.leaves,
                max_leaves: i.max_leaves,
            })
            .collect();
        let load = Load {
            leaves: state.leaves.len(),
            max_leaves: state.config.max_leaves,
            others: &others,
        };
        let actions: Vec<Action<NodeId>> = {
            let mut core = election.core();
            core.handle_timeout(now, &load);
            if let Some(id) =
                joining.filter(|_| core.awaiting_join().is_none() && !core.promoting())
            {
                debug!(leaf = %id.short(), "promoted leaf did not join the mesh in time");
            }
            std::iter::from_fn(|| core.poll_action()).collect()
        };
        for action in actions {
            match action {
                Action::Probe { id, addr, timeout } => {
                    spawn_probe(&state, &probe, id, addr, timeout)
                }
                Action::Promote { id } => {
                    let state = state.clone();
                    tokio::spawn(async move { promote(&state, id).await }.in_current_span());
                }
                Action::HandOver { to, addr, count } => {
                    let state = state.clone();
                    tokio::spawn(
                        async move { hand_over(&state, to, addr, count).await }.in_current_span(),
                    );
                }
                Action::StepDown => {
                    step_down(&state).await;
                    return;
                }
            }
        }
    }
}

/// Dials `id` back at `addr` and reports to the core.
fn spawn_probe(
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
            state
                .election
                .core()
                .handle_probe(Instant::now(), id, addr, reachable);
            debug!(leaf = %id.short(), %addr, reachable, "dial-back");
        }
        .in_current_span(),
    );
}

/// Sends `req` to a leaf of ours over its connection and waits for its answer.
async fn ask_leaf(state: &State, id: NodeId, req: &SupernodeRequest) -> Result<LeafReply, String> {
    let conn = state
        .leaves
        .get(&id)
        .map(|e| e.conn.clone())
        .ok_or("leaf is gone")?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    net::write_frame(&mut send, req, MAX_REPLY_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    match net::read_first_frame::<LeafReply>(&mut recv, MAX_REPLY_FRAME).await {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err("no answer".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn role_max_leaves(state: &State) -> u32 {
    state.config.max_leaves.min(u32::MAX as usize) as u32
}

/// Asks `id` to become a supernode and reports its answer to the core.
async fn promote(state: &Arc<State>, id: NodeId) {
    let max_leaves = role_max_leaves(state);
    let reply = match ask_leaf(state, id, &SupernodeRequest::Promote { max_leaves }).await {
        Ok(LeafReply::Accepted) => {
            state.election.promotions.fetch_add(1, Ordering::Relaxed);
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
    state
        .election
        .core()
        .handle_promote_reply(Instant::now(), id, reply);
    // It dials us as its first peer: the driver watches for it.
    state.election.wake.notify_one();
}

/// Moves `count` of our leaves (not the new supernode itself) to `to`,
/// which has joined the mesh from `addr`.
async fn hand_over(state: &Arc<State>, to: NodeId, addr: SocketAddr, count: usize) {
    let info = SupernodeInfo {
        id: to,
        addr: addr.to_string(),
        leaves: 0,
        max_leaves: role_max_leaves(state),
        age_secs: 0,
    };
    let movers: Vec<NodeId> = state
        .leaves
        .iter()
        .map(|e| *e.key())
        .filter(|l| *l != to)
        .take(count)
        .collect();
    let mut moved = 0;
    for leaf in movers {
        if let Ok(LeafReply::Accepted) =
            ask_leaf(state, leaf, &SupernodeRequest::Rehome(vec![info.clone()])).await
        {
            moved += 1;
        }
    }
    info!(to = %to.short(), moved, "leaves handed over");
    state
        .election
        .core()
        .handle_handover_done(Instant::now(), to);
    state.election.wake.notify_one();
}

/// Sends every leaf elsewhere, then tells the owner to stop the role.
async fn step_down(state: &Arc<State>) {
    let elsewhere = state.mesh.for_leaves(true, Instant::now());
    info!(
        leaves = state.leaves.len(),
        "drained: stepping down to leaf"
    );
    let leaves: Vec<NodeId> = state.leaves.iter().map(|e| *e.key()).collect();
    for leaf in leaves {
        let _ = ask_leaf(state, leaf, &SupernodeRequest::Rehome(elsewhere.clone())).await;
    }
    let _ = state.election.stepped_down.send(true);
}
