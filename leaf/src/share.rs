//! The shared folders: scanning, hashing (with a cache in the data dir),
//! noticing changes, and the lookup the transfer server serves from.
//!
//! The first folder is the one `leaf serve --share` names; more can be
//! added while it runs (the control API), and are kept in
//! `<data-dir>/shares.json` for the next start. Only regular files below a
//! share root are shared. Symbolic links are
//! never followed, hidden files (a name starting with `.`), partial
//! downloads and files whose names `servent_proto::name` refuses (bidi
//! controls, zero-width characters, ...: a warning names each once) are
//! skipped, names are announced in NFC, and a file is served only while its
//! size and modification time are those it had when it was hashed.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use servent_proto::limits::MAX_NAME_BYTES;
use servent_proto::msg::{truncate_utf8, FileEntry};
use servent_proto::name::{self, NameError};
use servent_proto::ContentHash;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::layer;
use crate::partial::{self, Partial};

/// Suffix of partial downloads, which are never shared.
pub const PART_SUFFIX: &str = ".servent-part";

/// The timings of watching the share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareTimings {
    /// The share is rescanned this often even if no change was reported.
    /// Default 30 s.
    pub rescan_interval: Duration,
    /// The register of downloads in progress is read this often. Default 1 s.
    pub partials_poll: Duration,
    /// Changes reported by the watcher are batched for this long. Default
    /// 300 ms.
    pub debounce: Duration,
}

impl Default for ShareTimings {
    fn default() -> Self {
        Self {
            rescan_interval: Duration::from_secs(30),
            partials_poll: Duration::from_secs(1),
            debounce: Duration::from_millis(300),
        }
    }
}

const CACHE_FILE: &str = "hash-cache.json";
/// Folder of the data dir that holds the range layer of each shared
/// content (see [`crate::layer`]).
const LAYER_DIR: &str = "layers";
/// Where earlier versions kept bao outboards; removed when found.
const OLD_OUTBOARD_DIR: &str = "outboard";

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("cannot open the share folder {path}: {source}")]
    Root {
        path: String,
        source: std::io::Error,
    },
    #[error("the share {0} is not a folder")]
    NotADir(String),
    #[error("{0} is shared already")]
    AlreadyShared(String),
    #[error("{0} is not shared")]
    NotShared(String),
    #[error("{0} is the folder `leaf serve --share` gave: it stays shared")]
    Primary(String),
    #[error("at most {MAX_ROOTS} folders are shared")]
    TooMany,
    #[error("cannot record the shared folders: {0}")]
    Record(std::io::Error),
}

/// Folders shared at most.
pub const MAX_ROOTS: usize = 32;
/// The folders added beside `--share`, in the data dir.
const ROOTS_FILE: &str = "shares.json";

/// `path` made absolute and canonical, if it is a folder.
fn canonical_dir(path: &Path) -> Result<PathBuf, ShareError> {
    let root = path.canonicalize().map_err(|source| ShareError::Root {
        path: path.display().to_string(),
        source,
    })?;
    match root.is_dir() {
        true => Ok(root),
        false => Err(ShareError::NotADir(root.display().to_string())),
    }
}

/// Size and modification time: a file whose stamp changed is rehashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    pub size: u64,
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
}

impl Stamp {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        let (mtime_secs, mtime_nanos) = match meta.modified() {
            Ok(t) => match t.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
                Err(e) => (
                    -(e.duration().as_secs() as i64),
                    e.duration().subsec_nanos(),
                ),
            },
            Err(_) => (0, 0),
        };
        Self {
            size: meta.len(),
            mtime_secs,
            mtime_nanos,
        }
    }
}

