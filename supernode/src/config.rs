//! Supernode configuration: defaults, the TOML file, and flags over both.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use servent_proto::hop::{HopConfig, Routing, RoutingKind};
use servent_proto::limits::DEFAULT_MAX_FILES_PER_LEAF;
use servent_proto::mesh::MeshConfig;
use servent_proto::route::IpCaps;
use servent_proto::walk::WalkConfig;

/// Default UDP port of a supernode.
pub const DEFAULT_PORT: u16 = 7400;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// UDP address to listen on. Default `0.0.0.0:7400`.
    pub listen: SocketAddr,
    /// Other supernodes to mesh with, `HOST:PORT` (a name or an address).
    /// Names are resolved each time they are dialled, so a peer that comes
    /// back at a new address (a container, a DHCP lease) is found again.
    /// Default none.
    pub peers: Vec<String>,
    /// Where the identity key lives. Default: none given to the library
    /// (a fresh identity each start); the binary uses a platform directory.
    pub data_dir: Option<PathBuf>,
    /// HTTP address for `/status` and `/metrics`. Default none.
    pub http: Option<SocketAddr>,
    /// Announce this supernode on the LAN (mDNS, `_servent._udp`) and mesh
    /// with the supernodes announced there, when it listens beyond
    /// loopback. Default true.
    pub lan: bool,
    /// Most leaves registered at once. Default 1000.
    pub max_leaves: usize,
    /// Most connections of any kind at once. Default 4096.
    pub max_connections: usize,
    /// Most connections at once from one IP address (an IPv6 /64 counts as
    /// one address). Default 32.
    pub max_connections_per_ip: usize,
    /// Handshakes a second, in all, sustained. Default 200.
    pub handshake_rate: f64,
    /// Handshakes at once, in all, before the rate applies. Default 400.
    pub handshake_burst: u32,
    /// Handshakes a second from one IP address, sustained. Default 50
    /// (a busy household's or script's searches, each a connection of its
    /// own; at about 0.2 ms of CPU a handshake, 1 % of a core).
    pub handshake_rate_per_ip: f64,
    /// Handshakes at once from one IP address before its rate applies.
    /// Default 128.
    pub handshake_burst_per_ip: u32,
    /// Above this many open connections, a handshake from an address not
    /// yet proven gets a QUIC Retry first (address validation). Default 1024.
    pub retry_above: usize,
    /// A connection with no stream open for this long is closed, whoever
    /// sends keep-alives, in ms. Default 5000.
    pub idle_close_ms: u64,
    /// Bytes of half-received frames one connection may hold. Default
    /// 1.5 MiB (one largest session frame and room for requests).
    pub max_buffered_per_connection: usize,
    /// Bytes of half-received frames all connections together may hold.
    /// Default 256 MiB.
    pub max_buffered: usize,
    /// IP addresses that the per-address limits (connections, handshakes,
    /// queries, neighbours) do not apply to. Default none; local test
    /// networks exempt 127.0.0.1 and ::1, where all their honest nodes live.
    pub exempt_ips: Vec<std::net::IpAddr>,
    /// Most files one leaf may have indexed. Default 100 000.
    pub max_files_per_leaf: usize,
    /// Most index entries (a leaf sharing a file) in all. Default
    /// 10 000 000, about 3 GB at ~300 bytes an entry.
    pub max_index_entries: usize,
    /// Most index entries of all the leaves at one IP address (or IPv6
    /// /64): node ids cost nothing. Default 1 000 000.
    pub max_index_entries_per_ip: usize,
    /// Sustained queries per second per node id (8 times as many per IP
    /// address). Default 10.
    pub query_rate: f64,
    /// Queries a node may send at once before the rate applies. Default 20.
    pub query_burst: u32,
    /// Mesh neighbours to keep. Default 8 (see docs/PROTOCOL.md).
    pub target_neighbors: usize,
    /// Most mesh neighbours, dialled and accepted. Default 16.
    pub max_neighbors: usize,
    /// Most neighbours from one IP address (`exempt_ips` excepted). Default 2.
    pub neighbors_per_ip: usize,
    /// Most neighbours from one IPv4 /24 or IPv6 /48 (`exempt_ips` excepted,
    /// and not counted). Default 4.
    pub neighbors_per_subnet: usize,
    /// How this supernode sends its leaves' queries into the mesh: `walk`
    /// (walkers that probe the neighbours whose keyword filters may match,
    /// docs/PROTOCOL.md 11.7) or `flood` (every neighbour within
    /// `query_ttl`). Default `walk`.
    pub routing: RoutingKind,
    /// Walkers started per query (`walk`). Default 12.
    pub walkers: u8,
    /// Steps each walker takes (`walk`). Default 10.
    pub walk_steps: u8,
    /// Most neighbours one visit probes, for our leaves' queries and for
    /// the walkers that visit us. Default 4.
    pub walk_probes: u8,
    /// While this supernode knows of fewer supernodes than this, it floods
    /// its leaves' queries even under `walk` (a small mesh floods cheaply,
    /// and walkers wander in one that is still forming). Default 48.
    pub walk_flood_below: usize,
    /// Hops a query of our leaves may travel (`flood`). Default 4, at most 7.
    pub query_ttl: u8,
    /// How long a query of our leaves may search the mesh, in ms. Default 3000.
    pub search_time_ms: u32,
    /// Sustained mesh queries per second per neighbour. Default 200.
    pub mesh_query_rate: f64,
    /// Mesh queries a neighbour may send at once. Default 400.
    pub mesh_query_burst: u32,
    /// Supernode election (the `[election]` table).
    pub election: crate::election::ElectionConfig,
    /// Relaying between leaves that reach each other no other way (the
    /// `[relay]` table: `enabled`, the circuit counts and budgets).
    pub relay: crate::relay::RelayConfig,
    /// Timings of query handling at a hop (`servent_proto::hop`); not in
    /// the TOML file. Default [`HopConfig::default`].
    #[serde(skip)]
    pub hop: HopConfig,
    /// Mesh membership timings and table sizes (gossip interval, silence
    /// limit, backoff, known-table caps; defaults in
    /// [`servent_proto::mesh::MeshConfig`]). Not read from the file. Its
    /// neighbour counts, address caps and exempt addresses are not used:
    /// [`Config::mesh_config`] takes those from `target_neighbors`,
    /// `max_neighbors`, `neighbors_per_ip`, `neighbors_per_subnet` and
    /// `exempt_ips` above.
    #[serde(skip)]
    pub mesh: MeshConfig,
    /// QUIC timings and limits of the endpoint (keep-alive, idle timeout,
    /// stream count, handshake and frame waits); not in the TOML file, so
    /// that tests and the simulator shrink them in code. A leaf's endpoint
    /// takes its role's. Default [`servent_net::TransportConfig::default`].
    #[serde(skip)]
    pub transport: servent_net::TransportConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            peers: Vec::new(),
            data_dir: None,
            http: None,
            lan: true,
            max_leaves: 1000,
            max_connections: 4096,
            max_connections_per_ip: 32,
            handshake_rate: 200.0,
            handshake_burst: 400,
            handshake_rate_per_ip: 50.0,
            handshake_burst_per_ip: 128,
            retry_above: 1024,
            idle_close_ms: 5000,
            max_buffered_per_connection: 3 << 19,
            max_buffered: 256 << 20,
            exempt_ips: Vec::new(),
            max_files_per_leaf: DEFAULT_MAX_FILES_PER_LEAF,
            max_index_entries: 10_000_000,
            max_index_entries_per_ip: 1_000_000,
            query_rate: 10.0,
            query_burst: 20,
            target_neighbors: 8,
            max_neighbors: 16,
            neighbors_per_ip: 2,
            neighbors_per_subnet: 4,
            routing: RoutingKind::Walk,
            walkers: WalkConfig::default().walkers,
            walk_steps: WalkConfig::default().steps,
            walk_probes: WalkConfig::default().probes,
            walk_flood_below: WalkConfig::default().flood_below,
            query_ttl: servent_proto::route::DEFAULT_TTL,
            search_time_ms: 3000,
            mesh_query_rate: 200.0,
            mesh_query_burst: 400,
            election: Default::default(),
            relay: Default::default(),
            hop: HopConfig::default(),
            mesh: MeshConfig::default(),
            transport: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The io error is the `source`, so it is not repeated in the message:
    // `{:#}` (as the binary prints errors) would show it twice.
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// `reason` is one line: toml's own message spans several (a source
    /// snippet), and the binary must print exactly one `error:` line.
    #[error("invalid config file {path}: {reason}")]
    Parse { path: String, reason: String },
}

