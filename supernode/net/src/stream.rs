//! Reading and writing length-checked frames on QUIC streams: the length
//! is checked against the caller's cap, and (on connections we accepted)
//! reserved from the connection's budget, before the body is allocated.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use servent_proto::frame::{self, FrameError, HEADER_LEN};

use crate::gate::{Budget, Inbound};
use crate::transport::{FRAME_TIMEOUT, REQUEST_TIMEOUT};

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error("reading from the stream failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("writing to the stream failed: {0}")]
    Write(#[from] quinn::WriteError),
    /// No first frame within the request timeout. (The message quotes the
    /// default, [`REQUEST_TIMEOUT`], which is what nodes run with.)
    #[error("no message within {} s", REQUEST_TIMEOUT.as_secs())]
    Timeout,
    /// A frame's body did not follow its header within the frame timeout
    /// (default [`FRAME_TIMEOUT`], which the message quotes).
    #[error("frame not complete within {} s of its header", FRAME_TIMEOUT.as_secs())]
    FrameTimeout,
    #[error("a {len}-byte frame would exceed the bytes this connection or node may buffer")]
    OverBudget { len: usize },
}

impl From<quinn::ReadExactError> for StreamError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(_) => StreamError::Truncated,
            quinn::ReadExactError::ReadError(e) => StreamError::Read(e),
        }
    }
}

/// Reads one frame of at most `max` body bytes; `None` if the stream ended
/// cleanly before a new frame began. The length is checked before the body
/// buffer is allocated, and the body must follow within [`FRAME_TIMEOUT`].
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, StreamError> {
    read_frame_budgeted(recv, max, None, FRAME_TIMEOUT).await
}

/// Like [`read_frame`], on a stream of a connection we accepted: the body's
/// bytes are reserved from the connection's budget (and through it the
/// node's) before they are allocated, and given back once it is decoded.
/// The body must follow within the connection's frame timeout.
pub async fn read_frame_in<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    inbound: &Inbound,
) -> Result<Option<T>, StreamError> {
    let limit = inbound.timeouts.frame;
    let read = read_frame_budgeted(recv, max, Some(&inbound.budget), limit).await;
    if let Err(StreamError::OverBudget { .. }) = read {
        inbound.over_budget.inc();
    }
    read
}

async fn read_frame_budgeted<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    budget: Option<&Arc<Budget>>,
    frame_timeout: std::time::Duration,
) -> Result<Option<T>, StreamError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame::body_len(header, max)?;
    let _reserved = match budget {
        Some(b) => Some(b.try_reserve(len).ok_or(StreamError::OverBudget { len })?),
        None => None,
    };
    let mut body = vec![0u8; len];
    tokio::time::timeout(frame_timeout, recv.read_exact(&mut body))
        .await
        .map_err(|_| StreamError::FrameTimeout)??;
    Ok(Some(frame::decode(&body)?))
}

/// Like [`read_frame`], but the frame must come within `REQUEST_TIMEOUT`.
pub async fn read_first_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, StreamError> {
    tokio::time::timeout(REQUEST_TIMEOUT, read_frame(recv, max))
        .await
        .map_err(|_| StreamError::Timeout)?
}

/// Like [`read_frame_in`], but the frame must come within the connection's
/// request timeout.
pub async fn read_first_frame_in<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    inbound: &Inbound,
) -> Result<Option<T>, StreamError> {
    let limit = inbound.timeouts.request;
    tokio::time::timeout(limit, read_frame_in(recv, max, inbound))
        .await
        .map_err(|_| StreamError::Timeout)?
}

pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
    max: usize,
) -> Result<(), StreamError> {
    let bytes = frame::encode(msg, max)?;
    send.write_all(&bytes).await?;
    Ok(())
}
