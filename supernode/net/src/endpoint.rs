//! QUIC endpoints carrying a node's identity, with mutually authenticated
//! TLS 1.3: binding, dialling by ALPN, and the authenticated [`Peer`] of a
//! connection.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use servent_proto::NodeId;

use crate::identity::{node_id_from_cert, Identity, SERVER_NAME};
use crate::tls::{crypto_provider, verifier};
use crate::transport::TransportConfig;

/// TLS alert `no_application_protocol` as a QUIC crypto error code.
const ALPN_MISMATCH: u64 = 0x100 + 120;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    #[error("QUIC configuration failed: {0}")]
    Quic(String),
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("{addr} does not speak {alpn} (incompatible protocol or version)")]
    ProtocolMismatch { addr: SocketAddr, alpn: String },
    #[error("{addr} did not answer within {} s", after.as_secs())]
    Timeout { addr: SocketAddr, after: Duration },
    #[error("{addr} is node {got}, not the expected {expected}")]
    UnexpectedPeer {
        addr: SocketAddr,
        expected: NodeId,
        got: NodeId,
    },
}

/// `addr` with an IPv4-mapped IPv6 address (`[::ffff:a.b.c.d]`, how a
/// dual-stack socket sees IPv4 peers) turned back into IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// An IPv6 UDP socket on `[::]:0` that also carries IPv4, whatever the
/// host's default (`net.ipv6.bindv6only`).
fn dual_stack_socket() -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_only_v6(false)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)).into())?;
    Ok(socket.into())
}

/// Client configurations built so far, by ALPN.
type ClientConfigs = Vec<(Vec<u8>, quinn::ClientConfig)>;

/// A QUIC endpoint carrying a node's identity: it can accept connections for
/// the ALPNs it was bound with and dial any.
#[derive(Clone)]
pub struct Endpoint {
    inner: quinn::Endpoint,
    identity: Arc<Identity>,
    /// One client configuration per ALPN, built on first use: building one
    /// parses the key and sets up TLS, which costs more than a handshake's
    /// worth of CPU if done for every dial.
    client_configs: Arc<std::sync::Mutex<ClientConfigs>>,
    transport: Arc<TransportConfig>,
}

impl Endpoint {
    /// Binds `addr` and accepts connections for `alpns`, with the default
    /// [`TransportConfig`].
    ///
    /// `alpns` is every protocol the node can speak on this endpoint, fixed
    /// for its life: which of them is served at a given moment is the
    /// [`Router`](crate::Router)'s to say.
    pub fn bind(
        identity: Arc<Identity>,
        addr: SocketAddr,
        alpns: &[&[u8]],
    ) -> Result<Self, EndpointError> {
        Self::bind_with(identity, addr, alpns, TransportConfig::default())
    }

    /// Like [`Endpoint::bind`], with the given timings and limits.
    pub fn bind_with(
        identity: Arc<Identity>,
        addr: SocketAddr,
        alpns: &[&[u8]],
        transport: TransportConfig,
    ) -> Result<Self, EndpointError> {
        let config = server_config(&identity, alpns, &transport)?;
        let inner = quinn::Endpoint::server(config, addr)
            .map_err(|source| EndpointError::Bind { addr, source })?;
        Ok(Self::wrap(inner, identity, Arc::new(transport)))
    }

    /// Like [`Endpoint::bind`], on a socket the caller provides.
    pub fn bind_socket(
        identity: Arc<Identity>,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        alpns: &[&[u8]],
    ) -> Result<Self, EndpointError> {
        Self::bind_socket_with(identity, socket, alpns, TransportConfig::default())
    }

    /// Like [`Endpoint::bind_with`], on a socket the caller provides.
    pub fn bind_socket_with(
        identity: Arc<Identity>,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        alpns: &[&[u8]],
        transport: TransportConfig,
    ) -> Result<Self, EndpointError> {
        let config = server_config(&identity, alpns, &transport)?;
        let addr = socket.local_addr().map_err(|source| EndpointError::Bind {
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            source,
        })?;
        // quinn receives (and tells peers it takes) at most 1 480-byte
        // datagrams unless told otherwise.
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(transport.initial_mtu.max(1480))
            .map_err(|e| EndpointError::Bind {
                addr,
                source: std::io::Error::other(e.to_string()),
            })?;
        let inner = quinn::Endpoint::new_with_abstract_socket(
            endpoint_config,
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| EndpointError::Bind { addr, source })?;
        Ok(Self::wrap(inner, identity, Arc::new(transport)))
    }

    /// An endpoint that only dials out, on an ephemeral port of the family
    /// of `peer`.
    pub fn client(identity: Arc<Identity>, peer: SocketAddr) -> Result<Self, EndpointError> {
        Self::client_with(identity, peer, TransportConfig::default())
    }

