//! A hostile supernode against real ones: it speaks the mesh protocol by
//! hand (`servent-mesh/3`) from its own loopback address (127.0.0.2 and
//! up, capped like any address, while the honest nodes live on the exempt
//! 127.0.0.1), and each test asserts that honest leaves are still served.
//! Each prints its figures as one JSON line.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use servent_net::{self as net, Endpoint, Identity};
use servent_proto::limits::{MAX_MESH_FRAME, MAX_REPLY_FRAME, MAX_SUPERNODE_INFOS};
use servent_proto::msg::{
    FilterBits, GetReply, Hit, MeshControl, MeshQuery, MeshRequest, NameVariant, Query, QueryKind,
    Source, SupernodeInfo, SupernodeReply, SupernodeRequest, ALPN_LEAF, ALPN_MESH, ALPN_TRANSFER,
};
use servent_proto::{ContentHash, NodeId};
use servent_tests::attack::{elsewhere, percentile, serial};
use servent_tests::*;

const T: Duration = Duration::from_secs(10);

/// What the hostile supernode does once linked.
#[derive(Clone, Copy)]
struct Plan {
    /// `MeshQuery` with fresh ids, as fast as the target takes streams.
    flood: bool,
    /// `Status` frames full of made-up supernodes, fresh ones each time.
    fake_tables: bool,
    /// `Hits` frames, on streams of its own, for queries never sent to it.
    push_hits: bool,
}

#[derive(Debug, Default)]
struct Report {
    linked: bool,
    queries_sent: usize,
    hits_pushed: usize,
    /// Pushed `Hits` frames the target answered with a frame (none should).
    hits_answered: usize,
}

/// The made-up supernode ids start with this byte.
const FAKE: u8 = 0xfa;
/// The hash of the made-up hit.
const FAKE_HASH: ContentHash = ContentHash([0xab; 32]);

/// A mesh link the attacker opened: its endpoint (kept open), the port it
/// claims to listen on, the connection and the control stream.
struct Linked {
    ep: Endpoint,
    port: u16,
    conn: quinn::Connection,
    ctl: quinn::SendStream,
    ctl_recv: quinn::RecvStream,
}

/// Dials `target` from `at` as a supernode and sends `Hello`; the link,
/// if the target welcomed it.
async fn link_as_supernode(at: SocketAddr, target: SocketAddr) -> Option<Linked> {
    let identity = Arc::new(Identity::generate().expect("identity"));
    let ep = Endpoint::bind(identity, at, &[ALPN_MESH]).expect("bind the attacker's address");
    let port = ep.local_addr().expect("local addr").port();
    let conn = ep.connect(target, ALPN_MESH, None).await.ok()?.conn.clone();
    let (mut ctl, mut ctl_recv) = conn.open_bi().await.ok()?;
    let hello = MeshRequest::Hello {
        listen_port: port,
        leaves: 0,
        max_leaves: 1000,
    };
    net::write_frame(&mut ctl, &hello, MAX_MESH_FRAME)
        .await
        .ok()?;
    match net::read_first_frame::<MeshControl>(&mut ctl_recv, MAX_MESH_FRAME).await {
        Ok(Some(MeshControl::Welcome { .. })) => Some(Linked {
            ep,
            port,
            conn,
            ctl,
            ctl_recv,
        }),
        _ => None,
    }
}

