//! Growing the network: electing capable leaves to supernode, handing
//! leaves over to them, and stepping down when no longer needed.
//!
//! The decisions are `servent_proto::elect`'s pure functions; this module
//! gathers the facts they need and carries them out. Facts a leaf claims
//! (spare CPU, memory, bandwidth) come from its `Candidacy`; the facts that
//! matter most are measured here: how long its session has lasted, and
//! whether it can be reached from outside, checked by dialling its announced
//! address from a *separate* socket (a dial-back over the leaf's own
//! connection, or from the socket it already talks to, would pass through
//! any NAT mapping and prove nothing).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::Deserialize;
use servent_proto::elect::{self, Candidate, Decision, Elector, Policy};
use servent_proto::limits::{MAX_ERROR_MESSAGE, MAX_REPLY_FRAME};
use servent_proto::msg::{
    truncate_utf8, Candidacy, LeafReply, SupernodeInfo, SupernodeRequest, ALPN_TRANSFER,
};
use servent_proto::NodeId;
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use crate::net::{self, Endpoint};
use crate::State;

/// How often the election rules are applied.
const TICK: Duration = Duration::from_millis(250);
/// Longest wait for a dial-back.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A failed dial-back is retried after this long.
const PROBE_RETRY: Duration = Duration::from_secs(60);
/// Longest wait for a promoted leaf to join the mesh before handing over.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

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

/// What is known of one leaf that offered itself.
#[derive(Debug, Clone)]
struct Offer {
    candidacy: Candidacy,
    since: Instant,
    addr: SocketAddr,
    reachable: Option<bool>,
    probed_at: Option<Instant>,
}

/// Election state of one supernode.
pub struct Election {
    offers: DashMap<NodeId, Offer>,
    elector: Mutex<Elector>,
    /// This supernode was a leaf once, and may step down.
    pub elected: bool,
    /// Set when it has stepped down: its owner stops the role.
    pub stepped_down: watch::Sender<bool>,
    promoting: AtomicBool,
    pub promotions: std::sync::atomic::AtomicU64,
}

impl Election {
    pub fn new(elected: bool) -> Self {
        Self {
            offers: DashMap::new(),
            elector: Mutex::new(Elector::default()),
            elected,
            stepped_down: watch::channel(false).0,
            promoting: AtomicBool::new(false),
            promotions: Default::default(),
        }
    }

    /// Records a leaf's candidacy; `since` is when its session began.
    pub fn offer(&self, id: NodeId, candidacy: Candidacy, since: Instant, addr: SocketAddr) {
        match self.offers.get_mut(&id) {
            Some(mut o) => {
                o.candidacy = candidacy;
                if o.addr != addr {
                    o.addr = addr;
                    o.reachable = None;
                }
            }
            None => {
                self.offers.insert(
                    id,
                    Offer {
                        candidacy,
                        since,
                        addr,
                        reachable: None,
                        probed_at: None,
                    },
                );
            }
        }
    }

    /// Whether a leaf's dial-back succeeded: `None` if it has not offered
    /// itself, `Some(None)` if not checked yet.
    pub fn reachable(&self, id: &NodeId) -> Option<Option<bool>> {
        self.offers.get(id).map(|o| o.reachable)
    }

    /// Forgets a leaf whose session ended.
    pub fn withdraw(&self, id: &NodeId) {
        self.offers.remove(id);
    }

    /// Leaves that offered themselves, as the election rules see them.
    fn candidates(&self, now: Instant) -> Vec<Candidate<NodeId>> {
        self.offers
            .iter()
            .map(|o| Candidate {
                id: *o.key(),
                session_age: now.saturating_duration_since(o.since),
                reachable: o.reachable,
                cpu_idle_permille: o.candidacy.cpu_idle_permille,
                mem_available_mib: o.candidacy.mem_available_mib,
                upload_kbps: o.candidacy.upload_kbps,
            })
            .collect()
    }
}

/// Applies the election rules until `stop` fires.
pub async fn run(state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let policy = state.config.election.policy();
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
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(TICK) => {}
        }
        let now = Instant::now();
        probe_due(&state, &probe, &policy, now);
        let decision = {
            let mut elector = state.election.elector.lock().expect("elector lock");
            elector.tick(
                now,
                state.leaves.len(),
                state.config.max_leaves,
                state.election.elected,
                others_have_room(&state, &policy, now),
                rand::random::<f64>(),
                &policy,
            )
        };
        match decision {
            Decision::Nothing => {}
            Decision::Elect => {
                let candidates = state.election.candidates(now);
                let Some(best) = elect::best(&candidates, &policy).map(|c| c.id) else {
                    continue;
                };
                state
                    .election
                    .elector
                    .lock()
                    .expect("elector lock")
                    .elected(now);
                if !state.election.promoting.swap(true, Ordering::SeqCst) {
                    let state = state.clone();
                    tokio::spawn(
                        async move {
                            promote(&state, best).await;
                            state.election.promoting.store(false, Ordering::SeqCst);
                        }
                        .in_current_span(),
                    );
                }
            }
            Decision::StepDown => {
                step_down(&state).await;
                return;
            }
        }
    }
}

