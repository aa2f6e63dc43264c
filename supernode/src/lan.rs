//! A standalone supernode on the LAN (docs/PROTOCOL.md section 17): it
//! announces itself over mDNS as a supernode, so that leaves given no
//! address find it, and meshes with the other supernodes it hears there
//! (hints, dialled with the announced id expected: the TLS handshake
//! checks it). The rules are `servent_proto::lan`'s.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use servent_net::lan::{Heard, Lan};
use servent_proto::lan::{Announcement, LanPeers, LanRole};
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

use crate::State;

/// Starts announcing `state`'s node, serving at `addr`, and listening;
/// `None` (and a warning) if the mDNS daemon cannot start.
pub(crate) fn start(state: Arc<State>, addr: SocketAddr) -> Option<JoinHandle<()>> {
    let (lan, heard) = match Lan::start(state.id, addr) {
        Ok(started) => started,
        Err(e) => {
            warn!(error = %e, "no LAN discovery");
            return None;
        }
    };
    let ann = Announcement {
        id: state.id,
        role: LanRole::Supernode,
        port: addr.port(),
        candidate: false,
    };
    match lan.announce(&ann) {
        Ok(()) => info!("announced on the LAN"),
        Err(e) => warn!(error = %e, "cannot announce on the LAN"),
    }
    Some(tokio::spawn(run(state, lan, heard).in_current_span()))
}

async fn run(state: Arc<State>, lan: Lan, mut heard: tokio::sync::mpsc::Receiver<Heard>) {
    let mut peers = LanPeers::new(state.id);
    let mut seeded = Vec::new();
    while let Some(event) = heard.recv().await {
        event.apply(&mut peers, Instant::now());
        peers.expire(Instant::now());
        let now = peers.supernode_infos();
        if now != seeded && !now.is_empty() {
            state.seed(now.clone());
        }
        seeded = now;
    }
    drop(lan);
}
