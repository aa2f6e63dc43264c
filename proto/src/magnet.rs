//! Links to a file, shaped like a magnet link (docs/PROTOCOL.md 16):
//!
//! ```text
//! servent:?xt=urn:blake3:<64 hex>&dn=<name>&xl=<size>&x.sn=<HOST:PORT>
//! ```
//!
//! `xt` (the content hash) is required and appears once; `dn` (a name,
//! percent-encoded UTF-8), `xl` (the size in bytes) and `x.sn` (supernodes
//! to ask, at most [`MAX_HINTS`]) are optional. Parameters this version
//! does not know are ignored, as magnet links do, but counted: a link has
//! at most [`MAX_PARAMS`] of them and [`MAX_LINK_BYTES`] bytes in all.
//!
//! A link comes from anywhere (a chat, a web page), so it is checked the
//! way a network message is: the name obeys the name rule
//! (`crate::name`, no path separators), the size is at most
//! [`MAX_SIZE`], a hint is at most [`MAX_HINT_BYTES`]. What it claims is
//! only a claim: the hash is what a download verifies, the name and size
//! are shown and compared with what sources say, and a hint is one more
//! supernode to ask, dialled like any other.

use std::fmt;

use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, CONTROLS};

use crate::id::ContentHash;
use crate::name;

/// The scheme, with the `?` that starts the parameters.
pub const PREFIX: &str = "servent:?";
/// The content hash's URN prefix.
pub const URN: &str = "urn:blake3:";
/// Longest link taken, in bytes.
pub const MAX_LINK_BYTES: usize = 4096;
/// Most parameters in a link, known or not.
pub const MAX_PARAMS: usize = 32;
/// Most `x.sn` hints kept.
pub const MAX_HINTS: usize = 8;
/// Longest `x.sn` hint (`HOST:PORT`), in bytes.
pub const MAX_HINT_BYTES: usize = 261;
/// Largest size a link may state: 2^50 bytes (1 PiB), far beyond any file
/// shared, far below where sizes overflow the arithmetic of ranges.
pub const MAX_SIZE: u64 = 1 << 50;

/// A link to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub hash: ContentHash,
    pub name: Option<String>,
    pub size: Option<u64>,
    /// Supernodes to ask, `HOST:PORT`.
    pub supernodes: Vec<String>,
}

/// Why a link was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("not a servent link: it must start with `servent:?`")]
    Scheme,
    #[error("the link is {0} bytes long, more than {MAX_LINK_BYTES}")]
    TooLong(usize),
    #[error("the link has more than {MAX_PARAMS} parameters")]
    TooManyParams,
    #[error("the link has no `xt=urn:blake3:<64 hex digits>`")]
    NoHash,
    #[error("the link has more than one `xt`")]
    TwoHashes,
    #[error("`xt` is not `urn:blake3:` and 64 hex digits: {0}")]
    BadHash(String),
    #[error("`{0}` appears twice")]
    Twice(&'static str),
    #[error("`{0}` is not valid percent-encoded UTF-8")]
    BadEncoding(&'static str),
    #[error("the name `dn` is refused: {0}")]
    BadName(name::NameError),
    #[error("the size `xl` is not a number of bytes: {0}")]
    BadSize(String),
    #[error("the size `xl` is {0} bytes, more than {MAX_SIZE}")]
    HugeSize(u64),
    #[error("the supernode hint `x.sn` is not HOST:PORT: {0}")]
    BadHint(String),
}

/// What `dn` and `x.sn` keep encoded: controls, space and what separates
/// or starts URL parts, `%` itself, and every non-ASCII byte.
const ENCODED: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'<')
    .add(b'>')
    .add(b'=')
    .add(b'?')
    .add(b'`')
    .add(b'\\')
    .add(b'/');

impl Link {
    /// A link to the file with `hash`, named `name`, of `size` bytes.
    pub fn new(hash: ContentHash, name: &str, size: u64) -> Self {
        Self {
            hash,
            name: Some(name.to_string()),
            size: Some(size),
            supernodes: Vec::new(),
        }
    }

    /// Whether `text` looks like a link (it may still be a bad one): what
    /// a search box or `leaf get` uses to tell a link from a query or a
    /// bare hash.
    pub fn is_link(text: &str) -> bool {
        text.get(..PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(PREFIX))
    }

