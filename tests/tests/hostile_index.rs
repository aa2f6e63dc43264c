//! Hostile leaves against a supernode's index and query path, speaking the
//! protocol by hand from their own loopback addresses (127.0.0.2 and up;
//! the honest nodes live on the exempt 127.0.0.1): the broadest queries
//! there are at the whole allowance of one address, registrations past the
//! index's per-address cap, and a session frame that never ends. Each test
//! asserts that honest peers are still served and prints its figures as
//! one JSON line.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use servent_net::{self as net, Endpoint, Peer};
use servent_proto::limits::{MAX_REPLY_FRAME, MAX_REQUEST_FRAME, MAX_UPDATE_FRAME};
use servent_proto::msg::{
    ErrorCode, FileEntry, LeafRequest, Query, QueryKind, SessionUpdate, SupernodeReply, ALPN_LEAF,
};
use servent_proto::ContentHash;
use servent_tests::attack::{elsewhere, endpoint_on, p95, serial};
use servent_tests::*;

const T: Duration = Duration::from_secs(10);

/// A registered session, driven by hand.
struct Session {
    peer: Peer,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Session {
    async fn open(from: &Endpoint, to: SocketAddr) -> Self {
        let peer = from.connect(to, ALPN_LEAF, None).await.expect("connect");
        let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
        let register = LeafRequest::Register { listen_port: 9 };
        net::write_frame(&mut send, &register, MAX_REQUEST_FRAME)
            .await
            .unwrap();
        let reply = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME)
            .await
            .unwrap();
        assert!(
            matches!(reply, Some(SupernodeReply::Registered { .. })),
            "{reply:?}"
        );
        Self { peer, send, recv }
    }

    /// Sends one `Add` and reads the answer.
    async fn add(&mut self, files: Vec<FileEntry>) -> Option<SupernodeReply> {
        let update = SessionUpdate::Add(files);
        net::write_frame(&mut self.send, &update, MAX_UPDATE_FRAME)
            .await
            .ok()?;
        net::read_frame::<SupernodeReply>(&mut self.recv, MAX_REPLY_FRAME)
            .await
            .ok()
            .flatten()
    }
}

fn file(n: u32, name: String) -> FileEntry {
    let mut hash = [0u8; 32];
    hash[..4].copy_from_slice(&n.to_le_bytes());
    hash[31] = 0xee;
    FileEntry {
        hash: ContentHash(hash),
        name,
        size: 1,
    }
}

/// Latencies of honest searches for a file only one leaf has, asked in
/// turn by `clients` (each its own node id, within its own query limit),
/// one every 20 ms, and how many found it.
async fn searches(clients: &[Client], n: usize) -> (usize, Vec<Duration>) {
    let mut ok = 0;
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let started = Instant::now();
        let found = clients[i % clients.len()]
            .search(&["bluemoon".to_string()], 10, Duration::from_secs(5))
            .await
            .is_ok_and(|hits| !hits.is_empty());
        times.push(started.elapsed());
        ok += usize::from(found);
    }
    (ok, times)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broadest_queries_at_one_addresss_allowance_leave_honest_searches_fast() {
    let _serial = serial().await;
    // The default query limits, not the local tests' hundredfold ones.
    let default = supernode::Config::default();
    let sn = supernode_with(supernode::Config {
        query_rate: default.query_rate,
        query_burst: default.query_burst,
        ..supernode::Config::localhost()
    })
    .await;
    // 60 000 entries: every name holds "everything", half "even", half
    // "odd": the query "even odd" examines as much as any query can and
    // finds nothing.
    let filler = endpoint_on("127.0.0.1", &[]);
    let mut session = Session::open(&filler, sn.addr()).await;
    for batch in (0..60_000u32).collect::<Vec<_>>().chunks(1024) {
        let files = batch
            .iter()
            .map(|&n| {
                let parity = if n % 2 == 0 { "even" } else { "odd" };
                file(n, format!("everything {parity} {n}.bin"))
            })
            .collect();
        let reply = session.add(files).await;
        assert!(
            matches!(reply, Some(SupernodeReply::Indexed { .. })),
            "{reply:?}"
        );
    }
    let leaf = TestLeaf::start(&[&sn], &[("bluemoon.mp3", b"blue moon")]).await;
    leaf.wait_indexed(1).await;
    let dirs: Vec<tempfile::TempDir> = (0..8).map(|_| tempfile::tempdir().unwrap()).collect();
    let clients: Vec<Client> = dirs
        .iter()
        .map(|dir| Client::new(dir.path(), vec![sn.addr().to_string()]).unwrap())
        .collect();
    let (normal_ok, normal) = searches(&clients, 60).await;
    assert_eq!(normal_ok, 60);

    // Eight node ids at 127.0.0.2, asking "even odd" as fast as answers
    // come, for as long as the honest searches run.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let target = sn.addr();
    let attack = elsewhere(async move {
        let mut answered = 0u32;
        let mut refused = 0u32;
        let mut peers = Vec::new();
        for _ in 0..8 {
            peers.push(
                endpoint_on("127.0.0.2", &[])
                    .connect(target, ALPN_LEAF, None)
                    .await
                    .unwrap(),
            );
        }
        let started = Instant::now();
        'attack: while !*stopped.borrow() && started.elapsed() < Duration::from_secs(60) {
            for peer in &peers {
                let Ok((mut send, mut recv)) = peer.conn.open_bi().await else {
                    break 'attack;
                };
                let q = LeafRequest::Query(Query {
                    kind: QueryKind::Keywords(vec!["even".into(), "odd".into()]),
                    max_results: 500,
                });
                if net::write_frame(&mut send, &q, MAX_REQUEST_FRAME)
                    .await
                    .is_err()
                {
                    break 'attack;
                }
                let _ = send.finish();
                match net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME).await {
                    Ok(Some(SupernodeReply::Error(e))) if e.code == ErrorCode::RateLimited => {
                        refused += 1
                    }
                    _ => answered += 1,
                }
            }
        }
        (answered, refused, started.elapsed())
    });
    let (ok, during) = searches(&clients, 150).await;
    let _ = stop.send(true);
    let (answered, refused, took) = attack.join().unwrap();
    println!(
        "{{\"test\":\"broad_queries\",\"index_entries\":60000,\"attacker_answered_per_s\":{:.1},\"attacker_refused\":{refused},\"honest_ok\":{ok},\"honest_of\":150,\"p95_normal_ms\":{:.2},\"p95_attack_ms\":{:.2}}}",
        f64::from(answered) / took.as_secs_f64(),
        p95(&normal).as_secs_f64() * 1e3,
        p95(&during).as_secs_f64() * 1e3,
    );
    // 80 tokens a second for the address, 11 a query: about 7 a second.
    assert!(
        f64::from(answered) / took.as_secs_f64() < 20.0,
        "the attacker got {answered} broad queries answered in {took:?}"
    );
    assert!(
        ok * 100 >= 150 * 99,
        "only {ok} of 150 honest searches found the file"
    );
    assert!(
        p95(&during) <= p95(&normal) * 2 + Duration::from_millis(25),
        "honest p95 {:?} under attack, {:?} before",
        p95(&during),
        p95(&normal)
    );
}

