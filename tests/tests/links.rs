//! Links through the CLI contract, on loopback with the real binaries: a
//! `supernode`, a `leaf serve` sharing a file, `leaf link` printing a link
//! to it and `leaf get LINK` downloading it by that link alone (the
//! supernode comes from the link's hint); a malformed or hostile link is
//! refused with a clear error before anything is asked of the network.

use std::path::Path;
use std::time::{Duration, Instant};

use servent_tests::bins::{self, Binaries, Process};

const START: Duration = Duration::from_secs(30);
const RUN: Duration = Duration::from_secs(60);

fn leaf(bins: &Binaries, data: &Path, args: &[&str]) -> bins::Outcome {
    let mut all = vec!["--data-dir".to_string(), bins::path_arg(data)];
    all.extend(args.iter().map(|a| a.to_string()));
    bins::run(bins::command(None, &bins.leaf, &all), RUN)
}

#[test]
fn a_link_printed_by_one_leaf_downloads_the_file_on_another_and_bad_links_are_refused() {
    let bins = bins::binaries().expect("binaries");
    let dir = tempfile::tempdir().expect("tempdir");
    let (share, data) = (dir.path().join("share"), dir.path().join("data"));
    std::fs::create_dir_all(&share).expect("share dir");
    let file = share.join("field recording.flac");
    let hash = bins::write_random_file(&file, 300_000, 7).expect("shared file");

    let sn =
        bins::loopback_supernode(&bins, &dir.path().join("sn"), START).expect("supernode starts");
    let serving =
        bins::loopback_leaf(&bins, &sn.addr, &data, &share, &[], START).expect("leaf serve starts");

    // The UI's line follows the listening line.
    let ui = serving.next_line(START).expect("a ui line");
    assert!(
        ui.starts_with(&format!("leaf {} ui on http://127.0.0.1:", serving.id))
            && ui.contains("/?key="),
        "{ui}"
    );

    // `leaf link`, with the supernode as the link's hint.
    let made = leaf(
        &bins,
        &data,
        &["--supernode", &sn.addr, "link", &bins::path_arg(&file)],
    );
    assert!(made.success(), "leaf link failed: {}", made.stderr);
    let link = made.stdout.trim().to_string();
    assert!(
        link.starts_with(&format!(
            "servent:?xt=urn:blake3:{hash}&dn=field%20recording.flac&xl=300000"
        )),
        "{link}"
    );
    assert!(link.contains("x.sn="), "no supernode hint in {link}");

    // Another data dir that knows no supernode: the link's hint is all.
    let other = dir.path().join("other");
    let out = dir.path().join("got.flac");
    let deadline = Instant::now() + RUN;
    let got = loop {
        let got = leaf(
            &bins,
            &other,
            &["get", "--out", &bins::path_arg(&out), "--json", &link],
        );
        // The share registers within a second or two; ask until it has.
        if got.success() || Instant::now() >= deadline {
            break got;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(got.success(), "leaf get LINK failed: {}", got.stderr);
    assert_eq!(bins::hash_file(&out).expect("downloaded"), hash);

    // Hostile links: each refused with what is wrong, nothing written.
    let h = &hash;
    for (bad, says) in [
        ("servent:?xt=urn:blake3:abcd".to_string(), "64 hex digits"),
        (
            format!("servent:?xt=urn:blake3:{h}&dn=..%2Fetc%2Fpasswd"),
            "name",
        ),
        (
            format!("servent:?xt=urn:blake3:{h}&xl=99999999999999999999"),
            "size",
        ),
        (format!("servent:?xt=urn:sha1:{h}"), "urn:blake3"),
        ("servent:?dn=x&xl=1".to_string(), "xt"),
    ] {
        let bad_out = dir.path().join("bad");
        let refused = leaf(
            &bins,
            &other,
            &["get", "--out", &bins::path_arg(&bad_out), &bad],
        );
        assert!(!refused.success(), "{bad} was accepted");
        assert!(
            refused.stderr.contains(says),
            "{bad}: the error does not say {says:?}: {}",
            refused.stderr
        );
        assert!(!bad_out.exists(), "{bad} wrote a file");
    }
}

/// `leaf serve` without `--ui` takes 127.0.0.1:7402, or a free port there
/// when another daemon of the host has it, so that several start; each
/// prints its own URL. `--no-ui` prints no second line.
#[test]
fn daemons_of_one_host_each_get_a_ui_and_no_ui_prints_none() {
    let bins = bins::binaries().expect("binaries");
    let dir = tempfile::tempdir().expect("tempdir");
    let sn =
        bins::loopback_supernode(&bins, &dir.path().join("sn"), START).expect("supernode starts");
    let serve = |name: &str, extra: &[&str]| {
        let share = dir.path().join(format!("{name}-share"));
        std::fs::create_dir_all(&share).expect("share dir");
        bins::loopback_leaf(
            &bins,
            &sn.addr,
            &dir.path().join(name),
            &share,
            extra,
            START,
        )
        .expect("leaf serve starts")
    };
    let url_of = |p: &Process| {
        let line = p.next_line(START).expect("a ui line");
        let url = line
            .strip_prefix(&format!("leaf {} ui on ", p.id))
            .unwrap_or_else(|| panic!("not a ui line: {line}"))
            .to_string();
        let key = url.split("/?key=").nth(1).expect("a key").to_string();
        assert_eq!(key.len(), 64, "{url}");
        url
    };
    let (a, b) = (serve("a", &[]), serve("b", &[]));
    let (url_a, url_b) = (url_of(&a), url_of(&b));
    assert_ne!(url_a, url_b);
    let port = |url: &str| {
        url.split(':')
            .nth(2)
            .and_then(|p| p.split('/').next())
            .map(str::to_string)
    };
    assert_ne!(port(&url_a), port(&url_b), "{url_a} {url_b}");
    let quiet = serve("c", &["--no-ui"]);
    assert_eq!(quiet.next_line(Duration::from_secs(2)), None);
}

/// `leaf get` on a data dir where `leaf serve` runs hands the download to
/// that daemon: killing the `get` does not stop it, nor does restarting the
/// daemon, which resumes it from its verified ranges and writes the file
/// where `get` was asked to; `leaf downloads` lists it.
#[test]
fn a_download_handed_to_the_daemon_survives_get_exiting_and_a_daemon_restart() {
    use std::io::BufRead;
    let bins = bins::binaries().expect("binaries");
    let dir = tempfile::tempdir().expect("tempdir");
    let sn =
        bins::loopback_supernode(&bins, &dir.path().join("sn"), START).expect("supernode starts");
    let (share_a, share_b) = (dir.path().join("a-share"), dir.path().join("b-share"));
    std::fs::create_dir_all(&share_a).expect("share dir");
    std::fs::create_dir_all(&share_b).expect("share dir");
    // 3 MB at 256 KiB/s: about 11 s, long enough to be cut.
    let hash =
        bins::write_random_file(&share_a.join("long take.mkv"), 3_000_000, 11).expect("file");
    let serve = |name: &str, share: &Path, extra: &[&str]| {
        bins::loopback_leaf(&bins, &sn.addr, &dir.path().join(name), share, extra, START)
            .expect("leaf serve starts")
    };
    let _a = serve("a", &share_a, &["--no-ui", "--max-upload-rate", "262144"]);
    let b = serve("b", &share_b, &[]);
    let b_data = dir.path().join("b");
    let out = dir.path().join("taken.mkv");

    // `leaf get` until the daemon has verified some of it, then killed.
    let deadline = Instant::now() + RUN;
    let mut started = false;
    while !started && Instant::now() < deadline {
        let mut get = bins::command(
            None,
            &bins.leaf,
            &[
                "--data-dir",
                &bins::path_arg(&b_data),
                "get",
                "--json",
                "--out",
                &bins::path_arg(&out),
                &hash,
            ],
        )
        .spawn()
        .expect("leaf get starts");
        let lines = std::io::BufReader::new(get.stdout.take().expect("stdout"));
        for line in lines.lines().map_while(Result::ok) {
            let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            if v["event"] == "progress" && v["verified"].as_u64().unwrap_or(0) > 0 {
                started = true;
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        let _ = get.kill();
        let status = get.wait().expect("leaf get ends");
        if !started {
            // Not registered yet: the daemon failed it ("no source"); ask again.
            assert!(!status.success() || out.exists());
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    assert!(started, "leaf get never showed progress through the daemon");
    assert!(!out.exists(), "the file was written before it was complete");

    // The daemon still has it, running.
    let listed = leaf(&bins, &b_data, &["downloads", "--json"]);
    assert!(listed.success(), "{}", listed.stderr);
    let entry: serde_json::Value = listed
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["hash"] == hash.as_str())
        .unwrap_or_else(|| panic!("not listed: {}", listed.stdout));
    assert!(
        ["running", "queued", "done"].contains(&entry["state"].as_str().unwrap()),
        "{entry}"
    );

    // A restart of the daemon: it takes the download up again by itself.
    assert!(b.terminate(START), "leaf serve did not stop on SIGTERM");
    let b = serve("b", &share_b, &[]);
    let deadline = Instant::now() + RUN;
    while bins::hash_file(&out).ok().as_deref() != Some(hash.as_str()) {
        assert!(
            Instant::now() < deadline,
            "the download never completed after the restart"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // `leaf get` again: the daemon has it done, at that path.
    let again = leaf(
        &bins,
        &b_data,
        &["get", "--json", "--out", &bins::path_arg(&out), &hash],
    );
    assert!(again.success(), "{}", again.stderr);
    let done: serde_json::Value = again
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "done")
        .unwrap_or_else(|| panic!("no done line: {}", again.stdout));
    assert_eq!(done["path"], bins::path_arg(&out));
    assert_eq!(done["size"], 3_000_000);
    let paused = leaf(&bins, &b_data, &["downloads", "pause", &hash]);
    assert!(!paused.success(), "a done download was paused");
    assert!(paused.stderr.contains("cannot pause"), "{}", paused.stderr);
    drop(b);
    // With no daemon, `leaf downloads` says so.
    let none = leaf(&bins, &b_data, &["downloads"]);
    assert!(!none.success());
    assert!(
        none.stderr.contains("no `leaf serve` runs"),
        "{}",
        none.stderr
    );
}
