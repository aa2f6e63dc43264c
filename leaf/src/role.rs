//! Being elected: a leaf whose supernode asks it to promote starts the
//! supernode role in this process, on this endpoint, and steps back down
//! when the role's election rules say it is no longer needed.
//!
//! There is one implementation of the supernode: the `supernode` library's
//! [`supernode::Role`], started on this leaf's endpoint and router, as a
//! standalone supernode starts it on its own. Promotion adds its handlers
//! (`ALPN_LEAF`, `ALPN_MESH`) to the leaf's router; step-down removes them
//! and closes the role's connections, and the leaf's uploads and its own
//! supernode links go on untouched.
//! Whether to take the role is `servent_proto::elect::answer_promote`'s
//! decision; when to leave it is the role's own election core's.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use servent_net::Router;
use servent_proto::elect;
use servent_proto::msg::{LeafReply, SupernodeInfo};
use tracing::{info, info_span, Instrument};

use crate::portmap::Announced;

/// What a leaf measures of its own spare capacity (Linux: /proc; elsewhere
/// nothing is claimed, so such a leaf does not qualify by default).
pub fn measure() -> servent_proto::msg::Candidacy {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok());
    let cpu_idle_permille =
        load.map_or(0, |l| (1000.0 * (1.0 - l / cpus)).clamp(0.0, 1000.0) as u16);
    let mem_available_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| (kib / 1024).min(u32::MAX as u64) as u32);
    servent_proto::msg::Candidacy {
        cpu_idle_permille,
        mem_available_mib,
        upload_kbps: 0,
    }
}

/// The supernode role, when this leaf holds it.
pub struct Role {
    /// The leaf's router, which the role's handlers join while it is held.
    router: Router,
    template: supernode::Config,
    pub no_promote: bool,
    current: Mutex<Option<supernode::Role>>,
    promotions: std::sync::atomic::AtomicU64,
    /// When the role was last taken: a leaf takes it at most once per
    /// `repromote_after` (`elect::may_take_role`).
    promoted_at: Mutex<Option<std::time::Instant>>,
    /// The port the role tells the mesh it is dialled at.
    port: Announced,
    /// The role held now was taken alone, as the LAN's first supernode
    /// (`servent_proto::lan`), not on a supernode's request: it indexes
    /// this leaf's own files itself (`crate::lan`).
    alone: std::sync::atomic::AtomicBool,
}

impl Role {
    pub fn new(
        router: Router,
        template: supernode::Config,
        no_promote: bool,
        port: Announced,
    ) -> Arc<Self> {
        Arc::new(Self {
            router,
            template,
            no_promote,
            current: Mutex::new(None),
            promotions: Default::default(),
            promoted_at: Mutex::new(None),
            port,
            alone: Default::default(),
        })
    }

    /// The supernode state while this leaf is one.
    pub fn state(&self) -> Option<Arc<supernode::State>> {
        self.current
            .lock()
            .expect("role lock")
            .as_ref()
            .map(|s| s.state().clone())
    }

    pub fn is_supernode(&self) -> bool {
        self.current.lock().expect("role lock").is_some()
    }

    /// Whether this leaf offers itself (`Candidacy`): not with
    /// `--no-promote`, and not within `repromote_after` of its last
    /// promotion, when it would decline (`elect::may_take_role`).
    pub fn may_offer(&self) -> bool {
        let since = self
            .promoted_at
            .lock()
            .expect("role lock")
            .map(|t| t.elapsed());
        !self.no_promote && elect::may_take_role(since, &self.template.election.policy())
    }

    /// How often this leaf has been promoted.
    pub fn promotions(&self) -> u64 {
        self.promotions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the role held now was taken alone ([`Role::take_alone`]).
    pub fn is_alone(&self) -> bool {
        self.is_supernode() && self.alone.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Takes the role with no supernode asking, as the first supernode of
    /// a LAN that has none (`servent_proto::lan::take_role_alone` decided),
    /// meshing with `peers` if any; whether it holds it now.
    pub fn take_alone(self: &Arc<Self>, peers: Vec<SocketAddr>) -> bool {
        let max_leaves = u32::try_from(self.template.max_leaves).unwrap_or(u32::MAX);
        let reply = self.take(max_leaves, peers, Vec::new(), true);
        if let LeafReply::Declined(reason) = &reply {
            info!(%reason, "not taking the supernode role alone");
        }
        matches!(reply, LeafReply::Accepted)
    }

    /// Takes the role, meshing with `peers` first and with the supernodes
    /// in `known` (those this leaf knows of) after them; answers the
    /// supernode that asked.
    pub fn promote(
        self: &Arc<Self>,
        max_leaves: u32,
        peers: Vec<SocketAddr>,
        known: Vec<SupernodeInfo>,
    ) -> LeafReply {
        self.take(max_leaves, peers, known, false)
    }

    fn take(
        self: &Arc<Self>,
        max_leaves: u32,
        peers: Vec<SocketAddr>,
        known: Vec<SupernodeInfo>,
        alone: bool,
    ) -> LeafReply {
        let mut current = self.current.lock().expect("role lock");
        if let Err(refusal) = elect::answer_promote(self.no_promote, current.is_some()) {
            return LeafReply::Declined(refusal.reason().into());
        }
        let mut promoted_at = self.promoted_at.lock().expect("role lock");
        let since = promoted_at.map(|t| t.elapsed());
        if !elect::may_take_role(since, &self.template.election.policy()) {
            return LeafReply::Declined(elect::RECENTLY_PROMOTED.into());
        }
        let config = supernode::Config {
            max_leaves: elect::role_max_leaves(max_leaves),
            peers: peers.iter().map(ToString::to_string).collect(),
            data_dir: None,
            listen: self
                .router
                .endpoint()
                .local_addr()
                .unwrap_or(self.template.listen),
            ..self.template.clone()
        };
        let endpoint = self.router.endpoint();
        let span = info_span!("supernode", id = %endpoint.id().short());
        let port = self.port.now();
        match span.in_scope(|| supernode::Role::start_announcing(config, &self.router, true, port))
        {
            Ok(sn) => {
                info!(parent: &span, addr = %sn.addr(), "supernode role started");
                let state = sn.state();
                state.seed(known);
                let mut stepped = state.stepped_down();
                *current = Some(sn);
                *promoted_at = Some(std::time::Instant::now());
                self.alone
                    .store(alone, std::sync::atomic::Ordering::Relaxed);
                self.promotions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match alone {
                    true => info!(max_leaves, "the LAN has no supernode: now its first"),
                    false => info!(max_leaves, "promoted: now a supernode"),
                }
                // Step down when the role's own rules say so.
                let role = self.clone();
                tokio::spawn(
                    async move {
                        while stepped.changed().await.is_ok() {
                            if *stepped.borrow() {
                                role.step_down();
                                return;
                            }
                        }
                    }
                    .in_current_span(),
                );
                LeafReply::Accepted
            }
            Err(e) => LeafReply::Declined(format!("cannot start the supernode role: {e}")),
        }
    }

    /// Leaves the role (its leaves and links are closed); sharing goes on.
    pub fn step_down(&self) {
        if let Some(sn) = self.current.lock().expect("role lock").take() {
            sn.stop();
            info!("stepped down: a leaf again");
        }
    }
}
