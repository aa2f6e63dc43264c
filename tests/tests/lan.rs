//! Zero configuration on a LAN, in a lab of network namespaces
//! (`servent_tests::lab`): two hosts on one bridge (the LAN behind one
//! home router; multicast passes, as on any switch), no supernode
//! anywhere, and no address given to anyone. Each runs `leaf serve
//! --share DIR` and nothing more, as a user would on two machines of one
//! LAN.
//!
//! They must hear each other over mDNS, one of them must become the LAN's
//! first supernode by itself and the other register with it, and then each
//! must find the other's file with `leaf search` and download it, verified,
//! with `leaf get` (through its daemon). A third leaf on the same LAN,
//! started the same way but with `--no-lan`, has nothing to start from and
//! says so. And a LAN's first supernode steps down, by the election's
//! rules, once a dedicated supernode appears on the LAN, and the leaves go
//! on finding each other through it.
//!
//! Needs root, `ip netns`, `iptables` and `tc`; without them it says why
//! and passes without running. CI runs as root.

use std::path::Path;
use std::time::{Duration, Instant};

use servent_tests::bins::{self, path_arg, Process, Scratch};
use servent_tests::lab::{self, Host, Lab, NatKind};

const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Until each leaf finds the other's file.
const FIND_TIMEOUT: Duration = Duration::from_secs(45);
const GET_LIMIT: Duration = Duration::from_secs(60);
const FILE_LEN: u64 = 256 << 10;

/// `leaf serve --share SHARE` in `host`'s namespace, its state in `data`,
/// on every address (the default), with `extra` flags.
fn serve(
    bins: &bins::Binaries,
    host: &Host,
    data: &Path,
    share: &Path,
    extra: &[&str],
) -> Result<Process, String> {
    let share = path_arg(share);
    let mut args = vec!["serve", "--share", &share, "--no-port-mapping"];
    args.extend(extra);
    let cmd = bins::leaf_command(bins, &host.netns, &[], data, &args);
    Process::start(cmd, "leaf", START_TIMEOUT)
}

/// A dedicated `supernode` in `host`'s namespace, started with no flag but
/// its data dir, as an operator would on a LAN.
fn dedicated_supernode(bins: &bins::Binaries, host: &Host, data: &str) -> Result<Process, String> {
    let cmd = bins::command(Some(&host.netns), &bins.supernode, &["--data-dir", data]);
    Process::start(cmd, "supernode", START_TIMEOUT)
}

/// Runs `leaf search --json WORD` in `host`'s namespace, with `data`'s
/// state and no supernode given, until it names `hash` (at most 60 runs,
/// none started after `deadline`); the last run's output if it never did.
fn found_by(
    bins: &bins::Binaries,
    host: &Host,
    data: &Path,
    (word, hash): (&str, &str),
    deadline: Instant,
) -> Result<(), String> {
    let args = ["search", "--json", "--timeout", "3", word];
    let mut last = String::new();
    for _ in 0..60 {
        let out = bins::run(
            bins::leaf_command(bins, &host.netns, &[], data, &args),
            Duration::from_secs(20),
        );
        if out.success() && bins::has_hit(&out.stdout, hash) {
            return Ok(());
        }
        last = format!("{:?}: {}{}", out.status, out.stdout, out.stderr);
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last)
}

/// A lab with one LAN, the binaries and a scratch folder.
struct OneLan {
    bins: bins::Binaries,
    /// Holds the namespaces until the test ends.
    _lab: Lab,
    hosts: Vec<Host>,
    tmp: Scratch,
}

/// A lab with one LAN, behind a router called `router`, and a host on it
/// for each of `names`. `None` (said on stderr) where the machine cannot
/// make namespaces.
fn one_lan(router: &str, names: &[&str]) -> Result<Option<OneLan>, String> {
    if let Some(why) = lab::unavailable() {
        eprintln!("SKIPPED: the LAN lab cannot run here: {why}");
        return Ok(None);
    }
    let bins = bins::binaries()?;
    let mut lab = Lab::new()?;
    let mut lan = lab.add_nat(router, NatKind::PortRestricted)?;
    let hosts = names
        .iter()
        .map(|name| lab.add_host_behind(&mut lan, name))
        .collect::<Result<_, _>>()?;
    Ok(Some(OneLan {
        bins,
        _lab: lab,
        hosts,
        tmp: Scratch::new()?,
    }))
}

