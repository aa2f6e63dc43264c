//! A network lab of Linux network namespaces, for tests that run the real
//! binaries over an impaired network (`tests/impair.rs`).
//!
//! The shape is a star: one router namespace and one namespace per host,
//! each host joined to the router by a veth pair, on a /24 of its own
//! (`10.201.<n>.2`, the router being `.1`). Impairments apply where every
//! packet between two hosts passes, in the router (random loss, with
//! iptables `statistic`), and at each end of every link (a `tbf` rate cap
//! each way). The kernel has no `sch_netem`, so there is no delay.
//! iptables sees the kernel's buffers, and a GSO batch of datagrams (quinn
//! sends them) is one buffer: the loss is the asked share of datagrams on
//! average, in bursts of up to a batch.
//!
//! The lab touches nothing of the host: the veth pairs are created inside
//! the lab's namespaces (never in the host's), the addresses, routes,
//! sysctls and iptables rules all live in them, and dropping the [`Lab`]
//! kills what still runs inside and deletes the namespaces, which takes
//! the links with them. Names carry the test process's pid and the lab's
//! number in it, so neither runs nor tests side by side collide, and
//! namespaces left by a run that was killed outright (no drop) are
//! removed by the next.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::bins::{self, Binaries, Process};

/// Where Debian's miniupnpd is.
const MINIUPNPD: &str = "/usr/sbin/miniupnpd";

/// Why this machine cannot run the NAT routers' extras, if it cannot: a
/// NAT-PMP router ([`NatKind::PortMapping`]: miniupnpd and nft) and
/// [`Lab::renumber`] (conntrack).
pub fn nat_tools_unavailable() -> Option<String> {
    if !std::path::Path::new(MINIUPNPD).exists() {
        return Some(format!("no {MINIUPNPD} (Debian's miniupnpd)"));
    }
    for tool in ["nft", "conntrack"] {
        match Command::new(tool)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            _ => return Some(format!("cannot run `{tool}`")),
        }
    }
    None
}

/// The prefix of every namespace a lab makes: `svlab-<pid>-<lab>-<name>`,
/// `<lab>` counting the labs of this process (tests run side by side).
const PREFIX: &str = "svlab-";

/// Labs this process has made so far.
static LABS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Why this machine cannot host a lab, if it cannot: not root, or no
/// `ip netns`, `iptables` or `tc`.
pub fn unavailable() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        return Some(format!(
            "network namespaces need root (effective uid {euid})"
        ));
    }
    for (tool, args) in [
        ("ip", &["netns", "list"][..]),
        ("iptables", &["--version"][..]),
        ("tc", &["-V"][..]),
    ] {
        match Command::new(tool).args(args).stdin(Stdio::null()).output() {
            Err(e) => return Some(format!("cannot run `{tool}`: {e}")),
            Ok(out) if !out.status.success() => {
                return Some(format!(
                    "`{tool} {}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
            Ok(_) => {}
        }
    }
    None
}

/// Runs a command line whose words are separated by spaces (every word
/// here is a name, a number or an address, none with a space in it),
/// failing with its stderr unless it succeeds.
fn sh(line: &str) -> Result<(), String> {
    let mut words = line.split(' ').filter(|w| !w.is_empty());
    let program = words.next().ok_or("an empty command line")?;
    let out = Command::new(program)
        .args(words)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    match out.status.success() {
        true => Ok(()),
        false => Err(format!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// The names of all network namespaces (`ip netns list`: `name [(id: n)]`).
fn namespaces() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .stdin(Stdio::null())
        .output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Turns IPv4 forwarding on in namespace `ns`: written directly rather
/// than with `sysctl`, which a slim machine may lack; inside the
/// namespace, it is the namespace's own switch.
fn forward(ns: &str) -> Result<(), String> {
    let forwarding = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c"])
        .arg("echo 1 > /proc/sys/net/ipv4/ip_forward")
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run ip netns exec: {e}"))?;
    match forwarding.success() {
        true => Ok(()),
        false => Err(format!("cannot turn forwarding on in {ns}")),
    }
}

/// Kills what runs in namespace `ns` (processes a test started there)
/// and deletes it; errors are ignored, as this is cleanup.
fn remove_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns])
        .stdin(Stdio::null())
        .output()
    {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if pid.parse::<u32>().is_ok() {
                let _ = sh(&format!("kill -KILL {pid}"));
            }
        }
    }
    let _ = sh(&format!("ip netns del {ns}"));
}

/// A host of the lab: its namespace and its address.
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The router's end of this host's link.
    router_port: String,
}

