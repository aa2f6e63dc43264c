//! The file index of one supernode: which of its leaves share which content,
//! and which content has which words in its names.
//!
//! One lock over compact tables rather than three concurrent maps: a
//! content hash is stored once and named elsewhere by a 4-byte file number,
//! so an entry (one leaf sharing one file) costs about a quarter of what it
//! did. Searches take the lock shared and registrations exclusively; a batch
//! of 1 024 entries holds it for well under a millisecond.
//!
//! Bounded three ways, each refused with [`IndexError`] (the session turns
//! it into `LimitExceeded`): files per leaf, entries in all, and entries per
//! IP address (or IPv6 /64), since node ids cost nothing to make. Not
//! persistent: it is rebuilt from the leaves' registrations, and a leaf's
//! entries go as soon as its session does.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use servent_proto::admit::AddressKey;
use servent_proto::cost::MAX_EXAMINED;
use servent_proto::filter::{Filter, LocalFilter, WordKey};
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

/// A file's number in [`Inner::files`].
type FileNo = u32;

/// One leaf's announcement of a file.
struct Owned {
    owner: NodeId,
    name: Box<str>,
    size: u64,
}

/// A slot of [`Inner::files`]: free while it has no owners.
struct FileSlot {
    hash: ContentHash,
    owners: Vec<Owned>,
}

struct OwnerRecord {
    address: AddressKey,
    files: HashSet<FileNo>,
}

/// The files whose names hold one word, each with how many of its owners'
/// names do. Most words belong to one file or a few (a track number, a
/// date): those stay inline or in a short list.
enum Posting {
    One(FileNo, u32),
    Few(Vec<(FileNo, u32)>),
    Many(HashMap<FileNo, u32>),
}

/// Files a word's posting lists before it becomes a map.
const FEW: usize = 16;

impl Posting {
    fn len(&self) -> usize {
        match self {
            Posting::One(..) => 1,
            Posting::Few(v) => v.len(),
            Posting::Many(m) => m.len(),
        }
    }

    fn contains(&self, file: FileNo) -> bool {
        match self {
            Posting::One(f, _) => *f == file,
            Posting::Few(v) => v.iter().any(|(f, _)| *f == file),
            Posting::Many(m) => m.contains_key(&file),
        }
    }

    fn add(&mut self, file: FileNo) {
        match self {
            Posting::One(f, n) if *f == file => *n += 1,
            Posting::One(f, n) => *self = Posting::Few(vec![(*f, *n), (file, 1)]),
            Posting::Few(v) => match v.iter().position(|(f, _)| *f == file) {
                Some(i) => v[i].1 += 1,
                None if v.len() < FEW => v.push((file, 1)),
                None => {
                    let mut m: HashMap<FileNo, u32> = v.drain(..).collect();
                    m.insert(file, 1);
                    *self = Posting::Many(m);
                }
            },
            Posting::Many(m) => *m.entry(file).or_insert(0) += 1,
        }
    }

    /// Takes one owner's use of the word off `file`; true when the posting
    /// is empty afterwards.
    fn remove(&mut self, file: FileNo) -> bool {
        match self {
            Posting::One(f, n) => {
                if *f == file {
                    *n -= 1;
                }
                *n == 0
            }
            Posting::Few(v) => {
                if let Some(i) = v.iter().position(|(f, _)| *f == file) {
                    v[i].1 -= 1;
                    if v[i].1 == 0 {
                        v.swap_remove(i);
                    }
                }
                v.is_empty()
            }
            Posting::Many(m) => {
                if let Some(n) = m.get_mut(&file) {
                    *n -= 1;
                    if *n == 0 {
                        m.remove(&file);
                    }
                }
                if m.len() * 4 < m.capacity() {
                    m.shrink_to(m.len() * 2);
                }
                m.is_empty()
            }
        }
    }

    fn files(&self) -> impl Iterator<Item = FileNo> + '_ {
        let (one, few, many) = match self {
            Posting::One(f, _) => (Some(*f), None, None),
            Posting::Few(v) => (None, Some(v.iter().map(|(f, _)| *f)), None),
            Posting::Many(m) => (None, None, Some(m.keys().copied())),
        };
        one.into_iter()
            .chain(few.into_iter().flatten())
            .chain(many.into_iter().flatten())
    }
}

#[derive(Default)]
struct Inner {
    /// The keyword filter of every word and file hash here, for the mesh
    /// neighbours (`servent_proto::filter`), and how often it changed.
    filter: LocalFilter,
    filter_changes: u64,
    /// The filter as [`Index::filter`] last gave it, at that change count.
    filter_snapshot: Option<(u64, Arc<Filter>)>,
    numbers: HashMap<ContentHash, FileNo>,
    files: Vec<FileSlot>,
    free: Vec<FileNo>,
    owners: HashMap<NodeId, OwnerRecord>,
    words: HashMap<Box<str>, Posting>,
    entries: usize,
    by_address: HashMap<AddressKey, usize>,
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
        let address = match ix.owners.get(&owner) {
            Some(rec) => rec.address,
            None => AddressKey::of(ip),
        };
        let mine = ix.owners.get(&owner).map(|r| &r.files);
        let mut batch = HashSet::new();
        let new = entries
            .iter()
            .filter(|e| batch.insert(e.hash))
            .filter(|e| {
                let known = ix.numbers.get(&e.hash);
                !known.is_some_and(|n| mine.is_some_and(|m| m.contains(n)))
            })
            .count();
        let have = mine.map_or(0, HashSet::len);
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
        ix.owners.entry(owner).or_insert_with(|| OwnerRecord {
            address,
            files: HashSet::new(),
        });
        for e in entries {
            ix.link(owner, address, e);
        }
        Ok(ix.owners.get(&owner).map_or(0, |r| r.files.len()))
    }

    /// Removes some of `owner`'s entries; returns how many it still has.
    pub fn remove(&self, owner: NodeId, hashes: &[ContentHash]) -> usize {
        let mut ix = self.write();
        for h in hashes {
            if let Some(&file) = ix.numbers.get(h) {
                ix.unlink(owner, file);
            }
        }
        let left = ix.owners.get(&owner).map_or(0, |r| r.files.len());
        if left == 0 {
            ix.owners.remove(&owner);
        }
        ix.shrink();
        left
    }

    /// Drops everything `owner` shares.
    pub fn remove_owner(&self, owner: NodeId) {
        let mut ix = self.write();
        let Some(rec) = ix.owners.get(&owner) else {
            return;
        };
        let files: Vec<FileNo> = rec.files.iter().copied().collect();
        for file in files {
            ix.unlink(owner, file);
        }
        ix.owners.remove(&owner);
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
                Some(p) => postings.push(p),
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
        let file = *ix.numbers.get(hash)?;
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
        let f = Arc::new(ix.filter.filter().clone());
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
        self.read().owners.get(owner).map_or(0, |r| r.files.len())
    }
}

