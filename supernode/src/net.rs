//! Identity and transport shared by every Servent node: the persistent key
//! pair, QUIC endpoints with mutually authenticated TLS 1.3, and reading and
//! writing length-checked frames on QUIC streams.
//!
//! A node's id is its Ed25519 public key. Certificates are self-signed and
//! carry no meaning beyond that key: the verifiers below accept any
//! well-formed Ed25519 certificate, *really* verify the handshake signature
//! against it (so the peer holds the private key), and the node id is then
//! derived from the certificate. Whether that id is the one wanted is checked
//! by [`Endpoint::connect`] and by the protocol handlers.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::de::DeserializeOwned;
use serde::Serialize;
use servent_proto::frame::{self, FrameError, HEADER_LEN};
use servent_proto::NodeId;

use crate::gate::{Budget, Inbound};

/// Keep-alive interval: QUIC's default is none, and NAT bindings and
/// supernode leases both need traffic.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A peer silent for this long is gone: its index entries are dropped and
/// its leaves re-home. Three missed keep-alives: quick enough that a dead
/// supernode is replaced within seconds, slow enough to ride out a burst of
/// packet loss.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(6);
/// Concurrent bidirectional streams a peer may open: enough for a mesh
/// neighbour's query traffic (each query is a stream for up to ~3 s).
pub const MAX_STREAMS: u32 = 256;
/// Longest wait for a handshake to finish.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the first frame of a stream.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a frame may take to arrive whole once its header has, on every
/// stream: a half-sent frame must not hold its buffer for the life of the
/// connection.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// The SNI sent by clients. Names mean nothing here; ids are checked instead.
const SERVER_NAME: &str = "servent";
/// OID of Ed25519 keys (RFC 8410).
const OID_ED25519: &str = "1.3.101.112";
/// TLS alert `no_application_protocol` as a QUIC crypto error code.
const ALPN_MISMATCH: u64 = 0x100 + 120;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read or write the identity key {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("identity key {path} is not a valid Ed25519 key: {reason}")]
    Invalid { path: String, reason: String },
    #[error("cannot create a key or certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A node's key pair and the self-signed certificate that carries it.
pub struct Identity {
    id: NodeId,
    cert: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh key pair, kept only in memory.
    pub fn generate() -> Result<Self, IdentityError> {
        Self::from_key(rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?)
    }

    /// Loads `DIR/identity.pem`, creating it (mode 0600) on first start, so
    /// that a restarted node is the same node.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, IdentityError> {
        let path = data_dir.join("identity.pem");
        let io = |source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(pem) => Self::from_pem(&path, &pem),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(data_dir).map_err(io)?;
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
                match write_private(&path, key.serialize_pem().as_bytes()) {
                    Ok(()) => Self::from_key(key),
                    // Another process of this node got there first (`leaf
                    // serve` and `leaf search` started together on a new
                    // data dir): the key it wrote is the node's.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let pem = std::fs::read_to_string(&path).map_err(io)?;
                        Self::from_pem(&path, &pem)
                    }
                    Err(e) => Err(io(e)),
                }
            }
            Err(e) => Err(io(e)),
        }
    }

    fn from_pem(path: &Path, pem: &str) -> Result<Self, IdentityError> {
        let key = rcgen::KeyPair::from_pem(pem).map_err(|e| IdentityError::Invalid {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if !key.is_compatible(&rcgen::PKCS_ED25519) {
            return Err(IdentityError::Invalid {
                path: path.display().to_string(),
                reason: "not an Ed25519 key".into(),
            });
        }
        Self::from_key(key)
    }

    fn from_key(key: rcgen::KeyPair) -> Result<Self, IdentityError> {
        let raw: [u8; 32] =
            key.public_key_raw()
                .try_into()
                .map_err(|_| IdentityError::Invalid {
                    path: String::new(),
                    reason: "public key is not 32 bytes".into(),
                })?;
        let cert =
            rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?.self_signed(&key)?;
        Ok(Self {
            id: NodeId(raw),
            cert: cert.der().clone(),
            key_der: key.serialize_der(),
        })
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// Creates `path`, readable only by its owner, atomically: it appears whole
/// or not at all. If it exists already (another process created it first),
/// fails with `AlreadyExists` and leaves it alone.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    // A temporary file of its own: concurrent writers must not share one.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let unique = format!(
        "tmp.{}.{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = path.with_extension(unique);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    // A hard link, unlike a rename, never replaces a file that exists.
    // Where there are no hard links, the last writer wins.
    let placed = written.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => std::fs::rename(&tmp, path),
        linked => linked,
    });
    let _ = std::fs::remove_file(&tmp);
    placed
}