/// A shared file as the transfer server needs it.
#[derive(Debug, Clone)]
pub struct SharedFile {
    /// Absolute path, below the canonical share root.
    pub path: PathBuf,
    pub name: String,
    pub stamp: Stamp,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct CacheFile {
    entries: HashMap<PathBuf, CacheEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheEntry {
    stamp: Stamp,
    hash: String,
}

/// Progress of the current scan, for status and logs: over all folders,
/// or one folder's.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ScanProgress {
    pub files_to_hash: u64,
    pub files_hashed: u64,
    pub bytes_to_hash: u64,
    pub bytes_hashed: u64,
}

impl ScanProgress {
    fn add(&mut self, other: &ScanProgress) {
        self.files_to_hash += other.files_to_hash;
        self.files_hashed += other.files_hashed;
        self.bytes_to_hash += other.bytes_to_hash;
        self.bytes_hashed += other.bytes_hashed;
    }
}

/// One shared folder now: what it shares and how far its hashing is.
#[derive(Debug, Clone)]
pub struct Folder {
    pub path: PathBuf,
    /// Files and bytes shared now (those still to hash are not counted).
    pub files: usize,
    pub bytes: u64,
    /// The current scan's progress below this folder.
    pub hashing: ScanProgress,
}

/// What a leaf shares. Cheap to read from any task; written by the scanner.
pub struct Share {
    /// The folders shared, `--share`'s first.
    roots: RwLock<Vec<PathBuf>>,
    /// Bumped when a folder is added or removed; the watcher watches it.
    roots_version: watch::Sender<u64>,
    data_dir: PathBuf,
    /// hash → file: what is announced and served.
    files: DashMap<ContentHash, SharedFile>,
    /// Downloads in progress, shared while they run (see
    /// [`crate::partial`]); a hash in `files` is served from there.
    partials: DashMap<ContentHash, Partial>,
    /// path → (stamp, hash) of every file hashed, owned by the scanner.
    paths: Mutex<HashMap<PathBuf, (Stamp, ContentHash)>>,
    /// Bumped after every change to `files`; links and waiters watch it.
    version: watch::Sender<u64>,
    /// The current scan's progress, by folder (owned by the scanner).
    progress: Mutex<HashMap<PathBuf, ScanProgress>>,
    /// Files found whose names cannot be announced, warned about once
    /// (owned by the scanner; only those still there are kept).
    refused: Mutex<HashSet<PathBuf>>,
}

impl Share {
    pub fn open(root: &Path, data_dir: &Path) -> Result<Arc<Self>, ShareError> {
        let root = canonical_dir(root)?;
        let mut roots = vec![root];
        // Those added in earlier runs, still folders.
        let added: Vec<PathBuf> = std::fs::read(data_dir.join(ROOTS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for path in added {
            match canonical_dir(&path) {
                Ok(r) if !roots.contains(&r) && roots.len() < MAX_ROOTS => roots.push(r),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "a folder shared before is gone; not shared"),
            }
        }
        Ok(Arc::new(Self {
            roots: RwLock::new(roots),
            roots_version: watch::channel(0).0,
            data_dir: data_dir.to_path_buf(),
            files: DashMap::new(),
            partials: DashMap::new(),
            paths: Mutex::new(HashMap::new()),
            version: watch::channel(0).0,
            progress: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashSet::new()),
        }))
    }

    /// The folder `--share` gave (downloads go there).
    pub fn root(&self) -> PathBuf {
        self.roots.read().expect("roots lock")[0].clone()
    }

    /// Every folder shared, `--share`'s first.
    pub fn roots(&self) -> Vec<PathBuf> {
        self.roots.read().expect("roots lock").clone()
    }

    /// Watches the list of folders (bumped when one is added or removed).
    pub fn subscribe_roots(&self) -> watch::Receiver<u64> {
        self.roots_version.subscribe()
    }

    /// Shares one more folder, from the next scan on, and records it for
    /// the next start.
    pub fn add_root(&self, path: &Path) -> Result<PathBuf, ShareError> {
        let root = canonical_dir(path)?;
        {
            let mut roots = self.roots.write().expect("roots lock");
            if roots.contains(&root) {
                return Err(ShareError::AlreadyShared(root.display().to_string()));
            }
            if roots.len() >= MAX_ROOTS {
                return Err(ShareError::TooMany);
            }
            roots.push(root.clone());
            self.record_roots(&roots)?;
        }
        info!(folder = %root.display(), "sharing one more folder");
        self.roots_version.send_modify(|v| *v += 1);
        Ok(root)
    }

    /// Stops sharing a folder added with [`Share::add_root`] (its files go
    /// at the next scan).
    pub fn remove_root(&self, path: &Path) -> Result<(), ShareError> {
        let root = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        {
            let mut roots = self.roots.write().expect("roots lock");
            let at = roots
                .iter()
                .position(|r| *r == root)
                .ok_or_else(|| ShareError::NotShared(root.display().to_string()))?;
            if at == 0 {
                return Err(ShareError::Primary(root.display().to_string()));
            }
            roots.remove(at);
            self.record_roots(&roots)?;
        }
        info!(folder = %root.display(), "no longer sharing a folder");
        self.roots_version.send_modify(|v| *v += 1);
        Ok(())
    }

