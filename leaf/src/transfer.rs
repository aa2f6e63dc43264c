//! Leaf ↔ leaf transfer (ALPN `servent-xfer/3`), the downloading side:
//! one file from all its sources at once. Serving is [`crate::upload`].
//!
//! A request names content by hash, never by path, so a downloader can
//! only ever get what this leaf announced. A downloader never takes the
//! file's size from a hit: it asks each source (a few at a time, each
//! address once, see [`MAX_SOURCES_AT_ONCE`]) what it has, fetches the
//! range layer (one 32-byte BLAKE3 chaining value per [`RANGE_SIZE`]
//! range, see [`crate::layer`]) from a source of the best supported size
//! and checks it against the hash, then fetches the last range at that
//! size and checks it against the last CV, which pins the size
//! ([`servent_proto::pin`]). Sources that said another size are dropped
//! then, not before, and named. After that it takes raw ranges from every source in parallel and
//! checks each one as it arrives by hashing it alone, so a bad range is
//! caught at once and its source dropped. Verified ranges are written into
//! a preallocated partial file and recorded in a state file beside it, so
//! a download killed at any point resumes from what it had verified, and a
//! running `leaf serve` shares them meanwhile (see [`crate::partial`]).
//! The partial file is renamed into place once every range is verified.
//!
//! Which range each source fetches, and what becomes of a source that
//! fails, is decided by the scheduler [`servent_proto::schedule`]; this
//! module only carries its choices to the sources and their results back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use servent_net::{self as net, Endpoint, Peer};
use servent_proto::hits;
use servent_proto::limits::MAX_TRANSFER_FRAME;
use servent_proto::msg::{ErrorCode, ErrorReply, GetReply, GetRequest, RangeRequest, Source};
use servent_proto::pin::{self, SizeClaims};
use servent_proto::schedule::{Action, Outcome, Schedule, ScheduleConfig, SourcePool, Then};
pub use servent_proto::schedule::{MAX_DIALS_PER_HOST, MAX_SOURCES_AT_ONCE, PER_SOURCE};
use servent_proto::{ContentHash, NodeId};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

use crate::layer::{self, Cv, CV_LEN, RANGE_SIZE};
use crate::partial::{self, Bitmap};
pub use crate::partial::{layer_path, part_path, state_path};

/// Content bytes a downloader asks one source for at a time: the unit of
/// scheduling, verification and resume (the layer's range).
pub const CHUNK_SIZE: u64 = RANGE_SIZE;
/// Largest file downloaded (its layer is then 128 MiB): a hit claiming
/// more is refused before anything is allocated.
pub const MAX_DOWNLOAD_SIZE: u64 = 1 << 40;

/// The timings of a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferTimings {
    /// The scheduler's: how long a range may take before its source is
    /// dropped (default 30 s, also the bound on the layer and last range
    /// that prove the size), and how often a partial source with nothing
    /// wanted, or a busy one, is asked again (default 1 s).
    pub schedule: ScheduleConfig,
    /// The state file is rewritten at most this often (and when a download
    /// stops): a crash or `kill -9` loses at most this much work, and a 1 GiB
    /// download rewrites it a few dozen times instead of once a range.
    /// Default 100 ms.
    pub save_every: Duration,
    /// How long a download waits, once one source has said how big the file
    /// is, for the others it dialled before it picks the size to prove: the
    /// best supported one is proven first. Default 500 ms.
    pub probe_grace: Duration,
    /// A source that connects but does not say what it has within this long
    /// is dropped. Default 10 s.
    pub probe_timeout: Duration,
}

