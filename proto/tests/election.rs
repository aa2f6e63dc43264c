//! Property tests of `servent_proto::elect::Election` on random histories:
//! leaves (some behind a NAT, so that no dial-back reaches them) offer and
//! withdraw themselves and change address, dial-backs are answered late or
//! never, promoted leaves accept, decline, fail or never join, and the load
//! and the room of the other supernodes swing, under either set of rules
//! (`Rules::Need`, `Rules::Overload`). Whatever happens:
//!
//! - only a leaf that a dial-back reached at its current address is promoted;
//! - a promotion starts only when none is under way;
//! - two promotions are at least a cool-down apart;
//! - only an elected supernode steps down, and then does nothing more,
//!   and never while a promotion of its own is under way (need rules);
//! - no candidacy is dialled back twice within `probe_spacing`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use servent_proto::elect::{Action, Election, Load, Policy, PromoteReply, Room, Rules};
use servent_proto::msg::Candidacy;

#[derive(Debug, Clone)]
enum Step {
    /// Leaf `id` offers itself from port `port`.
    Offer {
        id: u8,
        port: u8,
    },
    Withdraw {
        id: u8,
    },
    /// The oldest dial-back still out is answered.
    AnswerProbe,
    /// The promoted leaf answers (0 accepted, 1 declined, 2 failed).
    Reply(u8),
    /// The promoted leaf joins the mesh.
    Join,
    /// The hand-over is done.
    HandedOver,
    /// The load and the room elsewhere change.
    Load {
        leaves: u8,
        room: u8,
    },
    /// Time passes, in ms; the core is run at every timeout on the way.
    Wait(u16),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..12, 0u8..3).prop_map(|(id, port)| Step::Offer { id, port }),
        (0u8..12).prop_map(|id| Step::Withdraw { id }),
        Just(Step::AnswerProbe),
        (0u8..3).prop_map(Step::Reply),
        Just(Step::Join),
        Just(Step::HandedOver),
        (0u8..12, 0u8..12).prop_map(|(leaves, room)| Step::Load { leaves, room }),
        (0u16..8000).prop_map(Step::Wait),
        (0u16..8000).prop_map(Step::Wait),
    ]
}

fn policy(rules: Rules) -> Policy {
    Policy {
        rules,
        round: Duration::from_secs(2),
        overload_for: Duration::from_secs(1),
        jitter: Duration::from_secs(1),
        cooldown: Duration::from_secs(3),
        min_uptime: Duration::from_millis(500),
        min_cpu_idle_permille: 0,
        min_mem_mib: 0,
        drain_for: Duration::from_secs(2),
        drained_leaves: 1,
        probe_retry: Duration::from_secs(8),
        ..Policy::default()
    }
}

/// Every third leaf is behind a NAT: no dial-back reaches it.
fn natted(id: u8) -> bool {
    id % 3 == 0
}

fn addr(id: u8, port: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, id], 1000 + u16::from(port)))
}

struct World {
    e: Election<u8>,
    p: Policy,
    elected: bool,
    now: Instant,
    leaves: usize,
    room: Vec<Room>,
    /// Where each leaf is now.
    at: HashMap<u8, SocketAddr>,
    /// The leaf asked to promote, until it answers.
    asked: Option<u8>,
    /// Dial-backs out, oldest first.
    probes: Vec<(u8, SocketAddr)>,
    last_probe: HashMap<u8, Instant>,
    last_promote: Option<Instant>,
    stepped_down: bool,
    /// The loads of every supernode known (the need rules' sample).
    known: Vec<Room>,
    /// A promotion was under way when the core was last run.
    busy: bool,
}

impl World {
    fn act(&mut self) -> Result<(), TestCaseError> {
        while let Some(a) = self.e.poll_action() {
            prop_assert!(!self.stepped_down, "{a:?} after stepping down");
            match a {
                Action::Probe { id, addr, .. } => {
                    if let Some(t) = self.last_probe.insert(id, self.now) {
                        prop_assert!(self.now - t >= self.p.probe_spacing);
                    }
                    self.probes.push((id, addr));
                }
                Action::Promote { id } => {
                    prop_assert!(!natted(id), "leaf {id} behind a NAT promoted");
                    prop_assert_eq!(self.e.reachable(&id), Some(Some(true)));
                    self.asked = Some(id);
                    if let Some(t) = self.last_promote {
                        prop_assert!(self.now - t >= self.p.cooldown);
                    }
                    self.last_promote = Some(self.now);
                }
                Action::HandOver { count, .. } => prop_assert!(count <= self.leaves / 2),
                Action::StepDown => {
                    prop_assert!(self.elected, "a dedicated supernode stepped down");
                    if self.p.rules == Rules::Need {
                        prop_assert!(!self.busy, "stepped down in the middle of a promotion");
                    }
                    self.stepped_down = true;
                }
            }
        }
        Ok(())
    }

