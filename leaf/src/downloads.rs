//! The daemon's downloads (docs/API.md, "Downloads"): a list that `leaf
//! serve` owns, kept in `<data-dir>/downloads.json`, run a few at a time
//! (the rules of `servent_proto::queue`), each through a [`Client`] of its
//! own so that it goes on whoever asked for it, and resumed from its
//! verified ranges after a restart.
//!
//! [`Downloads`] is the one owner of the list: the API asks it, and each
//! running download reports to it. Its lock is never held across an await.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use servent_proto::magnet::Link;
use servent_proto::queue::{self, Command, Effect, State};
use servent_proto::ContentHash;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::transfer::Progress;
use crate::{partial, safe_file_name, Client, ClientError, Timings};

/// Downloads in the list at most.
pub const MAX_DOWNLOADS: usize = 1000;
/// Downloads running at once, by default (`--max-active-downloads`).
pub const DEFAULT_MAX_ACTIVE: usize = 3;
/// How long a download waits for the supernodes to name its sources.
const LOCATE_TIMEOUT: Duration = Duration::from_secs(5);
/// Events of one download, at most this often.
const EVENT_EVERY: Duration = Duration::from_millis(250);
/// The rate is over this window.
const RATE_WINDOW: Duration = Duration::from_secs(3);
/// The register's file in the data dir.
const FILE: &str = "downloads.json";

/// What a download is, as kept on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    hash: String,
    /// The name it is saved under, once known (from the sources, else the
    /// link).
    name: Option<String>,
    /// The link's supernode hints.
    #[serde(default)]
    hints: Vec<String>,
    /// Where it is written, once chosen.
    path: Option<PathBuf>,
    /// The folder to write it into under the sources' name, when not the
    /// shared folder (`leaf get` without `--out`: its current folder).
    #[serde(default)]
    dir: Option<PathBuf>,
    state: State,
    error: Option<String>,
    size: Option<u64>,
    added_secs: u64,
    finished_secs: Option<u64>,
    /// Bytes that came over the network, over all runs.
    #[serde(default)]
    fetched: u64,
    /// Seconds from the start of the run that completed it to its first
    /// verified range from the network.
    #[serde(default)]
    first_byte_secs: Option<f64>,
    /// Every source the completing run connected to, and how.
    #[serde(default)]
    connections: Vec<Connection>,
}

/// A source a download connected to, and its route (`direct`,
/// `reversed`, `punched`, `relayed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    pub source: String,
    pub route: String,
}

/// Where the API asks a download to be written.
#[derive(Debug, Clone, Default)]
pub enum Place {
    /// The shared folder, under the sources' name.
    #[default]
    Share,
    /// This folder, under the sources' name.
    Dir(PathBuf),
    /// This file.
    File(PathBuf),
}

/// Routes of the sources delivering now.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Routes {
    pub direct: usize,
    pub reversed: usize,
    pub punched: usize,
    pub relayed: usize,
}

impl From<[usize; 4]> for Routes {
    /// From counts in the order of `push::Route::ALL` (`Progress::by_route`).
    fn from([direct, reversed, punched, relayed]: [usize; 4]) -> Self {
        Self {
            direct,
            reversed,
            punched,
            relayed,
        }
    }
}

impl From<Routes> for [usize; 4] {
    fn from(r: Routes) -> Self {
        [r.direct, r.reversed, r.punched, r.relayed]
    }
}

/// A download as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct View {
    pub hash: String,
    pub name: Option<String>,
    pub link: String,
    pub path: Option<PathBuf>,
    pub state: State,
    pub error: Option<String>,
    pub size: Option<u64>,
    pub verified: u64,
    pub rate: u64,
    pub eta_secs: Option<u64>,
    pub sources: usize,
    pub routes: Routes,
    pub added_secs: u64,
    pub finished_secs: Option<u64>,
    /// Bytes that came over the network, over all runs.
    pub fetched: u64,
    /// Seconds from the start of its last run to the first verified range
    /// from the network.
    pub first_byte_secs: Option<f64>,
    /// Once done: every source the last run connected to, and how.
    pub connections: Vec<Connection>,
}

/// What changed, for the event stream.
#[derive(Debug, Clone)]
pub enum Event {
    Changed(Box<View>),
    Removed(String),
}

