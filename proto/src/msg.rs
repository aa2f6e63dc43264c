//! Message types of every protocol, with their ALPNs.
//!
//! Encoding (rmp-serde defaults): a struct is a MessagePack array of its
//! fields in declaration order; an enum is a map of one entry from the
//! variant name (a string) to its content, a unit variant the bare name.
//! **Never reorder fields or variants**: the golden-bytes tests pin this.

use serde::{Deserialize, Serialize};

use crate::id::{ContentHash, NodeId};

/// Leaf ↔ supernode: registration of shared files and queries. Version 2:
/// a hit lists every name and size its sources announce.
pub const ALPN_LEAF: &[u8] = b"servent-leaf/2";
/// Leaf ↔ leaf: downloads. Version 3: a file's range layer once, then raw
/// ranges, each checked against it (docs/PROTOCOL.md section 10).
pub const ALPN_TRANSFER: &[u8] = b"servent-xfer/3";
/// Supernode ↔ supernode: the mesh (membership gossip and query routing).
/// Version 3: keyword filters on the control stream, and queries that walk
/// (`Walk`, `Probe`) beside those that flood (docs/PROTOCOL.md 11.7).
pub const ALPN_MESH: &[u8] = b"servent-mesh/3";
/// Leaf ↔ leaf, dialled the other way: a source that cannot be reached
/// dials the downloader that asked for it (through a supernode, with
/// `LeafRequest::Connect`), and the downloader then speaks
/// `servent-xfer/3` on that connection as if it had dialled it
/// (docs/PROTOCOL.md 10.5).
pub const ALPN_PUSH: &[u8] = b"servent-push/1";

/// A file a leaf shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub hash: ContentHash,
    /// The file name without any directory part.
    pub name: String,
    pub size: u64,
}

/// The first frame of every bidirectional stream a leaf opens to a supernode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeafRequest {
    /// Opens the session stream: the leaf serves downloads on `listen_port`
    /// of the address the supernode sees its connection come from. Followed
    /// by `SessionUpdate` frames for the life of the connection.
    Register { listen_port: u16 },
    /// A search; answered by `Hits` frames and the end of the stream.
    Query(Query),
    /// Which other supernodes this one knows; answered by one `Supernodes`
    /// frame and the end of the stream.
    Supernodes,
    /// Have leaf `to`, whose session this supernode holds, dial the asker
    /// (reverse connect and hole punching, docs/PROTOCOL.md 10.5): at the
    /// address this supernode observes this connection come from, never
    /// one the asker names. Answered by one `Connecting` frame, or `Error`.
    Connect { to: NodeId },
    /// Relay a connection to leaf `to`, whose session this supernode holds
    /// (docs/PROTOCOL.md 10.6): answered by one `Relaying` frame, after
    /// which the rest of this stream, both ways, is the tunnel to `to`; or
    /// by `Error`.
    Relay { to: NodeId },
}

/// What to search for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryKind {
    /// Files whose name holds every one of these words.
    Keywords(Vec<String>),
    /// Every source of exactly this content.
    Hash(ContentHash),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query {
    pub kind: QueryKind,
    /// At most this many hits are wanted (capped at `MAX_RESULTS`).
    pub max_results: u32,
}

/// A change to the set of files a leaf shares, sent on the session stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionUpdate {
    Add(Vec<FileEntry>),
    Remove(Vec<ContentHash>),
    /// The leaf offers to become a supernode and states its spare capacity
    /// (sent now and then; a leaf that never sends it is never elected).
    Candidacy(Candidacy),
}

/// What a leaf says of its spare capacity. Claims: the supernode checks
/// what it can itself (reachability by dialling back, uptime by how long
/// the session has lasted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidacy {
    /// Idle CPU, in thousandths of all cores.
    pub cpu_idle_permille: u16,
    /// Memory available, in MiB.
    pub mem_available_mib: u32,
    /// Upload capacity in kbit/s; 0 if unknown.
    pub upload_kbps: u32,
}

