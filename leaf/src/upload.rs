//! Serving downloads (ALPN `servent-xfer/3`, the source side): shared
//! files, and the verified ranges of downloads in progress.
//!
//! A request names content by hash, never by path, so a downloader can
//! only ever get what this leaf announced. The request is read and checked
//! before anything is held for it: a bad or unknown request is answered at
//! once, `Layer` and `Have` need no upload slot, and only `Range` waits for
//! one of the [`MAX_CONCURRENT_UPLOADS`] slots, for at most
//! [`UploadTimings::queue_wait`]
//! (less than a downloader waits for an answer, so it hears `Unavailable`
//! instead of timing out). Each downloader may have only so many requests
//! open (per node id and per address, [`servent_proto::upload`]), and an
//! upload whose downloader stops reading gives its slot back after
//! [`UploadTimings::write_stall`]: so one peer that opens streams and never reads them
//! cannot stop others downloading.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use servent_net::gate::Inbound;
use servent_net::{self as net, Peer};
use servent_proto::limits::MAX_TRANSFER_FRAME;
use servent_proto::msg::{ErrorCode, ErrorReply, GetReply, GetRequest, RangeRequest};
use servent_proto::rate::TokenBucket;
use servent_proto::upload::{UploadLimits, UploadLoad};
use servent_proto::{ContentHash, NodeId};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, warn, Instrument};

use crate::layer::{self, CV_LEN, RANGE_SIZE};
use crate::partial::{part_path, Bitmap, Partial};
use crate::share::Share;

/// Bytes read from disk at a time when serving.
const READ: usize = 256 * 1024;
/// The unit the upload rate cap grants, small enough to interleave capped
/// uploads finely.
const CHUNK: usize = 64 * 1024;
/// Reads in flight between the disk thread and the network task.
const PIPELINE: usize = 4;
/// Uploads served at once; more wait their turn.
pub const MAX_CONCURRENT_UPLOADS: usize = 16;

/// The timings of serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadTimings {
    /// An upload whose downloader accepts nothing for this long is dropped
    /// and its slot given to the next: an honest downloader reads as fast
    /// as it verifies, far within this. Default 4 s.
    pub write_stall: Duration,
    /// Longest a `Range` waits for a slot before it is answered
    /// `Unavailable`: well within the 10 s a downloader waits for the
    /// answer. Default 4 s.
    pub queue_wait: Duration,
    /// Longest an upload waits, after its last byte, for the downloader to
    /// acknowledge it (it holds no slot meanwhile). Default 10 s.
    pub finish_wait: Duration,
}

impl Default for UploadTimings {
    fn default() -> Self {
        Self {
            write_stall: Duration::from_secs(4),
            queue_wait: Duration::from_secs(4),
            finish_wait: Duration::from_secs(10),
        }
    }
}
/// The upload rate cap's burst, as a share of a second's worth.
const BURST_SECS: f64 = 0.1;

/// The upload side of a leaf: its slots, its rate limit, and what it has
/// served.
#[derive(Debug)]
pub struct Uploads {
    slots: Semaphore,
    /// Requests open per downloader (node id and address).
    load: Mutex<UploadLoad>,
    /// Bytes a second for all uploads together, if capped. The mutex is
    /// tokio's, which queues waiters in order: uploads take their turn at
    /// the bucket, so each gets its share of the rate.
    rate: Option<tokio::sync::Mutex<TokenBucket>>,
    /// Ranges sent whole.
    pub served: Counter,
    /// Bytes of file content in the ranges sent whole.
    pub bytes: Counter,
    /// Requests answered `Unavailable` because their downloader had its
    /// share open already or no slot came free in time.
    pub refused: Counter,
    timings: UploadTimings,
}

impl Default for Uploads {
    fn default() -> Self {
        Self::new(None, UploadLimits::default())
    }
}

impl Uploads {
    /// Uploads capped at `max_rate` bytes a second in all, if given (with a
    /// burst of a tenth of a second's worth, at least one read), and at
    /// `limits` requests open per downloader.
    pub fn new(max_rate: Option<u64>, limits: UploadLimits) -> Self {
        let rate = max_rate.filter(|r| *r > 0).map(|r| {
            let burst = (r as f64 * BURST_SECS).clamp(CHUNK as f64, u32::MAX as f64) as u32;
            tokio::sync::Mutex::new(TokenBucket::new(r as f64, burst, Instant::now()))
        });
        Self {
            slots: Semaphore::new(MAX_CONCURRENT_UPLOADS),
            load: Mutex::new(UploadLoad::new(limits)),
            rate,
            served: Counter::default(),
            bytes: Counter::default(),
            refused: Counter::default(),
            timings: UploadTimings::default(),
        }
    }

    /// Ranges being served now.
    pub fn active(&self) -> usize {
        MAX_CONCURRENT_UPLOADS.saturating_sub(self.slots.available_permits())
    }

    /// These uploads with `timings` instead of the defaults.
    pub fn with_timings(mut self, timings: UploadTimings) -> Self {
        self.timings = timings;
        self
    }

