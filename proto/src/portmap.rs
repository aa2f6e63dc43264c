//! Port mapping on the leaf's gateway with NAT-PMP (RFC 6886), as pure
//! parts: the request bytes, the checked parsing of a gateway's answer, and
//! the schedule ([`PortMap`]) that says when to ask, renew, retry or give
//! up. The leaf sends and receives the datagrams (UDP to the gateway's port
//! 5351) and passes the time in.
//!
//! A mapping is asked for the leaf's listening UDP port, the same external
//! port preferred, with a lifetime of [`LIFETIME`]; it is renewed at half
//! its granted lifetime, and removed (lifetime 0) when the leaf stops. A
//! gateway that does not answer [`TRIES`] requests, [`FIRST_WAIT`] doubling
//! each time (RFC 6886 3.1, cut short: 250 ms to 2 s), is taken to have no
//! NAT-PMP, and asked again after [`RETRY_AFTER`].

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// The gateway's NAT-PMP port.
pub const PORT: u16 = 5351;
/// Lifetime asked for a mapping (RFC 6886 recommends 2 hours).
pub const LIFETIME: Duration = Duration::from_secs(7200);
/// The first wait for an answer; each retry waits twice as long.
pub const FIRST_WAIT: Duration = Duration::from_millis(250);
/// Requests sent before the gateway is taken to have no NAT-PMP.
pub const TRIES: u32 = 4;
/// How long after giving up, or after a refusal, to ask again.
pub const RETRY_AFTER: Duration = Duration::from_secs(300);
/// The shortest wait before a renewal: a gateway granting a tiny lifetime
/// would have the leaf ask all the time (the mapping then lapses between).
pub const MIN_RENEW: Duration = Duration::from_secs(30);

/// Request: the gateway's external address (opcode 0).
pub fn external_address_request() -> [u8; 2] {
    [0, 0]
}

/// Request: map UDP `internal` to `external` (0: any) for `lifetime`
/// seconds (0 removes the mapping). Opcode 1.
pub fn map_udp_request(internal: u16, external: u16, lifetime: Duration) -> [u8; 12] {
    let secs = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
    let mut b = [0u8; 12];
    b[1] = 1;
    b[4..6].copy_from_slice(&internal.to_be_bytes());
    b[6..8].copy_from_slice(&external.to_be_bytes());
    b[8..12].copy_from_slice(&secs.to_be_bytes());
    b
}

/// A gateway's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    ExternalAddress(Ipv4Addr),
    MappedUdp {
        internal: u16,
        external: u16,
        lifetime: Duration,
    },
}

/// Why an answer was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("not a NAT-PMP answer ({0} bytes)")]
    Malformed(usize),
    #[error("NAT-PMP version {0}, not 0")]
    Version(u8),
    #[error("the gateway refused: result code {0}")]
    Refused(u16),
}

/// Parses a datagram from the gateway (answers have the opcode + 128).
pub fn parse(b: &[u8]) -> Result<Answer, AnswerError> {
    let len = b.len();
    if len < 8 {
        return Err(AnswerError::Malformed(len));
    }
    if b[0] != 0 {
        return Err(AnswerError::Version(b[0]));
    }
    let result = u16::from_be_bytes([b[2], b[3]]);
    match (b[1], len) {
        (128, 12..) | (129, 16..) if result != 0 => Err(AnswerError::Refused(result)),
        (128, 12..) => Ok(Answer::ExternalAddress(Ipv4Addr::new(
            b[8], b[9], b[10], b[11],
        ))),
        (129, 16..) => Ok(Answer::MappedUdp {
            internal: u16::from_be_bytes([b[8], b[9]]),
            external: u16::from_be_bytes([b[10], b[11]]),
            lifetime: Duration::from_secs(u32::from_be_bytes([b[12], b[13], b[14], b[15]]).into()),
        }),
        _ => Err(AnswerError::Malformed(len)),
    }
}

/// What the driver should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send both requests (external address, then the mapping) and wait
    /// for answers until [`PortMap::poll_timeout`].
    Ask,
    /// Nothing until [`PortMap::poll_timeout`].
    Wait,
}

/// The mapping, as far as the gateway has told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    pub external: Ipv4Addr,
    pub port: u16,
    pub until: Instant,
}

/// The port a leaf listening on `listening` announces to its supernodes
/// (`Register { listen_port }`): the external port its gateway maps to it
/// while it holds a mapping, since the supernode pairs the port with the
/// address it observes, the gateway's; else its own. A gateway may map
/// another port than the one asked for (when that one is taken, say by
/// another host behind it).
pub fn announced_port(listening: u16, mapped: Option<&Mapped>) -> u16 {
    mapped.map_or(listening, |m| m.port)
}

