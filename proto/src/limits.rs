//! Every bound of the protocol in one place. `docs/PROTOCOL.md` lists the same
//! numbers; a change here is a change there.

/// Largest frame on a session stream (a batch of file entries).
pub const MAX_UPDATE_FRAME: usize = 1 << 20;
/// Largest first frame of any leaf→supernode stream (register or query).
pub const MAX_REQUEST_FRAME: usize = 16 * 1024;
/// Largest frame a supernode sends to a leaf (a batch of hits).
pub const MAX_REPLY_FRAME: usize = 1 << 20;
/// Largest transfer request or reply header.
pub const MAX_TRANSFER_FRAME: usize = 4 * 1024;

/// File entries in one `Add` batch.
pub const MAX_FILES_PER_UPDATE: usize = 1024;
/// Default cap on files one leaf may have indexed at one supernode.
pub const DEFAULT_MAX_FILES_PER_LEAF: usize = 100_000;
/// Longest file name (UTF-8 bytes) a leaf may announce.
pub const MAX_NAME_BYTES: usize = 255;
/// Keywords in one query, after normalisation.
pub const MAX_QUERY_WORDS: usize = 8;
/// Longest keyword (UTF-8 bytes); longer words are cut at a char boundary.
pub const MAX_WORD_BYTES: usize = 64;
/// Most hits a supernode returns for one query.
pub const MAX_RESULTS: u32 = 500;
/// Hits in one `Hits` frame.
pub const MAX_HITS_PER_FRAME: usize = 100;
/// Sources listed in one hit.
pub const MAX_SOURCES_PER_HIT: usize = 64;
/// Sources at one IP address listed in one hit: one machine is one vote
/// however many keys it makes, and a hit never sends a downloader to one
/// address more than this many times.
pub const MAX_SOURCES_PER_IP: usize = 8;
/// Longest push-proxy address (`Source::via`) kept in a hit: a bracketed
/// IPv6 address with a port fits.
pub const MAX_VIA_BYTES: usize = 64;
/// Hits a supernode writes in one `Hits` frame: with every source at its
/// longest address and push proxy, and every name at its longest, this
/// many stay under `MAX_REPLY_FRAME` (readers take up to
/// `MAX_HITS_PER_FRAME`).
pub const HITS_PER_WRITTEN_FRAME: usize = 50;
/// Distinct names (name and size) listed in one hit.
pub const MAX_NAMES_PER_HIT: usize = 8;
/// Longest error message text.
pub const MAX_ERROR_MESSAGE: usize = 512;

/// Supernodes listed in one `Supernodes`, `Full` or `Status` frame.
pub const MAX_SUPERNODE_INFOS: usize = 64;
/// Largest frame on a mesh stream (a query, a status, a batch of hits).
pub const MAX_MESH_FRAME: usize = 1 << 20;

/// Bytes of a range of the transfer layer: the unit a downloader verifies
/// (256 BLAKE3 chunks, a whole subtree).
pub const RANGE_SIZE: u64 = 256 * 1024;
