//! The leaf's control API (docs/API.md) over real HTTP, on a real
//! in-process network: a supernode, a leaf sharing files, and a leaf whose
//! daemon is driven through the API alone. Every endpoint, the key and the
//! `Host`/`Origin` checks, hostile requests, and downloads that the daemon
//! owns: paused, resumed, cancelled, removed, and resumed after a restart.

use std::net::SocketAddr;
use std::time::Duration;

use servent_tests::http::{self, Answer};
use servent_tests::*;

const T: Duration = Duration::from_secs(10);

/// The daemon of `leaf`: its API address and key.
struct Daemon {
    addr: SocketAddr,
    key: String,
}

impl Daemon {
    fn of(leaf: &TestLeaf) -> Self {
        let addr = leaf.leaf().ui_addr().expect("the API is served");
        let key = std::fs::read_to_string(leaf.data.path().join("api.key")).expect("api.key");
        assert!(
            leaf.leaf()
                .ui_url()
                .is_some_and(|u| u == format!("http://{addr}/?key={key}")),
            "{:?}",
            leaf.leaf().ui_url()
        );
        Self { addr, key }
    }

    async fn call(&self, method: &str, path: &str, body: &str) -> Answer {
        http::request(
            self.addr,
            method,
            path,
            &[("X-Servent-Key", &self.key)],
            body.as_bytes(),
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    async fn download(&self, hash: &str) -> serde_json::Value {
        let a = self
            .call("GET", &format!("/api/v1/downloads/{hash}"), "")
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.json()
    }

    /// Adds the download of `target` (a hash or a link), which must be
    /// new.
    async fn add(&self, target: &str) -> serde_json::Value {
        let body = format!(r#"{{"target": "{target}"}}"#);
        let added = self.call("POST", "/api/v1/downloads", &body).await;
        assert_eq!(added.status, 201, "{}", added.body);
        added.json()
    }

    /// Waits until the download of `hash` has verified some of its bytes.
    async fn wait_started(&self, hash: &str) {
        let started = wait_for(T, || async {
            self.download(hash).await["verified"].as_u64().unwrap_or(0) > 0
        })
        .await;
        assert!(started.is_ok(), "{}", self.download(hash).await);
    }

    /// Waits until the download of `hash` is in `state`.
    async fn wait_state(&self, hash: &str, state: &str, within: Duration) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let last = self.download(hash).await;
            if last["state"] == state {
                return last;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{hash} never {state}: {last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A word of the search, until a hit for `hash` streams back.
async fn search_until_found(d: &Daemon, word: &str, hash: &str) -> Vec<serde_json::Value> {
    let body = format!(r#"{{"words": ["{word}"], "timeout_secs": 2}}"#);
    let mut last = Vec::new();
    for _ in 0..20 {
        let a = d.call("POST", "/api/v1/search", &body).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.header("content-type"), Some("application/x-ndjson"));
        last = a.lines();
        if last
            .iter()
            .any(|l| l["event"] == "hit" && l["hash"] == hash)
        {
            return last;
        }
    }
    panic!("no hit for {hash}: {last:?}");
}

#[tokio::test]
async fn without_the_key_or_from_another_site_nothing_is_answered() {
    init_tracing();
    let sn = supernode().await;
    let me = TestLeaf::start_ui(&[&sn], &[]).await;
    let d = Daemon::of(&me);
    let host = d.addr.to_string();
    let cases: [(&[(&str, &str)], &str); 6] = [
        (&[], "no key"),
        (&[("X-Servent-Key", "00")], "wrong key"),
        (
            &[("X-Servent-Key", &d.key), ("Host", "evil.example:7402")],
            "Host",
        ),
        (
            &[("X-Servent-Key", &d.key), ("Host", "127.0.0.1:1")],
            "Host",
        ),
        (
            &[("X-Servent-Key", &d.key), ("Origin", "http://evil.example")],
            "Origin",
        ),
        (&[("X-Servent-Key", &d.key), ("Origin", "null")], "Origin"),
    ];
    for (headers, says) in cases {
        for path in ["/api/v1/status", "/api/v1/downloads", "/api/v1/events"] {
            let a = http::request(d.addr, "GET", path, headers, b"", T)
                .await
                .unwrap();
            assert_eq!(a.status, 401, "{path} {headers:?}: {}", a.body);
            assert!(
                a.json()["error"].as_str().unwrap().contains(says),
                "{}",
                a.body
            );
        }
    }
    // Nothing is started by a refused request.
    let refused = http::request(
        d.addr,
        "POST",
        "/api/v1/downloads",
        &[("X-Servent-Key", &d.key), ("Origin", "http://evil.example")],
        format!(r#"{{"target": "{}"}}"#, "ab".repeat(32)).as_bytes(),
        T,
    )
    .await
    .unwrap();
    assert_eq!(refused.status, 401);
    assert_eq!(
        d.call("GET", "/api/v1/downloads", "").await.json()["downloads"],
        serde_json::json!([])
    );

    // The UI's files need no key, but do need this daemon's Host.
    let page = http::request(d.addr, "GET", "/", &[], b"", T)
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.body.contains("app.js"));
    for asset in ["/app.js", "/app.css"] {
        assert_eq!(
            http::request(d.addr, "GET", asset, &[], b"", T)
                .await
                .unwrap()
                .status,
            200
        );
    }
    let rebound = http::request(d.addr, "GET", "/", &[("Host", "attacker.example")], b"", T)
        .await
        .unwrap();
    assert_eq!(rebound.status, 401);
    // localhost names the daemon too.
    let port = d.addr.port();
    let local = http::request(
        d.addr,
        "GET",
        "/api/v1/status",
        &[
            ("X-Servent-Key", &d.key),
            ("Host", &format!("localhost:{port}")),
            ("Origin", &format!("http://localhost:{port}")),
        ],
        b"",
        T,
    )
    .await
    .unwrap();
    assert_eq!(local.status, 200, "{}", local.body);
    assert_eq!(local.json()["id"], me.leaf().id().to_string());
    let _ = host;
}

#[tokio::test]
async fn hostile_requests_get_4xx_and_leave_the_daemon_serving() {
    init_tracing();
    let sn = supernode().await;
    let me = TestLeaf::start_ui(&[&sn], &[]).await;
    let d = Daemon::of(&me);
    let huge = format!(r#"{{"target": "{}"}}"#, "a".repeat(64 * 1024));
    let words: Vec<String> = (0..40).map(|i| format!("\"w{i}\"")).collect();
    let many = format!(r#"{{"words": [{}]}}"#, words.join(","));
    let h = "ab".repeat(32);
    let relative_out = format!(r#"{{"target": "{h}", "out": "../escape.bin"}}"#);
    let missing_dir = format!(r#"{{"target": "{h}", "dir": "/no/such/folder"}}"#);
    let both = format!(r#"{{"target": "{h}", "dir": "/tmp", "out": "/tmp/x"}}"#);
    let long_word = format!(r#"{{"words": ["{}"]}}"#, "x".repeat(65));
    let cases = [
        ("POST", "/api/v1/downloads", huge.as_str(), 413),
        ("POST", "/api/v1/downloads", "{not json", 400),
        ("POST", "/api/v1/downloads", r#"{"target": 5}"#, 400),
        (
            "POST",
            "/api/v1/downloads",
            r#"{"target": "x", "to": "/etc/passwd"}"#,
            400,
        ),
        ("POST", "/api/v1/downloads", &relative_out, 422),
        ("POST", "/api/v1/downloads", &missing_dir, 422),
        ("POST", "/api/v1/downloads", &both, 422),
        ("POST", "/api/v1/downloads", r#"{"target": "abcd"}"#, 422),
        (
            "POST",
            "/api/v1/downloads",
            r#"{"target": "servent:?xt=urn:blake3:abcd"}"#,
            422,
        ),
        (
            "POST",
            "/api/v1/search",
            r#"{"words": ["a"], "max": 4294967295}"#,
            422,
        ),
        (
            "POST",
            "/api/v1/search",
            r#"{"words": ["a"], "timeout_secs": 99999}"#,
            422,
        ),
        ("POST", "/api/v1/search", r#"{"words": []}"#, 422),
        ("POST", "/api/v1/search", many.as_str(), 422),
        ("POST", "/api/v1/search", long_word.as_str(), 422),
        (
            "POST",
            "/api/v1/search",
            r#"{"words": ["a"], "extra": true}"#,
            400,
        ),
        ("GET", "/api/v1/shares?max=100000000", "", 422),
        ("GET", "/api/v1/shares?offset=-1", "", 400),
        ("GET", "/api/v1/downloads/nothing", "", 404),
        ("POST", "/api/v1/downloads/nothing/pause", "", 404),
        ("POST", "/api/v1/downloads/nothing/explode", "", 404),
        ("DELETE", "/api/v1/downloads/nothing", "", 404),
        ("GET", "/api/v1/nothing", "", 404),
        ("PUT", "/api/v1/downloads", "{}", 405),
    ];
    for (method, path, body, status) in cases {
        let a = d.call(method, path, body).await;
        assert_eq!(a.status, status, "{method} {path} {:.80}: {}", body, a.body);
    }
    // Still serving, nothing added.
    let a = d.call("GET", "/api/v1/downloads", "").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["downloads"], serde_json::json!([]));
}

#[tokio::test]
async fn every_endpoint_on_a_real_network_and_downloads_the_daemon_owns() {
    init_tracing();
    let sn = supernode().await;
    // Slow enough to be caught running: 4 MiB at 512 KiB/s.
    let slow = random_bytes(4 << 20, 3);
    let quick = random_bytes(300_000, 4);
    let gone = random_bytes(2 << 20, 5);
    let road = random_bytes(2 << 20, 6);
    let source = TestLeaf::start_capped(
        &[&sn],
        &[
            ("slow river.flac", &slow),
            ("quick fox.ogg", &quick),
            ("gone away.wav", &gone),
            ("long road.mp3", &road),
        ],
        512 << 10,
    )
    .await;
    source.wait_indexed(4).await;
    let mut me = TestLeaf::start_ui(&[&sn], &[("mine.txt", b"my own file")]).await;
    me.wait_indexed(1).await;
    let d = Daemon::of(&me);
    let (slow_hash, quick_hash, gone_hash) = (
        hash_of(&slow).to_string(),
        hash_of(&quick).to_string(),
        hash_of(&gone).to_string(),
    );

    // Status and network.
    let status = d.call("GET", "/api/v1/status", "").await.json();
    assert_eq!(status["id"], me.leaf().id().to_string());
    let net = d.call("GET", "/api/v1/network", "").await.json();
    assert_eq!(net["role"], "leaf");
    assert_eq!(net["supernodes"][0]["addr"], sn.addr().to_string());
    assert!(net["uploaded_bytes"].is_u64() && net["downloaded_bytes"].is_u64());

    // Shares, with links.
    let shares = d.call("GET", "/api/v1/shares", "").await.json();
    assert_eq!(shares["shares"][0]["files"], 1);
    assert_eq!(shares["files"][0]["name"], "mine.txt");
    assert_eq!(
        shares["files"][0]["hash"],
        hash_of(b"my own file").to_string()
    );
    assert!(shares["files"][0]["link"]
        .as_str()
        .unwrap()
        .starts_with("servent:?xt=urn:blake3:"));
    assert_eq!(shares["more"], false);

    // Search, streamed: the hit and a last line.
    let lines = search_until_found(&d, "fox", &quick_hash).await;
    let hit = lines.iter().find(|l| l["hash"] == quick_hash).unwrap();
    assert_eq!(hit["name"], "quick fox.ogg");
    assert_eq!(hit["size"], 300_000);
    assert_eq!(hit["sources"], 1);
    assert_eq!(lines.last().unwrap()["event"], "done");
    // Merged, as `leaf search` asks: one line a hash, then the last.
    let body = r#"{"words": ["fox"], "timeout_secs": 2, "merged": true}"#;
    let merged = d.call("POST", "/api/v1/search", body).await;
    assert_eq!(merged.status, 200, "{}", merged.body);
    let lines = merged.lines();
    let fox = lines.iter().filter(|l| l["hash"] == quick_hash).count();
    assert_eq!(fox, 1, "{lines:?}");
    assert_eq!(lines.last().unwrap()["event"], "done", "{lines:?}");

    // The event stream, opened before the downloads start.
    let events = {
        let (addr, key, hash) = (d.addr, d.key.clone(), quick_hash.clone());
        tokio::spawn(async move {
            http::watch(
                addr,
                "/api/v1/events",
                &[("X-Servent-Key", &key)],
                T * 3,
                |body| {
                    body.contains("event: network")
                        && body.contains("event: shares")
                        && body.contains(&format!("\"hash\":\"{hash}\",\"name\":\"quick fox.ogg\""))
                        && body.contains("\"state\":\"done\"")
                },
            )
            .await
        })
    };

    // A download by link: it ends done, the bytes in the share folder.
    let link = hit["link"].as_str().unwrap();
    assert_eq!(d.add(link).await["hash"], quick_hash);
    let again = d
        .call(
            "POST",
            "/api/v1/downloads",
            &format!(r#"{{"target": "{quick_hash}"}}"#),
        )
        .await;
    assert_eq!(again.status, 409, "{}", again.body);
    let done = d.wait_state(&quick_hash, "done", T).await;
    assert_eq!(done["verified"], 300_000);
    assert_eq!(
        std::fs::read(me.share_path("quick fox.ogg")).unwrap(),
        quick
    );
    let seen = events.await.unwrap().expect("event stream");
    assert_eq!(seen.status, 200);
    assert_eq!(seen.header("content-type"), Some("text/event-stream"));
    assert!(seen.body.contains("\"state\":\"done\""), "{}", seen.body);

    // A slow one: paused while it runs keeps what it verified...
    d.add(&slow_hash).await;
    d.wait_started(&slow_hash).await;
    let paused = d
        .call("POST", &format!("/api/v1/downloads/{slow_hash}/pause"), "")
        .await;
    assert_eq!(paused.status, 200, "{}", paused.body);
    assert_eq!(paused.json()["state"], "paused");
    let kept = d.download(&slow_hash).await["verified"].as_u64().unwrap();
    assert!(kept > 0 && kept < slow.len() as u64, "{kept}");
    let target = me.share_path("slow river.flac");
    assert!(!target.exists(), "a paused download wrote its file");

    // ...survives a restart of the daemon paused, and resumes from there.
    me.restart(&[&sn]).await;
    let d = Daemon::of(&me);
    let after = d.download(&slow_hash).await;
    assert_eq!(after["state"], "paused", "{after}");
    let resumed = d
        .call("POST", &format!("/api/v1/downloads/{slow_hash}/resume"), "")
        .await;
    assert_eq!(resumed.status, 200, "{}", resumed.body);
    assert!(["queued", "running"].contains(&resumed.json()["state"].as_str().unwrap()));
    let done = d.wait_state(&slow_hash, "done", T * 3).await;
    assert_eq!(done["verified"], slow.len() as u64);
    assert_eq!(std::fs::read(&target).unwrap(), slow);

    // One running when the daemon stops goes on by itself after it starts.
    let road_hash = hash_of(&road).to_string();
    d.add(&road_hash).await;
    d.wait_started(&road_hash).await;
    me.restart(&[&sn]).await;
    let d = Daemon::of(&me);
    d.wait_state(&road_hash, "done", T * 3).await;
    assert_eq!(std::fs::read(me.share_path("long road.mp3")).unwrap(), road);
    assert_eq!(
        d.call("DELETE", &format!("/api/v1/downloads/{road_hash}"), "")
            .await
            .status,
        204
    );

    // Done cannot be paused; a done download removed keeps its file.
    let refused = d
        .call("POST", &format!("/api/v1/downloads/{slow_hash}/pause"), "")
        .await;
    assert_eq!(refused.status, 409, "{}", refused.body);
    let removed = d
        .call("DELETE", &format!("/api/v1/downloads/{slow_hash}"), "")
        .await;
    assert_eq!(removed.status, 204);
    assert_eq!(
        d.call("GET", &format!("/api/v1/downloads/{slow_hash}"), "")
            .await
            .status,
        404
    );
    assert!(target.exists());

    // Cancelled while running: its partial data goes.
    d.add(&gone_hash).await;
    d.wait_started(&gone_hash).await;
    let cancelled = d
        .call("POST", &format!("/api/v1/downloads/{gone_hash}/cancel"), "")
        .await;
    assert_eq!(cancelled.json()["state"], "cancelled");
    let part = me.share_path(".gone away.wav.servent-part");
    assert!(
        wait_for(T, || async { !part.exists() }).await.is_ok(),
        "the partial data of a cancelled download stayed"
    );
    assert!(!me.share_path("gone away.wav").exists());

    // A hash nobody has fails, saying so, and the list says it all.
    let nobody = "cd".repeat(32);
    d.add(&nobody).await;
    let failed = d.wait_state(&nobody, "failed", T * 2).await;
    assert!(
        failed["error"].as_str().unwrap().contains("no source"),
        "{failed}"
    );
    let list = d.call("GET", "/api/v1/downloads", "").await.json();
    let states: Vec<(&str, &str)> = list["downloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["hash"].as_str().unwrap(), v["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            (quick_hash.as_str(), "done"),
            (gone_hash.as_str(), "cancelled"),
            (nobody.as_str(), "failed"),
        ]
    );
}

#[tokio::test]
async fn a_folder_added_through_the_api_is_shared_found_kept_and_removed() {
    init_tracing();
    let sn = supernode().await;
    let mut me = TestLeaf::start_ui(&[&sn], &[("first.txt", b"first")]).await;
    me.wait_indexed(1).await;
    let other = TestLeaf::start(&[&sn], &[]).await;
    let d = Daemon::of(&me);
    let extra = tempfile::tempdir().unwrap();
    std::fs::write(extra.path().join("second harvest.txt"), b"second").unwrap();
    let path = extra.path().canonicalize().unwrap();
    let body = serde_json::json!({ "path": path }).to_string();

    let added = d.call("POST", "/api/v1/shares", &body).await;
    assert_eq!(added.status, 201, "{}", added.body);
    let shares = added.json()["shares"].clone();
    assert_eq!(shares.as_array().unwrap().len(), 2, "{shares}");
    assert_eq!(shares[0]["removable"], false);
    assert_eq!(shares[1]["path"], path.display().to_string());
    assert_eq!(shares[1]["removable"], true);
    // Twice, relative, not a folder, the first one: refused.
    assert_eq!(d.call("POST", "/api/v1/shares", &body).await.status, 409);
    for bad in [r#"{"path": "relative/dir"}"#, r#"{"path": "/no/such/dir"}"#] {
        assert_eq!(
            d.call("POST", "/api/v1/shares", bad).await.status,
            422,
            "{bad}"
        );
    }
    let first = me.share.path().canonicalize().unwrap();
    let q = |p: &std::path::Path| format!("/api/v1/shares?path={}", p.display());
    assert_eq!(d.call("DELETE", &q(&first), "").await.status, 409);

    // Its file is found by another leaf and downloads from this one.
    let hash = hash_of(b"second");
    let client = other.client(&[&sn]);
    let found = wait_for(T, || async {
        client
            .search(&["harvest".to_string()], 10, Duration::from_secs(2))
            .await
            .is_ok_and(|h| h.iter().any(|h| h.hash == hash))
    })
    .await;
    assert!(found.is_ok(), "the added folder's file was never found");
    let listed = d.call("GET", "/api/v1/shares", "").await.json();
    assert_eq!(listed["shares"][1]["files"], 1, "{listed}");
    let got = other.data.path().join("got.txt");
    client.get(hash, Some(&got), T).await.expect("downloads");
    assert_eq!(std::fs::read(&got).unwrap(), b"second");

    // Kept over a restart; removed, its file is found no more.
    me.restart(&[&sn]).await;
    let d = Daemon::of(&me);
    let listed = d.call("GET", "/api/v1/shares", "").await.json();
    assert_eq!(listed["shares"].as_array().unwrap().len(), 2, "{listed}");
    assert_eq!(d.call("DELETE", &q(&path), "").await.status, 204);
    assert_eq!(d.call("DELETE", &q(&path), "").await.status, 404);
    let gone = wait_for(T, || async {
        client
            .search(&["harvest".to_string()], 10, Duration::from_secs(2))
            .await
            .is_ok_and(|h| h.is_empty())
    })
    .await;
    assert!(gone.is_ok(), "the removed folder's file is still found");
}
