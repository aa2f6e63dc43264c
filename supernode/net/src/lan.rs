//! mDNS/DNS-SD on the LAN (docs/PROTOCOL.md section 17): announces this
//! node under [`SERVICE_TYPE`] and reports what the others announce. What
//! to make of them is `servent_proto::lan`'s; this module only carries
//! records between the `mdns-sd` daemon (a thread and sockets of its own)
//! and the node.
//!
//! The instance name is `servent-` and the first 16 hex digits of the node
//! id (a DNS label holds 63 bytes, the id's 64 digits do not fit); the TXT
//! properties carry the whole id, the role and whether a leaf would take
//! the supernode role; the SRV record carries the QUIC port.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use servent_proto::lan::{Announcement, LanPeers, MAX_PEERS, SERVICE_TYPE};
use servent_proto::NodeId;
use tokio::sync::mpsc;
use tracing::debug;

/// What the LAN said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A node announced itself (again) at these addresses.
    Announced(Announcement, Vec<IpAddr>),
    /// A node said goodbye, or its records expired.
    Left(NodeId),
}

impl Heard {
    /// Takes what was heard into `peers` (which keeps it within bounds).
    pub fn apply(self, peers: &mut LanPeers, now: Instant) {
        match self {
            Heard::Announced(ann, ips) => {
                if peers.heard(now, &ann, &ips) {
                    debug!(id = %ann.id.short(), role = ann.role.as_str(), "heard on the LAN");
                }
            }
            Heard::Left(id) => peers.lost(&id),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LanError {
    #[error("mDNS: {0}")]
    Mdns(#[from] mdns_sd::Error),
}

/// Events queued for the node before the oldest are dropped: the daemon's
/// thread never waits on the node.
const EVENT_QUEUE: usize = 256;

/// A running announcer and listener. Dropping it says goodbye and stops
/// the daemon.
pub struct Lan {
    daemon: ServiceDaemon,
    instance: String,
    /// The full name registered now, to unregister.
    registered: Mutex<Option<String>>,
}

/// The instance name of node `id`.
fn instance(id: &NodeId) -> String {
    format!("servent-{}", &id.to_string()[..16])
}

/// Whether a node bound to `listen` announces itself: not when it serves
/// this host alone.
pub fn wanted(listen: SocketAddr) -> bool {
    !listen.ip().is_loopback()
}

impl Lan {
    /// Starts the daemon for node `id` serving on `listen`, on the
    /// interface of `listen`'s IP if it names one (every interface but
    /// loopback otherwise), and starts listening; what is heard arrives on
    /// the receiver.
    pub fn start(
        id: NodeId,
        listen: SocketAddr,
    ) -> Result<(Self, mpsc::Receiver<Heard>), LanError> {
        let daemon = ServiceDaemon::new()?;
        daemon.disable_interface(IfKind::LoopbackV4)?;
        daemon.disable_interface(IfKind::LoopbackV6)?;
        if !listen.ip().is_unspecified() {
            daemon.disable_interface(IfKind::All)?;
            daemon.enable_interface(IfKind::Addr(listen.ip()))?;
        }
        let events = daemon.browse(SERVICE_TYPE)?;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        std::thread::Builder::new()
            .name("lan".into())
            .spawn(move || forward(events, tx))
            .map_err(|e| LanError::Mdns(mdns_sd::Error::Msg(e.to_string())))?;
        let lan = Self {
            daemon,
            instance: instance(&id),
            registered: Mutex::new(None),
        };
        Ok((lan, rx))
    }

    /// Announces `ann` (replacing what this node announced before), at
    /// the addresses of the interfaces the daemon uses.
    pub fn announce(&self, ann: &Announcement) -> Result<(), LanError> {
        let host = format!("{}.local.", self.instance);
        let props: Vec<(&str, String)> = ann.properties();
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &self.instance,
            &host,
            "",
            ann.port,
            &props[..],
        )?
        .enable_addr_auto();
        let fullname = info.get_fullname().to_string();
        self.daemon.register(info)?;
        *self.registered.lock().expect("lan lock") = Some(fullname);
        Ok(())
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        if let Some(name) = self.registered.lock().expect("lan lock").take() {
            let _ = self.daemon.unregister(&name);
        }
        let _ = self.daemon.shutdown();
    }
}

/// The daemon's events, read on a thread of their own, as [`Heard`]; ends
/// when the daemon stops or the node stops listening.
fn forward(events: mdns_sd::Receiver<ServiceEvent>, tx: mpsc::Sender<Heard>) {
    // Which node each instance was, to say which one left; as bounded as
    // the peers the core keeps (twice, for nodes that come and go).
    let mut names: HashMap<String, NodeId> = HashMap::new();
    while let Ok(event) = events.recv() {
        let heard = match event {
            ServiceEvent::ServiceResolved(service) => {
                let props = service.get_properties();
                let parsed =
                    Announcement::parse(|key| props.get_property_val_str(key), service.get_port());
                match parsed {
                    Ok(ann) => {
                        if names.len() < 2 * MAX_PEERS || names.contains_key(&service.fullname) {
                            names.insert(service.fullname.clone(), ann.id);
                        }
                        let ips = service
                            .get_addresses()
                            .iter()
                            .map(|ip| ip.to_ip_addr())
                            .collect();
                        Heard::Announced(ann, ips)
                    }
                    Err(e) => {
                        debug!(name = %service.fullname, error = %e, "LAN announcement ignored");
                        continue;
                    }
                }
            }
            ServiceEvent::ServiceRemoved(_, fullname) => match names.remove(&fullname) {
                Some(id) => Heard::Left(id),
                None => continue,
            },
            _ => continue,
        };
        match tx.try_send(heard) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}