    fn record_roots(&self, roots: &[PathBuf]) -> Result<(), ShareError> {
        let added = serde_json::to_vec_pretty(&roots[1..]).expect("paths serialise");
        crate::replace_file(&self.data_dir.join(ROOTS_FILE), &added).map_err(ShareError::Record)
    }

    /// Each folder shared, in [`Share::roots`]' order: files and bytes
    /// shared now below it and its hashing progress.
    pub fn folders(&self) -> Vec<Folder> {
        let progress = self.progress.lock().expect("progress lock").clone();
        let mut folders: Vec<Folder> = self
            .roots()
            .into_iter()
            .map(|path| Folder {
                hashing: progress.get(&path).copied().unwrap_or_default(),
                path,
                files: 0,
                bytes: 0,
            })
            .collect();
        for f in self.files.iter() {
            if let Some(t) = folders.iter_mut().find(|t| f.path.starts_with(&t.path)) {
                t.files += 1;
                t.bytes += f.stamp.size;
            }
        }
        folders
    }

    /// The folder shared that holds `path`, if any.
    fn root_of(&self, path: &Path) -> Option<PathBuf> {
        let roots = self.roots.read().expect("roots lock");
        roots.iter().find(|r| path.starts_with(r)).cloned()
    }

    fn under_a_root(&self, path: &Path) -> bool {
        let roots = self.roots.read().expect("roots lock");
        roots.iter().any(|r| path.starts_with(r))
    }

    /// Number of distinct files shared now.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    pub fn get(&self, hash: &ContentHash) -> Option<SharedFile> {
        self.files.get(hash).map(|f| f.clone())
    }

    /// A download in progress that is shared, by hash.
    pub fn partial(&self, hash: &ContentHash) -> Option<Partial> {
        self.partials.get(hash).map(|p| p.clone())
    }

    /// Downloads in progress that are shared now.
    pub fn partials(&self) -> usize {
        self.partials.len()
    }

    /// Every shared file as announced to supernodes, downloads in progress
    /// included.
    pub fn entries(&self) -> Vec<FileEntry> {
        let whole = self.files.iter().map(|f| FileEntry {
            hash: *f.key(),
            name: f.name.clone(),
            size: f.stamp.size,
        });
        let partial = self
            .partials
            .iter()
            .filter(|p| !self.files.contains_key(p.key()))
            .filter_map(|p| {
                Some(FileEntry {
                    hash: p.hash,
                    name: announce_name(Path::new(&p.name)).ok()?,
                    size: p.size,
                })
            });
        whole.chain(partial).collect()
    }

