//! One supernode and a few leaves on 127.0.0.1, all in this process, with
//! real QUIC, real files and real hashes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use servent_net::{self as net, ConnectError, Endpoint, Identity};
use servent_proto::limits::{MAX_REPLY_FRAME, MAX_TRANSFER_FRAME};
use servent_proto::msg::{
    ErrorCode, GetReply, GetRequest, LeafRequest, QueryKind, RangeRequest, Source, SupernodeReply,
};
use servent_proto::msg::{ALPN_LEAF, ALPN_TRANSFER};
use servent_proto::ContentHash;
use servent_tests::*;

const T: Duration = Duration::from_secs(5);

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

/// A bare endpoint with a fresh identity, for speaking the protocol by hand.
fn raw_endpoint() -> Endpoint {
    let id = Arc::new(Identity::generate().unwrap());
    Endpoint::client(id, SocketAddr::from(([127, 0, 0, 1], 0))).unwrap()
}

#[tokio::test]
async fn keyword_search_finds_the_files_of_other_leaves() {
    init_tracing();
    let sn = supernode().await;
    let a = TestLeaf::start(
        &[&sn],
        &[("Blue Moon.mp3", b"moon"), ("notes/todo.txt", b"todo")],
    )
    .await;
    let b = TestLeaf::start(&[&sn], &[("blue_sky.ogg", b"sky")]).await;
    let c = TestLeaf::start(&[&sn], &[]).await;
    a.wait_indexed(2).await;
    b.wait_indexed(1).await;

    let client = c.client(&[&sn]);
    let hits = client.search(&words("blue"), 100, T).await.unwrap();
    let mut names: Vec<_> = hits.iter().map(|h| h.name()).collect();
    names.sort();
    assert_eq!(names, ["Blue Moon.mp3", "blue_sky.ogg"]);

    let hits = client.search(&words("MOON blue"), 100, T).await.unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].hash, hash_of(b"moon"));
    assert_eq!(hits[0].size(), 4);
    assert_eq!(hits[0].sources.len(), 1);
    assert_eq!(hits[0].sources[0].id, a.leaf().id());
    assert_eq!(hits[0].sources[0].addr, a.leaf().addr().to_string());

    // Files in subfolders are found by their own name.
    assert_eq!(
        client.search(&words("todo"), 100, T).await.unwrap().len(),
        1
    );
    assert!(client
        .search(&words("nothing here"), 100, T)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn hash_search_finds_every_source_and_get_returns_identical_bytes() {
    let content = random_bytes(3 << 20, 1);
    let sn = supernode().await;
    let a = TestLeaf::start(&[&sn], &[("film.mkv", &content)]).await;
    let b = TestLeaf::start(&[&sn], &[("copy of film.mkv", &content)]).await;
    let c = TestLeaf::start(&[&sn], &[]).await;
    a.wait_indexed(1).await;
    b.wait_indexed(1).await;

    let client = c.client(&[&sn]);
    let hash = hash_of(&content);
    let hit = client.locate(hash, T).await.unwrap().expect("found");
    let mut ids: Vec<_> = hit.sources.iter().map(|s| s.id).collect();
    ids.sort();
    let mut want = vec![a.leaf().id(), b.leaf().id()];
    want.sort();
    assert_eq!(ids, want);

    let out = c.share.path().join("downloaded.mkv");
    let path = client.get(hash, Some(&out), T).await.unwrap();
    assert_eq!(path, out);
    assert_eq!(std::fs::read(&out).unwrap(), content);
    assert!(
        !leaf::transfer::part_path(&out).exists(),
        "no partial file left behind"
    );
}

#[tokio::test]
async fn a_leaf_that_disconnects_disappears_from_results() {
    let sn = supernode().await;
    let mut a = TestLeaf::start(&[&sn], &[("vanishing.txt", b"bye")]).await;
    let c = TestLeaf::start(&[&sn], &[]).await;
    a.wait_indexed(1).await;
    let client = c.client(&[&sn]);
    assert_eq!(
        client
            .search(&words("vanishing"), 10, T)
            .await
            .unwrap()
            .len(),
        1
    );

    a.stop().await;
    wait_for(T, || async {
        client
            .search(&words("vanishing"), 10, T)
            .await
            .unwrap()
            .is_empty()
    })
    .await
    .expect("the gone leaf's file is no longer found");
    assert_eq!(sn.file_count(), 0);
    assert_eq!(sn.leaf_count(), 1);
}

#[tokio::test]
async fn files_added_and_removed_while_serving_are_noticed() {
    let sn = supernode().await;
    let a = TestLeaf::start(&[&sn], &[("first.txt", b"1")]).await;
    let c = TestLeaf::start(&[&sn], &[]).await;
    a.wait_indexed(1).await;
    let client = c.client(&[&sn]);

    std::fs::write(a.share_path("second.txt"), b"2").unwrap();
    wait_for(Duration::from_secs(10), || async {
        client.search(&words("second"), 10, T).await.unwrap().len() == 1
    })
    .await
    .expect("a new file is announced");

    std::fs::remove_file(a.share_path("first.txt")).unwrap();
    wait_for(Duration::from_secs(10), || async {
        client
            .search(&words("first"), 10, T)
            .await
            .unwrap()
            .is_empty()
    })
    .await
    .expect("a removed file is withdrawn");

    // A changed file is announced under its new hash only.
    std::fs::write(a.share_path("second.txt"), b"two").unwrap();
    wait_for(Duration::from_secs(10), || async {
        let hits = client.search(&words("second"), 10, T).await.unwrap();
        hits.len() == 1 && hits[0].hash == hash_of(b"two")
    })
    .await
    .expect("a changed file is rehashed");
}

#[tokio::test]
async fn a_leaf_back_from_another_address_is_the_same_node() {
    let sn = supernode().await;
    let mut a = TestLeaf::start(&[&sn], &[("roaming.txt", b"roam")]).await;
    let c = TestLeaf::start(&[&sn], &[]).await;
    a.wait_indexed(1).await;
    let (id, old_addr) = (a.leaf().id(), a.leaf().addr());

    a.restart(&[&sn]).await;
    a.wait_indexed(1).await;
    assert_eq!(a.leaf().id(), id);
    let new_addr = a.leaf().addr();
    assert_ne!(new_addr, old_addr);

    let client = c.client(&[&sn]);
    wait_for(T, || async {
        let hits = client.search(&words("roaming"), 10, T).await.unwrap();
        hits.len() == 1
            && hits[0].sources.len() == 1
            && hits[0].sources[0].addr == new_addr.to_string()
    })
    .await
    .expect("one source, at the new address");
    assert_eq!(
        hits_sources(&client, "roaming").await,
        vec![(id, new_addr.to_string())]
    );
}

async fn hits_sources(client: &Client, word: &str) -> Vec<(servent_proto::NodeId, String)> {
    let hits = client.search(&words(word), 10, T).await.unwrap();
    hits.iter()
        .flat_map(|h| h.sources.iter().map(|s| (s.id, s.addr.clone())))
        .collect()
}

#[tokio::test]
async fn a_node_cannot_refill_its_query_limit_by_reconnecting() {
    let sn = supernode_with(supernode::Config {
        query_rate: 0.5,
        query_burst: 3,
        ..supernode::Config::localhost()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    // Each search is a connection of its own, as each `leaf search` is.
    for _ in 0..3 {
        let client = Client::new(dir.path(), vec![sn.addr().to_string()]).unwrap();
        client.search(&words("anything"), 10, T).await.unwrap();
    }
    let client = Client::new(dir.path(), vec![sn.addr().to_string()]).unwrap();
    let err = client.search(&words("anything"), 10, T).await.unwrap_err();
    assert!(err.to_string().contains("RateLimited"), "{err}");
    // Another node is not held back by it.
    let other = tempfile::tempdir().unwrap();
    let client = Client::new(other.path(), vec![sn.addr().to_string()]).unwrap();
    client.search(&words("anything"), 10, T).await.unwrap();
}

#[tokio::test]
async fn an_ipv6_network_is_searched_and_downloaded_from_by_the_one_shot_client() {
    let v6: std::net::SocketAddr = "[::1]:0".parse().unwrap();
    if let Err(e) = std::net::UdpSocket::bind(v6) {
        // A host (or container) without IPv6: nothing to test here.
        eprintln!("skipped: no IPv6 loopback ({e})");
        return;
    }
    let sn = supernode_with(supernode::Config {
        listen: v6,
        ..supernode::Config::localhost()
    })
    .await;
    let data = tempfile::tempdir().unwrap();
    let share = tempfile::tempdir().unwrap();
    std::fs::write(share.path().join("six.txt"), b"over IPv6").unwrap();
    let source = Leaf::spawn(leaf::Config {
        listen: v6,
        ..leaf::Config::localhost(data.path(), share.path(), vec![sn.addr().to_string()])
    })
    .await
    .unwrap();
    wait_for(T, || async { source.indexed() == vec![1] })
        .await
        .expect("indexed over IPv6");

    // `leaf search`/`get`'s client: one socket for both families.
    let me = tempfile::tempdir().unwrap();
    let client = Client::new(me.path(), vec![sn.addr().to_string()]).unwrap();
    let hits = client.search(&words("six"), 10, T).await.unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].sources[0].addr, source.addr().to_string());
    assert!(hits[0].sources[0].addr.starts_with("[::1]:"));
    let out = me.path().join("six.txt");
    client
        .get(hash_of(b"over IPv6"), Some(&out), T)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"over IPv6");
}