/// The port-mapping schedule of one listening port.
#[derive(Debug, Clone)]
pub struct PortMap {
    port: u16,
    next: Instant,
    /// Requests sent in the current attempt.
    tries: u32,
    external: Option<Ipv4Addr>,
    mapped: Option<(u16, Instant)>,
    last_error: Option<String>,
}

impl PortMap {
    /// A schedule for listening `port`, asking at once.
    pub fn new(port: u16, now: Instant) -> Self {
        Self {
            port,
            next: now,
            tries: 0,
            external: None,
            mapped: None,
            last_error: None,
        }
    }

    /// When [`PortMap::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Instant {
        self.next
    }

    /// The time has come (or passed): what to send.
    pub fn handle_timeout(&mut self, now: Instant) -> Step {
        if now < self.next {
            return Step::Wait;
        }
        if let Some((_, until)) = self.mapped {
            if now >= until {
                // Lapsed without a renewal answered.
                self.mapped = None;
            }
        }
        if self.tries >= TRIES {
            // No answer to any: no NAT-PMP here, for now.
            self.tries = 0;
            self.next = now + RETRY_AFTER;
            self.last_error = Some("the gateway does not answer NAT-PMP".into());
            return Step::Wait;
        }
        let wait = FIRST_WAIT * 2u32.pow(self.tries);
        self.tries += 1;
        self.next = now + wait;
        Step::Ask
    }

    /// A datagram from the gateway.
    pub fn handle_answer(&mut self, now: Instant, datagram: &[u8]) {
        match parse(datagram) {
            Ok(Answer::ExternalAddress(ip)) => self.external = Some(ip),
            Ok(Answer::MappedUdp {
                internal,
                external,
                lifetime,
            }) if internal == self.port => {
                if lifetime.is_zero() {
                    self.mapped = None;
                    return;
                }
                self.mapped = Some((external, now + lifetime));
                self.tries = 0;
                self.next = now + (lifetime / 2).max(MIN_RENEW);
                self.last_error = None;
            }
            Ok(Answer::MappedUdp { .. }) => {}
            Err(e @ AnswerError::Refused(_)) => {
                self.mapped = None;
                self.tries = 0;
                self.next = now + RETRY_AFTER;
                self.last_error = Some(e.to_string());
            }
            Err(_) => {}
        }
    }

    /// The mapping now, once the gateway has told both its external
    /// address and the port it mapped.
    pub fn mapped(&self, now: Instant) -> Option<Mapped> {
        let (port, until) = self.mapped?;
        (now < until).then_some(Mapped {
            external: self.external?,
            port,
            until,
        })
    }

    /// Why there is no mapping, if the last attempt said.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// The datagrams of one [`Step::Ask`]: the external port suggested is
    /// the one mapped now, if any (a renewal keeps it, RFC 6886 3.3), else
    /// the listening port.
    pub fn requests(&self) -> [Vec<u8>; 2] {
        let external = self.mapped.map_or(self.port, |(port, _)| port);
        [
            external_address_request().to_vec(),
            map_udp_request(self.port, external, LIFETIME).to_vec(),
        ]
    }

    /// The datagram that removes the mapping (lifetime 0).
    pub fn removal(&self) -> [u8; 12] {
        map_udp_request(self.port, 0, Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped_answer(internal: u16, external: u16, secs: u32, result: u16) -> Vec<u8> {
        let mut b = vec![0, 129];
        b.extend(result.to_be_bytes());
        b.extend(1234u32.to_be_bytes());
        b.extend(internal.to_be_bytes());
        b.extend(external.to_be_bytes());
        b.extend(secs.to_be_bytes());
        b
    }

    fn address_answer(ip: [u8; 4]) -> Vec<u8> {
        let mut b = vec![0, 128, 0, 0];
        b.extend(1234u32.to_be_bytes());
        b.extend(ip);
        b
    }

    #[test]
    fn requests_are_rfc_6886_bytes() {
        assert_eq!(external_address_request(), [0, 0]);
        assert_eq!(
            map_udp_request(7401, 7401, LIFETIME),
            [0, 1, 0, 0, 0x1c, 0xe9, 0x1c, 0xe9, 0, 0, 0x1c, 0x20]
        );
    }

    #[test]
    fn answers_are_checked_before_they_are_read() {
        assert_eq!(
            parse(&address_answer([5, 5, 5, 2])),
            Ok(Answer::ExternalAddress(Ipv4Addr::new(5, 5, 5, 2)))
        );
        assert_eq!(
            parse(&mapped_answer(7401, 7402, 3600, 0)),
            Ok(Answer::MappedUdp {
                internal: 7401,
                external: 7402,
                lifetime: Duration::from_secs(3600)
            })
        );
        assert_eq!(
            parse(&mapped_answer(7401, 7401, 0, 3)),
            Err(AnswerError::Refused(3))
        );
        assert_eq!(parse(&[0, 129, 0]), Err(AnswerError::Malformed(3)));
        assert_eq!(
            parse(&mapped_answer(1, 1, 1, 0)[..12]),
            Err(AnswerError::Malformed(12))
        );
        let mut v2 = address_answer([1, 2, 3, 4]);
        v2[0] = 2;
        assert_eq!(parse(&v2), Err(AnswerError::Version(2)));
        // A request echoed back is not an answer.
        assert_eq!(
            parse(&map_udp_request(1, 1, LIFETIME)),
            Err(AnswerError::Malformed(12))
        );
    }

    #[test]
    fn a_mapping_is_asked_for_renewed_at_half_life_and_lapses_unrenewed() {
        let t0 = Instant::now();
        let mut m = PortMap::new(7401, t0);
        assert_eq!(m.handle_timeout(t0), Step::Ask);
        m.handle_answer(t0, &address_answer([5, 5, 5, 2]));
        m.handle_answer(t0, &mapped_answer(7401, 7401, 7200, 0));
        let got = m.mapped(t0).expect("mapped");
        assert_eq!((got.external, got.port), (Ipv4Addr::new(5, 5, 5, 2), 7401));
        assert_eq!(m.poll_timeout(), t0 + Duration::from_secs(3600));
        assert_eq!(m.handle_timeout(t0 + Duration::from_secs(10)), Step::Wait);
        let half = t0 + Duration::from_secs(3600);
        assert_eq!(m.handle_timeout(half), Step::Ask);
        // No renewal answered: still mapped until the lifetime ends, then not.
        let mut t = half;
        for _ in 0..20 {
            t = m.poll_timeout().max(t);
            m.handle_timeout(t);
        }
        assert!(m.mapped(t0 + Duration::from_secs(7199)).is_some());
        assert!(m.mapped(t0 + Duration::from_secs(7200)).is_none());
        // An answer for another port is not ours.
        let mut other = PortMap::new(7401, t0);
        other.handle_answer(t0, &address_answer([5, 5, 5, 2]));
        other.handle_answer(t0, &mapped_answer(9999, 9999, 7200, 0));
        assert!(other.mapped(t0).is_none());
    }

    #[test]
    fn a_silent_gateway_is_given_up_after_a_few_tries_and_asked_again_later() {
        let t0 = Instant::now();
        let mut m = PortMap::new(7401, t0);
        let mut asks = 0;
        let mut t = t0;
        while t < t0 + Duration::from_secs(10) {
            if m.handle_timeout(t) == Step::Ask {
                asks += 1;
            }
            t = m.poll_timeout();
        }
        assert_eq!(asks, TRIES);
        assert!(m.poll_timeout() >= t0 + RETRY_AFTER);
        assert!(m.last_error().is_some());
        // A refusal also waits RETRY_AFTER.
        let mut r = PortMap::new(7401, t0);
        r.handle_timeout(t0);
        r.handle_answer(t0, &mapped_answer(7401, 7401, 0, 2));
        assert_eq!(r.poll_timeout(), t0 + RETRY_AFTER);
        assert!(r.last_error().unwrap().contains("refused"));
    }

    #[test]
    fn a_tiny_granted_lifetime_is_renewed_no_sooner_than_the_floor() {
        let t0 = Instant::now();
        let mut m = PortMap::new(7401, t0);
        m.handle_timeout(t0);
        m.handle_answer(t0, &address_answer([5, 5, 5, 2]));
        m.handle_answer(t0, &mapped_answer(7401, 7401, 1, 0));
        assert_eq!(m.poll_timeout(), t0 + MIN_RENEW);
        assert!(m.mapped(t0).is_some());
        assert!(m.mapped(t0 + Duration::from_secs(1)).is_none());
    }

    #[test]
    fn another_port_mapped_is_the_one_announced_and_the_one_renewed() {
        let t0 = Instant::now();
        let mut m = PortMap::new(7401, t0);
        assert_eq!(announced_port(7401, m.mapped(t0).as_ref()), 7401);
        m.handle_timeout(t0);
        assert_eq!(m.requests()[1], map_udp_request(7401, 7401, LIFETIME));
        // The port asked for was taken on the gateway: it maps another.
        m.handle_answer(t0, &address_answer([5, 5, 5, 2]));
        m.handle_answer(t0, &mapped_answer(7401, 7402, 7200, 0));
        assert_eq!(announced_port(7401, m.mapped(t0).as_ref()), 7402);
        let half = t0 + Duration::from_secs(3600);
        assert_eq!(m.handle_timeout(half), Step::Ask);
        assert_eq!(m.requests()[1], map_udp_request(7401, 7402, LIFETIME));
        // Once it lapses, the listening port is announced again.
        let lapsed = t0 + Duration::from_secs(7200);
        assert_eq!(announced_port(7401, m.mapped(lapsed).as_ref()), 7401);
    }
}
