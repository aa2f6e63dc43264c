//! Figures drawn from what `sim` writes (binary `sim-plot`): the cost and
//! recall of a query against network size, one series per routing, from
//! `--json` reports; and the supernodes alive and elected against the
//! supernodes needed over time, from `--csv` time series.
//!
//! Reading the files and building the series is kept apart from drawing,
//! so the first is tested on small inputs and the second only has to lay
//! the series out. The figures are SVG: the viewer renders the text, so no
//! font library is needed here.

use std::collections::BTreeMap;
use std::ops::Range;

use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Deserialize;

/// Why a figure could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("not a sim report (run sim with --json): {0}")]
    Report(#[from] serde_json::Error),
    #[error("the time series has no header line")]
    NoHeader,
    #[error("the time series has no `{0}` column (is it a sim --csv file?)")]
    MissingColumn(&'static str),
    #[error("line {line} of the time series: {reason}")]
    Row { line: usize, reason: String },
    #[error("nothing to draw: {0}")]
    Empty(&'static str),
    #[error("drawing failed: {0}")]
    Draw(String),
}

fn draw_err<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// The figures of one run that the scale figure draws.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ScalePoint {
    pub routing: String,
    pub leaves: usize,
    pub supernodes: usize,
    pub messages_per_query: f64,
    pub recall_rare: f64,
    pub recall_popular: f64,
}

/// A report as `sim --json` prints it: its own figures and, with
/// `--baseline`, those of the `flood` run of the same scenario and seed.
#[derive(Deserialize)]
struct ReportFile {
    #[serde(flatten)]
    run: ScalePoint,
    baseline: Option<ScalePoint>,
}

/// The points one report contributes: its own, then its baseline's.
pub fn report_points(json: &str) -> Result<Vec<ScalePoint>, PlotError> {
    let file: ReportFile = serde_json::from_str(json)?;
    Ok(std::iter::once(file.run).chain(file.baseline).collect())
}

/// One routing's points, by network size.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleSeries {
    pub routing: String,
    pub points: Vec<ScalePoint>,
}

/// Groups `points` by routing (series in name order), each sorted by
/// leaves. A second point of one routing at one network size is left out
/// and returned apart, so the caller can say so: a `flood` run given on
/// its own and as another report's baseline is the same run when the seed
/// is the same.
pub fn scale_series(points: Vec<ScalePoint>) -> (Vec<ScaleSeries>, Vec<ScalePoint>) {
    let mut by_routing: BTreeMap<String, BTreeMap<(usize, usize), ScalePoint>> = BTreeMap::new();
    let mut dropped = Vec::new();
    for p in points {
        let series = by_routing.entry(p.routing.clone()).or_default();
        match series.entry((p.leaves, p.supernodes)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(p);
            }
            std::collections::btree_map::Entry::Occupied(_) => dropped.push(p),
        }
    }
    let series = by_routing
        .into_iter()
        .map(|(routing, points)| ScaleSeries {
            routing,
            points: points.into_values().collect(),
        })
        .collect();
    (series, dropped)
}

/// The columns of one sample that the supernode figure draws.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SupernodeSample {
    pub t_secs: f64,
    pub supernodes: f64,
    pub elected: f64,
    pub needed: f64,
}

/// Reads a `sim --csv` time series. Columns are found by name in the
/// header, so columns added later or in another order do not matter.
pub fn parse_samples(csv: &str) -> Result<Vec<SupernodeSample>, PlotError> {
    let mut lines = csv
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or(PlotError::NoHeader)?;
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let column = |name: &'static str| {
        names
            .iter()
            .position(|n| *n == name)
            .ok_or(PlotError::MissingColumn(name))
    };
    let cols = [
        column("t_secs")?,
        column("supernodes")?,
        column("elected")?,
        column("needed")?,
    ];
    let mut out = Vec::new();
    for (i, line) in lines {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != names.len() {
            return Err(PlotError::Row {
                line: i + 1,
                reason: format!("{} fields, the header has {}", fields.len(), names.len()),
            });
        }
        let mut v = [0.0; 4];
        for (slot, &c) in v.iter_mut().zip(&cols) {
            *slot = fields[c]
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| PlotError::Row {
                    line: i + 1,
                    reason: format!("`{}` in column `{}` is not a number", fields[c], names[c]),
                })?;
        }
        out.push(SupernodeSample {
            t_secs: v[0],
            supernodes: v[1],
            elected: v[2],
            needed: v[3],
        });
    }
    Ok(out)
}

/// One run's time series and the name its panel is titled with.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    pub label: String,
    pub samples: Vec<SupernodeSample>,
}

