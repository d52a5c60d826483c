//! Training plots: the SVG a run writes (`plot.svg`, refreshed at each evaluation), and `safedpo plot`
//! overlaying runs. The SVG is checked to be well-formed XML, to hold one line (a polyline of width 2)
//! per series per run, and to carry its axis labels and legend.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};
use safedpo::plot::{plot_metrics, plot_runs, Record, Run, STEP_AXIS};

fn safedpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safedpo")).args(args).output().expect("running the safedpo binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The element names of `xml` in document order, after checking that it is well-formed: tags nest
/// and close, attribute values are quoted, `&` only starts an entity.
fn xml_elements(xml: &str) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    let mut elements = Vec::new();
    let mut rest = xml.trim_start();
    let mut roots = 0;
    while let Some(open) = rest.find('<') {
        check_text(&rest[..open]);
        assert!(!stack.is_empty() || rest[..open].trim().is_empty(), "text outside the root element");
        rest = &rest[open..];
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = &after[after.find("-->").expect("unclosed comment") + 3..];
            continue;
        }
        if rest.starts_with("<?") || rest.starts_with("<!") {
            rest = &rest[rest.find('>').expect("unclosed declaration") + 1..];
            continue;
        }
        // The tag's end: the first `>` outside a quoted attribute value.
        let mut quote = None;
        let end = rest
            .char_indices()
            .find(|&(_, c)| match quote {
                Some(q) if c == q => {
                    quote = None;
                    false
                }
                Some(_) => false,
                None if c == '"' || c == '\'' => {
                    quote = Some(c);
                    false
                }
                None => c == '>',
            })
            .map(|(i, _)| i)
            .expect("unclosed tag");
        let tag = &rest[1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop().as_deref(), Some(name.trim()), "mismatched closing tag");
            continue;
        }
        let self_closing = tag.ends_with('/');
        let body = tag.trim_end_matches('/');
        let name: String = body.chars().take_while(|c| !c.is_whitespace()).collect();
        assert!(!name.is_empty() && name.chars().all(|c| c.is_alphanumeric() || "-_:.".contains(c)), "bad tag <{tag}>");
        check_attributes(&body[name.len()..]);
        if stack.is_empty() {
            roots += 1;
        }
        elements.push(name.clone());
        if !self_closing {
            stack.push(name);
        }
    }
    check_text(rest);
    assert!(rest.trim().is_empty(), "text after the root element");
    assert!(stack.is_empty(), "unclosed elements {stack:?}");
    assert_eq!(roots, 1, "one root element");
    elements
}

fn check_text(text: &str) {
    for (i, _) in text.match_indices('&') {
        let entity = &text[i..];
        let semi = entity.find(';').expect("& without ;");
        let name = &entity[1..semi];
        let known = ["amp", "lt", "gt", "quot", "apos"].contains(&name) || name.starts_with('#');
        assert!(known, "unknown entity &{name};");
    }
}

/// ` name="value" name='value' …`
fn check_attributes(mut attrs: &str) {
    loop {
        attrs = attrs.trim_start();
        if attrs.is_empty() {
            return;
        }
        let eq = attrs.find('=').unwrap_or_else(|| panic!("attribute without value: {attrs}"));
        let name = attrs[..eq].trim();
        assert!(!name.is_empty() && !name.contains(char::is_whitespace), "bad attribute name {name:?}");
        let value = attrs[eq + 1..].trim_start();
        let q = value.chars().next().expect("attribute value");
        assert!(q == '"' || q == '\'', "unquoted attribute value: {value}");
        let close = value[1..].find(q).expect("unclosed attribute value");
        check_text(&value[1..1 + close]);
        assert!(!value[1..1 + close].contains('<'), "< in an attribute value");
        attrs = &value[close + 2..];
    }
}

/// The data lines of a plot: its polylines of width 2 (axes and ticks are polylines of width 1).
fn polylines(xml: &str) -> usize {
    let elements = xml_elements(xml);
    assert!(elements.contains(&"polyline".to_string()));
    xml.split("<polyline").skip(1).filter(|tag| tag[..tag.find('>').unwrap()].contains("stroke-width=\"2\"")).count()
}

/// A run's metrics as training writes them: training records every step, evaluations every 5.
fn records(steps: u32, scale: f64, with_eval: bool) -> Vec<Record> {
    let mut out = Vec::new();
    for step in 0..=steps {
        let x = step as f64;
        let mut r = Record::new();
        r.insert("step".into(), step.into());
        if step > 0 {
            r.insert("loss".into(), (scale / (1.0 + x)).into());
            r.insert("rewards/margins".into(), (x * 0.1 * scale).into());
            r.insert("rewards/accuracies".into(), (0.5 + x / (4.0 * steps as f64)).into());
            r.insert("learning_rate".into(), (1e-6 * x / steps as f64).into());
            out.push(r);
        } else if with_eval {
            out.push(r);
        }
        if with_eval && step % 5 == 0 {
            let mut e = Record::new();
            e.insert("step".into(), step.into());
            e.insert("eval/loss".into(), (scale * 1.1 / (1.0 + x)).into());
            e.insert("eval/safe_preferred_accuracy".into(), (0.4 + x / 50.0).into());
            out.push(e);
        }
    }
    out.retain(|r| r.len() > 1);
    out
}

