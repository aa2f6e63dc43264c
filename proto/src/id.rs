//! Node ids and content hashes: 32 bytes on the wire, 64 lowercase hex digits
//! for people.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A hex string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected 64 hexadecimal digits, got {0:?}")]
pub struct ParseIdError(pub String);

macro_rules! bytes32 {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The first ten hex digits: enough to tell nodes apart in logs.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..5])
            }
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($what, "({})"), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 32];
                if s.len() != 64 || hex::decode_to_slice(s, &mut out).is_err() {
                    return Err(ParseIdError(s.chars().take(80).collect()));
                }
                Ok(Self(out))
            }
        }

        // On the wire: a MessagePack bin of exactly 32 bytes.
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("32 bytes")
                    }
                    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<$name, E> {
                        <[u8; 32]>::try_from(v)
                            .map($name)
                            .map_err(|_| E::invalid_length(v.len(), &self))
                    }
                }
                d.deserialize_bytes(V)
            }
        }
    };
}

bytes32!(
    /// A node's identity: its Ed25519 public key. A node is known by this id,
    /// never by its address.
    NodeId,
    "NodeId"
);

bytes32!(
    /// The BLAKE3 hash of a file's whole content (what `b3sum` prints).
    ContentHash,
    "ContentHash"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects_bad_input() {
        let h = ContentHash([0xab; 32]);
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<ContentHash>().unwrap(), h);
        assert!("abc".parse::<ContentHash>().is_err());
        assert!("zz".repeat(32).parse::<ContentHash>().is_err());
        assert_eq!(h.short(), "ababababab");
    }

    #[test]
    fn wrong_length_bytes_are_rejected() {
        let bytes = rmp_serde::to_vec(&serde_bytes_like(&[1u8; 31])).unwrap();
        assert!(rmp_serde::from_slice::<NodeId>(&bytes).is_err());
    }

    fn serde_bytes_like(b: &[u8]) -> impl Serialize + '_ {
        struct B<'a>(&'a [u8]);
        impl Serialize for B<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(self.0)
            }
        }
        B(b)
    }
}
