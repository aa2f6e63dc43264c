//! The Servent wire protocol: what the nodes say to each other, and nothing
//! about how the bytes travel.
//!
//! Goals: every message is a plain serde type encoded with MessagePack
//! (rmp-serde, structs as positional arrays); every frame carries a length
//! prefix that is checked against a per-kind limit *before* anything is
//! allocated; each protocol has its own versioned ALPN so that a peer that
//! speaks another version is refused during the handshake.
//!
//! Non-goals: sockets, QUIC, tasks, clocks. This crate has no tokio
//! dependency; the node crates pump bytes into it and act on what it returns.
//! `docs/PROTOCOL.md` is the normative description of everything here.

pub mod frame;
pub mod id;
pub mod keywords;
pub mod limits;
pub mod msg;
pub mod name;

pub use frame::FrameError;
pub use id::{ContentHash, NodeId, ParseIdError};
pub mod admit;
pub mod attach;
pub mod connect;
pub mod cost;
pub mod elect;
pub mod fair;
pub mod filter;
pub mod hits;
pub mod hop;
pub mod lan;
pub mod lease;
pub mod magnet;
pub mod mesh;
pub mod nat;
pub mod path;
pub mod pin;
pub mod portmap;
pub mod queue;
pub mod rate;
pub mod relay;
pub mod rng;
pub mod route;
pub mod schedule;
pub mod upload;
pub mod walk;
