//! Leaf ↔ leaf transfer (ALPN `servent-xfer/3`), the downloading side:
//! one file from all its sources at once. Serving is [`crate::upload`].
//!
//! A request names content by hash, never by path, so a downloader can
//! only ever get what this leaf announced. A downloader first fetches the
//! file's range layer from a source (one 32-byte BLAKE3 chaining value per
//! [`RANGE_SIZE`] range, see [`crate::layer`]) and checks it against the
//! hash; after that it takes raw ranges from every source in parallel and
//! checks each one as it arrives by hashing it alone, so a bad range is
//! caught at once and its source dropped. Verified ranges are written into
//! a preallocated partial file and recorded in a state file beside it, so
//! a download killed at any point resumes from what it had verified, and a
//! running `leaf serve` shares them meanwhile (see [`crate::partial`]).
//! The partial file is renamed into place once every range is verified.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use servent_proto::limits::MAX_TRANSFER_FRAME;
use servent_proto::msg::{
    ErrorCode, ErrorReply, GetReply, GetRequest, RangeRequest, Source, ALPN_TRANSFER,
};
use servent_proto::ContentHash;
use supernode::net::{self, Endpoint, Peer};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::layer::{self, Cv, CV_LEN, RANGE_SIZE};
use crate::partial::{self, Bitmap};
pub use crate::partial::{layer_path, part_path, state_path};