    /// Parses and checks a link.
    pub fn parse(text: &str) -> Result<Self, LinkError> {
        let text = text.trim();
        if text.len() > MAX_LINK_BYTES {
            return Err(LinkError::TooLong(text.len()));
        }
        if !Self::is_link(text) {
            return Err(LinkError::Scheme);
        }
        let mut hash = None;
        let (mut name, mut size) = (None, None);
        let mut supernodes = Vec::new();
        for (i, param) in text[PREFIX.len()..].split('&').enumerate() {
            if i >= MAX_PARAMS {
                return Err(LinkError::TooManyParams);
            }
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key {
                "xt" => {
                    if hash.is_some() {
                        return Err(LinkError::TwoHashes);
                    }
                    hash = Some(parse_hash(value)?);
                }
                "dn" => {
                    if name.is_some() {
                        return Err(LinkError::Twice("dn"));
                    }
                    let raw = decode(value, "dn")?;
                    name = Some(name::sanitise(&raw).map_err(LinkError::BadName)?);
                }
                "xl" => {
                    if size.is_some() {
                        return Err(LinkError::Twice("xl"));
                    }
                    let n: u64 = value
                        .parse()
                        .map_err(|_| LinkError::BadSize(shown(value)))?;
                    if n > MAX_SIZE {
                        return Err(LinkError::HugeSize(n));
                    }
                    size = Some(n);
                }
                "x.sn" => {
                    let hint = decode(value, "x.sn")?;
                    check_hint(&hint)?;
                    if supernodes.len() < MAX_HINTS && !supernodes.contains(&hint) {
                        supernodes.push(hint);
                    }
                }
                // Unknown: ignored, like magnet links' unknown parameters.
                _ => {}
            }
        }
        Ok(Self {
            hash: hash.ok_or(LinkError::NoHash)?,
            name,
            size,
            supernodes,
        })
    }
}

impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}xt={URN}{}", self.hash)?;
        if let Some(name) = &self.name {
            write!(f, "&dn={}", utf8_percent_encode(name, ENCODED))?;
        }
        if let Some(size) = self.size {
            write!(f, "&xl={size}")?;
        }
        for sn in &self.supernodes {
            write!(f, "&x.sn={}", utf8_percent_encode(sn, ENCODED))?;
        }
        Ok(())
    }
}

fn parse_hash(value: &str) -> Result<ContentHash, LinkError> {
    let hex = value
        .get(..URN.len())
        .filter(|p| p.eq_ignore_ascii_case(URN))
        .map(|_| &value[URN.len()..])
        .ok_or_else(|| LinkError::BadHash(shown(value)))?;
    if hex.len() != 64 {
        return Err(LinkError::BadHash(shown(value)));
    }
    hex.parse().map_err(|_| LinkError::BadHash(shown(value)))
}

/// `value` percent-decoded (`+` is a plus, as in RFC 3986, not a space).
fn decode(value: &str, key: &'static str) -> Result<String, LinkError> {
    percent_decode_str(value)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| LinkError::BadEncoding(key))
}

/// A hint must look like `HOST:PORT`: a port that parses, and a host of
/// letters, digits, dots, hyphens, or an IPv6 address in brackets.
fn check_hint(hint: &str) -> Result<(), LinkError> {
    let bad = || LinkError::BadHint(shown(hint));
    if hint.len() > MAX_HINT_BYTES {
        return Err(bad());
    }
    let (host, port) = hint.rsplit_once(':').ok_or_else(bad)?;
    let port_ok = port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        }
    };
    if port_ok && host_ok {
        Ok(())
    } else {
        Err(bad())
    }
}

