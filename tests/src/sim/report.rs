//! What a run measured: one JSON object, and a time series for plots.

use serde::Serialize;

use super::scenario::RoutingKind;

/// Shares of the paths downloads would take (`Report::rare_paths`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RarePaths {
    pub direct: f64,
    pub reversed: f64,
    pub punched: f64,
    pub relayed: f64,
}

/// The figures of one run. The first group depends only on the scenario
/// and its seed (the same ones give the same figures, byte for byte); the
/// last three measure the simulator itself on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub leaves: usize,
    pub supernodes: usize,
    pub minutes: f64,
    /// Queries measured (after warm-up).
    pub queries: usize,
    pub rare_queries: usize,
    pub popular_queries: usize,
    /// Share of single-holder queries (holder online) that found the file.
    pub recall_rare: f64,
    /// Mean over popular queries of files found ÷ min(wanted, files of the
    /// keyword that an online leaf holds).
    pub recall_popular: f64,
    /// Share of queries whose leaf had no supernode to ask.
    pub queries_unattached: f64,
    pub first_hit_ms_p50: f64,
    pub first_hit_ms_p99: f64,
    /// Every message a query caused (the leaf's query, mesh copies, hit
    /// batches, stream ends) ÷ queries.
    pub messages_per_query: f64,
    /// Mesh query copies alone ÷ queries.
    pub mesh_queries_per_query: f64,
    /// Messages per query, of single-holder queries and of popular ones
    /// (counted per query; a message sent after its query's supernode
    /// forgot the stream is in `messages_per_query` only).
    pub messages_per_rare_query: f64,
    pub messages_per_popular_query: f64,
    /// The most messages one query caused.
    pub messages_per_query_max: u64,
    /// Recall of single-holder queries started within 30 s of the
    /// scenario's mass kill (`mass_kill_at_min`), and of those started
    /// after; none without one.
    pub recall_rare_30s_after_mass_kill: Option<f64>,
    pub recall_rare_later_after_mass_kill: Option<f64>,
    /// How the asker would reach the holder of each rare file it found,
    /// by their NATs (`servent_proto::path`), as shares of those found:
    /// direct, dialled back, punched, relayed. Relays carry these.
    pub rare_paths: RarePaths,
    /// Copies not sent because the origin had spent its fair share of
    /// the link (`proto::fair`), in all.
    pub mesh_copies_unforwarded: u64,
    /// The routing the supernodes ran (`flood` or `walk`).
    pub routing: RoutingKind,
    /// Bytes of keyword-filter updates a supernode sent its neighbours, a
    /// second, on average after warm-up (`walk` only).
    pub filter_bytes_per_supernode_sec: f64,
    /// Query messages the busiest supernode received ÷ the mean over the
    /// supernodes alive at the end.
    pub busiest_supernode_over_mean: f64,
    /// The most messages of any kind one supernode received in one second.
    pub max_supernode_msgs_per_sec: u64,
    /// The most query messages one supernode received for one query, on
    /// average over queries (how the per-node load grows with the query rate).
    pub max_supernode_msgs_per_query: f64,
    /// The election rules of the run (`need` or `overload`).
    pub election_rules: String,
    /// Supernodes alive ÷ the fewest the leaves need, the most and the
    /// mean over the samples after warm-up. Needed is ⌈online leaves ×
    /// `attach` ÷ `max_leaves`⌉: every supernode full, every leaf with its
    /// `attach` links. (Before the need rules it was online ÷ (max_leaves
    /// × 0.8), one link a leaf at the high-water mark: the same runs'
    /// ratios were 2.4 times as high.)
    pub supernodes_over_needed_max: f64,
    pub supernodes_over_needed_mean: f64,
    /// The least of the same ratio (below 1: the leaves lack links).
    pub supernodes_over_needed_min: f64,
    /// Leaf registrations ÷ online leaves, the mean over the samples after
    /// warm-up (at most `attach`).
    pub links_per_leaf_mean: f64,
    pub supernodes_alive_min: usize,
    pub supernodes_alive_max: usize,
    pub elected_max: usize,
    pub max_leaves_over_cap: f64,
    pub unattached_secs_p50: f64,
    pub unattached_secs_p99: f64,
    /// Leaves orphaned by a supernode's death (samples of the figures above).
    pub orphanings: usize,
    pub promotions: u64,
    pub step_downs: u64,
    /// The most promotions of one leaf, per hour of simulated time (at
    /// least one hour counted).
    pub promotions_per_leaf_hour: f64,
    pub supernode_kills: u64,
    pub leaf_sessions: u64,
    pub online_leaves_mean: f64,
    pub events: u64,
    pub wall_secs: f64,
    pub events_per_sec: f64,
    pub peak_rss_mib: f64,
}

