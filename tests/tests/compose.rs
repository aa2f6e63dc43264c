//! `deploy/` tested for real: the docker-compose network under chaos
//! (`deploy/chaos.sh`, which builds the static binaries and the images
//! first), and the example supernode config against the code.
//!
//! The chaos test needs a Docker engine with compose; where `docker` is not
//! usable it says so and passes without running. CI has one, so there it
//! runs: `cargo test --workspace` builds and tests everything.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The checks `deploy/chaos.sh` reports, each of which must pass.
const CHECKS: &[&str] = &[
    "network_up",
    "search_every_leaf",
    "download_verified",
    "supernode_killed",
    "supernode_rejoins",
    "partition_search",
    "partition_heals",
    "leaf_new_address",
];

/// Longest run of the chaos script, a release build of both binaries
/// included (a few minutes on two cores; the checks take about one more).
const CHAOS_LIMIT: Duration = Duration::from_secs(30 * 60);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// Why `docker` cannot be used here, if it cannot.
fn docker_unusable() -> Option<String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .output()
    {
        Err(e) => Some(format!("cannot run docker: {e}")),
        Ok(out) if !out.status.success() => Some(format!(
            "`docker info` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

#[test]
fn compose_network_survives_chaos() {
    if let Some(why) = docker_unusable() {
        eprintln!("SKIPPED compose_network_survives_chaos: docker is not usable here ({why})");
        return;
    }
    let root = workspace_root();
    let mut command = Command::new("bash");
    command
        .arg(root.join("deploy/chaos.sh"))
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // The same cargo that runs this test builds the binaries.
    if let Some(cargo) = option_env!("CARGO") {
        command.env("CARGO", cargo);
    }
    let mut child = command.spawn().expect("run deploy/chaos.sh");
    let stdout = child.stdout.take().expect("piped stdout");
    // Each result line is shown as it comes (written to stderr directly, so
    // the test harness does not hold it back) and kept.
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = writeln!(std::io::stderr(), "{line}");
            lines.push(line);
        }
        lines
    });
    let deadline = Instant::now() + CHAOS_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chaos.sh") {
            break status;
        }
        if Instant::now() >= deadline {
            // SIGTERM, not SIGKILL: the script tears the network down on it.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            panic!("deploy/chaos.sh ran longer than {CHAOS_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let lines = reader.join().expect("stdout reader");

    let mut passed = BTreeSet::new();
    let mut failures = Vec::new();
    for line in &lines {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("chaos.sh printed a line that is not JSON ({e}): {line}"));
        let check = v["check"].as_str().expect("a check name").to_string();
        assert!(v["elapsed_ms"].is_u64(), "no elapsed_ms: {line}");
        if v["ok"] == Value::Bool(true) {
            passed.insert(check);
        } else {
            failures.push(format!("{check}: {}", v["detail"]));
        }
    }
    assert!(
        failures.is_empty(),
        "failed checks:\n{}",
        failures.join("\n")
    );
    let missing: Vec<_> = CHECKS.iter().filter(|c| !passed.contains(**c)).collect();
    assert!(missing.is_empty(), "checks that did not run: {missing:?}");
    assert!(status.success(), "deploy/chaos.sh exited with {status}");
}

/// `deploy/config/supernode.toml` shows every option with its default: as
/// it is, it configures exactly the defaults; with every `#key = value`
/// line uncommented, still the defaults (but for the examples of the
/// settings that have none); and no option of the code is left out.
#[test]
fn example_supernode_config_matches_the_code() {
    let path = workspace_root().join("deploy/config/supernode.toml");
    let text = std::fs::read_to_string(&path).expect("read deploy/config/supernode.toml");
    let defaults = format!("{:?}", supernode::Config::default());

    let as_is = supernode::Config::from_file(&path).expect("the example parses");
    assert_eq!(format!("{as_is:?}"), defaults);

    let mut keys = BTreeSet::new();
    let uncommented: Vec<&str> = text
        .lines()
        .map(|line| {
            let setting = line
                .strip_prefix('#')
                .filter(|rest| rest.starts_with(|c: char| c.is_ascii_lowercase()));
            let line = setting.unwrap_or(line);
            if let Some((key, _)) = line.split_once(" = ") {
                keys.insert(key.trim().to_string());
            }
            if let Some(table) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                keys.insert(table.to_string());
            }
            line
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("all.toml");
    std::fs::write(&all, uncommented.join("\n")).unwrap();
    let mut parsed = supernode::Config::from_file(&all).expect("every uncommented line is valid");
    assert!(!parsed.peers.is_empty() && parsed.http.is_some() && parsed.data_dir.is_some());
    parsed.peers.clear();
    parsed.http = None;
    parsed.data_dir = None;
    assert_eq!(format!("{parsed:?}"), defaults);

    // Every field of the Debug form (`name: value`) is a key of the file,
    // but for the timings the file does not set (`#[serde(skip)]`: tests
    // and the simulator shrink them in code).
    let fields: BTreeSet<String> = without_fields(&defaults, &["hop", "mesh", "transport"])
        .split(['{', ','])
        .filter_map(|part| part.split_once(": "))
        .map(|(name, _)| name.trim().to_string())
        .collect();
    let undocumented: Vec<_> = fields.difference(&keys).collect();
    assert!(
        undocumented.is_empty(),
        "options missing from deploy/config/supernode.toml: {undocumented:?}"
    );
}

/// `debug` (a struct's `{:?}`) without the fields named `names` and
/// everything nested in them.
fn without_fields(debug: &str, names: &[&str]) -> String {
    let mut out = debug.to_string();
    for name in names {
        let Some(start) = out.find(&format!(", {name}: ")) else {
            continue;
        };
        let Some(open) = out[start..].find('{').map(|i| start + i) else {
            continue;
        };
        let mut depth = 0;
        let mut end = out.len();
        for (i, c) in out[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(start..end, "");
    }
    out
}
