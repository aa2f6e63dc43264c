//! Mesh membership without sockets: many `servent_proto::mesh::Membership`
//! cores on a virtual clock, wired to each other the way a supernode's
//! driver wires one to QUIC (a dial is a `Hello` at the other end, a
//! `SendGossip` a `Status`, a `Close` the link ending at the other end).
//! Also a property test of one core fed random events.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use servent_proto::limits::MAX_SUPERNODE_INFOS;
use servent_proto::mesh::{Action, DialAddr, LinkId, Membership, MeshConfig};
use servent_proto::msg::SupernodeInfo;
use servent_proto::NodeId;

fn id(i: usize) -> NodeId {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    NodeId(b)
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, (i / 250) as u8, (i % 250) as u8, 1)),
        7400,
    )
}

/// A network of cores where every message arrives at once (in order).
struct Net {
    nodes: Vec<Option<Membership>>,
    by_addr: HashMap<SocketAddr, usize>,
    by_id: HashMap<NodeId, usize>,
    next_link: u64,
    /// (to, from, action of `from`) still to deliver.
    queue: VecDeque<(usize, Action)>,
    /// Nodes that no longer answer (killed without goodbye).
    dead: Vec<bool>,
}

impl Net {
    /// `n` supernodes started from a chain of bootstrap addresses.
    fn chain(n: usize, config: MeshConfig, t0: Instant) -> Self {
        let nodes = (0..n)
            .map(|i| {
                let peers: Vec<String> = match i {
                    0 => Vec::new(),
                    _ => vec![addr(i - 1).to_string()],
                };
                Some(Membership::new(id(i), config.clone(), &peers, t0))
            })
            .collect();
        Self {
            nodes,
            by_addr: (0..n).map(|i| (addr(i), i)).collect(),
            by_id: (0..n).map(|i| (id(i), i)).collect(),
            next_link: 1,
            queue: VecDeque::new(),
            dead: vec![false; n],
        }
    }

    fn node(&mut self, i: usize) -> &mut Membership {
        self.nodes[i].as_mut().expect("live node")
    }

    fn step(&mut self, now: Instant) {
        for i in 0..self.nodes.len() {
            if self.dead[i] {
                continue;
            }
            self.node(i).handle_timeout(now);
            self.drain(i);
            while let Some((from, action)) = self.queue.pop_front() {
                self.deliver(now, from, action);
            }
        }
    }

    fn drain(&mut self, i: usize) {
        while let Some(a) = self.node(i).poll_action() {
            self.queue.push_back((i, a));
        }
    }

    fn deliver(&mut self, now: Instant, from: usize, action: Action) {
        match action {
            Action::Dial { dial, expect, addr } => {
                let DialAddr::Socket(addr) = addr else {
                    unreachable!("bootstrap addresses here are IP:PORT")
                };
                let target = self.by_addr.get(&addr).copied();
                let ok = target
                    .filter(|t| !self.dead[*t] && *t != from && expect.is_none_or(|e| e == id(*t)));
                let Some(t) = ok else {
                    self.node(from).handle_dial_failed(now, dial);
                    return self.drain(from);
                };
                if self.node(from).is_neighbour(&id(t)) {
                    self.node(from).handle_dial_failed(now, dial);
                    return self.drain(from);
                }
                let link = LinkId(self.next_link);
                self.next_link += 1;
                let hello =
                    self.node(t)
                        .handle_hello(now, id(from), link, addr_ip(from), 7400, 0, 100);
                self.drain(t);
                if hello.is_err() {
                    self.node(from).handle_dial_failed(now, dial);
                    return self.drain(from);
                }
                if self
                    .node(from)
                    .handle_dialled(now, dial, id(t), link, 0, 100)
                    .is_err()
                {
                    // The dialer closes the new connection: the acceptor
                    // sees its link end.
                    self.node(t).handle_link_down(now, id(from), link);
                    self.drain(t);
                }
                self.drain(from);
            }
            Action::SendGossip { to, link, known } => {
                let t = self.index(to);
                if self.dead[t] {
                    return;
                }
                assert!(known.len() <= MAX_SUPERNODE_INFOS);
                assert!(known.iter().all(|k| k.id != to && k.id != id(from)));
                self.node(t)
                    .handle_status(now, id(from), link, 0, 100, known, false);
                self.drain(t);
            }
            Action::Close {
                id: other, link, ..
            } => {
                let t = self.index(other);
                if self.dead[t] {
                    return;
                }
                self.node(t).handle_link_down(now, id(from), link);
                self.drain(t);
            }
        }
    }

    fn index(&self, n: NodeId) -> usize {
        self.by_id[&n]
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Membership)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.dead[*i])
            .map(|(i, m)| (i, m.as_ref().expect("live node")))
    }
}

fn addr_ip(i: usize) -> IpAddr {
    addr(i).ip()
}

