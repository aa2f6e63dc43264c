//! Who may use the control API (docs/API.md, "Authentication"): the key
//! kept in the data dir, and the `Host` and `Origin` checks against DNS
//! rebinding and cross-site requests. The checks are pure: they take the
//! headers and return the refusal.

use std::net::SocketAddr;
use std::path::Path;

/// The key's file in the data dir.
pub const KEY_FILE: &str = "api.key";
/// The header the key comes in.
pub const KEY_HEADER: &str = "x-servent-key";

/// Why a request is refused (401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no Host header")]
    NoHost,
    #[error("Host {0:?} is not this daemon (a DNS rebinding?)")]
    ForeignHost(String),
    #[error("Origin {0:?} is another site")]
    ForeignOrigin(String),
    #[error("no key: send the X-Servent-Key header (the key is in the URL `leaf serve` printed)")]
    NoKey,
    #[error("wrong key")]
    WrongKey,
}

/// Whether `host` (a `Host` header) names the daemon bound at `bound`: a
/// loopback name with its port, or the bound address itself.
fn is_ours(host: &str, bound: SocketAddr) -> bool {
    let port = bound.port();
    let loopback = [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        bound.to_string(),
    ];
    loopback.iter().any(|h| h.eq_ignore_ascii_case(host))
}

/// Checks the `Host` and `Origin` of a request to the daemon at `bound`.
pub fn check_site(
    host: Option<&str>,
    origin: Option<&str>,
    bound: SocketAddr,
) -> Result<(), Refusal> {
    let host = host.ok_or(Refusal::NoHost)?;
    if !is_ours(host, bound) {
        return Err(Refusal::ForeignHost(host.to_string()));
    }
    if let Some(origin) = origin {
        let ours = origin
            .strip_prefix("http://")
            .is_some_and(|h| is_ours(h, bound));
        if !ours {
            return Err(Refusal::ForeignOrigin(origin.to_string()));
        }
    }
    Ok(())
}

/// Checks the key a request sent against the daemon's, in time that does
/// not depend on where they differ.
pub fn check_key(sent: Option<&[u8]>, key: &str) -> Result<(), Refusal> {
    let sent = sent.ok_or(Refusal::NoKey)?;
    let key = key.as_bytes();
    let differ =
        sent.len() != key.len() || sent.iter().zip(key).fold(0u8, |acc, (a, b)| acc | (a ^ b)) != 0;
    match differ {
        true => Err(Refusal::WrongKey),
        false => Ok(()),
    }
}

/// The daemon's key: read from the data dir, or made (32 random bytes, in
/// hex) and written there, readable by its owner only, on first start.
pub fn load_or_create_key(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join(KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(k) if k.trim().len() == 64 && k.trim().bytes().all(|b| b.is_ascii_hexdigit()) => {
            return Ok(k.trim().to_string())
        }
        Ok(_) => tracing::warn!("{} is not a key; making a new one", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let key = hex::encode(bytes);
    // A temporary file is its owner's only (0600 on Unix), and the rename
    // keeps that.
    crate::replace_file(&path, key.as_bytes())?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound() -> SocketAddr {
        "127.0.0.1:7402".parse().unwrap()
    }

    #[test]
    fn only_the_daemons_own_host_and_origin_pass() {
        let ok = |h, o| check_site(Some(h), o, bound());
        assert_eq!(ok("127.0.0.1:7402", None), Ok(()));
        assert_eq!(ok("localhost:7402", Some("http://localhost:7402")), Ok(()));
        assert_eq!(ok("[::1]:7402", Some("http://127.0.0.1:7402")), Ok(()));
        assert!(matches!(
            ok("evil.example:7402", None),
            Err(Refusal::ForeignHost(_))
        ));
        assert!(matches!(
            ok("127.0.0.1:80", None),
            Err(Refusal::ForeignHost(_))
        ));
        assert!(matches!(
            ok("127.0.0.1:7402", Some("http://evil.example")),
            Err(Refusal::ForeignOrigin(_))
        ));
        assert!(matches!(
            ok("127.0.0.1:7402", Some("null")),
            Err(Refusal::ForeignOrigin(_))
        ));
        assert!(matches!(
            ok("127.0.0.1:7402", Some("https://127.0.0.1:7402")),
            Err(Refusal::ForeignOrigin(_))
        ));
        assert_eq!(check_site(None, None, bound()), Err(Refusal::NoHost));
    }

    #[test]
    fn the_key_must_match_exactly() {
        let key = "ab".repeat(32);
        assert_eq!(check_key(Some(key.as_bytes()), &key), Ok(()));
        assert_eq!(check_key(None, &key), Err(Refusal::NoKey));
        assert_eq!(check_key(Some(b"ab"), &key), Err(Refusal::WrongKey));
        let mut wrong = key.clone().into_bytes();
        wrong[63] = b'c';
        assert_eq!(check_key(Some(&wrong), &key), Err(Refusal::WrongKey));
    }

    #[test]
    fn the_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let key = load_or_create_key(dir.path()).unwrap();
        assert_eq!(key.len(), 64);
        assert_eq!(load_or_create_key(dir.path()).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the key is readable by others: {mode:o}");
        }
    }
}
