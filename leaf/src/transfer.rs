//! Leaf ↔ leaf transfer (ALPN `servent-xfer/2`): serving shared files, and
//! downloading one from all its sources at once.
//!
//! A request names content by hash, never by path, so a downloader can only
//! ever get what this leaf announced. A source answers a range with a bao
//! slice: the content bytes interleaved with the BLAKE3 tree nodes that
//! prove them against the root hash, so a downloader checks every
//! [`CHUNK_SIZE`] range as it arrives, drops a source at its first bad
//! range, and can take different ranges from different sources. Verified
//! ranges are written into a preallocated partial file and recorded in a
//! state file beside it, so a download killed at any point resumes from
//! what it had verified. The partial file is renamed into place only when
//! every range is verified and the whole file hashes to the root.
//!
//! Not here: finding sources (see [`crate::search`]); serving partial files.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use servent_proto::limits::MAX_TRANSFER_FRAME;
use servent_proto::msg::{ErrorCode, ErrorReply, GetReply, GetRequest, Source, ALPN_TRANSFER};
use servent_proto::rate::TokenBucket;
use servent_proto::ContentHash;
use supernode::net::{self, Endpoint, Peer};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::share::{Share, PART_SUFFIX};

/// Content bytes a downloader asks one source for at a time: the unit of
/// scheduling, verification and resume. 256 bao chunks of 1 KiB, a power of
/// two, so every range but the last is one whole subtree of the hash tree.
pub const CHUNK_SIZE: u64 = 256 * 1024;
/// Bytes read from disk at a time when serving; also the unit the upload
/// rate cap grants, so small enough to interleave uploads finely.
const CHUNK: usize = 64 * 1024;
/// Requests each source has in flight at once (two workers), so that a
/// round trip between two ranges does not idle the link.
pub const PER_SOURCE: usize = 2;
/// A range that takes longer than this drops its source.
const RANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunks in flight between the disk thread and the network task.
const PIPELINE: usize = 16;
/// An upload whose downloader accepts nothing for this long is dropped.
const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// Uploads served at once; more wait their turn.
pub const MAX_CONCURRENT_UPLOADS: usize = 16;

/// The upload side of a leaf: its slots, its rate limit, and what it has
/// served.
#[derive(Debug)]
pub struct Uploads {
    slots: Semaphore,
    /// Bytes a second for all uploads together, if capped. The mutex is
    /// tokio's, which queues waiters in order: uploads take their turn at
    /// the bucket, so each gets its share of the rate.
    rate: Option<tokio::sync::Mutex<TokenBucket>>,
    /// Uploads sent whole (a range counts as one).
    pub served: Counter,
    /// Bytes of file content in the ranges sent whole (proof bytes not
    /// counted).
    pub bytes: Counter,
}

impl Default for Uploads {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Uploads {
    /// Uploads capped at `max_rate` bytes a second in all, if given (with a
    /// burst of one second's worth).
    pub fn new(max_rate: Option<u64>) -> Self {
        let rate = max_rate.filter(|r| *r > 0).map(|r| {
            let burst = u32::try_from(r).unwrap_or(u32::MAX);
            tokio::sync::Mutex::new(TokenBucket::new(r as f64, burst, Instant::now()))
        });
        Self {
            slots: Semaphore::new(MAX_CONCURRENT_UPLOADS),
            rate,
            served: Counter::default(),
            bytes: Counter::default(),
        }
    }

