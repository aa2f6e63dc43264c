//! What a leaf can tell of the NAT in front of it, as a pure decision:
//! given the addresses its supernodes observed its one UDP socket at
//! (each `Registered { observed_addr }`) and its own local addresses, which
//! reflexive addresses it has and whether its NAT's mapping depends on the
//! destination (RFC 4787, section 4.1).
//!
//! - **No NAT** (`Mapping::None`): a supernode saw the leaf at one of its
//!   own addresses and listening port.
//! - **Endpoint-independent** (`Mapping::EndpointIndependent`): at least two
//!   supernodes at different IP addresses saw the same address, and it is
//!   not the leaf's own. A peer that dials it may get through (full cone),
//!   or may need the leaf to punch first (restricted or port-restricted
//!   filtering): the mapping alone does not tell.
//! - **Endpoint-dependent** (`Mapping::EndpointDependent`): supernodes at
//!   different IP addresses saw different addresses (a symmetric NAT gives
//!   each destination its own port). No address a third party learns
//!   reaches the leaf.
//! - **Unknown** (`Mapping::Unknown`): too few observations, or from
//!   supernodes behind one IP address only.
//!
//! One supernode's word is a claim: it decides nothing alone. An address
//! counts as the leaf's reflexive address once two supernodes at different
//! IP addresses agree on it, so a lying supernode can neither give the leaf
//! an address nor, by disagreeing, turn an agreement of two honest ones
//! into "endpoint-dependent" (it takes two disagreeing honest reports, or
//! a majority, see [`classify`]).

use std::net::{IpAddr, SocketAddr};

/// Most observations [`classify`] looks at (a leaf has a few supernodes;
/// anything beyond is ignored).
pub const MAX_OBSERVATIONS: usize = 16;

/// How a NAT maps the leaf's socket, as far as its supernodes can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// No NAT: the leaf is seen at its own address.
    None,
    /// One mapping for every destination.
    EndpointIndependent,
    /// A mapping per destination (symmetric NAT).
    EndpointDependent,
    /// Not enough to tell.
    Unknown,
}

impl Mapping {
    /// The name `/status` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Mapping::None => "none",
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::EndpointDependent => "endpoint-dependent",
            Mapping::Unknown => "unknown",
        }
    }
}

/// One supernode's view of the leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// The supernode's address, as the leaf dialled it.
    pub supernode: SocketAddr,
    /// Where the supernode saw the leaf's socket.
    pub observed: SocketAddr,
}

/// What [`classify`] makes of the observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatView {
    /// The distinct addresses observed, most reports first, then by
    /// address (at most [`MAX_OBSERVATIONS`]).
    pub reflexive: Vec<SocketAddr>,
    pub mapping: Mapping,
    /// The address two supernodes at different IP addresses agree on,
    /// if any: the one to tell others about.
    pub confirmed: Option<SocketAddr>,
}

