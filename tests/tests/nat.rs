//! Leaves behind NATs, in a lab of network namespaces (`servent_tests::lab`):
//! two supernodes on the lab's "public" network, and leaves of every kind
//! the lab makes: public, behind a full-cone NAT, behind a port-restricted
//! one (plain `MASQUERADE`), behind a symmetric one (`MASQUERADE
//! --random-fully`) and behind a port-restricted one that runs a real
//! NAT-PMP daemon (`miniupnpd`). The real binaries run through the CLI
//! contract.
//!
//! Each leaf first judges its NAT from what its supernodes saw (`/status`
//! `nat`); then every leaf downloads every other leaf's file with `leaf
//! get`, and the matrix of outcomes is printed. Every pair must complete
//! and verify, by the path the two NAT behaviours allow in theory:
//! directly when a dial reaches the source (public, full cone, the port
//! the NAT-PMP leaf had mapped), by the source dialling back when the
//! downloader is public, by a hole punch when both mappings are
//! endpoint-independent, and through a supernode's relay for the rest (a
//! symmetric NAT against anything but a public downloader, a
//! port-restricted source against a symmetric downloader).
//!
//! Needs root, `ip netns`, `iptables`, `tc`, `nft`, `conntrack`, Debian's
//! `miniupnpd` and `curl` (to read a leaf's `/status` inside its namespace); without
//! them it says why and passes without running. CI runs as root and
//! installs them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use servent_proto::path::{Nat, Path};
use servent_tests::bins::{self, path_arg, Process};
use servent_tests::lab::{self, Host, Lab, NatKind};

const SUPERNODE_PORT: u16 = 7400;
const LEAF_PORT: u16 = 7401;
const HTTP: &str = "127.0.0.1:7480";
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Until each leaf is registered with both supernodes and has judged its NAT.
const KNOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Until every leaf's file is found by search from every other.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// `leaf get --timeout`, and the longest one `get` process may run.
const GET_SECS: &str = "10";
const GET_LIMIT: Duration = Duration::from_secs(40);
/// Until searches name a renumbered leaf at its new address.
const MOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Each leaf's file: big enough to take a few round trips.
const FILE_LEN: u64 = 1 << 20;
/// The file downloaded while its source's router is renumbered, and the
/// source's upload rate, so that it is in flight for about 4 s.
const MOVING_LEN: u64 = 16 << 20;
const MOVING_RATE: &str = "4194304";

/// Why the lab cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    if let Some(why) = lab::unavailable().or_else(lab::nat_tools_unavailable) {
        return Some(why);
    }
    match Command::new("curl")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        _ => Some("no `curl` to read /status inside a namespace".into()),
    }
}

/// `GET /status` of the leaf in `host`'s namespace, parsed.
fn status(host: &Host) -> Option<serde_json::Value> {
    serde_json::from_slice(&http_get(host, "/status")?).ok()
}

/// Counter `name` of the leaf in `host`'s namespace (`GET /metrics`).
fn counter(host: &Host, name: &str) -> Option<u64> {
    let text = String::from_utf8(http_get(host, "/metrics")?).ok()?;
    let line = text.lines().find(|l| l.starts_with(&format!("{name} ")))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<f64>()
        .ok()
        .map(|v| v as u64)
}

/// The body of `GET path` from the leaf in `host`'s namespace.
fn http_get(host: &Host, path: &str) -> Option<Vec<u8>> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &host.netns,
            "curl",
            "-sf",
            "--max-time",
            "2",
        ])
        .arg(format!("http://{HTTP}{path}"))
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

/// Whether miniupnpd in router namespace `ns` forwards UDP `port` now
/// (a DNAT rule in its table).
fn forwards(ns: &str, port: u16) -> bool {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "nft",
            "list",
            "chain",
            "inet",
            "miniupnpd",
            "prerouting_miniupnpd",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("nft runs");
    let rules = String::from_utf8_lossy(&out.stdout);
    rules
        .lines()
        .any(|l| l.contains(&format!("dport {port}")) && l.contains("dnat"))
}