    /// Waits until `bytes` more may be sent under the rate cap.
    async fn pace(&self, bytes: usize) {
        if let Some(rate) = &self.rate {
            // Held while waiting: the next upload in the queue goes after.
            let mut bucket = rate.lock().await;
            let wait = bucket.take_many(bytes as f64, Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Serves downloads on one accepted connection until it closes.
pub async fn serve(share: Arc<Share>, uploads: Arc<Uploads>, peer: Peer) {
    loop {
        let (send, recv) = match peer.conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(reason = %e, "transfer connection ended");
                return;
            }
        };
        let share = share.clone();
        let uploads = uploads.clone();
        tokio::spawn(
            async move {
                if let Err(e) = serve_stream(share, uploads, send, recv).await {
                    debug!(error = %e, "upload ended early");
                }
            }
            .in_current_span(),
        );
    }
}

async fn serve_stream(
    share: Arc<Share>,
    uploads: Arc<Uploads>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), net::StreamError> {
    let refuse = |code, msg: String| GetReply::Error(ErrorReply::new(code, msg));
    let req: GetRequest = match net::read_first_frame(&mut recv, MAX_TRANSFER_FRAME).await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            let reply = refuse(ErrorCode::BadRequest, format!("bad request: {e}"));
            net::write_frame(&mut send, &reply, MAX_TRANSFER_FRAME).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let Ok(_permit) = uploads.slots.acquire().await else {
        return Ok(());
    };
    let opened = share.get(&req.hash).ok_or(()).and_then(|f| {
        let outboard = std::fs::File::open(share.outboard_path(&req.hash));
        match share.open_verified(&f).and_then(|h| Ok((h, outboard?))) {
            Ok(h) => Ok((f, h)),
            Err(e) => {
                debug!(path = %f.path.display(), error = %e, "refusing a shared file");
                Err(())
            }
        }
    });
    let (file, (handle, outboard)) = match opened {
        Ok(x) => x,
        Err(()) => {
            let reply = refuse(
                ErrorCode::NotFound,
                format!("{} is not shared here", req.hash),
            );
            net::write_frame(&mut send, &reply, MAX_TRANSFER_FRAME).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let size = file.stamp.size;
    if req.offset > size {
        let reply = refuse(
            ErrorCode::BadRequest,
            format!("offset {} is past the end ({size} bytes)", req.offset),
        );
        net::write_frame(&mut send, &reply, MAX_TRANSFER_FRAME).await?;
        let _ = send.finish();
        return Ok(());
    }
    let length = req.length.unwrap_or(u64::MAX).min(size - req.offset);
    debug!(hash = %req.hash.short(), offset = req.offset, length, "upload");
    net::write_frame(
        &mut send,
        &GetReply::Ok { size, length },
        MAX_TRANSFER_FRAME,
    )
    .await?;

    // Disk reads and slice extraction on a blocking thread, network writes
    // here, overlapped.
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(PIPELINE);
    let offset = req.offset;
    tokio::task::spawn_blocking(move || {
        let slice = bao::encode::SliceExtractor::new_outboard(handle, outboard, offset, length);
        read_slice(slice, tx)
    });
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.map_err(|e| {
            warn!(error = %e, "reading a shared file failed");
            let _ = send.reset(1u32.into());
            net::StreamError::Truncated
        })?;
        uploads.pace(chunk.len()).await;
        // A downloader that stops reading must not hold an upload slot forever.
        match tokio::time::timeout(WRITE_STALL, send.write_chunk(chunk)).await {
            Ok(r) => r?,
            Err(_) => {
                let _ = send.reset(2u32.into());
                return Err(net::StreamError::Timeout);
            }
        }
    }
    let _ = send.finish();
    uploads.served.inc();
    uploads.bytes.inc_by(length);
    let _ = send.stopped().await;
    Ok(())
}

/// Streams a bao slice until its end. A file that shrank under us makes
/// the extractor fail, which resets the stream: never a short slice that
/// looks complete.
fn read_slice(mut slice: impl Read, tx: mpsc::Sender<std::io::Result<Bytes>>) {
    loop {
        let mut buf = vec![0u8; CHUNK];
        let mut filled = 0;
        while filled < CHUNK {
            match slice.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
        if filled == 0 {
            return;
        }
        buf.truncate(filled);
        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() || filled < CHUNK {
            return;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("no source for {0}")]
    NoSource(ContentHash),
    #[error("every source failed; last: {0}")]
    SourcesFailed(String),
    #[error("hash mismatch: source {source_id} sent content that is not {hash}; it was discarded")]
    HashMismatch {
        hash: ContentHash,
        source_id: String,
    },
    #[error("hash mismatch: the assembled file is not {0}; it was discarded")]
    WholeFileMismatch(ContentHash),
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Why one source did not deliver.
#[derive(Debug, thiserror::Error)]
enum SourceError {
    #[error(transparent)]
    Connect(#[from] net::ConnectError),
    #[error("source {addr} refused: {reply}")]
    Refused { addr: String, reply: ErrorReply },
    #[error("source {addr} went away: {reason}")]
    Gone { addr: String, reason: String },
    #[error("source {addr} broke the protocol: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("source {addr} sent a range that does not verify against the hash")]
    Mismatch { addr: String },
    #[error("bad source address {0:?}")]
    Addr(String),
    #[error("cannot write the partial file: {0}")]
    Io(std::io::Error),
}

/// The partial file beside `target`: `.NAME.servent-part`.
pub fn part_path(target: &Path) -> PathBuf {
    hidden_beside(target, PART_SUFFIX)
}

/// Which ranges of the partial file are verified: `.NAME.servent-state`.
pub fn state_path(target: &Path) -> PathBuf {
    hidden_beside(target, ".servent-state")
}

fn hidden_beside(target: &Path, suffix: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}{suffix}"))
}

/// How a download is going, for progress displays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Size of the whole file.
    pub size: u64,
    /// Bytes verified so far, including those kept from an earlier run.
    pub verified: u64,
    /// Bytes verified by this run (what came over the network).
    pub fetched: u64,
    /// Sources delivering now.
    pub sources: usize,
}

/// What the state file holds: enough to trust the partial file's verified
/// ranges after a crash. Written after the range's bytes are, so a range it
/// lists is on disk (the whole-file check at the end catches a power loss).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedState {
    hash: String,
    size: u64,
    chunk_size: u64,
    /// One bit a range, range i at bit i % 8 of byte i / 8, as hex.
    verified: String,
}

/// The scheduler: which range goes to which source next.
#[derive(Debug)]
struct Ranges {
    slots: Vec<Slot>,
    /// Ranges nobody has verified yet.
    left: usize,
    progress: Progress,
}

#[derive(Debug, Default, Clone)]
struct Slot {
    done: bool,
    /// Sources fetching this range now (more than one only in the endgame).
    fetching: Vec<usize>,
}

impl Ranges {
    /// The range `source` should fetch next: the first nobody has; once
    /// every range is taken (the endgame), one in flight elsewhere with the
    /// fewest fetchers, so that a slow or vanished source holds nothing up.
    fn claim(&mut self, source: usize) -> Option<usize> {
        let pick = self
            .slots
            .iter()
            .position(|s| !s.done && s.fetching.is_empty())
            .or_else(|| {
                self.slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !s.done && !s.fetching.contains(&source))
                    .min_by_key(|(_, s)| s.fetching.len())
                    .map(|(i, _)| i)
            })?;
        self.slots[pick].fetching.push(source);
        Some(pick)
    }

    fn release(&mut self, index: usize, source: usize) {
        self.slots[index].fetching.retain(|&s| s != source);
    }

    fn bitmap(&self) -> String {
        let mut bytes = vec![0u8; self.slots.len().div_ceil(8)];
        for (i, s) in self.slots.iter().enumerate() {
            if s.done {
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        hex::encode(bytes)
    }
}

/// A range claimed by one source; released on drop unless completed, so
/// that a source that fails, or a request that is cancelled, costs only
/// the ranges it had in flight.
struct Claim<'a> {
    job: &'a Job,
    index: usize,
    source: usize,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.job.ranges().release(self.index, self.source);
    }
}

/// One download, shared by its source tasks.
struct Job {
    hash: ContentHash,
    size: u64,
    state: PathBuf,
    /// The partial file, preallocated; written at offsets.
    file: Mutex<std::fs::File>,
    ranges: Mutex<Ranges>,
    progress: Option<watch::Sender<Progress>>,
}

impl Job {
    fn ranges(&self) -> std::sync::MutexGuard<'_, Ranges> {
        self.ranges.lock().expect("ranges lock")
    }

    fn range(&self, index: usize) -> (u64, u64) {
        let offset = index as u64 * CHUNK_SIZE;
        (offset, CHUNK_SIZE.min(self.size - offset))
    }

    fn publish(&self, ranges: &Ranges) {
        if let Some(tx) = &self.progress {
            tx.send_replace(ranges.progress);
        }
    }

    fn sources_changed(&self, delta: isize) {
        let mut r = self.ranges();
        r.progress.sources = r.progress.sources.saturating_add_signed(delta);
        self.publish(&r);
    }

    /// Writes a verified range at its offset and records it. Blocking.
    fn store(&self, index: usize, data: &[u8]) -> std::io::Result<()> {
        let (offset, _) = self.range(index);
        let mut file = self.file.lock().expect("part file lock");
        if self.ranges().slots[index].done {
            // Another source won this range in the endgame.
            return Ok(());
        }
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(data)?;
        let bitmap = {
            let mut r = self.ranges();
            r.slots[index].done = true;
            r.left -= 1;
            r.progress.verified += data.len() as u64;
            r.progress.fetched += data.len() as u64;
            self.publish(&r);
            r.bitmap()
        };
        // Under the file lock: state saves never race each other.
        save_state(
            &self.state,
            &SavedState {
                hash: self.hash.to_string(),
                size: self.size,
                chunk_size: CHUNK_SIZE,
                verified: bitmap,
            },
        )
    }
}

fn save_state(path: &Path, state: &SavedState) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let bytes = serde_json::to_vec(state).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// Opens the partial file and what an earlier run verified of it; starts
/// afresh (a preallocated empty file) when there is no state for this
/// very content.
fn open_job(
    hash: ContentHash,
    size: u64,
    target: &Path,
) -> std::io::Result<(std::fs::File, Vec<bool>)> {
    let part = part_path(target);
    let n = size.div_ceil(CHUNK_SIZE) as usize;
    let saved = std::fs::read(state_path(target))
        .ok()
        .and_then(|b| serde_json::from_slice::<SavedState>(&b).ok())
        .filter(|s| s.hash == hash.to_string() && s.size == size && s.chunk_size == CHUNK_SIZE)
        .and_then(|s| hex::decode(s.verified).ok())
        .filter(|bits| bits.len() == n.div_ceil(8));
    let existing = std::fs::metadata(&part).map(|m| m.len()).ok();
    if let (Some(bits), Some(len)) = (saved, existing) {
        if len == size {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&part)?;
            let done = (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect();
            return Ok((file, done));
        }
    }
    let _ = std::fs::remove_file(state_path(target));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&part)?;
    file.set_len(size)?;
    Ok((file, vec![false; n]))
}

/// What a finished download did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Downloaded {
    pub size: u64,
    /// Bytes that came over the network in this run (the rest was resumed).
    pub fetched: u64,
}

/// Downloads `hash` (of `size` bytes, as the hit says; the proofs check
/// it) from all `sources` at once into `target`. Resumes from what an
/// earlier run verified; writes `target` only once every byte matches the
/// hash. Dropping the future stops every transfer, leaving a partial file
/// and its state to resume from.
pub async fn download(
    endpoint: &Endpoint,
    hash: ContentHash,
    size: u64,
    sources: &[Source],
    target: &Path,
    progress: Option<watch::Sender<Progress>>,
) -> Result<Downloaded, GetError> {
    download_joining(endpoint, hash, size, sources, target, progress, None).await
}

/// [`download`], where sources found later (by a repeated query) arrive
/// in batches on `more` and join in. A batch may repeat known sources; a
/// source already used, or dropped, is not used again.
pub async fn download_joining(
    endpoint: &Endpoint,
    hash: ContentHash,
    size: u64,
    sources: &[Source],
    target: &Path,
    progress: Option<watch::Sender<Progress>>,
    mut more: Option<mpsc::Receiver<Vec<Source>>>,
) -> Result<Downloaded, GetError> {
    let mut seen = HashSet::new();
    let sources: Vec<Source> = sources
        .iter()
        .filter(|s| seen.insert(s.id))
        .cloned()
        .collect();
    if sources.is_empty() {
        return Err(GetError::NoSource(hash));
    }
    let part = part_path(target);
    let io_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| GetError::Io { path, source }
    };
    let (file, done) = {
        let target = target.to_path_buf();
        tokio::task::spawn_blocking(move || open_job(hash, size, &target))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(io_err(&part))?
    };
    let verified: u64 = done
        .iter()
        .enumerate()
        .filter(|(_, d)| **d)
        .map(|(i, _)| CHUNK_SIZE.min(size - i as u64 * CHUNK_SIZE))
        .sum();
    let left = done.iter().filter(|d| !**d).count();
    if verified > 0 {
        info!(verified, size, "resuming");
    }
    let job = Arc::new(Job {
        hash,
        size,
        state: state_path(target),
        file: Mutex::new(file),
        ranges: Mutex::new(Ranges {
            slots: done
                .into_iter()
                .map(|done| Slot {
                    done,
                    fetching: Vec::new(),
                })
                .collect(),
            left,
            progress: Progress {
                size,
                verified,
                fetched: 0,
                sources: 0,
            },
        }),
        progress,
    });
    job.publish(&job.ranges());