    /// Waits until `bytes` more may be sent under the rate cap.
    async fn pace(&self, bytes: usize) {
        if let Some(rate) = &self.rate {
            // Held while waiting: the next upload in the queue goes after.
            let mut bucket = rate.lock().await;
            let wait = bucket.take_many(bytes as f64, Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Serves downloads on one accepted connection until it closes.
pub async fn serve(share: Arc<Share>, uploads: Arc<Uploads>, peer: Peer, inbound: Inbound) {
    let who = Downloader {
        id: peer.id,
        ip: peer.conn.remote_address().ip().to_canonical(),
    };
    loop {
        let (send, recv) = match peer.conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(reason = %e, "transfer connection ended");
                return;
            }
        };
        let (share, uploads, inbound) = (share.clone(), uploads.clone(), inbound.clone());
        tokio::spawn(
            async move {
                let _active = inbound.stream();
                if let Err(e) = serve_stream(share, uploads, who, &inbound, send, recv).await {
                    debug!(error = %e, "upload ended early");
                }
            }
            .in_current_span(),
        );
    }
}

/// What a request is served from.
enum Content {
    /// A shared file, checked unchanged since it was hashed.
    Whole {
        file: std::fs::File,
        size: u64,
        layer: PathBuf,
    },
    /// A download in progress: only its verified ranges, as its state
    /// file lists them when the request came.
    Partial {
        partial: Partial,
        file: std::fs::File,
        have: Bitmap,
    },
}

impl Content {
    fn open(share: &Share, hash: &ContentHash) -> Option<Self> {
        if let Some(f) = share.get(hash) {
            match share.open_verified(&f) {
                Ok(file) => {
                    return Some(Content::Whole {
                        file,
                        size: f.stamp.size,
                        layer: share.layer_path(hash),
                    })
                }
                Err(e) => debug!(path = %f.path.display(), error = %e, "refusing a shared file"),
            }
        }
        let partial = share.partial(hash)?;
        let file = std::fs::File::open(part_path(&partial.target)).ok()?;
        let have = partial.have();
        Some(Content::Partial {
            partial,
            file,
            have,
        })
    }

    fn size(&self) -> u64 {
        match self {
            Content::Whole { size, .. } => *size,
            Content::Partial { partial, .. } => partial.size,
        }
    }
}

/// Who a request comes from, for the per-downloader caps.
#[derive(Debug, Clone, Copy)]
struct Downloader {
    id: NodeId,
    ip: IpAddr,
}

/// A request counted against its downloader's caps until dropped.
struct Open<'a> {
    uploads: &'a Uploads,
    who: Downloader,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if let Ok(mut load) = self.uploads.load.lock() {
            load.end(self.who.id, self.who.ip);
        }
    }
}

async fn serve_stream(
    share: Arc<Share>,
    uploads: Arc<Uploads>,
    who: Downloader,
    inbound: &Inbound,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), net::StreamError> {
    let req: GetRequest =
        match net::read_first_frame_in(&mut recv, MAX_TRANSFER_FRAME, inbound).await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) => {
                return refuse(
                    &mut send,
                    ErrorCode::BadRequest,
                    format!("bad request: {e}"),
                )
                .await
            }
        };
    let hash = match &req {
        GetRequest::Layer(h) | GetRequest::Have(h) => *h,
        GetRequest::Range(r) => r.hash,
    };
    // Checked before anything is opened or waited for.
    let begun = uploads
        .load
        .lock()
        .expect("upload load")
        .try_begin(who.id, who.ip);
    if let Err(busy) = begun {
        uploads.refused.inc();
        return refuse(
            &mut send,
            ErrorCode::Unavailable,
            format!("{busy}: wait for one to end"),
        )
        .await;
    }
    let _open = Open {
        uploads: &uploads,
        who,
    };
    let opened = {
        let share = share.clone();
        tokio::task::spawn_blocking(move || Content::open(&share, &hash))
            .await
            .ok()
            .flatten()
    };
    let Some(content) = opened else {
        return refuse(
            &mut send,
            ErrorCode::NotFound,
            format!("{hash} is not shared here"),
        )
        .await;
    };
    match req {
        GetRequest::Layer(_) | GetRequest::Have(_) => {
            let with_layer = matches!(req, GetRequest::Layer(_));
            let tail = tokio::task::spawn_blocking(move || ranges_tail(&content, with_layer))
                .await
                .map_err(|_| net::StreamError::Truncated)?;
            let (size, partial, tail) = match tail {
                Ok(t) => t,
                Err(e) => {
                    warn!(%hash, error = %e, "cannot read the layer of a shared file");
                    return refuse(&mut send, ErrorCode::Internal, "layer unreadable".into()).await;
                }
            };
            net::write_frame(
                &mut send,
                &GetReply::Ranges { size, partial },
                MAX_TRANSFER_FRAME,
            )
            .await?;
            send.write_all(&tail)
                .await
                .map_err(|_| net::StreamError::Truncated)?;
            let _ = send.finish();
            Ok(())
        }
        GetRequest::Range(r) => {
            // Only content bytes take a slot, and only for so long.
            let permit =
                match tokio::time::timeout(uploads.timings.queue_wait, uploads.slots.acquire())
                    .await
                {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Ok(()),
                    Err(_) => {
                        uploads.refused.inc();
                        let msg = "every upload slot is busy: try again later".to_string();
                        return refuse(&mut send, ErrorCode::Unavailable, msg).await;
                    }
                };
            serve_range(&uploads, permit, content, r, send).await
        }
    }
}