impl Default for TransferTimings {
    fn default() -> Self {
        Self {
            schedule: ScheduleConfig::default(),
            save_every: Duration::from_millis(100),
            probe_grace: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("no source for {0}")]
    NoSource(ContentHash),
    #[error("every source failed; last: {0}")]
    SourcesFailed(String),
    #[error("every source failed; some lied and were dropped: {liars}; last: {last}")]
    Liars { liars: String, last: String },
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
    /// Of those, how many by each route, in the order of `Route::ALL`.
    pub by_route: [usize; 4],
}

impl Progress {
    /// The sources delivering now by route, `"1 direct, 2 relayed"`;
    /// empty while none is.
    pub fn routes(&self) -> String {
        crate::push::Route::ALL
            .iter()
            .zip(self.by_route)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{n} {}", r.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The scheduler of a download, and what it has verified so far.
#[derive(Debug)]
struct Ranges {
    /// Sources are named by their index in the download.
    sched: Schedule<usize>,
    progress: Progress,
}

/// Takes a source out of the scheduler when its fetching ends, however it
/// ends (an error, or the task cancelled), so that a source that fails
/// costs only the ranges it had in flight.
struct Fetching<'a> {
    job: &'a Job,
    source: usize,
}

impl Drop for Fetching<'_> {
    fn drop(&mut self) {
        self.job.ranges().sched.remove_source(self.source);
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
    /// How often the state is saved at most.
    save_every: Duration,
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

    fn sources_changed(&self, delta: isize, route: crate::push::Route) {
        let mut r = self.ranges();
        r.progress.sources = r.progress.sources.saturating_add_signed(delta);
        let at = crate::push::Route::ALL.iter().position(|x| *x == route);
        if let Some(n) = at.and_then(|i| r.progress.by_route.get_mut(i)) {
            *n = n.saturating_add_signed(delta);
        }
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
        if self.ranges().sched.is_done(index) {
            // Another source won this range in the endgame.
            return Ok(true);
        }
        let (offset, _) = self.range(index);
        crate::pio::write_all_at(&self.file, data, offset)?;
        {
            let mut r = self.ranges();
            if !r.sched.on_verified(index) {
                return Ok(true);
            }
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
    /// [`TransferTimings::save_every`] unless `now`; a save put off is made by the next
    /// call after that (the download's ticker makes one).
    fn save_state(&self, now: bool) -> std::io::Result<()> {
        let mut saved = self.saved.lock().expect("save lock");
        if (!now && saved.elapsed() < self.save_every) || self.finished.load(Ordering::Acquire) {
            self.dirty.store(true, Ordering::Release);
            return Ok(());
        }
        self.dirty.store(false, Ordering::Release);
        let done = self.ranges().sched.done().clone();
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
                let good = crate::pio::read_exact_at(&file, piece, offset).is_ok()
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    pub size: u64,
    /// Bytes that came over the network in this run (the rest was resumed).
    pub fetched: u64,
    /// Sources dropped because what they said or sent was proven wrong.
    pub dropped: Vec<Dropped>,
    /// Every source connected to, and how (docs/PROTOCOL.md 10.5), in the
    /// order they connected.
    pub routes: Vec<(NodeId, crate::push::Route)>,
}

/// A source a download dropped for lying, and how it was caught.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub id: NodeId,
    pub addr: String,
    pub reason: String,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "source {} at {} {}", self.id, self.addr, self.reason)
    }
}

/// A download to run: what, from where, into where. The file's size is
/// not given: it is learnt from the sources and proven by the range layer
/// and the last range's bytes (see [`servent_proto::pin`]), never taken
/// from a hit.
pub struct Download<'a> {
    pub endpoint: &'a Endpoint,
    pub hash: ContentHash,
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
    /// Timeouts and polls. Default [`TransferTimings::default`].
    pub timings: TransferTimings,
    /// Where sources that cannot be dialled dial back to this download's
    /// endpoint (docs/PROTOCOL.md 10.5). `None`: direct dials only.
    pub awaiting: Option<Arc<crate::push::Awaiting>>,
}

/// Downloads `hash` from all `sources` at once into `target`. Resumes
/// from what an earlier run verified; writes `target` only once every
/// byte matches the hash. Dropping the future stops every transfer,
/// leaving a partial file and its state to resume from.
pub async fn download(
    endpoint: &Endpoint,
    hash: ContentHash,
    sources: &[Source],
    target: &Path,
    progress: Option<watch::Sender<Progress>>,
) -> Result<Downloaded, GetError> {
    Download {
        endpoint,
        hash,
        sources,
        target,
        progress,
        more: None,
        share_as: None,
        timings: TransferTimings::default(),
        awaiting: None,
    }
    .run()
    .await
}

/// What a source task ended with.
enum Task {
    /// Connected and asked what it has: the source and its size claim.
    Probed(Result<(Remote, u64), SourceError>),
    /// Fetching from it ended.
    Fetched(Result<(), SourceError>),
}

type Tasks = JoinSet<(Source, Task)>;

/// How an attempt to prove a size from one source went.
enum PinResult {
    /// The last range verified: the size is pinned; its bytes.
    Pinned(Vec<u8>),
    /// The source's own layer or bytes do not verify for its claim.
    Refuted(String),
}

/// How each source was reached, in the order they connected (a relayed
/// one again once it is reached without the relay).
type Routes = Arc<Mutex<Vec<(NodeId, crate::push::Route)>>>;

/// The source tasks of one download: the sources queued, and those
/// connecting, being asked what they have, or fetching.
struct Dialer<'a> {
    endpoint: &'a Endpoint,
    /// How each source was reached, as probes connect.
    routes: Routes,
    awaiting: Option<Arc<crate::push::Awaiting>>,
    hash: ContentHash,
    pool: SourcePool,
    tasks: Tasks,
    /// Scheduler index of the next source.
    spawned: usize,
    /// How long a source may take to say what it has.
    probe_timeout: Duration,
}