    /// Reads the register of downloads of this data dir again; announces
    /// what started, withdraws what ended. Blocking.
    pub fn refresh_partials(&self) {
        let known = |h: &ContentHash, e: &partial::Entry| {
            self.partials
                .get(h)
                .filter(|p| p.target == e.target && p.name == e.name && p.size == e.size)
                .map(|p| p.clone())
        };
        let now: HashMap<ContentHash, Partial> = partial::list(&self.data_dir, known)
            .into_iter()
            .map(|p| (p.hash, p))
            .collect();
        let same = now.len() == self.partials.len()
            && now.iter().all(|(h, p)| {
                self.partials
                    .get(h)
                    .is_some_and(|q| q.target == p.target && q.name == p.name)
            });
        if same {
            return;
        }
        self.partials.retain(|h, _| now.contains_key(h));
        for (h, p) in now {
            self.partials.insert(h, p);
        }
        debug!(
            partials = self.partials.len(),
            "downloads shared while they run"
        );
        self.bump();
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// The current scan's progress over all folders.
    pub fn progress(&self) -> ScanProgress {
        let mut sum = ScanProgress::default();
        for p in self.progress.lock().expect("progress lock").values() {
            sum.add(p);
        }
        sum
    }

    /// Scans the folder once: drops what is gone or changed, shares what
    /// the cache already knows at once, then hashes the rest, sharing each
    /// file as soon as it is hashed. Blocking: run it off the async threads.
    pub fn scan(&self) {
        let started = Instant::now();
        let mut cache = self.load_cache();
        let found = self.walk();
        let mut paths = self.paths.lock().expect("paths lock");

        // Gone or changed since the last scan.
        let stale: Vec<PathBuf> = paths
            .iter()
            .filter(|(p, (stamp, _))| found.get(*p) != Some(stamp))
            .map(|(p, _)| p.clone())
            .collect();
        for p in &stale {
            if let Some((_, hash)) = paths.remove(p) {
                self.unshare(&paths, p, hash);
            }
        }

        // Known from the cache, or new.
        let mut to_hash = Vec::new();
        for (path, stamp) in &found {
            if paths.contains_key(path) {
                continue;
            }
            match cache.entries.get(path) {
                Some(c) if c.stamp == *stamp => match c.hash.parse::<ContentHash>() {
                    // Without its layer the file cannot be served in
                    // verifiable ranges: hash it again, which writes one.
                    Ok(hash) if self.layer_path(&hash).is_file() => {
                        paths.insert(path.clone(), (*stamp, hash));
                        self.share(path, *stamp, hash);
                    }
                    _ => to_hash.push((path.clone(), *stamp)),
                },
                _ => to_hash.push((path.clone(), *stamp)),
            }
        }
        drop(paths);
        self.bump();

        // Hash what is new, sharing each file as it is done.
        let total_bytes: u64 = to_hash.iter().map(|(_, s)| s.size).sum();
        let to_hash: Vec<(PathBuf, Stamp, Option<PathBuf>)> = to_hash
            .into_iter()
            .map(|(path, stamp)| {
                let root = self.root_of(&path);
                (path, stamp, root)
            })
            .collect();
        {
            let mut progress = self.progress.lock().expect("progress lock");
            progress.clear();
            for (_, stamp, root) in &to_hash {
                if let Some(root) = root {
                    let p = progress.entry(root.clone()).or_default();
                    p.files_to_hash += 1;
                    p.bytes_to_hash += stamp.size;
                }
            }
        }
        if !to_hash.is_empty() {
            info!(
                files = to_hash.len(),
                bytes = total_bytes,
                "hashing new or changed files"
            );
        }
        let mut last_report = Instant::now();
        let mut last_save = Instant::now();
        for (i, (path, stamp, root)) in to_hash.iter().enumerate() {
            match hash_file(path, *stamp, &self.data_dir.join(LAYER_DIR)) {
                Ok(hash) => {
                    cache.entries.insert(
                        path.clone(),
                        CacheEntry {
                            stamp: *stamp,
                            hash: hash.to_string(),
                        },
                    );
                    self.paths
                        .lock()
                        .expect("paths lock")
                        .insert(path.clone(), (*stamp, hash));
                    self.share(path, *stamp, hash);
                    self.bump();
                }
                Err(e) => debug!(path = %path.display(), error = %e, "not hashed"),
            }
            let mut progress = self.progress.lock().expect("progress lock");
            if let Some(p) = root.as_ref().and_then(|r| progress.get_mut(r)) {
                p.files_hashed += 1;
                p.bytes_hashed += stamp.size;
            }
            drop(progress);
            if last_report.elapsed() > Duration::from_secs(2) {
                let p = self.progress();
                info!(
                    files = i + 1,
                    of = to_hash.len(),
                    mib = p.bytes_hashed >> 20,
                    of_mib = total_bytes >> 20,
                    "hashing"
                );
                last_report = Instant::now();
            }
            if last_save.elapsed() > Duration::from_secs(10) {
                self.save_cache(&cache);
                last_save = Instant::now();
            }
        }
        // Keep the cache to what exists, so it does not grow forever.
        cache
            .entries
            .retain(|p, _| found.contains_key(p) || !self.under_a_root(p));
        self.save_cache(&cache);
        self.prune_layers(&cache);
        let took_ms = started.elapsed().as_millis() as u64;
        if to_hash.is_empty() && stale.is_empty() {
            debug!(shared = self.len(), took_ms, "scan done");
        } else {
            info!(
                shared = self.len(),
                hashed = to_hash.len(),
                removed = stale.len(),
                took_ms,
                "scan done"
            );
        }
    }

    fn share(&self, path: &Path, stamp: Stamp, hash: ContentHash) {
        let Ok(name) = announce_name(path) else {
            debug!(path = %path.display(), "name cannot be announced; not shared");
            return;
        };
        self.files.entry(hash).or_insert(SharedFile {
            path: path.to_path_buf(),
            name,
            stamp,
        });
    }

    /// Stops sharing `path`; the content stays shared if another file has it.
    fn unshare(
        &self,
        paths: &HashMap<PathBuf, (Stamp, ContentHash)>,
        path: &Path,
        hash: ContentHash,
    ) {
        let serving_this = self.files.get(&hash).is_some_and(|f| f.path == path);
        if !serving_this {
            return;
        }
        match paths.iter().find(|(_, (_, h))| *h == hash) {
            Some((other, (stamp, _))) => {
                let Ok(name) = announce_name(other) else {
                    self.files.remove(&hash);
                    return;
                };
                self.files.insert(
                    hash,
                    SharedFile {
                        path: other.clone(),
                        name,
                        stamp: *stamp,
                    },
                );
            }
            None => {
                self.files.remove(&hash);
            }
        }
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Regular files below the root with their stamps. Symlinks are not
    /// followed, not even to files inside the share. Files whose names
    /// cannot be announced are left out (and not hashed), with a warning
    /// the first time each is seen.
    fn walk(&self) -> HashMap<PathBuf, Stamp> {
        let mut out = HashMap::new();
        let mut refused = HashSet::new();
        let walkers = self.roots().into_iter().map(|root| {
            walkdir::WalkDir::new(root)
                .follow_links(false)
                .into_iter()
                .filter_entry(|e| {
                    e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.')
                })
        });
        for entry in walkers.flatten() {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    debug!(error = %e, "skipped while scanning");
                    continue;
                }
            };
            if !entry.file_type().is_file()
                || entry.file_name().to_string_lossy().ends_with(PART_SUFFIX)
            {
                continue;
            }
            if let Err(e) = announce_name(entry.path()) {
                let path = entry.into_path();
                if !self.was_refused(&path) {
                    // Debug-quoted: the name may hold what a terminal obeys.
                    warn!(path = ?path, error = %e, "not shared: its name cannot be announced");
                }
                refused.insert(path);
                continue;
            }
            if let Ok(meta) = entry.metadata() {
                out.insert(entry.into_path(), Stamp::of(&meta));
            }
        }
        *self.refused.lock().expect("refused lock") = refused;
        out
    }

