//! Hits that an attacker cannot poison: a real supernode, honest leaves on
//! 127.0.0.1, and an attacker on 127.0.0.2 whose node id sorts before
//! theirs (in version 1 of the protocol that alone chose the name and the
//! size everyone saw). The attacker registers the honest content under a
//! lying name, or a wrong size, and serves lies; searches must show the
//! honest name first, downloads must complete verified from the honest
//! sources, and whoever is blamed must be the attacker. A last test hands
//! a downloader a hit that names one victim address many times.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use servent_net::{self as net, Endpoint, Identity};
use servent_proto::limits::{
    MAX_REPLY_FRAME, MAX_REQUEST_FRAME, MAX_TRANSFER_FRAME, MAX_UPDATE_FRAME,
};
use servent_proto::msg::{
    FileEntry, GetReply, GetRequest, LeafRequest, SessionUpdate, Source, SupernodeReply, ALPN_LEAF,
    ALPN_TRANSFER,
};
use servent_proto::{ContentHash, NodeId};
use servent_tests::*;

const T: Duration = Duration::from_secs(10);
/// 300 001 bytes: two ranges, so that 300 000 has as many and only the
/// last range's bytes can tell them apart.
const SIZE: usize = 300_001;
const HONEST_NAME: &str = "bluemoon.mp3";
const LYING_NAME: &str = "bluemoon LYING NAME.exe";

/// An identity whose node id sorts before every one of `others`
/// (bounded: one in three tries succeeds against two random ids).
fn identity_below(others: &[NodeId]) -> Identity {
    let min = others.iter().min().copied().expect("some ids");
    for _ in 0..10_000 {
        let id = Identity::generate().expect("identity");
        if id.id() < min {
            return id;
        }
    }
    panic!("no id below {min} in 10 000 keys");
}

/// What the attacker serves on `servent-xfer/3`.
#[derive(Clone, Copy)]
enum Lie {
    /// The true size and layer, and garbage for content.
    Garbage,
    /// This size, the true layer (it is public), and the true bytes cut
    /// to fit that size.
    Size(u64),
}

/// A hostile leaf on 127.0.0.2: registered at a supernode with `entries`,
/// serving `content` as `lie` says. Dropped: gone.
struct Attacker {
    id: NodeId,
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Attacker {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Binds `ip:0` for `servent-xfer/3`; `None` (and a note) if this machine
/// has no such loopback address.
fn bind_on(identity: Identity, ip: [u8; 4]) -> Option<Endpoint> {
    match Endpoint::bind(
        Arc::new(identity),
        SocketAddr::from((ip, 0)),
        &[ALPN_TRANSFER],
    ) {
        Ok(e) => Some(e),
        Err(e) => {
            println!("skipped: cannot bind {ip:?}: {e}");
            None
        }
    }
}

async fn attacker(
    sn: &Supernode,
    identity: Identity,
    entries: Vec<FileEntry>,
    content: Vec<u8>,
    lie: Lie,
) -> Option<Attacker> {
    let id = identity.id();
    let endpoint = bind_on(identity, [127, 0, 0, 2])?;
    let addr = endpoint.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));

