//! `Connect` on loopback, with real nodes (docs/PROTOCOL.md 10.5): a push
//! proxy has its leaf dial the asker back at the address it observes the
//! asker at, and the leaf serves it there; a proxy refuses a leaf it does
//! not hold and an asker over its rate; a downloader's endpoint closes
//! dial-backs nobody waits for. The NAT lab (`tests/tests/nat.rs`) runs
//! the same exchange across real NATs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use servent_net::{self as net, Endpoint, Identity};
use servent_proto::connect::ConnectLimits;
use servent_proto::limits::{MAX_REPLY_FRAME, MAX_REQUEST_FRAME, MAX_TRANSFER_FRAME};
use servent_proto::msg::{
    ErrorCode, GetReply, GetRequest, LeafRequest, SupernodeReply, ALPN_LEAF, ALPN_PUSH,
    ALPN_TRANSFER,
};
use servent_proto::NodeId;
use servent_tests::*;

const T: Duration = Duration::from_secs(10);

/// Sends `Connect { to }` to the supernode at `at` from `endpoint`.
async fn ask(endpoint: &Endpoint, at: SocketAddr, to: NodeId) -> SupernodeReply {
    let peer = endpoint.connect(at, ALPN_LEAF, None).await.expect("dial");
    let (mut send, mut recv) = peer.conn.open_bi().await.expect("stream");
    net::write_frame(&mut send, &LeafRequest::Connect { to }, MAX_REQUEST_FRAME)
        .await
        .expect("send");
    let _ = send.finish();
    let reply = tokio::time::timeout(T, net::read_first_frame(&mut recv, MAX_REPLY_FRAME))
        .await
        .expect("an answer in time")
        .expect("a frame")
        .expect("not the end");
    peer.conn.close(0u32.into(), b"done");
    reply
}

/// Asks the source on `peer` what it has of `content`: all of it.
async fn assert_serves_whole(peer: &net::Peer, content: &[u8]) {
    let (mut send, mut recv) = peer.conn.open_bi().await.expect("stream");
    let req = GetRequest::Have(hash_of(content));
    net::write_frame(&mut send, &req, MAX_TRANSFER_FRAME)
        .await
        .expect("ask");
    let have = net::read_first_frame::<GetReply>(&mut recv, MAX_TRANSFER_FRAME)
        .await
        .expect("a reply");
    let whole = Some(GetReply::Ranges {
        size: content.len() as u64,
        partial: false,
    });
    assert_eq!(have, whole);
}

fn error_code(reply: &SupernodeReply) -> Option<ErrorCode> {
    match reply {
        SupernodeReply::Error(e) => Some(e.code),
        _ => None,
    }
}

#[tokio::test]
async fn a_push_proxy_has_its_leaf_dial_back_and_serve_the_asker() {
    let sn = supernode().await;
    let content = random_bytes(300_001, 7);
    let source = TestLeaf::start(&[&sn], &[("pushed.bin", content.as_slice())]).await;
    source.wait_indexed(1).await;

    // The asker: an endpoint that accepts servent-push/1, as `leaf get`'s.
    let me = Arc::new(Identity::generate().expect("identity"));
    let endpoint = Endpoint::bind(me, "127.0.0.1:0".parse().unwrap(), &[ALPN_PUSH]).unwrap();
    let reply = ask(&endpoint, sn.addr(), source.leaf().id()).await;
    let SupernodeReply::Connecting { addr } = reply else {
        panic!("expected Connecting, got {reply:?}");
    };
    // Where the source's session comes from: its one socket.
    assert_eq!(addr, source.leaf().addr().to_string());

    // It dials us, as itself, with servent-push/1 ...
    let incoming = tokio::time::timeout(T, endpoint.quinn().accept())
        .await
        .expect("dialled back in time")
        .expect("an incoming connection");
    let peer = net::accept_within(incoming, T).await.expect("handshake");
    assert_eq!(peer.id, source.leaf().id(), "the source dials as itself");
    assert_eq!(net::alpn(&peer.conn).as_deref(), Some(ALPN_PUSH));
    // ... and serves it as a download: we open the streams.
    assert_serves_whole(&peer, &content).await;
    assert_eq!(sn.metrics().connects_passed.get(), 1);
}