impl Dialer<'_> {
    /// Starts probing queued sources while the pool lets more be busy
    /// (fewer than [`MAX_SOURCES_AT_ONCE`]).
    fn fill(&mut self) {
        while let Some(source) = self.pool.next(self.tasks.len()) {
            let span = tracing::info_span!("get", source = %source.id.short(), addr = %source.addr);
            let (endpoint, hash, index) = (self.endpoint.clone(), self.hash, self.spawned);
            let (patience, awaiting) = (self.probe_timeout, self.awaiting.clone());
            let routes = self.routes.clone();
            self.spawned += 1;
            let task = async move {
                let at = awaiting.as_ref();
                let told = routes.clone();
                let result =
                    probe(&endpoint, at, hash, source.clone(), index, patience, told).await;
                if let Ok((remote, _)) = &result {
                    let route = (remote.source.id, remote.route);
                    routes.lock().expect("routes lock").push(route);
                }
                (source, Task::Probed(result))
            };
            self.tasks.spawn(task.instrument(span));
        }
    }

    /// Fetches ranges from a probed source.
    fn fetch(&mut self, job: &Arc<Job>, remote: Remote) {
        let span = tracing::info_span!("get", source = %remote.source.id.short(), addr = %remote.source.addr);
        let job = job.clone();
        let task = async move {
            let source = remote.source.clone();
            let result = fetch_from(&job, remote).await;
            (source, Task::Fetched(result))
        };
        self.tasks.spawn(task.instrument(span));
    }

    /// Queues a batch of sources found later.
    fn offer(&mut self, batch: Vec<Source>) {
        for source in batch {
            let (id, addr) = (source.id, source.addr.clone());
            if self.pool.offer(source) {
                info!(source = %id.short(), %addr, "a new source joins");
            }
        }
    }

    /// Nobody left to ask or being asked.
    fn idle(&self) -> bool {
        self.tasks.is_empty() && self.pool.is_empty()
    }
}

/// What a download learns before it starts fetching: the size, and the
/// sources that agree with it.
struct Learnt {
    size: u64,
    /// Proven by the last range (else only the best supported claim).
    pinned: bool,
    /// The verified layer, if one was fetched.
    layer: Option<Vec<Cv>>,
    /// The last range's bytes, verified, if pinned.
    last_range: Option<Vec<u8>>,
    /// Probed sources that claim `size`, ready to fetch from.
    agreeing: Vec<Remote>,
    /// Sources proven to have lied.
    dropped: Vec<Dropped>,
    last_err: Option<String>,
}

/// The first part of a download: sources probed, their size claims, and
/// the attempts to prove one (see [`servent_proto::pin`]).
#[derive(Default)]
struct SizeProbe {
    probes: HashMap<NodeId, Remote>,
    claims: SizeClaims<NodeId>,
    refuted: HashMap<NodeId, String>,
    layer: Option<Vec<Cv>>,
    last_range: Option<Vec<u8>>,
    last_err: Option<String>,
}

impl SizeProbe {
    fn on_probe(&mut self, source: Source, result: Result<(Remote, u64), SourceError>) {
        match result {
            Ok((remote, claimed)) => {
                let last = pin::ranges_of(claimed) as usize - 1;
                let host = hits::host_of(&source.addr);
                self.claims
                    .claim(source.id, host, claimed, remote.has_range(last));
                self.probes.insert(source.id, remote);
            }
            Err(e) => {
                warn!(source = %source.id.short(), error = %e, "source dropped");
                self.last_err = Some(e.to_string());
            }
        }
    }

    /// Tries the claims the best supported first until one is pinned or
    /// none can be tried now; the pinned size, if any.
    async fn try_pin(&mut self, hash: ContentHash, patience: Duration) -> Option<u64> {
        while let Some((id, claimed)) = self.claims.next_pin() {
            let Some(remote) = self.probes.get(&id) else {
                self.claims.forget(&id);
                continue;
            };
            let tried = pin_from(
                remote,
                hash,
                claimed,
                patience,
                &mut self.layer,
                &mut self.claims,
            );
            match tried.await {
                Ok(PinResult::Pinned(bytes)) => {
                    debug!(size = claimed, source = %id.short(), "size proven");
                    self.last_range = Some(bytes);
                }
                Ok(PinResult::Refuted(why)) => {
                    warn!(source = %id, addr = %remote.source.addr, why, "source lied");
                    self.refuted.insert(id, why);
                }
                Err(e) => {
                    warn!(source = %id.short(), error = %e, "source dropped");
                    self.last_err = Some(e.to_string());
                    self.claims.forget(&id);
                    self.probes.remove(&id);
                }
            }
        }
        self.claims.pinned()
    }

