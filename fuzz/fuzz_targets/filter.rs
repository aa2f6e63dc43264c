//! A neighbour's keyword filter updates, as the mesh reader applies them:
//! any sequence of `Filter` and `FilterPatch` frames (decoded with the
//! mesh limit) fed to one `FilterCopy`. Whatever comes, nothing panics,
//! every filter kept is within the size and fill limits, and a refused
//! update leaves the copy as it was.
//!
//! Input: frames one after the other, each a 4-byte big-endian length and
//! its body (as on the wire); a frame that does not decode is skipped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use servent_proto::filter::{
    FilterCopy, MAX_FILTER_FILL_PERMILLE, MAX_FILTER_LOG2, MIN_FILTER_LOG2,
};
use servent_proto::frame;
use servent_proto::limits::MAX_MESH_FRAME;
use servent_proto::msg::MeshControl;

fuzz_target!(|data: &[u8]| {
    let mut copy = FilterCopy::default();
    let mut rest = data;
    for _ in 0..64 {
        if rest.len() < 4 {
            break;
        }
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        let end = (4 + len).min(rest.len());
        let (frame_bytes, tail) = rest.split_at(end);
        rest = tail;
        let Ok(msg) = frame::parse_exact::<MeshControl>(frame_bytes, MAX_MESH_FRAME) else {
            continue;
        };
        let before = copy.filter().cloned();
        let result = match &msg {
            MeshControl::Filter { log2, bits } => copy.handle_full(*log2, &bits.0).map(|_| ()),
            MeshControl::FilterPatch(bits) => copy.handle_patch(bits).map(|_| ()),
            _ => continue,
        };
        match result {
            Ok(()) => {
                let f = copy.filter().expect("a filter after an accepted update");
                assert!((MIN_FILTER_LOG2..=MAX_FILTER_LOG2).contains(&f.log2()));
                assert!(f.fill_permille() <= MAX_FILTER_FILL_PERMILLE);
            }
            Err(_) => assert_eq!(copy.filter(), before.as_ref(), "a refused update changed it"),
        }
    }
});