/// Content bytes a downloader asks one source for at a time: the unit of
/// scheduling, verification and resume (the layer's range).
pub const CHUNK_SIZE: u64 = RANGE_SIZE;
/// Requests each source has in flight at once, so that the round trip
/// between two requests does not idle the link.
pub const PER_SOURCE: usize = 3;
/// Most ranges asked for in one request (4 MiB).
const MAX_RUN: usize = 16;
/// A run is at most this fraction of the ranges left, so that the work
/// spreads over the sources and the endgame is made of single ranges.
const RUN_DIVISOR: usize = 16;
/// Largest file downloaded (its layer is then 128 MiB): a hit claiming
/// more is refused before anything is allocated.
pub const MAX_DOWNLOAD_SIZE: u64 = 1 << 40;
/// A range that takes longer than this drops its source.
const RANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// The state file is rewritten at most this often (and when a download
/// stops): a crash or `kill -9` loses at most this much work, and a 1 GiB
/// download rewrites it a few dozen times instead of once a range.
const SAVE_EVERY: Duration = Duration::from_millis(100);
/// How many `Unavailable` answers in a row a whole source may give (its
/// upload slots are busy) before it is given up.
const MAX_BUSY: u32 = 8;
/// How often a partial source with nothing we need is asked again.
const HAVE_POLL: Duration = Duration::from_secs(1);
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
    #[error("the file is said to be {size} bytes; at most {MAX_DOWNLOAD_SIZE} are downloaded")]
    TooLarge { size: u64 },
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
    #[error("source {addr} sent {what} that does not verify against the hash")]
    Mismatch { addr: String, what: &'static str },
    #[error("bad source address {0:?}")]
    Addr(String),
    #[error("cannot write the partial file: {0}")]
    Io(std::io::Error),
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

/// The scheduler: which range goes to which source next.
#[derive(Debug)]
struct Ranges {
    done: Bitmap,
    /// Sources fetching each range in flight (more than one only in the
    /// endgame).
    in_flight: HashMap<usize, Vec<usize>>,
    /// Every range below this one is done or in flight.
    cursor: usize,
    /// Ranges nobody has verified yet.
    left: usize,
    progress: Progress,
}

/// What a worker does next.
enum Next {
    /// Consecutive ranges, asked for in one request.
    Fetch(std::ops::Range<usize>),
    /// Nothing for this source now: every range it has is done or being
    /// fetched by it already.
    Wait,
    Finished,
}

impl Ranges {
    fn new(done: Bitmap, progress: Progress) -> Self {
        Self {
            left: done.len() - done.count(),
            done,
            in_flight: HashMap::new(),
            cursor: 0,
            progress,
        }
    }

    /// The range `source` (which has the ranges in `has`, or all) should
    /// fetch next: the first nobody has; once every range is taken (the
    /// endgame), one in flight elsewhere with the fewest fetchers, so that
    /// a slow or vanished source holds nothing up.
    fn claim(&mut self, source: usize, has: Option<&Bitmap>) -> Next {
        if self.left == 0 {
            return Next::Finished;
        }
        let n = self.done.len();
        let free = |r: &Self, i: usize| !r.done.get(i) && !r.in_flight.contains_key(&i);
        while self.cursor < n && !free(self, self.cursor) {
            self.cursor += 1;
        }
        let pick = match has {
            None => (self.cursor < n).then_some(self.cursor),
            Some(has) => (self.cursor..n).find(|&i| has.get(i) && free(self, i)),
        }
        .or_else(|| {
            self.in_flight
                .iter()
                .filter(|(i, by)| {
                    !self.done.get(**i) && !by.contains(&source) && has.is_none_or(|h| h.get(**i))
                })
                .min_by_key(|(i, by)| (by.len(), **i))
                .map(|(i, _)| *i)
        });
        let Some(first) = pick else {
            return Next::Wait;
        };
        // A free range starts a run of free ranges: fewer, longer requests
        // while much is left, single ranges towards the end.
        let mut end = first + 1;
        if !self.in_flight.contains_key(&first) {
            let longest = (self.left / RUN_DIVISOR).clamp(1, MAX_RUN);
            while end < n
                && end - first < longest
                && has.is_none_or(|h| h.get(end))
                && free(self, end)
            {
                end += 1;
            }
        }
        for i in first..end {
            self.in_flight.entry(i).or_default().push(source);
        }
        Next::Fetch(first..end)
    }

    fn release(&mut self, index: usize, source: usize) {
        if let Some(by) = self.in_flight.get_mut(&index) {
            by.retain(|&s| s != source);
            if by.is_empty() {
                self.in_flight.remove(&index);
                // Not verified: free for the next claim again.
                self.cursor = self.cursor.min(index);
            }
        }
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
    count: usize,
    target: PathBuf,
    /// The verified layer, from the first source that sends a good one (or
    /// from an earlier run).
    layer: OnceLock<Arc<Vec<Cv>>>,
    /// The partial file, preallocated; written at offsets.
    file: std::fs::File,
    ranges: Mutex<Ranges>,
    progress: Option<watch::Sender<Progress>>,
    /// Serialises state saves; when the last one was.
    saved: Mutex<Instant>,
    /// Set once the file is complete: no more state saves.
    finished: AtomicBool,
    /// Verified ranges not recorded yet.
    dirty: AtomicBool,
    /// Where the register of downloads is, to share this one while it runs.
    register: Option<(PathBuf, String)>,
}

impl Job {
    fn ranges(&self) -> std::sync::MutexGuard<'_, Ranges> {
        self.ranges.lock().expect("ranges lock")
    }

    fn range(&self, index: usize) -> (u64, u64) {
        layer::range_bounds(self.size, index)
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

    /// Takes a layer a source sent if none is set yet and it proves the
    /// hash; keeps it beside the target and registers the download for
    /// sharing. Blocking. False if the layer is bad.
    fn offer_layer(&self, cvs: Vec<Cv>) -> std::io::Result<bool> {
        if self.layer.get().is_some() {
            return Ok(true);
        }
        if !layer::verify(&cvs, self.size, &self.hash) {
            return Ok(false);
        }
        if self.layer.set(Arc::new(cvs)).is_ok() {
            let cvs = self.layer.get().expect("just set");
            layer::save(&layer_path(&self.target), cvs)?;
            self.register();
        }
        Ok(true)
    }

    fn register(&self) {
        let Some((data_dir, name)) = &self.register else {
            return;
        };
        let target = std::path::absolute(&self.target).unwrap_or_else(|_| self.target.clone());
        let entry = partial::Entry {
            hash: self.hash.to_string(),
            size: self.size,
            name: name.clone(),
            target,
        };
        if let Err(e) = partial::register(data_dir, &entry, &self.hash) {
            debug!(error = %e, "cannot register the download for sharing");
        }
    }

    /// Checks a range against its CV and, if it matches, writes it at its
    /// offset and records it. Blocking. False if it does not match.
    fn store(&self, index: usize, data: &[u8]) -> std::io::Result<bool> {
        let layer = self
            .layer
            .get()
            .expect("ranges are fetched after the layer");
        if layer::range_cv(data, index, self.count) != layer[index] {
            return Ok(false);
        }
        if self.ranges().done.get(index) {
            // Another source won this range in the endgame.
            return Ok(true);
        }
        let (offset, _) = self.range(index);
        self.file.write_all_at(data, offset)?;
        {
            let mut r = self.ranges();
            if r.done.get(index) {
                return Ok(true);
            }
            r.done.set(index);
            r.left -= 1;
            r.progress.verified += data.len() as u64;
            r.progress.fetched += data.len() as u64;
            self.publish(&r);
        }
        self.save_state(false)?;
        Ok(true)
    }

    /// No more state saves from now on; waits for one being written, so
    /// that none lands after the files beside the target are removed (a
    /// range verified in the endgame may still be saving on a blocking
    /// thread).
    fn finish(&self) {
        let _saving = self.saved.lock().expect("save lock");
        self.finished.store(true, Ordering::Release);
    }

    /// Records the verified ranges beside the target, at most every
    /// [`SAVE_EVERY`] unless `now`; a save put off is made by the next
    /// call after that (the download's ticker makes one).
    fn save_state(&self, now: bool) -> std::io::Result<()> {
        let mut saved = self.saved.lock().expect("save lock");
        if (!now && saved.elapsed() < SAVE_EVERY) || self.finished.load(Ordering::Acquire) {
            self.dirty.store(true, Ordering::Release);
            return Ok(());
        }
        self.dirty.store(false, Ordering::Release);
        let done = self.ranges().done.clone();
        partial::save_state(&self.target, &self.hash, self.size, &done)?;
        *saved = Instant::now();
        Ok(())
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // Stopped early (an error, or the future dropped): keep what was
        // verified since the last save.
        if !self.finished.load(Ordering::Acquire) && self.ranges().progress.verified > 0 {
            let _ = self.save_state(true);
        }
    }
}

/// Opens the partial file and what an earlier run verified of it,
/// checking every range the state lists against the layer kept beside it;
/// starts afresh (a preallocated empty file) when there is nothing to
/// resume for this very content. Blocking.
fn open_job(
    hash: ContentHash,
    size: u64,
    target: &Path,
) -> std::io::Result<(std::fs::File, Bitmap, Option<Vec<Cv>>)> {
    let part = part_path(target);
    let count = layer::range_count(size);
    let saved = partial::load_state(target, &hash, size);
    let kept = layer::load(&layer_path(target), size, &hash).ok();
    let existing = std::fs::metadata(&part).map(|m| m.len()).ok();
    if let (Some(mut done), Some(cvs), Some(len)) = (saved, kept, existing) {
        if len == size {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&part)?;
            let mut buf = vec![0u8; RANGE_SIZE as usize];
            for (i, cv) in cvs.iter().enumerate() {
                if !done.get(i) {
                    continue;
                }
                let (offset, length) = layer::range_bounds(size, i);
                let piece = &mut buf[..length as usize];
                let good = file.read_exact_at(piece, offset).is_ok()
                    && layer::range_cv(piece, i, count) == *cv;
                if !good {
                    warn!(
                        range = i,
                        "a range kept from an earlier run is damaged; fetching it again"
                    );
                    done.clear(i);
                }
            }
            return Ok((file, done, Some(cvs)));
        }
    }
    partial::remove_beside(target);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&part)?;
    file.set_len(size)?;
    Ok((file, Bitmap::new(count), None))
}

