//! Time to reach a source behind a NAT, in the lab of network namespaces
//! (`servent_tests::lab`): the whole `leaf get` of a 1 MiB file (start,
//! locate, connect, transfer, rename), from
//! - a public downloader to a public source: the direct baseline;
//! - a public downloader to a source behind a port-restricted NAT: the
//!   source dials back (reverse connect);
//! - a downloader behind a full-cone NAT (its `leaf get` socket is not the
//!   forwarded one, so it is port-restricted too) to that same source:
//!   both dial at once (hole punch);
//! - a downloader behind a symmetric NAT to that same source: no punch
//!   can work, and a supernode relays (docs/PROTOCOL.md 10.6).
//!
//! Pairs run interleaved, try by try, in one lab; each try is a fresh
//! data dir. Printed per pair: the routes taken, p50 and p99 (the slowest
//! of 20) of the command's wall time, the p50's ratio to the direct
//! baseline and the extra time over it.
//!
//! Then throughput: a big file (`SERVENT_BENCH_MIB`, 256 MiB; 16 quick)
//! downloaded directly (public <- public) and relayed (symmetric <-
//! port-restricted), interleaved, 3 times each (1 quick): MB/s of the
//! whole `leaf get`, and the relayed one's ratio to direct. The
//! supernodes run with the relay's rate caps lifted, so the figure is
//! the path's, not the operator's budget; the CPU time the two
//! supernodes spent during the relayed downloads, per GiB, is printed
//! beside the source leaf's, which served the same bytes (its CPU per
//! GiB is the baseline: what a relay costs next to what serving costs).
//!
//! `cargo bench -p servent-tests --bench nat_connect` makes 20 tries
//! (`SERVENT_BENCH_TRIES`); invoked any other way (as `cargo test
//! --all-targets` does) it makes 2. Needs root, `ip netns`, `iptables`,
//! `nft`, `conntrack` and Debian's `miniupnpd` (the lab's checks); without
//! them it says so and does nothing.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use servent_tests::bench;
use servent_tests::bins::{self, path_arg, Process};
use servent_tests::lab::{self, Host, Lab, NatKind};

const SUPERNODE_PORT: u16 = 7400;
const LEAF_PORT: u16 = 7401;
const START_TIMEOUT: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const GET_LIMIT: Duration = Duration::from_secs(40);
const FILE_LEN: u64 = 1 << 20;