/// Classifies the leaf's NAT from `observations`, the leaf listening on
/// `listen` (its socket's port) with `local` its own IP addresses (those
/// of its interfaces; an unspecified `listen` IP is not one).
pub fn classify(listen: SocketAddr, local: &[IpAddr], observations: &[Observation]) -> NatView {
    let obs = &observations[..observations.len().min(MAX_OBSERVATIONS)];
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    // For each distinct observed address: the distinct supernode IPs that
    // reported it.
    let mut seen: Vec<(SocketAddr, Vec<IpAddr>)> = Vec::new();
    for o in obs {
        let (at, by) = (canon(o.observed), o.supernode.ip().to_canonical());
        match seen.iter_mut().find(|(a, _)| *a == at) {
            Some((_, ips)) if !ips.contains(&by) => ips.push(by),
            Some(_) => {}
            None => seen.push((at, vec![by])),
        }
    }
    seen.sort_by(|(a, x), (b, y)| y.len().cmp(&x.len()).then(a.cmp(b)));
    let reflexive: Vec<SocketAddr> = seen.iter().map(|(a, _)| *a).collect();
    let own = |a: &SocketAddr| {
        a.port() == listen.port()
            && (local.contains(&a.ip()) || (!listen.ip().is_unspecified() && a.ip() == listen.ip()))
    };
    let confirmed = seen.iter().find(|(_, ips)| ips.len() >= 2).map(|(a, _)| *a);
    let sources: Vec<IpAddr> = {
        let mut ips: Vec<IpAddr> = obs
            .iter()
            .map(|o| o.supernode.ip().to_canonical())
            .collect();
        ips.sort();
        ips.dedup();
        ips
    };
    let mapping = match confirmed {
        Some(a) => {
            // Two agree; as many others disagreeing outweigh them.
            let agreeing = seen[0].1.len();
            let others = sources.len().saturating_sub(agreeing);
            if others >= agreeing {
                Mapping::EndpointDependent
            } else if own(&a) {
                Mapping::None
            } else {
                Mapping::EndpointIndependent
            }
        }
        // Seen only where it listens, by one supernode or several.
        None if seen.len() == 1 && own(&seen[0].0) => Mapping::None,
        // Supernodes at different IPs, no two agreeing: each destination
        // gets its own mapping, unless one of them says there is no NAT
        // at all (then one of the two is wrong, or lying).
        None if sources.len() >= 2 && seen.len() >= 2 && !reflexive.iter().any(own) => {
            Mapping::EndpointDependent
        }
        None => Mapping::Unknown,
    };
    NatView {
        reflexive,
        mapping,
        confirmed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ob(supernode: &str, observed: &str) -> Observation {
        Observation {
            supernode: a(supernode),
            observed: a(observed),
        }
    }

    const LISTEN: &str = "0.0.0.0:7401";

    fn local() -> Vec<IpAddr> {
        vec!["10.0.0.5".parse().unwrap()]
    }

    #[test]
    fn a_public_leaf_is_seen_where_it_listens() {
        let v = classify(
            a(LISTEN),
            &local(),
            &[
                ob("192.0.2.1:7400", "10.0.0.5:7401"),
                ob("192.0.2.2:7400", "10.0.0.5:7401"),
            ],
        );
        assert_eq!(v.mapping, Mapping::None);
        assert_eq!(v.reflexive, [a("10.0.0.5:7401")]);
        assert_eq!(v.confirmed, Some(a("10.0.0.5:7401")));
        // One supernode is enough to see no NAT: the address is our own.
        let one = classify(
            a(LISTEN),
            &local(),
            &[ob("192.0.2.1:7400", "10.0.0.5:7401")],
        );
        assert_eq!(one.mapping, Mapping::None);
        assert_eq!(one.confirmed, None);
    }

    #[test]
    fn two_supernodes_agreeing_on_a_foreign_address_show_an_independent_mapping() {
        let v = classify(
            a(LISTEN),
            &local(),
            &[
                ob("192.0.2.1:7400", "198.51.100.9:7401"),
                ob("192.0.2.2:7400", "198.51.100.9:7401"),
            ],
        );
        assert_eq!(v.mapping, Mapping::EndpointIndependent);
        assert_eq!(v.confirmed, Some(a("198.51.100.9:7401")));
    }

    #[test]
    fn one_supernode_or_one_ip_tells_nothing_of_a_nat() {
        let one = classify(
            a(LISTEN),
            &local(),
            &[ob("192.0.2.1:7400", "198.51.100.9:7401")],
        );
        assert_eq!(one.mapping, Mapping::Unknown);
        // Two supernodes behind one IP: not two destinations to a NAT
        // that maps by address.
        let same_ip = classify(
            a(LISTEN),
            &local(),
            &[
                ob("192.0.2.1:7400", "198.51.100.9:1"),
                ob("192.0.2.1:7500", "198.51.100.9:2"),
            ],
        );
        assert_eq!(same_ip.mapping, Mapping::Unknown);
        assert_eq!(same_ip.confirmed, None);
        assert_eq!(classify(a(LISTEN), &local(), &[]).mapping, Mapping::Unknown);
    }

    #[test]
    fn a_port_per_destination_is_a_dependent_mapping() {
        let v = classify(
            a(LISTEN),
            &local(),
            &[
                ob("192.0.2.1:7400", "198.51.100.9:40001"),
                ob("192.0.2.2:7400", "198.51.100.9:52113"),
            ],
        );
        assert_eq!(v.mapping, Mapping::EndpointDependent);
        assert_eq!(v.confirmed, None);
        assert_eq!(v.reflexive.len(), 2);
    }

    #[test]
    fn one_lying_supernode_does_not_outvote_two_honest_ones() {
        let honest = "198.51.100.9:7401";
        let v = classify(
            a(LISTEN),
            &local(),
            &[
                ob("192.0.2.1:7400", honest),
                ob("192.0.2.3:7400", "203.0.113.66:1"),
                ob("192.0.2.2:7400", honest),
            ],
        );
        assert_eq!(v.mapping, Mapping::EndpointIndependent);
        assert_eq!(v.confirmed, Some(a(honest)));
        assert_eq!(v.reflexive[0], a(honest));
        // Nor, alone, invent an address for a public leaf.
        let v = classify(
            a(LISTEN),
            &local(),
            &[
                ob("192.0.2.1:7400", "10.0.0.5:7401"),
                ob("192.0.2.3:7400", "203.0.113.66:1"),
            ],
        );
        assert_eq!(v.confirmed, None);
        assert_eq!(v.mapping, Mapping::Unknown);
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        let v = classify(
            a(LISTEN),
            &local(),
            &[
                ob("[::ffff:192.0.2.1]:7400", "[::ffff:198.51.100.9]:7401"),
                ob("192.0.2.2:7400", "198.51.100.9:7401"),
            ],
        );
        assert_eq!(v.mapping, Mapping::EndpointIndependent);
        assert_eq!(v.reflexive, [a("198.51.100.9:7401")]);
    }

    #[test]
    fn a_flood_of_observations_is_cut_at_the_cap() {
        let many: Vec<Observation> = (0..1000u32)
            .map(|i| Observation {
                supernode: SocketAddr::from(([192, 0, (i >> 8) as u8, i as u8], 7400)),
                observed: SocketAddr::from(([198, 51, 100, 9], i as u16)),
            })
            .collect();
        let v = classify(a(LISTEN), &local(), &many);
        assert_eq!(v.reflexive.len(), MAX_OBSERVATIONS);
        assert_eq!(v.mapping, Mapping::EndpointDependent);
    }
}
