//! Framing: a 4-byte big-endian body length, then a MessagePack body.
//!
//! The length is checked against the limit for the kind of frame expected
//! *before* any buffer is allocated for it; a zero length is invalid. The
//! body must hold exactly one value, nested at most `MAX_DEPTH` deep.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 4;
/// Deepest MessagePack nesting accepted (our messages need fewer than 8).
pub const MAX_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame with an empty body")]
    Empty,
    #[error("frame truncated: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("malformed message: {0}")]
    Decode(String),
    #[error("message could not be encoded: {0}")]
    Encode(String),
}

/// Encodes `msg` as a whole frame (header and body).
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; HEADER_LEN];
    rmp_serde::encode::write(&mut out, msg).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    out[..HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// The body length a header announces, if it is within `max`.
pub fn body_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes one message from a whole body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    // A cursor, not `from_read_ref`: its position tells how much the value
    // used (`from_read_ref`'s `get_ref` is the whole body, not what is left).
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(body));
    de.set_max_depth(MAX_DEPTH);
    let value = T::deserialize(&mut de).map_err(|e| FrameError::Decode(e.to_string()))?;
    let rest = (body.len() as u64).saturating_sub(de.position());
    if rest != 0 {
        return Err(FrameError::Decode(format!(
            "{rest} trailing bytes after the message"
        )));
    }
    Ok(value)
}

/// Parses one frame from the front of `buf`: `Ok(None)` if more bytes are
/// needed, else the message and how many bytes it took.
pub fn parse<T: DeserializeOwned>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = body_len(header.try_into().expect("4 bytes"), max)?;
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode(body)?, HEADER_LEN + len)))
}

/// Parses a buffer that must hold exactly one whole frame.
pub fn parse_exact<T: DeserializeOwned>(buf: &[u8], max: usize) -> Result<T, FrameError> {
    match parse(buf, max)? {
        Some((msg, used)) if used == buf.len() => Ok(msg),
        Some((_, used)) => Err(FrameError::Decode(format!(
            "{} trailing bytes after the frame",
            buf.len() - used
        ))),
        None => {
            let expected = buf
                .get(..HEADER_LEN)
                .map(|h| HEADER_LEN + u32::from_be_bytes(h.try_into().expect("4 bytes")) as usize)
                .unwrap_or(HEADER_LEN);
            Err(FrameError::Truncated {
                expected,
                got: buf.len(),
            })
        }
    }
}