#[tokio::test]
async fn dead_supernodes_first_in_the_list_do_not_use_up_the_search() {
    let sn = supernode().await;
    let a = TestLeaf::start(&[&sn], &[("lighthouse.flac", b"beam")]).await;
    a.wait_indexed(1).await;
    // Stale entries: sockets that never answer, as a vanished host.
    let dead: Vec<std::net::UdpSocket> = (0..6)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    let mut list: Vec<String> = dead
        .iter()
        .map(|s| s.local_addr().unwrap().to_string())
        .collect();
    list.push(sn.addr().to_string());
    let me = tempfile::tempdir().unwrap();
    let client = Client::new(me.path(), list).unwrap();
    // Two groups of three dead ones, then the live one, within the
    // default 5 s search time.
    let started = std::time::Instant::now();
    let hits = client
        .search(&words("lighthouse"), 10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(hits.len(), 1, "found through the live supernode");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_peer_whose_key_does_not_match_the_expected_id_is_refused() {
    let sn = supernode().await;
    let a = TestLeaf::start(&[&sn], &[("x.bin", b"xx")]).await;
    let c = TestLeaf::start(&[&sn], &[]).await;
    a.wait_indexed(1).await;

    let impostor_id = Identity::generate().unwrap().id();
    let err = raw_endpoint()
        .connect(a.leaf().addr(), ALPN_TRANSFER, Some(impostor_id))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::UnexpectedPeer { got, .. } if got == a.leaf().id()),
        "{err}"
    );

    // A source named with the wrong id is not downloaded from.
    let client = c.client(&[&sn]);
    let out = c.share.path().join("x.bin");
    let sources = [Source {
        id: impostor_id,
        addr: a.leaf().addr().to_string(),
        variant: 0,
        via: None,
    }];
    let err = leaf::transfer::download(client.endpoint(), hash_of(b"xx"), &sources, &out, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not the expected"), "{err}");
    assert!(!out.exists());
}

#[tokio::test]
async fn a_peer_speaking_another_protocol_version_gets_a_clear_error() {
    let sn = supernode().await;
    let err = raw_endpoint()
        .connect(sn.addr(), b"servent-leaf/999", None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::ProtocolMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("servent-leaf/999"), "{err}");
}

#[tokio::test]
async fn a_source_serving_wrong_bytes_never_produces_a_file() {
    let content = random_bytes(1 << 20, 7);
    let sn = supernode().await;
    let a = TestLeaf::start(&[&sn], &[("song.flac", &content)]).await;
    let c = TestLeaf::start(&[&sn], &[]).await;
    a.wait_indexed(1).await;

    // Corrupt the file on disk after it was hashed, keeping size and mtime,
    // so the source still believes it serves the announced content.
    let path = a.share_path("song.flac");
    let mtime = filetime::FileTime::from_last_modification_time(&std::fs::metadata(&path).unwrap());
    let mut bad = content.clone();
    bad[500_000] ^= 0xff;
    std::fs::write(&path, &bad).unwrap();
    filetime::set_file_mtime(&path, mtime).unwrap();

    let client = c.client(&[&sn]);
    let out = c.share.path().join("song.flac");
    let err = client
        .get(hash_of(&content), Some(&out), T)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("hash mismatch"), "{err}");
    assert!(!out.exists(), "nothing at the target");
    // The ranges before the bad one verified and are kept to resume from;
    // the bad range never reached the disk.
    if let Ok(part) = std::fs::read(leaf::transfer::part_path(&out)) {
        assert_ne!(part[500_000], bad[500_000], "bad bytes are not kept");
    }
}