async fn refuse(
    send: &mut quinn::SendStream,
    code: ErrorCode,
    message: String,
) -> Result<(), net::StreamError> {
    let reply = GetReply::Error(ErrorReply::new(code, message));
    net::write_frame(send, &reply, MAX_TRANSFER_FRAME).await?;
    let _ = send.finish();
    Ok(())
}

/// Size, partial, and what follows a `Ranges` reply: the layer (if asked
/// for) and, from a partial source, its have-bitmap.
fn ranges_tail(content: &Content, with_layer: bool) -> std::io::Result<(u64, bool, Vec<u8>)> {
    let mut tail = Vec::new();
    match content {
        Content::Whole { size, layer, .. } => {
            if with_layer {
                tail = std::fs::read(layer)?;
                if tail.len() != layer::range_count(*size) * CV_LEN {
                    return Err(std::io::Error::other("layer of the wrong length"));
                }
            }
            Ok((*size, false, tail))
        }
        Content::Partial { partial, have, .. } => {
            if with_layer {
                tail = layer::to_bytes(&partial.layer);
            }
            tail.extend_from_slice(have.as_bytes());
            Ok((partial.size, true, tail))
        }
    }
}

async fn serve_range(
    uploads: &Uploads,
    permit: tokio::sync::SemaphorePermit<'_>,
    content: Content,
    req: RangeRequest,
    mut send: quinn::SendStream,
) -> Result<(), net::StreamError> {
    let size = content.size();
    if req.offset > size {
        let msg = format!("offset {} is past the end ({size} bytes)", req.offset);
        return refuse(&mut send, ErrorCode::BadRequest, msg).await;
    }
    let length = req.length.unwrap_or(u64::MAX).min(size - req.offset);
    let offset = req.offset;
    let file = match content {
        Content::Whole { file, .. } => file,
        Content::Partial { file, have, .. } => {
            let first = (offset / RANGE_SIZE) as usize;
            let last = ((offset + length).saturating_sub(1) / RANGE_SIZE) as usize;
            if !(first..=last.max(first)).all(|i| have.get(i)) {
                let msg = "not all of that range is here yet".to_string();
                return refuse(&mut send, ErrorCode::Unavailable, msg).await;
            }
            file
        }
    };
    debug!(hash = %req.hash.short(), offset, length, "upload");
    net::write_frame(
        &mut send,
        &GetReply::Ok { size, length },
        MAX_TRANSFER_FRAME,
    )
    .await?;

    // Disk reads on a blocking thread, network writes here, overlapped.
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(PIPELINE);
    tokio::task::spawn_blocking(move || read_range(&file, offset, length, tx));
    let mut sent = 0;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.map_err(|e| {
            warn!(error = %e, "reading a shared file failed");
            let _ = send.reset(1u32.into());
            net::StreamError::Truncated
        })?;
        sent += chunk.len() as u64;
        let mut chunk = chunk;
        while !chunk.is_empty() {
            let piece = match uploads.rate {
                Some(_) => chunk.split_to(CHUNK.min(chunk.len())),
                None => std::mem::take(&mut chunk),
            };
            uploads.pace(piece.len()).await;
            // A downloader that stops reading must not hold an upload slot
            // forever.
            match tokio::time::timeout(uploads.timings.write_stall, send.write_chunk(piece)).await {
                Ok(r) => r?,
                Err(_) => {
                    let _ = send.reset(2u32.into());
                    return Err(net::StreamError::Timeout);
                }
            }
        }
    }
    if sent != length {
        // The file shrank under us: never a short range that looks whole.
        let _ = send.reset(1u32.into());
        return Err(net::StreamError::Truncated);
    }
    let _ = send.finish();
    uploads.served.inc();
    uploads.bytes.inc_by(length);
    // The bytes are sent; waiting for their acknowledgement needs no slot.
    drop(permit);
    let _ = tokio::time::timeout(uploads.timings.finish_wait, send.stopped()).await;
    Ok(())
}

/// Reads `length` bytes from `offset` in [`READ`] pieces until the end
/// or the receiver goes away. A short file ends early (the caller checks).
fn read_range(
    file: &std::fs::File,
    offset: u64,
    length: u64,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
) {
    let mut at = 0;
    while at < length {
        let want = READ.min((length - at) as usize);
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match crate::pio::read_at(file, &mut buf[filled..], offset + at + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
        buf.truncate(filled);
        at += filled as u64;
        if filled == 0 || tx.blocking_send(Ok(Bytes::from(buf))).is_err() || filled < want {
            return;
        }
    }
}
