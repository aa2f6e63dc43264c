//! The file index of one supernode: which of its leaves share which content,
//! and which content has which words in its names.
//!
//! Safe under concurrent use: three concurrent maps, always locked in the
//! order owners → files → words and never the other way, so no two
//! operations can wait on each other. Not persistent: it is rebuilt from the
//! leaves' registrations, and a leaf's entries go as soon as its session does.

use std::collections::HashMap;

use dashmap::DashMap;
use servent_proto::cost::MAX_EXAMINED;
use servent_proto::keywords::words;
use servent_proto::msg::{FileEntry, NameVariant};
use servent_proto::{ContentHash, NodeId};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("a leaf may share at most {max} files here")]
    TooManyFiles { max: usize },
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

#[derive(Default)]
struct FileRecord {
    /// Each owner's name and size for this content.
    owners: HashMap<NodeId, (String, u64)>,
}

#[derive(Default)]
pub struct Index {
    /// owner → hash → (name, size): what each leaf shares.
    owners: DashMap<NodeId, HashMap<ContentHash, (String, u64)>>,
    files: DashMap<ContentHash, FileRecord>,
    /// word → hash → how many owners' names of that hash hold the word.
    words: DashMap<String, HashMap<ContentHash, u32>>,
}

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or renames `owner`'s entries; returns how many it now has.
    /// Entries past `max_files` are refused whole, nothing of the batch added.
    pub fn add(
        &self,
        owner: NodeId,
        entries: &[FileEntry],
        max_files: usize,
    ) -> Result<usize, IndexError> {
        let mut mine = self.owners.entry(owner).or_default();
        let new = entries
            .iter()
            .filter(|e| !mine.contains_key(&e.hash))
            .count();
        if mine.len() + new > max_files {
            return Err(IndexError::TooManyFiles { max: max_files });
        }
        for e in entries {
            if let Some((old_name, old_size)) = mine.get(&e.hash) {
                if *old_name == e.name && *old_size == e.size {
                    continue;
                }
                self.unlink(owner, e.hash);
            }
            mine.insert(e.hash, (e.name.clone(), e.size));
            self.files
                .entry(e.hash)
                .or_default()
                .owners
                .insert(owner, (e.name.clone(), e.size));
            for w in words(&e.name) {
                *self.words.entry(w).or_default().entry(e.hash).or_insert(0) += 1;
            }
        }
        Ok(mine.len())
    }

    /// Removes some of `owner`'s entries; returns how many it still has.
    pub fn remove(&self, owner: NodeId, hashes: &[ContentHash]) -> usize {
        let Some(mut mine) = self.owners.get_mut(&owner) else {
            return 0;
        };
        for h in hashes {
            if mine.remove(h).is_some() {
                self.unlink(owner, *h);
            }
        }
        mine.len()
    }

    /// Drops everything `owner` shares.
    pub fn remove_owner(&self, owner: NodeId) {
        if let Some((_, mine)) = self.owners.remove(&owner) {
            for h in mine.keys() {
                self.unlink(owner, *h);
            }
        }
    }

    /// Removes `owner` from the file record of `hash` and its words.
    fn unlink(&self, owner: NodeId, hash: ContentHash) {
        let Some(mut rec) = self.files.get_mut(&hash) else {
            return;
        };
        let Some((name, _)) = rec.owners.remove(&owner) else {
            return;
        };
        let empty = rec.owners.is_empty();
        drop(rec);
        if empty {
            self.files.remove_if(&hash, |_, r| r.owners.is_empty());
        }
        for w in words(&name) {
            if let Some(mut set) = self.words.get_mut(&w) {
                if let Some(n) = set.get_mut(&hash) {
                    *n -= 1;
                    if *n == 0 {
                        set.remove(&hash);
                    }
                }
                let empty = set.is_empty();
                drop(set);
                if empty {
                    self.words.remove_if(&w, |_, s| s.is_empty());
                }
            }
        }
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
        // Start from the rarest word: the candidate list is the shortest.
        let mut sizes = Vec::with_capacity(query.len());
        for w in query {
            match self.words.get(w) {
                Some(set) => sizes.push((set.len(), w)),
                None => return out,
            }
        }
        sizes.sort();
        let rarest = sizes[0].1;
        // Copied out (bounded) so that no map lock is held while the other
        // words are looked up.
        let candidates: Vec<ContentHash> = match self.words.get(rarest) {
            Some(set) => set.keys().take(MAX_EXAMINED).copied().collect(),
            None => return out,
        };
        for hash in candidates {
            out.examined += 1;
            let all = sizes[1..]
                .iter()
                .all(|(_, w)| self.words.get(*w).is_some_and(|s| s.contains_key(&hash)));
            if all {
                if let Some(found) = self.get(&hash) {
                    out.found.push(found);
                    if out.found.len() >= max {
                        break;
                    }
                }
            }
        }
        out
    }

    /// Every owner of exactly this content, with what each announced.
    pub fn get(&self, hash: &ContentHash) -> Option<Found> {
        let rec = self.files.get(hash)?;
        let mut owners: Vec<(NodeId, NameVariant)> = rec
            .owners
            .iter()
            .map(|(id, (name, size))| {
                let v = NameVariant {
                    name: name.clone(),
                    size: *size,
                };
                (*id, v)
            })
            .collect();
        if owners.is_empty() {
            return None;
        }
        owners.sort_by_key(|(id, _)| *id);
        Some(Found {
            hash: *hash,
            owners,
        })
    }

    /// Distinct content hashes indexed.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Entries `owner` has here.
    pub fn owner_file_count(&self, owner: &NodeId) -> usize {
        self.owners.get(owner).map_or(0, |m| m.len())
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

    #[test]
    fn keyword_search_needs_every_word() {
        let ix = Index::new();
        ix.add(
            id(1),
            &[entry(1, "Blue Moon.mp3"), entry(2, "blue sky.ogg")],
            10,
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
        let ix = Index::new();
        ix.add(id(1), &[entry(7, "a.bin")], 10).unwrap();
        ix.add(id(2), &[entry(7, "b.bin")], 10).unwrap();
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
        assert!(ix.words.is_empty(), "no word entries leak");
    }

    #[test]
    fn renaming_replaces_the_old_words() {
        let ix = Index::new();
        ix.add(id(1), &[entry(1, "old name")], 10).unwrap();
        ix.add(id(1), &[entry(1, "new title")], 10).unwrap();
        assert!(ix.search(&words("old"), 10).found.is_empty());
        assert_eq!(ix.search(&words("title"), 10).found.len(), 1);
        assert_eq!(ix.owner_file_count(&id(1)), 1);
    }

    #[test]
    fn per_owner_cap_refuses_the_whole_batch() {
        let ix = Index::new();
        ix.add(id(1), &[entry(1, "a"), entry(2, "b")], 2).unwrap();
        let err = ix.add(id(1), &[entry(3, "c")], 2).unwrap_err();
        assert_eq!(err, IndexError::TooManyFiles { max: 2 });
        assert_eq!(ix.owner_file_count(&id(1)), 2);
        // Re-announcing what it already has is not growth.
        ix.add(id(1), &[entry(1, "a")], 2).unwrap();
    }

    #[test]
    fn concurrent_owners_do_not_deadlock_or_lose_entries() {
        let ix = std::sync::Arc::new(Index::new());
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
                        ix.add(id(t), &entries, 100).unwrap();
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
        assert!(ix.words.is_empty());
    }
}