impl Report {
    /// The report as JSON without the three figures of the simulator
    /// itself: what must be identical for one seed and scenario.
    pub fn deterministic_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("report serialises");
        if let Some(o) = v.as_object_mut() {
            for k in ["wall_secs", "events_per_sec", "peak_rss_mib"] {
                o.remove(k);
            }
        }
        v.to_string()
    }
}

/// This run's figures ÷ the baseline's (the same scenario and seed run
/// with `flood`), for the figures a routing is judged by.
pub fn ratios(run: &Report, baseline: &Report) -> serde_json::Value {
    let ratio = |a: f64, b: f64| {
        if b == 0.0 {
            serde_json::Value::Null
        } else {
            serde_json::json!(round(a / b, 4))
        }
    };
    serde_json::json!({
        "recall_rare": ratio(run.recall_rare, baseline.recall_rare),
        "recall_popular": ratio(run.recall_popular, baseline.recall_popular),
        "first_hit_ms_p50": ratio(run.first_hit_ms_p50, baseline.first_hit_ms_p50),
        "first_hit_ms_p99": ratio(run.first_hit_ms_p99, baseline.first_hit_ms_p99),
        "messages_per_query": ratio(run.messages_per_query, baseline.messages_per_query),
        "mesh_queries_per_query": ratio(run.mesh_queries_per_query, baseline.mesh_queries_per_query),
        "messages_per_rare_query": ratio(run.messages_per_rare_query, baseline.messages_per_rare_query),
        "messages_per_popular_query": ratio(
            run.messages_per_popular_query,
            baseline.messages_per_popular_query,
        ),
        "messages_per_query_max": ratio(
            run.messages_per_query_max as f64,
            baseline.messages_per_query_max as f64,
        ),
        "max_supernode_msgs_per_sec": ratio(
            run.max_supernode_msgs_per_sec as f64,
            baseline.max_supernode_msgs_per_sec as f64,
        ),
        "supernodes_over_needed_max": ratio(
            run.supernodes_over_needed_max,
            baseline.supernodes_over_needed_max,
        ),
        "events": ratio(run.events as f64, baseline.events as f64),
    })
}

/// One row of the time series.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub t_secs: f64,
    pub supernodes: usize,
    pub elected: usize,
    /// The fewest supernodes the online leaves need: ⌈online × `attach` ÷
    /// `max_leaves`⌉ (every supernode full).
    pub needed: usize,
    pub online_leaves: usize,
    pub attached_leaves: usize,
    pub max_leaves_over_cap: f64,
    pub msgs_per_sec: f64,
    /// Leaf registrations held by the supernodes alive (at most `attach` a leaf).
    pub links: usize,
}

impl Sample {
    pub const CSV_HEADER: &'static str =
        "t_secs,supernodes,elected,needed,online_leaves,attached_leaves,max_leaves_over_cap,msgs_per_sec,links";

    pub fn csv(&self) -> String {
        format!(
            "{},{},{},{},{},{},{:.3},{:.1},{}",
            self.t_secs,
            self.supernodes,
            self.elected,
            self.needed,
            self.online_leaves,
            self.attached_leaves,
            self.max_leaves_over_cap,
            self.msgs_per_sec,
            self.links
        )
    }
}

/// The `p`-th percentile (0–100) of `v`, nearest rank; 0 when empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Peak resident memory of this process, MiB (0 where /proc is missing).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Rounds for the report: figures are measurements, not 17-digit claims.
pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}
