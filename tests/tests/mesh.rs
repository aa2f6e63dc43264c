//! Meshes of supernodes on 127.0.0.1, in this process: membership by
//! gossip, query routing with TTL and duplicate suppression, and losing
//! supernodes without goodbye.

use std::time::Duration;

use servent_proto::hop::RoutingKind;
use servent_tests::*;

const T: Duration = Duration::from_secs(5);

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

async fn found(client: &Client, word: &str) -> usize {
    client
        .search(&words(word), 50, T)
        .await
        .map(|h| h.len())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_query_crosses_a_mesh_of_twenty_supernodes() {
    init_tracing();
    // Bootstrapped as a chain; gossip lets the mesh grow shortcuts.
    let mut sns: Vec<Supernode> = Vec::new();
    for i in 0..20 {
        let peers: Vec<&Supernode> = sns.last().into_iter().collect();
        let _ = i;
        sns.push(supernode_with(mesh_config(&peers)).await);
    }
    let first = TestLeaf::start(&[&sns[0]], &[]).await;
    let last = TestLeaf::start(&[&sns[19]], &[("far edge.txt", b"far")]).await;
    last.wait_indexed(1).await;
    let client = first.client(&[&sns[0]]);
    // Found once the mesh has grown its shortcuts (a mesh this small is
    // flooded, walkers or not); then every search finds it.
    wait_for(Duration::from_secs(20), || async {
        found(&client, "far edge").await == 1
    })
    .await
    .expect("a leaf at one edge finds a file at the far edge");
    wait_for(Duration::from_secs(10), || async {
        found(&client, "far").await == 1
    })
    .await
    .expect("found by one word");
    for _ in 0..5 {
        assert_eq!(found(&client, "far").await, 1, "found by every search");
    }
    let hit = &client.search(&words("far"), 5, T).await.unwrap()[0];
    assert_eq!(hit.sources[0].id, last.leaf().id());
    assert_eq!(hit.sources[0].addr, last.leaf().addr().to_string());
    assert!(sns.iter().all(|s| !s.neighbours().is_empty()));
}

/// A line a - b - c - d ...: each dials only its predecessor and wants one
/// neighbour, so no shortcut ever forms. Its supernodes flood with `ttl`.
async fn line(n: usize, ttl: u8) -> Vec<Supernode> {
    line_routed(n, ttl, RoutingKind::Flood).await
}

/// [`line`], routing by `routing`; a walking line walks however short.
async fn line_routed(n: usize, ttl: u8, routing: RoutingKind) -> Vec<Supernode> {
    let mut sns: Vec<Supernode> = Vec::new();
    for _ in 0..n {
        let peers: Vec<&Supernode> = sns.last().into_iter().collect();
        let config = supernode::Config {
            target_neighbors: 1,
            max_neighbors: 2,
            routing,
            walk_flood_below: 0,
            query_ttl: ttl,
            ..mesh_config(&peers)
        };
        sns.push(supernode_with(config).await);
    }
    wait_for(T, || async {
        sns[1..n - 1].iter().all(|s| s.neighbours().len() == 2)
    })
    .await
    .expect("the line forms");
    sns
}

#[tokio::test]
async fn a_query_does_not_travel_past_its_ttl() {
    let sns = line(6, 2).await;
    let asker = TestLeaf::start_attached(&[&sns[0]], &[], 1).await;
    let near = TestLeaf::start_attached(&[&sns[2]], &[("near.txt", b"near")], 1).await;
    let far = TestLeaf::start_attached(&[&sns[3]], &[("far.txt", b"far")], 1).await;
    near.wait_indexed(1).await;
    far.wait_indexed(1).await;
    let client = asker.client(&[&sns[0]]);
    assert_eq!(
        found(&client, "near").await,
        1,
        "two hops away: within TTL 2"
    );
    assert_eq!(
        found(&client, "far").await,
        0,
        "three hops away: past TTL 2"
    );
    for (i, s) in sns.iter().enumerate() {
        let processed = s.metrics().queries_processed.get();
        if i <= 2 {
            assert_eq!(
                processed, 2,
                "supernode {i} processed each of the 2 queries"
            );
        } else {
            assert_eq!(processed, 0, "supernode {i} is beyond the TTL");
            assert_eq!(
                s.metrics().mesh_queries.get(),
                0,
                "not even received by {i}"
            );
        }
    }
}

#[tokio::test]
async fn walkers_go_past_any_ttl_and_the_filters_stop_them_asking_in_vain() {
    // A line of 7 that walks (`servent-mesh/3`), its TTL 1: a flood would
    // reach supernode 1 only. A walker can only go on along a line, 10
    // steps at the defaults, and each visit probes a neighbour only if its
    // keyword filter may hold the words.
    let sns = line_routed(7, 1, RoutingKind::Walk).await;
    let asker = TestLeaf::start_attached(&[&sns[0]], &[], 1).await;
    let far = TestLeaf::start_attached(&[&sns[6]], &[("far away.txt", b"far")], 1).await;
    far.wait_indexed(1).await;
    let client = asker.client(&[&sns[0]]);
    // Found at once by the walker that reaches the end; then by every
    // search, once supernode 5 has the far end's filter.
    wait_for(T, || async { found(&client, "far away").await == 1 })
        .await
        .expect("a walker crosses six hops with TTL 1");
    for _ in 0..5 {
        assert_eq!(found(&client, "far").await, 1, "found by every search");
    }
    // Nothing on the line holds "nowhere": no probe is sent for it, only
    // the walker goes on (a flood of TTL 1 would ask one neighbour).
    let before: Vec<u64> = sns.iter().map(|s| s.metrics().mesh_queries.get()).collect();
    assert_eq!(found(&client, "nowhere").await, 0);
    for (i, s) in sns.iter().enumerate().skip(1) {
        assert_eq!(
            s.metrics().mesh_queries.get() - before[i],
            1,
            "supernode {i} got exactly the walker"
        );
    }
}

#[tokio::test]
async fn duplicate_queries_are_not_processed_twice() {
    // A full mesh of five: every query reaches each supernode by many paths.
    let a = supernode().await;
    let mut sns = vec![a];
    for _ in 0..4 {
        let config = mesh_config(&[&sns[0]]);
        sns.push(supernode_with(config).await);
    }
    wait_for(Duration::from_secs(15), || async {
        sns.iter().all(|s| s.neighbours().len() == 4)
    })
    .await
    .expect("full mesh forms by gossip");
    let asker = TestLeaf::start(&[&sns[0]], &[]).await;
    let client = asker.client(&[&sns[0]]);
    // Ask for more than exists so the search widens to every neighbour.
    let hits = client.search(&words("nothing"), 50, T).await.unwrap();
    assert!(hits.is_empty());
    let mut duplicates = 0;
    for s in &sns {
        assert_eq!(
            s.metrics().queries_processed.get(),
            1,
            "each supernode processes the query once"
        );
        duplicates += s.metrics().queries_duplicate.get();
    }
    assert!(
        duplicates > 0,
        "copies arrived by other paths and were dropped"
    );
}

#[tokio::test]
async fn supernodes_learn_neighbours_they_were_never_told_about() {
    // A knows B, C knows B. Then B dies without a word.
    let b_cfg = supernode::Config::localhost();
    let (b, kill_b) = killable_supernode(b_cfg).await;
    let a = supernode_with(mesh_config(&[&b])).await;
    let c = supernode_with(mesh_config(&[&b])).await;
    wait_for(Duration::from_secs(10), || async {
        a.neighbours().contains(&c.id()) && c.neighbours().contains(&a.id())
    })
    .await
    .expect("A and C link up through what B told them");
    let la = TestLeaf::start(&[&a], &[]).await;
    let lc = TestLeaf::start(&[&c], &[("from c.txt", b"c")]).await;
    lc.wait_indexed(1).await;

    kill_b.kill();
    wait_for(Duration::from_secs(15), || async {
        !a.neighbours().contains(&b.id()) && !c.neighbours().contains(&b.id())
    })
    .await
    .expect("B is dropped once silent");
    let client = la.client(&[&a]);
    assert_eq!(
        found(&client, "from").await,
        1,
        "A and C still reach each other"
    );
}

#[tokio::test]
async fn a_restarted_supernode_rejoins_the_mesh() {
    let a = supernode().await;
    let data = tempfile::tempdir().unwrap();
    let b_cfg = || supernode::Config {
        data_dir: Some(data.path().to_path_buf()),
        ..mesh_config(&[&a])
    };
    let b = supernode_with(b_cfg()).await;
    let b_id = b.id();
    wait_for(T, || async { a.neighbours().contains(&b_id) })
        .await
        .expect("B joins");
    b.shutdown().await;
    wait_for(Duration::from_secs(15), || async {
        !a.neighbours().contains(&b_id)
    })
    .await
    .expect("B leaves");

    let b = supernode_with(b_cfg()).await;
    assert_eq!(b.id(), b_id, "same identity from the same data dir");
    wait_for(T, || async { a.neighbours().contains(&b_id) })
        .await
        .expect("B rejoins");
    let la = TestLeaf::start(&[&a], &[]).await;
    let lb = TestLeaf::start(&[&b], &[("back again.txt", b"back")]).await;
    lb.wait_indexed(1).await;
    assert_eq!(found(&la.client(&[&a]), "back").await, 1);
}

#[tokio::test]
async fn the_neighbours_routing_ranks_follow_links_and_load() {
    // What routing reads on every query is published by the owner: it
    // must follow links that come and go, and the load their Status
    // frames tell, without anyone asking.
    let a = supernode().await;
    let b = supernode_with(mesh_config(&[&a])).await;
    let c = supernode_with(mesh_config(&[&a])).await;
    let ranked = || a.state().ranked_neighbours();
    wait_for(Duration::from_secs(10), || async {
        let r = ranked();
        r.len() == 2 && r.contains(&b.id()) && r.contains(&c.id())
    })
    .await
    .unwrap_or_else(|_| panic!("A ranks both new neighbours: {:?}", ranked()));

    // Both empty, so ranked by RTT. A leaf on the first makes it the more
    // loaded: the other goes first once its Status frame has told A.
    let (first, second) = match ranked()[0] == b.id() {
        true => (b, c),
        false => (c, b),
    };
    let _leaf = TestLeaf::start_attached(&[&first], &[], 1).await;
    wait_for(Duration::from_secs(10), || async {
        ranked() == vec![second.id(), first.id()]
    })
    .await
    .unwrap_or_else(|_| panic!("the less loaded ranks first: {:?}", ranked()));

    let gone = second.id();
    second.shutdown().await;
    wait_for(Duration::from_secs(15), || async {
        ranked() == vec![first.id()]
    })
    .await
    .unwrap_or_else(|_| panic!("a neighbour gone stays ranked: {:?}", ranked()));
    assert!(!a.neighbours().contains(&gone));
}

/// Three supernodes meshed around a seed, each leaf told only of the seed.
async fn three_supernodes() -> (Supernode, KillSwitch, Supernode, Supernode) {
    let (a, kill_a) = killable_supernode(supernode::Config::localhost()).await;
    let b = supernode_with(mesh_config(&[&a])).await;
    let c = supernode_with(mesh_config(&[&a])).await;
    wait_for(Duration::from_secs(10), || async {
        a.neighbours().len() == 2 && b.neighbours().len() == 2
    })
    .await
    .expect("three supernodes mesh");
    (a, kill_a, b, c)
}

#[tokio::test]
async fn leaves_multi_home_and_survive_losing_a_supernode() {
    let (a, kill_a, b, c) = three_supernodes().await;
    let mut leaves = Vec::new();
    for i in 0..4u8 {
        let name = format!("song {i}.mp3");
        let l = TestLeaf::start(&[&a], &[(name.as_str(), &[i; 100])]).await;
        leaves.push(l);
    }
    // Told of the seed only, each leaf learns the others and attaches to all three.
    for l in &leaves {
        wait_for(Duration::from_secs(10), || async {
            l.leaf().supernodes().len() == 3
        })
        .await
        .expect("leaf attaches to three supernodes");
        l.wait_indexed(1).await;
    }

    kill_a.kill();
    let killed_at = std::time::Instant::now();
    for (i, l) in leaves.iter().enumerate() {
        wait_for(Duration::from_secs(10), || async {
            let sns = l.leaf().supernodes();
            !sns.is_empty() && sns.iter().all(|(id, _)| *id != a.id())
        })
        .await
        .unwrap_or_else(|_| panic!("leaf {i} re-homed away from the dead supernode"));
    }
    // Every leaf's files are still found from every other leaf, through B or C.
    for (i, asker) in leaves.iter().enumerate() {
        let client = asker.client(&[&b, &c]);
        for j in 0..leaves.len() {
            let word = format!("{j}");
            wait_for(Duration::from_secs(10), || async {
                client
                    .search(&words(&format!("song {word}")), 10, T)
                    .await
                    .map(|h| h.len())
                    .unwrap_or(0)
                    == 1
            })
            .await
            .unwrap_or_else(|_| panic!("leaf {i} finds the file of leaf {j}"));
        }
    }
    assert!(killed_at.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn no_hit_names_a_leaf_gone_longer_than_its_lease() {
    let sn = supernode().await;
    let asker = TestLeaf::start(&[&sn], &[]).await;
    let data = tempfile::tempdir().unwrap();
    let share = tempfile::tempdir().unwrap();
    std::fs::write(share.path().join("ghost.txt"), b"boo").unwrap();
    let (socket, kill) = KillableSocket::bind();
    let config = leaf::Config::localhost(data.path(), share.path(), vec![sn.addr().to_string()]);
    let ghost = Leaf::spawn_on_socket(config, socket).await.unwrap();
    let client = asker.client(&[&sn]);
    wait_for(T, || async { found(&client, "ghost").await == 1 })
        .await
        .expect("ghost's file is found");

    kill.kill();
    let lease = servent_net::IDLE_TIMEOUT;
    wait_for(lease + Duration::from_secs(3), || async {
        found(&client, "ghost").await == 0
    })
    .await
    .expect("a silent leaf's files go once its lease is over");
    drop(ghost);
}

#[tokio::test]
async fn a_full_supernode_sends_leaves_elsewhere() {
    let a = supernode_with(supernode::Config {
        max_leaves: 1,
        ..supernode::Config::localhost()
    })
    .await;
    let b = supernode_with(mesh_config(&[&a])).await;
    wait_for(T, || async { a.neighbours().contains(&b.id()) })
        .await
        .expect("a and b mesh");
    let first = TestLeaf::start_attached(&[&a], &[], 1).await;
    wait_for(T, || async { first.leaf().supernodes().len() == 1 })
        .await
        .expect("first leaf on a");
    // Wait until A knows B's load, so that it can point there.
    wait_for(T, || async { !a.state().for_leaves(true).await.is_empty() })
        .await
        .expect("a knows b has room");

    let second = TestLeaf::start_attached(&[&a], &[("moved.txt", b"moved")], 1).await;
    wait_for(T, || async {
        second
            .leaf()
            .supernodes()
            .iter()
            .any(|(id, _)| *id == b.id())
    })
    .await
    .expect("the second leaf goes to b");
    assert_eq!(a.leaf_count(), 1, "a never goes over its cap");
    second.wait_indexed(1).await;
    assert_eq!(
        found(&first.client(&[&a]), "moved").await,
        1,
        "and its files are found from a"
    );
}

#[tokio::test]
async fn a_leaf_walks_past_full_supernodes_to_one_with_room() {
    // A - B - C: A and B are full; only B is linked to C, and A keeps to
    // one neighbour, so all A can name is B.
    let a = supernode_with(supernode::Config {
        max_leaves: 0,
        target_neighbors: 1,
        max_neighbors: 1,
        ..supernode::Config::localhost()
    })
    .await;
    let b = supernode_with(supernode::Config {
        max_leaves: 0,
        ..mesh_config(&[&a])
    })
    .await;
    let c = supernode_with(mesh_config(&[&b])).await;
    wait_for(T, || async {
        a.neighbours() == vec![b.id()] && b.neighbours().contains(&c.id())
    })
    .await
    .expect("the chain forms");

    // A leaf that knows only A ends up on C.
    let l = TestLeaf::start_attached(&[&a], &[("far.txt", b"far")], 1).await;
    wait_for(T, || async {
        l.leaf().supernodes().iter().any(|(id, _)| *id == c.id())
    })
    .await
    .expect("the leaf finds room two hops away");
    assert_eq!((a.leaf_count(), b.leaf_count()), (0, 0));
}

#[tokio::test]
async fn a_restarted_leaf_bootstraps_from_its_cache() {
    let a = supernode().await;
    let b = supernode_with(mesh_config(&[&a])).await;
    let mut l = TestLeaf::start(&[&a], &[("cached.txt", b"c")]).await;
    wait_for(T, || async { l.leaf().supernodes().len() == 2 })
        .await
        .expect("attached to both");
    // Restart with no supernode given at all: the cache must do.
    l.restart(&[]).await;
    wait_for(T, || async { l.leaf().supernodes().len() == 2 })
        .await
        .expect("attached again from the cache");
    l.wait_indexed(1).await;
    drop(b);
}