/// How a NAT router of the lab maps and filters (RFC 4787), made with
/// iptables in its namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Endpoint-independent mapping and filtering (full cone): plain
    /// `MASQUERADE`, which keeps the source port, and a DNAT of that
    /// mapped port, UDP `port`, back to the host behind.
    FullCone { port: u16 },
    /// Endpoint-independent mapping, address-and-port-dependent filtering
    /// (port-restricted cone): plain `MASQUERADE`; only replies pass in.
    PortRestricted,
    /// Endpoint-dependent mapping (symmetric): `MASQUERADE --random-fully`
    /// gives every destination a random port; only replies pass in.
    Symmetric,
    /// A port-restricted router (plain `MASQUERADE`) that runs a real
    /// NAT-PMP/PCP daemon, `miniupnpd`, for the hosts behind it. Its WAN
    /// address is outside the private and reserved ranges (miniupnpd
    /// refuses to map behind those), and exists only inside the lab.
    PortMapping,
}

impl NatKind {
    pub fn name(self) -> &'static str {
        match self {
            NatKind::FullCone { .. } => "full-cone",
            NatKind::PortRestricted => "port-restricted",
            NatKind::Symmetric => "symmetric",
            NatKind::PortMapping => "nat-pmp",
        }
    }
}

/// A NAT router of the lab: a host of the lab's router on its WAN side
/// (`wan`), and the gateway of a LAN of its own (`10.210.<k>.0/24`).
#[derive(Debug, Clone)]
pub struct Nat {
    pub netns: String,
    /// Its address on the lab's network: where hosts behind it are seen.
    pub wan: Ipv4Addr,
    pub kind: NatKind,
    /// Its LAN's third octet.
    lan: u8,
    /// Hosts behind it so far.
    behind: u8,
}

/// A running lab; deleting its namespaces on drop.
pub struct Lab {
    prefix: String,
    router: String,
    hosts: Vec<Host>,
    nats: usize,
    made: Vec<String>,
    /// Daemons the lab runs in its routers (miniupnpd), killed on drop.
    daemons: Vec<std::process::Child>,
    /// Their configuration files.
    files: tempfile::TempDir,
}

impl Lab {
    /// Creates the router namespace (forwarding on, nothing impaired yet),
    /// after removing what runs killed before their cleanup left behind.
    pub fn new() -> Result<Self, String> {
        Self::remove_stale();
        let lab = LABS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("{PREFIX}{}-{lab}-", std::process::id());
        let mut lab = Self {
            router: format!("{prefix}router"),
            prefix,
            hosts: Vec::new(),
            nats: 0,
            made: Vec::new(),
            daemons: Vec::new(),
            files: tempfile::tempdir().map_err(|e| format!("no temporary dir: {e}"))?,
        };
        let router = lab.router.clone();
        lab.add_namespace(&router)?;
        forward(&router)?;
        Ok(lab)
    }

