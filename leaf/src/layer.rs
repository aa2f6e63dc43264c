//! The range layer of a file's BLAKE3 tree: what lets a downloader verify
//! each [`RANGE_SIZE`] range of a file on its own, against nothing but the
//! file's BLAKE3 hash.
//!
//! BLAKE3 hashes 1 KiB chunks into a binary tree. [`RANGE_SIZE`] is 256
//! chunks, a power of two, so every range but the last is one whole subtree
//! and its chaining value (CV) is a node of the tree; the last range is
//! the rightmost subtree. The *layer* is the list of those CVs, 32 bytes a
//! range: merged pairwise the way BLAKE3 builds its tree (the left subtree
//! holds the largest power of two of ranges that leaves at least one for
//! the right), they give the root, which is the file's hash. A downloader
//! fetches the layer once, checks it against the hash, and then checks
//! every range by hashing it alone (with all of BLAKE3's SIMD parallelism)
//! and comparing with its CV. A file of one range has the root itself as
//! its layer. This is what BitTorrent v2 calls the piece layer, with
//! BLAKE3's own tree instead of a second hash.

use std::io::Read;
use std::path::Path;

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
use servent_proto::ContentHash;

/// Bytes a range holds (the last may hold fewer): the unit of
/// verification, scheduling and resume.
pub use servent_proto::limits::RANGE_SIZE;
/// Bytes of one CV in a layer.
pub const CV_LEN: usize = 32;

/// A chaining value: a range's hash as a node of the file's tree.
pub type Cv = [u8; CV_LEN];

/// Ranges of a file of `size` bytes: at least one (an empty file is one
/// empty range).
pub fn range_count(size: u64) -> usize {
    size.div_ceil(RANGE_SIZE).max(1) as usize
}

/// Offset and length of range `index` of a file of `size` bytes.
pub fn range_bounds(size: u64, index: usize) -> (u64, u64) {
    let offset = index as u64 * RANGE_SIZE;
    (offset, RANGE_SIZE.min(size.saturating_sub(offset)))
}

/// The CV of range `index` of a file of `count` ranges, given its bytes.
pub fn range_cv(data: &[u8], index: usize, count: usize) -> Cv {
    if count == 1 {
        return *blake3::hash(data).as_bytes();
    }
    blake3::Hasher::new()
        .set_input_offset(index as u64 * RANGE_SIZE)
        .update(data)
        .finalize_non_root()
}

/// The root hash a layer proves: the file's BLAKE3 hash if the layer is
/// right. `None` for an empty layer.
pub fn root(layer: &[Cv]) -> Option<ContentHash> {
    match layer {
        [] => None,
        [only] => Some(ContentHash(*only)),
        _ => {
            let split = left_len(layer.len());
            let (l, r) = (subtree(&layer[..split]), subtree(&layer[split..]));
            Some(ContentHash(
                *merge_subtrees_root(&l, &r, Mode::Hash).as_bytes(),
            ))
        }
    }
}

/// The non-root CV of a subtree of ranges.
fn subtree(layer: &[Cv]) -> Cv {
    if layer.len() == 1 {
        return layer[0];
    }
    let split = left_len(layer.len());
    merge_subtrees_non_root(
        &subtree(&layer[..split]),
        &subtree(&layer[split..]),
        Mode::Hash,
    )
}

/// Ranges in the left subtree of `n > 1` ranges: the largest power of two
/// below `n`.
fn left_len(n: usize) -> usize {
    debug_assert!(n > 1);
    1 << (usize::BITS - 1 - (n - 1).leading_zeros())
}

/// Whether `layer` is the layer of a file of `size` bytes, give or take
/// the length of the last range (which its CV proves), hashing to `hash`.
pub fn verify(layer: &[Cv], size: u64, hash: &ContentHash) -> bool {
    layer.len() == range_count(size) && root(layer).as_ref() == Some(hash)
}

/// Splits raw layer bytes into CVs; `None` unless a whole number of them.
pub fn from_bytes(bytes: &[u8]) -> Option<Vec<Cv>> {
    if bytes.len() % CV_LEN != 0 {
        return None;
    }
    Some(
        bytes
            .chunks_exact(CV_LEN)
            .map(|c| c.try_into().expect("exact chunk"))
            .collect(),
    )
}