    let mut tasks = JoinSet::new();
    let mut spawned = 0;
    let mut spawn = |tasks: &mut JoinSet<_>, source: Source| {
        let span = tracing::info_span!("get", source = %source.id.short(), addr = %source.addr);
        let (job, endpoint, i) = (job.clone(), endpoint.clone(), spawned);
        spawned += 1;
        tasks.spawn(
            async move {
                let result = fetch_from(&endpoint, &job, i, &source).await;
                (source, result)
            }
            .instrument(span),
        );
    };
    for source in sources {
        spawn(&mut tasks, source);
    }
    let mut last = None;
    let mut bad = None;
    while job.ranges().left > 0 {
        let joined = tokio::select! {
            joined = tasks.join_next() => joined,
            batch = next_batch(&mut more) => {
                match batch {
                    Some(batch) => {
                        for source in batch.into_iter().filter(|s| seen.insert(s.id)) {
                            info!(source = %source.id.short(), "a new source joins");
                            spawn(&mut tasks, source);
                        }
                    }
                    None => more = None,
                }
                continue;
            }
        };
        let Some(joined) = joined else {
            break;
        };
        let (source, result) = joined.map_err(|e| io_err(&part)(std::io::Error::other(e)))?;
        match result {
            Ok(()) => {}
            Err(SourceError::Io(e)) => return Err(io_err(&part)(e)),
            Err(e @ SourceError::Mismatch { .. }) => {
                warn!(source = %source.id.short(), error = %e, "source dropped: bad range");
                bad = Some(source.id);
            }
            Err(e) => {
                warn!(source = %source.id.short(), error = %e, "source dropped");
                last = Some(e.to_string());
            }
        }
    }
    // Every range is verified: whatever is still in flight is a duplicate.
    tasks.abort_all();
    if job.ranges().left > 0 {
        // Ranges verified are kept to resume from; a file with none is not.
        if job.ranges().progress.verified == 0 {
            let _ = std::fs::remove_file(&part);
            let _ = std::fs::remove_file(&job.state);
        }
        return Err(match (bad, last) {
            (Some(id), _) => GetError::HashMismatch {
                hash,
                source_id: id.to_string(),
            },
            (None, last) => GetError::SourcesFailed(last.unwrap_or_else(|| "no answer".into())),
        });
    }
    let fetched = job.ranges().progress.fetched;
    // Every range verified against the root already; hashing the whole
    // file again guards against the disk, not the network.
    let whole = {
        let path = part.clone();
        tokio::task::spawn_blocking(move || hash_whole(&path))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(io_err(&part))?
    };
    if whole != hash {
        let _ = std::fs::remove_file(&part);
        let _ = std::fs::remove_file(&job.state);
        return Err(GetError::WholeFileMismatch(hash));
    }
    std::fs::rename(&part, target).map_err(io_err(target))?;
    let _ = std::fs::remove_file(&job.state);
    info!(%hash, size, fetched, target = %target.display(), "downloaded and verified");
    Ok(Downloaded { size, fetched })
}