    /// Each liar among the probed sources, and how it was caught: its own
    /// data refuted its claim, or the proven size contradicts it.
    fn liars(&self) -> Vec<Dropped> {
        let mut out: Vec<Dropped> = self
            .claims
            .liars()
            .filter_map(|id| {
                let remote = self.probes.get(id)?;
                let reason = match (self.refuted.get(id), self.claims.pinned()) {
                    (Some(why), _) => why.clone(),
                    (None, Some(s)) => format!(
                        "announced a {}-byte file; its layer and last range prove {s} bytes",
                        remote.claimed
                    ),
                    (None, None) => format!(
                        "announced a {}-byte file; the verified layer has {} ranges",
                        remote.claimed,
                        self.claims.ranges().unwrap_or(0)
                    ),
                };
                Some(Dropped {
                    id: *id,
                    addr: remote.source.addr.clone(),
                    reason,
                })
            })
            .collect();
        out.sort_by_key(|d| d.id);
        out
    }

    /// Ends the probing at `size`: liars are dropped and named, sources of
    /// other unproven claims are left alone.
    fn finish(mut self, size: u64) -> Learnt {
        let dropped = self.liars();
        for liar in &dropped {
            warn!(source = %liar.id, addr = %liar.addr, reason = %liar.reason, "source dropped: it lied");
        }
        let mut agreeing = Vec::new();
        for (_, remote) in self.probes.drain() {
            if remote.claimed == size && !dropped.iter().any(|d| d.id == remote.source.id) {
                agreeing.push(remote);
            } else {
                remote.close(b"size");
            }
        }
        Learnt {
            size,
            pinned: self.claims.pinned().is_some(),
            layer: self.layer,
            last_range: self.last_range,
            agreeing,
            dropped,
            last_err: self.last_err,
        }
    }
}

/// Probes sources until a size is pinned: once one has answered, after
/// the others dialled have too or [`TransferTimings::probe_grace`] has
/// passed, the best
/// supported claim is proven (layer, then last range) or refuted, and the
/// next tried. With no source left to ask and none with the last range,
/// the best supported claim is taken unproven.
async fn learn_size(
    dialer: &mut Dialer<'_>,
    more: &mut Option<mpsc::Receiver<Vec<Source>>>,
    timings: &TransferTimings,
) -> Result<Learnt, GetError> {
    let mut probe = SizeProbe::default();
    let mut grace: Option<tokio::time::Instant> = None;
    let mut grace_over = false;
    loop {
        dialer.fill();
        let probing = dialer.tasks.len();
        if !probe.probes.is_empty() && (probing == 0 || grace_over) {
            let patience = timings.schedule.range_timeout;
            if let Some(size) = probe.try_pin(dialer.hash, patience).await {
                return Ok(probe.finish(size));
            }
            if dialer.idle() {
                // Every source is partial without the last range: go on;
                // the last range proves the size or not when it comes.
                if let Some(size) = probe.claims.best() {
                    info!(size, "no source has the last range yet: size not proven");
                    return Ok(probe.finish(size));
                }
            }
        }
        if dialer.idle() {
            return Err(failed(&probe.liars(), probe.last_err));
        }
        let wake = grace.unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            joined = dialer.tasks.join_next(), if !dialer.tasks.is_empty() => {
                if let Some(Ok((source, Task::Probed(result)))) = joined {
                    probe.on_probe(source, result);
                    grace.get_or_insert_with(|| tokio::time::Instant::now() + timings.probe_grace);
                }
            }
            _ = tokio::time::sleep_until(wake), if grace.is_some() && !grace_over => {
                grace_over = true;
            }
            batch = next_batch(more) => match batch {
                Some(batch) => dialer.offer(batch),
                None => *more = None,
            },
        }
    }
}