#[tokio::test]
async fn one_address_cannot_fill_the_index_by_making_ids() {
    let _serial = serial().await;
    let cap = 5_000;
    let sn = supernode_with(supernode::Config {
        max_index_entries_per_ip: cap,
        ..supernode::Config::localhost()
    })
    .await;
    // Fresh ids at 127.0.0.3, each adding batches until refused.
    let mut indexed = 0;
    let mut refusal = None;
    let mut n = 0u32;
    let mut kept = Vec::new();
    'ids: for _ in 0..20 {
        let mut session = Session::open(&endpoint_on("127.0.0.3", &[]), sn.addr()).await;
        for _ in 0..2 {
            let files = (0..1000).map(|_| {
                n += 1;
                file(n, format!("spam {n}"))
            });
            match session.add(files.collect()).await {
                Some(SupernodeReply::Indexed { files }) => indexed = indexed.max(files),
                Some(SupernodeReply::Error(e)) => {
                    refusal = Some(e);
                    break 'ids;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // Kept: its entries stay while it lives.
        kept.push(session);
    }
    let refusal = refusal.expect("the address's cap was never reached");
    let entries = sn.state().index().entry_count();
    // An honest leaf elsewhere still gets its files indexed.
    let leaf = TestLeaf::start(&[&sn], &[("bluemoon.mp3", b"blue moon")]).await;
    leaf.wait_indexed(1).await;
    println!(
        "{{\"test\":\"index_per_address\",\"cap\":{cap},\"entries_from_attacker\":{entries},\"refusal\":{:?}}}",
        refusal.to_string()
    );
    assert_eq!(refusal.code, ErrorCode::LimitExceeded, "{refusal}");
    assert!(entries <= cap, "{entries} entries from one address");
}

#[tokio::test]
async fn a_session_frame_that_never_ends_closes_its_connection() {
    let _serial = serial().await;
    let sn = supernode().await;
    let mut session = Session::open(&endpoint_on("127.0.0.4", &[]), sn.addr()).await;
    // A header announcing 1 000 bytes, and 10 of them.
    session
        .send
        .write_all(&[
            0, 0, 3, 0xe8, 0x81, 0xa3, b'A', b'd', b'd', 0x91, 0x94, 0, 0, 0,
        ])
        .await
        .unwrap();
    let started = Instant::now();
    let closed = tokio::time::timeout(net::FRAME_TIMEOUT + T, session.peer.conn.closed()).await;
    println!(
        "{{\"test\":\"truncated_session_frame\",\"closed_after_ms\":{}}}",
        started.elapsed().as_millis()
    );
    let reason = closed.expect("the connection was never closed");
    assert!(
        started.elapsed() >= net::FRAME_TIMEOUT - Duration::from_secs(1),
        "closed early: {reason}"
    );
}