    /// Like [`Endpoint::client`], with the given timings and limits.
    pub fn client_with(
        identity: Arc<Identity>,
        peer: SocketAddr,
        transport: impl Into<Arc<TransportConfig>>,
    ) -> Result<Self, EndpointError> {
        let transport = transport.into();
        let addr: SocketAddr = match peer {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let inner =
            quinn::Endpoint::client(addr).map_err(|source| EndpointError::Bind { addr, source })?;
        Ok(Self::wrap(inner, identity, transport))
    }

    /// An endpoint that only dials out and reaches both IPv4 and IPv6
    /// addresses: one dual-stack socket (`[::]:0`, IPv4 as mapped
    /// addresses), or an IPv4 one where the host has no IPv6.
    pub fn client_any(identity: Arc<Identity>) -> Result<Self, EndpointError> {
        match dual_stack_socket() {
            Ok(socket) => Self::on_dual_stack(identity, socket, None, TransportConfig::default()),
            Err(_) => Self::client(identity, (Ipv4Addr::UNSPECIFIED, 0).into()),
        }
    }

    /// Like [`Endpoint::client_any`], and also accepting connections for
    /// `alpns` on that ephemeral port: for a one-shot command that sources
    /// dial back (docs/PROTOCOL.md 10.5).
    pub fn server_any(identity: Arc<Identity>, alpns: &[&[u8]]) -> Result<Self, EndpointError> {
        let transport = TransportConfig::default();
        let config = server_config(&identity, alpns, &transport)?;
        match dual_stack_socket() {
            Ok(socket) => Self::on_dual_stack(identity, socket, Some(config), transport),
            Err(_) => Self::bind_with(
                identity,
                (Ipv4Addr::UNSPECIFIED, 0).into(),
                alpns,
                transport,
            ),
        }
    }

    /// An endpoint on a dual-stack `socket`, accepting with `server` if given.
    fn on_dual_stack(
        identity: Arc<Identity>,
        socket: std::net::UdpSocket,
        server: Option<quinn::ServerConfig>,
        transport: TransportConfig,
    ) -> Result<Self, EndpointError> {
        let inner = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            server,
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| EndpointError::Bind {
            addr: (Ipv6Addr::UNSPECIFIED, 0).into(),
            source,
        })?;
        Ok(Self::wrap(inner, identity, Arc::new(transport)))
    }

    fn wrap(
        inner: quinn::Endpoint,
        identity: Arc<Identity>,
        transport: Arc<TransportConfig>,
    ) -> Self {
        Self {
            inner,
            identity,
            client_configs: Default::default(),
            transport,
        }
    }

    /// The timings and limits of this endpoint's connections.
    pub fn transport(&self) -> &TransportConfig {
        &self.transport
    }

    pub fn id(&self) -> NodeId {
        self.identity.id()
    }

    /// A dial-only endpoint with the same identity on a socket of its own
    /// (for dial-backs, which must not reuse this endpoint's socket).
    pub fn sibling_client(&self) -> Result<Self, EndpointError> {
        let local = self
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        Self::client_with(self.identity.clone(), local, self.transport.clone())
    }

    /// An endpoint with the same identity and transport on a relay's
    /// tunnel (`crate::tunnel`), accepting `alpns`; its connections use
    /// the tunnel's datagram size.
    pub fn on_tunnel(
        &self,
        socket: Arc<crate::TunnelSocket>,
        alpns: &[&[u8]],
    ) -> Result<Self, EndpointError> {
        let transport = TransportConfig {
            initial_mtu: crate::tunnel::TUNNEL_MTU,
            ..(*self.transport).clone()
        };
        Self::bind_socket_with(self.identity.clone(), socket, alpns, transport)
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    pub fn quinn(&self) -> &quinn::Endpoint {
        &self.inner
    }

    fn client_config(&self, alpn: &[u8]) -> Result<quinn::ClientConfig, EndpointError> {
        let mut configs = self.client_configs.lock().expect("client configs");
        if let Some((_, config)) = configs.iter().find(|(a, _)| a == alpn) {
            return Ok(config.clone());
        }
        let config = self.new_client_config(alpn)?;
        configs.push((alpn.to_vec(), config.clone()));
        Ok(config)
    }

    fn new_client_config(&self, alpn: &[u8]) -> Result<quinn::ClientConfig, EndpointError> {
        let mut tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier()))
            .with_client_auth_cert(vec![self.identity.cert.clone()], self.identity.key())?;
        tls.alpn_protocols = vec![alpn.to_vec()];
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(Arc::new(self.transport.client()));
        Ok(config)
    }

    /// Dials `addr` speaking `alpn`. With `expected`, fails unless the peer
    /// proves it holds that node's key.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        alpn: &[u8],
        expected: Option<NodeId>,
    ) -> Result<Peer, ConnectError> {
        let connect_err = |reason: String| ConnectError::Connect { addr, reason };
        let config = self
            .client_config(alpn)
            .map_err(|e| connect_err(e.to_string()))?;
        let connecting = self
            .inner
            .connect_with(config, addr, SERVER_NAME)
            .map_err(|e| connect_err(e.to_string()))?;
        let after = self.transport.connect_timeout;
        let conn = match tokio::time::timeout(after, connecting).await {
            Err(_) => return Err(ConnectError::Timeout { addr, after }),
            Ok(Err(e)) if is_alpn_mismatch(&e) => {
                return Err(ConnectError::ProtocolMismatch {
                    addr,
                    alpn: String::from_utf8_lossy(alpn).into_owned(),
                })
            }
            Ok(Err(quinn::ConnectionError::TimedOut)) => {
                return Err(ConnectError::Timeout { addr, after })
            }
            Ok(Err(e)) => return Err(connect_err(e.to_string())),
            Ok(Ok(conn)) => conn,
        };
        let id =
            peer_id(&conn).ok_or_else(|| connect_err("peer presented no certificate".into()))?;
        if let Some(expected) = expected {
            if expected != id {
                conn.close(0u32.into(), b"unexpected node id");
                return Err(ConnectError::UnexpectedPeer {
                    addr,
                    expected,
                    got: id,
                });
            }
        }
        Ok(Peer { conn, id })
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.inner.close(0u32.into(), b"shutting down");
    }
}

