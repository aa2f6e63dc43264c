//! What a leaf tells its operator over `--http` (served by
//! `servent_net::http`): the `/status` document and the `/metrics` registry.
//!
//! While the leaf holds the supernode role it says `"role": "supernode"`
//! and adds the supernode's fields, and its supernode metrics count; they
//! read zero otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::registry::Registry;
use serde::Serialize;
use servent_net::http::{Report, Sampled};
use servent_proto::nat::{self, Mapping, NatView, Observation};
use servent_proto::portmap::Mapped;
use servent_proto::NodeId;
use supernode::status::{NodeAddr, SupernodeFields};

use crate::link::LinkStatus;
use crate::portmap::Published;
use crate::role::Role;
use crate::share::{ScanProgress, Share};
use crate::upload::Uploads;

/// The links of a running leaf, one per supernode it is attached to or trying.
pub(crate) type Links = Arc<Mutex<Vec<Arc<Mutex<LinkStatus>>>>>;

/// The supernodes a leaf is registered with now.
pub(crate) fn attached(links: &Links) -> Vec<(NodeId, SocketAddr)> {
    let links = links.lock().expect("links");
    links
        .iter()
        .filter_map(|l| l.lock().expect("link status").supernode)
        .collect()
}

/// What the supernodes registered with now saw of this leaf's socket.
pub(crate) fn observations(links: &Links) -> Vec<Observation> {
    let links = links.lock().expect("links");
    links
        .iter()
        .filter_map(|l| {
            let l = l.lock().expect("link status");
            Some(Observation {
                supernode: l.supernode?.1,
                observed: l.observed?,
            })
        })
        .collect()
}

/// The leaf's own IP addresses towards each of `observations`'
/// supernodes (the source address its routes pick: a UDP socket connected
/// there, which sends nothing), and `listen`'s if it is bound to one.
fn local_ips(listen: SocketAddr, observations: &[Observation]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = observations
        .iter()
        .filter_map(|o| {
            let any: SocketAddr = match o.supernode {
                SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let probe = std::net::UdpSocket::bind(any).ok()?;
            probe.connect(o.supernode).ok()?;
            Some(probe.local_addr().ok()?.ip().to_canonical())
        })
        .collect();
    if !listen.ip().is_unspecified() {
        ips.push(listen.ip().to_canonical());
    }
    ips.sort();
    ips.dedup();
    ips
}

/// What this leaf can tell of its NAT now (`nat::classify`).
pub(crate) fn nat_view(listen: SocketAddr, links: &Links) -> NatView {
    let observations = observations(links);
    nat::classify(listen, &local_ips(listen, &observations), &observations)
}

/// The `nat` object of `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct NatStatus {
    /// Where the supernodes registered with see this leaf's socket, most
    /// reported first.
    pub reflexive: Vec<String>,
    /// `"none"`, `"endpoint-independent"`, `"endpoint-dependent"` or
    /// `"unknown"`.
    pub mapping: &'static str,
    /// The port mapping the gateway made (NAT-PMP), if any.
    pub port_mapped: Option<String>,
}

impl NatStatus {
    fn of(v: &NatView, mapped: Option<Mapped>) -> Self {
        Self {
            reflexive: v.reflexive.iter().map(|a| a.to_string()).collect(),
            mapping: v.mapping.name(),
            port_mapped: mapped.map(|m| SocketAddr::from((m.external, m.port)).to_string()),
        }
    }
}

/// `servent_nat_mapping`: 0 unknown, 1 none, 2 endpoint-independent, 3
/// endpoint-dependent.
fn mapping_code(m: Mapping) -> u64 {
    match m {
        Mapping::Unknown => 0,
        Mapping::None => 1,
        Mapping::EndpointIndependent => 2,
        Mapping::EndpointDependent => 3,
    }
}

/// A leaf's `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct LeafStatus {
    pub id: String,
    /// `"leaf"`, or `"supernode"` while elected.
    pub role: String,
    /// The UDP address downloads are served on.
    pub listen: String,
    pub uptime_secs: u64,
    /// Supernodes registered with now.
    pub supernodes: Vec<NodeAddr>,
    /// Distinct files shared now (hashed and announced).
    pub shared_files: usize,
    /// Downloads in progress shared now (their verified ranges).
    pub partial_files: usize,
    pub hashing: Hashing,
    /// What the leaf can tell of the NAT in front of it.
    pub nat: NatStatus,
    /// The supernode role's fields, while elected.
    #[serde(flatten)]
    pub supernode: Option<SupernodeFields>,
}