#[test]
fn a_chain_of_bootstrap_addresses_fills_in_and_heals_after_a_loss() {
    let t0 = Instant::now();
    let config = MeshConfig::default();
    let n = 30;
    let mut net = Net::chain(n, config.clone(), t0);
    let mut now = t0;
    let tick = Duration::from_millis(100);
    while now < t0 + Duration::from_secs(30) {
        net.step(now);
        now += tick;
    }
    let check = |net: &Net, live: usize| {
        for (i, m) in net.live() {
            let count = m.neighbour_count();
            assert!(
                count >= config.target_neighbors.min(live - 1),
                "node {i} has only {count} neighbours"
            );
            assert!(count <= config.max_neighbors);
            // Links are symmetric: both ends agree on which link it is.
            for (other, nb) in m.neighbours() {
                let j = net.index(*other);
                let back = net.nodes[j].as_ref().unwrap().neighbour_info(&id(i));
                assert_eq!(back.map(|b| b.link), Some(nb.link), "link {i}-{j}");
            }
        }
    };
    check(&net, n);
    // Kill node 5 without a goodbye: its neighbours drop it when it falls
    // silent and redial others.
    net.dead[5] = true;
    let end = now + Duration::from_secs(20);
    while now < end {
        net.step(now);
        now += tick;
    }
    for (_, m) in net.live() {
        assert!(!m.is_neighbour(&id(5)));
    }
    check(&net, n - 1);
}

#[derive(Debug, Clone)]
enum Event {
    Hello {
        from: usize,
        ip: u8,
    },
    Status {
        from: usize,
        told: Vec<(usize, u32)>,
    },
    Down {
        from: usize,
    },
    Tick {
        ms: u64,
    },
    DialOk {
        which: usize,
        leaves: u32,
    },
    DialFail {
        which: usize,
    },
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        (1usize..40, 0u8..6).prop_map(|(from, ip)| Event::Hello { from, ip }),
        (
            1usize..40,
            prop::collection::vec((0usize..400, 0u32..700), 0..80)
        )
            .prop_map(|(from, told)| Event::Status { from, told }),
        (1usize..40).prop_map(|from| Event::Down { from }),
        (1u64..5000).prop_map(|ms| Event::Tick { ms }),
        (0usize..8, 0u32..200).prop_map(|(which, leaves)| Event::DialOk { which, leaves }),
        (0usize..8).prop_map(|which| Event::DialFail { which }),
    ]
}

proptest! {
    /// Whatever happens, the caps hold, gossip never names its receiver or
    /// the sender, and actions only name links the core was given.
    #[test]
    fn caps_and_gossip_rules_hold_under_random_events(events in prop::collection::vec(event(), 1..200)) {
        let t0 = Instant::now();
        let config = MeshConfig {
            max_known: 100,
            max_known_per_sender: 30,
            max_neighbors: 6,
            target_neighbors: 4,
            ..MeshConfig::default()
        };
        let me = id(0);
        let mut m = Membership::new(me, config.clone(), &[], t0);
        let mut now = t0;
        let mut next_link = 1u64;
        let mut given: HashMap<LinkId, NodeId> = HashMap::new();
        let mut pending = Vec::new();
        for e in events {
            match e {
                Event::Hello { from, ip } => {
                    let link = LinkId(next_link);
                    next_link += 1;
                    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, ip));
                    if m.handle_hello(now, id(from), link, ip, 7400, 0, 100).is_ok() {
                        given.insert(link, id(from));
                    }
                }
                Event::Status { from, told } => {
                    let link = m.neighbour_info(&id(from)).map_or(LinkId(0), |n| n.link);
                    let known = told.into_iter().map(|(k, age)| SupernodeInfo {
                        id: id(k),
                        addr: addr(k).to_string(),
                        leaves: 0,
                        max_leaves: 100,
                        age_secs: age,
                    }).collect();
                    m.handle_status(now, id(from), link, 0, 100, known, false);
                }
                Event::Down { from } => {
                    if let Some(link) = m.neighbour_info(&id(from)).map(|n| n.link) {
                        m.handle_link_down(now, id(from), link);
                    }
                }
                Event::Tick { ms } => {
                    now += Duration::from_millis(ms);
                    m.handle_timeout(now);
                }
                Event::DialOk { which, leaves } => {
                    if which < pending.len() {
                        let (dial, expect): (_, NodeId) = pending.remove(which);
                        let link = LinkId(next_link);
                        next_link += 1;
                        if m.handle_dialled(now, dial, expect, link, leaves, 100).is_ok() {
                            given.insert(link, expect);
                        }
                    }
                }
                Event::DialFail { which } => {
                    if which < pending.len() {
                        let (dial, _) = pending.remove(which);
                        m.handle_dial_failed(now, dial);
                    }
                }
            }
            while let Some(a) = m.poll_action() {
                match a {
                    Action::Dial { dial, expect, .. } => {
                        let expect = expect.expect("no bootstrap here");
                        prop_assert!(expect != me && !m.is_neighbour(&expect));
                        pending.push((dial, expect));
                    }
                    Action::SendGossip { to, link, known } => {
                        prop_assert_eq!(given.get(&link), Some(&to));
                        prop_assert!(known.len() <= MAX_SUPERNODE_INFOS);
                        prop_assert!(known.iter().all(|k| k.id != to && k.id != me));
                    }
                    Action::Close { id: other, link, .. } => {
                        prop_assert_eq!(given.remove(&link), Some(other));
                    }
                }
            }
            prop_assert!(m.neighbour_count() <= config.max_neighbors);
            prop_assert!(m.known_count() <= config.max_known + m.neighbour_count());
            // The live links are exactly the neighbours' links.
            prop_assert_eq!(given.len(), m.neighbour_count());
        }
    }
}
