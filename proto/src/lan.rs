//! Zero configuration on a LAN (docs/PROTOCOL.md section 17): what a
//! node announces over mDNS/DNS-SD, what it makes of
//! the announcements of others, and when a leaf takes the supernode role
//! by itself because its LAN has none.
//!
//! Pure decisions: the driver (`leaf/src/lan.rs`, over
//! `servent_net::lan`'s mDNS daemon) passes the time and what it heard.
//!
//! The rules:
//! - **Hints only.** An announcement names an id, a role and a port, and
//!   mDNS names the addresses; none of it is trusted. A supernode found is
//!   dialled with the announced id as the expected one, so the TLS
//!   identity check decides, as for any gossiped address.
//! - **Bounded.** At most [`MAX_PEERS`] nodes are remembered, each with at
//!   most [`MAX_ADDRS`] addresses; one not heard for [`PEER_TTL`] is
//!   forgotten. A property that is too long or malformed drops the whole
//!   announcement.
//! - **The LAN's first supernode.** A leaf that knows no supernode at all
//!   (none given, none cached, none found on the LAN, none registered
//!   with) and may be promoted takes the role itself once it has listened
//!   for [`FIRST_WAIT`], if it has the lowest id among the LAN's candidate
//!   leaves; any candidate does after [`ANYONE_WAIT`], so that a lowest one
//!   that never does cannot stall the LAN. It steps down by the election's
//!   usual rules once it meshes with dedicated supernodes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::msg::SupernodeInfo;
use crate::NodeId;

/// The DNS-SD service type every Servent node announces.
pub const SERVICE_TYPE: &str = "_servent._udp.local.";
/// Nodes remembered from the LAN, at most; the rest are not listened to.
pub const MAX_PEERS: usize = 64;
/// Addresses remembered of one node, at most.
pub const MAX_ADDRS: usize = 4;
/// A node not heard of for this long is forgotten (mDNS also says when
/// one leaves or its records expire).
pub const PEER_TTL: Duration = Duration::from_secs(180);
/// How long a leaf that knows no supernode listens before the lowest
/// candidate takes the role.
pub const FIRST_WAIT: Duration = Duration::from_secs(3);
/// How long before any candidate takes it.
pub const ANYONE_WAIT: Duration = Duration::from_secs(12);
/// Longest value of a property this core reads (the id's 64 hex digits).
pub const MAX_PROPERTY: usize = 64;

/// The properties of an announcement (DNS-SD TXT keys).
pub const KEY_ID: &str = "id";
pub const KEY_ROLE: &str = "role";
pub const KEY_CANDIDATE: &str = "cand";

/// What a node is, as it announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LanRole {
    Leaf,
    Supernode,
}

impl LanRole {
    pub fn as_str(self) -> &'static str {
        match self {
            LanRole::Leaf => "leaf",
            LanRole::Supernode => "supernode",
        }
    }
}