// Colours that stay apart in print and for the common colour blindnesses
// (Okabe–Ito).
const COLOURS: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// A log axis around `lo..=hi` (both > 0) with room on each side, so no
/// point sits on the frame; with few labels asked for, plotters labels only
/// the powers of ten in it.
fn log_axis(lo: f64, hi: f64) -> Range<f64> {
    lo / 2.0..hi * 2.0
}

/// Size of the scale figure, pixels.
pub const SCALE_SIZE: (u32, u32) = (1200, 520);

/// Draws messages per query (log scale) and recall against leaves, one
/// series per routing, as an SVG document.
pub fn draw_scale(series: &[ScaleSeries]) -> Result<String, PlotError> {
    let points = || series.iter().flat_map(|s| &s.points);
    let leaves: Vec<f64> = points().map(|p| p.leaves as f64).collect();
    if leaves.is_empty() {
        return Err(PlotError::Empty("no report given"));
    }
    let msgs: Vec<f64> = points()
        .map(|p| p.messages_per_query)
        .filter(|m| *m > 0.0)
        .collect();
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let x = log_axis(min(&leaves).max(1.0), max(&leaves).max(1.0));
    let y = match msgs.is_empty() {
        true => 1.0..10.0,
        false => log_axis(min(&msgs), max(&msgs)),
    };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SCALE_SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root
            .titled(
                "Query cost and recall against network size",
                ("sans-serif", 22),
            )
            .map_err(draw_err)?;
        let panels = root.split_evenly((1, 2));
        draw_messages(&panels[0], series, x.clone(), y)?;
        draw_recall(&panels[1], series, x)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

/// A chart's frame on `area`: its caption, margin and label areas, the
/// same on every panel.
fn panel<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    caption: &str,
) -> ChartBuilder<'a, 'b, DB> {
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64);
    builder
}

/// The series' legend at `position`, in a white box.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)
}

fn draw_messages<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    series: &[ScaleSeries],
    x: Range<f64>,
    y: Range<f64>,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    let mut chart = panel(area, "messages per query (all kinds)")
        .build_cartesian_2d(x.log_scale(), y.log_scale())
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("leaves")
        .y_desc("messages per query")
        .x_labels(5)
        .y_labels(5)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(draw_err)?;
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        let data: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| p.messages_per_query > 0.0)
            .map(|p| (p.leaves as f64, p.messages_per_query))
            .collect();
        chart
            .draw_series(LineSeries::new(data.clone(), c.stroke_width(2)))
            .map_err(draw_err)?
            .label(s.routing.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(data.iter().map(|&(x, y)| {
                EmptyElement::at((x, y))
                    + Circle::new((0, 0), 4, c.filled())
                    + Text::new(format!("{y:.0}"), (6, -16), ("sans-serif", 12))
            }))
            .map_err(draw_err)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

fn draw_recall<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    series: &[ScaleSeries],
    x: Range<f64>,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    // Recall sits near 1 when the routing works: start the axis low enough
    // to show a drop, but not at 0, where 0.99 and 1.0 would merge.
    let lowest = series
        .iter()
        .flat_map(|s| &s.points)
        .flat_map(|p| [p.recall_rare, p.recall_popular])
        .fold(1.0f64, f64::min);
    let y_lo = ((lowest - 0.05) * 10.0).floor().clamp(0.0, 9.0) / 10.0;
    let mut chart = panel(area, "recall (single-holder: solid, popular: dashed)")
        .build_cartesian_2d(x.log_scale(), y_lo..1.01)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("leaves")
        .y_desc("recall")
        .x_labels(5)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()
        .map_err(draw_err)?;
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        // Routings often reach the same recall: each series is drawn wider
        // than the ones after it, so one on top leaves the others visible.
        let under = u32::try_from(series.len() - 1 - i)
            .unwrap_or(u32::MAX)
            .min(2);
        let (width, dot) = (2 + 2 * under, 4 + 2 * under);
        let rare: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|p| (p.leaves as f64, p.recall_rare))
            .collect();
        let popular: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|p| (p.leaves as f64, p.recall_popular))
            .collect();
        chart
            .draw_series(LineSeries::new(rare.clone(), c.stroke_width(width)))
            .map_err(draw_err)?
            .label(format!("{}, single-holder", s.routing))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width))
            });
        chart
            .draw_series(rare.iter().map(|&p| Circle::new(p, dot, c.filled())))
            .map_err(draw_err)?;
        chart
            .draw_series(DashedLineSeries::new(
                popular.clone(),
                6,
                4,
                c.stroke_width(width),
            ))
            .map_err(draw_err)?
            .label(format!("{}, popular", s.routing))
            .legend(move |(x, y)| {
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (8, 0)], c.stroke_width(width))
                    + PathElement::new(vec![(12, 0), (20, 0)], c.stroke_width(width))
            });
        chart
            .draw_series(
                popular
                    .iter()
                    .map(|&p| TriangleMarker::new(p, dot + 1, c.stroke_width(width))),
            )
            .map_err(draw_err)?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerLeft)?;
    Ok(())
}