    // Register from 127.0.0.2 like any leaf, announcing what it likes.
    let peer = endpoint.connect(sn.addr(), ALPN_LEAF, None).await.unwrap();
    let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
    let register = LeafRequest::Register {
        listen_port: addr.port(),
    };
    net::write_frame(&mut send, &register, MAX_REQUEST_FRAME)
        .await
        .unwrap();
    let reply = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME).await;
    assert!(
        matches!(reply, Ok(Some(SupernodeReply::Registered { .. }))),
        "{reply:?}"
    );
    let n = entries.len() as u32;
    net::write_frame(&mut send, &SessionUpdate::Add(entries), MAX_UPDATE_FRAME)
        .await
        .unwrap();
    let reply = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME).await;
    assert!(
        matches!(reply, Ok(Some(SupernodeReply::Indexed { files })) if files == n),
        "{reply:?}"
    );
    // The session lives as long as the attacker: keep its streams.
    let session = tokio::spawn(async move {
        let _keep = (peer, send);
        while let Ok(Some(_)) = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME).await
        {
        }
    });

    let (_, layer) = leaf::layer::hash_reader(&content[..], content.len() as u64).unwrap();
    let layer = leaf::layer::to_bytes(&layer);
    let served = requests.clone();
    let server = tokio::spawn(async move {
        while let Some(incoming) = endpoint.quinn().accept().await {
            let Ok(peer) = net::accept(incoming).await else {
                continue;
            };
            let (content, layer, served) = (content.clone(), layer.clone(), served.clone());
            tokio::spawn(async move {
                while let Ok((mut send, mut recv)) = peer.conn.accept_bi().await {
                    served.fetch_add(1, Ordering::SeqCst);
                    let Ok(Some(req)) =
                        net::read_first_frame::<GetRequest>(&mut recv, MAX_TRANSFER_FRAME).await
                    else {
                        continue;
                    };
                    let size = match lie {
                        Lie::Garbage => content.len() as u64,
                        Lie::Size(s) => s,
                    };
                    let (reply, tail) = match req {
                        GetRequest::Have(_) => (
                            GetReply::Ranges {
                                size,
                                partial: false,
                            },
                            Vec::new(),
                        ),
                        GetRequest::Layer(_) => (
                            GetReply::Ranges {
                                size,
                                partial: false,
                            },
                            layer.clone(),
                        ),
                        GetRequest::Range(r) => {
                            let end = r.length.map_or(size, |l| r.offset + l).min(size);
                            let start = r.offset.min(end);
                            let bytes = match lie {
                                Lie::Garbage => vec![0x55; (end - start) as usize],
                                Lie::Size(_) => {
                                    let e = (end as usize).min(content.len());
                                    content[(start as usize).min(e)..e].to_vec()
                                }
                            };
                            let length = bytes.len() as u64;
                            (GetReply::Ok { size, length }, bytes)
                        }
                    };
                    let _ = net::write_frame(&mut send, &reply, MAX_TRANSFER_FRAME).await;
                    let _ = send.write_all(&tail).await;
                    let _ = send.finish();
                }
            });
        }
    });
    Some(Attacker {
        id,
        addr,
        requests,
        tasks: vec![session, server],
    })
}

/// A supernode, two honest leaves sharing `content` as HONEST_NAME, and a
/// downloader leaf; waits until both honest sources are indexed.
async fn honest_network(content: &[u8]) -> (Supernode, TestLeaf, TestLeaf, TestLeaf) {
    let sn = supernode().await;
    let files: &[(&str, &[u8])] = &[(HONEST_NAME, content)];
    let a = TestLeaf::start(&[&sn], files).await;
    let b = TestLeaf::start(&[&sn], files).await;
    a.wait_indexed(1).await;
    b.wait_indexed(1).await;
    let d = TestLeaf::start(&[&sn], &[]).await;
    (sn, a, b, d)
}

async fn wait_sources(client: &Client, hash: ContentHash, n: usize) {
    wait_for(T, || async {
        client
            .locate(hash, T)
            .await
            .ok()
            .flatten()
            .is_some_and(|h| h.sources.len() == n)
    })
    .await
    .unwrap_or_else(|_| panic!("{n} sources are not found"));
}