/// Whether other supernodes can take all our leaves and stay under their
/// high-water mark: only then may an elected supernode step down, or its
/// leaves would push another over the mark and a new election would follow.
fn others_have_room(state: &State, policy: &Policy, now: Instant) -> bool {
    let room: u64 = state
        .mesh
        .for_leaves(true, now)
        .iter()
        .map(|i| {
            (u64::from(i.max_leaves) * u64::from(policy.high_water_permille) / 1000)
                .saturating_sub(i.leaves.into())
        })
        .sum();
    room > state.leaves.len() as u64
}

/// Starts dial-backs to qualified candidates not yet checked.
fn probe_due(state: &Arc<State>, probe: &Endpoint, policy: &Policy, now: Instant) {
    for mut o in state.election.offers.iter_mut() {
        let age = now.saturating_duration_since(o.since);
        let due = o.reachable.is_none()
            || (o.reachable == Some(false) && o.probed_at.is_some_and(|t| now - t > PROBE_RETRY));
        let qualifies = age >= policy.min_uptime
            && o.candidacy.cpu_idle_permille >= policy.min_cpu_idle_permille
            && o.candidacy.mem_available_mib >= policy.min_mem_mib;
        if !due || !qualifies || o.probed_at.is_some_and(|t| now - t < PROBE_TIMEOUT * 2) {
            continue;
        }
        o.probed_at = Some(now);
        let (id, addr) = (*o.key(), o.addr);
        let (state, probe) = (state.clone(), probe.clone());
        tokio::spawn(
            async move {
                let reachable = tokio::time::timeout(
                    PROBE_TIMEOUT,
                    probe.connect(addr, ALPN_TRANSFER, Some(id)),
                )
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
                if let Some(mut o) = state.election.offers.get_mut(&id) {
                    o.reachable = Some(reachable);
                }
                debug!(leaf = %id.short(), %addr, reachable, "dial-back");
            }
            .in_current_span(),
        );
    }
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

/// Asks `id` to become a supernode; once it has joined the mesh, moves a
/// share of our leaves to it.
async fn promote(state: &Arc<State>, id: NodeId) {
    let max_leaves = state.config.max_leaves.min(u32::MAX as usize) as u32;
    match ask_leaf(state, id, &SupernodeRequest::Promote { max_leaves }).await {
        Ok(LeafReply::Accepted) => {}
        Ok(LeafReply::Declined(mut why)) => {
            // Text for people, from a leaf: no longer than an error message.
            truncate_utf8(&mut why, MAX_ERROR_MESSAGE);
            info!(leaf = %id.short(), %why, "promotion declined");
            state.election.withdraw(&id);
            return;
        }
        Err(e) => {
            debug!(leaf = %id.short(), error = %e, "promotion failed");
            return;
        }
    }
    state.election.promotions.fetch_add(1, Ordering::Relaxed);
    state.election.withdraw(&id);
    info!(leaf = %id.short(), "leaf promoted to supernode");
    // It dials us as its first peer; hand over once it is a neighbour.
    let deadline = Instant::now() + JOIN_TIMEOUT;
    let info = loop {
        if let Some(addr) = state.mesh.neighbour_addr(&id) {
            break SupernodeInfo {
                id,
                addr: addr.to_string(),
                leaves: 0,
                max_leaves,
                age_secs: 0,
            };
        }
        if Instant::now() >= deadline {
            debug!(leaf = %id.short(), "promoted leaf did not join the mesh in time");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Move half of our leaves (not the new supernode itself) to it.
    let movers: Vec<NodeId> = state
        .leaves
        .iter()
        .map(|e| *e.key())
        .filter(|l| *l != id)
        .take(state.leaves.len() / 2)
        .collect();
    let mut moved = 0;
    for leaf in movers {
        if let Ok(LeafReply::Accepted) =
            ask_leaf(state, leaf, &SupernodeRequest::Rehome(vec![info.clone()])).await
        {
            moved += 1;
        }
    }
    info!(to = %id.short(), moved, "leaves handed over");
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