impl Inner {
    /// Records that `owner` shares `e`, replacing what it said of the same
    /// hash before.
    fn link(&mut self, owner: NodeId, address: AddressKey, e: &FileEntry) {
        let file = match self.numbers.get(&e.hash) {
            Some(&f) => f,
            None => {
                let slot = FileSlot {
                    hash: e.hash,
                    owners: Vec::with_capacity(1),
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
                self.numbers.insert(e.hash, f);
                self.filter.add(WordKey::of_hash(&e.hash));
                self.filter_changes += 1;
                f
            }
        };
        let unchanged = self.files[file as usize]
            .owners
            .iter()
            .find(|o| o.owner == owner)
            .map(|o| *o.name == *e.name && o.size == e.size);
        match unchanged {
            Some(true) => return,
            Some(false) => {
                self.unlink(owner, file);
                // The slot may have been freed: link afresh.
                return self.link(owner, address, e);
            }
            None => {}
        }
        self.files[file as usize].owners.push(Owned {
            owner,
            name: e.name.as_str().into(),
            size: e.size,
        });
        if let Some(rec) = self.owners.get_mut(&owner) {
            rec.files.insert(file);
        }
        self.entries += 1;
        *self.by_address.entry(address).or_insert(0) += 1;
        for w in words(&e.name) {
            match self.words.get_mut(w.as_str()) {
                Some(p) => p.add(file),
                None => {
                    self.filter.add(WordKey::of(&w));
                    self.filter_changes += 1;
                    self.words.insert(w.into_boxed_str(), Posting::One(file, 1));
                }
            }
        }
    }

    /// Removes `owner` from `file` and its words; frees the file's slot
    /// when it was the last owner.
    fn unlink(&mut self, owner: NodeId, file: FileNo) {
        let slot = &mut self.files[file as usize];
        let Some(i) = slot.owners.iter().position(|o| o.owner == owner) else {
            return;
        };
        let gone = slot.owners.swap_remove(i);
        if slot.owners.is_empty() {
            let hash = slot.hash;
            slot.owners = Vec::new();
            self.numbers.remove(&hash);
            self.free.push(file);
            self.filter.remove(WordKey::of_hash(&hash));
            self.filter_changes += 1;
        }
        if let Some(rec) = self.owners.get_mut(&owner) {
            rec.files.remove(&file);
            self.entries -= 1;
            if let Some(n) = self.by_address.get_mut(&rec.address) {
                *n -= 1;
                if *n == 0 {
                    self.by_address.remove(&rec.address);
                }
            }
        }
        for w in words(&gone.name) {
            if let Some(p) = self.words.get_mut(w.as_str()) {
                if p.remove(file) {
                    self.words.remove(w.as_str());
                    self.filter.remove(WordKey::of(&w));
                    self.filter_changes += 1;
                }
            }
        }
    }

    fn found(&self, file: FileNo) -> Found {
        let slot = &self.files[file as usize];
        let mut owners: Vec<(NodeId, NameVariant)> = slot
            .owners
            .iter()
            .map(|o| {
                let v = NameVariant {
                    name: o.name.to_string(),
                    size: o.size,
                };
                (o.owner, v)
            })
            .collect();
        owners.sort_by_key(|(id, _)| *id);
        Found {
            hash: slot.hash,
            owners,
        }
    }

    /// Gives memory back once the tables are mostly empty (an index that
    /// was flooded and purged must not keep its peak).
    fn shrink(&mut self) {
        fn shrink_map<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>) {
            if m.len() * 4 < m.capacity() {
                m.shrink_to(m.len() * 2);
            }
        }
        shrink_map(&mut self.numbers);
        shrink_map(&mut self.owners);
        shrink_map(&mut self.words);
        shrink_map(&mut self.by_address);
        self.filter.shrink();
        if self.filter.is_empty() {
            // Nothing is left to say: the last snapshot need not be kept.
            self.filter_snapshot = None;
        }
        // Free slots at the end can go (and out of the free list).
        let before = self.files.len();
        while self.files.last().is_some_and(|s| s.owners.is_empty()) {
            self.files.pop();
        }
        if self.files.len() < before {
            let len = self.files.len() as FileNo;
            self.free.retain(|f| *f < len);
        }
        if self.files.len() * 4 < self.files.capacity() {
            self.files.shrink_to(self.files.len() * 2);
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
}
