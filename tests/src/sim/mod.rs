//! A deterministic simulator of whole Servent networks: one instance of
//! the protocol's rules per simulated node, on a virtual clock, with
//! messages delivered by node after a modelled latency. No sockets, no TLS,
//! no threads per node: 100 000 leaves and 1 000 supernodes run on one
//! machine, and the same seed and scenario give the same report.
//!
//! What it is not: a model of QUIC (a message costs one delivery, a
//! handshake one and a half round trips) or of bandwidth (files are never
//! transferred; a query's hits are what is measured).
//!
//! Run it with `cargo run --release -p servent-tests --bin sim -- --help`.

pub mod dist;
pub mod plot;
pub mod queue;
pub mod report;
pub mod scenario;
mod world;

pub use report::{Report, Sample};
pub use scenario::{RoutingKind, Scenario, ScenarioError};

/// Runs `scenario` to its end: the report and the time series.
pub fn run(scenario: Scenario) -> Result<(Report, Vec<Sample>), ScenarioError> {
    run_with(scenario, false)
}

/// [`run`], printing each sample of the time series to stderr as it is
/// taken when `progress` is set.
pub fn run_with(
    scenario: Scenario,
    progress: bool,
) -> Result<(Report, Vec<Sample>), ScenarioError> {
    scenario.check()?;
    let mut world = world::World::new(scenario);
    world.progress = progress;
    Ok(world.run())
}