/// What a finished download did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Downloaded {
    pub size: u64,
    /// Bytes that came over the network in this run (the rest was resumed).
    pub fetched: u64,
}

/// A download to run: what, from where, into where.
pub struct Download<'a> {
    pub endpoint: &'a Endpoint,
    pub hash: ContentHash,
    /// The size the hit gives (the layer proves it).
    pub size: u64,
    pub sources: &'a [Source],
    pub target: &'a Path,
    pub progress: Option<watch::Sender<Progress>>,
    /// Batches of sources found later (by a repeated query), which join
    /// in. A batch may repeat known sources; a source already used, or
    /// dropped, is not used again.
    pub more: Option<mpsc::Receiver<Vec<Source>>>,
    /// The data dir and the name to share this download under while it
    /// runs, through the register that a `leaf serve` of that data dir
    /// reads. `None`: not shared.
    pub share_as: Option<(PathBuf, String)>,
}

/// Downloads `hash` (of `size` bytes, as the hit says; the layer proves
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
    Download {
        endpoint,
        hash,
        size,
        sources,
        target,
        progress,
        more: None,
        share_as: None,
    }
    .run()
    .await
}

impl Download<'_> {
    pub async fn run(self) -> Result<Downloaded, GetError> {
        let Download {
            endpoint,
            hash,
            size,
            sources,
            target,
            progress,
            mut more,
            share_as,
        } = self;
        let mut seen = HashSet::new();
        let sources: Vec<Source> = sources
            .iter()
            .filter(|s| seen.insert(s.id))
            .cloned()
            .collect();
        if sources.is_empty() {
            return Err(GetError::NoSource(hash));
        }
        if size > MAX_DOWNLOAD_SIZE {
            return Err(GetError::TooLarge { size });
        }
        let part = part_path(target);
        let io_err = |path: &Path| {
            let path = path.display().to_string();
            move |source| GetError::Io { path, source }
        };
        let (file, done, kept) = {
            let target = target.to_path_buf();
            blocking(move || open_job(hash, size, &target))
                .await
                .map_err(io_err(&part))?
        };
        let count = layer::range_count(size);
        let verified: u64 = (0..count)
            .filter(|&i| done.get(i))
            .map(|i| layer::range_bounds(size, i).1)
            .sum();
        if verified > 0 {
            info!(verified, size, "resuming");
        }
        let job = Arc::new(Job {
            hash,
            size,
            count,
            target: target.to_path_buf(),
            layer: OnceLock::new(),
            file,
            ranges: Mutex::new(Ranges::new(
                done,
                Progress {
                    size,
                    verified,
                    fetched: 0,
                    sources: 0,
                },
            )),
            progress,
            saved: Mutex::new(
                Instant::now()
                    .checked_sub(SAVE_EVERY)
                    .unwrap_or_else(Instant::now),
            ),
            finished: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            register: share_as,
        });
        if let Some(cvs) = kept {
            let _ = job.layer.set(Arc::new(cvs));
            job.register();
        }
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
        let mut saves = tokio::time::interval(SAVE_EVERY);
        while job.ranges().left > 0 {
            let joined = tokio::select! {
                joined = tasks.join_next() => joined,
                _ = saves.tick() => {
                    if job.dirty.load(Ordering::Acquire) {
                        let job = job.clone();
                        blocking(move || job.save_state(false))
                            .await
                            .map_err(io_err(&part))?;
                    }
                    continue;
                }
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
                    warn!(source = %source.id.short(), error = %e, "source dropped: bad data");
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
        while tasks.join_next().await.is_some() {}
        if job.ranges().left > 0 {
            // Ranges verified are kept to resume from; a file with none is not.
            if job.ranges().progress.verified == 0 {
                job.finish();
                partial::remove_beside(target);
                if let Some((data_dir, _)) = &job.register {
                    partial::unregister(data_dir, &hash);
                }
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
        job.finish();
        // Every range was checked against the layer, and the layer against
        // the hash: the part file is the file. Not synced (no more than
        // other download tools do): the kernel writes it back.
        std::fs::rename(&part, target).map_err(io_err(target))?;
        if let Some((data_dir, _)) = &job.register {
            partial::unregister(data_dir, &hash);
        }
        partial::remove_beside(target);
        info!(%hash, size, fetched, target = %target.display(), "downloaded and verified");
        Ok(Downloaded { size, fetched })
    }
}

/// Runs file work on the blocking pool; a task that panicked is an I/O
/// error like any other.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(std::io::Error::other)?
}

async fn next_batch(more: &mut Option<mpsc::Receiver<Vec<Source>>>) -> Option<Vec<Source>> {
    match more {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// One connected source: which ranges it has (`None`: all of them).
struct Remote<'a> {
    peer: Peer,
    source: &'a Source,
    index: usize,
    has: Mutex<Option<Bitmap>>,
}

impl Remote<'_> {
    fn gone(&self, reason: String) -> SourceError {
        SourceError::Gone {
            addr: self.source.addr.clone(),
            reason,
        }
    }

    fn protocol(&self, reason: String) -> SourceError {
        SourceError::Protocol {
            addr: self.source.addr.clone(),
            reason,
        }
    }

    /// Waits for a blocking check of `what` this source sent: its failure
    /// to verify is the source's fault, an I/O error ours.
    async fn check(
        &self,
        task: tokio::task::JoinHandle<std::io::Result<bool>>,
        what: &'static str,
    ) -> Result<(), SourceError> {
        let good = task
            .await
            .map_err(|e| SourceError::Io(std::io::Error::other(e)))?
            .map_err(SourceError::Io)?;
        match good {
            true => Ok(()),
            false => Err(SourceError::Mismatch {
                addr: self.source.addr.clone(),
                what,
            }),
        }
    }

    /// Sends `req` and reads the reply header.
    async fn ask(&self, req: &GetRequest) -> Result<(GetReply, quinn::RecvStream), SourceError> {
        let (mut send, mut recv) = self
            .peer
            .conn
            .open_bi()
            .await
            .map_err(|e| self.gone(e.to_string()))?;
        net::write_frame(&mut send, req, MAX_TRANSFER_FRAME)
            .await
            .map_err(|e| self.gone(e.to_string()))?;
        let _ = send.finish();
        match net::read_first_frame::<GetReply>(&mut recv, MAX_TRANSFER_FRAME).await {
            Ok(Some(GetReply::Error(reply))) => Err(SourceError::Refused {
                addr: self.source.addr.clone(),
                reply,
            }),
            Ok(Some(reply)) => Ok((reply, recv)),
            Ok(None) => Err(self.gone("stream ended before a reply".into())),
            Err(e) => Err(self.protocol(e.to_string())),
        }
    }

    /// Reads exactly `len` more bytes of `recv`, then its end.
    async fn read_exact(
        &self,
        recv: &mut quinn::RecvStream,
        len: usize,
    ) -> Result<Vec<u8>, SourceError> {
        let data = recv.read_to_end(len).await.map_err(|e| match e {
            quinn::ReadToEndError::TooLong => self.protocol("more bytes than announced".into()),
            quinn::ReadToEndError::Read(e) => self.gone(e.to_string()),
        })?;
        if data.len() != len {
            return Err(self.gone(format!("sent {} of {len} bytes", data.len())));
        }
        Ok(data)
    }

    /// Asks for the layer (if `job` has none yet) or the have-bitmap, and
    /// records which ranges the source has.
    async fn learn(&self, job: &Arc<Job>) -> Result<(), SourceError> {
        let want_layer = job.layer.get().is_none();
        let req = if want_layer {
            GetRequest::Layer(job.hash)
        } else {
            GetRequest::Have(job.hash)
        };
        let (reply, mut recv) = self.ask(&req).await?;
        let partial = match reply {
            GetReply::Ranges { size, partial } if size == job.size => partial,
            other => {
                return Err(self.protocol(format!(
                    "answered {other:?} to a request for the ranges of a {}-byte file",
                    job.size
                )))
            }
        };
        let layer_len = if want_layer { job.count * CV_LEN } else { 0 };
        let bitmap_len = if partial { job.count.div_ceil(8) } else { 0 };
        let mut tail = self.read_exact(&mut recv, layer_len + bitmap_len).await?;
        let bitmap = tail.split_off(layer_len);
        if want_layer {
            let cvs = layer::from_bytes(&tail).expect("a whole number of CVs");
            let job = job.clone();
            self.check(
                tokio::task::spawn_blocking(move || job.offer_layer(cvs)),
                "a layer",
            )
            .await?;
        }
        let has = match partial {
            false => None,
            true => Some(
                Bitmap::from_bytes(bitmap, job.count)
                    .ok_or_else(|| self.protocol("a have-bitmap with bits past the end".into()))?,
            ),
        };
        *self.has.lock().expect("has lock") = has;
        Ok(())
    }
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
    let remote = Remote {
        peer,
        source,
        index,
        has: Mutex::new(None),
    };
    remote.learn(job).await?;
    job.sources_changed(1);
    // PER_SOURCE requests in flight; the first failure ends them all.
    let workers = (0..PER_SOURCE).map(|_| worker(&remote, job));
    let result = futures_util::future::try_join_all(workers).await.map(drop);
    job.sources_changed(-1);
    if result.is_ok() {
        remote.peer.conn.close(0u32.into(), b"done");
    }
    result
}

async fn worker(remote: &Remote<'_>, job: &Arc<Job>) -> Result<(), SourceError> {
    // Consecutive `Unavailable` answers from a busy whole source.
    let mut busy = 0;
    loop {
        let next = {
            let has = remote.has.lock().expect("has lock");
            job.ranges().claim(remote.index, has.as_ref())
        };
        let run = match next {
            Next::Fetch(run) => run,
            Next::Finished => return Ok(()),
            // A whole source with nothing to do is done; a partial one may
            // have more later.
            Next::Wait if remote.has.lock().expect("has lock").is_none() => return Ok(()),
            Next::Wait => {
                tokio::time::sleep(HAVE_POLL).await;
                remote.learn(job).await?;
                continue;
            }
        };
        let claims: Vec<Claim<'_>> = run
            .clone()
            .map(|index| Claim {
                job,
                index,
                source: remote.index,
            })
            .collect();
        let result = fetch_run(remote, job, run).await;
        // What was not verified goes back to the others at once.
        drop(claims);
        match result {
            Ok(()) => busy = 0,
            // A partial source that lacks a range after all (its state
            // file lags what it told us, or its own download restarted):
            // ask what it has now instead of dropping it.
            Err(SourceError::Refused { reply, .. })
                if reply.code == ErrorCode::Unavailable
                    && remote.has.lock().expect("has lock").is_some() =>
            {
                debug!(%reply, "partial source lacks a range; asking what it has");
                tokio::time::sleep(HAVE_POLL).await;
                remote.learn(job).await?;
            }
            // A whole source whose upload slots are all taken: its ranges
            // went back to the others; ask again a little later, a few
            // times, before giving up on it.
            Err(SourceError::Refused { reply, .. })
                if reply.code == ErrorCode::Unavailable && busy < MAX_BUSY =>
            {
                busy += 1;
                debug!(%reply, busy, "source busy; asking again later");
                tokio::time::sleep(HAVE_POLL).await;
                continue;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The next `len` bytes of `recv`, fewer if it ends first.
async fn read_part(recv: &mut quinn::RecvStream, len: usize) -> Result<Vec<u8>, quinn::ReadError> {
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        match recv.read_chunk(len - data.len(), true).await? {
            Some(chunk) => data.extend_from_slice(&chunk.bytes),
            None => break,
        }
    }
    Ok(data)
}

/// Asks the source for the consecutive ranges of `run` in one request,
/// and verifies and stores each as it arrives.
async fn fetch_run(
    remote: &Remote<'_>,
    job: &Arc<Job>,
    run: std::ops::Range<usize>,
) -> Result<(), SourceError> {
    let (offset, _) = job.range(run.start);
    let length: u64 = run.clone().map(|i| job.range(i).1).sum();
    let req = GetRequest::Range(RangeRequest {
        hash: job.hash,
        offset,
        length: Some(length),
    });
    let (reply, mut recv) = tokio::time::timeout(RANGE_TIMEOUT, remote.ask(&req))
        .await
        .map_err(|_| remote.gone(format!("no answer within {RANGE_TIMEOUT:?}")))??;
    match reply {
        GetReply::Ok { size, length: l } if size == job.size && l == length => {}
        other => {
            return Err(remote.protocol(format!(
                "answered {other:?} to a request for {length} bytes of a {}-byte file",
                job.size
            )))
        }
    }
    // Each range is hashed and written on a blocking thread while the next
    // one arrives.
    let mut stores = Vec::with_capacity(run.len());
    for index in run {
        let want = job.range(index).1 as usize;
        let data = match tokio::time::timeout(RANGE_TIMEOUT, read_part(&mut recv, want)).await {
            Ok(Ok(data)) if data.len() == want => data,
            Ok(Ok(data)) => {
                let n = data.len();
                return Err(remote.gone(format!("range {index} cut short after {n} bytes")));
            }
            Ok(Err(e)) => return Err(remote.gone(e.to_string())),
            Err(_) => return Err(remote.gone(format!("no range within {RANGE_TIMEOUT:?}"))),
        };
        let job = job.clone();
        stores.push(tokio::task::spawn_blocking(move || job.store(index, &data)));
    }
    remote.read_exact(&mut recv, 0).await?;
    for store in stores {
        remote.check(store, "a range").await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetch(next: Next) -> usize {
        match next {
            Next::Fetch(run) if run.len() == 1 => run.start,
            Next::Fetch(run) => panic!("run {run:?}"),
            Next::Wait => panic!("wait"),
            Next::Finished => panic!("finished"),
        }
    }

    #[test]
    fn ranges_go_in_order_then_to_the_endgame_and_back_when_released() {
        let mut done = Bitmap::new(5);
        done.set(1);
        let mut r = Ranges::new(done, Progress::default());
        assert_eq!(r.left, 4);
        // Sources 0 and 1 take the free ranges in order, skipping the done one.
        assert_eq!(fetch(r.claim(0, None)), 0);
        assert_eq!(fetch(r.claim(1, None)), 2);
        assert_eq!(fetch(r.claim(0, None)), 3);
        assert_eq!(fetch(r.claim(1, None)), 4);
        // Endgame: source 1 doubles up on the first range only source 0 has.
        assert_eq!(fetch(r.claim(1, None)), 0);
        // Source 0 doubles up on source 1's, fewest fetchers first.
        assert_eq!(fetch(r.claim(0, None)), 2);
        assert_eq!(fetch(r.claim(0, None)), 4);
        assert_eq!(fetch(r.claim(1, None)), 3);
        // Both fetch every range left.
        assert!(matches!(r.claim(0, None), Next::Wait));
        assert!(matches!(r.claim(1, None), Next::Wait));
        // Both give up range 2: it is free again, first in line.
        r.release(2, 1);
        r.release(2, 0);
        assert_eq!(fetch(r.claim(3, None)), 2);
    }

    #[test]
    fn requests_take_runs_of_free_ranges_while_much_is_left() {
        let mut done = Bitmap::new(400);
        done.set(20);
        let mut r = Ranges::new(done, Progress::default());
        let run = |next| match next {
            Next::Fetch(run) => run,
            _ => panic!("no run"),
        };
        // 399 left: runs of at most 16, stopping at a done range.
        assert_eq!(run(r.claim(0, None)), 0..16);
        assert_eq!(run(r.claim(1, None)), 16..20);
        assert_eq!(run(r.claim(0, None)), 21..37);
        // A partial source's run stops where its ranges do.
        let mut has = Bitmap::new(400);
        (37..40).for_each(|i| has.set(i));
        assert_eq!(run(r.claim(2, Some(&has))), 37..40);
    }

    #[test]
    fn a_partial_source_gets_only_ranges_it_has() {
        let mut r = Ranges::new(Bitmap::new(6), Progress::default());
        let mut has = Bitmap::new(6);
        has.set(4);
        assert_eq!(fetch(r.claim(7, Some(&has))), 4);
        assert!(matches!(r.claim(7, Some(&has)), Next::Wait));
        assert_eq!(fetch(r.claim(8, None)), 0);
        r.left = 0;
        assert!(matches!(r.claim(8, None), Next::Finished));
    }
}
