//! The timings and limits of every QUIC connection a node makes or
//! accepts, in one place: [`TransportConfig`]. Its defaults are the values
//! docs/PROTOCOL.md states; tests and the simulator may shrink them.

use std::time::Duration;

/// Keep-alive interval: QUIC's default is none, and NAT bindings and
/// supernode leases both need traffic.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);
/// A peer silent for this long is gone: its index entries are dropped and
/// its leaves re-home. Three missed keep-alives: quick enough that a dead
/// supernode is replaced within seconds, slow enough to ride out a burst of
/// packet loss.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(6);
/// Concurrent bidirectional streams a peer may open: enough for a mesh
/// neighbour's query traffic (each query is a stream for up to ~3 s).
pub const MAX_STREAMS: u32 = 256;
/// Longest wait for a handshake to finish.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the first frame of a stream.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a frame may take to arrive whole once its header has, on every
/// stream: a half-sent frame must not hold its buffer for the life of the
/// connection.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// How an [`Endpoint`](crate::Endpoint) runs its connections. Every field
/// defaults to the constant of the same name in this module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportConfig {
    /// Interval of QUIC keep-alive pings. Default [`KEEP_ALIVE`], 2 s.
    pub keep_alive: Duration,
    /// Silence after which a connection is dead (the QUIC idle timeout,
    /// and so the lease of a leaf and of a mesh link). Default
    /// [`IDLE_TIMEOUT`], 6 s. Must fit a QUIC varint of milliseconds.
    pub idle_timeout: Duration,
    /// Bidirectional streams the peer may have open at once. Default
    /// [`MAX_STREAMS`], 256.
    pub max_streams: u32,
    /// Longest wait for a handshake, dialling or accepting. Default
    /// [`CONNECT_TIMEOUT`], 5 s.
    pub connect_timeout: Duration,
    /// Longest wait for the first frame of a stream we accepted. Default
    /// [`REQUEST_TIMEOUT`], 10 s.
    pub request_timeout: Duration,
    /// Longest wait for the rest of a frame once its header is in.
    /// Default [`FRAME_TIMEOUT`], 10 s.
    pub frame_timeout: Duration,
    /// UDP payload a connection starts with once the handshake is done
    /// (and the most MTU discovery tries). Default 1 200 B, QUIC's minimum; a relay tunnel's
    /// inner connection, which no link MTU limits, starts at
    /// [`crate::tunnel::TUNNEL_MTU`].
    pub initial_mtu: u16,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            keep_alive: KEEP_ALIVE,
            idle_timeout: IDLE_TIMEOUT,
            max_streams: MAX_STREAMS,
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            frame_timeout: FRAME_TIMEOUT,
            initial_mtu: 1200,
        }
    }
}

impl TransportConfig {
    /// The stream timings alone, as the streams of an accepted connection
    /// carry them (see [`Inbound`](crate::gate::Inbound)).
    pub fn streams(&self) -> StreamTimeouts {
        StreamTimeouts {
            request: self.request_timeout,
            frame: self.frame_timeout,
        }
    }

    /// Flow-control and stream limits for connections we accept: small,
    /// since what peers send us is requests and file lists, and one peer
    /// must not pin much memory.
    pub(crate) fn server(&self) -> quinn::TransportConfig {
        let mut t = self.base();
        t.max_concurrent_bidi_streams(self.max_streams.into())
            .stream_receive_window((1u32 << 20).into())
            .receive_window((2u32 << 20).into());
        t
    }

    /// Flow-control for connections we open: large receive windows, since
    /// this is the side that downloads.
    pub(crate) fn client(&self) -> quinn::TransportConfig {
        let mut t = self.base();
        // Mesh neighbours we dialled send us their queries on this connection.
        t.max_concurrent_bidi_streams(self.max_streams.into())
            .stream_receive_window((16u32 << 20).into())
            .receive_window((32u32 << 20).into());
        t
    }

    fn base(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        // A timeout too long for a varint (over 2^62 ms) means none at all.
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout).ok();
        t.max_concurrent_uni_streams(0u32.into())
            .send_window(16 << 20)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(idle);
        if self.initial_mtu > 1200 {
            let mut discovery = quinn::MtuDiscoveryConfig::default();
            discovery.upper_bound(self.initial_mtu);
            // The initial congestion window must hold whole datagrams of
            // that size: 10 of them, as it holds 10 of the least.
            let mut cubic = quinn::congestion::CubicConfig::default();
            cubic.initial_window(10 * u64::from(self.initial_mtu));
            t.initial_mtu(self.initial_mtu)
                .mtu_discovery_config(Some(discovery))
                .congestion_controller_factory(std::sync::Arc::new(cubic));
        }
        t
    }
}

/// The two waits of a stream's frames: for its first frame, and for the
/// rest of any frame whose header is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTimeouts {
    /// Default [`REQUEST_TIMEOUT`].
    pub request: Duration,
    /// Default [`FRAME_TIMEOUT`].
    pub frame: Duration,
}

impl Default for StreamTimeouts {
    fn default() -> Self {
        TransportConfig::default().streams()
    }
}