/// Why the API's request was refused.
#[derive(Debug, thiserror::Error)]
pub enum DownloadsError {
    #[error("{0} is already in the list")]
    Exists(String),
    #[error("no download {0}")]
    NotFound(String),
    #[error("the list holds {MAX_DOWNLOADS} downloads: remove some first")]
    Full,
    #[error(transparent)]
    Refused(#[from] queue::Refused),
}

struct Entry {
    record: Record,
    progress: Progress,
    /// (when, verified) samples for the rate.
    samples: VecDeque<(Instant, u64)>,
    task: Option<JoinHandle<()>>,
    /// Bumped each time a task starts, so that a stopped task's last
    /// report is not taken for its successor's.
    run: u64,
}

/// Where the daemon's downloads come from and go.
#[derive(Clone)]
pub struct Context {
    pub data_dir: PathBuf,
    /// The folder files are written into.
    pub dir: PathBuf,
    /// The supernodes to ask now, best first (those attached, those given,
    /// the cache).
    pub supernodes: Arc<dyn Fn() -> Vec<String> + Send + Sync>,
    pub timings: Timings,
    pub max_active: usize,
}

impl Context {
    /// A client on the data dir's identity, with the daemon's timings,
    /// asking the supernodes of now and then `hints`.
    pub fn client(&self, hints: &[String]) -> Result<Client, ClientError> {
        let supernodes = crate::with_hints((self.supernodes)(), hints);
        let mut client = Client::new(&self.data_dir, supernodes)?;
        client.set_timings(self.timings.clone());
        Ok(client)
    }
}

/// The daemon's downloads.
pub struct Downloads {
    ctx: Context,
    list: Mutex<Vec<Entry>>,
    events: broadcast::Sender<Event>,
    /// Bytes fetched by every download of this run.
    downloaded: AtomicU64,
    /// Held from taking the list's snapshot to its rename into place, so
    /// that an older snapshot never lands after a newer one.
    saving: Mutex<()>,
    me: Weak<Downloads>,
}

impl Downloads {
    /// Loads the list of an earlier run and starts what should run.
    pub fn open(ctx: Context) -> Arc<Self> {
        let records = load(&ctx.data_dir);
        let list = records
            .into_iter()
            .map(|mut record| {
                record.state = queue::on_restart(record.state);
                Entry {
                    record,
                    progress: Progress::default(),
                    samples: VecDeque::new(),
                    task: None,
                    run: 0,
                }
            })
            .collect();
        let me = Arc::new_cyclic(|me| Self {
            ctx,
            list: Mutex::new(list),
            events: broadcast::channel(1024).0,
            downloaded: AtomicU64::new(0),
            saving: Mutex::new(()),
            me: me.clone(),
        });
        me.schedule();
        me
    }

    /// Where its downloads come from and go.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Bytes fetched by this run's downloads.
    pub fn downloaded_bytes(&self) -> u64 {
        self.downloaded.load(Ordering::Relaxed)
    }

    /// Downloads running now.
    pub fn active(&self) -> usize {
        let list = self.list.lock().expect("downloads");
        list.iter()
            .filter(|e| e.record.state == State::Running)
            .count()
    }

    pub fn list(&self) -> Vec<View> {
        let list = self.list.lock().expect("downloads");
        list.iter().map(view).collect()
    }

    pub fn get(&self, hash: &str) -> Option<View> {
        let list = self.list.lock().expect("downloads");
        list.iter().find(|e| e.record.hash == hash).map(view)
    }

    /// Adds `link`'s file to the list, queued, to be written at `place`.
    pub fn add(&self, link: &Link, place: Place) -> Result<View, DownloadsError> {
        let (dir, path) = match place {
            Place::Share => (None, None),
            Place::Dir(d) => (Some(d), None),
            Place::File(f) => (None, Some(f)),
        };
        let hash = link.hash.to_string();
        let added = {
            let mut list = self.list.lock().expect("downloads");
            if list.iter().any(|e| e.record.hash == hash) {
                return Err(DownloadsError::Exists(hash));
            }
            if list.len() >= MAX_DOWNLOADS {
                return Err(DownloadsError::Full);
            }
            list.push(Entry {
                record: Record {
                    hash: hash.clone(),
                    name: link.name.clone(),
                    hints: link.supernodes.clone(),
                    path,
                    dir,
                    state: State::Queued,
                    error: None,
                    size: link.size,
                    added_secs: crate::share::now_secs(),
                    finished_secs: None,
                    fetched: 0,
                    first_byte_secs: None,
                    connections: Vec::new(),
                },
                progress: Progress::default(),
                samples: VecDeque::new(),
                task: None,
                run: 0,
            });
            view(list.last().expect("just pushed"))
        };
        info!(%hash, "download added");
        self.changed(&hash);
        self.schedule();
        Ok(self.get(&hash).unwrap_or(added))
    }