async fn next_batch(more: &mut Option<mpsc::Receiver<Vec<Source>>>) -> Option<Vec<Source>> {
    match more {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn hash_whole(path: &Path) -> std::io::Result<ContentHash> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update_rayon(&buf[..n]);
    }
    Ok(ContentHash(*hasher.finalize().as_bytes()))
}

/// Fetches ranges from one source until none is left for it, or it fails.
async fn fetch_from(
    endpoint: &Endpoint,
    job: &Arc<Job>,
    index: usize,
    source: &Source,
) -> Result<(), SourceError> {
    let addr: SocketAddr = source
        .addr
        .parse()
        .map_err(|_| SourceError::Addr(source.addr.clone()))?;
    let peer = endpoint
        .connect(addr, ALPN_TRANSFER, Some(source.id))
        .await?;
    job.sources_changed(1);
    // PER_SOURCE requests in flight; the first failure ends both.
    let result = tokio::try_join!(
        worker(&peer, job, index, source),
        worker(&peer, job, index, source)
    );
    job.sources_changed(-1);
    if result.is_ok() {
        peer.conn.close(0u32.into(), b"done");
    }
    result.map(|_| ())
}

async fn worker(
    peer: &Peer,
    job: &Arc<Job>,
    index: usize,
    source: &Source,
) -> Result<(), SourceError> {
    loop {
        let Some(range) = job.ranges().claim(index) else {
            return Ok(());
        };
        let _claim = Claim {
            job,
            index: range,
            source: index,
        };
        match tokio::time::timeout(RANGE_TIMEOUT, fetch_range(peer, job, source, range)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(SourceError::Gone {
                    addr: source.addr.clone(),
                    reason: format!("no range within {RANGE_TIMEOUT:?}"),
                })
            }
        }
    }
}

