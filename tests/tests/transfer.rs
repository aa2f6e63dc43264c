//! Downloads from several sources at once, with verified ranges and resume.

use std::time::{Duration, Instant};

use leaf::transfer::{Progress, CHUNK_SIZE, PER_SOURCE};
use servent_tests::*;
use tokio::sync::watch;

const T: Duration = Duration::from_secs(10);

/// Waits until `rx` reports at least `bytes` verified.
async fn verified_at_least(rx: &mut watch::Receiver<Progress>, bytes: u64) {
    rx.wait_for(|p| p.verified >= bytes)
        .await
        .expect("download still running");
}

#[tokio::test]
async fn four_sources_one_corrupt_one_vanishing_give_the_identical_file() {
    let size = 64usize << 20;
    let content = random_bytes(size, 11);
    let hash = hash_of(&content);
    let sn = supernode().await;
    let files: &[(&str, &[u8])] = &[("movie.mkv", &content)];
    let good1 = TestLeaf::start(&[&sn], files).await;
    let good2 = TestLeaf::start(&[&sn], files).await;
    let corrupt = TestLeaf::start(&[&sn], files).await;
    // The fourth source goes silent halfway, as a crashed machine does.
    let data = tempfile::tempdir().unwrap();
    let share = tempfile::tempdir().unwrap();
    std::fs::write(share.path().join("movie.mkv"), &content).unwrap();
    let (socket, kill) = KillableSocket::bind();
    let config = leaf::Config::localhost(data.path(), share.path(), vec![sn.addr().to_string()]);
    let vanishing = Leaf::spawn_on_socket(config, socket).await.unwrap();
    for l in [&good1, &good2, &corrupt] {
        l.wait_indexed(1).await;
    }

    // Corrupt every range of one source after it was hashed, keeping size
    // and mtime, so that it still believes it serves the announced content.
    let path = corrupt.share_path("movie.mkv");
    let mtime = filetime::FileTime::from_last_modification_time(&std::fs::metadata(&path).unwrap());
    let mut bad = content.clone();
    for at in (1000..size).step_by(CHUNK_SIZE as usize) {
        bad[at] ^= 0xff;
    }
    std::fs::write(&path, &bad).unwrap();
    filetime::set_file_mtime(&path, mtime).unwrap();

    let downloader = TestLeaf::start(&[&sn], &[]).await;
    let client = downloader.client(&[&sn]);
    wait_for(T, || async {
        client
            .locate(hash, T)
            .await
            .ok()
            .flatten()
            .is_some_and(|h| h.sources.len() == 4)
    })
    .await
    .expect("four sources are found");

    let (tx, mut rx) = watch::channel(Progress::default());
    let killer = tokio::spawn(async move {
        verified_at_least(&mut rx, size as u64 / 2).await;
        kill.kill();
    });
    let out = downloader.share.path().join("movie.mkv");
    let started = Instant::now();
    let (_, done) = client
        .download(hash, Some(&out), T, Some(tx))
        .await
        .unwrap();
    let took = started.elapsed();
    killer.await.unwrap();
    assert!(std::fs::read(&out).unwrap() == content, "identical");
    assert_eq!(done.size, size as u64);
    // The corrupt source was dropped at its first bad range: it served no
    // more than the requests it had in flight then.
    let served = corrupt.leaf().uploads().served.get();
    assert!(
        served <= PER_SOURCE as u64,
        "corrupt source served {served}"
    );
    // The silent source did not stall the download until its timeout.
    assert!(took < Duration::from_secs(25), "took {took:?}");
    let good = good1.leaf().uploads().served.get() + good2.leaf().uploads().served.get();
    assert!(good > 0 && vanishing.uploads().served.get() > 0);
}