impl Config {
    /// The walkers' settings (the hop core caps them, `walk::MAX_WALKERS`
    /// and `walk::MAX_STEPS`).
    pub fn walk(&self) -> WalkConfig {
        WalkConfig {
            walkers: self.walkers,
            steps: self.walk_steps,
            probes: self.walk_probes,
            flood_below: self.walk_flood_below,
        }
    }

    /// How this supernode routes its leaves' queries.
    pub fn routing(&self) -> Routing {
        self.routing.with(self.walk())
    }

    /// A local configuration on `127.0.0.1:0`, with a fresh identity, for
    /// tests and local networks: those poll searches far faster than a
    /// person would and start hundreds of nodes at once, so the query
    /// limits are 100 times the default and the total handshake rate 10
    /// times; and they run every honest node on `127.0.0.1` (or `::1`), so those two
    /// addresses are exempt from the per-address limits. Other loopback
    /// addresses (`127.0.0.2` and up, where tests put attackers) are not.
    pub fn localhost() -> Self {
        let default = Self::default();
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            query_rate: default.query_rate * 100.0,
            query_burst: default.query_burst * 100,
            handshake_rate: default.handshake_rate * 10.0,
            handshake_burst: default.handshake_burst * 10,
            exempt_ips: vec![
                std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::Ipv6Addr::LOCALHOST.into(),
            ],
            ..default
        }
    }

    /// The mesh core's configuration: `mesh` with the neighbour settings
    /// of this config.
    pub fn mesh_config(&self) -> MeshConfig {
        MeshConfig {
            target_neighbors: self.target_neighbors,
            max_neighbors: self.max_neighbors,
            ip_caps: IpCaps {
                per_ip: self.neighbors_per_ip,
                per_subnet: self.neighbors_per_subnet,
            },
            exempt_ips: self.exempt_ips.clone(),
            ..self.mesh.clone()
        }
    }

    /// Whether the per-address limits spare `ip`.
    pub fn is_exempt(&self, ip: std::net::IpAddr) -> bool {
        self.exempt_ips.contains(&ip.to_canonical())
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            reason: one_line(&text, &e),
        })
    }
}

/// "line L, column C: message" from a toml error, on a single line.
fn one_line(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let c: Config = toml::from_str("listen = \"127.0.0.1:9000\"\nmax_leaves = 5\n").unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.max_leaves, 5);
        assert_eq!(c.max_files_per_leaf, DEFAULT_MAX_FILES_PER_LEAF);
        assert!(toml::from_str::<Config>("max_leafs = 5").is_err());
    }

    #[test]
    fn relaying_is_on_by_default_and_the_file_turns_it_off_or_caps_it() {
        let d = Config::default().relay.limits();
        assert_eq!(d, servent_proto::relay::RelayLimits::default());
        assert!(d.enabled);
        let c: Config =
            toml::from_str("[relay]\nenabled = false\nmax_circuits = 2\ncircuit_secs = 60\n")
                .unwrap();
        let l = c.relay.limits();
        assert!(!l.enabled);
        assert_eq!(l.max_circuits, 2);
        assert_eq!(l.circuit_duration, std::time::Duration::from_secs(60));
        assert!(toml::from_str::<Config>("[relay]\nrelays = 1\n").is_err());
    }
}