    fn run(&mut self, now: Instant) -> Result<(), TestCaseError> {
        let busy = self.e.promoting();
        self.busy = busy;
        let load = Load {
            leaves: self.leaves,
            max_leaves: 10,
            others: &self.room,
            known: &self.known,
            neighbours_elected: (0, 0),
        };
        self.e.handle_timeout(now, &load);
        // A new promotion only when none was under way.
        let before = self.last_promote;
        self.act()?;
        if self.last_promote != before {
            prop_assert!(!busy, "a second promotion while one was under way");
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn random_histories_keep_the_rules(
        elected in any::<bool>(),
        need in any::<bool>(),
        seed in any::<u64>(),
        steps in prop::collection::vec(step(), 0..200),
    ) {
        let t0 = Instant::now();
        let p = policy(if need { Rules::Need } else { Rules::Overload });
        let mut w = World {
            e: Election::new(p.clone(), elected, seed, t0),
            p,
            elected,
            now: t0,
            leaves: 9,
            room: Vec::new(),
            at: HashMap::new(),
            asked: None,
            probes: Vec::new(),
            last_probe: HashMap::new(),
            last_promote: None,
            stepped_down: false,
            known: Vec::new(),
            busy: false,
        };
        let candidacy = Candidacy { cpu_idle_permille: 900, mem_available_mib: 900, upload_kbps: 0 };
        for s in steps {
            match s {
                Step::Offer { id, port } => {
                    let at = addr(id, port);
                    w.at.insert(id, at);
                    w.e.offer(id, candidacy.clone(), w.now, at);
                }
                Step::Withdraw { id } => {
                    // A new session's candidacy is a new one, spacing and all.
                    w.e.withdraw(&id);
                    w.last_probe.remove(&id);
                }
                Step::AnswerProbe => {
                    if !w.probes.is_empty() {
                        let (id, at) = w.probes.remove(0);
                        // It answers where it was dialled, as it is there now.
                        let ok = !natted(id) && w.at.get(&id) == Some(&at);
                        w.e.handle_probe(w.now, id, at, ok);
                    }
                }
                Step::Reply(r) => {
                    let reply = [PromoteReply::Accepted, PromoteReply::Declined, PromoteReply::Failed];
                    if let Some(id) = w.asked.take() {
                        w.e.handle_promote_reply(w.now, id, reply[usize::from(r)]);
                        if w.e.reachable(&id).is_none() {
                            // Accepted or declined: the candidacy is gone.
                            w.last_probe.remove(&id);
                        }
                    } else {
                        // An answer nobody asked for changes nothing.
                        let before = w.e.promotions();
                        w.e.handle_promote_reply(w.now, r, reply[0]);
                        prop_assert_eq!(w.e.promotions(), before);
                    }
                }
                Step::Join => {
                    if let Some(id) = w.e.awaiting_join() {
                        w.e.handle_joined(w.now, id, addr(id, 9), w.leaves);
                        w.act()?;
                    }
                }
                Step::HandedOver => {
                    for id in 0..12 {
                        w.e.handle_handover_done(w.now, id);
                    }
                }
                Step::Load { leaves, room } => {
                    w.leaves = leaves.into();
                    w.room = vec![Room { leaves: room.into(), max_leaves: 10 }];
                    // The rest of the network as full as the room says.
                    w.known = vec![Room { leaves: room.into(), max_leaves: 10 }; usize::from(room) + 1];
                }
                Step::Wait(ms) => {
                    let end = w.now + Duration::from_millis(ms.into());
                    while let Some(t) = w.e.poll_timeout().filter(|t| *t <= end) {
                        w.now = w.now.max(t);
                        w.run(w.now)?;
                    }
                    w.now = end;
                }
            }
            if w.stepped_down {
                prop_assert_eq!(w.e.poll_timeout(), None);
            }
        }
    }
}