    /// Adds a NAT router of `kind` called `name` on the lab's network.
    /// Hosts go behind it with [`Lab::add_host_behind`].
    pub fn add_nat(&mut self, name: &str, kind: NatKind) -> Result<Nat, String> {
        if self.nats >= 250 {
            return Err("a lab has at most 250 NAT routers".into());
        }
        let wan = match kind {
            // 5.5.<n>.0/24: public-looking, and only inside the lab.
            NatKind::PortMapping => {
                let n = self.hosts.len() + 1;
                self.link_host(&format!("nat-{name}"), [5, 5, n as u8])?
            }
            _ => self.add_host(&format!("nat-{name}"))?,
        };
        self.nats += 1;
        let lan = self.nats as u8;
        let ns = wan.netns.clone();
        forward(&ns)?;
        // The LAN: a bridge the hosts behind are plugged into, there
        // before any daemon binds to it.
        sh(&format!("ip -n {ns} link add lan type bridge"))?;
        sh(&format!("ip -n {ns} addr add 10.210.{lan}.1/24 dev lan"))?;
        sh(&format!("ip -n {ns} link set lan up"))?;
        let ipt = format!("ip netns exec {ns} iptables");
        let mut rules = vec![
            // Replies, and what a DNAT let in, pass to the LAN; nothing
            // else the WAN sends does.
            format!("{ipt} -A FORWARD -i eth0 -m conntrack --ctstate ESTABLISHED,RELATED,DNAT -j ACCEPT"),
            format!("{ipt} -A FORWARD -i eth0 -j DROP"),
            // Like a home router's firewall, it drops what the WAN sends
            // to the router itself unasked, rather than answering it: an
            // answered packet would leave a connection-tracking entry that
            // takes the mapping a host behind it is about to open towards
            // that sender (the hole punch), so the NAT would pick another
            // port for it.
            format!("{ipt} -A INPUT -i eth0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
            format!("{ipt} -A INPUT -i eth0 -j DROP"),
        ];
        match kind {
            NatKind::Symmetric => rules.push(format!(
                "{ipt} -t nat -A POSTROUTING -o eth0 -j MASQUERADE --random-fully"
            )),
            NatKind::PortRestricted | NatKind::PortMapping => {
                rules.push(format!("{ipt} -t nat -A POSTROUTING -o eth0 -j MASQUERADE"))
            }
            NatKind::FullCone { port } => {
                rules.push(format!("{ipt} -t nat -A POSTROUTING -o eth0 -j MASQUERADE"));
                rules.push(format!(
                    "{ipt} -t nat -A PREROUTING -i eth0 -p udp --dport {port} -j DNAT --to-destination 10.210.{lan}.2:{port}"
                ));
            }
        }
        for r in &rules {
            sh(r)?;
        }
        if kind == NatKind::PortMapping {
            self.start_miniupnpd(&ns, lan)?;
        }
        Ok(Nat {
            netns: ns,
            wan: wan.ip,
            kind,
            lan,
            behind: 0,
        })
    }

    /// Gives NAT router `nat` the next WAN address of its /24 (the old one
    /// deleted, its default route made again) and flushes its connection
    /// tracking, so that every host behind it is seen at the new address
    /// from its next packet on.
    pub fn renumber(&self, nat: &mut Nat) -> Result<(), String> {
        let (ns, old) = (&nat.netns, nat.wan);
        let [a, b, c, d] = old.octets();
        let new = Ipv4Addr::new(
            a,
            b,
            c,
            d.checked_add(1)
                .filter(|n| *n < 255)
                .ok_or("no next address")?,
        );
        sh(&format!("ip -n {ns} addr del {old}/24 dev eth0"))?;
        sh(&format!("ip -n {ns} addr add {new}/24 dev eth0"))?;
        sh(&format!("ip -n {ns} route add default via {a}.{b}.{c}.1"))?;
        sh(&format!("ip netns exec {ns} conntrack -F"))?;
        nat.wan = new;
        Ok(())
    }

    /// Runs miniupnpd in router `ns` for its LAN `10.210.<lan>.0/24`:
    /// NAT-PMP and PCP only (no UPnP IGD), mappings of ports 1024 and up
    /// for the LAN's hosts, into a nftables table of its own.
    fn start_miniupnpd(&mut self, ns: &str, lan: u8) -> Result<(), String> {
        let dir = self.files.path();
        let nft = dir.join(format!("miniupnpd-{lan}.nft"));
        let conf = dir.join(format!("miniupnpd-{lan}.conf"));
        let pid = dir.join(format!("miniupnpd-{lan}.pid"));
        let write = |path: &std::path::Path, text: String| {
            std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
        };
        write(
            &nft,
            "table inet miniupnpd {\n\
             chain forward { type filter hook forward priority 0; policy accept; jump forward_miniupnpd; }\n\
             chain forward_miniupnpd { }\n\
             chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }\n\
             chain postrouting { type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; }\n\
             chain prerouting_miniupnpd { }\n\
             chain postrouting_miniupnpd { }\n\
             }\n"
                .to_string(),
        )?;
        write(
            &conf,
            format!(
                "ext_ifname=eth0\nlistening_ip=lan\nenable_natpmp=yes\nenable_upnp=no\n\
                 secure_mode=yes\nsystem_uptime=yes\n\
                 upnp_table_name=miniupnpd\nupnp_nat_table_name=miniupnpd\n\
                 upnp_forward_chain=forward_miniupnpd\nupnp_nat_chain=prerouting_miniupnpd\n\
                 upnp_nat_postrouting_chain=postrouting_miniupnpd\n\
                 allow 1024-65535 10.210.{lan}.0/24 1024-65535\n\
                 deny 0-65535 0.0.0.0/0 0-65535\n"
            ),
        )?;
        let path = |p: &std::path::Path| {
            p.to_str()
                .map(str::to_string)
                .ok_or("a non-UTF-8 temp path")
        };
        sh(&format!("ip netns exec {ns} nft -f {}", path(&nft)?))?;
        let log = std::fs::File::create(dir.join(format!("miniupnpd-{lan}.log")))
            .map_err(|e| format!("cannot create miniupnpd's log: {e}"))?;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                MINIUPNPD,
                "-d",
                "-f",
                &path(&conf)?,
                "-P",
                &path(&pid)?,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start miniupnpd: {e}"))?;
        self.daemons.push(child);
        Ok(())
    }

    /// What the daemons of the lab's routers logged (for a failure's message).
    pub fn daemon_logs(&self) -> String {
        let mut all = String::new();
        for n in 1..=self.nats {
            let path = self.files.path().join(format!("miniupnpd-{n}.log"));
            if let Ok(text) = std::fs::read_to_string(&path) {
                all.push_str(&format!("--- {}\n{text}", path.display()));
            }
        }
        all
    }

    /// Adds a host called `name` behind `nat`, on its LAN
    /// (`10.210.<k>.<2..>`), and returns it.
    pub fn add_host_behind(&mut self, nat: &mut Nat, name: &str) -> Result<Host, String> {
        if nat.behind >= 200 {
            return Err("a NAT of the lab has at most 200 hosts".into());
        }
        nat.behind += 1;
        let ns = format!("{}{name}", self.prefix);
        self.add_namespace(&ns)?;
        let (router, k, n) = (&nat.netns, nat.lan, nat.behind);
        let port = format!("lan{n}");
        sh(&format!(
            "ip -n {router} link add {port} type veth peer name eth0 netns {ns}"
        ))?;
        let gateway = format!("10.210.{k}.1");
        let ip = Ipv4Addr::new(10, 210, k, 1 + n);
        sh(&format!("ip -n {router} link set {port} master lan"))?;
        sh(&format!("ip -n {router} link set {port} up"))?;
        sh(&format!("ip -n {ns} addr add {ip}/24 dev eth0"))?;
        sh(&format!("ip -n {ns} link set eth0 up"))?;
        sh(&format!("ip -n {ns} route add default via {gateway}"))?;
        Ok(Host {
            netns: ns,
            ip,
            router_port: port,
        })
    }

    /// Namespaces of earlier runs whose test process is gone.
    fn remove_stale() {
        for ns in namespaces() {
            let Some(rest) = ns.strip_prefix(PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                eprintln!("removing namespace {ns} left by an earlier run");
                remove_namespace(&ns);
            }
        }
    }

    fn add_namespace(&mut self, ns: &str) -> Result<(), String> {
        sh(&format!("ip netns add {ns}"))?;
        self.made.push(ns.to_string());
        sh(&format!("ip -n {ns} link set lo up"))
    }

    /// The hosts linked to the lab's router, in the order they were added
    /// (those of [`Lab::start_supernodes`] first, if it came first).
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Adds a host called `name`, linked to the router, and returns it.
    pub fn add_host(&mut self, name: &str) -> Result<Host, String> {
        let n = self.hosts.len() + 1;
        if n > 250 {
            return Err("a lab has at most 250 hosts".into());
        }
        self.link_host(name, [10, 201, n as u8])
    }

    /// Adds a host called `name` on a /24 of its own, `net.2`, the router
    /// being `net.1`.
    fn link_host(&mut self, name: &str, net: [u8; 3]) -> Result<Host, String> {
        let n = self.hosts.len() + 1;
        let ns = format!("{}{name}", self.prefix);
        self.add_namespace(&ns)?;
        let port = format!("p{n}");
        let router = &self.router;
        // Made inside the router's namespace, its peer moved straight into
        // the host's: neither end ever exists in the host's own namespace.
        sh(&format!(
            "ip -n {router} link add {port} type veth peer name eth0 netns {ns}"
        ))?;
        let [a, b, c] = net;
        let gateway = format!("{a}.{b}.{c}.1");
        let ip = Ipv4Addr::new(a, b, c, 2);
        sh(&format!("ip -n {router} addr add {gateway}/24 dev {port}"))?;
        sh(&format!("ip -n {router} link set {port} up"))?;
        sh(&format!("ip -n {ns} addr add {ip}/24 dev eth0"))?;
        sh(&format!("ip -n {ns} link set eth0 up"))?;
        sh(&format!("ip -n {ns} route add default via {gateway}"))?;
        let host = Host {
            netns: ns,
            ip,
            router_port: port,
        };
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// Starts `n` supernodes, each on a host of its own (`sn1`, `sn2`, ...)
    /// listening on `port`, every one given the others as peers, their
    /// data dirs under `data`, `extra` added to each command line.
    /// Returns their addresses and processes (killed on drop, before the
    /// lab's namespaces go).
    pub fn start_supernodes(
        &mut self,
        bins: &Binaries,
        n: usize,
        port: u16,
        data: &Path,
        timeout: Duration,
        extra: &[String],
    ) -> Result<(Vec<String>, Vec<Process>), String> {
        let hosts = (1..=n)
            .map(|i| self.add_host(&format!("sn{i}")))
            .collect::<Result<Vec<Host>, String>>()?;
        let addrs: Vec<String> = hosts.iter().map(|h| format!("{}:{port}", h.ip)).collect();
        let mut procs = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let dir = data.join(format!("sn{i}"));
            std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            let mut args = vec![
                "--listen".to_string(),
                addrs[i].clone(),
                "--data-dir".to_string(),
                bins::path_arg(&dir),
            ];
            for (j, peer) in addrs.iter().enumerate() {
                if j != i {
                    args.extend(["--peer".to_string(), peer.clone()]);
                }
            }
            args.extend(extra.iter().cloned());
            let cmd = bins::command(Some(&host.netns), &bins.supernode, &args);
            procs.push(Process::start(cmd, "supernode", timeout)?);
        }
        Ok((addrs, procs))
    }

    /// From now on the router drops each forwarded packet with probability
    /// `loss` (so each direction of every path loses that share), and each
    /// link carries at most `rate` (a `tc` rate such as `"20mbit"`) each
    /// way: shaped on the host's way out and on the router's way to it.
    pub fn impair(&self, loss: f64, rate: &str) -> Result<(), String> {
        let router = &self.router;
        let in_router = format!("ip netns exec {router}");
        // A rule with no target only counts: every packet forwarded.
        sh(&format!("{in_router} iptables -A FORWARD"))?;
        sh(&format!(
            "{in_router} iptables -A FORWARD -m statistic --mode random --probability {loss:.4} -j DROP"
        ))?;
        // A burst of a few dozen packets and a queue of at most 25 ms: the
        // cap is a link's, not a huge buffer's.
        let tbf = format!("root tbf rate {rate} burst 32kb latency 25ms");
        for host in &self.hosts {
            let (port, ns) = (&host.router_port, &host.netns);
            sh(&format!("{in_router} tc qdisc add dev {port} {tbf}"))?;
            sh(&format!("ip netns exec {ns} tc qdisc add dev eth0 {tbf}"))?;
        }
        Ok(())
    }

    /// Packets (as the kernel's buffers: a GSO batch of datagrams counts
    /// once) the router has forwarded or dropped, and of those dropped,
    /// since [`Lab::impair`].
    pub fn packet_counts(&self) -> Option<(u64, u64)> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.router,
                "iptables",
                "-nvxL",
                "FORWARD",
            ])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        // Rows after the two header lines: pkts bytes target prot ...
        let mut rows = text.lines().skip(2).map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let pkts = f.first().and_then(|n| n.parse::<u64>().ok());
            (pkts, l.contains("DROP"))
        });
        let (seen, _) = rows.next()?;
        let (dropped, is_drop) = rows.next()?;
        is_drop.then_some((seen?, dropped?))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
        // Hosts first, the router last: by then nothing is linked to it.
        for ns in self.made.iter().rev() {
            remove_namespace(ns);
        }
    }
}
