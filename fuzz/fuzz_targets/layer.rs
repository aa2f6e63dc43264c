//! The range-layer verifier: a layer from the network is accepted only if
//! it is the file's own, and a range only if it is the range its CV says.
//!
//! Input: 4 bytes give a content length (up to 5 ranges and a bit), 8 a
//! claimed size, 32 a claimed hash; the rest is both a layer as received
//! and the seed of the content.
#![no_main]

use leaf::layer::{self, CV_LEN, RANGE_SIZE};
use libfuzzer_sys::fuzz_target;
use servent_proto::ContentHash;

/// Longest content tried: 5 ranges and some (6 ranges: balanced and
/// unbalanced trees of every depth up to 3). It is hashed three times on
/// each run, so not more.
const MAX_LEN: u64 = 5 * RANGE_SIZE + 4096;

fuzz_target!(|data: &[u8]| {
    if data.len() < 44 {
        return;
    }
    let len = u64::from(u32::from_le_bytes(data[..4].try_into().unwrap())) % (MAX_LEN + 1);
    let size = u64::from_le_bytes(data[4..12].try_into().unwrap());
    let hash = ContentHash(data[12..44].try_into().unwrap());
    let rest = &data[44..];

    // A layer as received, against any claimed size and hash: no panic and
    // no allocation for the size (a size of 2^64 - 1 claims 2^46 ranges).
    if let Some(cvs) = layer::from_bytes(rest) {
        assert_eq!(cvs.len() * CV_LEN, rest.len());
        assert_eq!(layer::to_bytes(&cvs), rest);
        if layer::verify(&cvs, size, &hash) {
            assert_eq!(layer::root(&cvs), Some(hash));
            assert_eq!(cvs.len(), layer::range_count(size));
        }
    } else {
        assert_ne!(rest.len() % CV_LEN, 0);
    }

    // Content of `len` bytes grown from the seed; its honest layer.
    let seed = if rest.is_empty() { &[0u8][..] } else { rest };
    let mut content = Vec::with_capacity(len as usize);
    while content.len() < len as usize {
        let n = seed.len().min(len as usize - content.len());
        content.extend_from_slice(&seed[..n]);
        // Not periodic: no two ranges alike by accident of the seed's length.
        let last = content.len() - 1;
        content[last] ^= (content.len() / seed.len()) as u8;
    }
    let (root, cvs) = layer::hash_reader(&content[..], len).expect("exactly len bytes");
    assert_eq!(root.0, *blake3::hash(&content).as_bytes());
    assert!(layer::verify(&cvs, len, &root));
    let count = cvs.len();
    for (i, cv) in cvs.iter().enumerate() {
        let (off, n) = layer::range_bounds(len, i);
        let range = &content[off as usize..(off + n) as usize];
        assert_eq!(&layer::range_cv(range, i, count), cv);
    }

    // A received layer for this content: the honest one, or one of another
    // length, with CVs changed as the input says. Only the honest verifies.
    let mut forged = cvs.clone();
    for (j, &x) in rest.iter().enumerate().take(64) {
        let cv = j % (count + 1);
        if cv == count {
            if x & 1 == 1 {
                forged.pop();
            } else {
                forged.push([x; CV_LEN]);
            }
        } else if let Some(c) = forged.get_mut(cv) {
            c[usize::from(x) % CV_LEN] ^= x >> 1;
        }
    }
    assert_eq!(layer::verify(&forged, len, &root), forged == cvs);

    // A range changed as the input says passes its CV only if unchanged.
    if let Some((&x, _)) = rest.split_last() {
        let i = usize::from(x) % count;
        let (off, n) = layer::range_bounds(len, i);
        let mut range = content[off as usize..(off + n) as usize].to_vec();
        if let Some(b) = range.get_mut(usize::from(x) * 31 % n.max(1) as usize) {
            *b ^= x;
        }
        let same = range[..] == content[off as usize..(off + n) as usize];
        assert_eq!(layer::range_cv(&range, i, count) == cvs[i], same);
        // At another place it passes only if it holds the very bytes of the
        // range there: the CV binds bytes to their place.
        if count > 1 {
            let other = (i + 1) % count;
            let (off, n) = layer::range_bounds(len, other);
            let twin = range[..] == content[off as usize..(off + n) as usize];
            assert_eq!(layer::range_cv(&range, other, count) == cvs[other], twin);
        }
    }
});