#[tokio::test]
async fn a_lying_name_from_the_lowest_id_is_not_what_anyone_sees() {
    init_tracing();
    let content = random_bytes(SIZE, 31);
    let hash = hash_of(&content);
    let (sn, a, b, d) = honest_network(&content).await;
    let honest = [a.leaf().id(), b.leaf().id()];
    // A second file only the attacker has, named to be found by the same word.
    let fake = random_bytes(1000, 32);
    let entries = vec![
        FileEntry {
            hash,
            name: LYING_NAME.into(),
            size: SIZE as u64,
        },
        FileEntry {
            hash: hash_of(&fake),
            name: "bluemoon only mine.exe".into(),
            size: fake.len() as u64,
        },
    ];
    let Some(evil) = attacker(
        &sn,
        identity_below(&honest),
        entries,
        content.clone(),
        Lie::Garbage,
    )
    .await
    else {
        return;
    };
    assert!(honest.iter().all(|h| evil.id < *h));
    let client = d.client(&[&sn]);
    wait_sources(&client, hash, 3).await;

    let hits = client.search(&["bluemoon".into()], 10, T).await.unwrap();
    assert_eq!(hits.len(), 2, "{hits:?}");
    // The shared file ranks first, under the name its two sources give it.
    assert_eq!(hits[0].hash, hash);
    assert_eq!(hits[0].name(), HONEST_NAME);
    assert_eq!(hits[0].size(), SIZE as u64);
    assert_eq!(hits[0].sources.len(), 3);
    assert_eq!(hits[0].names[1].name, LYING_NAME, "the lie is listed, last");
    assert_eq!(hits[1].name(), "bluemoon only mine.exe");
    println!(
        "hostile_hits: lying name: shown {:?} (2 sources) over {:?} (1 source, lowest id)",
        hits[0].name(),
        hits[0].names[1].name
    );

    // Without --out the download is named as most sources say, and
    // completes verified although the attacker sends garbage.
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = dir.path().join(safe(hits[0].name()));
    let (path, done) = client.download(hash, Some(&out), T, None).await.unwrap();
    let took = started.elapsed();
    assert_eq!(std::fs::read(&path).unwrap(), content);
    assert!(
        done.dropped.iter().all(|x| x.id == evil.id),
        "only the attacker is blamed: {:?}",
        done.dropped
    );
    let located = client.locate(hash, T).await.unwrap().unwrap();
    let target = leaf::safe_file_name(located.name()).unwrap();
    assert_eq!(target, HONEST_NAME);
    println!(
        "hostile_hits: lying name: get ok={} in {:.0} ms, {} bytes, dropped {:?}, attacker asked {} times",
        path.exists(),
        took.as_secs_f64() * 1000.0,
        done.size,
        done.dropped.iter().map(|x| x.to_string()).collect::<Vec<_>>(),
        evil.requests.load(Ordering::SeqCst)
    );
}

fn safe(name: &str) -> String {
    leaf::safe_file_name(name).expect("a safe name")
}

#[tokio::test]
async fn a_wrong_size_does_not_make_the_honest_sources_look_like_liars() {
    init_tracing();
    let content = random_bytes(SIZE, 41);
    let hash = hash_of(&content);
    let (sn, a, b, d) = honest_network(&content).await;
    let honest = [a.leaf().id(), b.leaf().id()];
    let wrong = SIZE as u64 - 1;
    let entries = vec![FileEntry {
        hash,
        name: LYING_NAME.into(),
        size: wrong,
    }];
    let Some(evil) = attacker(
        &sn,
        identity_below(&honest),
        entries,
        content.clone(),
        Lie::Size(wrong),
    )
    .await
    else {
        return;
    };
    let client = d.client(&[&sn]);
    wait_sources(&client, hash, 3).await;
    let hit = client.locate(hash, T).await.unwrap().unwrap();
    assert_eq!(hit.size(), SIZE as u64, "{hit:?}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bin");
    let started = Instant::now();
    let (path, done) = client.download(hash, Some(&out), T, None).await.unwrap();
    let took = started.elapsed();
    assert_eq!(std::fs::read(&path).unwrap(), content);
    assert_eq!(done.size, SIZE as u64);
    // The attacker is named, by id and address, and nobody else.
    assert_eq!(done.dropped.len(), 1, "{:?}", done.dropped);
    let blamed = &done.dropped[0];
    assert_eq!(blamed.id, evil.id);
    assert_eq!(blamed.addr, evil.addr.to_string());
    let line = blamed.to_string();
    assert!(line.contains(&evil.id.to_string()) && line.contains(&evil.addr.to_string()));
    assert!(line.contains(&wrong.to_string()), "{line}");
    for h in honest {
        assert!(!line.contains(&h.to_string()));
    }
    println!(
        "hostile_hits: wrong size: get ok={} in {:.0} ms, {} bytes; blamed: {line}",
        path.exists(),
        took.as_secs_f64() * 1000.0,
        done.size,
    );

    // Only the attacker left: its size cannot be proven, and the error
    // says who lied.
    drop((a, b));
    let only = [Source {
        id: evil.id,
        addr: evil.addr.to_string(),
        variant: 0,
        via: None,
    }];
    let out = dir.path().join("y.bin");
    let err = leaf::transfer::download(client.endpoint(), hash, &only, &out, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&evil.id.to_string()), "{err}");
    assert!(!out.exists());
    println!("hostile_hits: wrong size, attacker alone: error: {err}");
}

