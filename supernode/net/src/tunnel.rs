//! A QUIC path through a relay: a UDP socket whose datagrams travel as
//! length-prefixed frames on one QUIC stream (docs/PROTOCOL.md 10.6).
//!
//! Two leaves that can reach each other neither directly nor by a punch
//! each hold a stream to a supernode they are both attached to, and the
//! supernode splices the two streams. Each leaf binds an [`Endpoint`] on a
//! [`TunnelSocket`] over its stream and runs an ordinary QUIC handshake
//! through it: the connection is authenticated and encrypted end to end,
//! and the relay carries only its ciphertext.
//!
//! A frame is a 2-byte big-endian length (1 to [`MAX_TUNNEL_DATAGRAM`])
//! and that many bytes of one datagram. The socket behaves as UDP does
//! when it is overwhelmed: a datagram that finds [`QUEUED`] datagrams
//! waiting to be written is dropped, as is one that arrives while
//! [`QUEUED`] wait to be taken, and the inner connection's congestion
//! control backs off. Nothing it buffers grows without bound.
//!
//! [`Endpoint`]: crate::Endpoint

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Largest datagram a frame may carry (a UDP payload's largest).
pub const MAX_TUNNEL_DATAGRAM: usize = 65_527;
/// The datagram size a connection through a tunnel uses: no link limits
/// it, and every datagram costs the two ends and the relay a frame, an
/// encryption and an acknowledgement, so bigger ones carry more for the
/// same work.
pub const TUNNEL_MTU: u16 = 16 * 1024;
/// Datagrams each direction holds at most before it drops.
pub const QUEUED: usize = 256;
/// Most bytes of queued datagrams one write to the stream carries.
const WRITE_BATCH: usize = 64 * 1024;

/// The socket a tunnel's endpoint runs on. Every datagram comes from, and
/// goes to, the one peer at the far end of the tunnel.
pub struct TunnelSocket {
    local: SocketAddr,
    peer: SocketAddr,
    out: mpsc::Sender<Vec<u8>>,
    incoming: Mutex<mpsc::Receiver<Vec<u8>>>,
    dropped: Arc<AtomicU64>,
}

impl fmt::Debug for TunnelSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelSocket")
            .field("local", &self.local)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// A tunnel: its socket, and the task that carries its frames, which ends
/// when the stream does (then the socket neither sends nor receives).
pub struct Tunnel {
    pub socket: Arc<TunnelSocket>,
    pub carrier: JoinHandle<()>,
}

impl TunnelSocket {
    /// A tunnel over `send`/`recv`. `local` is the address the socket
    /// reports as its own, `peer` the one every datagram comes from (the
    /// relay's, in practice: it names the path, and nothing is sent to it
    /// but through the stream).
    pub fn open(
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Tunnel {
        // quinn on an IPv6 socket dials an IPv4 address as IPv4-mapped,
        // and takes datagrams only from the address it dialled.
        let peer = match (local, peer) {
            (SocketAddr::V6(_), SocketAddr::V4(p)) => {
                SocketAddr::new(p.ip().to_ipv6_mapped().into(), p.port())
            }
            (SocketAddr::V4(_), SocketAddr::V6(_)) => crate::canonical(peer),
            _ => peer,
        };
        let (out, mut out_rx) = mpsc::channel::<Vec<u8>>(QUEUED);
        let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(QUEUED);
        let dropped = Arc::new(AtomicU64::new(0));
        let socket = Arc::new(Self {
            local,
            peer,
            out,
            incoming: Mutex::new(in_rx),
            dropped: dropped.clone(),
        });
        let writer = async move {
            let mut batch = Vec::with_capacity(WRITE_BATCH);
            while let Some(d) = out_rx.recv().await {
                batch.clear();
                push_frame(&mut batch, &d);
                while batch.len() < WRITE_BATCH {
                    match out_rx.try_recv() {
                        Ok(d) => push_frame(&mut batch, &d),
                        Err(_) => break,
                    }
                }
                if send.write_all(&batch).await.is_err() {
                    return;
                }
            }
            let _ = send.finish();
        };
        let reader = async move {
            let mut len = [0u8; 2];
            loop {
                if recv.read_exact(&mut len).await.is_err() {
                    return;
                }
                let n = usize::from(u16::from_be_bytes(len));
                if n == 0 {
                    // Not a datagram: the far end does not speak this.
                    let _ = recv.stop(1u32.into());
                    return;
                }
                let mut d = vec![0u8; n];
                if recv.read_exact(&mut d).await.is_err() {
                    return;
                }
                if in_tx.try_send(d).is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        let carrier = tokio::spawn(async move {
            // Either direction ending ends the tunnel.
            tokio::select! {
                _ = writer => {}
                _ = reader => {}
            }
        });
        Tunnel { socket, carrier }
    }

    /// Datagrams dropped so far, either way, because a queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn send_one(&self, d: &[u8]) {
        if d.is_empty() || d.len() > MAX_TUNNEL_DATAGRAM || self.out.try_send(d.to_vec()).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn push_frame(batch: &mut Vec<u8>, d: &[u8]) {
    // `send_one` let through only lengths that fit two bytes.
    batch.extend_from_slice(&(d.len() as u16).to_be_bytes());
    batch.extend_from_slice(d);
}

/// Always writable: a datagram that does not fit is dropped, not waited on.
#[derive(Debug)]
struct Writable;

impl quinn::UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl quinn::AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(Writable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        match transmit.segment_size {
            Some(size) if size > 0 => transmit
                .contents
                .chunks(size)
                .for_each(|d| self.send_one(d)),
            _ => self.send_one(transmit.contents),
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut incoming = self.incoming.lock().expect("tunnel queue lock");
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let d = if n == 0 {
                match incoming.poll_recv(cx) {
                    Poll::Ready(Some(d)) => d,
                    // A closed tunnel delivers nothing more; the inner
                    // connection times out or is closed by its owner.
                    Poll::Ready(None) | Poll::Pending => return Poll::Pending,
                }
            } else {
                match incoming.try_recv() {
                    Ok(d) => d,
                    Err(_) => break,
                }
            };
            if d.len() > bufs[n].len() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            bufs[n][..d.len()].copy_from_slice(&d);
            meta[n] = RecvMeta {
                addr: self.peer,
                len: d.len(),
                stride: d.len(),
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{accept, Endpoint, Identity};
    use std::time::Duration;

    /// An outer connection between two endpoints on loopback, and one
    /// bidirectional stream on it, as each end has it.
    async fn stream_pair() -> (
        (Endpoint, Endpoint, quinn::Connection, quinn::Connection),
        (quinn::SendStream, quinn::RecvStream),
        (quinn::SendStream, quinn::RecvStream),
    ) {
        let id = || Arc::new(Identity::generate().unwrap());
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let server = Endpoint::bind(id(), local, &[b"outer/1"]).unwrap();
        let addr = server.local_addr().unwrap();
        let client = Endpoint::client(id(), addr).unwrap();
        let accepted = tokio::spawn({
            let server = server.clone();
            async move { accept(server.quinn().accept().await.unwrap()).await }
        });
        let a = client.connect(addr, b"outer/1", None).await.unwrap();
        let b = accepted.await.unwrap().unwrap();
        let (mut a_send, a_recv) = a.conn.open_bi().await.unwrap();
        // A stream exists for the far end once something is sent on it.
        a_send.write_all(b"x").await.unwrap();
        let (b_send, mut b_recv) = b.conn.accept_bi().await.unwrap();
        let mut x = [0u8; 1];
        b_recv.read_exact(&mut x).await.unwrap();
        (
            (server, client, a.conn, b.conn),
            (a_send, a_recv),
            (b_send, b_recv),
        )
    }

    #[tokio::test]
    async fn a_quic_connection_runs_authenticated_end_to_end_through_a_tunnel() {
        let (outer, (a_send, a_recv), (b_send, b_recv)) = stream_pair().await;
        let local = SocketAddr::from(([127, 0, 0, 1], 1));
        let far = SocketAddr::from(([127, 0, 0, 1], 2));
        let a = TunnelSocket::open(a_send, a_recv, local, far);
        let b = TunnelSocket::open(b_send, b_recv, far, local);
        let a_id = Arc::new(Identity::generate().unwrap());
        let b_id = Arc::new(Identity::generate().unwrap());
        let (a_expect, b_expect) = (a_id.id(), b_id.id());
        // At the tunnel's datagram size, as leaves' tunnels run.
        let t = || crate::TransportConfig {
            initial_mtu: TUNNEL_MTU,
            ..Default::default()
        };
        let inner_a = Endpoint::bind_socket_with(a_id, a.socket.clone(), &[], t()).unwrap();
        let inner_b =
            Endpoint::bind_socket_with(b_id, b.socket.clone(), &[b"inner/1"], t()).unwrap();

        const LEN: usize = 8 << 20;
        let served = tokio::spawn({
            let inner_b = inner_b.clone();
            async move {
                let peer = accept(inner_b.quinn().accept().await.unwrap())
                    .await
                    .unwrap();
                assert_eq!(peer.id, a_expect, "the tunnel's far end is who dialled");
                let (mut send, _recv) = peer.conn.accept_bi().await.unwrap();
                let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
                send.write_all(&data).await.unwrap();
                send.finish().unwrap();
                let _ = send.stopped().await;
                peer
            }
        });
        let peer = match inner_a.connect(far, b"inner/1", Some(b_expect)).await {
            Ok(p) => p,
            Err(e) => panic!("{e}: dropped {} {}", a.socket.dropped(), b.socket.dropped()),
        };
        let (mut send, mut recv) = peer.conn.open_bi().await.unwrap();
        send.write_all(b"go").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(30), recv.read_to_end(LEN + 1))
            .await
            .expect("8 MiB through the tunnel within 30 s")
            .unwrap();
        assert_eq!(got.len(), LEN);
        assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        let _server_side = served.await.unwrap();

        // The carrier ends with the stream under it; the tunnel then
        // carries nothing.
        let (_server, _client, outer_a, _outer_b) = outer;
        outer_a.close(0u32.into(), b"done");
        let ended = tokio::time::timeout(Duration::from_secs(10), a.carrier).await;
        assert!(ended.is_ok(), "the carrier ends when its stream does");
    }

    #[tokio::test]
    async fn a_zero_length_frame_ends_the_tunnel() {
        let (_outer, (a_send, a_recv), (mut b_send, _b_recv)) = stream_pair().await;
        let local = SocketAddr::from(([127, 0, 0, 1], 1));
        let a = TunnelSocket::open(a_send, a_recv, local, local);
        b_send.write_all(&[0, 0]).await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), a.carrier).await;
        assert!(
            ended.is_ok(),
            "the carrier ends at a frame that is no datagram"
        );
    }
}
