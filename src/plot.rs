//! Training curves as an SVG (plotters' SVG backend) against the optimizer step: one run's panels
//! (loss, reward margins, accuracies, learning rate; training and evaluation series side by side), and
//! several runs overlaid, one colour per run, one panel per metric. Written atomically (temp + rename),
//! so that a viewer never reads a half-written plot while training refreshes it.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use serde_json::{Map, Value};

/// One metrics record, as written to `metrics.jsonl`.
pub type Record = Map<String, Value>;

/// A run directory's metrics file.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// The plot a training run keeps in its directory.
pub const PLOT_FILE: &str = "plot.svg";

/// The label of every x axis.
pub const STEP_AXIS: &str = "optimizer step";

/// A run's panels: title and the metric names drawn in it (a panel none of whose metrics is in any
/// record is left out: an SFT run has no reward panels).
const PANELS: [(&str, &[&str]); 4] = [
    ("loss", &["loss", "eval/loss"]),
    ("reward margin", &["rewards/margins", "eval/rewards/margins"]),
    ("accuracy", &["rewards/accuracies", "eval/rewards/accuracies", "eval/safe_preferred_accuracy"]),
    ("learning rate", &["learning_rate"]),
];

/// The metrics `safedpo plot` overlays when none is named (those present in some run).
pub const DEFAULT_OVERLAY_METRICS: [&str; 7] = [
    "loss",
    "eval/loss",
    "rewards/margins",
    "rewards/accuracies",
    "eval/rewards/accuracies",
    "eval/safe_preferred_accuracy",
    "learning_rate",
];

/// Tableau's ten colours: distinct for up to ten lines in a panel.
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

const WIDTH: u32 = 900;
const PANEL_HEIGHT: u32 = 260;

/// The (step, value) points of metric `name`, in record order (non-finite values skipped).
pub fn series(records: &[Record], name: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| {
            let step = r.get("step")?.as_f64()?;
            let v = r.get(name)?.as_f64()?;
            (step.is_finite() && v.is_finite()).then_some((step, v))
        })
        .collect()
}

/// Reads `metrics.jsonl` (one JSON object a line; blank lines skipped). A last line cut short (no
/// newline, not JSON: a write a crash or a full disk interrupted) is dropped with a warning on stderr.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let (records, torn) = read_metrics_report(path)?;
    if let Some(warning) = torn {
        eprintln!("warning: {warning}");
    }
    Ok(records)
}

/// [`read_metrics`], the warning returned (`Some` when a torn last line was dropped).
pub fn read_metrics_report(path: &Path) -> Result<(Vec<Record>, Option<String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(rec) => records.push(rec),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {
                let warning = format!(
                    "{}:{}: dropped a torn last record ({} bytes, no newline)",
                    path.display(),
                    i + 1,
                    line.len()
                );
                return Ok((records, Some(warning)));
            }
            Err(e) => return Err(anyhow!("{}:{}: not a JSON object: {e}", path.display(), i + 1)),
        }
    }
    Ok((records, None))
}

/// One training run's metrics, named for the legend.
pub struct Run {
    pub name: String,
    pub records: Vec<Record>,
}

impl Run {
    /// The run in `dir` (its `metrics.jsonl`), named as the directory was given.
    pub fn load(dir: &Path) -> Result<Self> {
        let path: PathBuf = dir.join(METRICS_FILE);
        if !path.is_file() {
            bail!("{}: no {METRICS_FILE} there (not a training run directory?)", dir.display());
        }
        Ok(Self { name: dir.display().to_string(), records: read_metrics(&path)? })
    }
}

