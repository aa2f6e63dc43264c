//! Which path a download takes from one leaf to another, by the NATs in
//! front of them (RFC 4787 mapping and filtering; docs/PROTOCOL.md 10.5,
//! 10.6): the most direct one the two behaviours allow in theory, which is
//! the one the reference downloader ends up on. The NAT lab asserts it for
//! every pair, and the simulator counts it for every download it models.

/// What a NAT does to the socket a leaf dials and is dialled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Nat {
    /// No NAT, or a mapping anyone can dial (a full cone's, a port the
    /// gateway mapped): takes any packet.
    Open,
    /// Endpoint-independent mapping, address- and port-dependent
    /// filtering (plain `MASQUERADE`): takes packets only from where it
    /// sent, from one port towards everyone.
    PortRestricted,
    /// Endpoint-dependent mapping (a "symmetric" NAT): a new port towards
    /// each destination, so nobody learns in advance the port it will use
    /// towards them.
    Symmetric,
}

/// How a downloader reaches a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Path {
    /// Its dial to the source's address.
    Direct,
    /// The source dials back (the downloader takes any packet).
    Reversed,
    /// Both dial at once from their one socket (both mappings are
    /// endpoint-independent, or the source's is and the downloader takes
    /// any packet).
    Punched,
    /// Through a supernode's relay.
    Relayed,
}

impl Path {
    /// The route name `leaf get --json` gives it.
    pub fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Reversed => "reversed",
            Path::Punched => "punched",
            Path::Relayed => "relayed",
        }
    }
}

/// The path from a downloader whose dialling socket is behind
/// `downloader` to a source serving behind `source`. `same_router`: both
/// are behind one router, which does not hairpin (a packet to its own
/// outside address from inside does not come back in), so neither reaches
/// the other's outside address.
pub fn path(downloader: Nat, source: Nat, same_router: bool) -> Path {
    if same_router {
        return Path::Relayed;
    }
    match (downloader, source) {
        (_, Nat::Open) => Path::Direct,
        // The source's dial back is taken.
        (Nat::Open, _) => Path::Reversed,
        // The source's mapping towards the downloader is the one everyone
        // saw, and the downloader's towards the source too: each dial
        // opens its own NAT for the other's.
        (Nat::PortRestricted, Nat::PortRestricted) => Path::Punched,
        // One side's port towards the other is known to nobody, and the
        // other side filters by port.
        (Nat::Symmetric, _) | (_, Nat::Symmetric) => Path::Relayed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_is_the_path_only_where_no_dial_can_get_through() {
        use Nat::*;
        let all = [Open, PortRestricted, Symmetric];
        for d in all {
            assert_eq!(path(d, Open, false), Path::Direct);
            assert_eq!(path(d, Open, true), Path::Relayed, "no hairpin");
        }
        assert_eq!(path(Open, PortRestricted, false), Path::Reversed);
        assert_eq!(path(Open, Symmetric, false), Path::Reversed);
        assert_eq!(path(PortRestricted, PortRestricted, false), Path::Punched);
        assert_eq!(path(PortRestricted, Symmetric, false), Path::Relayed);
        assert_eq!(path(Symmetric, PortRestricted, false), Path::Relayed);
        assert_eq!(path(Symmetric, Symmetric, false), Path::Relayed);
        assert_eq!(Path::Relayed.name(), "relayed");
    }
}
