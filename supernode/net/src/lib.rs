//! The plumbing every Servent node uses, supernode and leaf alike: what
//! carries the protocol's messages between a node's cores and its sockets.
//! It holds no rule of the network (those are in `servent_proto`) and
//! nothing of one node kind (those are in the `supernode` and `leaf`
//! crates).
//!
//! Module map:
//! - [`identity`]: the persistent key pair and the certificate carrying it;
//! - [`tls`]: the certificate verifier both ends of a connection use;
//! - [`transport`]: the timings and limits of QUIC connections
//!   ([`TransportConfig`]);
//! - [`endpoint`]: QUIC endpoints, dialling by ALPN, the authenticated
//!   [`Peer`] of a connection;
//! - [`stream`]: length-checked frames on QUIC streams;
//! - [`gate`]: admission of incoming connections, the idle rule, frame
//!   budgets;
//! - [`router`]: the accept loop, dispatching each connection by ALPN to one
//!   [`ProtocolHandler`];
//! - [`http`]: the `/status` and `/metrics` server;
//! - [`lan`]: announcing and hearing nodes on the LAN (mDNS/DNS-SD);
//! - [`shutdown`] and [`log`]: signals, logging and the `error:` line of
//!   the binaries.
//!
//! The items of `identity`, `endpoint`, `stream` and `transport` are also
//! at the crate root, where the node crates use them (`net::Endpoint`,
//! `net::read_frame`, ...).

pub mod endpoint;
pub mod gate;
pub mod http;
pub mod identity;
pub mod lan;
pub mod log;
pub mod router;
pub mod shutdown;
pub mod stream;
pub mod tls;
pub mod transport;
pub mod tunnel;

pub use endpoint::{
    accept, accept_within, alpn, canonical, peer_id, ConnectError, Endpoint, EndpointError, Peer,
};
pub use identity::{node_id_from_cert, CertError, Identity, IdentityError};
pub use log::{error_line, init_logging};
pub use router::{ProtocolHandler, Router, RouterBuilder};
pub use shutdown::ShutdownSignal;
pub use stream::{
    read_first_frame, read_first_frame_in, read_frame, read_frame_in, write_frame, StreamError,
};
pub use transport::{
    StreamTimeouts, TransportConfig, CONNECT_TIMEOUT, FRAME_TIMEOUT, IDLE_TIMEOUT, KEEP_ALIVE,
    MAX_STREAMS, REQUEST_TIMEOUT,
};
pub use tunnel::{Tunnel, TunnelSocket, MAX_TUNNEL_DATAGRAM};
