//! The frame reader: any bytes, read as a frame of any kind the nodes
//! read, give a message, a need for more bytes or an error; never a panic,
//! an allocation of the size a header claims or a deep recursion.
//!
//! Input: one byte picks the frame limit, the rest is the buffer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::IgnoredAny;
use servent_proto::frame::{self, FrameError, HEADER_LEN};
use servent_proto::limits::{
    MAX_MESH_FRAME, MAX_REPLY_FRAME, MAX_REQUEST_FRAME, MAX_TRANSFER_FRAME, MAX_UPDATE_FRAME,
};

const LIMITS: [usize; 5] = [
    MAX_REQUEST_FRAME,
    MAX_UPDATE_FRAME,
    MAX_REPLY_FRAME,
    MAX_TRANSFER_FRAME,
    MAX_MESH_FRAME,
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, buf)) = data.split_first() else {
        return;
    };
    let max = LIMITS[usize::from(pick) % LIMITS.len()];
    let announced = buf
        .get(..HEADER_LEN)
        .map(|h| u32::from_be_bytes(h.try_into().unwrap()) as usize);
    if let Some(h) = buf.get(..HEADER_LEN) {
        match frame::body_len(h.try_into().unwrap(), max) {
            Ok(len) => assert!((1..=max).contains(&len)),
            Err(FrameError::Empty) => assert_eq!(announced, Some(0)),
            Err(FrameError::TooLarge { len, .. }) => assert!(len > max),
            Err(e) => panic!("a header cannot fail with {e}"),
        }
    }
    match frame::parse::<IgnoredAny>(buf, max) {
        Ok(Some((_, used))) => {
            // Exactly the header and the body it announced, no more.
            assert_eq!(Some(used - HEADER_LEN), announced);
            assert!(used <= buf.len());
            assert!(frame::parse_exact::<IgnoredAny>(&buf[..used], max).is_ok());
            // One byte short is a frame still arriving, not an error.
            assert!(matches!(
                frame::parse::<IgnoredAny>(&buf[..used - 1], max),
                Ok(None)
            ));
        }
        Ok(None) => {
            let whole = announced.map_or(HEADER_LEN, |len| HEADER_LEN + len);
            assert!(buf.len() < whole);
            assert!(matches!(
                frame::parse_exact::<IgnoredAny>(buf, max),
                Err(FrameError::Truncated { .. })
            ));
        }
        Err(_) => assert!(frame::parse_exact::<IgnoredAny>(buf, max).is_err()),
    }
});