#[tokio::test]
async fn a_push_proxy_refuses_a_leaf_it_does_not_hold_and_an_asker_over_its_rate() {
    let sn = supernode().await;
    let me = Arc::new(Identity::generate().expect("identity"));
    let my_id = me.id();
    let endpoint = Endpoint::bind(me, "127.0.0.1:0".parse().unwrap(), &[ALPN_PUSH]).unwrap();
    let burst = ConnectLimits::default().per_asker_burst as usize;
    // Unknown leaves: each refused, each counted against the asker.
    for n in 0..burst {
        let reply = ask(&endpoint, sn.addr(), NodeId([n as u8 + 1; 32])).await;
        assert_eq!(error_code(&reply), Some(ErrorCode::NotFound), "{reply:?}");
    }
    let reply = ask(&endpoint, sn.addr(), NodeId([200; 32])).await;
    assert_eq!(
        error_code(&reply),
        Some(ErrorCode::RateLimited),
        "{reply:?}"
    );
    // Another asker is not held back by this one, and no one may ask for
    // a dial to itself.
    let other = Arc::new(Identity::generate().expect("identity"));
    let other_id = other.id();
    let other = Endpoint::bind(other, "127.0.0.1:0".parse().unwrap(), &[ALPN_PUSH]).unwrap();
    let reply = ask(&other, sn.addr(), other_id).await;
    assert_eq!(error_code(&reply), Some(ErrorCode::BadRequest), "{reply:?}");
    let reply = ask(&other, sn.addr(), my_id).await;
    assert_eq!(error_code(&reply), Some(ErrorCode::NotFound), "{reply:?}");
    assert_eq!(sn.metrics().connects_passed.get(), 0);
    assert_eq!(sn.metrics().connects_refused.get(), burst as u64 + 3);
}

#[tokio::test]
async fn a_downloader_closes_a_dial_back_nobody_waits_for() {
    let sn = supernode().await;
    let downloader = Client::new(
        tempfile::tempdir().unwrap().path(),
        vec![sn.addr().to_string()],
    )
    .expect("client");
    let at = downloader.endpoint().local_addr().expect("bound");
    let at = SocketAddr::from(([127, 0, 0, 1], at.port()));
    let stranger = Endpoint::client_any(Arc::new(Identity::generate().unwrap())).unwrap();
    // The handshake completes (the ALPN is served) and the connection is
    // closed at once, before any stream.
    let peer = stranger
        .connect(at, ALPN_PUSH, Some(downloader.id()))
        .await
        .expect("handshake");
    let closed = tokio::time::timeout(T, peer.conn.closed())
        .await
        .expect("closed");
    assert!(closed.to_string().contains("not expected"), "{closed}");
    // Nor is it a source to download from.
    let refused = stranger
        .connect(at, ALPN_TRANSFER, Some(downloader.id()))
        .await;
    assert!(refused.is_err(), "servent-xfer/3 is not served there");
}

/// Asks the supernode at `at` to relay to `to`: its answer, and the
/// connection and stream the tunnel would run on.
async fn ask_relay(
    endpoint: &Endpoint,
    at: SocketAddr,
    to: NodeId,
) -> (
    SupernodeReply,
    net::Peer,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let peer = endpoint.connect(at, ALPN_LEAF, None).await.expect("dial");
    let (mut send, mut recv) = peer.conn.open_bi().await.expect("stream");
    net::write_frame(&mut send, &LeafRequest::Relay { to }, MAX_REQUEST_FRAME)
        .await
        .expect("send");
    let reply = tokio::time::timeout(T, net::read_frame(&mut recv, MAX_REPLY_FRAME))
        .await
        .expect("an answer in time")
        .expect("a frame")
        .expect("not the end");
    (reply, peer, send, recv)
}

#[tokio::test]
async fn a_relay_carries_an_end_to_end_connection_to_its_leaf_who_serves_it() {
    init_tracing();
    let sn = supernode().await;
    let content = random_bytes(1_000_003, 9);
    let source = TestLeaf::start(&[&sn], &[("relayed.bin", content.as_slice())]).await;
    source.wait_indexed(1).await;

    let me = Arc::new(Identity::generate().expect("identity"));
    let endpoint = Endpoint::client_any(me).unwrap();
    let (reply, _outer, send, recv) = ask_relay(&endpoint, sn.addr(), source.leaf().id()).await;
    assert_eq!(reply, SupernodeReply::Relaying);
    // Our own QUIC connection through the tunnel: the far end proves it
    // is the source (the relay cannot be it), and serves the file.
    let local = endpoint.local_addr().unwrap();
    let tunnel = net::TunnelSocket::open(send, recv, local, sn.addr());
    let inner = endpoint.on_tunnel(tunnel.socket, &[]).unwrap();
    let peer = inner
        .connect(sn.addr(), ALPN_TRANSFER, Some(source.leaf().id()))
        .await
        .expect("a handshake through the relay, with the source");
    assert_serves_whole(&peer, &content).await;
    assert_eq!(sn.metrics().relays_opened.get(), 1);
    assert!(sn.metrics().relayed_bytes.get() > 0);
}