#[derive(Debug, thiserror::Error)]
#[error("peer certificate is not usable: {0}")]
pub struct CertError(String);

/// The node id carried by a certificate: its Ed25519 public key.
pub fn node_id_from_cert(der: &[u8]) -> Result<NodeId, CertError> {
    let (rest, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError("trailing bytes after the certificate".into()));
    }
    let spki = cert.public_key();
    if spki.algorithm.algorithm.to_id_string() != OID_ED25519 {
        return Err(CertError("key is not Ed25519".into()));
    }
    let raw: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| CertError("Ed25519 key is not 32 bytes".into()))?;
    Ok(NodeId(raw))
}

fn cert_error(e: CertError) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

/// Accepts any well-formed Ed25519 certificate and verifies the TLS 1.3
/// handshake signature made with its key. Used on both sides.
#[derive(Debug)]
struct PeerVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(cert_error(CertError("unexpected certificate chain".into())));
        }
        node_id_from_cert(end_entity)
            .map(|_| ())
            .map_err(cert_error)
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

impl ClientCertVerifier for PeerVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not supported".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

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
    #[error("{addr} did not answer within {} s", CONNECT_TIMEOUT.as_secs())]
    Timeout { addr: SocketAddr },
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

fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Flow-control and stream limits for connections we accept: small, since
/// what peers send us is requests and file lists, and one peer must not pin
/// much memory.
fn server_transport() -> quinn::TransportConfig {
    let mut t = base_transport();
    t.max_concurrent_bidi_streams(MAX_STREAMS.into())
        .stream_receive_window((1u32 << 20).into())
        .receive_window((2u32 << 20).into());
    t
}

/// Flow-control for connections we open: large receive windows, since this
/// is the side that downloads.
fn client_transport() -> quinn::TransportConfig {
    let mut t = base_transport();
    // Mesh neighbours we dialled send us their queries on this connection.
    t.max_concurrent_bidi_streams(MAX_STREAMS.into())
        .stream_receive_window((16u32 << 20).into())
        .receive_window((32u32 << 20).into());
    t
}

fn base_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(0u32.into())
        .send_window(16 << 20)
        .keep_alive_interval(Some(KEEP_ALIVE))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT.try_into().expect("idle timeout fits a VarInt"),
        ));
    t
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
}

impl Endpoint {
    /// Binds `addr` and accepts connections for `alpns`.
    pub fn bind(
        identity: Arc<Identity>,
        addr: SocketAddr,
        alpns: &[&[u8]],
    ) -> Result<Self, EndpointError> {
        let config = server_config(&identity, alpns)?;
        let inner = quinn::Endpoint::server(config, addr)
            .map_err(|source| EndpointError::Bind { addr, source })?;
        Ok(Self::wrap(inner, identity))
    }

    /// Like [`Endpoint::bind`], on a socket the caller provides.
    pub fn bind_socket(
        identity: Arc<Identity>,
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        alpns: &[&[u8]],
    ) -> Result<Self, EndpointError> {
        let config = server_config(&identity, alpns)?;
        let addr = socket.local_addr().map_err(|source| EndpointError::Bind {
            addr: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            source,
        })?;
        let inner = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| EndpointError::Bind { addr, source })?;
        Ok(Self::wrap(inner, identity))
    }

    /// An endpoint that only dials out, on an ephemeral port of the family
    /// of `peer`.
    pub fn client(identity: Arc<Identity>, peer: SocketAddr) -> Result<Self, EndpointError> {
        let addr: SocketAddr = match peer {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let inner =
            quinn::Endpoint::client(addr).map_err(|source| EndpointError::Bind { addr, source })?;
        Ok(Self::wrap(inner, identity))
    }

    /// An endpoint that only dials out and reaches both IPv4 and IPv6
    /// addresses: one dual-stack socket (`[::]:0`, IPv4 as mapped
    /// addresses), or an IPv4 one where the host has no IPv6.
    pub fn client_any(identity: Arc<Identity>) -> Result<Self, EndpointError> {
        match dual_stack_socket() {
            Ok(socket) => {
                let inner = quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
                .map_err(|source| EndpointError::Bind {
                    addr: (Ipv6Addr::UNSPECIFIED, 0).into(),
                    source,
                })?;
                Ok(Self::wrap(inner, identity))
            }
            Err(_) => Self::client(identity, (Ipv4Addr::UNSPECIFIED, 0).into()),
        }
    }

    fn wrap(inner: quinn::Endpoint, identity: Arc<Identity>) -> Self {
        Self {
            inner,
            identity,
            client_configs: Default::default(),
        }
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
        Self::client(self.identity.clone(), local)
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
        config.transport_config(Arc::new(client_transport()));
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
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => return Err(ConnectError::Timeout { addr }),
            Ok(Err(e)) if is_alpn_mismatch(&e) => {
                return Err(ConnectError::ProtocolMismatch {
                    addr,
                    alpn: String::from_utf8_lossy(alpn).into_owned(),
                })
            }
            Ok(Err(quinn::ConnectionError::TimedOut)) => {
                return Err(ConnectError::Timeout { addr })
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
) -> Result<quinn::ServerConfig, EndpointError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier()))
        .with_single_cert(vec![identity.cert.clone()], identity.key())?;
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(server_transport()));
    Ok(config)
}

