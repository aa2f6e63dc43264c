//! The file index of one supernode: which of its leaves share which content,
//! and which content has which words in its names.
//!
//! Compact, because a supernode holds millions of entries (a leaf sharing
//! a file): at 10 million it costs about the entry's own bytes and a
//! quarter more (docs/BENCHMARKS.md, "The index at 10 million files").
//! - A content hash is stored once, in its file's slot, and named elsewhere
//!   by a 4-byte file number; the table from hash to number holds numbers
//!   only (its keys are read from the slots).
//! - A leaf is named by a 4-byte owner number; its node id is kept once.
//! - Names live in one arena of bytes, an entry holding where its name is
//!   (compacted when half of it is names that went).
//! - A word is interned once; the files whose names hold it are a sorted
//!   list of numbers while few (4 bytes a file), a compressed bitmap
//!   (`roaring`) once many (a few bits to two bytes a file); no hash set
//!   per word.
//! - The mesh's keyword filter is set from the words and hashes as they
//!   come and rebuilt from them, when some went, at the next
//!   [`Index::filter`]: no count is kept beside them.
//!
//! One lock over the tables: searches take it shared and registrations
//! exclusively; a batch of 1 024 entries holds it for well under a
//! millisecond.
//!
//! Bounded three ways, each refused with [`IndexError`] (the session turns
//! it into `LimitExceeded`): files per leaf, entries in all, and entries per
//! IP address (or IPv6 /64), since node ids cost nothing to make. Not
//! persistent: it is rebuilt from the leaves' registrations, and a leaf's
//! entries go as soon as its session does.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use hashbrown::HashTable;
use roaring::RoaringBitmap;
use servent_proto::admit::AddressKey;
use servent_proto::cost::MAX_EXAMINED;
use servent_proto::filter::{filter_log2_for, Filter, WordKey};
use servent_proto::keywords::words;
use servent_proto::msg::{FileEntry, NameVariant};
use servent_proto::{ContentHash, NodeId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("a leaf may share at most {max} files here")]
    TooManyFiles { max: usize },
    #[error("this supernode's index is full ({max} entries): try another supernode")]
    Full { max: usize },
    #[error("leaves at this IP address may share at most {max} files here")]
    TooManyFromAddress { max: usize },
}

/// The caps of an [`Index`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexLimits {
    /// Files one leaf may have indexed.
    pub files_per_leaf: usize,
    /// Entries (a leaf sharing a file) in all.
    pub entries: usize,
    /// Entries of all the leaves at one IP address or IPv6 /64.
    pub entries_per_ip: usize,
    /// Addresses the per-address cap does not apply to.
    pub exempt: Vec<IpAddr>,
}

impl IndexLimits {
    /// No cap but `files_per_leaf` (for tests).
    pub fn per_leaf(files_per_leaf: usize) -> Self {
        Self {
            files_per_leaf,
            entries: usize::MAX,
            entries_per_ip: usize::MAX,
            exempt: Vec::new(),
        }
    }
}

/// One content hash, who shares it, and the name and size each announced
/// (no owner's announcement stands for the others': see
/// `servent_proto::hits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub hash: ContentHash,
    /// Sorted by node id.
    pub owners: Vec<(NodeId, NameVariant)>,
}

impl Found {
    pub fn owner_ids(&self) -> Vec<NodeId> {
        self.owners.iter().map(|(id, _)| *id).collect()
    }
}

/// What a keyword search found, and the work it took.
#[derive(Debug, Default)]
pub struct Searched {
    pub found: Vec<Found>,
    /// Candidates examined (at most [`MAX_EXAMINED`]).
    pub examined: usize,
}

/// A file's number: its slot in [`Inner::files`].
type FileNo = u32;
/// A leaf's number: its slot in [`Inner::owners`].
type OwnerNo = u32;

/// Marks a free slot.
const FREE: u32 = u32::MAX;

/// Where a name is in [`Names`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NameRef {
    at: u32,
    len: u32,
}

/// One leaf's announcement of a file: 20 bytes.
#[derive(Debug, Clone, Copy)]
struct Entry {
    owner: OwnerNo,
    name: NameRef,
    /// The size announced, in two halves (so the entry needs no 8-byte
    /// alignment).
    size: [u32; 2],
}

impl Entry {
    fn size(&self) -> u64 {
        u64::from(self.size[0]) | u64::from(self.size[1]) << 32
    }

    fn split(size: u64) -> [u32; 2] {
        [size as u32, (size >> 32) as u32]
    }
}

/// A slot of [`Inner::files`]: its hash and first owner's entry; free
/// while `first.owner` is [`FREE`]. The other owners' entries, if any,
/// are in [`Inner::more`].
struct FileSlot {
    hash: ContentHash,
    first: Entry,
}

struct OwnerSlot {
    id: NodeId,
    address: AddressKey,
    /// The files it shares here, in no order.
    files: Vec<FileNo>,
}

/// Every name announced, end to end. A name that goes leaves garbage,
/// collected by [`Inner::compact_names`] once it is half the arena.
#[derive(Default)]
struct Names {
    bytes: Vec<u8>,
    garbage: usize,
}