/// Links to `target` as a supernode on `ip` and carries out `plan` until
/// `stop` is set.
fn hostile_neighbour(
    ip: &str,
    target: SocketAddr,
    plan: Plan,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Report> {
    let at: SocketAddr = format!("{ip}:0").parse().unwrap();
    elsewhere(async move {
        let mut report = Report::default();
        let Some(Linked {
            ep: _ep,
            port,
            conn,
            mut ctl,
            mut ctl_recv,
        }) = link_as_supernode(at, target).await
        else {
            return report;
        };
        report.linked = true;
        let mut tasks = tokio::task::JoinSet::new();
        // Its status: made-up tables (8 000 entries a frame, all fresh),
        // often enough that the link stays up.
        let stop_ctl = stop.clone();
        tasks.spawn(async move {
            let mut round = 0u32;
            while !stop_ctl.load(Ordering::Relaxed) {
                let known = if plan.fake_tables {
                    (0..8000u32).map(|i| fake_info(round, i)).collect()
                } else {
                    Vec::new()
                };
                let status = MeshControl::Status {
                    leaves: 0,
                    max_leaves: 1000,
                    known,
                    elected: false,
                };
                if net::write_frame(&mut ctl, &status, MAX_MESH_FRAME)
                    .await
                    .is_err()
                {
                    return;
                }
                round += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        // The target's status frames, read and ignored.
        tasks.spawn(async move {
            while let Ok(Some(_)) =
                net::read_frame::<MeshControl>(&mut ctl_recv, MAX_MESH_FRAME).await
            {}
        });
        // The queries the target forwards to it: never answered.
        let accept = conn.clone();
        tasks.spawn(async move { while accept.accept_bi().await.is_ok() {} });
        let started = Instant::now();
        // Fresh ids: a counter, scrambled (odd multiplier: no repeats).
        let mut next_id = u64::from(port) << 48;
        while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
            if plan.flood {
                let Ok((mut send, mut recv)) = conn.open_bi().await else {
                    break;
                };
                // Read every answer, so that the target does all the work
                // a query asks for, forwarding included.
                tokio::spawn(async move {
                    while let Ok(Some(_)) =
                        net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME).await
                    {
                    }
                });
                let q = MeshRequest::Query(MeshQuery {
                    id: {
                        next_id += 1;
                        next_id.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                    },
                    ttl: 7,
                    timeout_ms: 3000,
                    query: Query {
                        kind: QueryKind::Keywords(vec!["tune".into()]),
                        max_results: 500,
                    },
                });
                if net::write_frame(&mut send, &q, MAX_MESH_FRAME)
                    .await
                    .is_ok()
                {
                    report.queries_sent += 1;
                }
                let _ = send.finish();
            }
            if plan.push_hits {
                let Ok((mut send, mut recv)) = conn.open_bi().await else {
                    break;
                };
                let push = SupernodeReply::Hits(vec![fake_hit()]);
                if net::write_frame(&mut send, &push, MAX_REPLY_FRAME)
                    .await
                    .is_ok()
                {
                    report.hits_pushed += 1;
                }
                let _ = send.finish();
                let answer = tokio::time::timeout(
                    Duration::from_secs(1),
                    net::read_first_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME),
                )
                .await;
                report.hits_answered += usize::from(matches!(answer, Ok(Ok(Some(_)))));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if !plan.flood && !plan.push_hits {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        tasks.abort_all();
        conn.close(0u32.into(), b"bye");
        report
    })
}

fn fake_info(round: u32, i: u32) -> SupernodeInfo {
    let mut id = [FAKE; 32];
    id[1..5].copy_from_slice(&round.to_be_bytes());
    id[5..9].copy_from_slice(&i.to_be_bytes());
    SupernodeInfo {
        id: NodeId(id),
        addr: format!("198.51.100.{}:{}", i % 250 + 1, 1024 + i % 60000),
        leaves: 0,
        max_leaves: 1_000_000,
        age_secs: 0,
    }
}

fn fake_hit() -> Hit {
    Hit {
        hash: FAKE_HASH,
        names: vec![NameVariant {
            name: "bravo tune.mp3".into(),
            size: 1234,
        }],
        sources: vec![Source {
            id: NodeId([7; 32]),
            addr: "127.0.0.9:9".into(),
            variant: 0,
            via: None,
        }],
    }
}

/// Honest searches across the A–B link, both ways: a leaf of A searches
/// for B's file and a leaf of B for A's, each 20 times a second (well
/// within its fair share), for `how_long`.
struct Searches {
    ok: usize,
    times: Vec<Duration>,
    polluted: usize,
}

async fn search_both_ways(ca: &Client, cb: &Client, how_long: Duration) -> Searches {
    let mut s = Searches {
        ok: 0,
        times: Vec::new(),
        polluted: 0,
    };
    let started = Instant::now();
    while started.elapsed() < how_long && s.times.len() < 2000 {
        let pace = tokio::time::sleep(Duration::from_millis(50));
        let ((ha, ta), (hb, tb)) = tokio::join!(one(ca, "bravo"), one(cb, "alpha"));
        for (hits, t) in [(ha, ta), (hb, tb)] {
            s.ok += usize::from(!hits.is_empty());
            s.polluted += usize::from(hits.iter().any(|h| h.hash == FAKE_HASH));
            s.times.push(t);
        }
        pace.await;
    }
    s
}

fn pct(times: &[Duration], p: usize) -> f64 {
    percentile(times, p).as_secs_f64() * 1e3
}

/// One honest search: its hits (none if it failed) and how long it took.
async fn one(c: &Client, word: &str) -> (Vec<Hit>, Duration) {
    let t = Instant::now();
    let hits = c
        .search(&[word.to_string()], 1, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    (hits, t.elapsed())
}

/// Two honest supernodes A–B, each with one leaf sharing a file the other
/// side searches for.
async fn honest_pair() -> (Supernode, Supernode, TestLeaf, TestLeaf) {
    let a = supernode().await;
    let b = supernode_with(mesh_config(&[&a])).await;
    wait_for(T, || async {
        a.neighbours().contains(&b.id()) && b.neighbours().contains(&a.id())
    })
    .await
    .expect("A and B link");
    let la = TestLeaf::start_attached(&[&a], &[("alpha tune.mp3", b"alpha tune")], 1).await;
    let lb = TestLeaf::start_attached(&[&b], &[("bravo tune.mp3", b"bravo tune")], 1).await;
    la.wait_indexed(1).await;
    lb.wait_indexed(1).await;
    (a, b, la, lb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_flooding_mesh_queries_spends_only_its_own_share() {
    let _serial = serial().await;
    let (a, b, la, lb) = honest_pair().await;
    let (ca, cb) = (la.client(&[&a]), lb.client(&[&b]));
    let before = search_both_ways(&ca, &cb, Duration::from_secs(2)).await;
    assert_eq!(
        before.ok,
        before.times.len(),
        "searches work before the attack"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let plan = Plan {
        flood: true,
        fake_tables: true,
        push_hits: false,
    };
    let hostile = hostile_neighbour("127.0.0.2", a.addr(), plan, stop.clone());
    let limited = || a.metrics().queries_rate_limited.get();
    let linked = wait_for(T, || async { a.neighbours().len() == 2 && limited() > 0 }).await;
    let b_refused_before = b.metrics().queries_rate_limited.get();
    let during = if linked.is_ok() {
        search_both_ways(&ca, &cb, Duration::from_secs(8)).await
    } else {
        Searches {
            ok: 0,
            times: vec![Duration::ZERO],
            polluted: 0,
        }
    };
    stop.store(true, Ordering::Relaxed);
    let report = hostile.join().expect("attacker thread");
    let b_refused = b.metrics().queries_rate_limited.get() - b_refused_before;
    let (a_known, b_known) = (a.state().known_count(), b.state().known_count());
    println!(
        "{{\"test\":\"mesh_query_flood\",\"flood_sent\":{},\"a_rate_limited\":{},\"a_unforwarded\":{},\"b_refused_from_a\":{b_refused},\"honest_ok_before\":{},\"honest_of_before\":{},\"p50_before_ms\":{:.2},\"p95_before_ms\":{:.2},\"honest_ok\":{},\"honest_of\":{},\"p50_ms\":{:.2},\"p95_ms\":{:.2},\"a_known\":{a_known},\"b_known\":{b_known}}}",
        report.queries_sent,
        limited(),
        a.metrics().queries_unforwarded.get(),
        before.ok,
        before.times.len(),
        pct(&before.times, 50),
        pct(&before.times, 95),
        during.ok,
        during.times.len(),
        pct(&during.times, 50),
        pct(&during.times, 95),
    );
    assert!(report.linked, "the hostile supernode could not link");
    linked.expect("the flood reached A's rate limit");
    assert!(
        during.ok * 100 >= during.times.len() * 99,
        "only {} of {} honest searches succeeded",
        during.ok,
        during.times.len()
    );
    assert!(
        a.metrics().queries_unforwarded.get() > 0,
        "A forwarded the whole flood"
    );
    // What A forwards stays within what B takes from it: B refuses none
    // of it (without fair forwarding it refused 142 and 8 % of honest
    // searches failed).
    assert_eq!(b_refused, 0, "B refused queries A forwarded");
    // Made-up tables: A keeps at most two frames' worth from that
    // neighbour, and passes none of them on.
    assert!(a_known <= 2 + 2 * MAX_SUPERNODE_INFOS, "A knows {a_known}");
    assert!(b_known <= 2, "B was told of made-up supernodes: {b_known}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_for_queries_never_sent_go_nowhere() {
    let _serial = serial().await;
    let (a, b, la, lb) = honest_pair().await;
    let (ca, cb) = (la.client(&[&a]), lb.client(&[&b]));
    let stop = Arc::new(AtomicBool::new(false));
    let plan = Plan {
        flood: false,
        fake_tables: false,
        push_hits: true,
    };
    let hostile = hostile_neighbour("127.0.0.3", a.addr(), plan, stop.clone());
    let linked = wait_for(T, || async { a.neighbours().len() == 2 }).await;
    let during = search_both_ways(&ca, &cb, Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let report = hostile.join().expect("attacker thread");
    println!(
        "{{\"test\":\"unasked_hits\",\"hits_pushed\":{},\"hits_answered\":{},\"honest_ok\":{},\"honest_of\":{},\"polluted\":{},\"p50_ms\":{:.2},\"p95_ms\":{:.2}}}",
        report.hits_pushed,
        report.hits_answered,
        during.ok,
        during.times.len(),
        during.polluted,
        pct(&during.times, 50),
        pct(&during.times, 95),
    );
    assert!(report.linked, "the hostile supernode could not link");
    linked.expect("A counts the hostile supernode as a neighbour");
    assert!(report.hits_pushed > 0, "nothing was pushed");
    assert_eq!(report.hits_answered, 0, "A took pushed hits as a request");
    assert_eq!(during.polluted, 0, "pushed hits reached a leaf");
    assert_eq!(during.ok, during.times.len(), "honest searches failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_takes_promote_and_rehome_only_from_its_own_supernode() {
    let _serial = serial().await;
    let a = supernode().await;
    let leaf = TestLeaf::start_attached(&[&a], &[("alpha tune.mp3", b"alpha tune")], 1).await;
    leaf.wait_indexed(1).await;
    let target = leaf.leaf().addr();
    let identity = Arc::new(Identity::generate().expect("identity"));
    let at: SocketAddr = "127.0.0.4:0".parse().unwrap();
    let ep = Endpoint::bind(identity, at, &[ALPN_MESH]).expect("bind the attacker's address");
    let me = SupernodeInfo {
        id: ep.id(),
        addr: ep.local_addr().unwrap().to_string(),
        leaves: 0,
        max_leaves: 1000,
        age_secs: 0,
    };
    let requests = [
        SupernodeRequest::Rehome(vec![me]),
        SupernodeRequest::Promote { max_leaves: 1000 },
    ];
    let mut outcomes = Vec::new();
    for alpn in [ALPN_LEAF, ALPN_MESH, ALPN_TRANSFER] {
        for req in &requests {
            let outcome = match ep.connect(target, alpn, None).await {
                Err(e) => format!("connect: {e}"),
                Ok(peer) => {
                    let asked = async {
                        let (mut send, mut recv) = peer.conn.open_bi().await.ok()?;
                        net::write_frame(&mut send, req, MAX_REPLY_FRAME)
                            .await
                            .ok()?;
                        let _ = send.finish();
                        // A `LeafReply` would mean the leaf took it.
                        let reply =
                            net::read_first_frame::<GetReply>(&mut recv, MAX_REPLY_FRAME).await;
                        Some(format!("{reply:?}"))
                    };
                    let r = tokio::time::timeout(Duration::from_secs(3), asked).await;
                    let closed = peer.conn.close_reason().map(|r| r.to_string());
                    format!("answer {r:?}, closed {closed:?}")
                }
            };
            outcomes.push(format!("{}: {outcome}", String::from_utf8_lossy(alpn)));
        }
    }
    // Nothing changes: still a leaf, still with A only.
    let moved = wait_for(Duration::from_secs(2), || async {
        leaf.leaf().role().state().is_some() || leaf.leaf().supernodes() != vec![(a.id(), a.addr())]
    })
    .await;
    println!(
        "{{\"test\":\"foreign_supernode_requests\",\"outcomes\":{:?}}}",
        outcomes
    );
    assert!(
        moved.is_err(),
        "the leaf obeyed a supernode it does not serve under"
    );
    for o in &outcomes {
        assert!(!o.contains("Accepted"), "{o}");
    }
    let found = leaf
        .client(&[&a])
        .search(&["alpha".to_string()], 1, Duration::from_secs(5))
        .await
        .expect("search");
    assert!(!found.is_empty(), "the leaf is still served by A");
}

/// What became of one bad filter a hostile neighbour sent.
#[derive(Debug)]
struct FilterAttack {
    linked: bool,
    /// The target closed the connection after it, with this reason.
    closed_with: Option<String>,
}

/// Links to `target` from `ip` as a supernode, sends `frames` on the
/// control stream (after a valid `Status`), and waits for the target to
/// close the connection.
fn send_filters(ip: &str, target: SocketAddr, frames: Vec<MeshControl>) -> FilterAttack {
    let at: SocketAddr = format!("{ip}:0").parse().unwrap();
    elsewhere(async move {
        let mut out = FilterAttack {
            linked: false,
            closed_with: None,
        };
        let Some(Linked {
            ep: _ep,
            conn,
            mut ctl,
            mut ctl_recv,
            ..
        }) = link_as_supernode(at, target).await
        else {
            return out;
        };
        out.linked = true;
        tokio::spawn(async move {
            while let Ok(Some(_)) =
                net::read_frame::<MeshControl>(&mut ctl_recv, MAX_MESH_FRAME).await
            {}
        });
        for f in frames {
            if net::write_frame(&mut ctl, &f, MAX_MESH_FRAME)
                .await
                .is_err()
            {
                break;
            }
        }
        if let Ok(quinn::ConnectionError::ApplicationClosed(c)) =
            tokio::time::timeout(T, conn.closed()).await
        {
            out.closed_with = Some(String::from_utf8_lossy(&c.reason).into_owned());
        }
        out
    })
    .join()
    .expect("attacker thread")
}

fn filter_frame(log2: u8, fill_every: usize) -> MeshControl {
    let mut bits = vec![0u8; (1usize << log2.min(22)) / 8];
    for (i, b) in bits.iter_mut().enumerate() {
        if fill_every > 0 && i % fill_every == 0 {
            *b = 0xff;
        }
    }
    MeshControl::Filter {
        log2,
        bits: FilterBits(bits),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_oversized_filters_drop_only_the_link_they_came_on() {
    let _serial = serial().await;
    let (a, b, la, lb) = honest_pair().await;
    let (ca, cb) = (la.client(&[&a]), lb.client(&[&b]));
    let status = MeshControl::Status {
        leaves: 0,
        max_leaves: 1000,
        known: Vec::new(),
        elected: false,
    };
    let attacks: Vec<(&str, Vec<MeshControl>)> = vec![
        // A size no filter may have: 2^23 bits.
        ("size", vec![status.clone(), filter_frame(23, 0)]),
        // A length that does not match its size.
        (
            "length",
            vec![
                status.clone(),
                MeshControl::Filter {
                    log2: 12,
                    bits: FilterBits(vec![0; 100]),
                },
            ],
        ),
        // Every bit set: "maybe" to every word, to draw every query.
        ("full", vec![status.clone(), filter_frame(16, 1)]),
        // A patch before any filter, then one of more bits than allowed.
        (
            "no filter",
            vec![status.clone(), MeshControl::FilterPatch(vec![1])],
        ),
        (
            "patch",
            vec![
                status.clone(),
                filter_frame(12, 0),
                MeshControl::FilterPatch((0..9000).collect()),
            ],
        ),
        // Updates far faster than an honest neighbour sends them.
        (
            "too fast",
            std::iter::once(status.clone())
                .chain((0..64).map(|_| filter_frame(10, 0)))
                .collect(),
        ),
    ];
    for (last_octet, (what, frames)) in (2u8..).zip(attacks) {
        let ip = format!("127.0.0.{last_octet}");
        let target = a.addr();
        let attack = tokio::task::spawn_blocking(move || send_filters(&ip, target, frames))
            .await
            .expect("attack ran");
        println!(
            "{{\"test\":\"hostile_filter\",\"attack\":\"{what}\",\"linked\":{},\"closed\":{:?}}}",
            attack.linked, attack.closed_with
        );
        assert!(attack.linked, "{what}: the attacker linked first");
        let reason = attack.closed_with.unwrap_or_default();
        assert!(
            reason.contains("filter"),
            "{what}: the link was dropped for its filter, not {reason:?}"
        );
    }
    // The honest link and its searches are untouched.
    assert!(a.neighbours().contains(&b.id()), "A still links to B");
    let after = search_both_ways(&ca, &cb, Duration::from_secs(2)).await;
    assert_eq!(
        after.ok,
        after.times.len(),
        "searches work after the attacks"
    );
}

#[tokio::test]
async fn a_supernode_of_the_old_mesh_version_is_refused_at_the_handshake() {
    let a = supernode().await;
    let identity = Arc::new(Identity::generate().expect("identity"));
    let old: &[u8] = b"servent-mesh/2";
    let ep = Endpoint::bind(identity, "127.0.0.1:0".parse().unwrap(), &[old]).expect("bind");
    let refused = ep.connect(a.addr(), old, None).await;
    let err = match refused {
        Ok(_) => panic!("servent-mesh/2 was let in"),
        Err(e) => e.to_string(),
    };
    println!("{{\"test\":\"old_mesh_version\",\"error\":{err:?}}}");
    assert!(
        err.contains("incompatible protocol or version"),
        "a clear refusal, not {err:?}"
    );
}
