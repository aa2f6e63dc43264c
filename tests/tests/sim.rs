//! The network simulator: deterministic, and sane on a small network.

use servent_tests::sim::{self, RoutingKind, Scenario};

/// A network small enough for CI: 10 supernodes, 600 leaves, 4 minutes,
/// supernodes that take 125 leaves each (so that 3 links a leaf fill
/// them) and election timings shortened so that elections happen within it.
fn small() -> Scenario {
    Scenario {
        leaves: 600,
        supernodes: 10,
        max_leaves: 125,
        minutes: 4.0,
        warmup_minutes: 1.5,
        queries: 200,
        catalog_files: 1_000,
        election_time_scale: 0.05,
        ..Scenario::small()
    }
}

#[test]
fn the_same_seed_gives_the_same_report() {
    let (a, series_a) = sim::run(small()).expect("scenario is valid");
    let (b, series_b) = sim::run(small()).expect("scenario is valid");
    assert_eq!(a.deterministic_json(), b.deterministic_json());
    let csv = |s: &[sim::Sample]| s.iter().map(|x| x.csv()).collect::<Vec<_>>().join("\n");
    assert_eq!(csv(&series_a), csv(&series_b));
    let (c, _) = sim::run(Scenario { seed: 2, ..small() }).expect("scenario is valid");
    assert_ne!(
        a.deterministic_json(),
        c.deterministic_json(),
        "another seed, another run"
    );
}

#[test]
fn a_small_network_finds_files_and_elects() {
    let (r, series) = sim::run(small()).expect("scenario is valid");
    println!("{}", serde_json::to_string(&r).expect("report serialises"));
    assert!(r.queries >= 150, "{} queries measured", r.queries);
    // Every measured query of an attached leaf reaches the whole mesh of 10.
    let attached = 1.0 - r.queries_unattached;
    assert!(
        r.recall_rare >= 0.9 * attached,
        "rare recall {} with {attached} attached",
        r.recall_rare
    );
    assert!(r.first_hit_ms_p50 > 0.0 && r.first_hit_ms_p99 < 5_000.0);
    assert!(
        r.max_leaves_over_cap <= 1.0,
        "a supernode took more leaves than its cap"
    );
    assert!(!series.is_empty());
    assert!(r.events > 10_000 && r.events_per_sec > 0.0);
    // Half the leaves are behind NATs, a fifth of those symmetric: a
    // download from a found holder is direct about half the time, and
    // relayed only where both are NATed and one symmetric (about 9 %).
    let p = r.rare_paths;
    let sum = p.direct + p.reversed + p.punched + p.relayed;
    assert!((sum - 1.0).abs() < 0.01, "{p:?}");
    assert!((0.3..0.7).contains(&p.direct), "{p:?}");
    assert!(p.relayed > 0.0 && p.relayed < 0.25, "{p:?}");
    assert!(p.reversed > p.relayed && p.punched > 0.0, "{p:?}");
}

#[test]
fn walkers_find_what_a_flood_finds_for_a_fraction_of_its_messages() {
    // 40 supernodes: more than a walk visits, fewer than a TTL-4 flood
    // reaches, so the flood is the whole mesh and the walk is not.
    let sc = Scenario {
        leaves: 2_000,
        supernodes: 40,
        max_leaves: 300,
        minutes: 3.0,
        warmup_minutes: 1.5,
        queries: 200,
        catalog_files: 1_000,
        election: false,
        routing: RoutingKind::Flood,
        ..Scenario::small()
    };
    let (flood, _) = sim::run(sc.clone()).expect("scenario is valid");
    let walk_sc = Scenario {
        routing: RoutingKind::Walk,
        // Walk even a mesh this small (by default it would be flooded).
        walk_flood_below: 0,
        ..sc
    };
    let (walk, _) = sim::run(walk_sc.clone()).expect("scenario is valid");
    println!(
        "flood {}",
        serde_json::to_string(&flood).expect("serialises")
    );
    println!(
        "walk  {}",
        serde_json::to_string(&walk).expect("serialises")
    );
    assert!(
        flood.recall_rare > 0.95,
        "flood recall {}",
        flood.recall_rare
    );
    assert!(
        walk.recall_rare >= flood.recall_rare - 0.02,
        "walk recall {} against the flood's {}",
        walk.recall_rare,
        flood.recall_rare
    );
    assert!(walk.recall_popular >= flood.recall_popular - 0.05);
    assert!(
        walk.messages_per_rare_query < 0.5 * flood.messages_per_rare_query,
        "walk {} messages a rare query, flood {}",
        walk.messages_per_rare_query,
        flood.messages_per_rare_query
    );
    assert!(walk.messages_per_query_max <= flood.messages_per_query_max);
    assert!(
        walk.filter_bytes_per_supernode_sec > 0.0,
        "filters were sent"
    );
    let (again, _) = sim::run(walk_sc).expect("scenario is valid");
    assert_eq!(again.deterministic_json(), walk.deterministic_json());
}

#[test]
fn elected_supernodes_step_down_soon_after_killed_ones_return() {
    // A third of the dedicated supernodes die at minute 4 and come back
    // at minute 6: leaves are elected in their place, and must give the
    // role back once the network has those supernodes again.
    let sc = Scenario {
        leaves: 3_000,
        supernodes: 30,
        max_leaves: 300,
        minutes: 9.0,
        warmup_minutes: 1.5,
        queries: 100,
        catalog_files: 1_000,
        mass_kill_at_min: Some(4.0),
        mass_kill_share: 0.34,
        supernode_restart_min: 2.0,
        supernode_kill_share_per_hour: 0.0,
        ..Scenario::small()
    };
    let back = 6.0 * 60.0;
    let (r, series) = sim::run(sc).expect("scenario is valid");
    let ratio = |s: &sim::Sample| s.supernodes as f64 / s.needed.max(1) as f64;
    for s in &series {
        println!(
            "t={} supernodes={} elected={} needed={} ratio={:.3}",
            s.t_secs,
            s.supernodes,
            s.elected,
            s.needed,
            ratio(s)
        );
    }
    let elected_before = series
        .iter()
        .filter(|s| s.t_secs < back)
        .map(|s| s.elected)
        .max()
        .unwrap_or(0);
    assert!(elected_before > 0, "no leaf was elected after the kill");
    // 30 s after the return (the drain the rules may take, at this time
    // scale, plus the gossip's delay) the count is within 1.25 of need.
    for s in series.iter().filter(|s| s.t_secs >= back + 30.0) {
        assert!(
            ratio(s) <= 1.25,
            "at {} s: {} supernodes for {} needed",
            s.t_secs,
            s.supernodes,
            s.needed
        );
    }
    assert!(r.recall_rare >= 0.95, "rare recall {}", r.recall_rare);
}

#[test]
fn a_bad_scenario_is_refused() {
    let bad = Scenario {
        supernodes: 0,
        ..small()
    };
    let err = sim::run(bad).expect_err("no supernodes");
    assert!(err.to_string().contains("supernode"), "{err}");
    let bad = Scenario {
        loss: 1.5,
        ..small()
    };
    assert!(sim::run(bad).is_err());
}