/// Every source address the hits of a `leaf search --json` name.
fn addrs_of(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .flat_map(|v| v["addrs"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a.as_str().map(str::to_string))
        .collect()
}

/// Waits for `f` to give a value, every 200 ms, for at most `timeout`;
/// the panic says `what` did not happen.
fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(started.elapsed() < timeout, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One leaf of the lab: where it runs, behind what, and where others
/// should see it.
struct Leaf {
    kind: &'static str,
    host: Host,
    /// BLAKE3 of the file it shares.
    hash: String,
    /// The address its NAT (or its own interface) gives it on the lab's
    /// network.
    outside: std::net::Ipv4Addr,
    _proc: Process,
}

#[test]
fn leaves_behind_every_nat_kind_know_their_address_and_download_where_a_path_exists() {
    if let Some(why) = unavailable() {
        eprintln!(
            "SKIPPED leaves_behind_every_nat_kind_know_their_address_and_download_where_a_path_exists: {why}"
        );
        return;
    }
    let bins = bins::binaries().expect("the binaries build");
    let tmp = servent_tests::bins::Scratch::new().expect("tempdir");
    let dir = |name: &str| tmp.dir(name).expect("mkdir");
    // Processes are declared after the lab, so they are killed before its
    // namespaces go (the lab would kill them anyway).
    let mut lab = Lab::new().expect("lab router");
    let (sn_addrs, supernodes) = lab
        .start_supernodes(&bins, 2, SUPERNODE_PORT, tmp.path(), START_TIMEOUT, &[])
        .expect("supernodes start");

    let mut placed: Vec<(&'static str, Host, std::net::Ipv4Addr)> = Vec::new();
    let public = lab.add_host("leaf-public").expect("public leaf host");
    placed.push(("public", public.clone(), public.ip));
    // The NAT-PMP router's namespace, to look at its mappings.
    let mut pmp_router = None;
    // The port-restricted router's namespace and WAN address, to renumber it.
    let mut pr_router = None;
    for kind in [
        NatKind::FullCone { port: LEAF_PORT },
        NatKind::PortRestricted,
        NatKind::Symmetric,
        NatKind::PortMapping,
    ] {
        let mut nat = lab.add_nat(kind.name(), kind).expect("NAT router");
        let host = lab
            .add_host_behind(&mut nat, &format!("leaf-{}", kind.name()))
            .expect("host behind the NAT");
        placed.push((kind.name(), host, nat.wan));
        if kind == NatKind::PortMapping {
            pmp_router = Some(nat.netns.clone());
        }
        if kind == NatKind::PortRestricted {
            pr_router = Some(nat.clone());
        }
    }
    let pmp_router = pmp_router.expect("a NAT-PMP router");
    let mut pr_router = pr_router.expect("a port-restricted router");
    // A second leaf behind the port-restricted router: the two reach each
    // other only through it (it does not hairpin) or around it.
    let same = lab
        .add_host_behind(&mut pr_router, "leaf-same-nat")
        .expect("a second host behind the port-restricted NAT");
    placed.push(("same-nat", same, pr_router.wan));

    let mut leaves = Vec::new();
    let mut moving_hash = String::new();
    for (kind, host, outside) in placed {
        let share = dir(&format!("share-{kind}"));
        let seed = 1 + placed_seed(kind);
        let hash = bins::write_random_file(&share.join(format!("nat-{kind}.bin")), FILE_LEN, seed)
            .expect("file");
        let data = dir(&format!("leaf-{kind}"));
        let (share_arg, listen) = (path_arg(&share), format!("0.0.0.0:{LEAF_PORT}"));
        let mut serve = vec![
            "serve",
            "--share",
            &share_arg,
            "--listen",
            &listen,
            "--http",
            HTTP,
            "--no-promote",
        ];
        // The leaf whose router is renumbered also serves a bigger file,
        // slowly, to be downloaded across the renumbering.
        if kind == "port-restricted" {
            moving_hash =
                bins::write_random_file(&share.join("moving.bin"), MOVING_LEN, 99).expect("file");
            serve.extend(["--max-upload-rate", MOVING_RATE]);
        }
        let cmd = bins::leaf_command(&bins, &host.netns, &sn_addrs, &data, &serve);
        let proc = Process::start(cmd, "leaf", START_TIMEOUT).expect("leaf serve starts");
        leaves.push(Leaf {
            kind,
            host,
            hash,
            outside,
            _proc: proc,
        });
    }

    println!("{:<16} {:<22} reflexive", "leaf", "mapping");
    for leaf in &leaves {
        let started = Instant::now();
        let nat = loop {
            let s = status(&leaf.host);
            let nat = s.as_ref().map(|s| s["nat"].clone());
            let attached = s
                .as_ref()
                .and_then(|s| s["supernodes"].as_array().map(Vec::len));
            // The NAT-PMP leaf is done once its gateway has mapped its port.
            let done = |n: &serde_json::Value| {
                n["mapping"] != "unknown"
                    && attached == Some(2)
                    && (leaf.kind != "nat-pmp" || !n["port_mapped"].is_null())
            };
            if let Some(nat) = nat.filter(done) {
                break nat;
            }
            assert!(
                started.elapsed() < KNOWN_TIMEOUT,
                "the {} leaf did not judge its NAT within {KNOWN_TIMEOUT:?}: {s:?}\n{}",
                leaf.kind,
                lab.daemon_logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let reflexive: Vec<String> = nat["reflexive"]
            .as_array()
            .expect("reflexive is a list")
            .iter()
            .map(|a| a.as_str().expect("an address").to_string())
            .collect();
        println!("{:<16} {:<22} {reflexive:?}", leaf.kind, nat["mapping"]);
        let at_outside = format!("{}:{LEAF_PORT}", leaf.outside);
        match leaf.kind {
            "public" => {
                assert_eq!(nat["mapping"], "none", "{nat}");
                assert_eq!(reflexive, std::slice::from_ref(&at_outside), "{nat}");
            }
            "full-cone" | "port-restricted" | "nat-pmp" => {
                // MASQUERADE keeps the port when it is free.
                assert_eq!(nat["mapping"], "endpoint-independent", "{nat}");
                assert_eq!(reflexive, std::slice::from_ref(&at_outside), "{nat}");
            }
            "same-nat" => {
                // Its port was taken by the leaf beside it: another one,
                // the same towards both supernodes.
                assert_eq!(nat["mapping"], "endpoint-independent", "{nat}");
                let wan = format!("{}:", leaf.outside);
                assert!(
                    reflexive.len() == 1 && reflexive[0].starts_with(&wan),
                    "{nat}"
                );
            }
            "symmetric" => {
                assert_eq!(nat["mapping"], "endpoint-dependent", "{nat}");
                assert_eq!(reflexive.len(), 2, "a port per supernode: {nat}");
                let wan = format!("{}:", leaf.outside);
                assert!(reflexive.iter().all(|a| a.starts_with(&wan)), "{nat}");
            }
            other => unreachable!("no leaf kind {other}"),
        }
        match leaf.kind {
            "nat-pmp" => assert_eq!(nat["port_mapped"], at_outside.as_str(), "{nat}"),
            _ => assert!(nat["port_mapped"].is_null(), "{nat}"),
        }
    }

    // Every leaf downloads every other's file, from a data dir of its own
    // (a `leaf get` beside its `leaf serve`), once the file is findable.
    let started = Instant::now();
    for d in &leaves {
        for s in leaves.iter().filter(|s| s.kind != d.kind) {
            loop {
                let data = dir(&format!("search-{}-{}", d.kind, s.kind));
                let cmd = bins::leaf_command(
                    &bins,
                    &d.host.netns,
                    &sn_addrs,
                    &data,
                    &[
                        "search",
                        "--json",
                        "--timeout",
                        "3",
                        &format!("nat-{}", s.kind),
                    ],
                );
                if bins::has_hit(&bins::run(cmd, GET_LIMIT).stdout, &s.hash) {
                    break;
                }
                assert!(
                    started.elapsed() < READY_TIMEOUT,
                    "the {} leaf's file is not found from the {} leaf",
                    s.kind,
                    d.kind
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    println!();
    println!(
        "{:<16} {:<16} {:<10} {:<9} {:>10} {:>8}  detail",
        "downloader", "source", "outcome", "route", "first byte", "secs"
    );
    let mut failures = Vec::new();
    for d in &leaves {
        for s in leaves.iter().filter(|s| s.kind != d.kind) {
            let data = dir(&format!("get-{}-{}", d.kind, s.kind));
            let out = data.join("got.bin");
            let cmd = bins::leaf_command(
                &bins,
                &d.host.netns,
                &sn_addrs,
                &data,
                &[
                    "get",
                    "--json",
                    "--timeout",
                    GET_SECS,
                    "--out",
                    &path_arg(&out),
                    &s.hash,
                ],
            );
            let got = bins::run(cmd, GET_LIMIT);
            let verified =
                got.success() && bins::hash_file(&out).ok().as_deref() == Some(s.hash.as_str());
            let detail = match verified {
                true => String::new(),
                false => got.stderr.lines().last().unwrap_or("").to_string(),
            };
            let route = bins::route_of(&got.stdout);
            let first_byte = bins::first_byte_of(&got.stdout)
                .map_or("-".to_string(), |d| format!("{:.2}", d.as_secs_f64()));
            println!(
                "{:<16} {:<16} {:<10} {:<9} {first_byte:>10} {:>8.2}  {detail}",
                d.kind,
                s.kind,
                if verified { "done" } else { "failed" },
                route.as_deref().unwrap_or("-"),
                got.took.as_secs_f64()
            );
            let expected = path(d.kind, s.kind);
            if !verified {
                failures.push(format!("{} from {}: {detail}", d.kind, s.kind));
            }
            // A direct dial is used where it reaches, a relay only where
            // nothing else can; the others went by dial back or punch
            // (which of the two wins is a race when both could).
            // A punch between two port-restricted NATs may show as the
            // source's dial back winning (its dial is the one that opens
            // the way last), and a reverse connect as a punch.
            let around = |p: Path| matches!(p, Path::Reversed | Path::Punched);
            let taken = match route.as_deref() {
                Some("direct") => Some(Path::Direct),
                Some("reversed") => Some(Path::Reversed),
                Some("punched") => Some(Path::Punched),
                Some("relayed") => Some(Path::Relayed),
                _ => None,
            };
            let as_expected =
                taken.is_some_and(|t| t == expected || (around(t) && around(expected)));
            if verified && !as_expected {
                failures.push(format!(
                    "{} from {}: route {route:?}, expected {expected:?}",
                    d.kind, s.kind
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "downloads that the NATs allow failed: {failures:#?}"
    );

    // The port-restricted router is renumbered and its mappings flushed
    // while the public leaf downloads from the leaf behind it: that leaf
    // is seen at the new address, its sessions and the download carried
    // over by QUIC's migration, and searches name that address within 5 s.
    let public = leaves
        .iter()
        .find(|l| l.kind == "public")
        .expect("the public leaf");
    let pr = leaves
        .iter()
        .find(|l| l.kind == "port-restricted")
        .expect("the port-restricted leaf");
    let sent = || counter(&pr.host, "servent_uploaded_bytes_total").unwrap_or(0);
    let sent_before = sent();
    let moving_data = dir("get-moving");
    let moving_out = moving_data.join("moving.bin");
    let cmd = bins::leaf_command(
        &bins,
        &public.host.netns,
        &sn_addrs,
        &moving_data,
        &[
            "get",
            "--json",
            "--timeout",
            GET_SECS,
            "--out",
            &path_arg(&moving_out),
            &moving_hash,
        ],
    );
    let getter = std::thread::spawn(move || bins::run(cmd, GET_LIMIT));
    let started = Instant::now();
    while sent() < sent_before + MOVING_LEN / 4 {
        assert!(
            started.elapsed() < GET_LIMIT && !getter.is_finished(),
            "the download to be moved did not get under way"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let pr_wan = pr_router.wan;
    lab.renumber(&mut pr_router).expect("renumber the router");
    let new_wan = pr_router.wan;
    let moved_at = Instant::now();
    let (old_addr, new_addr) = (
        format!("{pr_wan}:{LEAF_PORT}"),
        format!("{new_wan}:{LEAF_PORT}"),
    );
    let addrs = loop {
        let data = dir("search-after-move");
        let cmd = bins::leaf_command(
            &bins,
            &public.host.netns,
            &sn_addrs,
            &data,
            &["search", "--json", "--timeout", "1", "nat-port-restricted"],
        );
        let addrs = addrs_of(&bins::run(cmd, GET_LIMIT).stdout);
        if addrs.contains(&new_addr) && !addrs.contains(&old_addr) {
            break addrs;
        }
        assert!(
            moved_at.elapsed() < MOVE_TIMEOUT,
            "{MOVE_TIMEOUT:?} after the renumbering, searches name {addrs:?}, not only {new_addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "\nport-restricted router renumbered {pr_wan} -> {new_wan}: searches name {addrs:?} after {:.2} s",
        moved_at.elapsed().as_secs_f64()
    );
    let got = getter.join().expect("the download thread");
    let verified =
        got.success() && bins::hash_file(&moving_out).ok().as_deref() == Some(moving_hash.as_str());
    assert!(
        verified,
        "the download in flight across the renumbering failed: {}",
        got.stderr
    );
    println!(
        "a {} MiB download from that leaf, in flight across it, completed and verified in {:.2} s (route {:?})",
        MOVING_LEN >> 20,
        got.took.as_secs_f64(),
        bins::route_of(&got.stdout)
    );

    // The NAT-PMP leaf removes its mapping when it stops.
    assert!(
        forwards(&pmp_router, LEAF_PORT),
        "no mapping on the router while the leaf runs"
    );
    let at = leaves
        .iter()
        .position(|l| l.kind == "nat-pmp")
        .expect("the NAT-PMP leaf");
    let leaf = leaves.remove(at);
    assert!(
        leaf._proc.terminate(Duration::from_secs(10)),
        "leaf serve did not stop on SIGTERM"
    );
    assert!(
        !forwards(&pmp_router, LEAF_PORT),
        "the router still forwards port {LEAF_PORT} after the leaf stopped:\n{}",
        lab.daemon_logs()
    );
    drop(leaves);
    drop(supernodes);
}

/// A leaf behind a NAT-PMP gateway that maps it another port than the one
/// it listens on (the port asked for is taken by the leaf beside it)
/// registers that port: searches name it, a download from outside dials
/// it directly, the election's dial-back reaches it, and once elected it
/// tells the mesh that port. A leaf behind a plain port-restricted NAT,
/// as willing, fails the dial-back and is never elected (issue 13, rule 7:
/// a mapping a dial-back confirms counts as reachable; a punch or a relay
/// never does).
#[test]
fn a_leaf_mapped_another_port_is_dialled_there_and_elected_and_a_natted_one_is_not() {
    if let Some(why) = unavailable() {
        eprintln!(
            "SKIPPED a_leaf_mapped_another_port_is_dialled_there_and_elected_and_a_natted_one_is_not: {why}"
        );
        return;
    }
    let bins = bins::binaries().expect("the binaries build");
    let tmp = servent_tests::bins::Scratch::new().expect("tempdir");
    let dir = |name: &str| tmp.dir(name).expect("mkdir");
    // One seed, overloaded by three leaves, electing quickly.
    let config = tmp.path().join("supernode.toml");
    std::fs::write(
        &config,
        "max_leaves = 3\n\
         [election]\n\
         rules = \"overload\"\n\
         overload_secs = 1.0\n\
         jitter_secs = 1.0\n\
         cooldown_secs = 3.0\n\
         min_uptime_secs = 1.0\n\
         min_cpu_idle_permille = 0\n\
         min_mem_mib = 0\n",
    )
    .expect("config");
    let mut lab = Lab::new().expect("lab router");
    let extra = [
        "--config".to_string(),
        path_arg(&config),
        "--http".to_string(),
        HTTP.to_string(),
    ];
    let (sn_addrs, _supernodes) = lab
        .start_supernodes(&bins, 1, SUPERNODE_PORT, tmp.path(), START_TIMEOUT, &extra)
        .expect("the supernode starts");
    let sn_host = lab.hosts().first().cloned().expect("the supernode's host");
    let public = lab.add_host("leaf-public").expect("public host");
    let mut pmp = lab
        .add_nat("pmp", NatKind::PortMapping)
        .expect("NAT-PMP router");
    let first = lab
        .add_host_behind(&mut pmp, "leaf-pmp-first")
        .expect("host");
    let second = lab
        .add_host_behind(&mut pmp, "leaf-pmp-second")
        .expect("host");
    let mut pr = lab
        .add_nat("pr", NatKind::PortRestricted)
        .expect("NAT router");
    let natted = lab.add_host_behind(&mut pr, "leaf-natted").expect("host");

    let listen = format!("0.0.0.0:{LEAF_PORT}");
    let start = |host: &Host, name: &str, willing: bool| {
        let share = dir(&format!("share-{name}"));
        let hash = bins::write_random_file(
            &share.join(format!("mapped-{name}.bin")),
            FILE_LEN,
            placed_seed(name),
        )
        .expect("file");
        let share_arg = path_arg(&share);
        let mut args = vec![
            "serve", "--share", &share_arg, "--listen", &listen, "--http", HTTP,
        ];
        if !willing {
            args.push("--no-promote");
        }
        let data = dir(&format!("leaf-{name}"));
        let cmd = bins::leaf_command(&bins, &host.netns, &sn_addrs, &data, &args);
        let proc = Process::start(cmd, "leaf", START_TIMEOUT).expect("leaf serve starts");
        (proc, hash)
    };
    let mapped = |host: &Host| {
        status(host).and_then(|s| s["nat"]["port_mapped"].as_str().map(str::to_string))
    };
    // The first takes port 7401 on the gateway; the second, started once
    // the first holds it, is given another.
    let (_first, _) = start(&first, "first", false);
    let at_7401 = format!("{}:{LEAF_PORT}", pmp.wan);
    let got = wait_for(KNOWN_TIMEOUT, "the first leaf's port mapping", || {
        mapped(&first)
    });
    assert_eq!(got, at_7401);
    let (_second, hash) = start(&second, "second", true);
    let elsewhere = wait_for(KNOWN_TIMEOUT, "the second leaf's port mapping", || {
        mapped(&second)
    });
    let wan = format!("{}:", pmp.wan);
    assert!(
        elsewhere.starts_with(&wan) && elsewhere != at_7401,
        "the gateway mapped {elsewhere}, not another port of {}",
        pmp.wan
    );
    let port: u16 = elsewhere[wan.len()..].parse().expect("a port");
    assert!(forwards(&pmp.netns, port), "miniupnpd forwards {port}");
    let (_natted, _) = start(&natted, "natted", true);

    // Searches name the mapped port, and a download from outside dials it.
    let addrs = wait_for(READY_TIMEOUT, "searches naming the mapped port", || {
        let data = dir("search-mapped");
        let cmd = bins::leaf_command(
            &bins,
            &public.netns,
            &sn_addrs,
            &data,
            &["search", "--json", "--timeout", "2", "mapped-second"],
        );
        let addrs = addrs_of(&bins::run(cmd, GET_LIMIT).stdout);
        (addrs == [elsewhere.clone()]).then_some(addrs)
    });
    println!("the leaf mapped to {elsewhere} is found at {addrs:?}");
    let data = dir("get-mapped");
    let out = data.join("got.bin");
    let cmd = bins::leaf_command(
        &bins,
        &public.netns,
        &sn_addrs,
        &data,
        &[
            "get",
            "--json",
            "--timeout",
            GET_SECS,
            "--out",
            &path_arg(&out),
            &hash,
        ],
    );
    let got = bins::run(cmd, GET_LIMIT);
    assert!(
        got.success() && bins::hash_file(&out).ok().as_deref() == Some(hash.as_str()),
        "the download from the mapped leaf failed: {}",
        got.stderr
    );
    assert_eq!(
        bins::route_of(&got.stdout).as_deref(),
        Some("direct"),
        "a dial to the mapped port reaches the leaf: {}",
        got.stdout
    );

    // The election: the mapped leaf passes the dial-back and is elected;
    // the natted one, as willing, fails it.
    let role = |host: &Host| status(host).and_then(|s| s["role"].as_str().map(str::to_string));
    wait_for(Duration::from_secs(40), "the mapped leaf elected", || {
        (role(&second).as_deref() == Some("supernode")).then_some(())
    });
    let reached = counter(&sn_host, "servent_dial_backs_reached_total").unwrap_or(0);
    assert!(reached >= 1, "no dial-back reached a leaf");
    wait_for(
        Duration::from_secs(20),
        "the natted leaf's dial-back failing",
        || (counter(&sn_host, "servent_dial_backs_failed_total").unwrap_or(0) >= 1).then_some(()),
    );
    assert_eq!(
        role(&natted).as_deref(),
        Some("leaf"),
        "the natted leaf was elected"
    );
    // Elected, it tells the mesh the mapped port.
    let neighbors = wait_for(
        KNOWN_TIMEOUT,
        "the seed meshed with the elected leaf",
        || {
            let s = status(&sn_host)?;
            let n: Vec<String> = s["neighbors"]
                .as_array()?
                .iter()
                .filter_map(|n| n["addr"].as_str().map(str::to_string))
                .collect();
            (!n.is_empty()).then_some(n)
        },
    );
    assert_eq!(
        neighbors,
        std::slice::from_ref(&elsewhere),
        "the seed's neighbours"
    );
    println!("elected at {elsewhere}; the seed's neighbours: {neighbors:?}");
}

/// A seed per leaf kind, so every leaf's file differs.
fn placed_seed(kind: &str) -> u64 {
    kind.bytes().map(u64::from).sum()
}

/// The path a `leaf get` behind `downloader`'s NAT takes to a source
/// behind `source`'s: the most direct one the two NATs allow in theory
/// (`servent_proto::path`). `leaf get` dials from a socket of its own,
/// which no DNAT or port mapping covers: behind the full cone and the
/// NAT-PMP router it is port-restricted (an endpoint-independent mapping).
fn path(downloader: &str, source: &str) -> Path {
    let serving = |kind: &str| match kind {
        "public" | "full-cone" | "nat-pmp" => Nat::Open,
        "port-restricted" | "same-nat" => Nat::PortRestricted,
        "symmetric" => Nat::Symmetric,
        other => unreachable!("no leaf kind {other}"),
    };
    let dialling = match downloader {
        "public" => Nat::Open,
        other => match serving(other) {
            Nat::Open => Nat::PortRestricted,
            nat => nat,
        },
    };
    // Two leaves behind the one port-restricted router, which does not
    // hairpin.
    let behind_pr = |kind: &str| kind == "port-restricted" || kind == "same-nat";
    servent_proto::path::path(
        dialling,
        serving(source),
        behind_pr(downloader) && behind_pr(source),
    )
}