fn main() -> Result<()> {
    bench::init_logging();
    if let Some(why) = lab::unavailable().or_else(lab::nat_tools_unavailable) {
        println!("nat_connect: SKIPPED: {why}");
        return Ok(());
    }
    let full = bench::full_mode();
    let tries: usize = bench::setting("SERVENT_BENCH_TRIES", full, 20, 2)?;
    let bins = bins::binaries().map_err(anyhow::Error::msg)?;
    let tmp = tempfile::tempdir()?;
    let dir = |name: &str| -> Result<std::path::PathBuf> {
        let p = tmp.path().join(name);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    };
    let big_mib: u64 = bench::setting("SERVENT_BENCH_MIB", full, 256, 16)?;
    let big_tries: usize = if full { 3 } else { 1 };
    let mut lab = Lab::new().map_err(anyhow::Error::msg)?;
    // Relay rates uncapped (4 GiB/s), so throughput is the path's.
    let config = tmp.path().join("supernode.toml");
    std::fs::write(
        &config,
        "[relay]\ncircuit_rate = 4294967295\ntotal_rate = 4294967295\n",
    )?;
    let extra = ["--config".to_string(), path_arg(&config)];
    let (sns, supernodes) = lab
        .start_supernodes(&bins, 2, SUPERNODE_PORT, tmp.path(), START_TIMEOUT, &extra)
        .map_err(anyhow::Error::msg)?;
    let public_dl = lab.add_host("dl-public").map_err(anyhow::Error::msg)?;
    let public_src = lab.add_host("src-public").map_err(anyhow::Error::msg)?;
    let behind = |lab: &mut Lab, kind: NatKind, name: &str| -> Result<Host> {
        let mut nat = lab.add_nat(kind.name(), kind).map_err(anyhow::Error::msg)?;
        lab.add_host_behind(&mut nat, name)
            .map_err(anyhow::Error::msg)
    };
    let nat_src = behind(&mut lab, NatKind::PortRestricted, "src-pr")?;
    let nat_dl = behind(&mut lab, NatKind::FullCone { port: LEAF_PORT }, "dl-fc")?;
    let sym_dl = behind(&mut lab, NatKind::Symmetric, "dl-sym")?;

    // The two sources serve a file each, and a big one each; the
    // downloaders need no `serve`.
    let mut sources: Vec<(String, Process)> = Vec::new();
    let mut big: Vec<String> = Vec::new();
    for (i, host) in [&public_src, &nat_src].into_iter().enumerate() {
        let share = dir(&format!("share-{i}"))?;
        let hash =
            bins::write_random_file(&share.join(format!("file-{i}.bin")), FILE_LEN, 7 + i as u64)?;
        big.push(bins::write_random_file(
            &share.join(format!("file-big-{i}.bin")),
            big_mib << 20,
            70 + i as u64,
        )?);
        let data = dir(&format!("src-{i}"))?;
        let listen = format!("0.0.0.0:{LEAF_PORT}");
        let share = path_arg(&share);
        let serve = [
            "serve",
            "--share",
            &share,
            "--listen",
            &listen,
            "--no-promote",
        ];
        let cmd = bins::leaf_command(&bins, &host.netns, &sns, &data, &serve);
        let proc = Process::start(cmd, "leaf", START_TIMEOUT).map_err(anyhow::Error::msg)?;
        sources.push((hash, proc));
    }
    let (direct_hash, nat_hash) = (sources[0].0.clone(), sources[1].0.clone());
    let pairs: [(&str, &Host, &str); 4] = [
        ("direct (public <- public)", &public_dl, &direct_hash),
        ("reverse (public <- port-restricted)", &public_dl, &nat_hash),
        ("punch (full-cone <- port-restricted)", &nat_dl, &nat_hash),
        ("relay (symmetric <- port-restricted)", &sym_dl, &nat_hash),
    ];
    let big_pairs: [(&str, &Host, &str); 2] = [
        ("direct (public <- public)", &public_dl, &big[0]),
        ("relayed (symmetric <- port-restricted)", &sym_dl, &big[1]),
    ];
    // Until every downloader finds its files.
    for (name, host, hash) in pairs.iter().chain(&big_pairs) {
        let started = std::time::Instant::now();
        loop {
            let data = dir(&format!("search-{}", started.elapsed().as_nanos()))?;
            let cmd = bins::leaf_command(
                &bins,
                &host.netns,
                &sns,
                &data,
                &["search", "--json", "--timeout", "3", "file"],
            );
            if bins::has_hit(&bins::run(cmd, GET_LIMIT).stdout, hash) {
                break;
            }
            ensure!(
                started.elapsed() < READY_TIMEOUT,
                "{name}: the file is never found"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    let mut took: Vec<Vec<f64>> = vec![Vec::new(); pairs.len()];
    let mut routes: Vec<Vec<String>> = vec![Vec::new(); pairs.len()];
    for t in 0..tries {
        for (p, (name, host, hash)) in pairs.iter().enumerate() {
            let data = dir(&format!("get-{p}-{t}"))?;
            let got =
                get(&bins, host, &sns, &data, hash, GET_LIMIT).with_context(|| name.to_string())?;
            took[p].push(got.took.as_secs_f64());
            routes[p].push(bins::route_of(&got.stdout).unwrap_or_else(|| "?".into()));
        }
    }

    // Throughput, and what relaying costs the supernodes in CPU.
    let sn_cpu = || -> f64 {
        supernodes
            .iter()
            .map(|p| bench::pid_cpu_seconds(p.pid()))
            .sum()
    };
    let src_cpu = || bench::pid_cpu_seconds(sources[1].1.pid());
    let big_limit = Duration::from_secs(60 + (big_mib >> 2));
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); big_pairs.len()];
    let mut big_routes: Vec<String> = Vec::new();
    let (mut relay_cpu, mut source_cpu) = (0.0, 0.0);
    for t in 0..big_tries {
        for (p, (name, host, hash)) in big_pairs.iter().enumerate() {
            let data = dir(&format!("big-{p}-{t}"))?;
            let (sn0, src0) = (sn_cpu(), src_cpu());
            let got =
                get(&bins, host, &sns, &data, hash, big_limit).with_context(|| name.to_string())?;
            ensure!(
                p == 0 || bins::route_of(&got.stdout).as_deref() == Some("relayed"),
                "{name}: not relayed: {}",
                got.stdout
            );
            if p == 1 {
                relay_cpu += sn_cpu() - sn0;
                source_cpu += src_cpu() - src0;
            }
            big_routes.push(bins::route_of(&got.stdout).unwrap_or_else(|| "?".into()));
            rates[p].push(bench::mbps(big_mib << 20, got.took));
        }
    }

    println!();
    println!(
        "nat_connect: {} tries of a {} KiB `leaf get`, {}",
        tries,
        FILE_LEN >> 10,
        bench::machine()
    );
    println!(
        "{:<38} {:<22} {:>8} {:>8} {:>8} {:>8}",
        "pair", "routes", "p50 s", "p99 s", "ratio", "extra s"
    );
    let mut base = took[0].clone();
    let base_p50 = bench::median(&mut base);
    for (p, (name, _, _)) in pairs.iter().enumerate() {
        let mut v = took[p].clone();
        let p50 = bench::median(&mut v);
        let p99 = v.iter().copied().fold(0.0, f64::max);
        let mut counts: Vec<(String, usize)> = Vec::new();
        for r in &routes[p] {
            match counts.iter_mut().find(|(n, _)| n == r) {
                Some((_, c)) => *c += 1,
                None => counts.push((r.clone(), 1)),
            }
        }
        let counts: Vec<String> = counts.iter().map(|(r, c)| format!("{r} {c}")).collect();
        println!(
            "{:<38} {:<22} {:>8.3} {:>8.3} {:>8.2} {:>8.3}",
            name,
            counts.join(", "),
            p50,
            p99,
            p50 / base_p50,
            p50 - base_p50
        );
    }
    println!();
    println!(
        "throughput: {big_tries} x {big_mib} MiB `leaf get` each, interleaved (relay caps lifted)"
    );
    let direct = bench::median(&mut rates[0].clone());
    for (p, (name, _, _)) in big_pairs.iter().enumerate() {
        let r = bench::median(&mut rates[p].clone());
        println!(
            "{:<40} {:>9.1} MB/s  ratio {:>5.2}   runs {:?}",
            name,
            r,
            r / direct,
            rates[p]
                .iter()
                .map(|x| (x * 10.0).round() / 10.0)
                .collect::<Vec<_>>()
        );
    }
    let gib = (big_tries as u64 * (big_mib << 20)) as f64 / f64::from(1u32 << 30);
    println!(
        "relay CPU: supernodes {:.2} s per relayed GiB; the source leaf serving it {:.2} s per GiB (ratio {:.2})",
        relay_cpu / gib,
        source_cpu / gib,
        relay_cpu / source_cpu.max(1e-9)
    );
    Ok(())
}

/// `leaf get`s `hash` from `host`, and checks the bytes.
fn get(
    bins: &bins::Binaries,
    host: &Host,
    sns: &[String],
    data: &std::path::Path,
    hash: &str,
    limit: Duration,
) -> Result<bins::Outcome> {
    let out = data.join("got.bin");
    let cmd = bins::leaf_command(
        bins,
        &host.netns,
        sns,
        data,
        &[
            "get",
            "--json",
            "--timeout",
            "10",
            "--out",
            &path_arg(&out),
            hash,
        ],
    );
    let got = bins::run(cmd, limit);
    ensure!(got.success(), "leaf get failed: {}", got.stderr);
    let verified = bins::hash_file(&out).context("the file")?;
    ensure!(verified == hash, "wrong bytes");
    std::fs::remove_file(&out)?;
    Ok(got)
}