/// A line of a panel.
struct Line {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// A chart of the figure: its caption, y axis label and lines.
struct Panel {
    caption: String,
    y_label: String,
    lines: Vec<Line>,
}

/// Draws one run's loss, margins, accuracies and learning rate into an SVG at `path`.
pub fn plot_metrics(records: &[Record], path: &Path, title: &str) -> Result<()> {
    let panels: Vec<Panel> = PANELS
        .iter()
        .map(|(caption, names)| {
            let lines = names
                .iter()
                .zip(COLORS)
                .map(|(name, color)| Line { label: name.to_string(), color, points: series(records, name) })
                .filter(|l| !l.points.is_empty())
                .collect();
            Panel { caption: caption.to_string(), y_label: caption.to_string(), lines }
        })
        .filter(|p: &Panel| !p.lines.is_empty())
        .collect();
    write_svg(&panels, path, title)
}

/// Overlays `runs` into an SVG at `path`: one panel per metric (`metrics`, else those of
/// [`DEFAULT_OVERLAY_METRICS`] some run has), one colour per run. A named metric no run has is an error.
pub fn plot_runs(runs: &[Run], metrics: &[String], path: &Path) -> Result<()> {
    if runs.is_empty() {
        bail!("no run to plot");
    }
    let has = |name: &str| runs.iter().any(|r| !series(&r.records, name).is_empty());
    let names: Vec<String> = if metrics.is_empty() {
        DEFAULT_OVERLAY_METRICS.iter().filter(|n| has(n)).map(|n| n.to_string()).collect()
    } else {
        if let Some(name) = metrics.iter().find(|n| !has(n)) {
            bail!("no run has the metric `{name}` (available: {})", available_metrics(runs).join(", "));
        }
        metrics.to_vec()
    };
    if names.is_empty() {
        bail!("the runs have none of the metrics {}; name one with --metric", DEFAULT_OVERLAY_METRICS.join(", "));
    }
    let panels: Vec<Panel> = names
        .iter()
        .map(|name| Panel {
            caption: name.clone(),
            y_label: name.clone(),
            lines: runs
                .iter()
                .zip(COLORS.iter().cycle())
                .map(|(run, color)| Line { label: run.name.clone(), color: *color, points: series(&run.records, name) })
                .filter(|l| !l.points.is_empty())
                .collect(),
        })
        .collect();
    let title = if runs.len() == 1 { runs[0].name.clone() } else { format!("{} runs", runs.len()) };
    write_svg(&panels, path, &title)
}

/// The numeric metrics (other than the step) of any record of `runs`, sorted.
fn available_metrics(runs: &[Run]) -> Vec<String> {
    let mut names: Vec<String> = runs
        .iter()
        .flat_map(|r| r.records.iter())
        .flat_map(|rec| rec.iter().filter(|(k, v)| *k != "step" && v.is_number()).map(|(k, _)| k.clone()))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A labelled point of [`plot_points`].
pub struct LabelledPoint {
    pub label: String,
    pub x: f64,
    pub y: f64,
}

/// One panel of labelled points (`x_label` across, `y_label` up), a colour and a legend entry per
/// point: methods placed by two scores, as the SafeDPO paper plots helpfulness against harmlessness.
/// Written atomically.
pub fn plot_points(points: &[LabelledPoint], x_label: &str, y_label: &str, path: &Path, title: &str) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for p in points.iter().filter(|p| p.x.is_finite() && p.y.is_finite()) {
        (x0, x1, y0, y1) = (x0.min(p.x), x1.max(p.x), y0.min(p.y), y1.max(p.y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    let (px, py) = (((x1 - x0) * 0.15).max(0.05), ((y1 - y0) * 0.15).max(0.05));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 2 * PANEL_HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc(x_label).y_desc(y_label).draw().map_err(|e| err(&e))?;
        for (p, color) in points.iter().zip(COLORS.iter().cycle()) {
            let color = *color;
            chart
                .draw_series(std::iter::once(Circle::new((p.x, p.y), 6, color.filled())))
                .map_err(|e| err(&e))?
                .label(p.label.as_str())
                .legend(move |(x, y)| Circle::new((x + 6, y), 5, color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
        root.present().map_err(|e| err(&e))?;
    }
    crate::util::write_atomic(path, svg.as_bytes())
}

/// Renders the panels one under the other and writes the SVG atomically.
fn write_svg(panels: &[Panel], path: &Path, title: &str) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let mut svg = String::new();
    {
        let height = 40 + PANEL_HEIGHT * panels.len().max(1) as u32;
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(&e))?;
        let root = root.titled(title, ("sans-serif", 22)).map_err(|e| err(&e))?;
        let areas = root.split_evenly((panels.len().max(1), 1));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(panel, area).map_err(|e| err(&e))?;
        }
        root.present().map_err(|e| err(&e))?;
    }
    crate::util::write_atomic(path, svg.as_bytes())
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn draw_panel(panel: &Panel, area: &Area) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in panel.lines.iter().flat_map(|l| l.points.iter()) {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if panel.lines.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    // Relative padding, so that a learning rate of 1e-6 still spans the panel.
    let pad = ((y1 - y0) * 0.05).max(y0.abs().max(y1.abs()) * 1e-3).max(1e-12);
    let mut chart = ChartBuilder::on(area)
        .caption(panel.caption.as_str(), ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    chart.configure_mesh().x_desc(STEP_AXIS).y_desc(panel.y_label.as_str()).draw()?;
    for line in &panel.lines {
        let color = line.color;
        // The legend's marker is a square, so that the SVG holds exactly one polyline per line.
        chart
            .draw_series(LineSeries::new(line.points.iter().copied(), color.stroke_width(2)))?
            .label(line.label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 4), (x + 12, y + 4)], color.filled()));
    }
    if !panel.lines.is_empty() {
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_dropped_with_a_warning_and_any_other_bad_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(&path, "{\"step\":1}\n{\"step\":2}\n{\"step\":3,\"lo").unwrap();
        let (records, warning) = read_metrics_report(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert!(warning.unwrap().contains("metrics.jsonl:3: dropped a torn last record"));
        assert_eq!(read_metrics(&path).unwrap(), records);
        // A whole last line that is not JSON, or a bad line before the last, is no torn write.
        std::fs::write(&path, "{\"step\":1}\nnot json\n").unwrap();
        assert!(read_metrics(&path).unwrap_err().to_string().contains("metrics.jsonl:2"));
        std::fs::write(&path, "{\"step\":1}\n{\"st\n{\"step\":3}").unwrap();
        assert!(read_metrics(&path).unwrap_err().to_string().contains("metrics.jsonl:2"));
        std::fs::write(&path, "{\"step\":1}\n").unwrap();
        assert_eq!(read_metrics_report(&path).unwrap().1, None);
    }

    #[test]
    fn writes_a_point_plot_with_every_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("points.svg");
        let points =
            [("SFT", 1.0, 0.5), ("SafeDPO", 1.2, 3.4)].map(|(label, x, y)| LabelledPoint { label: label.into(), x, y });
        plot_points(&points, "helpfulness", "harmlessness", &path, "methods").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(svg.matches("<circle").count(), 4, "a point and a legend marker each");
        assert!(svg.contains("SafeDPO") && svg.contains("helpfulness") && svg.contains("harmlessness"));
    }

    #[test]
    fn writes_an_svg_with_every_series() {
        let dir = tempfile::tempdir().unwrap();
        let mut records = Vec::new();
        for step in 0..20u32 {
            let x = step as f64;
            let mut r = Record::new();
            r.insert("step".into(), step.into());
            r.insert("loss".into(), (1.0 / (1.0 + x)).into());
            r.insert("rewards/margins".into(), (x * 0.1).into());
            if step % 5 == 0 {
                r.insert("eval/safe_preferred_accuracy".into(), (0.5 + x / 40.0).into());
            }
            records.push(r);
        }
        let path = dir.path().join("m.svg");
        plot_metrics(&records, &path, "test").unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        for name in ["loss", "rewards/margins", "eval/safe_preferred_accuracy"] {
            assert!(svg.contains(name), "legend lacks {name}");
        }
        assert!(!svg.contains("eval/loss"), "absent series drawn");
        assert_eq!(series(&records, "eval/safe_preferred_accuracy").len(), 4);
    }
}
