//! Leaf ↔ leaf transfer (ALPN `servent-xfer/1`): serving shared files, and
//! downloading one from its sources.
//!
//! A request names content by hash, never by path, so a downloader can only
//! ever get what this leaf announced. Ranged requests make downloads
//! resumable. The downloader hashes every byte as it arrives and renames its
//! partial file into place only when the whole content matches the hash.

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use servent_proto::limits::MAX_TRANSFER_FRAME;
use servent_proto::msg::{ErrorCode, ErrorReply, GetReply, GetRequest, Source, ALPN_TRANSFER};
use servent_proto::ContentHash;
use supernode::net::{self, Endpoint, Peer};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn, Instrument};

use crate::share::{Share, PART_SUFFIX};

/// Bytes read from disk (or written to it) at a time.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the disk thread and the network task.
const PIPELINE: usize = 16;
/// An upload whose downloader accepts nothing for this long is dropped.
const WRITE_STALL: std::time::Duration = std::time::Duration::from_secs(30);
/// Uploads served at once; more wait their turn.
pub const MAX_CONCURRENT_UPLOADS: usize = 16;

/// The upload side of a leaf: its slots, and what it has served.
#[derive(Debug)]
pub struct Uploads {
    slots: Semaphore,
    /// Uploads sent whole (a range counts as one).
    pub served: Counter,
    /// Bytes of file content sent, whole uploads or not.
    pub bytes: Counter,
}

impl Default for Uploads {
    fn default() -> Self {
        Self {
            slots: Semaphore::new(MAX_CONCURRENT_UPLOADS),
            served: Counter::default(),
            bytes: Counter::default(),
        }
    }
}

/// Serves downloads on one accepted connection until it closes.
pub async fn serve(share: Arc<Share>, uploads: Arc<Uploads>, peer: Peer) {
    loop {
        let (send, recv) = match peer.conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(reason = %e, "transfer connection ended");
                return;
            }
        };
        let share = share.clone();
        let uploads = uploads.clone();
        tokio::spawn(
            async move {
                if let Err(e) = serve_stream(share, uploads, send, recv).await {
                    debug!(error = %e, "upload ended early");
                }
            }
            .in_current_span(),
        );
    }
}

