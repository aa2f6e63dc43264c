//! `--http` in process: `/status` and `/metrics` of a supernode and a leaf
//! while they index, answer and serve, read over a real TCP connection.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use servent_tests::*;

const T: Duration = Duration::from_secs(10);

fn localhost_0() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// `GET path` on its own connection: (status code, body). Bounded by `T`.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        raw
    };
    let raw = tokio::time::timeout(T, exchange)
        .await
        .expect("an HTTP answer in time");
    let raw = String::from_utf8(raw).expect("utf-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a header block");
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok());
    (code.expect("a status line"), body.to_string())
}

async fn status(addr: SocketAddr) -> Value {
    let (code, body) = http_get(addr, "/status").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

async fn metrics(addr: SocketAddr) -> String {
    let (code, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of an unlabelled sample `name` in a Prometheus text body.
fn sample(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{body}"))
        .parse::<f64>()
        .unwrap_or_else(|e| panic!("bad value of {name}: {e}")) as u64
}

#[tokio::test]
async fn supernode_and_leaf_report_what_they_do() {
    init_tracing();
    let sn = supernode_with(supernode::Config {
        http: localhost_0(),
        ..supernode::Config::localhost()
    })
    .await;
    let sn_http = sn.http_addr().expect("http is served");
    assert_ne!(sn_http.port(), 0, "the bound port, not 0");

    // Before any leaf: the contract's fields, all empty.
    let s = status(sn_http).await;
    assert_eq!(s["id"], sn.id().to_string());
    assert_eq!(s["role"], "supernode");
    assert_eq!(s["listen"], sn.addr().to_string());
    assert_eq!(s["leaves"], 0);
    assert_eq!(s["files"], 0);
    assert_eq!(s["neighbors"], json!([]));
    assert_eq!(s["max_leaves"], 1000);
    assert!(s["uptime_secs"].is_u64(), "{s}");

    let big = random_bytes(300_000, 3);
    let (data, share) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(share.path().join("big report.bin"), &big).unwrap();
    std::fs::write(share.path().join("small.txt"), b"small").unwrap();
    let leaf = Leaf::spawn(leaf::Config {
        http: localhost_0(),
        // Stays a leaf whatever the election thinks of it.
        no_promote: true,
        ..leaf::Config::localhost(data.path(), share.path(), vec![sn.addr().to_string()])
    })
    .await
    .expect("leaf starts");
    let leaf_http = leaf.http_addr().expect("http is served");
    wait_for(T, || async { leaf.indexed() == [2] })
        .await
        .expect("the leaf's 2 files get indexed");

    let s = status(leaf_http).await;
    assert_eq!(s["id"], leaf.id().to_string());
    assert_eq!(s["role"], "leaf");
    assert_eq!(s["listen"], leaf.addr().to_string());
    assert_eq!(
        s["supernodes"],
        json!([{"id": sn.id().to_string(), "addr": sn.addr().to_string()}])
    );
    assert_eq!(s["shared_files"], 2);
    assert_eq!(s["partial_files"], 0);
    let hashing = &s["hashing"];
    assert_eq!(hashing["files_hashed"], hashing["files_to_hash"], "{s}");
    assert_eq!(hashing["bytes_hashed"], hashing["bytes_to_hash"], "{s}");
    assert!(s.get("leaves").is_none(), "no supernode fields: {s}");

    let s = status(sn_http).await;
    assert_eq!(s["leaves"], 1);
    assert_eq!(s["files"], 2);

    // Someone finds the big file and downloads it from the leaf.
    let other = tempfile::tempdir().unwrap();
    let client = Client::new(other.path(), vec![sn.addr().to_string()]).unwrap();
    let hits = client.search(&["report".to_string()], 10, T).await.unwrap();
    assert_eq!(hits.len(), 1);
    let out = other.path().join("got");
    client.get(hash_of(&big), Some(&out), T).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == big);

    let m = metrics(sn_http).await;
    assert_eq!(sample(&m, "servent_leaves"), 1);
    assert_eq!(sample(&m, "servent_files"), 2);
    assert_eq!(sample(&m, "servent_neighbors"), 0);
    // The search, and the look-up of the hash before the download.
    assert_eq!(sample(&m, "servent_leaf_queries_total"), 2);
    assert_eq!(sample(&m, "servent_queries_processed_total"), 2);
    assert_eq!(sample(&m, "servent_hits_returned_total"), 2);
    assert_eq!(sample(&m, "servent_mesh_queries_total"), 0);
    assert_eq!(sample(&m, "servent_queries_rate_limited_total"), 0);
    let received = sample(&m, "servent_received_bytes_total");
    let sent = sample(&m, "servent_sent_bytes_total");
    // The leaf's file list alone is a few hundred bytes.
    assert!(received > 300 && sent > 300, "{received} in, {sent} out");
    assert!(
        m.contains("# TYPE servent_leaf_queries_total counter\n"),
        "{m}"
    );
    assert!(m.contains("# TYPE servent_leaves gauge\n"), "{m}");

    // Transfers never pass through the supernode: it saw nothing like 300 kB.
    assert!(received < 100_000, "{received} bytes in");

    let m = metrics(leaf_http).await;
    assert_eq!(sample(&m, "servent_shared_files"), 2);
    assert_eq!(sample(&m, "servent_partial_files"), 0);
    assert_eq!(sample(&m, "servent_attached_supernodes"), 1);
    // One upload a range.
    assert_eq!(
        sample(&m, "servent_uploads_total"),
        (big.len() as u64).div_ceil(leaf::transfer::CHUNK_SIZE)
    );
    assert_eq!(sample(&m, "servent_uploaded_bytes_total"), big.len() as u64);
    assert_eq!(sample(&m, "servent_supernode_role"), 0);
    // Not elected: the supernode metrics are there, at zero.
    assert_eq!(sample(&m, "servent_leaves"), 0);

    // A connection that ends keeps its bytes in the totals.
    assert_eq!(sample(&metrics(sn_http).await, "servent_connections"), 1);
    leaf.shutdown().await;
    wait_for(T, || async {
        sample(&metrics(sn_http).await, "servent_connections") == 0
    })
    .await
    .expect("the leaf's session ends");
    let m = metrics(sn_http).await;
    assert!(sample(&m, "servent_received_bytes_total") >= received);
    assert!(sample(&m, "servent_sent_bytes_total") >= sent);
    assert_eq!(status(sn_http).await["leaves"], 0);

    sn.shutdown().await;
    assert!(
        tokio::net::TcpStream::connect(sn_http).await.is_err(),
        "the HTTP endpoint stops with the node"
    );
}

#[tokio::test]
async fn an_http_address_in_use_fails_the_start_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let e = supernode::Supernode::spawn(supernode::Config {
        http: Some(addr),
        ..supernode::Config::localhost()
    })
    .await
    .err()
    .expect("the supernode does not start");
    assert!(
        matches!(e, supernode::StartError::Http(_)) && e.to_string().contains(&addr.to_string()),
        "{e}"
    );

    let (data, share) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let e = Leaf::spawn(leaf::Config {
        http: Some(addr),
        ..leaf::Config::localhost(data.path(), share.path(), vec!["127.0.0.1:1".into()])
    })
    .await
    .err()
    .expect("the leaf does not start");
    assert!(
        matches!(e, leaf::StartError::Http(_)) && e.to_string().contains(&addr.to_string()),
        "{e}"
    );
}