fn verifier() -> PeerVerifier {
    PeerVerifier {
        algs: crypto_provider().signature_verification_algorithms,
    }
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

/// Completes an incoming connection and authenticates its peer.
pub async fn accept(incoming: quinn::Incoming) -> Result<Peer, String> {
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, async { incoming.await })
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let id = peer_id(&conn).ok_or("peer presented no certificate")?;
    Ok(Peer { conn, id })
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("reading from the stream failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("writing to the stream failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("no message within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    #[error("frame not complete within {} s of its header", FRAME_TIMEOUT.as_secs())]
    FrameTimeout,
    #[error("a {len}-byte frame would exceed the bytes this connection or node may buffer")]
    OverBudget { len: usize },
}

impl From<quinn::ReadExactError> for StreamError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(_) => StreamError::Truncated,
            quinn::ReadExactError::ReadError(e) => StreamError::Read(e),
        }
    }
}

/// Reads one frame of at most `max` body bytes; `None` if the stream ended
/// cleanly before a new frame began. The length is checked before the body
/// buffer is allocated, and the body must follow within [`FRAME_TIMEOUT`].
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, StreamError> {
    read_frame_budgeted(recv, max, None).await
}

/// Like [`read_frame`], on a stream of a connection we accepted: the body's
/// bytes are reserved from the connection's budget (and through it the
/// node's) before they are allocated, and given back once it is decoded.
pub async fn read_frame_in<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    inbound: &Inbound,
) -> Result<Option<T>, StreamError> {
    let read = read_frame_budgeted(recv, max, Some(&inbound.budget)).await;
    if let Err(StreamError::OverBudget { .. }) = read {
        inbound.over_budget.inc();
    }
    read
}

async fn read_frame_budgeted<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    budget: Option<&Arc<Budget>>,
) -> Result<Option<T>, StreamError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame::body_len(header, max)?;
    let _reserved = match budget {
        Some(b) => Some(b.try_reserve(len).ok_or(StreamError::OverBudget { len })?),
        None => None,
    };
    let mut body = vec![0u8; len];
    tokio::time::timeout(FRAME_TIMEOUT, recv.read_exact(&mut body))
        .await
        .map_err(|_| StreamError::FrameTimeout)??;
    Ok(Some(frame::decode(&body)?))
}

/// Like [`read_frame`], but the frame must come within `REQUEST_TIMEOUT`.
pub async fn read_first_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, StreamError> {
    tokio::time::timeout(REQUEST_TIMEOUT, read_frame(recv, max))
        .await
        .map_err(|_| StreamError::Timeout)?
}

/// Like [`read_frame_in`], but the frame must come within `REQUEST_TIMEOUT`.
pub async fn read_first_frame_in<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    inbound: &Inbound,
) -> Result<Option<T>, StreamError> {
    tokio::time::timeout(REQUEST_TIMEOUT, read_frame_in(recv, max, inbound))
        .await
        .map_err(|_| StreamError::Timeout)?
}

pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
    max: usize,
) -> Result<(), StreamError> {
    let bytes = frame::encode(msg, max)?;
    send.write_all(&bytes).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(node_id_from_cert(&a.cert).unwrap(), a.id());
        let other = Identity::generate().unwrap();
        assert_ne!(other.id(), a.id());
    }

    #[test]
    fn concurrent_first_starts_agree_on_one_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<NodeId> = std::thread::scope(|s| {
            let starts: Vec<_> = (0..8)
                .map(|_| s.spawn(|| Identity::load_or_create(dir.path()).unwrap().id()))
                .collect();
            starts.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        assert_eq!(Identity::load_or_create(dir.path()).unwrap().id(), ids[0]);
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, ["identity.pem"], "no temporary files left");
    }

    #[test]
    fn garbage_certificates_are_refused() {
        assert!(node_id_from_cert(b"not a certificate").is_err());
        assert!(node_id_from_cert(&[]).is_err());
    }
}