async fn serve_stream(
    share: Arc<Share>,
    uploads: Arc<Uploads>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), net::StreamError> {
    let refuse = |code, msg: String| GetReply::Error(ErrorReply::new(code, msg));
    let req: GetRequest = match net::read_first_frame(&mut recv, MAX_TRANSFER_FRAME).await {
        Ok(Some(r)) => r,
        Ok(None) => return Ok(()),
        Err(e) => {
            let reply = refuse(ErrorCode::BadRequest, format!("bad request: {e}"));
            net::write_frame(&mut send, &reply, MAX_TRANSFER_FRAME).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let Ok(_permit) = uploads.slots.acquire().await else {
        return Ok(());
    };
    let opened = share
        .get(&req.hash)
        .ok_or(())
        .and_then(|f| match share.open_verified(&f) {
            Ok(h) => Ok((f, h)),
            Err(e) => {
                debug!(path = %f.path.display(), error = %e, "refusing a shared file");
                Err(())
            }
        });
    let (file, handle) = match opened {
        Ok(x) => x,
        Err(()) => {
            let reply = refuse(
                ErrorCode::NotFound,
                format!("{} is not shared here", req.hash),
            );
            net::write_frame(&mut send, &reply, MAX_TRANSFER_FRAME).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let size = file.stamp.size;
    if req.offset > size {
        let reply = refuse(
            ErrorCode::BadRequest,
            format!("offset {} is past the end ({size} bytes)", req.offset),
        );
        net::write_frame(&mut send, &reply, MAX_TRANSFER_FRAME).await?;
        let _ = send.finish();
        return Ok(());
    }
    let length = req.length.unwrap_or(u64::MAX).min(size - req.offset);
    debug!(hash = %req.hash.short(), offset = req.offset, length, "upload");
    net::write_frame(
        &mut send,
        &GetReply::Ok { size, length },
        MAX_TRANSFER_FRAME,
    )
    .await?;

    // Disk reads on a blocking thread, network writes here, overlapped.
    let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(PIPELINE);
    let offset = req.offset;
    tokio::task::spawn_blocking(move || read_range(handle, offset, length, tx));
    let mut sent = 0u64;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.map_err(|e| {
            warn!(error = %e, "reading a shared file failed");
            let _ = send.reset(1u32.into());
            net::StreamError::Truncated
        })?;
        sent += chunk.len() as u64;
        uploads.bytes.inc_by(chunk.len() as u64);
        // A downloader that stops reading must not hold an upload slot forever.
        match tokio::time::timeout(WRITE_STALL, send.write_chunk(chunk)).await {
            Ok(r) => r?,
            Err(_) => {
                let _ = send.reset(2u32.into());
                return Err(net::StreamError::Timeout);
            }
        }
    }
    if sent != length {
        // The file shrank under us: do not pretend the range is complete.
        let _ = send.reset(1u32.into());
        return Err(net::StreamError::Truncated);
    }
    let _ = send.finish();
    uploads.served.inc();
    let _ = send.stopped().await;
    Ok(())
}

fn read_range(
    mut f: std::fs::File,
    offset: u64,
    length: u64,
    tx: mpsc::Sender<std::io::Result<Bytes>>,
) {
    if let Err(e) = f.seek(SeekFrom::Start(offset)) {
        let _ = tx.blocking_send(Err(e));
        return;
    }
    let mut left = length;
    while left > 0 {
        let want = CHUNK.min(left as usize);
        let mut buf = vec![0u8; want];
        let n = match f.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        buf.truncate(n);
        left -= n as u64;
        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
            return;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("no source for {0}")]
    NoSource(ContentHash),
    #[error("every source failed; last: {0}")]
    SourcesFailed(String),
    #[error(
        "hash mismatch: source {source_id} sent content that is not {hash}; nothing was written"
    )]
    HashMismatch {
        hash: ContentHash,
        source_id: String,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Why one source did not deliver.
#[derive(Debug, thiserror::Error)]
enum SourceError {
    #[error(transparent)]
    Connect(#[from] net::ConnectError),
    #[error("source {addr} refused: {reply}")]
    Refused { addr: String, reply: ErrorReply },
    #[error("source {addr} went away: {reason}")]
    Gone { addr: String, reason: String },
    #[error("source {addr} broke the protocol: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("source {addr} sent content that does not match the hash")]
    Mismatch { addr: String },
    #[error("bad source address {0:?}")]
    Addr(String),
    #[error("cannot write the partial file: {0}")]
    Io(std::io::Error),
}

/// The partial file beside `target`: `.NAME.servent-part`.
pub fn part_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}{PART_SUFFIX}"))
}

/// Downloads `hash` from the first source that delivers, into `target`.
/// Resumes from a partial file left by an earlier attempt; writes `target`
/// only once every byte matches the hash.
pub async fn download(
    endpoint: &Endpoint,
    hash: ContentHash,
    sources: &[Source],
    target: &Path,
) -> Result<u64, GetError> {
    if sources.is_empty() {
        return Err(GetError::NoSource(hash));
    }
    let part = part_path(target);
    let io_err = |source| GetError::Io {
        path: part.display().to_string(),
        source,
    };
    let mut last = String::new();
    for source in sources {
        let span = tracing::info_span!("get", source = %source.id.short(), addr = %source.addr);
        match fetch_from(endpoint, hash, source, &part)
            .instrument(span)
            .await
        {
            Ok(size) => {
                std::fs::rename(&part, target).map_err(|source| GetError::Io {
                    path: target.display().to_string(),
                    source,
                })?;
                info!(%hash, size, target = %target.display(), "downloaded and verified");
                return Ok(size);
            }
            Err(SourceError::Mismatch { .. }) => {
                // Bad bytes are not kept to resume from.
                std::fs::remove_file(&part).map_err(io_err)?;
                return Err(GetError::HashMismatch {
                    hash,
                    source_id: source.id.to_string(),
                });
            }
            Err(SourceError::Io(e)) => return Err(io_err(e)),
            Err(e) => {
                warn!(source = %source.id.short(), error = %e, "source failed");
                last = e.to_string();
            }
        }
    }
    Err(GetError::SourcesFailed(last))
}

async fn fetch_from(
    endpoint: &Endpoint,
    hash: ContentHash,
    source: &Source,
    part: &Path,
) -> Result<u64, SourceError> {
    let addr: SocketAddr = source
        .addr
        .parse()
        .map_err(|_| SourceError::Addr(source.addr.clone()))?;
    let gone = |reason: String| SourceError::Gone {
        addr: source.addr.clone(),
        reason,
    };
    let protocol = |reason: String| SourceError::Protocol {
        addr: source.addr.clone(),
        reason,
    };

    // Resume: hash what an earlier attempt left, then ask for the rest.
    let (file, hasher, have) = {
        let part = part.to_path_buf();
        tokio::task::spawn_blocking(move || open_part(&part))
            .await
            .map_err(|e| SourceError::Io(std::io::Error::other(e)))?
            .map_err(SourceError::Io)?
    };
    let peer = endpoint
        .connect(addr, ALPN_TRANSFER, Some(source.id))
        .await?;
    let (mut send, mut recv) = peer.conn.open_bi().await.map_err(|e| gone(e.to_string()))?;
    let req = GetRequest {
        hash,
        offset: have,
        length: None,
    };
    net::write_frame(&mut send, &req, MAX_TRANSFER_FRAME)
        .await
        .map_err(|e| gone(e.to_string()))?;
    let _ = send.finish();
    let (size, length) =
        match net::read_first_frame::<GetReply>(&mut recv, MAX_TRANSFER_FRAME).await {
            Ok(Some(GetReply::Ok { size, length })) => (size, length),
            Ok(Some(GetReply::Error(reply))) => {
                return Err(SourceError::Refused {
                    addr: source.addr.clone(),
                    reply,
                })
            }
            Ok(None) => return Err(gone("stream ended before a reply".into())),
            Err(e) => return Err(protocol(e.to_string())),
        };
    if have.checked_add(length) != Some(size) {
        return Err(protocol(format!(
            "offered {length} bytes from {have} of a {size}-byte file"
        )));
    }
    if have > 0 {
        info!(have, size, "resuming");
    }

    // Network reads here; hashing and disk writes on a blocking thread.
    // QUIC hands data over a packet (about 1.2 kB) at a time: gathering it
    // into CHUNK-sized buffers wakes the writer once per CHUNK instead of
    // once per packet, lets BLAKE3 hash many of its chunks at once, and
    // writes with one system call.
    let (tx, rx) = mpsc::channel::<Bytes>(PIPELINE);
    let writer = tokio::task::spawn_blocking(move || write_part(file, hasher, rx));
    let mut received = 0u64;
    let mut failure = None;
    let mut batch = BytesMut::with_capacity(CHUNK);
    loop {
        match recv.read_chunk(CHUNK - batch.len(), true).await {
            Ok(Some(chunk)) => {
                received += chunk.bytes.len() as u64;
                if received > length {
                    failure = Some(protocol("sent more bytes than announced".into()));
                    break;
                }
                batch.extend_from_slice(&chunk.bytes);
                if batch.len() == CHUNK {
                    let full = std::mem::replace(&mut batch, BytesMut::with_capacity(CHUNK));
                    if tx.send(full.freeze()).await.is_err() {
                        break;
                    }
                }
            }
            Ok(None) => break,
            Err(e) => {
                failure = Some(gone(e.to_string()));
                break;
            }
        }
    }
    // What came before a failure is good to resume from.
    if !batch.is_empty() {
        let _ = tx.send(batch.freeze()).await;
    }
    drop(tx);
    let (hasher, write_result) = writer
        .await
        .map_err(|e| SourceError::Io(std::io::Error::other(e)))?;
    write_result.map_err(SourceError::Io)?;
    if let Some(f) = failure {
        return Err(f);
    }
    if received != length {
        return Err(gone(format!(
            "stream ended after {received} of {length} bytes"
        )));
    }
    if ContentHash(*hasher.finalize().as_bytes()) != hash {
        return Err(SourceError::Mismatch {
            addr: source.addr.clone(),
        });
    }
    peer.conn.close(0u32.into(), b"done");
    Ok(size)
}

/// Opens (or creates) the partial file and hashes what it already holds.
fn open_part(part: &Path) -> std::io::Result<(std::fs::File, blake3::Hasher, u64)> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(part)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut have = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        have += n as u64;
    }
    file.seek(SeekFrom::Start(have))?;
    Ok((file, hasher, have))
}

fn write_part(
    mut file: std::fs::File,
    mut hasher: blake3::Hasher,
    mut rx: mpsc::Receiver<Bytes>,
) -> (blake3::Hasher, std::io::Result<()>) {
    while let Some(chunk) = rx.blocking_recv() {
        hasher.update(&chunk);
        if let Err(e) = file.write_all(&chunk) {
            return (hasher, Err(e));
        }
    }
    let result = file.sync_data();
    (hasher, result)
}