impl Names {
    fn push(&mut self, name: &str) -> Option<NameRef> {
        let at = u32::try_from(self.bytes.len()).ok()?;
        let len = u32::try_from(name.len()).ok()?;
        at.checked_add(len)?;
        self.bytes.extend_from_slice(name.as_bytes());
        Some(NameRef { at, len })
    }

    fn get(&self, r: NameRef) -> &str {
        let (at, len) = (r.at as usize, r.len as usize);
        // Only whole `&str`s are pushed, and refs are only made by `push`.
        self.bytes
            .get(at..at + len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .unwrap_or_default()
    }
}

/// The files whose names hold one word, in ascending order.
enum Posting {
    One(FileNo),
    /// Sorted, at most [`FEW`].
    Few(Vec<FileNo>),
    Many(RoaringBitmap),
}

/// Files a word lists before it becomes a bitmap. A bitmap costs 2 bytes a
/// file and some 40 a run of 65 536 file numbers the word has any file in,
/// so below a few thousand files spread over millions of numbers a list of
/// 4-byte numbers is smaller; inserting into one of 4 096 moves 16 KiB.
const FEW: usize = 4096;

impl Posting {
    fn len(&self) -> u64 {
        match self {
            Posting::One(_) => 1,
            Posting::Few(v) => v.len() as u64,
            Posting::Many(m) => m.len(),
        }
    }

    fn contains(&self, file: FileNo) -> bool {
        match self {
            Posting::One(f) => *f == file,
            Posting::Few(v) => v.binary_search(&file).is_ok(),
            Posting::Many(m) => m.contains(file),
        }
    }

    fn insert(&mut self, file: FileNo) {
        match self {
            Posting::One(f) if *f == file => {}
            Posting::One(f) => {
                let mut v = Vec::with_capacity(2);
                v.extend([(*f).min(file), (*f).max(file)]);
                *self = Posting::Few(v);
            }
            Posting::Few(v) => match v.binary_search(&file) {
                Ok(_) => {}
                Err(i) if v.len() < FEW => {
                    // Grow by an eighth, not twice: these lists are most
                    // of the index, and most are never full.
                    if v.len() == v.capacity() {
                        v.reserve_exact(v.len() / 8 + 1);
                    }
                    v.insert(i, file);
                }
                Err(_) => {
                    let mut m = RoaringBitmap::from_sorted_iter(v.iter().copied())
                        .unwrap_or_else(|_| v.iter().copied().collect());
                    m.insert(file);
                    *self = Posting::Many(m);
                }
            },
            Posting::Many(m) => {
                m.insert(file);
            }
        }
    }

    /// Takes `file` off; true when the posting is empty afterwards.
    fn remove(&mut self, file: FileNo) -> bool {
        match self {
            Posting::One(f) => *f == file,
            Posting::Few(v) => {
                if let Ok(i) = v.binary_search(&file) {
                    v.remove(i);
                }
                match v[..] {
                    [] => return true,
                    [one] => *self = Posting::One(one),
                    _ if v.len() * 4 < v.capacity() => v.shrink_to(v.len() * 2),
                    _ => {}
                }
                false
            }
            Posting::Many(m) => {
                m.remove(file);
                if m.len() < FEW as u64 / 2 {
                    *self = Posting::Few(m.iter().collect());
                }
                false
            }
        }
    }

    fn files(&self) -> Box<dyn Iterator<Item = FileNo> + '_> {
        match self {
            Posting::One(f) => Box::new(std::iter::once(*f)),
            Posting::Few(v) => Box::new(v.iter().copied()),
            Posting::Many(m) => Box::new(m.iter()),
        }
    }
}

/// An interned word: its filter key and the files that hold it.
struct Word {
    key: WordKey,
    posting: Posting,
}

#[derive(Default)]
struct Inner {
    /// Hashes `numbers`' keys (random per index: hashes are chosen by the
    /// leaves, and must not choose collisions).
    hasher: std::hash::RandomState,
    /// hash → file number; the hash itself is read from the slot.
    numbers: HashTable<FileNo>,
    files: Vec<FileSlot>,
    free: Vec<FileNo>,
    /// The second and later owners' entries of a file.
    more: HashMap<FileNo, Vec<Entry>>,
    names: Names,
    owner_numbers: HashMap<NodeId, OwnerNo>,
    owners: Vec<OwnerSlot>,
    free_owners: Vec<OwnerNo>,
    words: HashMap<Box<str>, Word>,
    entries: usize,
    by_address: HashMap<AddressKey, usize>,
    /// The keyword filter of every word and file hash here, for the mesh
    /// neighbours (`servent_proto::filter`); `None` until first asked.
    filter: Option<Filter>,
    /// A word or hash went since `filter` was built: it may hold bits
    /// that nothing here sets.
    filter_stale: bool,
    /// How often the words or hashes changed.
    filter_changes: u64,
    /// The filter as [`Index::filter`] last gave it, at that change count.
    filter_snapshot: Option<(u64, Arc<Filter>)>,
}

pub struct Index {
    limits: IndexLimits,
    exempt: Vec<AddressKey>,
    inner: RwLock<Inner>,
}

impl Default for Index {
    fn default() -> Self {
        Self::new(IndexLimits::per_leaf(
            servent_proto::limits::DEFAULT_MAX_FILES_PER_LEAF,
        ))
    }
}

