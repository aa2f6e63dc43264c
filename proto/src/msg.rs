//! Message types of every protocol, with their ALPNs.
//!
//! Encoding (rmp-serde defaults): a struct is a MessagePack array of its
//! fields in declaration order; an enum is a map of one entry from the
//! variant name (a string) to its content, a unit variant the bare name.
//! **Never reorder fields or variants**: the golden-bytes tests pin this.

use serde::{Deserialize, Serialize};

use crate::id::{ContentHash, NodeId};

/// Leaf ↔ supernode: registration of shared files and queries.
pub const ALPN_LEAF: &[u8] = b"servent-leaf/1";
/// Leaf ↔ leaf: downloads.
pub const ALPN_TRANSFER: &[u8] = b"servent-xfer/1";

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
}

/// Where a file can be downloaded from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub id: NodeId,
    /// `IP:PORT` to dial (ALPN `servent-xfer/1`): the address the supernode
    /// observed for the leaf's connection with the leaf's listening port.
    pub addr: String,
}

/// One file found by a query, with every source known for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hit {
    pub hash: ContentHash,
    pub name: String,
    pub size: u64,
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
}

/// The only frame a downloader sends on a transfer stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetRequest {
    pub hash: ContentHash,
    /// First byte wanted.
    pub offset: u64,
    /// Bytes wanted; `None` means up to the end of the file.
    pub length: Option<u64>,
}

/// The header a source sends back; after `Ok`, exactly `length` raw bytes
/// follow and then the end of the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GetReply {
    Ok { size: u64, length: u64 },
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