#[tokio::test]
async fn a_download_stopped_halfway_resumes_from_its_verified_ranges() {
    let size = 16usize << 20;
    let content = random_bytes(size, 5);
    let hash = hash_of(&content);
    let sn = supernode().await;
    let source = TestLeaf::start(&[&sn], &[("disk.img", &content)]).await;
    source.wait_indexed(1).await;
    let downloader = TestLeaf::start(&[&sn], &[]).await;
    let out = downloader.share.path().join("disk.img");

    // First run: stopped (its future dropped, as a kill would) halfway.
    let client = downloader.client(&[&sn]);
    let (tx, mut rx) = watch::channel(Progress::default());
    let first = {
        let out = out.clone();
        tokio::spawn(async move { client.download(hash, Some(&out), T, Some(tx)).await })
    };
    verified_at_least(&mut rx, size as u64 / 2).await;
    first.abort();
    let _ = first.await;
    assert!(!out.exists());
    assert!(leaf::transfer::state_path(&out).exists());

    // Second run: only what is missing comes over the network.
    let client = downloader.client(&[&sn]);
    let (_, done) = client.download(hash, Some(&out), T, None).await.unwrap();
    assert!(std::fs::read(&out).unwrap() == content, "identical");
    assert!(
        done.fetched <= size as u64 * 6 / 10,
        "fetched {} of {size} again",
        done.fetched
    );
    assert!(!leaf::transfer::part_path(&out).exists());
    assert!(!leaf::transfer::state_path(&out).exists());
}

#[tokio::test]
async fn a_capped_source_shares_its_upload_rate_fairly() {
    let size = 4usize << 20;
    let rate = 4u64 << 20;
    let content = random_bytes(size, 9);
    let hash = hash_of(&content);
    let sn = supernode().await;
    let source = TestLeaf::start_capped(&[&sn], &[("album.zip", &content)], rate).await;
    let (a, b) = (
        TestLeaf::start(&[&sn], &[]).await,
        TestLeaf::start(&[&sn], &[]).await,
    );
    let (ca, cb) = (a.client(&[&sn]), b.client(&[&sn]));
    wait_for(T, || async {
        ca.locate(hash, T).await.ok().flatten().is_some() && source.leaf().share().len() == 1
    })
    .await
    .expect("the file is found");

    // Two downloaders at once: 8 MiB through a 4 MiB/s cap that starts
    // with a one-second burst takes at least a second.
    let started = Instant::now();
    let (oa, ob) = (a.share_path("album.zip"), b.share_path("album.zip"));
    let timed = |c: Client, out: std::path::PathBuf| async move {
        c.get(hash, Some(&out), T).await.unwrap();
        started.elapsed()
    };
    let (ta, tb) = tokio::join!(timed(ca, oa.clone()), timed(cb, ob.clone()));
    let total = ta.max(tb);
    eprintln!("capped downloads took {ta:?} and {tb:?}");
    assert!(
        total >= Duration::from_millis(900),
        "cap not held: {total:?}"
    );
    // Fair: neither waited for the other to finish first.
    let gap = ta.abs_diff(tb);
    assert!(gap < total / 2, "{ta:?} vs {tb:?}");
    assert!(std::fs::read(&oa).unwrap() == content && std::fs::read(&ob).unwrap() == content);
    drop(source);
}

#[tokio::test]
async fn a_source_that_appears_during_a_download_joins_in() {
    let size = 16usize << 20;
    let content = random_bytes(size, 13);
    let hash = hash_of(&content);
    let sn = supernode().await;
    // A slow first source: the download takes seconds without help.
    let slow = TestLeaf::start_capped(&[&sn], &[("talk.ogg", &content)], 2 << 20).await;
    let downloader = TestLeaf::start(&[&sn], &[]).await;
    let mut client = downloader.client(&[&sn]);
    client.set_requery_interval(Duration::from_millis(200));
    wait_for(T, || async {
        client.locate(hash, T).await.ok().flatten().is_some()
    })
    .await
    .expect("the slow source is found");

    let (tx, mut rx) = watch::channel(Progress::default());
    let out = downloader.share_path("talk.ogg");
    let get = {
        let out = out.clone();
        tokio::spawn(async move { client.download(hash, Some(&out), T, Some(tx)).await })
    };
    verified_at_least(&mut rx, 1).await;
    let fast = TestLeaf::start(&[&sn], &[("talk.ogg", &content)]).await;
    let (_, done) = get.await.unwrap().unwrap();
    assert_eq!(done.size, size as u64);
    assert!(std::fs::read(&out).unwrap() == content, "identical");
    let helped = fast.leaf().uploads().served.get();
    assert!(helped > 0, "the new source served nothing");
    drop(slow);
}

