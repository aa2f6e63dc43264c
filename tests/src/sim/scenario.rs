//! What a simulated network looks like: its sizes, its churn, its files and
//! its queries, and the node settings it runs with. Read from TOML (every
//! key optional, unknown keys refused), then overridden by the `sim` flags.

use std::path::Path;

use serde::{Deserialize, Serialize};
use servent_proto::hop::Routing;
pub use servent_proto::hop::RoutingKind;
use servent_proto::walk::WalkConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Seeds every random draw of the run. Default 1.
    pub seed: u64,
    /// Leaves in the population (each comes and goes). Default 100 000.
    pub leaves: usize,
    /// Dedicated supernodes at the start (elected ones come on top). Default 1 000.
    pub supernodes: usize,
    /// Simulated minutes. Default 30.
    pub minutes: f64,
    /// Minutes before queries are measured; leaves join over the first
    /// half of it. Default 5.
    pub warmup_minutes: f64,

    /// Leaves a supernode takes (`max_leaves`; the supernode's default is
    /// 1 000). Default 300: 1 000 supernodes then have room for 300 000
    /// links, about what 90 000 leaves online with 3 links each take, so
    /// that supernodes run near their high-water mark and election acts.
    pub max_leaves: usize,
    /// Supernodes a leaf links to (`DEFAULT_ATTACH`). Default 3.
    pub attach: usize,
    /// Supernodes a leaf's attach planner keeps in its table and cache
    /// (`AttachConfig::max_cached`, 200 in the leaf). Default 64, to keep
    /// 100 000 leaves in memory.
    pub leaf_table: usize,
    /// Load (thousandths) above which a leaf opens no extra link to a
    /// supernode (`AttachConfig::extra_link_max_load_permille`). Default:
    /// the leaf's default with the need rules, 500 (the default before
    /// them) with the overload rules.
    pub extra_link_max_load_permille: Option<u64>,
    /// Mesh links a supernode dials up to (`target_neighbors`). Default 8.
    pub target_neighbors: usize,
    /// Mesh links a supernode accepts up to (`max_neighbors`). Default 16.
    pub max_neighbors: usize,
    /// How supernodes send their leaves' queries into the mesh: `flood`
    /// (TTL flooding with dynamic querying at the origin, what
    /// every supernode did before `servent-mesh/3`) or `walk` (random walkers that probe the
    /// neighbours whose keyword filters may match, `docs/PROTOCOL.md`
    /// section 11.7), as the supernode's `routing` setting. Default `walk`.
    pub routing: RoutingKind,
    /// Walkers a supernode starts per query (`walk` only). Default 12.
    pub walkers: u8,
    /// Steps each walker takes (`walk` only). Default 10.
    pub walk_steps: u8,
    /// Most neighbours one visit probes (`walk` only). Default 4.
    pub walk_probes: u8,
    /// An origin that knows of fewer supernodes floods instead (`walk`
    /// only). Default 48.
    pub walk_flood_below: usize,
    /// TTL of a new query (`flood` only). Default 4.
    pub query_ttl: u8,
    /// The origin supernode's search time (`search_time_ms`). Default 3 000.
    pub search_time_ms: u64,
    /// The leaf's search timeout (`leaf search --timeout`). Default 5 000.
    pub leaf_timeout_ms: u64,
    /// Results a leaf asks for (`leaf search --max`). Default 100.
    pub max_results: usize,
    /// How long a connection to a node that vanished stays up (QUIC idle
    /// timeout, `IDLE_TIMEOUT`). Default 6 000.
    pub loss_detect_ms: u64,
    /// Election as the supernodes run it; `false` turns it off. Default true.
    pub election: bool,
    /// Election timings scaled by this (1 = the defaults; a leaf's one
    /// promotion an hour, `repromote_after`, is not scaled). Default 1.
    pub election_time_scale: f64,
    /// Election rules (`proto::elect::Rules`): `"need"` (elect only while
    /// the known network is short of room, about the deficit; step down
    /// when not needed) or `"overload"` (the rules before: elect whenever
    /// over the high-water mark, step down only drained; the leaves then
    /// plan their links as they did with them: extra links up to 500 ‰,
    /// no extra tries when orphaned). Default `"need"`.
    pub election_rules: String,

    /// Median link RTT, ms (log-normal). Default 60.
    pub rtt_median_ms: f64,
    /// Shape of the RTT distribution (sigma of its log). Default 0.5.
    pub rtt_sigma: f64,
    /// Chance a message is lost (a lost query or hit batch is not resent). Default 0.
    pub loss: f64,

    /// Median leaf session, minutes (log-normal: most short, a tail of hours). Default 30.
    pub session_median_min: f64,
    /// Shape of the session-length distribution. Default 1.5.
    pub session_sigma: f64,
    /// Median time offline between sessions, minutes. Default 3.
    pub offline_median_min: f64,
    /// Share of sessions that end without goodbye (killed, unplugged). Default 0.5.
    pub vanish_share: f64,
    /// Share of leaves that cannot be reached from outside (behind a NAT). Default 0.5.
    pub unreachable_share: f64,
    /// Share of those whose NAT maps each destination to a port of its
    /// own (a "symmetric" NAT, as carrier-grade NATs often are): reached
    /// through a relay by all but the reachable leaves; the rest are
    /// port-restricted, and punch to each other (`servent_proto::path`).
    /// Default 0.2.
    pub symmetric_share: f64,
    /// Share of leaves with the CPU and memory to be a supernode. Default 0.4.
    pub capable_share: f64,
    /// Share of the dedicated supernodes killed per hour, at random
    /// moments. Default 0.06 (60 an hour of 1 000).
    pub supernode_kill_share_per_hour: f64,
    /// Minutes before a killed dedicated supernode is back (new address). Default 5.
    pub supernode_restart_min: f64,
    /// Supernodes killed at once at this minute (a share of those alive,
    /// `mass_kill_share`); none when absent.
    pub mass_kill_at_min: Option<f64>,
    /// Share of supernodes killed at `mass_kill_at_min`. Default 0.1.
    pub mass_kill_share: f64,

    /// Popular files in the catalogue. Default 50 000.
    pub catalog_files: usize,
    /// Popular files a keyword matches. Default 20.
    pub files_per_keyword: usize,
    /// Zipf exponent of file popularity. Default 0.9.
    pub zipf_exponent: f64,
    /// Popular files each leaf shares. Default 10.
    pub popular_per_leaf: usize,
    /// Files only one leaf has, per leaf. Default 2.
    pub rare_per_leaf: usize,

    /// Queries measured after warm-up (spread as a Poisson process). Default 2 400.
    pub queries: usize,
    /// Share of queries for a single-holder file. Default 0.5.
    pub rare_query_share: f64,
    /// Seconds between time-series samples. Default 10.
    pub sample_secs: f64,
}