#[tokio::test]
async fn one_address_named_many_times_is_dialled_once() {
    init_tracing();
    let content = random_bytes(3000, 51);
    let hash = hash_of(&content);
    let sn = supernode().await;
    let honest = TestLeaf::start(&[&sn], &[("small.bin", &content)]).await;
    honest.wait_indexed(1).await;

    // The victim: a QUIC server on 127.0.0.3 that counts handshakes.
    let Some(victim) = bind_on(Identity::generate().unwrap(), [127, 0, 0, 3]) else {
        return;
    };
    let victim_addr = victim.local_addr().unwrap();
    let dials = Arc::new(AtomicUsize::new(0));
    let counted = dials.clone();
    let victim_task = tokio::spawn(async move {
        while let Some(incoming) = victim.quinn().accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(net::accept(incoming));
        }
    });
    // And 64 silent ports on 127.0.0.4, counting datagrams.
    let silent: Vec<UdpSocket> = (0..64)
        .map_while(|_| UdpSocket::bind("127.0.0.4:0").ok())
        .collect();
    if silent.len() < 64 {
        println!("skipped: cannot bind 127.0.0.4");
        return;
    }
    for s in &silent {
        s.set_nonblocking(true).unwrap();
    }

    // A hit as a hostile supernode would make it: the honest source, then
    // 64 fake ids at the victim's address and 64 at ports of one machine.
    let fake_id = |i: u8, j: u8| {
        NodeId([
            i, j, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
            7, 7, 7,
        ])
    };
    let mut sources = vec![Source {
        id: honest.leaf().id(),
        addr: honest.leaf().addr().to_string(),
        variant: 0,
        via: None,
    }];
    for i in 0..64u8 {
        sources.push(Source {
            id: fake_id(1, i),
            addr: victim_addr.to_string(),
            variant: 0,
            via: None,
        });
    }
    for (i, s) in silent.iter().enumerate() {
        sources.push(Source {
            id: fake_id(2, i as u8),
            addr: s.local_addr().unwrap().to_string(),
            variant: 0,
            via: None,
        });
    }
    let d = TestLeaf::start(&[&sn], &[]).await;
    let client = d.client(&[&sn]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("small.bin");
    let started = Instant::now();
    let done = leaf::transfer::download(client.endpoint(), hash, &sources, &out, None)
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(std::fs::read(&out).unwrap(), content);
    // Let the dials still in the air land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim_dials = dials.load(Ordering::SeqCst);
    let mut ports_hit = 0;
    let mut datagrams = 0;
    let mut bytes = 0;
    let mut buf = [0u8; 2048];
    for s in &silent {
        let mut any = false;
        while let Ok(n) = s.recv(&mut buf) {
            any = true;
            datagrams += 1;
            bytes += n;
        }
        ports_hit += any as usize;
    }
    victim_task.abort();
    println!(
        "hostile_hits: one address x64 and one IP x64 in a {}-byte hit's {} sources: \
         get ok in {:.0} ms; victim address dialled {victim_dials} time(s); \
         {ports_hit} of 64 ports at one IP dialled, {datagrams} datagrams, {bytes} bytes",
        content.len(),
        sources.len(),
        took.as_secs_f64() * 1000.0,
    );
    assert!(victim_dials <= 1, "{victim_dials}");
    assert!(
        ports_hit <= leaf::transfer::MAX_DIALS_PER_HOST,
        "{ports_hit} ports dialled"
    );
    assert_eq!(done.size, content.len() as u64);
}
