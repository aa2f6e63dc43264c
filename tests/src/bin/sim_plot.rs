//! `sim-plot`: draws SVG figures from what `sim` wrote.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use servent_tests::sim::plot;

/// Draws the simulator's figures as SVG files: query cost and recall
/// against network size from `sim --json` reports, and supernodes against
/// need over time from `sim --csv` time series.
#[derive(Parser)]
#[command(name = "sim-plot")]
struct Args {
    #[command(subcommand)]
    figure: Figure,
}

#[derive(Subcommand)]
enum Figure {
    /// Messages per query (log scale) and recall against leaves, one
    /// series per routing; a report with a `baseline` (sim --baseline)
    /// gives both its own point and the baseline's
    Scale {
        /// The SVG file to write
        #[arg(long)]
        out: PathBuf,
        /// Reports printed by `sim --json`, one file each
        #[arg(required = true)]
        reports: Vec<PathBuf>,
    },
    /// Supernodes alive and elected against supernodes needed over time,
    /// one panel a time series
    Supernodes {
        /// The SVG file to write
        #[arg(long)]
        out: PathBuf,
        /// A time series written by `sim --csv`; repeat for more panels
        #[arg(long, required = true)]
        csv: Vec<PathBuf>,
        /// The title of each panel, in the order of --csv (default: the
        /// file's name)
        #[arg(long)]
        label: Vec<String>,
    },
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let (out, svg) = match Args::parse().figure {
        Figure::Scale { out, reports } => {
            let mut points = Vec::new();
            for path in &reports {
                let p = plot::report_points(&read(path)?)
                    .with_context(|| format!("in {}", path.display()))?;
                points.extend(p);
            }
            let (series, dropped) = plot::scale_series(points);
            for p in dropped {
                eprintln!(
                    "sim-plot: a second {} report at {} leaves / {} supernodes: the first one is drawn",
                    p.routing, p.leaves, p.supernodes
                );
            }
            (out, plot::draw_scale(&series)?)
        }
        Figure::Supernodes { out, csv, label } => {
            anyhow::ensure!(
                label.len() <= csv.len(),
                "{} --label for {} --csv",
                label.len(),
                csv.len()
            );
            let mut timelines = Vec::new();
            for (i, path) in csv.iter().enumerate() {
                let samples = plot::parse_samples(&read(path)?)
                    .with_context(|| format!("in {}", path.display()))?;
                let label = label.get(i).cloned().unwrap_or_else(|| {
                    path.file_name().map_or_else(
                        || path.display().to_string(),
                        |n| n.to_string_lossy().into(),
                    )
                });
                timelines.push(plot::Timeline { label, samples });
            }
            (out, plot::draw_supernodes(&timelines)?)
        }
    };
    std::fs::write(&out, svg).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_flags_are_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn scale_takes_several_reports() {
        let a = Args::try_parse_from(["sim-plot", "scale", "--out", "s.svg", "a.json", "b.json"])
            .unwrap();
        match a.figure {
            Figure::Scale { out, reports } => {
                assert_eq!(out, PathBuf::from("s.svg"));
                assert_eq!(reports.len(), 2);
            }
            Figure::Supernodes { .. } => panic!("parsed as supernodes"),
        }
        assert!(Args::try_parse_from(["sim-plot", "scale", "--out", "s.svg"]).is_err());
    }

    #[test]
    fn supernodes_pairs_labels_with_csvs() {
        let a = Args::try_parse_from([
            "sim-plot",
            "supernodes",
            "--out",
            "sn.svg",
            "--csv",
            "a.csv",
            "--label",
            "1 000 leaves",
            "--csv",
            "b.csv",
        ])
        .unwrap();
        match a.figure {
            Figure::Supernodes { csv, label, .. } => {
                assert_eq!(csv, [PathBuf::from("a.csv"), PathBuf::from("b.csv")]);
                assert_eq!(label, ["1 000 leaves"]);
            }
            Figure::Scale { .. } => panic!("parsed as scale"),
        }
    }
}