    /// Pauses, resumes or cancels a download.
    pub fn command(&self, hash: &str, command: Command) -> Result<View, DownloadsError> {
        let (stopped, discard) = {
            let mut list = self.list.lock().expect("downloads");
            let entry = list
                .iter_mut()
                .find(|e| e.record.hash == hash)
                .ok_or_else(|| DownloadsError::NotFound(hash.to_string()))?;
            let (state, effect) = queue::apply(entry.record.state, command)?;
            entry.record.state = state;
            if command == Command::Resume && state == State::Queued {
                entry.record.error = None;
            }
            let stopped = match effect {
                Effect::None => None,
                Effect::Stop | Effect::StopAndDiscard => entry.task.take(),
            };
            entry.progress.sources = 0;
            entry.progress.by_route = [0; 4];
            entry.samples.clear();
            let discard = (effect == Effect::StopAndDiscard)
                .then(|| entry.record.path.clone())
                .flatten();
            if discard.is_some() {
                entry.progress.verified = 0;
            }
            (stopped, discard)
        };
        stop(stopped, discard);
        self.changed(hash);
        self.schedule();
        self.get(hash)
            .ok_or_else(|| DownloadsError::NotFound(hash.to_string()))
    }

    /// Takes a download off the list, deleting its partial data unless it
    /// is done.
    pub fn remove(&self, hash: &str) -> Result<(), DownloadsError> {
        let entry = {
            let mut list = self.list.lock().expect("downloads");
            let at = list
                .iter()
                .position(|e| e.record.hash == hash)
                .ok_or_else(|| DownloadsError::NotFound(hash.to_string()))?;
            list.remove(at)
        };
        let discard = entry
            .record
            .state
            .is_unfinished()
            .then_some(entry.record.path)
            .flatten();
        stop(entry.task, discard);
        self.save();
        let _ = self.events.send(Event::Removed(hash.to_string()));
        self.schedule();
        Ok(())
    }

    /// Stops every running download, keeping its verified ranges and its
    /// state: the next start resumes them.
    pub fn shutdown(&self) {
        let mut list = self.list.lock().expect("downloads");
        for e in list.iter_mut() {
            if let Some(t) = e.task.take() {
                t.abort();
            }
        }
    }

    /// Starts the downloads the queue's rule says to, and records the list.
    fn schedule(&self) {
        let Some(me) = self.me.upgrade() else { return };
        let started: Vec<String> = {
            let mut list = self.list.lock().expect("downloads");
            let states: Vec<State> = list.iter().map(|e| e.record.state).collect();
            queue::to_start(&states, self.ctx.max_active)
                .into_iter()
                .map(|i| {
                    let entry = &mut list[i];
                    entry.record.state = State::Running;
                    entry.record.error = None;
                    entry.run += 1;
                    let (hash, run) = (entry.record.hash.clone(), entry.run);
                    let task = tokio::spawn(me.clone().run(hash.clone(), run));
                    entry.task = Some(task);
                    hash
                })
                .collect()
        };
        for hash in &started {
            self.changed(hash);
        }
        self.save();
    }