/// The first frame of a stream a supernode opens on a leaf's connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SupernodeRequest {
    /// Become a supernode, taking at most `max_leaves` leaves, and mesh
    /// with the supernode that asks. Answered by one `LeafReply`.
    Promote { max_leaves: u32 },
    /// Move: attach to one of these supernodes instead of this one (the
    /// sender is about to drop this leaf). Answered by one `LeafReply`.
    Rehome(Vec<SupernodeInfo>),
    /// Leaf `peer` wants to download from you and is at `addr` (`IP:PORT`,
    /// as this supernode observes it): dial it with `servent-push/1`,
    /// expecting `peer`, and serve it as you would a download. Answered by
    /// one `LeafReply` before the dial starts.
    Connect { peer: NodeId, addr: String },
    /// Leaf `peer` wants to download from you through this supernode
    /// (docs/PROTOCOL.md 10.6): answered by one `LeafReply`; after
    /// `Accepted`, the rest of this stream, both ways, is the tunnel to
    /// `peer`, who dials you through it expecting your node id.
    Relay { peer: NodeId },
}

/// A leaf's answer to a `SupernodeRequest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeafReply {
    Accepted,
    Declined(String),
}

/// Where a file can be downloaded from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub id: NodeId,
    /// `IP:PORT` to dial (ALPN `servent-xfer/3`): the address the supernode
    /// observed for the leaf's connection with the leaf's listening port.
    pub addr: String,
    /// Which entry of the hit's `names` this source announced.
    pub variant: u8,
    /// A push proxy: `IP:PORT` of a supernode holding the source's session,
    /// to ask with `LeafRequest::Connect` when `addr` cannot be dialled.
    /// The empty string means "the node that sent this frame" (the holder
    /// writes it so; each hop that passes the hit on names the neighbour
    /// it came from, and the leaf the supernode it asked). Absent from the
    /// encoding when `None`, so a hit without proxies is encoded as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
}

impl Source {
    /// Names `sender` as the push proxy where the source's says "the node
    /// that sent this frame" (an empty [`Source::via`]).
    pub fn resolve_via(&mut self, sender: &std::net::SocketAddr) {
        if self.via.as_deref() == Some("") {
            self.via = Some(sender.to_string());
        }
    }
}

/// One name and size that sources announce for a content hash. Both are
/// claims: the name is only a label, and a downloader learns the size from
/// the sources themselves (docs/PROTOCOL.md §10.4), never from a hit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NameVariant {
    pub name: String,
    pub size: u64,
}

/// One file found by a query, with every source known for it and every
/// name and size they announce (most independent sources first; see
/// [`crate::hits`]). Self-contained: a hop may drop sources and variants
/// of a hit without looking at any other frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hit {
    pub hash: ContentHash,
    /// At most `MAX_NAMES_PER_HIT`.
    pub names: Vec<NameVariant>,
    pub sources: Vec<Source>,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The message broke a rule of the protocol (see the message text).
    BadRequest,
    /// A cap was reached (files per leaf, name length, ...).
    LimitExceeded,
    /// Too many requests: slow down.
    RateLimited,
    /// The file is not shared here (never announced, or no longer there).
    NotFound,
    /// The node is shutting down or overloaded.
    Unavailable,
    /// The node failed for its own reasons.
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        truncate_utf8(&mut message, crate::limits::MAX_ERROR_MESSAGE);
        Self { code, message }
    }
}

impl std::fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Frames a supernode sends to a leaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SupernodeReply {
    /// Answer to `Register`: the address the supernode sees, as `IP:PORT`.
    Registered { observed_addr: String },
    /// Answer to each `SessionUpdate`: how many files of this leaf are indexed.
    Indexed { files: u32 },
    /// Some hits of a query; more may follow until the stream ends.
    Hits(Vec<Hit>),
    /// The request failed; the stream ends after this frame.
    Error(ErrorReply),
    /// Answer to `Supernodes`.
    Supernodes(Vec<SupernodeInfo>),
    /// Answer to `Register` when this supernode has no room: try these
    /// less loaded ones instead. The connection closes after this frame.
    Full(Vec<SupernodeInfo>),
    /// Answer to `Connect`: the leaf was told, and is dialling the asker
    /// now from `addr`, its session's address as this supernode observes
    /// it; the asker dials `addr` at the same time (the hole punch).
    Connecting { addr: String },
    /// Answer to `Relay`: the leaf accepted; the rest of the stream is the
    /// tunnel to it.
    Relaying,
}

/// What one supernode tells others about a supernode it knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupernodeInfo {
    pub id: NodeId,
    /// `IP:PORT` to dial: observed by the sender, or gossiped to it. A claim,
    /// to be checked by dialling with `id` as the expected node id.
    pub addr: String,
    /// Leaves registered there.
    pub leaves: u32,
    /// Most leaves it takes.
    pub max_leaves: u32,
    /// Seconds since the sender last heard from it (0: a neighbour now).
    pub age_secs: u32,
}