#[tokio::test]
async fn a_partial_file_without_state_is_not_trusted() {
    let content = random_bytes(2 << 20, 3);
    let sn = supernode().await;
    let a = TestLeaf::start(&[&sn], &[("big.iso", &content)]).await;
    let c = TestLeaf::start(&[&sn], &[]).await;
    a.wait_indexed(1).await;
    let client = c.client(&[&sn]);
    let out = c.share.path().join("big.iso");

    // A partial file without its state of verified ranges is not trusted:
    // garbage there costs a fresh start, never a wrong file.
    std::fs::write(leaf::transfer::part_path(&out), vec![0x55; 1_234_567]).unwrap();
    client.get(hash_of(&content), Some(&out), T).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), content);
    assert!(!leaf::transfer::part_path(&out).exists());
}

#[tokio::test]
async fn a_source_serves_only_what_it_announced() {
    let sn = supernode().await;
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), b"top secret").unwrap();
    let a = TestLeaf::start(&[&sn], &[("public.txt", b"public")]).await;
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), a.share_path("link.txt"))
        .unwrap();
    a.wait_indexed(1).await;
    // Give the watcher a chance to (wrongly) pick the link up.
    tokio::time::sleep(Duration::from_millis(700)).await;
    a.wait_indexed(1).await;

    let ep = raw_endpoint();
    let peer = ep
        .connect(a.leaf().addr(), ALPN_TRANSFER, Some(a.leaf().id()))
        .await
        .unwrap();
    let ask = |hash: ContentHash, offset: u64| {
        let conn = peer.conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            net::write_frame(
                &mut send,
                &GetRequest::Range(RangeRequest {
                    hash,
                    offset,
                    length: None,
                }),
                MAX_TRANSFER_FRAME,
            )
            .await
            .unwrap();
            send.finish().unwrap();
            net::read_frame::<GetReply>(&mut recv, MAX_TRANSFER_FRAME)
                .await
                .unwrap()
                .unwrap()
        }
    };
    // Outside the share, through a link: not served.
    assert!(
        matches!(ask(hash_of(b"top secret"), 0).await, GetReply::Error(e) if e.code == ErrorCode::NotFound)
    );
    // Never announced at all.
    assert!(
        matches!(ask(ContentHash([9; 32]), 0).await, GetReply::Error(e) if e.code == ErrorCode::NotFound)
    );
    // A range past the end.
    assert!(
        matches!(ask(hash_of(b"public"), 7).await, GetReply::Error(e) if e.code == ErrorCode::BadRequest)
    );
    // A range within it.
    assert_eq!(
        ask(hash_of(b"public"), 2).await,
        GetReply::Ok { size: 6, length: 4 }
    );
}