#[test]
fn two_leaves_on_one_lan_find_and_download_each_others_files_with_no_address_given(
) -> Result<(), String> {
    let Some(OneLan {
        bins,
        _lab,
        hosts,
        tmp,
    }) = one_lan("home", &["a", "b", "quiet"])?
    else {
        return Ok(());
    };
    let dir = |name: &str| tmp.dir(name);
    let names = ["alpha lan song.bin", "beta lan song.bin", "gamma quiet.bin"];
    let mut leaves = Vec::new();
    let mut hashes = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let (data, share) = (dir(&format!("data{i}"))?, dir(&format!("share{i}"))?);
        let hash = bins::write_random_file(&share.join(names[i]), FILE_LEN, i as u64 + 1)
            .map_err(|e| e.to_string())?;
        let extra: &[&str] = if i == 2 { &["--no-lan"] } else { &[] };
        let leaf = match serve(&bins, host, &data, &share, extra) {
            Ok(leaf) => Some(leaf),
            Err(e) if i == 2 => {
                assert!(e.contains("--supernode"), "the quiet leaf says why: {e}");
                None
            }
            Err(e) => return Err(e),
        };
        leaves.push((leaf, data));
        hashes.push(hash);
    }
    assert!(
        leaves[2].0.is_none(),
        "with --no-lan and no supernode, nothing to start from"
    );

    // Each finds the other's file, by search, with no address given.
    let started = Instant::now();
    let words = ["alpha", "beta"];
    let deadline = started + FIND_TIMEOUT;
    let searched: Vec<Result<(), String>> = [(0usize, 1usize), (1, 0)]
        .into_iter()
        .map(|(me, other)| {
            let wanted = (words[other], hashes[other].as_str());
            found_by(&bins, &hosts[me], &leaves[me].1, wanted, deadline)
        })
        .collect();
    let logs = |i: usize| {
        leaves[i]
            .0
            .as_ref()
            .map(Process::stderr)
            .unwrap_or_default()
    };
    assert!(
        searched.iter().all(Result::is_ok),
        "within {FIND_TIMEOUT:?}: a's search for beta {:?}\nb's search for alpha {:?}\na's log:\n{}\nb's log:\n{}",
        searched[0],
        searched[1],
        logs(0),
        logs(1),
    );
    let first = [0, 1]
        .into_iter()
        .filter(|&i| logs(i).contains("the LAN has no supernode: now its first"))
        .count();
    assert_eq!(first, 1, "exactly one became the LAN's supernode");
    println!("both found each other's file after {:?}", started.elapsed());

    // Each downloads the other's file through its daemon, verified.
    for (me, other) in [(0usize, 1usize), (1, 0)] {
        let out = tmp.path().join(format!("got-by-{me}.bin"));
        let out_arg = path_arg(&out);
        let args = ["get", "--json", "--out", &out_arg, &hashes[other]];
        let got = bins::run(
            bins::leaf_command(&bins, &hosts[me].netns, &[], &leaves[me].1, &args),
            GET_LIMIT,
        );
        assert!(
            got.success(),
            "leaf {me} gets {}: {got:?}\nlog:\n{}",
            names[other],
            logs(me)
        );
        let hash = bins::hash_file(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        assert_eq!(hash, hashes[other], "leaf {me} wrote the file's bytes");
    }
    Ok(())
}

#[test]
fn a_leaf_given_no_address_uses_the_supernode_announced_on_its_lan() -> Result<(), String> {
    let Some(OneLan {
        bins,
        _lab,
        hosts,
        tmp,
    }) = one_lan("office", &["sn", "a", "b"])?
    else {
        return Ok(());
    };
    let dir = |name: &str| tmp.dir(name);
    let sn_data = path_arg(&dir("sn")?);
    let sn = dedicated_supernode(&bins, &hosts[0], &sn_data)?;
    let (data_a, share_a) = (dir("data-a")?, dir("share-a")?);
    let hash = bins::write_random_file(&share_a.join("delta office memo.bin"), FILE_LEN, 7)
        .map_err(|e| e.to_string())?;
    let a = serve(&bins, &hosts[1], &data_a, &share_a, &[])?;
    // A one-shot search on another host, from a fresh data dir: it too
    // finds the supernode on the LAN.
    let data_b = dir("data-b")?;
    let started = Instant::now();
    let searched = found_by(
        &bins,
        &hosts[2],
        &data_b,
        ("delta", &hash),
        started + FIND_TIMEOUT,
    );
    assert!(
        searched.is_ok(),
        "within {FIND_TIMEOUT:?}, b's search: {searched:?}\na's log:\n{}\nsupernode's log:\n{}",
        a.stderr(),
        sn.stderr()
    );
    assert!(
        !a.stderr().contains("now its first"),
        "a leaf that hears a supernode does not take the role: {}",
        a.stderr()
    );
    println!(
        "found through the LAN's supernode after {:?}",
        started.elapsed()
    );
    Ok(())
}