/// Most bytes a bao slice of `length` content bytes can take: the 8-byte
/// header, the content rounded out to whole 1 KiB chunks at both ends, and
/// a 64-byte parent node per chunk plus one per level of the tree above.
fn max_slice_len(length: u64) -> usize {
    let chunks = length.div_ceil(1024) + 2;
    (8 + chunks * 1024 + (chunks + 64) * 64) as usize
}

/// Asks `source` for range `index`, verifies it against the root hash and
/// stores it.
async fn fetch_range(
    peer: &Peer,
    job: &Arc<Job>,
    source: &Source,
    index: usize,
) -> Result<(), SourceError> {
    let gone = |reason: String| SourceError::Gone {
        addr: source.addr.clone(),
        reason,
    };
    let protocol = |reason: String| SourceError::Protocol {
        addr: source.addr.clone(),
        reason,
    };
    let (offset, length) = job.range(index);
    let (mut send, mut recv) = peer.conn.open_bi().await.map_err(|e| gone(e.to_string()))?;
    let req = GetRequest {
        hash: job.hash,
        offset,
        length: Some(length),
    };
    net::write_frame(&mut send, &req, MAX_TRANSFER_FRAME)
        .await
        .map_err(|e| gone(e.to_string()))?;
    let _ = send.finish();
    match net::read_first_frame::<GetReply>(&mut recv, MAX_TRANSFER_FRAME).await {
        Ok(Some(GetReply::Ok { size, length: l })) if size == job.size && l == length => {}
        Ok(Some(GetReply::Ok { size, length: l })) => {
            return Err(protocol(format!(
                "offered {l} bytes of a {size}-byte file for {length} bytes of {}",
                job.size
            )))
        }
        Ok(Some(GetReply::Error(reply))) => {
            return Err(SourceError::Refused {
                addr: source.addr.clone(),
                reply,
            })
        }
        Ok(None) => return Err(gone("stream ended before a reply".into())),
        Err(e) => return Err(protocol(e.to_string())),
    }
    let slice = recv
        .read_to_end(max_slice_len(length))
        .await
        .map_err(|e| match e {
            quinn::ReadToEndError::TooLong => protocol("slice longer than its range".into()),
            quinn::ReadToEndError::Read(e) => gone(e.to_string()),
        })?;
    // Hashing and disk writes on a blocking thread.
    let job2 = job.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        let root = blake3::Hash::from_bytes(job2.hash.0);
        let mut input = &slice[..];
        let mut decoder = bao::decode::SliceDecoder::new(&mut input, &root, offset, length);
        let mut data = Vec::with_capacity(length as usize);
        match decoder.read_to_end(&mut data) {
            Ok(_) if data.len() as u64 == length && input.is_empty() => {}
            Ok(_) => return Ok(Err("slice of the wrong length")),
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Ok(Err("bad")),
            Err(_) => return Ok(Err("slice cut short")),
        }
        job2.store(index, &data).map(Ok)
    })
    .await
    .map_err(|e| SourceError::Io(std::io::Error::other(e)))?
    .map_err(SourceError::Io)?;
    match outcome {
        Ok(()) => Ok(()),
        Err("bad") => Err(SourceError::Mismatch {
            addr: source.addr.clone(),
        }),
        Err(reason) => Err(protocol(reason.into())),
    }
}
