//! `sim`: runs a simulated Servent network and prints what it measured.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use servent_tests::sim::{self, Sample, Scenario};

// A run allocates and frees hundreds of millions of small messages.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Simulates a Servent network with the protocol's own rules on a virtual
/// clock, and reports recall, latency, message load, supernode counts and
/// re-homing. The flags override the scenario's sizes.
#[derive(Parser)]
#[command(name = "sim")]
struct Args {
    /// Scenario file (TOML); the defaults are 100 000 leaves, 1 000
    /// supernodes and 30 minutes
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    leaves: Option<usize>,
    #[arg(long)]
    supernodes: Option<usize>,
    #[arg(long)]
    minutes: Option<f64>,
    /// Measured queries
    #[arg(long)]
    queries: Option<usize>,
    /// Election rules: need (the default) or overload (the rules before
    /// need was tracked), to put them side by side with one seed
    #[arg(long)]
    election_rules: Option<String>,
    /// Query routing: walk (walkers and keyword filters, the default) or
    /// flood (TTL flooding, the baseline)
    #[arg(long)]
    routing: Option<sim::RoutingKind>,
    /// Print the report as one JSON object
    #[arg(long)]
    json: bool,
    /// Write the time series (one row per sample) to this CSV file
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Print each sample to stderr as the run goes
    #[arg(long)]
    progress: bool,
    /// Also run the same scenario and seed with `flood` routing first, and
    /// add that report (`baseline`) and the ratios of this run to it
    /// (`vs_baseline`)
    #[arg(long)]
    baseline: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut sc = match &args.config {
        Some(path) => Scenario::from_file(path)?,
        None => Scenario::default(),
    };
    if let Some(v) = args.seed {
        sc.seed = v;
    }
    if let Some(v) = args.leaves {
        sc.leaves = v;
    }
    if let Some(v) = args.supernodes {
        sc.supernodes = v;
    }
    if let Some(v) = args.minutes {
        sc.minutes = v;
        sc.warmup_minutes = sc.warmup_minutes.min(v / 2.0);
    }
    if let Some(v) = args.queries {
        sc.queries = v;
    }
    if let Some(v) = args.election_rules {
        sc.election_rules = v;
    }
    if let Some(v) = args.routing {
        sc.routing = v;
    }
    let baseline = match args.baseline {
        true => {
            let flood = Scenario {
                routing: sim::RoutingKind::Flood,
                ..sc.clone()
            };
            Some(sim::run_with(flood, args.progress)?.0)
        }
        false => None,
    };
    let (report, samples) = sim::run_with(sc, args.progress)?;
    if let Some(path) = &args.csv {
        let mut text = String::from(Sample::CSV_HEADER);
        text.push('\n');
        for s in &samples {
            text.push_str(&s.csv());
            text.push('\n');
        }
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let mut v = serde_json::to_value(&report)?;
    if let (Some(base), Some(o)) = (&baseline, v.as_object_mut()) {
        o.insert("vs_baseline".into(), sim::report::ratios(&report, base));
        o.insert("baseline".into(), serde_json::to_value(base)?);
    }
    if args.json {
        println!("{v}");
    } else {
        for (k, v) in v.as_object().into_iter().flatten() {
            println!("{k:>30}  {v}");
        }
    }
    Ok(())
}
