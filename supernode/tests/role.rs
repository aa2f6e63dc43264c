//! The supernode role on a router it does not own, beside another
//! protocol, as an elected leaf runs it: starting it adds its handlers,
//! stopping it removes them and leaves the rest of the node alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use servent_net::gate::Gate;
use servent_net::{Endpoint, Identity, Peer, ProtocolHandler, Router};
use servent_proto::msg::{ALPN_LEAF, ALPN_MESH};

const OTHER: &[u8] = b"servent-test/1";
const T: Duration = Duration::from_secs(5);

/// Holds each connection open until the peer closes it.
struct Hold;

impl ProtocolHandler for Hold {
    async fn accept(&self, peer: Peer) {
        peer.conn.closed().await;
    }
}

async fn close_reason(peer: &Peer) -> Vec<u8> {
    match tokio::time::timeout(T, peer.conn.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(c)) => c.reason.to_vec(),
        other => panic!("not closed by the application: {other:?}"),
    }
}

#[tokio::test]
async fn stopping_the_role_removes_its_handlers_and_nothing_else() {
    let config = supernode::Config::localhost();
    let endpoint = Endpoint::bind(
        Arc::new(Identity::generate().unwrap()),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &[OTHER, ALPN_LEAF, ALPN_MESH],
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let gate = Gate::new(supernode::gate_config(&config));
    let router = Router::builder(endpoint.clone(), gate)
        .accept(OTHER, Hold)
        .unserved_reason(b"not a supernode")
        .spawn();
    let client = Endpoint::client(Arc::new(Identity::generate().unwrap()), addr).unwrap();

    let role = supernode::Role::start(config, &router, true).unwrap();
    assert_eq!(role.id(), endpoint.id());
    assert_eq!(role.addr(), addr);
    assert!(router.serves(ALPN_LEAF) && router.serves(ALPN_MESH) && router.serves(OTHER));
    assert!(
        Arc::ptr_eq(&role.state().gate, router.gate()),
        "one door per endpoint"
    );
    let other = client.connect(addr, OTHER, None).await.unwrap();

    role.stop();
    role.stop(); // only the first call does anything
    assert_eq!(router.alpns(), vec![OTHER.to_vec()]);
    let late = client.connect(addr, ALPN_LEAF, None).await.unwrap();
    assert_eq!(close_reason(&late).await, b"not a supernode");
    drop(role);
    assert!(
        router.serves(OTHER),
        "dropping a stopped role removes nothing"
    );
    assert!(
        other.conn.close_reason().is_none(),
        "the other protocol's connection is open"
    );
    let _again = client.connect(addr, OTHER, None).await.unwrap();

    // A second role on the same router, as after a new promotion.
    let role = supernode::Role::start(supernode::Config::localhost(), &router, true).unwrap();
    assert!(router.serves(ALPN_LEAF));
    drop(role);
    assert!(!router.serves(ALPN_LEAF), "dropping a role stops it");

    router.shutdown().await;
    endpoint.close();
}

#[tokio::test]
async fn a_supernode_binds_with_the_transport_of_its_config() {
    let transport = servent_net::TransportConfig {
        keep_alive: Duration::from_millis(500),
        idle_timeout: Duration::from_millis(1500),
        ..Default::default()
    };
    let sn = supernode::Supernode::spawn(supernode::Config {
        transport: transport.clone(),
        ..supernode::Config::localhost()
    })
    .await
    .unwrap();
    assert_eq!(sn.router().endpoint().transport(), &transport);
    assert_eq!(
        sn.state().gate.inbound_unwatched().timeouts,
        transport.streams()
    );
    sn.shutdown().await;
}