    fn was_refused(&self, path: &Path) -> bool {
        self.refused.lock().expect("refused lock").contains(path)
    }

    /// Removes the layers of content the cache no longer knows, so that
    /// the folder does not grow forever.
    fn prune_layers(&self, cache: &CacheFile) {
        let _ = std::fs::remove_dir_all(self.data_dir.join(OLD_OUTBOARD_DIR));
        let keep: std::collections::HashSet<String> = cache
            .entries
            .values()
            .map(|c| format!("{}.{LAYER_EXT}", c.hash))
            .collect();
        let Ok(dir) = std::fs::read_dir(self.data_dir.join(LAYER_DIR)) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(LAYER_EXT) && !keep.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn load_cache(&self) -> CacheFile {
        let path = self.data_dir.join(CACHE_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "hash cache unreadable; rehashing");
                CacheFile::default()
            }),
            Err(_) => CacheFile::default(),
        }
    }

    fn save_cache(&self, cache: &CacheFile) {
        let path = self.data_dir.join(CACHE_FILE);
        let result = serde_json::to_vec(cache)
            .map_err(std::io::Error::other)
            .and_then(|bytes| crate::replace_file(&path, &bytes));
        if let Err(e) = result {
            warn!(path = %path.display(), error = %e, "cannot save the hash cache");
        }
    }

    /// Where the range layer of `hash` lives (written when it was hashed).
    pub fn layer_path(&self, hash: &ContentHash) -> PathBuf {
        layer_path(&self.data_dir.join(LAYER_DIR), hash)
    }

    /// Checks that `file` is still what was hashed and below the root, and
    /// opens it. Anything else is refused: a file replaced by a link to
    /// elsewhere, a changed file (it is rehashed at the next scan).
    pub fn open_verified(&self, file: &SharedFile) -> std::io::Result<std::fs::File> {
        let real = file.path.canonicalize()?;
        if !self.under_a_root(&real) || real != file.path {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "outside the share",
            ));
        }
        let f = std::fs::File::open(&real)?;
        let meta = f.metadata()?;
        if !meta.is_file() || Stamp::of(&meta) != file.stamp {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "changed since it was hashed",
            ));
        }
        Ok(f)
    }
}