#[tokio::test]
async fn hostile_frames_close_only_their_own_stream() {
    let sn = supernode().await;
    let a = TestLeaf::start(&[&sn], &[("survivor.txt", b"alive")]).await;
    a.wait_indexed(1).await;

    let ep = raw_endpoint();
    let peer = ep
        .connect(sn.addr(), ALPN_LEAF, Some(sn.id()))
        .await
        .unwrap();
    // A frame that claims 4 GiB: refused before anything is allocated.
    let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
    send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let reply = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME)
        .await
        .unwrap();
    assert!(matches!(reply, Some(SupernodeReply::Error(e)) if e.code == ErrorCode::BadRequest));
    // Garbage MessagePack.
    let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
    send.write_all(&[0, 0, 0, 3, 0xc1, 0xc1, 0xc1])
        .await
        .unwrap();
    let reply = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME)
        .await
        .unwrap();
    assert!(matches!(reply, Some(SupernodeReply::Error(e)) if e.code == ErrorCode::BadRequest));

    // The same connection still answers well-formed queries...
    let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
    let q = LeafRequest::Query(servent_proto::msg::Query {
        kind: QueryKind::Keywords(words("survivor")),
        max_results: 5,
    });
    net::write_frame(&mut send, &q, 1024).await.unwrap();
    send.finish().unwrap();
    let reply = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME)
        .await
        .unwrap();
    assert!(matches!(reply, Some(SupernodeReply::Hits(h)) if h.len() == 1));
    // ...and the other leaf was never disturbed.
    assert_eq!(sn.leaf_count(), 1);
    assert_eq!(a.leaf().indexed(), vec![1]);
}