#[tokio::test]
async fn a_downloader_serves_the_ranges_it_has_to_a_third_leaf() {
    let size = 16usize << 20;
    let content = random_bytes(size, 17);
    let hash = hash_of(&content);
    let sn = supernode().await;
    // The original source is slow, so the first download is caught halfway.
    let mut source = TestLeaf::start_capped(&[&sn], &[("season.mkv", &content)], 8 << 20).await;

    // B runs `leaf serve` and, beside it on the same data dir, a `get`.
    // Its uploads are capped so that C's download from it takes a while.
    let b = TestLeaf::start_capped(&[&sn], &[], 4 << 20).await;
    let b_client = b.client(&[&sn]);
    wait_for(T, || async {
        b_client.locate(hash, T).await.ok().flatten().is_some()
    })
    .await
    .expect("the source is found");
    let b_out = tempfile::tempdir().unwrap();
    let b_target = b_out.path().join("season.mkv");
    let (tx, mut rx) = watch::channel(Progress::default());
    let first = {
        let out = b_target.clone();
        tokio::spawn(async move { b_client.download(hash, Some(&out), T, Some(tx)).await })
    };
    verified_at_least(&mut rx, size as u64 / 2).await;
    first.abort();
    let _ = first.await;
    let b_has = rx.borrow().verified;
    assert!(b_has < size as u64, "B finished before it was stopped");
    // The original source leaves the network: B's part is all there is.
    source.stop().await;

    // B's serve announces what it has of the file...
    let c = TestLeaf::start(&[&sn], &[]).await;
    let mut c_client = c.client(&[&sn]);
    c_client.set_requery_interval(Duration::from_millis(200));
    wait_for(T, || async {
        c_client
            .locate(hash, T)
            .await
            .ok()
            .flatten()
            .is_some_and(|h| h.sources.len() == 1 && h.sources[0].id == b.leaf().id())
    })
    .await
    .expect("B is announced as a source while its download is stopped");
    assert_eq!(b.leaf().share().partials(), 1);

    // ...and serves it to C, who gets everything B has.
    let (tx, mut rx) = watch::channel(Progress::default());
    let c_target = c.share_path("season.mkv");
    let get = {
        let out = c_target.clone();
        tokio::spawn(async move { c_client.download(hash, Some(&out), T, Some(tx)).await })
    };
    tokio::time::timeout(T, verified_at_least(&mut rx, 1 << 20))
        .await
        .expect("C gets ranges from B");
    // B's record of what it has goes missing for a moment (as when its own
    // download restarts): B refuses ranges C was told it has. C asks B
    // again instead of dropping it, and carries on once B has them again.
    let state = leaf::transfer::state_path(&b_target);
    let aside = b_out.path().join("state.aside");
    std::fs::rename(&state, &aside).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        rx.borrow().verified < b_has,
        "C got everything before the gap"
    );
    std::fs::rename(&aside, &state).unwrap();
    tokio::time::timeout(T, verified_at_least(&mut rx, b_has))
        .await
        .expect("C gets every range B has");
    assert!(!get.is_finished(), "C cannot finish from half a file");
    assert!(b.leaf().uploads().bytes.get() >= b_has);

    // The original source comes back: C finishes, with the bytes B did not have.
    source.restart(&[&sn]).await;
    let (_, done) = tokio::time::timeout(Duration::from_secs(30), get)
        .await
        .expect("C finishes once a whole source is back")
        .unwrap()
        .unwrap();
    assert_eq!(done.size, size as u64);
    assert!(std::fs::read(&c_target).unwrap() == content, "identical");
    assert!(source.leaf().uploads().bytes.get() <= size as u64 - b_has + 4 * CHUNK_SIZE);
    // A part that is not verified is never served: B sent only its ranges.
    assert!(b.leaf().uploads().bytes.get() <= b_has);
    drop(source);
}