    /// One run of a download: finds its sources and name, picks its path,
    /// and fetches it, reporting progress; then records how it ended.
    async fn run(self: Arc<Self>, hash: String, run: u64) {
        let result = self.fetch(&hash, run).await;
        let mut list = self.list.lock().expect("downloads");
        let Some(entry) = list
            .iter_mut()
            .find(|e| e.record.hash == hash && e.run == run && e.record.state == State::Running)
        else {
            return;
        };
        entry.task = None;
        entry.progress.sources = 0;
        entry.progress.by_route = [0; 4];
        entry.samples.clear();
        match result {
            Ok(done) => {
                let size = done.size;
                entry.record.state = State::Done;
                entry.record.size = Some(size);
                entry.record.first_byte_secs = done.first_byte.map(|d| d.as_secs_f64());
                entry.record.connections = done
                    .routes
                    .iter()
                    .map(|(id, route)| Connection {
                        source: id.to_string(),
                        route: route.name().to_string(),
                    })
                    .collect();
                entry.progress.verified = size;
                entry.record.finished_secs = Some(crate::share::now_secs());
                info!(%hash, "download done");
            }
            Err(e) => {
                warn!(%hash, error = %e, "download failed");
                entry.record.state = State::Failed;
                entry.record.error = Some(e);
            }
        }
        drop(list);
        self.changed(&hash);
        self.schedule();
    }

    async fn fetch(&self, hash: &str, run: u64) -> Result<Fetched, String> {
        let content: ContentHash = hash.parse().map_err(|_| "a bad hash".to_string())?;
        let started = Instant::now();
        let (hints, path, dir) = {
            let list = self.list.lock().expect("downloads");
            let e = list
                .iter()
                .find(|e| e.record.hash == hash)
                .ok_or("removed")?;
            (
                e.record.hints.clone(),
                e.record.path.clone(),
                e.record.dir.clone(),
            )
        };
        let client = self.ctx.client(&hints).map_err(|e| e.to_string())?;
        let path = match path {
            Some(p) => p,
            None => {
                let hit = client
                    .locate(content, LOCATE_TIMEOUT)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| ClientError::NotFound(content).to_string())?;
                let name = safe_file_name(hit.name()).unwrap_or_else(|| hash.to_string());
                let path = free_path(dir.as_deref().unwrap_or(&self.ctx.dir), &name);
                let mut list = self.list.lock().expect("downloads");
                if let Some(e) = list.iter_mut().find(|e| e.record.hash == hash) {
                    e.record.name = Some(name);
                    e.record.path = Some(path.clone());
                }
                drop(list);
                self.save();
                self.changed(hash);
                path
            }
        };
        let (tx, mut rx) = watch::channel(Progress::default());
        let download = client.download(content, Some(&path), LOCATE_TIMEOUT, Some(tx));
        tokio::pin!(download);
        let mut last_event = Instant::now() - EVENT_EVERY;
        let mut fetched = 0;
        let mut first_byte = None;
        loop {
            tokio::select! {
                done = &mut download => {
                    let p = *rx.borrow();
                    self.count_fetched(hash, run, p.fetched.saturating_sub(fetched));
                    let (_, done) = done.map_err(|e| e.to_string())?;
                    return Ok(Fetched { size: done.size, first_byte, routes: done.routes });
                }
                changed = rx.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let p = *rx.borrow_and_update();
                    self.count_fetched(hash, run, p.fetched.saturating_sub(fetched));
                    fetched = fetched.max(p.fetched);
                    if p.fetched > 0 && first_byte.is_none() {
                        first_byte = Some(started.elapsed());
                    }
                    self.progress(hash, run, p);
                    if last_event.elapsed() >= EVENT_EVERY {
                        last_event = Instant::now();
                        self.changed(hash);
                    }
                }
            }
        }
    }

    /// Counts `bytes` more fetched from the network by `hash`'s run `run`.
    fn count_fetched(&self, hash: &str, run: u64, bytes: u64) {
        self.downloaded.fetch_add(bytes, Ordering::Relaxed);
        let mut list = self.list.lock().expect("downloads");
        if let Some(e) = list
            .iter_mut()
            .find(|e| e.record.hash == hash && e.run == run)
        {
            e.record.fetched += bytes;
        }
    }

    fn progress(&self, hash: &str, run: u64, p: Progress) {
        let mut list = self.list.lock().expect("downloads");
        let Some(e) = list
            .iter_mut()
            .find(|e| e.record.hash == hash && e.run == run)
        else {
            return;
        };
        if p.size > 0 {
            e.record.size = Some(p.size);
        }
        e.progress = p;
        let now = Instant::now();
        e.samples.push_back((now, p.verified));
        while e
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            e.samples.pop_front();
        }
    }

    fn changed(&self, hash: &str) {
        if let Some(v) = self.get(hash) {
            let _ = self.events.send(Event::Changed(Box::new(v)));
        }
    }

    fn save(&self) {
        let _saving = self.saving.lock().expect("downloads save");
        let records: Vec<Record> = {
            let list = self.list.lock().expect("downloads");
            list.iter().map(|e| e.record.clone()).collect()
        };
        let json = serde_json::to_vec_pretty(&records).expect("records serialise");
        if let Err(e) = crate::replace_file(&self.ctx.data_dir.join(FILE), &json) {
            warn!(error = %e, "cannot record the downloads");
        }
    }
}