/// Width of the supernode figure and height of each run's panel, pixels.
pub const SUPERNODE_PANEL: (u32, u32) = (1000, 360);

/// Draws, for each time series, the supernodes alive and elected and the
/// supernodes needed against simulated minutes, one panel a run (their
/// sizes differ by orders of magnitude), as an SVG document.
pub fn draw_supernodes(timelines: &[Timeline]) -> Result<String, PlotError> {
    if timelines.is_empty() || timelines.iter().all(|t| t.samples.is_empty()) {
        return Err(PlotError::Empty("no sample in the time series given"));
    }
    let n = u32::try_from(timelines.len()).unwrap_or(u32::MAX);
    let size = (
        SUPERNODE_PANEL.0,
        SUPERNODE_PANEL.1.saturating_mul(n).saturating_add(40),
    );
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root
            .titled("Supernodes against need over time", ("sans-serif", 22))
            .map_err(draw_err)?;
        let panels = root.split_evenly((timelines.len(), 1));
        for (panel, t) in panels.iter().zip(timelines) {
            draw_timeline(panel, t)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw_timeline<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    t: &Timeline,
) -> Result<(), PlotError>
where
    DB::ErrorType: 'static,
{
    let minutes = t
        .samples
        .iter()
        .map(|s| s.t_secs / 60.0)
        .fold(0.0, f64::max)
        .max(1.0);
    let top = t
        .samples
        .iter()
        .flat_map(|s| [s.supernodes, s.elected, s.needed])
        .fold(1.0, f64::max);
    let mut chart = panel(area, t.label.as_str())
        .build_cartesian_2d(0.0..minutes, 0.0..top * 1.1)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("simulated minutes")
        .y_desc("supernodes")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(draw_err)?;
    type Column = fn(&SupernodeSample) -> f64;
    let lines: [(&str, Column); 3] = [
        ("alive", |s| s.supernodes),
        ("elected", |s| s.elected),
        ("needed", |s| s.needed),
    ];
    for (i, (name, get)) in lines.into_iter().enumerate() {
        let c = colour(i);
        let data = t.samples.iter().map(|s| (s.t_secs / 60.0, get(s)));
        chart
            .draw_series(LineSeries::new(data, c.stroke_width(2)))
            .map_err(draw_err)?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(routing: &str, leaves: usize, msgs: f64, rare: f64) -> String {
        format!(
            r#"{{"seed":1,"leaves":{leaves},"supernodes":{},"routing":"{routing}",
            "messages_per_query":{msgs},"recall_rare":{rare},"recall_popular":1.0,
            "events":5}}"#,
            leaves / 100
        )
    }

    fn point(routing: &str, leaves: usize, msgs: f64) -> ScalePoint {
        ScalePoint {
            routing: routing.into(),
            leaves,
            supernodes: leaves / 100,
            messages_per_query: msgs,
            recall_rare: 1.0,
            recall_popular: 1.0,
        }
    }

    #[test]
    fn a_report_gives_its_own_point_and_its_baselines() {
        let base = report("flood", 1000, 2307.7, 0.9992);
        let json = format!(
            r#"{{"seed":1,"leaves":1000,"supernodes":10,"routing":"walk",
            "messages_per_query":1025.7,"recall_rare":0.99,"recall_popular":0.98,
            "vs_baseline":{{"messages_per_query":0.44}},"baseline":{base}}}"#
        );
        let points = report_points(&json).unwrap();
        assert_eq!(points.len(), 2);
        assert_eq!(points[0].routing, "walk");
        assert_eq!(points[0].messages_per_query, 1025.7);
        assert_eq!(points[0].recall_popular, 0.98);
        assert_eq!(points[1].routing, "flood");
        assert_eq!(points[1].recall_rare, 0.9992);
    }

    #[test]
    fn a_report_without_baseline_gives_one_point() {
        let points = report_points(&report("flood", 10_000, 24_158.0, 1.0)).unwrap();
        assert_eq!(points, vec![point("flood", 10_000, 24_158.0)]);
    }

    #[test]
    fn text_that_is_not_a_json_report_is_refused() {
        for text in [
            "",
            "routing  \"walk\"",
            r#"{"routing":"walk","leaves":1000}"#,
        ] {
            let e = report_points(text).unwrap_err();
            assert!(e.to_string().contains("--json"), "{e}");
        }
    }

    #[test]
    fn series_are_per_routing_sorted_by_size_without_repeats() {
        let (series, dropped) = scale_series(vec![
            point("walk", 10_000, 3000.0),
            point("flood", 10_000, 24_000.0),
            point("walk", 1000, 1000.0),
            point("flood", 1000, 2300.0),
            point("flood", 1000, 2300.5),
        ]);
        let names: Vec<&str> = series.iter().map(|s| s.routing.as_str()).collect();
        assert_eq!(names, ["flood", "walk"]);
        let leaves: Vec<usize> = series[1].points.iter().map(|p| p.leaves).collect();
        assert_eq!(leaves, [1000, 10_000]);
        assert_eq!(series[0].points[0].messages_per_query, 2300.0);
        assert_eq!(dropped, vec![point("flood", 1000, 2300.5)]);
    }

    const CSV: &str = "t_secs,supernodes,elected,needed,online_leaves,attached_leaves,max_leaves_over_cap,msgs_per_sec\n\
        0,10,0,1,0,0,0.000,0.0\n\
        600,10,0,4,950,950,0.900,120.5\n\
        700,20,10,4,950,950,0.500,300.0\n";

    #[test]
    fn the_time_series_is_read_by_column_name() {
        let s = parse_samples(CSV).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[2],
            SupernodeSample {
                t_secs: 700.0,
                supernodes: 20.0,
                elected: 10.0,
                needed: 4.0
            }
        );
        let reordered = "needed,t_secs,elected,supernodes\n4,60,1,11\n";
        assert_eq!(
            parse_samples(reordered).unwrap(),
            vec![SupernodeSample {
                t_secs: 60.0,
                supernodes: 11.0,
                elected: 1.0,
                needed: 4.0
            }]
        );
    }

    #[test]
    fn a_broken_time_series_says_where() {
        assert!(matches!(parse_samples(""), Err(PlotError::NoHeader)));
        assert!(matches!(
            parse_samples("t_secs,supernodes,elected\n0,1,0\n"),
            Err(PlotError::MissingColumn("needed"))
        ));
        let e = parse_samples("t_secs,supernodes,elected,needed\n0,1,0,1\n10,1,0\n").unwrap_err();
        assert!(matches!(e, PlotError::Row { line: 3, .. }), "{e}");
        let e = parse_samples("t_secs,supernodes,elected,needed\n0,x,0,1\n").unwrap_err();
        assert!(e.to_string().contains("`x` in column `supernodes`"), "{e}");
        let e = parse_samples("t_secs,supernodes,elected,needed\n0,NaN,0,1\n").unwrap_err();
        assert!(matches!(e, PlotError::Row { line: 2, .. }), "{e}");
    }

    #[test]
    fn the_scale_figure_is_an_svg_with_its_axes_and_series() {
        let (series, _) = scale_series(vec![
            point("walk", 1000, 1025.7),
            point("flood", 1000, 2307.7),
            point("flood", 10_000, 24_158.0),
        ]);
        let svg = draw_scale(&series).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for text in [
            "leaves",
            "messages per query",
            "recall",
            "flood, popular",
            "walk, single-holder",
            "2308",
        ] {
            assert!(svg.contains(text), "no {text:?} in the figure");
        }
    }

    #[test]
    fn the_supernode_figure_has_a_panel_per_run() {
        let samples = parse_samples(CSV).unwrap();
        let timelines = [
            Timeline {
                label: "1 000 leaves".into(),
                samples: samples.clone(),
            },
            Timeline {
                label: "10 000 leaves".into(),
                samples,
            },
        ];
        let svg = draw_supernodes(&timelines).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for text in [
            "simulated minutes",
            "supernodes",
            "alive",
            "elected",
            "needed",
            "1 000 leaves",
            "10 000 leaves",
        ] {
            assert!(svg.contains(text), "no {text:?} in the figure");
        }
    }

    #[test]
    fn nothing_to_draw_is_an_error_not_an_empty_figure() {
        assert!(matches!(draw_scale(&[]), Err(PlotError::Empty(_))));
        assert!(matches!(draw_supernodes(&[]), Err(PlotError::Empty(_))));
        let empty = Timeline {
            label: "x".into(),
            samples: vec![],
        };
        assert!(matches!(
            draw_supernodes(&[empty]),
            Err(PlotError::Empty(_))
        ));
    }
}
