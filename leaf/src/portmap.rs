//! Carries the NAT-PMP datagrams of `servent_proto::portmap` between its
//! schedule and the gateway: asks the default IPv4 gateway to map the
//! leaf's listening UDP port, renews the mapping, and removes it when the
//! leaf stops. What is mapped now is published for `/status` and for the
//! sessions, which announce the mapped port (`portmap::announced_port`).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use servent_proto::portmap::{self, Mapped, PortMap, Step};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The mapping now, as the driver last heard from the gateway; sessions
/// subscribe to it to re-register when the port to announce changes.
pub(crate) type Published = Arc<watch::Sender<Option<Mapped>>>;

/// The port a session announces: the listening one, or the gateway's
/// mapping of it while there is one (`portmap::announced_port`).
#[derive(Clone)]
pub struct Announced {
    listening: u16,
    mapped: watch::Receiver<Option<Mapped>>,
}

impl Announced {
    pub(crate) fn new(listening: u16, mapped: watch::Receiver<Option<Mapped>>) -> Self {
        Self { listening, mapped }
    }

    /// The port to announce now.
    pub fn now(&self) -> u16 {
        portmap::announced_port(self.listening, self.mapped.borrow().as_ref())
    }

    /// Waits until the port to announce is no longer `from`, and returns
    /// it; never, if nothing maps ports. Cancel-safe.
    pub async fn moved_from(&mut self, from: u16) -> u16 {
        loop {
            if self.mapped.changed().await.is_err() {
                return std::future::pending().await;
            }
            let now = self.now();
            if now != from {
                return now;
            }
        }
    }
}

/// Whether a leaf listening on `listen` should try a port mapping: only
/// on an IPv4 socket reachable beyond its host (unspecified or private);
/// a loopback or public one has nothing to map.
pub(crate) fn wanted(listen: SocketAddr) -> bool {
    match listen {
        SocketAddr::V4(a) => a.ip().is_unspecified() || a.ip().is_private(),
        // A dual-stack socket serves IPv4 too.
        SocketAddr::V6(a) => a.ip().is_unspecified(),
    }
}

/// The default IPv4 gateway, from the kernel's routing table
/// (`/proc/net/route`: a destination of 0 with the gateway flag).
pub(crate) fn default_gateway() -> Option<Ipv4Addr> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dest, gateway, flags) = (f.get(1)?, f.get(2)?, f.get(3)?);
        let flags = u16::from_str_radix(flags, 16).ok()?;
        // RTF_UP | RTF_GATEWAY
        if *dest != "00000000" || flags & 0x3 != 0x3 {
            return None;
        }
        // Little-endian hex, as the kernel writes it on x86 and arm.
        let g = u32::from_str_radix(gateway, 16).ok()?;
        Some(Ipv4Addr::from(g.to_le_bytes()))
    })
}

/// Keeps `port` mapped on `gateway` until `stop`, publishing the mapping.
pub(crate) async fn run(
    gateway: Ipv4Addr,
    port: u16,
    published: Published,
    mut stop: watch::Receiver<bool>,
) {
    let to = SocketAddrV4::new(gateway, portmap::PORT);
    let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await {
        Ok(s) => s,
        Err(e) => return warn!(error = %e, "port mapping: no socket"),
    };
    if let Err(e) = socket.connect(to).await {
        return debug!(error = %e, %gateway, "port mapping: gateway unreachable");
    }
    let mut map = PortMap::new(port, Instant::now());
    let mut buf = [0u8; 64];
    let mut told: Option<(Ipv4Addr, u16)> = None;
    loop {
        if map.handle_timeout(Instant::now()) == Step::Ask {
            for request in map.requests() {
                // A send that fails is a lost datagram: the schedule retries.
                let _ = socket.send(&request).await;
            }
        }
        let deadline = tokio::time::Instant::from_std(map.poll_timeout());
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep_until(deadline) => {}
            got = socket.recv(&mut buf) => {
                if let Ok(n) = got {
                    map.handle_answer(Instant::now(), &buf[..n]);
                }
            }
        }
        let now = map.mapped(Instant::now());
        let key = now.map(|m| (m.external, m.port));
        if key != told {
            match now {
                Some(m) => {
                    info!(external = %m.external, port = m.port, "port mapped on the gateway")
                }
                None => debug!(why = ?map.last_error(), "no port mapping"),
            }
            told = key;
        }
        published.send_replace(now);
    }
    if told.is_some() {
        let _ = socket.send(&map.removal()).await;
        published.send_replace(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sockets_beyond_the_host_are_mapped() {
        assert!(wanted("0.0.0.0:7401".parse().unwrap()));
        assert!(wanted("192.168.1.5:7401".parse().unwrap()));
        assert!(wanted("[::]:7401".parse().unwrap()));
        assert!(!wanted("127.0.0.1:7401".parse().unwrap()));
        assert!(!wanted("198.51.100.7:7401".parse().unwrap()));
        assert!(!wanted("[::1]:7401".parse().unwrap()));
    }
}