/// The election's quick rules (a round of 3 s, not 60), for the role a
/// leaf takes: the step-down below comes within seconds, not minutes.
const QUICK_ROLE: &str = "[election]
overload_secs = 1.0
jitter_secs = 1.0
cooldown_secs = 3.0
round_secs = 3.0
drain_secs = 2.0
";

const FIRST: &str = "the LAN has no supernode: now its first";
const STEPPED_DOWN: &str = "stepped down: a leaf again";
/// Until the LAN's first supernode steps down for the dedicated one.
const STEP_DOWN_TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn the_lans_first_supernode_steps_down_once_a_dedicated_one_appears() -> Result<(), String> {
    let Some(OneLan {
        bins,
        _lab,
        hosts,
        tmp,
    }) = one_lan("flat", &["a", "b", "sn"])?
    else {
        return Ok(());
    };
    let dir = |name: &str| tmp.dir(name);
    let role = tmp.path().join("quick-role.toml");
    std::fs::write(&role, QUICK_ROLE).map_err(|e| e.to_string())?;
    let role = path_arg(&role);
    let names = ["epsilon flat.bin", "zeta flat.bin"];
    let mut leaves = Vec::new();
    let mut hashes = Vec::new();
    for (i, host) in hosts[..2].iter().enumerate() {
        let (data, share) = (dir(&format!("data{i}"))?, dir(&format!("share{i}"))?);
        let hash = bins::write_random_file(&share.join(names[i]), FILE_LEN, i as u64 + 11)
            .map_err(|e| e.to_string())?;
        let leaf = serve(&bins, host, &data, &share, &["--role-config", &role])?;
        leaves.push((leaf, data));
        hashes.push(hash);
    }
    let logs = |i: usize| leaves[i].0.stderr();
    let started = Instant::now();
    // Whichever it is: both are looked at every 100 ms.
    let deadline = Instant::now() + START_TIMEOUT;
    let first = loop {
        if let Some(i) = (0..2).find(|&i| logs(i).contains(FIRST)) {
            break Some(i);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let Some(first) = first else {
        return Err(format!(
            "no leaf took the role alone within {START_TIMEOUT:?}\na:\n{}\nb:\n{}",
            logs(0),
            logs(1)
        ));
    };
    println!(
        "leaf {first} became the LAN's first supernode after {:?}",
        started.elapsed()
    );

    // A dedicated supernode comes to the LAN.
    let sn_data = path_arg(&dir("sn")?);
    let sn = dedicated_supernode(&bins, &hosts[2], &sn_data)?;
    let appeared = Instant::now();
    assert!(
        leaves[first].0.wait_stderr(STEPPED_DOWN, STEP_DOWN_TIMEOUT),
        "the LAN's first supernode still holds the role {STEP_DOWN_TIMEOUT:?} after a dedicated one \
         appeared\nits log:\n{}\nsupernode's log:\n{}",
        logs(first),
        sn.stderr()
    );
    println!(
        "it stepped down {:?} after the supernode came",
        appeared.elapsed()
    );

    // Both go on finding each other's file, now through the supernode.
    let deadline = Instant::now() + FIND_TIMEOUT;
    for (me, other) in [(0usize, 1usize), (1, 0)] {
        let word = names[other].split(' ').next().expect("a word");
        let found = found_by(
            &bins,
            &hosts[me],
            &leaves[me].1,
            (word, &hashes[other]),
            deadline,
        );
        assert!(
            found.is_ok(),
            "after the step-down, leaf {me}'s search for {word}: {found:?}\nits log:\n{}\nsupernode's log:\n{}",
            logs(me),
            sn.stderr()
        );
    }
    let taken = (0..2).filter(|&i| logs(i).contains(FIRST)).count();
    assert_eq!(
        taken, 1,
        "no leaf took the role alone again beside the supernode"
    );
    assert!(
        !logs(1 - first).contains("promoted: now a supernode"),
        "the other leaf was not promoted: {}",
        logs(1 - first)
    );
    Ok(())
}