/// Progress of the current scan of the shared folder.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Hashing {
    pub files_to_hash: u64,
    pub files_hashed: u64,
    pub bytes_to_hash: u64,
    pub bytes_hashed: u64,
}

impl From<ScanProgress> for Hashing {
    fn from(p: ScanProgress) -> Self {
        Self {
            files_to_hash: p.files_to_hash,
            files_hashed: p.files_hashed,
            bytes_to_hash: p.bytes_to_hash,
            bytes_hashed: p.bytes_hashed,
        }
    }
}

/// `/status` and `/metrics` of a running leaf.
pub(crate) struct LeafReport {
    id: NodeId,
    listen: SocketAddr,
    started: Instant,
    share: Arc<Share>,
    links: Links,
    mapped: Published,
    role: Arc<Role>,
    registry: Registry,
}

impl LeafReport {
    pub(crate) fn new(
        id: NodeId,
        listen: SocketAddr,
        share: Arc<Share>,
        links: Links,
        mapped: Published,
        uploads: &Uploads,
        role: Arc<Role>,
    ) -> Self {
        let mut registry = Registry::default();
        let progress = |f: fn(ScanProgress) -> u64| {
            let share = share.clone();
            Sampled::gauge(move || f(share.progress()))
        };
        let gauges = [
            ("servent_shared_files", "Distinct files shared now", {
                let share = share.clone();
                Sampled::gauge(move || share.len() as u64)
            }),
            (
                "servent_partial_files",
                "Downloads in progress whose verified ranges are shared now",
                {
                    let share = share.clone();
                    Sampled::gauge(move || share.partials() as u64)
                },
            ),
            (
                "servent_attached_supernodes",
                "Supernodes this leaf is registered with now",
                {
                    let links = links.clone();
                    Sampled::gauge(move || attached(&links).len() as u64)
                },
            ),
            (
                "servent_files_to_hash",
                "Files the current scan must hash",
                progress(|p| p.files_to_hash),
            ),
            (
                "servent_files_hashed",
                "Files the current scan has hashed",
                progress(|p| p.files_hashed),
            ),
            (
                "servent_bytes_to_hash",
                "Bytes the current scan must hash",
                progress(|p| p.bytes_to_hash),
            ),
            (
                "servent_bytes_hashed",
                "Bytes the current scan has hashed",
                progress(|p| p.bytes_hashed),
            ),
            (
                "servent_nat_mapping",
                "The NAT mapping the supernodes show: 0 unknown, 1 none, 2 endpoint-independent, 3 endpoint-dependent",
                {
                    let links = links.clone();
                    Sampled::gauge(move || mapping_code(nat_view(listen, &links).mapping))
                },
            ),
            (
                "servent_nat_reflexive_addresses",
                "Distinct addresses the supernodes registered with see this leaf at",
                {
                    let links = links.clone();
                    Sampled::gauge(move || nat_view(listen, &links).reflexive.len() as u64)
                },
            ),
            (
                "servent_supernode_role",
                "1 while this leaf is elected supernode, else 0",
                {
                    let role = role.clone();
                    Sampled::gauge(move || u64::from(role.is_supernode()))
                },
            ),
        ];
        for (name, help, metric) in gauges {
            registry.register(name, help, metric);
        }
        registry.register(
            "servent_uploads",
            "Uploads sent whole to other leaves",
            uploads.served.clone(),
        );
        registry.register(
            "servent_uploaded_bytes",
            "Bytes of file content sent to other leaves",
            uploads.bytes.clone(),
        );
        let elected = role.clone();
        supernode::status::register(&mut registry, Arc::new(move || elected.state()));
        Self {
            id,
            listen,
            started: Instant::now(),
            share,
            links,
            mapped,
            role,
            registry,
        }
    }
}

impl Report for LeafReport {
    type Status = LeafStatus;

    fn status(&self) -> LeafStatus {
        let mut supernodes: Vec<NodeAddr> = attached(&self.links)
            .into_iter()
            .map(|(id, addr)| NodeAddr::new(id, addr))
            .collect();
        supernodes.sort_by(|a, b| a.id.cmp(&b.id));
        let supernode = self.role.state().map(|s| SupernodeFields::of(&s));
        LeafStatus {
            id: self.id.to_string(),
            role: if supernode.is_some() {
                "supernode"
            } else {
                "leaf"
            }
            .into(),
            listen: self.listen.to_string(),
            uptime_secs: self.started.elapsed().as_secs(),
            supernodes,
            shared_files: self.share.len(),
            partial_files: self.share.partials(),
            hashing: self.share.progress().into(),
            nat: NatStatus::of(&nat_view(self.listen, &self.links), *self.mapped.borrow()),
            supernode,
        }
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }
}