/// Why a file's name cannot be announced.
#[derive(Debug, thiserror::Error)]
enum Unannounceable {
    #[error("file name is not UTF-8")]
    NotUtf8,
    #[error(transparent)]
    Name(#[from] NameError),
}

/// The name under which a file is announced: its last path component in
/// NFC, cut to the protocol's limit, if `servent_proto::name` allows it.
fn announce_name(path: &Path) -> Result<String, Unannounceable> {
    let raw = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or(Unannounceable::NotUtf8)?;
    let mut name = name::nfc(raw);
    truncate_utf8(&mut name, MAX_NAME_BYTES);
    // Normalised again: the cut may have left a form that composes.
    Ok(name::sanitise(&name)?)
}

const LAYER_EXT: &str = "layer";

fn layer_path(dir: &Path, hash: &ContentHash) -> PathBuf {
    dir.join(format!("{hash}.{LAYER_EXT}"))
}

/// BLAKE3 of a file, refusing it if it changed while being read. Writes
/// its range layer (see [`crate::layer`]) into `layer_dir` on the way: the
/// same pass computes both.
pub fn hash_file(path: &Path, stamp: Stamp, layer_dir: &Path) -> std::io::Result<ContentHash> {
    let f = std::fs::File::open(path)?;
    let (hash, layer) = layer::hash_reader(&f, stamp.size)?;
    if Stamp::of(&f.metadata()?) != stamp {
        return Err(std::io::Error::other("changed while hashing"));
    }
    layer::save(&layer_path(layer_dir, &hash), &layer)?;
    Ok(hash)
}

/// Rescans on every change the OS reports (batched) and every
/// [`ShareTimings::rescan_interval`], until `stop` fires.
pub async fn watch(share: Arc<Share>, timings: ShareTimings, mut stop: watch::Receiver<bool>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    // One watcher of every folder, made again when the folders change.
    let watch_all = |roots: Vec<PathBuf>| {
        use notify::Watcher;
        let tx = tx.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // Reads (ours included, when serving or hashing) change nothing.
            if res.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut w| {
            for root in &roots {
                w.watch(root, notify::RecursiveMode::Recursive)?;
            }
            Ok(w)
        });
        match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(error = %e, "cannot watch the share; rescanning every {} s", timings.rescan_interval.as_secs());
                None
            }
        }
    };
    let mut roots = share.subscribe_roots();
    let mut _watcher = watch_all(share.roots());
    let rescan = |share: Arc<Share>| async move {
        let _ = tokio::task::spawn_blocking(move || share.scan()).await;
    };
    rescan(share.clone()).await;
    let mut partials = tokio::time::interval(timings.partials_poll);
    let mut last_scan = Instant::now();
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = partials.tick() => {
                let share = share.clone();
                let _ = tokio::task::spawn_blocking(move || share.refresh_partials()).await;
                if last_scan.elapsed() < timings.rescan_interval {
                    continue;
                }
            }
            Some(()) = rx.recv() => {
                tokio::time::sleep(timings.debounce).await;
                while rx.try_recv().is_ok() {}
            }
            Ok(()) = roots.changed() => {
                roots.borrow_and_update();
                _watcher = watch_all(share.roots());
            }
        }
        rescan(share.clone()).await;
        last_scan = Instant::now();
    }
}