/// A piece of a link for an error message: at most 80 characters, with
/// anything a terminal would act on escaped.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_debug).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash() -> ContentHash {
        ContentHash(*blake3::hash(b"hello").as_bytes())
    }

    #[test]
    fn a_link_made_is_the_link_parsed() {
        let mut link = Link::new(
            hash(),
            "Blue Moon & Co/?#% é.flac".replace('/', "-").as_str(),
            42,
        );
        link.supernodes = vec!["sn1.example.org:7400".into(), "[2001:db8::1]:7400".into()];
        let text = link.to_string();
        assert!(text.starts_with("servent:?xt=urn:blake3:"), "{text}");
        assert!(!text.contains(' ') && !text.contains('é'), "{text}");
        assert_eq!(Link::parse(&text), Ok(link));
        // Only the hash is needed.
        let bare = format!("servent:?xt=urn:blake3:{}", hash());
        let parsed = Link::parse(&bare).unwrap();
        assert_eq!(
            (parsed.hash, parsed.name, parsed.size),
            (hash(), None, None)
        );
        // The scheme and the URN in any case; hex in upper case.
        let upper = format!(
            "SERVENT:?xt=URN:BLAKE3:{}",
            hash().to_string().to_uppercase()
        );
        assert_eq!(Link::parse(&upper).unwrap().hash, hash());
        // Unknown parameters are ignored.
        let extra = format!("{bare}&tr=udp://x&x.future=1");
        assert_eq!(Link::parse(&extra).unwrap().hash, hash());
    }

    #[test]
    fn malformed_and_hostile_links_are_refused_with_a_reason() {
        let h = hash().to_string();
        let cases: Vec<(String, LinkError)> = vec![
            ("magnet:?xt=urn:btih:abc".into(), LinkError::Scheme),
            ("servent:?dn=x".into(), LinkError::NoHash),
            (
                format!("servent:?xt=urn:blake3:{}", &h[..63]),
                LinkError::BadHash(format!("urn:blake3:{}", &h[..63])),
            ),
            (
                format!("servent:?xt=urn:sha1:{h}"),
                LinkError::BadHash(format!("urn:sha1:{h}")),
            ),
            (
                format!("servent:?xt=urn:blake3:{h}&xt=urn:blake3:{h}"),
                LinkError::TwoHashes,
            ),
            (
                format!("servent:?xt=urn:blake3:{h}&xl=99999999999999999999"),
                LinkError::BadSize("99999999999999999999".into()),
            ),
            (
                format!("servent:?xt=urn:blake3:{h}&xl={}", MAX_SIZE + 1),
                LinkError::HugeSize(MAX_SIZE + 1),
            ),
            (
                format!("servent:?xt=urn:blake3:{h}&xl=-1"),
                LinkError::BadSize("-1".into()),
            ),
            (
                format!("servent:?xt=urn:blake3:{h}&dn=%ff"),
                LinkError::BadEncoding("dn"),
            ),
            (
                format!("servent:?xt=urn:blake3:{h}&x.sn=a%20b:1"),
                LinkError::BadHint("a b:1".into()),
            ),
            (
                format!("servent:?xt=urn:blake3:{h}&x.sn=host:0"),
                LinkError::BadHint("host:0".into()),
            ),
            (
                format!("servent:?xt=urn:blake3:{h}&dn=a&dn=b"),
                LinkError::Twice("dn"),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Link::parse(&text), Err(want), "{text}");
        }
        // Path separators and dot names, encoded or not, are refused.
        for dn in ["..%2f..%2fetc%2fpasswd", "a%5cb", "..", "a/b", "%00x", ""] {
            let text = format!("servent:?xt=urn:blake3:{h}&dn={dn}");
            assert!(
                matches!(Link::parse(&text), Err(LinkError::BadName(_))),
                "{text}: {:?}",
                Link::parse(&text)
            );
        }
        let long = format!(
            "servent:?xt=urn:blake3:{h}&dn={}",
            "a".repeat(MAX_LINK_BYTES)
        );
        assert!(matches!(Link::parse(&long), Err(LinkError::TooLong(_))));
        let many = format!("servent:?xt=urn:blake3:{h}{}", "&a=1".repeat(MAX_PARAMS));
        assert_eq!(Link::parse(&many), Err(LinkError::TooManyParams));
    }

    #[test]
    fn hints_are_capped_and_kept_once() {
        let h = hash();
        let mut text = format!("servent:?xt=urn:blake3:{h}");
        for i in 0..20 {
            text.push_str(&format!("&x.sn=sn{}.example:7400", i % 10));
        }
        let link = Link::parse(&text).unwrap();
        assert_eq!(link.supernodes.len(), MAX_HINTS);
        assert_eq!(link.supernodes[0], "sn0.example:7400");
    }
}