/// What a run that completed did.
struct Fetched {
    size: u64,
    first_byte: Option<Duration>,
    routes: Vec<(servent_proto::NodeId, crate::push::Route)>,
}

/// Stops a download's task, then deletes its partial data beside `discard`
/// once the task is gone (its last state save done).
fn stop(task: Option<JoinHandle<()>>, discard: Option<PathBuf>) {
    let Some(task) = task else {
        if let Some(path) = discard {
            partial::remove_beside(&path);
        }
        return;
    };
    task.abort();
    tokio::spawn(async move {
        let _ = task.await;
        if let Some(path) = discard {
            let _ = tokio::task::spawn_blocking(move || partial::remove_beside(&path)).await;
        }
    });
}

fn view(e: &Entry) -> View {
    let r = &e.record;
    let rate = match (e.samples.front(), e.samples.back()) {
        (Some((t0, v0)), Some((t1, v1))) if t1 > t0 => {
            ((v1 - v0) as f64 / t1.duration_since(*t0).as_secs_f64()) as u64
        }
        _ => 0,
    };
    let verified = match r.state {
        State::Done => r.size.unwrap_or(e.progress.verified),
        _ => e.progress.verified,
    };
    let eta_secs = match (r.state, r.size) {
        (State::Running, Some(size)) if rate > 0 => Some(size.saturating_sub(verified) / rate),
        _ => None,
    };
    let hash: ContentHash = r.hash.parse().unwrap_or(ContentHash([0; 32]));
    let link = Link {
        hash,
        name: r.name.clone(),
        size: r.size,
        supernodes: r.hints.clone(),
    };
    View {
        hash: r.hash.clone(),
        name: r.name.clone(),
        link: link.to_string(),
        path: r.path.clone(),
        state: r.state,
        error: r.error.clone(),
        size: r.size,
        verified,
        rate,
        eta_secs,
        sources: e.progress.sources,
        routes: Routes::from(e.progress.by_route),
        added_secs: r.added_secs,
        finished_secs: r.finished_secs,
        fetched: r.fetched,
        first_byte_secs: r.first_byte_secs,
        connections: r.connections.clone(),
    }
}

/// `dir/name`, or `dir/name (2)`, `(3)`, ... before the extension if a file
/// of that name is there already.
fn free_path(dir: &Path, name: &str) -> PathBuf {
    let first = dir.join(name);
    if !first.exists() {
        return first;
    }
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    (2..1000)
        .map(|n| dir.join(format!("{stem} ({n}){ext}")))
        .find(|p| !p.exists())
        .unwrap_or(first)
}

/// The list an earlier run recorded; empty if none or unreadable (said).
fn load(data_dir: &Path) -> Vec<Record> {
    let path = data_dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            warn!(error = %e, "cannot read {}", path.display());
            return Vec::new();
        }
    };
    match serde_json::from_slice::<Vec<Record>>(&bytes) {
        Ok(mut records) => {
            records.retain(|r| r.hash.parse::<ContentHash>().is_ok());
            records.truncate(MAX_DOWNLOADS);
            records
        }
        Err(e) => {
            warn!(error = %e, "{} is damaged; starting with no downloads", path.display());
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_taken_gets_a_number_before_its_extension() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(free_path(dir.path(), "a.flac"), dir.path().join("a.flac"));
        std::fs::write(dir.path().join("a.flac"), b"x").unwrap();
        assert_eq!(
            free_path(dir.path(), "a.flac"),
            dir.path().join("a (2).flac")
        );
        std::fs::write(dir.path().join("noext"), b"x").unwrap();
        assert_eq!(free_path(dir.path(), "noext"), dir.path().join("noext (2)"));
    }
}