impl Download<'_> {
    pub async fn run(self) -> Result<Downloaded, GetError> {
        let Download {
            endpoint,
            hash,
            sources,
            target,
            progress,
            mut more,
            share_as,
            timings,
            awaiting,
        } = self;
        let mut dialer = Dialer {
            endpoint,
            routes: Arc::default(),
            awaiting,
            hash,
            pool: SourcePool::default(),
            tasks: JoinSet::new(),
            spawned: 0,
            probe_timeout: timings.probe_timeout,
        };
        for s in sources {
            dialer.pool.offer(s.clone());
        }
        if dialer.pool.is_empty() {
            return Err(GetError::NoSource(hash));
        }
        // First the size, proven; then the ranges.
        let Learnt {
            size,
            pinned,
            layer,
            last_range,
            agreeing,
            mut dropped,
            last_err,
        } = learn_size(&mut dialer, &mut more, &timings).await?;
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
            ranges: Mutex::new(Ranges {
                sched: Schedule::new(done, timings.schedule.clone()),
                progress: Progress {
                    size,
                    verified,
                    fetched: 0,
                    sources: 0,
                    by_route: [0; 4],
                },
            }),
            progress,
            saved: Mutex::new(
                Instant::now()
                    .checked_sub(timings.save_every)
                    .unwrap_or_else(Instant::now),
            ),
            save_every: timings.save_every,
            finished: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            register: share_as,
        });
        if let Some(cvs) = kept {
            let _ = job.layer.set(Arc::new(cvs));
            job.register();
        }
        // The layer and last range that proved the size are kept.
        if let Some(cvs) = layer.filter(|l| l.len() == count) {
            let j = job.clone();
            blocking(move || j.offer_layer(cvs).map(drop))
                .await
                .map_err(io_err(&part))?;
            if let Some(bytes) = last_range.filter(|_| pinned) {
                let j = job.clone();
                blocking(move || j.store(count - 1, &bytes).map(drop))
                    .await
                    .map_err(io_err(&part))?;
            }
        }
        job.publish(&job.ranges());

        for remote in agreeing {
            dialer.fetch(&job, remote);
        }
        let mut last = last_err;
        let mut bad = None;
        let mut saves = tokio::time::interval(timings.save_every);
        while !job.ranges().sched.is_finished() {
            dialer.fill();
            let joined = tokio::select! {
                joined = dialer.tasks.join_next() => joined,
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
                        Some(batch) => dialer.offer(batch),
                        None => more = None,
                    }
                    continue;
                }
            };
            let Some(joined) = joined else {
                break;
            };
            let (source, task) = joined.map_err(|e| io_err(&part)(std::io::Error::other(e)))?;
            match task {
                // A source that joined late: its claim is judged at once.
                Task::Probed(Ok((remote, claimed))) if claimed == size => {
                    dialer.fetch(&job, remote);
                }
                Task::Probed(Ok((remote, claimed))) => {
                    remote.close(b"size");
                    if !pinned {
                        debug!(source = %source.id.short(), claimed, "size differs; not used");
                        continue;
                    }
                    let reason = format!(
                        "announced a {claimed}-byte file; its layer and last range prove {size} bytes"
                    );
                    warn!(source = %source.id, addr = %source.addr, %reason, "source dropped: it lied");
                    dropped.push(Dropped {
                        id: source.id,
                        addr: source.addr,
                        reason,
                    });
                }
                Task::Probed(Err(e)) | Task::Fetched(Err(e)) => match e {
                    SourceError::Io(e) => return Err(io_err(&part)(e)),
                    e @ SourceError::Mismatch { .. } => {
                        warn!(source = %source.id.short(), error = %e, "source dropped: bad data");
                        dropped.push(Dropped {
                            id: source.id,
                            addr: source.addr,
                            reason: e.to_string(),
                        });
                        bad = Some(source.id);
                    }
                    e => {
                        warn!(source = %source.id.short(), error = %e, "source dropped");
                        last = Some(e.to_string());
                    }
                },
                Task::Fetched(Ok(())) => {}
            }
        }
        // Every range is verified: whatever is still in flight is a duplicate.
        dialer.tasks.abort_all();
        while dialer.tasks.join_next().await.is_some() {}
        if !job.ranges().sched.is_finished() {
            // Ranges verified are kept to resume from; a file with none is not.
            if job.ranges().progress.verified == 0 {
                job.finish();
                partial::remove_beside(target);
                if let Some((data_dir, _)) = &job.register {
                    partial::unregister(data_dir, &hash);
                }
            }
            return Err(match bad {
                Some(id) => GetError::HashMismatch {
                    hash,
                    source_id: id.to_string(),
                },
                None => failed(&dropped, last),
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
        let dropped_n = dropped.len();
        info!(%hash, size, fetched, dropped = dropped_n, target = %target.display(), "downloaded and verified");
        let routes = std::mem::take(&mut *dialer.routes.lock().expect("routes lock"));
        Ok(Downloaded {
            size,
            fetched,
            dropped,
            routes,
        })
    }
}

/// The error of a download that no source completed.
fn failed(liars: &[Dropped], last: Option<String>) -> GetError {
    let last = last.unwrap_or_else(|| "no answer".into());
    if liars.is_empty() {
        return GetError::SourcesFailed(last);
    }
    let liars: Vec<String> = liars.iter().map(Dropped::to_string).collect();
    GetError::Liars {
        liars: liars.join("; "),
        last,
    }
}

/// Connects to `source` and asks what it has of `hash`: its size claim
/// and, from a partial source, its have-bitmap. A later better path to it
/// is told in `routes`.
async fn probe(
    endpoint: &Endpoint,
    awaiting: Option<&Arc<crate::push::Awaiting>>,
    hash: ContentHash,
    source: Source,
    index: usize,
    patience: Duration,
    routes: Routes,
) -> Result<(Remote, u64), SourceError> {
    let addr: SocketAddr = source
        .addr
        .parse()
        .map_err(|_| SourceError::Addr(source.addr.clone()))?;
    let attempts = servent_proto::connect::Attempts::default();
    let (peer, route, upgrade) =
        crate::push::reach(endpoint, awaiting, &source, addr, attempts).await?;
    if route != crate::push::Route::Direct {
        info!(
            route = route.name(),
            "reached a source that cannot be dialled"
        );
    }
    let mut remote = Remote {
        peer: std::sync::Mutex::new(peer),
        source,
        index,
        claimed: 0,
        has: None,
        route,
        upgrade: std::sync::Mutex::new(upgrade),
        routes,
    };
    let req = GetRequest::Have(hash);
    let asked = tokio::time::timeout(patience, remote.ask(&req));
    let (reply, mut recv) = asked
        .await
        .map_err(|_| remote.gone(format!("no answer within {patience:?}")))??;
    let (size, partial) = match reply {
        GetReply::Ranges { size, partial } if size <= MAX_DOWNLOAD_SIZE => (size, partial),
        GetReply::Ranges { size, .. } => {
            return Err(remote.protocol(format!(
                "announced {size} bytes; at most {MAX_DOWNLOAD_SIZE} are downloaded"
            )))
        }
        other => {
            return Err(remote.protocol(format!(
                "answered {other:?} to a request for the ranges it has"
            )))
        }
    };
    let count = layer::range_count(size);
    if partial {
        let bytes = remote.read_exact(&mut recv, count.div_ceil(8)).await?;
        let bitmap = Bitmap::from_bytes(bytes, count)
            .ok_or_else(|| remote.protocol("a have-bitmap with bits past the end".into()))?;
        remote.has = Some(bitmap);
    } else {
        remote.read_exact(&mut recv, 0).await?;
    }
    remote.claimed = size;
    Ok((remote, size))
}

/// Tries to prove that the file is `size` bytes, as `remote` says, with
/// what it sends: its layer (unless one of that many ranges verified
/// already), which must prove the hash, and its last range, which must
/// verify against the layer's last CV at exactly that length. Records in
/// `claims` what is proven.
async fn pin_from(
    remote: &Remote,
    hash: ContentHash,
    size: u64,
    patience: Duration,
    layer: &mut Option<Vec<Cv>>,
    claims: &mut SizeClaims<NodeId>,
) -> Result<PinResult, SourceError> {
    let id = remote.source.id;
    let count = layer::range_count(size);
    if layer.as_ref().is_none_or(|l| l.len() != count) {
        let req = GetRequest::Layer(hash);
        let asked = tokio::time::timeout(patience, remote.ask(&req));
        let (reply, mut recv) = asked
            .await
            .map_err(|_| remote.gone(format!("no answer within {patience:?}")))??;
        let partial = match reply {
            GetReply::Ranges { size: s, partial } if s == size => partial,
            other => {
                return Err(remote.protocol(format!(
                    "answered {other:?} to a request for the layer of the {size}-byte file it announced"
                )))
            }
        };
        let bitmap_len = if partial { count.div_ceil(8) } else { 0 };
        let read = remote.read_exact(&mut recv, count * CV_LEN + bitmap_len);
        let mut tail = tokio::time::timeout(patience, read)
            .await
            .map_err(|_| remote.gone(format!("no layer within {patience:?}")))??;
        tail.truncate(count * CV_LEN);
        let cvs = layer::from_bytes(&tail).expect("a whole number of CVs");
        let (good, cvs) =
            tokio::task::spawn_blocking(move || (layer::verify(&cvs, size, &hash), cvs))
                .await
                .map_err(|e| SourceError::Io(std::io::Error::other(e)))?;
        if !good {
            claims.refute(&id);
            return Ok(PinResult::Refuted(format!(
                "announced a {size}-byte file and sent a layer that does not prove its hash"
            )));
        }
        claims.layer_verified(count as u64);
        *layer = Some(cvs);
    }
    let cvs = layer.as_ref().expect("set above");
    let last = count - 1;
    let (offset, length) = layer::range_bounds(size, last);
    let req = GetRequest::Range(RangeRequest {
        hash,
        offset,
        length: Some(length),
    });
    let (reply, mut recv) = tokio::time::timeout(patience, remote.ask(&req))
        .await
        .map_err(|_| remote.gone(format!("no answer within {patience:?}")))??;
    match reply {
        GetReply::Ok { size: s, length: l } if s == size && l == length => {}
        other => {
            return Err(remote.protocol(format!(
                "answered {other:?} to a request for the last {length} bytes of the {size}-byte file it announced"
            )))
        }
    }
    let data = match tokio::time::timeout(patience, read_part(&mut recv, length as usize)).await {
        Ok(Ok(data)) if data.len() as u64 == length => data,
        Ok(Ok(data)) => {
            let n = data.len();
            return Err(remote.gone(format!("the last range cut short after {n} bytes")));
        }
        Ok(Err(e)) => return Err(remote.gone(e.to_string())),
        Err(_) => return Err(remote.gone(format!("no range within {patience:?}"))),
    };
    remote.read_exact(&mut recv, 0).await?;
    if layer::range_cv(&data, last, count) != cvs[last] {
        claims.refute(&id);
        return Ok(PinResult::Refuted(format!(
            "announced a {size}-byte file and sent a last range that does not verify at that length"
        )));
    }
    claims.pin(size);
    Ok(PinResult::Pinned(data))
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

/// One connected source: what size it says the file is, and which ranges
/// it has (`None`: all of them).
struct Remote {
    /// The connection: the one it was reached on, until a better one
    /// replaces a relayed one ([`Remote::conn`]).
    peer: std::sync::Mutex<Peer>,
    source: Source,
    index: usize,
    claimed: u64,
    /// What it said it has when probed; once it fetches, the scheduler
    /// keeps what it says.
    has: Option<Bitmap>,
    /// How it was reached.
    route: crate::push::Route,
    /// For a relayed source: the better connection later rounds may find.
    upgrade: std::sync::Mutex<Option<crate::push::Upgrade>>,
    /// Where an upgrade's route is told, beside the first.
    routes: Routes,
}

/// How long a relayed connection that was replaced stays open, for the
/// requests already on it to finish.
const REPLACED_GRACE: Duration = Duration::from_secs(10);

impl Remote {
    /// The connection to send the next request on: a better one, once a
    /// relayed source's later rounds found one (the relayed one then
    /// closes once the requests on it are done).
    fn conn(&self) -> quinn::Connection {
        let better = self
            .upgrade
            .lock()
            .expect("upgrade lock")
            .as_mut()
            .and_then(crate::push::Upgrade::try_take);
        let mut peer = self.peer.lock().expect("peer lock");
        if let Some((better, route)) = better {
            info!(
                route = route.name(),
                "a relayed source is now reached without the relay"
            );
            let told = (self.source.id, route);
            self.routes.lock().expect("routes lock").push(told);
            let relayed = std::mem::replace(&mut *peer, better);
            tokio::spawn(async move {
                tokio::time::sleep(REPLACED_GRACE).await;
                relayed.conn.close(0u32.into(), b"replaced");
            });
        }
        peer.conn.clone()
    }

    fn close(&self, reason: &[u8]) {
        self.peer
            .lock()
            .expect("peer lock")
            .conn
            .close(0u32.into(), reason);
    }

    /// The source, named by id and address in every error about it.
    fn who(&self) -> String {
        format!("{} at {}", self.source.id, self.source.addr)
    }

    fn has_range(&self, index: usize) -> bool {
        self.has.as_ref().is_none_or(|h| h.get(index))
    }

    fn gone(&self, reason: String) -> SourceError {
        SourceError::Gone {
            addr: self.who(),
            reason,
        }
    }

    fn protocol(&self, reason: String) -> SourceError {
        SourceError::Protocol {
            addr: self.who(),
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
                addr: self.who(),
                what,
            }),
        }
    }

    /// Sends `req` and reads the reply header.
    async fn ask(&self, req: &GetRequest) -> Result<(GetReply, quinn::RecvStream), SourceError> {
        let (mut send, mut recv) = self
            .conn()
            .open_bi()
            .await
            .map_err(|e| self.gone(e.to_string()))?;
        net::write_frame(&mut send, req, MAX_TRANSFER_FRAME)
            .await
            .map_err(|e| self.gone(e.to_string()))?;
        let _ = send.finish();
        match net::read_first_frame::<GetReply>(&mut recv, MAX_TRANSFER_FRAME).await {
            Ok(Some(GetReply::Error(reply))) => Err(SourceError::Refused {
                addr: self.who(),
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

    /// Asks for the layer (if `job` has none yet) or the have-bitmap: which
    /// ranges the source has (`None`: all).
    async fn learn(&self, job: &Arc<Job>) -> Result<Option<Bitmap>, SourceError> {
        let want_layer = job.layer.get().is_none();
        let req = if want_layer {
            GetRequest::Layer(job.hash)
        } else {
            GetRequest::Have(job.hash)
        };
        let (reply, mut recv) = self.ask(&req).await?;
        let partial = match reply {
            GetReply::Ranges { size, partial } if size == job.size => partial,
            // It said otherwise when probed: a change of mind is a lie.
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
        match partial {
            false => Ok(None),
            true => Bitmap::from_bytes(bitmap, job.count)
                .map(Some)
                .ok_or_else(|| self.protocol("a have-bitmap with bits past the end".into())),
        }
    }
}

/// Fetches ranges from one probed source until none is left for it, or
/// it fails.
async fn fetch_from(job: &Arc<Job>, remote: Remote) -> Result<(), SourceError> {
    let has = remote.learn(job).await?;
    job.ranges().sched.add_source(remote.index, has);
    let _fetching = Fetching {
        job,
        source: remote.index,
    };
    job.sources_changed(1, remote.route);
    // PER_SOURCE requests in flight; the first failure ends them all.
    let workers = (0..PER_SOURCE).map(|slot| worker(&remote, job, slot));
    let result = futures_util::future::try_join_all(workers).await.map(drop);
    job.sources_changed(-1, remote.route);
    if result.is_ok() {
        remote.close(b"done");
    }
    result
}

/// One request slot of a source: does what the scheduler says, and tells
/// it how each request went.
async fn worker(remote: &Remote, job: &Arc<Job>, slot: usize) -> Result<(), SourceError> {
    let source = remote.index;
    let mut next = job.ranges().sched.next(Instant::now(), source, slot);
    loop {
        match next {
            Action::Fetch { run, patience } => {
                let result = fetch_run(remote, job, run.clone(), patience).await;
                let outcome = match &result {
                    Ok(()) => Outcome::Delivered,
                    Err(SourceError::Refused { reply, .. })
                        if reply.code == ErrorCode::Unavailable =>
                    {
                        Outcome::Unavailable
                    }
                    Err(_) => Outcome::Failed,
                };
                // What was not verified goes back to the others at once.
                next = job
                    .ranges()
                    .sched
                    .on_run_ended(Instant::now(), source, slot, run, outcome);
                match (result, &next) {
                    (Err(e), Action::Drop) => return Err(e),
                    (Err(SourceError::Refused { reply, .. }), Action::Wait { then, .. }) => {
                        match then {
                            Then::AskHave => {
                                debug!(%reply, "partial source lacks a range; asking what it has")
                            }
                            Then::Claim => debug!(%reply, "source busy; asking again later"),
                        }
                    }
                    _ => {}
                }
            }
            Action::Wait { until, then } => {
                tokio::time::sleep_until(until.into()).await;
                if then == Then::AskHave {
                    let has = remote.learn(job).await?;
                    job.ranges().sched.on_have(source, has);
                }
                next = job.ranges().sched.next(Instant::now(), source, slot);
            }
            Action::Idle | Action::Finished => return Ok(()),
            Action::Drop => return Err(remote.gone("given up by the scheduler".into())),
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
    remote: &Remote,
    job: &Arc<Job>,
    run: std::ops::Range<usize>,
    patience: Duration,
) -> Result<(), SourceError> {
    let (offset, _) = job.range(run.start);
    let length: u64 = run.clone().map(|i| job.range(i).1).sum();
    let req = GetRequest::Range(RangeRequest {
        hash: job.hash,
        offset,
        length: Some(length),
    });
    let (reply, mut recv) = tokio::time::timeout(patience, remote.ask(&req))
        .await
        .map_err(|_| remote.gone(format!("no answer within {patience:?}")))??;
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
        let data = match tokio::time::timeout(patience, read_part(&mut recv, want)).await {
            Ok(Ok(data)) if data.len() == want => data,
            Ok(Ok(data)) => {
                let n = data.len();
                return Err(remote.gone(format!("range {index} cut short after {n} bytes")));
            }
            Ok(Err(e)) => return Err(remote.gone(e.to_string())),
            Err(_) => return Err(remote.gone(format!("no range within {patience:?}"))),
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