#[tokio::test]
async fn a_relay_refuses_beyond_its_budget_a_leaf_it_does_not_hold_and_when_turned_off() {
    let mut config = supernode::Config::localhost();
    config.relay.max_circuits_per_ip = 1;
    config.relay.circuit_idle_secs = 1;
    let sn = supernode_with(config).await;
    let a = TestLeaf::start(&[&sn], &[("a.bin", b"a".as_slice())]).await;
    let b = TestLeaf::start(&[&sn], &[("b.bin", b"b".as_slice())]).await;
    a.wait_indexed(1).await;
    b.wait_indexed(1).await;
    let endpoint = Endpoint::client_any(Arc::new(Identity::generate().unwrap())).unwrap();
    // One circuit from this address is open (held: the tunnel is unused)...
    let (reply, _held, _s, mut held) = ask_relay(&endpoint, sn.addr(), a.leaf().id()).await;
    assert_eq!(reply, SupernodeReply::Relaying);
    // ... so the next is refused at once, not queued.
    let (reply, ..) = ask_relay(&endpoint, sn.addr(), b.leaf().id()).await;
    assert_eq!(
        error_code(&reply),
        Some(ErrorCode::RateLimited),
        "{reply:?}"
    );
    let (reply, ..) = ask_relay(&endpoint, sn.addr(), NodeId([7; 32])).await;
    assert!(error_code(&reply).is_some(), "{reply:?}");
    assert_eq!(sn.metrics().relays_opened.get(), 1);
    assert_eq!(sn.metrics().relays_refused.get(), 2);
    // A circuit that carries nothing for its idle time ends, and frees its
    // place.
    let ended = tokio::time::timeout(T, held.read_to_end(1 << 16)).await;
    assert!(
        matches!(ended, Ok(Ok(_))),
        "the idle circuit ends: {ended:?}"
    );
    let (reply, ..) = ask_relay(&endpoint, sn.addr(), b.leaf().id()).await;
    assert_eq!(reply, SupernodeReply::Relaying);

    let mut off = supernode::Config::localhost();
    off.relay.enabled = false;
    let sn = supernode_with(off).await;
    let c = TestLeaf::start(&[&sn], &[("c.bin", b"c".as_slice())]).await;
    c.wait_indexed(1).await;
    let (reply, ..) = ask_relay(&endpoint, sn.addr(), c.leaf().id()).await;
    let SupernodeReply::Error(e) = reply else {
        panic!("a relay turned off relays nothing: {reply:?}");
    };
    assert!(e.message.contains("turned off"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_download_moves_to_a_dial_back_once_one_gets_through() {
    let sn = supernode().await;
    // 16 MiB at 1 MiB/s: about 16 s. The source's dial back, asked at
    // the relay's round, gets through within a few seconds of the gate
    // opening (its Initial is retransmitted), or at the next round, 4 s
    // later: either way well before half the file.
    let content = random_bytes(16 << 20, 11);
    let (data, share) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(share.path().join("moved.bin"), &content).unwrap();
    // The source talks to nobody but its supernode until the gate opens:
    // no dial, dial back or punch reaches it, and the relay does.
    let (socket, gate) = GatedSocket::bind(&[sn.addr()]);
    let config = leaf::Config {
        max_upload_rate: Some(1 << 20),
        ..leaf::Config::localhost(data.path(), share.path(), vec![sn.addr().to_string()])
    };
    let source = leaf::Leaf::spawn_on_socket(config, socket).await.unwrap();
    wait_for(T, || async { source.indexed().iter().sum::<u32>() == 1 })
        .await
        .expect("the source's file is indexed");

    let dir = tempfile::tempdir().unwrap();
    let client = Client::new(dir.path(), vec![sn.addr().to_string()]).expect("client");
    let out = dir.path().join("got.bin");
    let get = client.download(hash_of(&content), Some(&out), Duration::from_secs(60), None);
    let opened = async {
        wait_for(T, || async { sn.metrics().relays_opened.get() == 1 })
            .await
            .expect("relayed first");
        gate.open();
    };
    let (got, ()) = tokio::join!(get, opened);
    let (path, got) = got.expect("the download completes");
    assert_eq!(std::fs::read(path).unwrap(), content);
    let routes: Vec<_> = got.routes.iter().map(|(_, r)| r.name()).collect();
    assert_eq!(routes.first(), Some(&"relayed"), "{routes:?}");
    assert!(
        routes.len() == 2 && routes[1] != "relayed",
        "moved off the relay once a dial back got through: {routes:?}"
    );
    // Most of the file came the better way.
    let relayed = sn.metrics().relayed_bytes.get();
    assert!(
        relayed < content.len() as u64 / 2,
        "{relayed} bytes relayed"
    );
    source.shutdown().await;
}
