//! A node's identity: its Ed25519 key pair, kept in the data dir, and the
//! self-signed certificate that carries the public key, from which the
//! node id is read back.
//!
//! Certificates carry no meaning beyond that key: names and dates are
//! ignored, and the id is the key (see [`crate::tls`] for how the handshake
//! proves the peer holds it).

use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use servent_proto::NodeId;

/// The SNI sent by clients and the name in our certificates. Names mean
/// nothing here; ids are checked instead.
pub(crate) const SERVER_NAME: &str = "servent";
/// OID of Ed25519 keys (RFC 8410).
const OID_ED25519: &str = "1.3.101.112";

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
    pub(crate) cert: CertificateDer<'static>,
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

    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
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
pub struct CertError(pub(crate) String);

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
