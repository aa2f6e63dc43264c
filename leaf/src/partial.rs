//! Downloads in progress, as files: what a download keeps beside its
//! target so that it can resume, and the register in the data dir through
//! which a running `leaf serve` shares what a download has verified so far
//! (in the same process or from a `leaf get` beside it).
//!
//! Beside a target `NAME`: `.NAME.servent-part` (the content, preallocated,
//! written at offsets), `.NAME.servent-layer` (the file's verified range
//! layer, see [`crate::layer`]) and `.NAME.servent-state` (which ranges of
//! the part are verified). In the data dir: `downloads/HASH.json`, naming
//! the target, for as long as the download runs or can be resumed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use servent_proto::ContentHash;
use tracing::debug;

use crate::layer::{self, Cv};
use crate::share::PART_SUFFIX;

/// Folder of the data dir that holds the register of downloads.
const REGISTER_DIR: &str = "downloads";
/// Downloads a leaf shares while they run; more are not announced.
pub const MAX_PARTIALS: usize = 64;
/// Largest state file read (a 64 TiB file's bitmap, in hex).
const MAX_STATE_BYTES: u64 = 1 << 20;

/// The partial file beside `target`: `.NAME.servent-part`.
pub fn part_path(target: &Path) -> PathBuf {
    hidden_beside(target, PART_SUFFIX)
}

/// Which ranges of the partial file are verified: `.NAME.servent-state`.
pub fn state_path(target: &Path) -> PathBuf {
    hidden_beside(target, ".servent-state")
}

/// The verified layer of the file being downloaded: `.NAME.servent-layer`.
pub fn layer_path(target: &Path) -> PathBuf {
    hidden_beside(target, ".servent-layer")
}

fn hidden_beside(target: &Path, suffix: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}{suffix}"))
}

/// What the state file holds. Written after the bytes of the ranges it
/// lists, so a range it lists is in the part file; a resumed download
/// checks them against the layer all the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedState {
    pub hash: String,
    pub size: u64,
    pub range_size: u64,
    /// One bit a range, range i at bit i % 8 of byte i / 8, as hex.
    pub verified: String,
}

/// A have-bitmap: one bit a range, range i at bit `i % 8` (least
/// significant first) of byte `i / 8`, as on the wire. The scheduler's
/// (it limits what a partial source is asked for).
pub use servent_proto::schedule::Bitmap;

/// Reads the state beside `target`: the verified ranges, if the state is
/// for this very content.
pub fn load_state(target: &Path, hash: &ContentHash, size: u64) -> Option<Bitmap> {
    let path = state_path(target);
    let meta = std::fs::metadata(&path).ok()?;
    if meta.len() > MAX_STATE_BYTES {
        return None;
    }
    let state: SavedState = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    if state.hash != hash.to_string() || state.size != size || state.range_size != layer::RANGE_SIZE
    {
        return None;
    }
    Bitmap::from_bytes(hex::decode(state.verified).ok()?, layer::range_count(size))
}

/// Writes the state beside `target` atomically.
pub fn save_state(
    target: &Path,
    hash: &ContentHash,
    size: u64,
    done: &Bitmap,
) -> std::io::Result<()> {
    let state = SavedState {
        hash: hash.to_string(),
        size,
        range_size: layer::RANGE_SIZE,
        verified: hex::encode(done.as_bytes()),
    };
    let bytes = serde_json::to_vec(&state).map_err(std::io::Error::other)?;
    crate::replace_file(&state_path(target), &bytes)
}

/// Removes the files a download keeps beside its target.
pub fn remove_beside(target: &Path) {
    for p in [part_path(target), state_path(target), layer_path(target)] {
        let _ = std::fs::remove_file(p);
    }
}

/// A download in the register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub hash: String,
    pub size: u64,
    /// The name to announce it under.
    pub name: String,
    /// Absolute path of the target; the part, state and layer are beside it.
    pub target: PathBuf,
}

fn entry_path(data_dir: &Path, hash: &ContentHash) -> PathBuf {
    data_dir.join(REGISTER_DIR).join(format!("{hash}.json"))
}