/// The first frame of every bidirectional stream on a mesh connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshRequest {
    /// Opens the control stream (sent by the dialling supernode, once):
    /// it listens on `listen_port` of the address its connection comes from.
    /// Answered by `Welcome` or `Refused`, then `Status` frames flow both
    /// ways for the life of the connection.
    Hello {
        listen_port: u16,
        leaves: u32,
        max_leaves: u32,
    },
    /// A query being routed; answered by `Hits` frames (`SupernodeReply`)
    /// and the end of the stream. A duplicate is answered by the end alone.
    Query(MeshQuery),
    /// A copy of a walked query carrying `walkers` walkers (1 to
    /// `walk::MAX_WALKERS`) with `query.ttl` steps left each (at most
    /// `walk::MAX_STEPS`): answered like `Query`, and passed on as
    /// docs/PROTOCOL.md section 11.7 says.
    Walk { query: MeshQuery, walkers: u8 },
    /// A probe of a walked query: answered from the index like `Query`,
    /// never passed on (`ttl` is not read).
    Probe(MeshQuery),
}

/// The bits of a keyword filter on the wire: a MessagePack `bin`.
#[derive(Clone, PartialEq, Eq)]
pub struct FilterBits(pub Vec<u8>);

impl std::fmt::Debug for FilterBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FilterBits({} bytes)", self.0.len())
    }
}

impl Serialize for FilterBits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for FilterBits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FilterBits;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("filter bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<FilterBits, E> {
                Ok(FilterBits(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<FilterBits, E> {
                Ok(FilterBits(v))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// A query travelling through the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshQuery {
    /// Random, chosen by the supernode of the asking leaf.
    pub id: u64,
    /// Hops left, counting the one that brought it here: the receiver
    /// answers it and forwards it with `ttl - 1` if that is at least 1.
    pub ttl: u8,
    /// Milliseconds the receiver may spend answering, forwarding included.
    pub timeout_ms: u32,
    pub query: Query,
}

/// Frames on the mesh control stream after `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MeshControl {
    /// Accepts a `Hello`: the acceptor's own load.
    Welcome { leaves: u32, max_leaves: u32 },
    /// Refuses a `Hello` (no room, a duplicate link, an address cap); the
    /// connection closes after it.
    Refused(ErrorReply),
    /// Sent every few seconds by each side: its load and the supernodes it
    /// knows (never itself; the receiver knows its address already).
    Status {
        leaves: u32,
        max_leaves: u32,
        known: Vec<SupernodeInfo>,
        /// The sender was a leaf once, elected to the role, and may step
        /// down (`elect`). A claim: it only shapes how readily the
        /// receiver's own election steps down. Absent (a `Status` of
        /// three elements) means `false`.
        #[serde(default)]
        elected: bool,
    },
    /// The sender's whole keyword filter (`crate::filter`): `2^log2`
    /// bits, `log2` from 10 to 22. Sent first on each link, and whenever a
    /// patch would not do.
    Filter { log2: u8, bits: FilterBits },
    /// Bits to flip in the filter sent before on this link (at most
    /// `filter::MAX_PATCH_BITS`).
    FilterPatch(Vec<u32>),
}

/// The only frame a downloader sends on a transfer stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GetRequest {
    /// The file's range layer and which ranges the source has: answered by
    /// `Ranges`, then the layer (32 bytes a range), then the have-bitmap if
    /// the source is partial.
    Layer(ContentHash),
    /// Which ranges the source has now: answered by `Ranges`, then the
    /// have-bitmap if the source is partial.
    Have(ContentHash),
    /// Content bytes: answered by `Ok`, then the bytes.
    Range(RangeRequest),
}

/// Content bytes wanted from a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    pub hash: ContentHash,
    /// First byte wanted.
    pub offset: u64,
    /// Bytes wanted; `None` means up to the end of the file.
    pub length: Option<u64>,
}

/// The header a source sends back, before the raw bytes the request asks
/// for (see docs/PROTOCOL.md) and then the end of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GetReply {
    /// Answers `Range`: `length` content bytes follow.
    Ok {
        size: u64,
        length: u64,
    },
    /// Answers `Layer` and `Have`: the file is `size` bytes; `partial`
    /// says the source has only some of its ranges, and that a bitmap of
    /// them follows (after the layer, for `Layer`).
    Ranges {
        size: u64,
        partial: bool,
    },
    Error(ErrorReply),
}

/// Cut `s` to at most `max` bytes at a char boundary.
pub fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}