#[tokio::test]
async fn a_bad_registration_update_ends_only_that_leaf_session() {
    use servent_proto::msg::{FileEntry, SessionUpdate};
    let sn = supernode().await;
    let a = TestLeaf::start(&[&sn], &[("kept.txt", b"kept")]).await;
    a.wait_indexed(1).await;

    let ep = raw_endpoint();
    let peer = ep.connect(sn.addr(), ALPN_LEAF, None).await.unwrap();
    let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
    net::write_frame(&mut send, &LeafRequest::Register { listen_port: 9 }, 1024)
        .await
        .unwrap();
    let reply = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME)
        .await
        .unwrap();
    assert!(matches!(reply, Some(SupernodeReply::Registered { .. })));
    let evil = FileEntry {
        hash: ContentHash([1; 32]),
        name: "../../etc/passwd".into(),
        size: 1,
    };
    net::write_frame(&mut send, &SessionUpdate::Add(vec![evil]), 1 << 20)
        .await
        .unwrap();
    let reply = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME)
        .await
        .unwrap();
    assert!(matches!(reply, Some(SupernodeReply::Error(e)) if e.code == ErrorCode::BadRequest));
    tokio::time::timeout(T, peer.conn.closed())
        .await
        .expect("offender disconnected");

    wait_for(T, || async { sn.leaf_count() == 1 })
        .await
        .expect("only the offender is gone");
    assert_eq!(sn.file_count(), 1);
}

#[tokio::test]
async fn a_name_with_a_bidi_override_ends_only_that_leaf_session() {
    use servent_proto::msg::{FileEntry, SessionUpdate};
    let sn = supernode().await;
    let a = TestLeaf::start(&[&sn], &[("kept.txt", b"kept")]).await;
    a.wait_indexed(1).await;

    let ep = raw_endpoint();
    let peer = ep.connect(sn.addr(), ALPN_LEAF, None).await.unwrap();
    let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
    net::write_frame(&mut send, &LeafRequest::Register { listen_port: 9 }, 1024)
        .await
        .unwrap();
    let reply = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME)
        .await
        .unwrap();
    assert!(matches!(reply, Some(SupernodeReply::Registered { .. })));
    let entry = |n: u8, name: &str| FileEntry {
        hash: ContentHash([n; 32]),
        name: name.into(),
        size: 1,
    };
    // A good batch is indexed...
    net::write_frame(
        &mut send,
        &SessionUpdate::Add(vec![entry(1, "report.pdf")]),
        1 << 20,
    )
    .await
    .unwrap();
    let reply = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME)
        .await
        .unwrap();
    assert!(matches!(reply, Some(SupernodeReply::Indexed { files: 1 })));
    assert_eq!(sn.file_count(), 2);
    // ...and one name shown as "exe.jpg" ends the session: an error that
    // says why and quotes the name escaped, then the connection closes.
    let batch = vec![entry(2, "holiday.jpg"), entry(3, "\u{202e}gpj.exe")];
    net::write_frame(&mut send, &SessionUpdate::Add(batch), 1 << 20)
        .await
        .unwrap();
    let reply = net::read_frame::<SupernodeReply>(&mut recv, MAX_REPLY_FRAME)
        .await
        .unwrap();
    let Some(SupernodeReply::Error(e)) = reply else {
        panic!("wanted an error, got {reply:?}");
    };
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert_eq!(
        e.message,
        "file name \"\\u{202e}gpj.exe\" holds a bidirectional control ('\\u{202e}')"
    );
    tokio::time::timeout(T, peer.conn.closed())
        .await
        .expect("offender disconnected");

    // Its session and everything it announced are gone; the other leaf's
    // files stay.
    wait_for(T, || async { sn.leaf_count() == 1 && sn.file_count() == 1 })
        .await
        .expect("only the offender is gone");
    let hits = a
        .client(&[&sn])
        .search(&words("kept"), 10, T)
        .await
        .unwrap();
    assert_eq!(hits.len(), 1);
}

#[tokio::test]
async fn a_leaf_announces_nfc_names_and_skips_names_the_rule_refuses() {
    let files: &[(&str, &[u8])] = &[
        ("ok.txt", b"ok"),
        // NFD, as macOS writes names: announced as NFC "café.txt".
        ("cafe\u{301}.txt", b"coffee"),
        ("\u{202e}gpj.exe", b"disguised"),
        ("zero\u{200b}width.txt", b"invisible"),
        ("line\u{2028}break.txt", b"separator"),
    ];
    let sn = supernode().await;
    let a = TestLeaf::start(&[&sn], files).await;
    a.wait_indexed(2).await;
    assert_eq!(sn.file_count(), 2);
    let client = a.client(&[&sn]);
    let hits = client.search(&words("café"), 10, T).await.unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].name(), "caf\u{e9}.txt");
    assert_eq!(hits[0].hash, hash_of(b"coffee"));
    for word in ["gpj", "exe", "width", "break"] {
        let hits = client.search(&words(word), 10, T).await.unwrap();
        assert!(hits.is_empty(), "{word}: {hits:?}");
    }
    // The session is still up: the leaf was not refused for them.
    assert_eq!(sn.leaf_count(), 1);
}