/// Puts a download in the register, for a running `serve` to share.
pub fn register(data_dir: &Path, entry: &Entry, hash: &ContentHash) -> std::io::Result<()> {
    let path = entry_path(data_dir, hash);
    std::fs::create_dir_all(path.parent().expect("in a folder"))?;
    let bytes = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
    crate::replace_file(&path, &bytes)
}

/// Takes a download out of the register (done, or given up).
pub fn unregister(data_dir: &Path, hash: &ContentHash) {
    let _ = std::fs::remove_file(entry_path(data_dir, hash));
}

/// A registered download that can be served: its layer checks out and its
/// part file is there. Which ranges it has is read at each request.
#[derive(Debug, Clone)]
pub struct Partial {
    pub hash: ContentHash,
    pub size: u64,
    pub name: String,
    pub target: PathBuf,
    pub layer: std::sync::Arc<Vec<Cv>>,
}

impl Partial {
    /// The verified ranges now.
    pub fn have(&self) -> Bitmap {
        load_state(&self.target, &self.hash, self.size)
            .unwrap_or_else(|| Bitmap::new(layer::range_count(self.size)))
    }
}

/// The downloads in the register that can be served, at most
/// [`MAX_PARTIALS`]; entries whose download is gone are removed.
/// `known` gives back a download already loaded for an entry, so that its
/// layer is not read and checked again at every look.
pub fn list(
    data_dir: &Path,
    known: impl Fn(&ContentHash, &Entry) -> Option<Partial>,
) -> Vec<Partial> {
    let Ok(dir) = std::fs::read_dir(data_dir.join(REGISTER_DIR)) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in dir.flatten().take(4 * MAX_PARTIALS) {
        let path = item.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        match read_entry(&path, &known) {
            Some(Ok(p)) if out.len() < MAX_PARTIALS => out.push(p),
            Some(Ok(_)) => {}
            Some(Err(why)) => {
                debug!(entry = %path.display(), why, "stale download entry removed");
                let _ = std::fs::remove_file(&path);
            }
            None => {}
        }
    }
    out
}

/// `None` for an entry not ready yet (no layer so far); an error for one
/// whose download is gone.
fn read_entry(
    path: &Path,
    known: &impl Fn(&ContentHash, &Entry) -> Option<Partial>,
) -> Option<Result<Partial, &'static str>> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.len() > 64 * 1024 {
        return Some(Err("oversized"));
    }
    let bytes = std::fs::read(path).ok()?;
    let Ok(entry) = serde_json::from_slice::<Entry>(&bytes) else {
        return Some(Err("unreadable"));
    };
    let Ok(hash) = entry.hash.parse::<ContentHash>() else {
        return Some(Err("bad hash"));
    };
    if path.file_stem().and_then(|s| s.to_str()) != Some(entry.hash.as_str()) {
        return Some(Err("misnamed"));
    }
    if !part_path(&entry.target).is_file() {
        return Some(Err("part file gone"));
    }
    if let Some(p) = known(&hash, &entry) {
        return Some(Ok(p));
    }
    let layer = layer::load(&layer_path(&entry.target), entry.size, &hash).ok()?;
    Some(Ok(Partial {
        hash,
        size: entry.size,
        name: entry.name,
        target: entry.target,
        layer: std::sync::Arc::new(layer),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_are_exact() {
        let mut b = Bitmap::new(11);
        b.set(0);
        b.set(10);
        b.set(11);
        b.set(3);
        b.clear(3);
        assert!(b.get(0) && b.get(10) && !b.get(1) && !b.get(3) && !b.get(11));
        assert_eq!(b.count(), 2);
        assert_eq!(b.as_bytes(), &[0x01, 0x04]);
        assert!(Bitmap::from_bytes(vec![0x01, 0x04], 11).is_some());
        // A bit past the end, or the wrong number of bytes.
        assert!(Bitmap::from_bytes(vec![0x01, 0x08], 11).is_none());
        assert!(Bitmap::from_bytes(vec![0x01], 11).is_none());
        assert!(Bitmap::from_bytes(vec![0xff], 8).is_some());
    }
}