/// What one node announces of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub id: NodeId,
    pub role: LanRole,
    /// The UDP port its QUIC endpoint serves on.
    pub port: u16,
    /// A leaf that would take the supernode role (not `--no-promote`).
    pub candidate: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnouncementError {
    #[error("property {0} missing")]
    Missing(&'static str),
    #[error("property {0} longer than {MAX_PROPERTY} bytes")]
    TooLong(&'static str),
    #[error("property {0} malformed")]
    Malformed(&'static str),
    #[error("port 0")]
    NoPort,
}

impl Announcement {
    /// The TXT properties that carry it (the port is the SRV record's).
    pub fn properties(&self) -> Vec<(&'static str, String)> {
        vec![
            (KEY_ID, self.id.to_string()),
            (KEY_ROLE, self.role.as_str().to_string()),
            (KEY_CANDIDATE, if self.candidate { "1" } else { "0" }.into()),
        ]
    }

    /// Reads one from its properties (`get` looks one up) and SRV port;
    /// anything missing, long or malformed refuses it whole.
    pub fn parse<'a>(
        get: impl Fn(&str) -> Option<&'a str>,
        port: u16,
    ) -> Result<Self, AnnouncementError> {
        let read = |key: &'static str| -> Result<&'a str, AnnouncementError> {
            let v = get(key).ok_or(AnnouncementError::Missing(key))?;
            if v.len() > MAX_PROPERTY {
                return Err(AnnouncementError::TooLong(key));
            }
            Ok(v)
        };
        let id = read(KEY_ID)?
            .parse()
            .map_err(|_| AnnouncementError::Malformed(KEY_ID))?;
        let role = match read(KEY_ROLE)? {
            "leaf" => LanRole::Leaf,
            "supernode" => LanRole::Supernode,
            _ => return Err(AnnouncementError::Malformed(KEY_ROLE)),
        };
        let candidate = match get(KEY_CANDIDATE) {
            None | Some("0") => false,
            Some("1") => true,
            Some(_) => return Err(AnnouncementError::Malformed(KEY_CANDIDATE)),
        };
        if port == 0 {
            return Err(AnnouncementError::NoPort);
        }
        Ok(Self {
            id,
            role,
            port,
            candidate,
        })
    }
}

/// One node heard on the LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanPeer {
    pub role: LanRole,
    pub candidate: bool,
    /// Where it said it is: hints, checked by the TLS handshake.
    pub addrs: Vec<SocketAddr>,
    pub heard: Instant,
}

/// The nodes heard on the LAN, by id.
#[derive(Debug, Clone)]
pub struct LanPeers {
    me: NodeId,
    peers: BTreeMap<NodeId, LanPeer>,
}

/// Whether an address mDNS named may be dialled: not unspecified,
/// multicast or broadcast (IPv6 link-local addresses need a scope this
/// core does not carry, so they are left out too).
fn dialable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => {
            !(v6.is_unspecified() || v6.is_multicast() || (v6.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

impl LanPeers {
    pub fn new(me: NodeId) -> Self {
        Self {
            me,
            peers: BTreeMap::new(),
        }
    }

    /// Takes in an announcement heard at `ips`; returns whether it was
    /// kept (never this node's own, never beyond [`MAX_PEERS`], never one
    /// without a dialable address).
    pub fn heard(&mut self, now: Instant, ann: &Announcement, ips: &[IpAddr]) -> bool {
        if ann.id == self.me {
            return false;
        }
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for ip in ips.iter().copied().filter(|ip| dialable(*ip)) {
            let addr = SocketAddr::new(ip, ann.port);
            if !addrs.contains(&addr) && addrs.len() < MAX_ADDRS {
                addrs.push(addr);
            }
        }
        // IPv4 first: the address most LANs route.
        addrs.sort_by_key(|a| a.is_ipv6());
        if addrs.is_empty() {
            return false;
        }
        if !self.peers.contains_key(&ann.id) && self.peers.len() >= MAX_PEERS {
            return false;
        }
        self.peers.insert(
            ann.id,
            LanPeer {
                role: ann.role,
                candidate: ann.candidate,
                addrs,
                heard: now,
            },
        );
        true
    }

    /// A node said it left, or its records expired.
    pub fn lost(&mut self, id: &NodeId) {
        self.peers.remove(id);
    }

    /// Forgets nodes not heard of for [`PEER_TTL`].
    pub fn expire(&mut self, now: Instant) {
        self.peers
            .retain(|_, p| now.saturating_duration_since(p.heard) < PEER_TTL);
    }

    pub fn get(&self, id: &NodeId) -> Option<&LanPeer> {
        self.peers.get(id)
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    /// The supernodes heard, with the address to dial each at first.
    pub fn supernodes(&self) -> Vec<(NodeId, SocketAddr)> {
        self.peers
            .iter()
            .filter(|(_, p)| p.role == LanRole::Supernode)
            .map(|(id, p)| (*id, p.addrs[0]))
            .collect()
    }

    /// The supernodes heard, as the lists supernodes send leaves: at half
    /// their room, the load of one no list has told of yet (an
    /// announcement claims none).
    pub fn supernode_infos(&self) -> Vec<SupernodeInfo> {
        self.supernodes()
            .into_iter()
            .map(|(id, addr)| SupernodeInfo {
                id,
                addr: addr.to_string(),
                leaves: 1,
                max_leaves: 2,
                age_secs: 0,
            })
            .collect()
    }

    /// Whether `me` has the lowest id of the candidate leaves heard.
    fn lowest_candidate(&self) -> bool {
        self.peers
            .iter()
            .filter(|(_, p)| p.role == LanRole::Leaf && p.candidate)
            .all(|(id, _)| self.me < *id)
    }
}

/// What decides whether a leaf takes the supernode role by itself.
#[derive(Debug, Clone, Copy)]
pub struct Alone {
    /// How long it has known no supernode: none registered with, none
    /// given or cached that answered, none heard on the LAN.
    pub for_how_long: Duration,
    /// It may be promoted at all (not `--no-promote`, not just stepped
    /// down) and serves on an address the LAN reaches.
    pub may_take: bool,
    /// It holds the role already.
    pub holding: bool,
}

/// Whether the leaf takes the supernode role now, as the LAN's first.
pub fn take_role_alone(peers: &LanPeers, alone: Alone) -> bool {
    if alone.holding || !alone.may_take || !peers.supernodes().is_empty() {
        return false;
    }
    alone.for_how_long >= ANYONE_WAIT
        || (alone.for_how_long >= FIRST_WAIT && peers.lowest_candidate())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn ann(n: u8, role: LanRole) -> Announcement {
        Announcement {
            id: id(n),
            role,
            port: 7401,
            candidate: true,
        }
    }

    fn lan() -> IpAddr {
        "10.1.0.2".parse().unwrap()
    }

    #[test]
    fn an_announcement_reads_back_from_its_properties() {
        let a = ann(7, LanRole::Supernode);
        let props = a.properties();
        let get = |k: &str| {
            props
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(Announcement::parse(get, 7401), Ok(a));
    }

    #[test]
    fn hostile_properties_are_refused_whole() {
        let cases: [(&str, &str, AnnouncementError); 4] = [
            ("id", "abc", AnnouncementError::Malformed("id")),
            ("role", "king", AnnouncementError::Malformed("role")),
            ("cand", "yes", AnnouncementError::Malformed("cand")),
            ("role", &"x".repeat(65), AnnouncementError::TooLong("role")),
        ];
        for (key, value, want) in cases {
            let mut props = ann(1, LanRole::Leaf).properties();
            props.iter_mut().find(|(k, _)| *k == key).unwrap().1 = value.into();
            let get = |k: &str| {
                props
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(Announcement::parse(get, 7401), Err(want), "{key}={value}");
        }
        let none = |_: &str| None;
        assert_eq!(
            Announcement::parse(none, 7401),
            Err(AnnouncementError::Missing("id"))
        );
        let props = ann(1, LanRole::Leaf).properties();
        let get = |k: &str| {
            props
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(Announcement::parse(get, 0), Err(AnnouncementError::NoPort));
    }

    #[test]
    fn its_own_announcement_and_undialable_addresses_are_not_kept() {
        let now = Instant::now();
        let mut peers = LanPeers::new(id(1));
        assert!(!peers.heard(now, &ann(1, LanRole::Supernode), &[lan()]));
        let bad: Vec<IpAddr> = ["0.0.0.0", "224.0.0.251", "fe80::1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(!peers.heard(now, &ann(2, LanRole::Supernode), &bad));
        assert!(peers.supernodes().is_empty());
        assert!(peers.heard(now, &ann(2, LanRole::Supernode), &[lan()]));
        assert_eq!(
            peers.supernodes(),
            vec![(id(2), SocketAddr::new(lan(), 7401))]
        );
    }

    #[test]
    fn the_lan_is_remembered_within_bounds_and_forgotten_in_time() {
        let now = Instant::now();
        let mut peers = LanPeers::new(NodeId([0; 32]));
        let many: Vec<IpAddr> = (1..=10).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        for n in 1..=200u8 {
            peers.heard(now, &ann(n, LanRole::Leaf), &many);
        }
        assert_eq!(peers.len(), MAX_PEERS);
        assert_eq!(peers.get(&id(1)).unwrap().addrs.len(), MAX_ADDRS);
        peers.expire(now + PEER_TTL);
        assert!(peers.is_empty());
    }

    #[test]
    fn the_lowest_candidate_takes_the_role_first_and_anyone_later() {
        let now = Instant::now();
        let alone = |secs| Alone {
            for_how_long: Duration::from_secs(secs),
            may_take: true,
            holding: false,
        };
        let mut low = LanPeers::new(id(1));
        low.heard(now, &ann(2, LanRole::Leaf), &[lan()]);
        let mut high = LanPeers::new(id(2));
        high.heard(now, &ann(1, LanRole::Leaf), &[lan()]);
        assert!(!take_role_alone(&low, alone(1)));
        assert!(take_role_alone(&low, alone(3)));
        assert!(!take_role_alone(&high, alone(3)));
        assert!(take_role_alone(&high, alone(12)));
        // A lower leaf that will not take the role does not hold the rest up.
        let mut shy = LanPeers::new(id(2));
        let mut no = ann(1, LanRole::Leaf);
        no.candidate = false;
        shy.heard(now, &no, &[lan()]);
        assert!(take_role_alone(&shy, alone(3)));
    }

    #[test]
    fn no_leaf_takes_the_role_where_a_supernode_is_heard_or_it_may_not() {
        let now = Instant::now();
        let mut peers = LanPeers::new(id(1));
        let alone = Alone {
            for_how_long: Duration::from_secs(60),
            may_take: true,
            holding: false,
        };
        assert!(take_role_alone(&peers, alone));
        assert!(!take_role_alone(
            &peers,
            Alone {
                may_take: false,
                ..alone
            }
        ));
        assert!(!take_role_alone(
            &peers,
            Alone {
                holding: true,
                ..alone
            }
        ));
        peers.heard(now, &ann(9, LanRole::Supernode), &[lan()]);
        assert!(!take_role_alone(&peers, alone));
    }
}