fn server_config(
    identity: &Identity,
    alpns: &[&[u8]],
    transport: &TransportConfig,
) -> Result<quinn::ServerConfig, EndpointError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier()))
        .with_single_cert(vec![identity.cert.clone()], identity.key())?;
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport.server()));
    Ok(config)
}

fn is_alpn_mismatch(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::ConnectionClosed(c) => u64::from(c.error_code) == ALPN_MISMATCH,
        quinn::ConnectionError::TransportError(t) => u64::from(t.code) == ALPN_MISMATCH,
        _ => false,
    }
}

/// An authenticated connection and the id of the node at the other end.
#[derive(Debug, Clone)]
pub struct Peer {
    pub conn: quinn::Connection,
    pub id: NodeId,
}

/// The node id proven by the peer of an established connection.
pub fn peer_id(conn: &quinn::Connection) -> Option<NodeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    node_id_from_cert(certs.first()?).ok()
}

/// The ALPN negotiated on an established connection.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Completes an incoming connection and authenticates its peer, within
/// [`CONNECT_TIMEOUT`](crate::CONNECT_TIMEOUT).
pub async fn accept(incoming: quinn::Incoming) -> Result<Peer, String> {
    accept_within(incoming, crate::CONNECT_TIMEOUT).await
}

/// Like [`accept`], within `limit`.
pub async fn accept_within(incoming: quinn::Incoming, limit: Duration) -> Result<Peer, String> {
    let conn = tokio::time::timeout(limit, async { incoming.await })
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let id = peer_id(&conn).ok_or("peer presented no certificate")?;
    Ok(Peer { conn, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shrunk() -> TransportConfig {
        TransportConfig {
            keep_alive: Duration::from_secs(60),
            idle_timeout: Duration::from_millis(300),
            connect_timeout: Duration::from_millis(300),
            ..TransportConfig::default()
        }
    }

    #[test]
    fn the_default_transport_is_the_documented_one() {
        let t = TransportConfig::default();
        assert_eq!(t.keep_alive, Duration::from_secs(2));
        assert_eq!(t.idle_timeout, Duration::from_secs(6));
        assert_eq!(t.max_streams, 256);
        assert_eq!(t.connect_timeout, Duration::from_secs(5));
        assert_eq!(t.request_timeout, Duration::from_secs(10));
        assert_eq!(t.frame_timeout, Duration::from_secs(10));
        assert_eq!(t.initial_mtu, 1200);
    }

    #[tokio::test]
    async fn a_shrunk_transport_is_the_one_connections_run_with() {
        let id = || Arc::new(Identity::generate().unwrap());
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let server = Endpoint::bind_with(id(), local, &[b"t/1"], shrunk()).unwrap();
        let addr = server.local_addr().unwrap();
        let client = Endpoint::client_with(id(), addr, shrunk()).unwrap();
        assert_eq!(client.transport(), &shrunk());
        let accepted = tokio::spawn({
            let server = server.clone();
            async move { accept(server.quinn().accept().await.unwrap()).await }
        });
        let peer = client
            .connect(addr, b"t/1", Some(server.id()))
            .await
            .unwrap();
        let _held = accepted.await.unwrap().unwrap();
        // No keep-alive within the idle timeout: the connection dies of it.
        let closed = tokio::time::timeout(Duration::from_secs(5), peer.conn.closed()).await;
        assert!(
            matches!(closed, Ok(quinn::ConnectionError::TimedOut)),
            "{closed:?}"
        );

        // Nobody answers on a socket that never reads: the dial gives up
        // after the shrunk connect timeout, and says how long it waited.
        let silent = std::net::UdpSocket::bind(local).unwrap();
        let err = client
            .connect(silent.local_addr().unwrap(), b"t/1", None)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConnectError::Timeout { after, .. } if after == Duration::from_millis(300)),
            "{err}"
        );
        server.close();
    }
}
