//! Training curves as an SVG (plotters' SVG backend): loss, reward margins and accuracies against the
//! optimizer step, training and evaluation series side by side.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde_json::{Map, Value};

/// One metrics record, as written to `metrics.jsonl`.
pub type Record = Map<String, Value>;

/// A panel: its title and the metric names drawn in it (a name absent from every record is skipped).
const PANELS: [(&str, &[&str]); 3] = [
    ("loss", &["loss", "eval/loss"]),
    ("reward margin", &["rewards/margins", "eval/rewards/margins"]),
    ("accuracy", &["rewards/accuracies", "eval/rewards/accuracies", "eval/safe_preferred_accuracy"]),
];

const COLORS: [RGBColor; 4] =
    [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40)];

/// The (step, value) points of metric `name`, in record order.
pub fn series(records: &[Record], name: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| {
            let step = r.get("step")?.as_f64()?;
            let v = r.get(name)?.as_f64()?;
            v.is_finite().then_some((step, v))
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

/// Draws loss, margins and accuracies against the step into an SVG at `path`.
pub fn plot_metrics(records: &[Record], path: &Path, title: &str) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("plotting {}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(|e| err(&e))?;
    let areas = root.split_evenly((PANELS.len(), 1));
    for ((panel, names), area) in PANELS.iter().zip(areas.iter()) {
        let lines: Vec<(&str, Vec<(f64, f64)>)> =
            names.iter().map(|n| (*n, series(records, n))).filter(|(_, s)| !s.is_empty()).collect();
        let points = lines.iter().flat_map(|(_, s)| s.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in points {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if lines.is_empty() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let pad = ((y1 - y0) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(area)
            .caption(*panel, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| err(&e))?;
        chart.configure_mesh().x_desc("step").draw().map_err(|e| err(&e))?;
        for (i, (name, pts)) in lines.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        if !lines.is_empty() {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
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