impl Scenario {
    /// The routing rules the supernodes run.
    pub fn routing(&self) -> Routing {
        self.routing.with(WalkConfig {
            walkers: self.walkers,
            steps: self.walk_steps,
            probes: self.walk_probes,
            flood_below: self.walk_flood_below,
        })
    }
}

impl Default for Scenario {
    /// The nodes' own defaults where they have them, so that the simulator
    /// runs what a default deployment runs.
    fn default() -> Self {
        let node = supernode::Config::default();
        Self {
            seed: 1,
            leaves: 100_000,
            supernodes: 1_000,
            minutes: 30.0,
            warmup_minutes: 5.0,
            max_leaves: 300,
            attach: servent_proto::attach::DEFAULT_ATTACH,
            leaf_table: 64,
            extra_link_max_load_permille: None,
            target_neighbors: node.target_neighbors,
            max_neighbors: node.max_neighbors,
            routing: RoutingKind::Walk,
            walkers: WalkConfig::default().walkers,
            walk_steps: WalkConfig::default().steps,
            walk_probes: WalkConfig::default().probes,
            walk_flood_below: WalkConfig::default().flood_below,
            query_ttl: node.query_ttl,
            search_time_ms: node.search_time_ms.into(),
            leaf_timeout_ms: 5_000,
            max_results: 100,
            loss_detect_ms: servent_net::IDLE_TIMEOUT.as_millis() as u64,
            election: true,
            election_time_scale: 1.0,
            election_rules: servent_proto::elect::Rules::default().name().to_string(),
            rtt_median_ms: 60.0,
            rtt_sigma: 0.5,
            loss: 0.0,
            session_median_min: 30.0,
            session_sigma: 1.5,
            offline_median_min: 3.0,
            vanish_share: 0.5,
            unreachable_share: 0.5,
            symmetric_share: 0.2,
            capable_share: 0.4,
            supernode_kill_share_per_hour: 0.06,
            supernode_restart_min: 5.0,
            mass_kill_at_min: None,
            mass_kill_share: 0.1,
            catalog_files: 50_000,
            files_per_keyword: 20,
            zipf_exponent: 0.9,
            popular_per_leaf: 10,
            rare_per_leaf: 2,
            queries: 2_400,
            rare_query_share: 0.5,
            sample_secs: 10.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid scenario {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("invalid scenario: {0}")]
    Invalid(String),
}

impl Scenario {
    pub fn from_file(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ScenarioError::Parse {
            path: path.display().to_string(),
            reason: e.message().to_string(),
        })
    }

    /// A network small enough to run in a second or two.
    pub fn small() -> Self {
        Self {
            leaves: 1_000,
            supernodes: 10,
            minutes: 6.0,
            warmup_minutes: 2.0,
            queries: 300,
            catalog_files: 2_000,
            election_time_scale: 0.1,
            ..Self::default()
        }
    }

    pub fn check(&self) -> Result<(), ScenarioError> {
        let bad = |what: &str| Err(ScenarioError::Invalid(what.to_string()));
        if self.supernodes == 0 {
            return bad("at least one supernode is needed");
        }
        if self.leaves > 10_000_000 || self.supernodes > 1_000_000 {
            return bad("at most 10 million leaves and a million supernodes");
        }
        if !(self.minutes > 0.0 && self.minutes <= 24.0 * 60.0) {
            return bad("minutes must be in (0, 1440]");
        }
        if !(self.warmup_minutes >= 0.0 && self.warmup_minutes < self.minutes) {
            return bad("warmup_minutes must be at least 0 and less than minutes");
        }
        if servent_proto::elect::Rules::from_name(&self.election_rules).is_none() {
            return bad("election_rules must be \"need\" or \"overload\"");
        }
        if self.walkers == 0 || self.walkers > servent_proto::walk::MAX_WALKERS {
            return Err(ScenarioError::Invalid(format!(
                "walkers must be in 1..={}",
                servent_proto::walk::MAX_WALKERS
            )));
        }
        if self.walk_steps > servent_proto::walk::MAX_STEPS {
            return Err(ScenarioError::Invalid(format!(
                "walk_steps must be at most {}",
                servent_proto::walk::MAX_STEPS
            )));
        }
        if self.max_leaves == 0 || self.attach == 0 || self.files_per_keyword == 0 {
            return bad("max_leaves, attach and files_per_keyword must be at least 1");
        }
        for (name, share) in [
            ("loss", self.loss),
            ("vanish_share", self.vanish_share),
            ("unreachable_share", self.unreachable_share),
            ("symmetric_share", self.symmetric_share),
            ("capable_share", self.capable_share),
            ("mass_kill_share", self.mass_kill_share),
            ("rare_query_share", self.rare_query_share),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(ScenarioError::Invalid(format!("{name} must be in [0, 1]")));
            }
        }
        if self.session_median_min <= 0.0
            || self.offline_median_min <= 0.0
            || self.sample_secs <= 0.0
        {
            return bad("session_median_min, offline_median_min and sample_secs must be positive");
        }
        Ok(())
    }
}