pub fn to_bytes(layer: &[Cv]) -> Vec<u8> {
    layer.concat()
}

/// Hashes `size` bytes from `reader` into their layer and root. Fails if
/// the reader ends early or holds more.
pub fn hash_reader(mut reader: impl Read, size: u64) -> std::io::Result<(ContentHash, Vec<Cv>)> {
    let count = range_count(size);
    let mut layer = Vec::with_capacity(count);
    let mut buf = vec![0u8; RANGE_SIZE as usize];
    for index in 0..count {
        let (_, len) = range_bounds(size, index);
        let piece = &mut buf[..len as usize];
        reader.read_exact(piece)?;
        layer.push(range_cv(piece, index, count));
    }
    if reader.read(&mut [0u8; 1])? != 0 {
        return Err(std::io::Error::other("longer than its size"));
    }
    let hash = root(&layer).expect("at least one range");
    Ok((hash, layer))
}

/// Reads a layer file, checking it against `size` and `hash`.
pub fn load(path: &Path, size: u64, hash: &ContentHash) -> std::io::Result<Vec<Cv>> {
    let bytes = std::fs::read(path)?;
    match from_bytes(&bytes) {
        Some(layer) if verify(&layer, size, hash) => Ok(layer),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} is not the layer of {hash}", path.display()),
        )),
    }
}

/// Writes a layer file whole or not at all, making its folder if need be.
pub fn save(path: &Path, layer: &[Cv]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::replace_file(path, &to_bytes(layer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 1021) as u8).collect()
    }

    #[test]
    fn the_layer_proves_the_blake3_hash() {
        let r = RANGE_SIZE as usize;
        // Empty, one chunk, one range, just over, powers of two of ranges
        // and one either side, and an unbalanced tree.
        for len in [
            0,
            1,
            1024,
            r - 1,
            r,
            r + 1,
            2 * r,
            3 * r - 5,
            4 * r,
            4 * r + 1,
            7 * r + 3,
            8 * r,
            13 * r + 999,
        ] {
            let data = content(len);
            let (hash, layer) = hash_reader(&data[..], len as u64).unwrap();
            assert_eq!(hash.0, *blake3::hash(&data).as_bytes(), "len {len}");
            assert_eq!(layer.len(), range_count(len as u64));
            assert!(verify(&layer, len as u64, &hash));
            for (i, cv) in layer.iter().enumerate() {
                let (off, l) = range_bounds(len as u64, i);
                let piece = &data[off as usize..(off + l) as usize];
                assert_eq!(&range_cv(piece, i, layer.len()), cv, "len {len} range {i}");
            }
        }
    }

    #[test]
    fn a_wrong_layer_range_or_size_does_not_verify() {
        let data = content(5 * RANGE_SIZE as usize + 17);
        let size = data.len() as u64;
        let (hash, layer) = hash_reader(&data[..], size).unwrap();
        let mut bad = layer.clone();
        bad[3][0] ^= 1;
        assert!(!verify(&bad, size, &hash));
        assert!(!verify(&layer[..5], size, &hash));
        // Same number of ranges, another size: the layer cannot tell, but
        // the last range, cut to that size, does not match its CV.
        assert!(verify(&layer, size - 1, &hash));
        let (off, len) = range_bounds(size - 1, 5);
        let short = &data[off as usize..(off + len) as usize];
        assert_ne!(range_cv(short, 5, 6), layer[5]);
        let mut piece = data[..RANGE_SIZE as usize].to_vec();
        piece[100] ^= 1;
        assert_ne!(range_cv(&piece, 0, layer.len()), layer[0]);
        // A range at the wrong place does not pass for another.
        assert_ne!(range_cv(&data[..RANGE_SIZE as usize], 1, 6), layer[1]);
        assert!(hash_reader(&data[..], size - 1).is_err());
        assert!(hash_reader(&data[..], size + 1).is_err());
    }
}