fn write_run(dir: &Path, records: &[Record]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let lines: Vec<String> = records.iter().map(|r| serde_json::Value::Object(r.clone()).to_string()).collect();
    fs::write(dir.join("metrics.jsonl"), lines.join("\n") + "\n").unwrap();
    dir.to_path_buf()
}

#[test]
fn one_run_plot_is_well_formed_with_a_line_per_series_and_labelled_axes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plot.svg");
    let recs = records(20, 1.0, true);
    plot_metrics(&recs, &path, "a run").unwrap();
    let svg = fs::read_to_string(&path).unwrap();
    // loss, eval/loss, margins, accuracies, safe-preferred accuracy, learning rate.
    assert_eq!(polylines(&svg), 6, "{svg}");
    for label in [STEP_AXIS, "loss", "eval/loss", "eval/safe_preferred_accuracy", "learning rate", "learning_rate"] {
        assert!(svg.contains(label), "no {label:?} in the plot");
    }
    assert!(!svg.contains("NaN") && !svg.contains("inf"), "non-finite coordinates");
    assert!(!svg.contains("eval/rewards/margins"), "a series absent from the metrics is drawn");
    // No temporary file left beside it.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn non_finite_values_are_skipped_not_drawn() {
    let dir = tempfile::tempdir().unwrap();
    let mut recs = records(10, 1.0, false);
    recs[3].insert("loss".into(), serde_json::Value::Null);
    let path = dir.path().join("plot.svg");
    plot_metrics(&recs, &path, "gaps").unwrap();
    let svg = fs::read_to_string(&path).unwrap();
    xml_elements(&svg);
    assert!(!svg.contains("NaN"));
}

#[test]
fn overlay_of_two_runs_has_a_line_per_run_per_metric_and_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_run(&dir.path().join("run-a"), &records(20, 1.0, true));
    let b = write_run(&dir.path().join("run-b"), &records(30, 2.0, false));
    let runs = vec![Run::load(&a).unwrap(), Run::load(&b).unwrap()];
    let path = dir.path().join("both.svg");
    plot_runs(&runs, &["loss".into(), "eval/loss".into()], &path).unwrap();
    let svg = fs::read_to_string(&path).unwrap();
    // loss: both runs; eval/loss: run-a only.
    assert_eq!(polylines(&svg), 3, "{svg}");
    for label in ["run-a", "run-b", STEP_AXIS, "eval/loss"] {
        assert!(svg.contains(label), "no {label:?} in the plot");
    }

    // Through the binary: the default metrics, every one either run has.
    let out = dir.path().join("cli.svg");
    let res = safedpo(&["plot", a.to_str().unwrap(), b.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(res.status.success(), "{}", text(&res.stderr));
    assert_eq!(text(&res.stdout).trim(), out.to_str().unwrap());
    let svg = fs::read_to_string(&out).unwrap();
    // loss, margins, accuracies, learning rate: 2 runs each; eval loss, safe-preferred: run-a.
    assert_eq!(polylines(&svg), 4 * 2 + 2);
}

#[test]
fn plot_errors_name_the_directory_or_metric() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("not-a-run");
    fs::create_dir_all(&empty).unwrap();
    let out = dir.path().join("x.svg");
    let res = safedpo(&["plot", empty.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(res.status.code(), Some(1));
    let stderr = text(&res.stderr);
    assert!(stderr.contains("not-a-run") && stderr.contains("metrics.jsonl"), "{stderr}");
    assert!(!out.exists());

    let run = write_run(&dir.path().join("run"), &records(5, 1.0, false));
    let res = safedpo(&["plot", run.to_str().unwrap(), "--metric", "eval/nothing", "--out", out.to_str().unwrap()]);
    assert_eq!(res.status.code(), Some(1));
    let stderr = text(&res.stderr);
    assert!(stderr.contains("eval/nothing") && stderr.contains("learning_rate"), "{stderr}");
}

#[test]
fn training_writes_and_refreshes_its_plot() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_pku_jsonl(&data, &synthetic_pku_rows(40, 3)).unwrap();
    let run = dir.path().join("run");
    let mut args = vec!["train", "--device", "cpu", "--no-progress", "--optimizer.total_steps", "4"];
    args.extend(["--intervals.eval_every", "2", "--data.eval_fraction", "0.25", "--data.max_len", "96"]);
    args.extend(["--model.n_positions", "96", "--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2"]);
    args.extend(["--batching.tokens_per_micro_batch", "800", "--data.path", data.to_str().unwrap()]);
    args.extend(["--out-dir", run.to_str().unwrap()]);
    let res = safedpo(&args);
    assert!(res.status.success(), "{}", text(&res.stderr));
    let svg = fs::read_to_string(run.join("plot.svg")).unwrap();
    assert!(polylines(&svg) >= 4, "{svg}");
    for label in [STEP_AXIS, "eval/loss", "eval/safe_preferred_accuracy", "learning_rate"] {
        assert!(svg.contains(label), "no {label:?} in the run's plot");
    }
    assert!(!fs::read_dir(&run).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains(".tmp")));
}