impl Index {
    pub fn new(limits: IndexLimits) -> Self {
        Self {
            exempt: limits.exempt.iter().map(|ip| AddressKey::of(*ip)).collect(),
            limits,
            inner: RwLock::new(Inner::default()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds or renames the entries of `owner`, a leaf at `ip`; returns how
    /// many it now has. A batch that would go over a cap is refused whole,
    /// nothing of it added.
    pub fn add(
        &self,
        owner: NodeId,
        ip: IpAddr,
        entries: &[FileEntry],
    ) -> Result<usize, IndexError> {
        let mut ix = self.write();
        let ix = &mut *ix;
        let known = ix.owner_numbers.get(&owner).copied();
        let address = match known {
            Some(o) => ix.owners[o as usize].address,
            None => AddressKey::of(ip),
        };
        let mut batch = HashSet::new();
        let new = entries
            .iter()
            .filter(|e| batch.insert(e.hash))
            .filter(|e| {
                let file = ix.number(&e.hash);
                file.is_none_or(|f| known.is_none_or(|o| ix.entry_of(f, o).is_none()))
            })
            .count();
        let have = known.map_or(0, |o| ix.owners[o as usize].files.len());
        if have + new > self.limits.files_per_leaf {
            return Err(IndexError::TooManyFiles {
                max: self.limits.files_per_leaf,
            });
        }
        if ix.entries + new > self.limits.entries {
            return Err(IndexError::Full {
                max: self.limits.entries,
            });
        }
        let from_here = ix.by_address.get(&address).copied().unwrap_or(0);
        if !self.exempt.contains(&address) && from_here + new > self.limits.entries_per_ip {
            return Err(IndexError::TooManyFromAddress {
                max: self.limits.entries_per_ip,
            });
        }
        let bytes: usize = entries.iter().map(|e| e.name.len()).sum();
        if ix.names.bytes.len() - ix.names.garbage + bytes > u32::MAX as usize {
            // Names beyond 4 GiB cannot be numbered.
            return Err(IndexError::Full {
                max: ix.entries + new,
            });
        }
        if ix.names.bytes.len() + bytes > u32::MAX as usize {
            ix.compact_names();
        }
        let o = match known {
            Some(o) => o,
            None => ix.new_owner(owner, address),
        };
        // Exactly what this batch may add: one list a leaf, most of them
        // registered in one or a few batches.
        ix.owners[o as usize].files.reserve_exact(new);
        for e in entries {
            ix.link(o, e);
        }
        // Renames leave the old names behind.
        ix.collect_names();
        Ok(ix.owners[o as usize].files.len())
    }

    /// Removes some of `owner`'s entries; returns how many it still has.
    pub fn remove(&self, owner: NodeId, hashes: &[ContentHash]) -> usize {
        let mut ix = self.write();
        let Some(&o) = ix.owner_numbers.get(&owner) else {
            return 0;
        };
        let mut gone = HashSet::new();
        for h in hashes {
            if let Some(file) = ix.number(h) {
                if ix.unlink(o, file) {
                    gone.insert(file);
                }
            }
        }
        let files = &mut ix.owners[o as usize].files;
        files.retain(|f| !gone.contains(f));
        let left = files.len();
        if left == 0 {
            ix.drop_owner(o);
        }
        ix.shrink();
        left
    }

    /// Drops everything `owner` shares.
    pub fn remove_owner(&self, owner: NodeId) {
        let mut ix = self.write();
        let Some(&o) = ix.owner_numbers.get(&owner) else {
            return;
        };
        for file in std::mem::take(&mut ix.owners[o as usize].files) {
            ix.unlink(o, file);
        }
        ix.drop_owner(o);
        ix.shrink();
    }

    /// Files whose names (any owner's) hold every word of `query`, at most
    /// `max`, examining at most [`MAX_EXAMINED`] candidates; with how many
    /// it examined (what the query is charged for, see
    /// `servent_proto::cost`).
    pub fn search(&self, query: &[String], max: usize) -> Searched {
        let mut out = Searched::default();
        if query.is_empty() || max == 0 {
            return out;
        }
        let ix = self.read();
        let mut postings = Vec::with_capacity(query.len());
        for w in query {
            match ix.words.get(w.as_str()) {
                Some(word) => postings.push(&word.posting),
                None => return out,
            }
        }
        // Start from the rarest word: the candidate list is the shortest.
        postings.sort_by_key(|p| p.len());
        for file in postings[0].files().take(MAX_EXAMINED) {
            out.examined += 1;
            if postings[1..].iter().all(|p| p.contains(file)) {
                out.found.push(ix.found(file));
                if out.found.len() >= max {
                    break;
                }
            }
        }
        out
    }

    /// Every owner of exactly this content, with what each announced.
    pub fn get(&self, hash: &ContentHash) -> Option<Found> {
        let ix = self.read();
        let file = ix.number(hash)?;
        Some(ix.found(file))
    }

    /// The keyword filter of every word and file hash indexed now, as the
    /// mesh neighbours are to have it: rebuilt only when the index changed
    /// since the last call.
    pub fn filter(&self) -> Arc<Filter> {
        {
            let ix = self.read();
            if let Some((at, f)) = &ix.filter_snapshot {
                if *at == ix.filter_changes {
                    return f.clone();
                }
            }
        }
        let mut ix = self.write();
        let at = ix.filter_changes;
        let f = Arc::new(ix.current_filter().clone());
        ix.filter_snapshot = Some((at, f.clone()));
        f
    }

    /// Distinct content hashes indexed.
    pub fn file_count(&self) -> usize {
        self.read().numbers.len()
    }

    /// Entries (a leaf sharing a file) indexed.
    pub fn entry_count(&self) -> usize {
        self.read().entries
    }

    /// Entries `owner` has here.
    pub fn owner_file_count(&self, owner: &NodeId) -> usize {
        let ix = self.read();
        ix.owner_numbers
            .get(owner)
            .map_or(0, |&o| ix.owners[o as usize].files.len())
    }
}

impl Inner {
    fn hash_of(&self, hash: &ContentHash) -> u64 {
        self.hasher.hash_one(hash.0)
    }

    fn number(&self, hash: &ContentHash) -> Option<FileNo> {
        let files = &self.files;
        self.numbers
            .find(self.hash_of(hash), |&f| files[f as usize].hash == *hash)
            .copied()
    }

    /// `owner`'s entry of `file`, if it has one.
    fn entry_of(&self, file: FileNo, owner: OwnerNo) -> Option<&Entry> {
        let slot = &self.files[file as usize];
        if slot.first.owner == owner {
            return Some(&slot.first);
        }
        self.more.get(&file)?.iter().find(|e| e.owner == owner)
    }

    /// Every entry of `file`.
    fn entries_of(&self, file: FileNo) -> impl Iterator<Item = &Entry> {
        let slot = &self.files[file as usize];
        let first = (slot.first.owner != FREE).then_some(&slot.first);
        first
            .into_iter()
            .chain(self.more.get(&file).into_iter().flatten())
    }

    fn new_owner(&mut self, id: NodeId, address: AddressKey) -> OwnerNo {
        let slot = OwnerSlot {
            id,
            address,
            files: Vec::new(),
        };
        let o = match self.free_owners.pop() {
            Some(o) => {
                self.owners[o as usize] = slot;
                o
            }
            None => {
                self.owners.push(slot);
                (self.owners.len() - 1) as OwnerNo
            }
        };
        self.owner_numbers.insert(id, o);
        o
    }

    fn drop_owner(&mut self, o: OwnerNo) {
        let slot = &mut self.owners[o as usize];
        self.owner_numbers.remove(&slot.id);
        slot.files = Vec::new();
        self.free_owners.push(o);
    }

    /// A slot for a file of this hash, new; its number.
    fn new_file(&mut self, hash: ContentHash) -> FileNo {
        let slot = FileSlot {
            hash,
            first: Entry {
                owner: FREE,
                name: NameRef { at: 0, len: 0 },
                size: [0, 0],
            },
        };
        let f = match self.free.pop() {
            Some(f) => {
                self.files[f as usize] = slot;
                f
            }
            None => {
                self.files.push(slot);
                (self.files.len() - 1) as FileNo
            }
        };
        let h = self.hash_of(&hash);
        let (hasher, files) = (&self.hasher, &self.files);
        self.numbers
            .insert_unique(h, f, |&n| hasher.hash_one(files[n as usize].hash.0));
        self.filter_add(WordKey::of_hash(&hash));
        f
    }

    /// Records that owner `o` shares `e`, replacing what it said of the
    /// same hash before.
    fn link(&mut self, o: OwnerNo, e: &FileEntry) {
        let file = match self.number(&e.hash) {
            Some(f) => f,
            None => self.new_file(e.hash),
        };
        let unchanged = self
            .entry_of(file, o)
            .map(|old| self.names.get(old.name) == e.name && old.size() == e.size);
        match unchanged {
            Some(true) => {}
            Some(false) => {
                self.unlink(o, file);
                // A slot freed just now is the next one given: the file
                // keeps its number, and the owner's list stays as it is.
                let again = match self.number(&e.hash) {
                    Some(f) => f,
                    None => self.new_file(e.hash),
                };
                debug_assert_eq!(again, file);
                self.insert_entry(o, again, e, false);
            }
            None => self.insert_entry(o, file, e, true),
        }
    }

    /// Adds owner `o`'s entry `e` to `file`, and `file` to the owner's list
    /// if `new_to_owner`.
    fn insert_entry(&mut self, o: OwnerNo, file: FileNo, e: &FileEntry, new_to_owner: bool) {
        let Some(name) = self.names.push(&e.name) else {
            // `add` made room; a name beyond it is not indexed.
            return;
        };
        let entry = Entry {
            owner: o,
            name,
            size: Entry::split(e.size),
        };
        let slot = &mut self.files[file as usize];
        if slot.first.owner == FREE {
            slot.first = entry;
        } else {
            self.more.entry(file).or_default().push(entry);
        }
        let rec = &mut self.owners[o as usize];
        if new_to_owner {
            rec.files.push(file);
        }
        let address = rec.address;
        self.entries += 1;
        *self.by_address.entry(address).or_insert(0) += 1;
        for w in words(&e.name) {
            match self.words.get_mut(w.as_str()) {
                Some(word) => word.posting.insert(file),
                None => {
                    let key = WordKey::of(&w);
                    self.filter_add(key);
                    let posting = Posting::One(file);
                    self.words.insert(w.into_boxed_str(), Word { key, posting });
                }
            }
        }
    }

    /// Removes owner `o`'s entry from `file` and, where no other owner's
    /// name holds them, its words; frees the file's slot when it was the
    /// last owner. The owner's own list of files is the caller's to
    /// mend. Whether there was such an entry.
    fn unlink(&mut self, o: OwnerNo, file: FileNo) -> bool {
        let slot = &mut self.files[file as usize];
        let gone = if slot.first.owner == o {
            let gone = slot.first;
            match self.more.get_mut(&file) {
                Some(more) => {
                    slot.first = more.swap_remove(0);
                    if more.is_empty() {
                        self.more.remove(&file);
                    }
                }
                None => slot.first.owner = FREE,
            }
            gone
        } else {
            let Some(more) = self.more.get_mut(&file) else {
                return false;
            };
            let Some(i) = more.iter().position(|e| e.owner == o) else {
                return false;
            };
            let gone = more.swap_remove(i);
            if more.is_empty() {
                self.more.remove(&file);
            }
            gone
        };
        self.entries -= 1;
        let address = self.owners[o as usize].address;
        if let Some(n) = self.by_address.get_mut(&address) {
            *n -= 1;
            if *n == 0 {
                self.by_address.remove(&address);
            }
        }
        let name = self.names.get(gone.name).to_string();
        self.names.garbage += gone.name.len as usize;
        // The words no other owner's name of this file holds.
        let mut left: Vec<String> = words(&name);
        if self
            .entries_of(file)
            .any(|e| self.names.get(e.name) == name)
        {
            left.clear();
        } else {
            for e in self.entries_of(file) {
                let theirs = words(self.names.get(e.name));
                left.retain(|w| !theirs.contains(w));
                if left.is_empty() {
                    break;
                }
            }
        }
        for w in left {
            if let Some(word) = self.words.get_mut(w.as_str()) {
                if word.posting.remove(file) {
                    self.words.remove(w.as_str());
                    self.filter_went();
                }
            }
        }
        if self.files[file as usize].first.owner == FREE {
            let hash = self.files[file as usize].hash;
            let h = self.hash_of(&hash);
            if let Ok(e) = self.numbers.find_entry(h, |&f| f == file) {
                e.remove();
            }
            self.free.push(file);
            self.filter_went();
        }
        true
    }

    fn found(&self, file: FileNo) -> Found {
        let mut owners: Vec<(NodeId, NameVariant)> = self
            .entries_of(file)
            .map(|e| {
                let v = NameVariant {
                    name: self.names.get(e.name).to_string(),
                    size: e.size(),
                };
                (self.owners[e.owner as usize].id, v)
            })
            .collect();
        owners.sort_by_key(|(id, _)| *id);
        Found {
            hash: self.files[file as usize].hash,
            owners,
        }
    }

    /// Keys in the filter: every word and every file hash.
    fn filter_keys(&self) -> usize {
        self.words.len() + self.numbers.len()
    }

    /// A word or hash came: its bits are set at once, unless the filter
    /// is to grow (then it is rebuilt when next asked for).
    fn filter_add(&mut self, key: WordKey) {
        self.filter_changes += 1;
        let want = filter_log2_for(self.filter_keys() + 1);
        match &mut self.filter {
            Some(f) if f.log2() >= want => f.insert(key),
            _ => self.filter_stale = true,
        }
    }

    /// A word or hash went: the filter is rebuilt when next asked for.
    fn filter_went(&mut self) {
        self.filter_changes += 1;
        self.filter_stale = true;
    }

    /// The filter as it stands, rebuilt first if something went or it no
    /// longer suits the number of keys (too full, or four times too big).
    fn current_filter(&mut self) -> &Filter {
        let want = filter_log2_for(self.filter_keys());
        let fits = self
            .filter
            .as_ref()
            .is_some_and(|f| want <= f.log2() && want + 2 > f.log2());
        if self.filter_stale || !fits {
            let mut f = Filter::empty(want);
            for word in self.words.values() {
                f.insert(word.key);
            }
            for &file in self.numbers.iter() {
                f.insert(WordKey::of_hash(&self.files[file as usize].hash));
            }
            self.filter = Some(f);
            self.filter_stale = false;
        }
        self.filter.get_or_insert_with(|| Filter::empty(want))
    }

    /// Compacts the names once those that went are more than half of them
    /// (and more than 1 MiB).
    fn collect_names(&mut self) {
        if self.names.garbage > (1 << 20) && self.names.garbage * 2 > self.names.bytes.len() {
            self.compact_names();
        }
    }

    /// Writes the names still used into a new arena, end to end.
    fn compact_names(&mut self) {
        let mut names = Names {
            bytes: Vec::with_capacity(self.names.bytes.len() - self.names.garbage),
            garbage: 0,
        };
        let old = std::mem::take(&mut self.names);
        let mut moved = |e: &mut Entry| {
            if e.owner != FREE {
                if let Some(r) = names.push(old.get(e.name)) {
                    e.name = r;
                }
            }
        };
        for slot in &mut self.files {
            moved(&mut slot.first);
        }
        for more in self.more.values_mut() {
            more.iter_mut().for_each(&mut moved);
        }
        self.names = names;
    }

    /// Gives memory back once the tables are mostly empty (an index that
    /// was flooded and purged must not keep its peak).
    fn shrink(&mut self) {
        fn shrink_map<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) {
            if m.len() * 4 < m.capacity() {
                m.shrink_to(m.len() * 2);
            }
        }
        shrink_map(&mut self.owner_numbers);
        shrink_map(&mut self.words);
        shrink_map(&mut self.by_address);
        shrink_map(&mut self.more);
        if self.numbers.len() * 4 < self.numbers.capacity() {
            let (hasher, files) = (&self.hasher, &self.files);
            self.numbers.shrink_to(self.numbers.len() * 2, |&n| {
                hasher.hash_one(files[n as usize].hash.0)
            });
        }
        self.collect_names();
        if self.filter_keys() == 0 {
            // Nothing is left to say: the last snapshot need not be kept.
            self.filter_snapshot = None;
        }
        // Free slots at the end can go (and out of the free lists).
        let before = self.files.len();
        while self.files.last().is_some_and(|s| s.first.owner == FREE) {
            self.files.pop();
        }
        if self.files.len() < before {
            let len = self.files.len() as FileNo;
            self.free.retain(|f| *f < len);
        }
        if self.files.len() * 4 < self.files.capacity() {
            self.files.shrink_to(self.files.len() * 2);
        }
        let before = self.owners.len();
        while !self.owners.is_empty()
            && self
                .owner_numbers
                .get(&self.owners[self.owners.len() - 1].id)
                .is_none_or(|&o| o as usize != self.owners.len() - 1)
        {
            self.owners.pop();
        }
        if self.owners.len() < before {
            let len = self.owners.len() as OwnerNo;
            self.free_owners.retain(|o| *o < len);
        }
        if self.owners.len() * 4 < self.owners.capacity() {
            self.owners.shrink_to(self.owners.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8, name: &str) -> FileEntry {
        FileEntry {
            hash: ContentHash([n; 32]),
            name: name.into(),
            size: n as u64,
        }
    }

    fn id(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn ip() -> IpAddr {
        "192.0.2.1".parse().unwrap()
    }

    #[test]
    fn keyword_search_needs_every_word() {
        let ix = Index::new(IndexLimits::per_leaf(10));
        ix.add(
            id(1),
            ip(),
            &[entry(1, "Blue Moon.mp3"), entry(2, "blue sky.ogg")],
        )
        .unwrap();
        let q = |s: &str| words(s);
        assert_eq!(ix.search(&q("blue"), 10).found.len(), 2);
        let hits = ix.search(&q("MOON blue"), 10).found;
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].owners[0].1.name, "Blue Moon.mp3");
        assert!(ix.search(&q("moon sky"), 10).found.is_empty());
        assert!(ix.search(&q("nothing"), 10).found.is_empty());
        assert_eq!(ix.search(&q("blue"), 1).found.len(), 1);
    }

    #[test]
    fn same_content_from_two_owners_is_one_file_with_two_sources() {
        let ix = Index::new(IndexLimits::per_leaf(10));
        ix.add(id(1), ip(), &[entry(7, "a.bin")]).unwrap();
        ix.add(id(2), ip(), &[entry(7, "b.bin")]).unwrap();
        assert_eq!(ix.file_count(), 1);
        assert_eq!(
            ix.get(&ContentHash([7; 32])).unwrap().owner_ids(),
            vec![id(1), id(2)]
        );
        // Either name finds it.
        assert_eq!(ix.search(&words("b"), 10).found.len(), 1);
        ix.remove_owner(id(1));
        let found = ix.get(&ContentHash([7; 32])).unwrap();
        assert_eq!(found.owner_ids(), vec![id(2)]);
        // Each owner's own name is kept.
        assert_eq!(found.owners[0].1.name, "b.bin");
        assert!(ix.search(&words("a"), 10).found.is_empty());
        ix.remove(id(2), &[ContentHash([7; 32])]);
        assert_eq!(ix.file_count(), 0);
        assert!(ix.read().words.is_empty(), "no word entries leak");
        assert_eq!(ix.entry_count(), 0);
    }

    #[test]
    fn renaming_replaces_the_old_words() {
        let ix = Index::new(IndexLimits::per_leaf(10));
        ix.add(id(1), ip(), &[entry(1, "old name")]).unwrap();
        ix.add(id(1), ip(), &[entry(1, "new title")]).unwrap();
        assert!(ix.search(&words("old"), 10).found.is_empty());
        assert_eq!(ix.search(&words("title"), 10).found.len(), 1);
        assert_eq!(ix.owner_file_count(&id(1)), 1);
    }

    #[test]
    fn per_owner_cap_refuses_the_whole_batch() {
        let ix = Index::new(IndexLimits::per_leaf(2));
        ix.add(id(1), ip(), &[entry(1, "a"), entry(2, "b")])
            .unwrap();
        let err = ix.add(id(1), ip(), &[entry(3, "c")]).unwrap_err();
        assert_eq!(err, IndexError::TooManyFiles { max: 2 });
        assert_eq!(ix.owner_file_count(&id(1)), 2);
        // Re-announcing what it already has is not growth.
        ix.add(id(1), ip(), &[entry(1, "a")]).unwrap();
    }

    #[test]
    fn concurrent_owners_do_not_deadlock_or_lose_entries() {
        let ix = std::sync::Arc::new(Index::new(IndexLimits::per_leaf(100)));
        let threads: Vec<_> = (0..8u8)
            .map(|t| {
                let ix = ix.clone();
                std::thread::spawn(move || {
                    for round in 0..200u32 {
                        let entries: Vec<FileEntry> = (0..5u8)
                            .map(|i| FileEntry {
                                hash: ContentHash([i; 32]),
                                name: format!("shared file {i} {round}"),
                                size: 1,
                            })
                            .collect();
                        ix.add(id(t), ip(), &entries).unwrap();
                        let _ = ix.search(&words("shared file"), 50);
                        if round % 3 == 0 {
                            ix.remove_owner(id(t));
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for t in 0..8u8 {
            ix.remove_owner(id(t));
        }
        assert_eq!(ix.file_count(), 0);
        assert!(ix.read().words.is_empty());
    }

    #[test]
    fn the_index_and_each_address_have_a_cap() {
        let ix = Index::new(IndexLimits {
            files_per_leaf: 100,
            entries: 6,
            entries_per_ip: 4,
            exempt: vec!["127.0.0.1".parse().unwrap()],
        });
        let batch = |from: u8, n: u8| -> Vec<FileEntry> {
            (0..n).map(|i| entry(from * 16 + i, "x")).collect()
        };
        // Fresh ids at one address share its cap.
        ix.add(id(1), ip(), &batch(1, 3)).unwrap();
        assert_eq!(
            ix.add(id(2), ip(), &batch(2, 2)),
            Err(IndexError::TooManyFromAddress { max: 4 })
        );
        ix.add(id(2), ip(), &batch(2, 1)).unwrap();
        // An exempt address has only the overall cap.
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        ix.add(id(3), local, &batch(3, 2)).unwrap();
        assert_eq!(
            ix.add(id(4), local, &batch(4, 1)),
            Err(IndexError::Full { max: 6 })
        );
        // Leaving gives the room back.
        ix.remove_owner(id(1));
        ix.add(id(4), local, &batch(4, 3)).unwrap();
        assert_eq!(ix.entry_count(), 6);
    }

    #[test]
    fn a_purged_index_gives_its_tables_back() {
        let ix = Index::new(IndexLimits::per_leaf(100_000));
        let entries: Vec<FileEntry> = (0..20_000u32)
            .map(|i| {
                let mut h = [0u8; 32];
                h[..4].copy_from_slice(&i.to_le_bytes());
                FileEntry {
                    hash: ContentHash(h),
                    name: format!("track {i} common.mp3"),
                    size: 1,
                }
            })
            .collect();
        for chunk in entries.chunks(1000) {
            ix.add(id(1), ip(), chunk).unwrap();
        }
        assert_eq!(ix.search(&words("common"), 10).examined, 10);
        assert_eq!(
            ix.search(&words("common nothing"), 10).examined,
            0,
            "a word no name holds ends the search at once"
        );
        assert_eq!(ix.search(&words("common mp3"), 500).found.len(), 500);
        assert_eq!(ix.search(&words("common track"), 1).examined, 1);
        ix.remove_owner(id(1));
        let inner = ix.read();
        assert!(
            inner.numbers.capacity() < 1000,
            "{}",
            inner.numbers.capacity()
        );
        assert!(inner.words.capacity() < 1000, "{}", inner.words.capacity());
        assert!(inner.files.is_empty() && inner.free.is_empty());
    }

    #[test]
    fn a_search_examines_at_most_its_cap() {
        let ix = Index::new(IndexLimits::per_leaf(100_000));
        let entries: Vec<FileEntry> = (0..(MAX_EXAMINED as u32 + 500))
            .map(|i| {
                let mut h = [0u8; 32];
                h[..4].copy_from_slice(&i.to_le_bytes());
                FileEntry {
                    hash: ContentHash(h),
                    name: format!(
                        "everywhere {}",
                        if i == MAX_EXAMINED as u32 + 499 {
                            "rare"
                        } else {
                            "common"
                        }
                    ),
                    size: 1,
                }
            })
            .collect();
        for chunk in entries.chunks(1000) {
            ix.add(id(1), ip(), chunk).unwrap();
        }
        let broad = ix.search(&words("everywhere common"), 500);
        assert_eq!(broad.found.len(), 500);
        let nothing = ix.search(&words("everywhere nothing"), 500);
        assert_eq!(nothing.examined, 0);
        // Both words are common: the search stops at its cap.
        let both = ix.search(&words("everywhere common"), usize::MAX);
        assert_eq!(both.examined, MAX_EXAMINED);
        // The rare word leads: one candidate.
        assert_eq!(ix.search(&words("everywhere rare"), 10).examined, 1);
    }

    #[test]
    fn a_word_stays_while_another_owners_name_holds_it() {
        let ix = Index::new(IndexLimits::per_leaf(10));
        ix.add(id(1), ip(), &[entry(5, "night drive.ogg")]).unwrap();
        ix.add(id(2), ip(), &[entry(5, "night train.ogg")]).unwrap();
        assert_eq!(ix.search(&words("night"), 10).found.len(), 1);
        ix.remove_owner(id(1));
        // "night" and "ogg" are still in the other owner's name; "drive" not.
        assert_eq!(ix.search(&words("night ogg"), 10).found.len(), 1);
        assert!(ix.search(&words("drive"), 10).found.is_empty());
        assert_eq!(ix.search(&words("train"), 10).found.len(), 1);
        // The first owner's entry went, and the second is the file's now.
        let found = ix.get(&ContentHash([5; 32])).unwrap();
        assert_eq!(found.owner_ids(), vec![id(2)]);
        assert_eq!(found.owners[0].1.name, "night train.ogg");
    }

    #[test]
    fn many_files_of_one_word_are_listed_exactly_and_in_order() {
        let ix = Index::new(IndexLimits::per_leaf(100_000));
        let n = 3 * FEW as u32;
        let entries: Vec<FileEntry> = (0..n)
            .map(|i| {
                let mut h = [0u8; 32];
                h[..4].copy_from_slice(&i.to_le_bytes());
                FileEntry {
                    hash: ContentHash(h),
                    name: format!("common {}", if i % 2 == 0 { "even" } else { "odd" }),
                    size: 1,
                }
            })
            .collect();
        for batch in entries.chunks(1000) {
            ix.add(id(1), ip(), batch).unwrap();
        }
        assert!(matches!(
            ix.read().words.get("common").map(|w| &w.posting),
            Some(Posting::Many(_))
        ));
        let all = |q: &str| ix.search(&words(q), usize::MAX).found;
        assert_eq!(all("common").len(), MAX_EXAMINED.min(n as usize));
        assert_eq!(all("common even").len(), n as usize / 2);
        // Remove most: the bitmap turns back into a list, still exact.
        let keep = 10;
        let gone: Vec<ContentHash> = entries[keep..].iter().map(|e| e.hash).collect();
        assert_eq!(ix.remove(id(1), &gone), keep);
        assert!(matches!(
            ix.read().words.get("common").map(|w| &w.posting),
            Some(Posting::Few(_))
        ));
        let left = all("common");
        assert_eq!(left.len(), keep);
        let mut hashes: Vec<ContentHash> = left.iter().map(|f| f.hash).collect();
        hashes.sort();
        let mut want: Vec<ContentHash> = entries[..keep].iter().map(|e| e.hash).collect();
        want.sort();
        assert_eq!(hashes, want);
        assert_eq!(all("common odd").len(), keep / 2);
    }

    #[test]
    fn names_that_went_are_collected_and_the_rest_stay_right() {
        let ix = Index::new(IndexLimits::per_leaf(100_000));
        let batch = |round: u32| -> Vec<FileEntry> {
            (0..20_000u32)
                .map(|i| {
                    let mut h = [0u8; 32];
                    h[..4].copy_from_slice(&i.to_le_bytes());
                    FileEntry {
                        hash: ContentHash(h),
                        name: format!("take{round} file {i} with a longer name.bin"),
                        size: u64::from(i) << 33,
                    }
                })
                .collect()
        };
        // Renamed again and again: each round leaves the last one's names
        // behind, which the arena must not keep forever.
        for round in 0..6 {
            ix.add(id(1), ip(), &batch(round)).unwrap();
        }
        assert_eq!(ix.entry_count(), 20_000);
        let names = ix.read().names.bytes.len();
        let live: usize = batch(5).iter().map(|e| e.name.len()).sum();
        assert!(names <= 3 * live, "{names} bytes of names for {live} live");
        let f = ix.search(&words("take5 file 1234"), 10).found;
        assert_eq!(f.len(), 1);
        assert_eq!(
            f[0].owners[0].1.name,
            "take5 file 1234 with a longer name.bin"
        );
        assert_eq!(f[0].owners[0].1.size, 1234u64 << 33);
        assert!(ix.search(&words("take4"), 10).found.is_empty());
        ix.remove_owner(id(1));
        assert_eq!(ix.file_count(), 0);
    }

    #[test]
    fn the_filter_holds_the_words_and_hashes_and_forgets_those_gone() {
        let ix = Index::new(IndexLimits::per_leaf(10));
        ix.add(id(1), ip(), &[entry(1, "alpha beta"), entry(2, "gamma")])
            .unwrap();
        let f = ix.filter();
        for w in ["alpha", "beta", "gamma"] {
            assert!(f.may_hold(WordKey::of(w)), "{w}");
        }
        assert!(f.may_hold(WordKey::of_hash(&ContentHash([2; 32]))));
        assert!(Arc::ptr_eq(&f, &ix.filter()), "unchanged: the same filter");
        ix.remove(id(1), &[ContentHash([2; 32])]);
        let f = ix.filter();
        assert!(f.may_hold(WordKey::of("alpha")));
        assert!(!f.may_hold(WordKey::of("gamma")));
        assert!(!f.may_hold(WordKey::of_hash(&ContentHash([2; 32]))));
    }
}
