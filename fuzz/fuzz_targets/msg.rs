//! Every message decoder: each top-level message enum, read from a whole
//! frame with the limit the nodes read it with. A frame that decodes
//! re-encodes to a frame that decodes to the same message, and that
//! encoding is canonical (encoding it again gives the same bytes).
//!
//! Not asserted: that the canonical frame is no longer than the one read,
//! nor within the same limit. The reference decoder accepts a variant by
//! its index (PROTOCOL.md section 6), and `00` for `LeafReply::Accepted` is
//! shorter than its name (`corpus/msg/regress-variant-by-index`, which an
//! earlier version of this target wrongly failed on).
//!
//! Input: one byte picks the message type, the rest is the frame.
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use servent_proto::frame;
use servent_proto::limits::{
    MAX_MESH_FRAME, MAX_REPLY_FRAME, MAX_REQUEST_FRAME, MAX_TRANSFER_FRAME, MAX_UPDATE_FRAME,
};
use servent_proto::msg::{
    GetReply, GetRequest, LeafReply, LeafRequest, MeshControl, MeshRequest, SessionUpdate,
    SupernodeReply, SupernodeRequest,
};

fn round_trip<T>(buf: &[u8], max: usize)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Ok(msg) = frame::parse_exact::<T>(buf, max) else {
        return;
    };
    let again = frame::encode(&msg, usize::MAX).expect("a message read encodes");
    let back: T = frame::parse_exact(&again, usize::MAX).expect("a frame we encoded decodes");
    assert_eq!(back, msg);
    assert_eq!(frame::encode(&back, usize::MAX).unwrap(), again);
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, buf)) = data.split_first() else {
        return;
    };
    // Each type with the limit its reader uses (see the `read_frame` and
    // `read_first_frame` calls in supernode/ and leaf/).
    match pick % 9 {
        0 => round_trip::<LeafRequest>(buf, MAX_REQUEST_FRAME),
        1 => round_trip::<SessionUpdate>(buf, MAX_UPDATE_FRAME),
        2 => round_trip::<SupernodeReply>(buf, MAX_REPLY_FRAME),
        3 => round_trip::<SupernodeRequest>(buf, MAX_REPLY_FRAME),
        4 => round_trip::<LeafReply>(buf, MAX_REPLY_FRAME),
        5 => round_trip::<MeshRequest>(buf, MAX_MESH_FRAME),
        6 => round_trip::<MeshControl>(buf, MAX_MESH_FRAME),
        7 => round_trip::<GetRequest>(buf, MAX_TRANSFER_FRAME),
        _ => round_trip::<GetReply>(buf, MAX_TRANSFER_FRAME),
    }
});