/// Seconds since the epoch, for logs and status.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_of(bytes: &[u8]) -> ContentHash {
        ContentHash(*blake3::hash(bytes).as_bytes())
    }

    #[test]
    fn scan_shares_regular_files_and_skips_links_hidden_and_parts() {
        let share_dir = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret.txt"), b"secret").unwrap();
        std::fs::create_dir(share_dir.path().join("sub")).unwrap();
        std::fs::write(share_dir.path().join("sub/song.mp3"), b"music").unwrap();
        std::fs::write(share_dir.path().join(".hidden"), b"h").unwrap();
        std::fs::write(share_dir.path().join("x.servent-part"), b"p").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(
                outside.path().join("secret.txt"),
                share_dir.path().join("link.txt"),
            )
            .unwrap();
            std::os::unix::fs::symlink(outside.path(), share_dir.path().join("linkdir")).unwrap();
        }
        let share = Share::open(share_dir.path(), data.path()).unwrap();
        share.scan();
        assert_eq!(share.len(), 1);
        let f = share.get(&hash_of(b"music")).unwrap();
        assert_eq!(f.name, "song.mp3");
        assert!(share.get(&hash_of(b"secret")).is_none());
    }

    #[test]
    fn cache_avoids_rehash_and_changes_are_noticed() {
        let share_dir = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let p = share_dir.path().join("a.txt");
        std::fs::write(&p, b"one").unwrap();
        let share = Share::open(share_dir.path(), data.path()).unwrap();
        share.scan();
        assert_eq!(share.progress().files_hashed, 1);

        // A restart with the cache hashes nothing.
        let again = Share::open(share_dir.path(), data.path()).unwrap();
        again.scan();
        assert_eq!(again.progress().files_to_hash, 0);
        assert!(again.get(&hash_of(b"one")).is_some());

        // A changed file is rehashed; a removed one is dropped.
        std::fs::write(&p, b"two!").unwrap();
        again.scan();
        assert!(again.get(&hash_of(b"one")).is_none());
        assert!(again.get(&hash_of(b"two!")).is_some());
        std::fs::remove_file(&p).unwrap();
        again.scan();
        assert!(again.is_empty());
        // Its layer went with it.
        let left = std::fs::read_dir(data.path().join(LAYER_DIR)).unwrap();
        assert_eq!(left.filter_map(Result::ok).count(), 0);
    }

    #[test]
    fn each_folder_says_how_far_its_own_hashing_is() {
        let music = tempfile::tempdir().unwrap();
        let books = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        std::fs::write(music.path().join("a.flac"), b"aaaa").unwrap();
        std::fs::write(music.path().join("b.flac"), b"bbbbbb").unwrap();
        std::fs::write(books.path().join("c.epub"), b"c").unwrap();
        let share = Share::open(music.path(), data.path()).unwrap();
        share.add_root(books.path()).unwrap();
        share.scan();
        let hashed = |files, bytes| ScanProgress {
            files_to_hash: files,
            files_hashed: files,
            bytes_to_hash: bytes,
            bytes_hashed: bytes,
        };
        let folders = share.folders();
        assert_eq!(folders.len(), 2);
        assert_eq!((folders[0].files, folders[0].bytes), (2, 10));
        assert_eq!(folders[0].hashing, hashed(2, 10));
        assert_eq!((folders[1].files, folders[1].bytes), (1, 1));
        assert_eq!(folders[1].hashing, hashed(1, 1));
        assert_eq!(share.progress(), hashed(3, 11));

        // The next scan hashes only what is new, in the folder it is in.
        std::fs::write(books.path().join("d.epub"), b"ddd").unwrap();
        share.scan();
        let folders = share.folders();
        assert_eq!(folders[0].hashing, ScanProgress::default());
        assert_eq!(folders[1].hashing, hashed(1, 3));
        assert_eq!((folders[1].files, folders[1].bytes), (2, 4));
    }

    #[test]
    fn the_hash_is_blake3_and_the_layer_is_kept() {
        let share_dir = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        // Sizes around a chunk, a range and a multi-level tree.
        for len in [0usize, 1, 1024, 1025, 300_000, 1_100_000] {
            let content: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let p = share_dir.path().join(format!("f{len}"));
            std::fs::write(&p, &content).unwrap();
            let stamp = Stamp::of(&std::fs::metadata(&p).unwrap());
            let dir = data.path().join(LAYER_DIR);
            let hash = hash_file(&p, stamp, &dir).unwrap();
            assert_eq!(hash, hash_of(&content), "len {len}");
            let kept = layer::load(&layer_path(&dir, &hash), len as u64, &hash).unwrap();
            assert_eq!(kept.len(), layer::range_count(len as u64), "len {len}");
        }
    }

    #[test]
    fn duplicate_content_survives_removing_one_copy() {
        let share_dir = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        std::fs::write(share_dir.path().join("a"), b"same").unwrap();
        std::fs::write(share_dir.path().join("b"), b"same").unwrap();
        let share = Share::open(share_dir.path(), data.path()).unwrap();
        share.scan();
        let served = share.get(&hash_of(b"same")).unwrap().path;
        std::fs::remove_file(&served).unwrap();
        share.scan();
        let now = share
            .get(&hash_of(b"same"))
            .expect("still shared from the other copy");
        assert_ne!(now.path, served);
        assert!(share.open_verified(&now).is_ok());
    }
}
