//! The settings' one definition against the TOML file, the flags and `--help`.

use std::path::Path;

use clap::Parser;

use super::cli::{resolve, KEYS};
use super::source::line_col;
use super::*;

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    run: SettingsArgs<Training>,
}

fn parse(args: &[&str]) -> RunOverrides {
    Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied())).unwrap().run.overrides
}

fn resolve_args(args: &[&str]) -> Result<RunConfig> {
    RunConfig::resolve(&parse(args))
}

fn err_of(args: &[&str]) -> String {
    format!("{:#}", resolve_args(args).unwrap_err())
}

#[test]
fn defaults_are_valid_and_round_trip_through_toml() {
    let cfg = RunConfig::default();
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    let text = cfg.to_toml().unwrap();
    let back = RunConfig::from_toml_str(&text, Path::new("x.toml")).unwrap();
    assert_eq!(back, cfg);
}

#[test]
fn vocab_size_of_a_random_init() {
    // Absent: the tokenizer's vocabulary, and nothing in the serialised forms (old hashes hold).
    let cfg = resolve_args(&[]).unwrap();
    assert_eq!(cfg.model.vocab_size, None);
    assert_eq!(cfg.model.random_shape(258).vocab_size, 258);
    assert!(serde_json::to_value(&cfg.model).unwrap().get("vocab_size").is_none());
    assert!(!cfg.to_toml().unwrap().contains("vocab_size"));

    // The flag: the random init gets it, the hash changes, TOML round-trips.
    let big = resolve_args(&["--model.vocab_size", "50257"]).unwrap();
    assert_eq!(big.model.vocab_size, Some(50257));
    assert_eq!(big.model.random_shape(258).vocab_size, 50257);
    assert_ne!(big.trajectory_hash(), cfg.trajectory_hash());
    let back = RunConfig::from_toml_str(&big.to_toml().unwrap(), Path::new("x.toml")).unwrap();
    assert_eq!(back, big);
    let from_file = RunConfig::from_toml_str("[model]\nvocab_size = 1000\n", Path::new("y.toml")).unwrap();
    assert_eq!(from_file.model.random_shape(258).vocab_size, 1000);

    // Out of range: named with the flag it came from.
    let err = err_of(&["--model.vocab_size", "1"]);
    assert!(err.contains("model.vocab_size") && err.contains("--model.vocab_size"), "{err}");
}

#[test]
fn line_col_counts_from_one() {
    assert_eq!(line_col("ab\ncd", 0), (1, 1));
    assert_eq!(line_col("ab\ncd", 4), (2, 2));
}

#[test]
fn every_setting_has_its_toml_path_as_a_flag_in_either_spelling() {
    let paths: Vec<&str> = KEYS.iter().map(|k| k.path.as_str()).collect();
    for path in ["seed", "out_dir", "model.n_layer", "data.path", "objective.name", "objective.gamma"] {
        assert!(paths.contains(&path), "{path} missing from {paths:?}");
    }
    // The listing covers the serde schema: every value of the defaults' TOML has its key.
    let mut values = Vec::new();
    let defaults = toml::Table::try_from(RunConfig::default()).unwrap();
    let mut stack: Vec<(String, &toml::Table)> = vec![(String::new(), &defaults)];
    while let Some((prefix, table)) = stack.pop() {
        for (key, value) in table {
            let path = settings::join(&prefix, key);
            match value.as_table() {
                Some(inner) => stack.push((path, inner)),
                None => values.push(path),
            }
        }
    }
    for path in &values {
        assert!(paths.contains(&path.as_str()), "{path} has no key");
    }

    let underscores = resolve_args(&["--batching.tokens_per_micro_batch", "4096", "--out_dir", "a"]).unwrap();
    let dashes = resolve_args(&["--batching.tokens-per-micro-batch", "4096", "--out-dir", "a"]).unwrap();
    assert_eq!(underscores, dashes);
    assert_eq!(underscores.batching.tokens_per_micro_batch, 4096);
    assert_eq!(underscores.out_dir, Path::new("a"));

    // --set takes any key, its value read as TOML; flags apply in the order given.
    let cfg =
        resolve_args(&["--optimizer.lr", "1e-3", "--set", "optimizer.lr=2e-3", "--set", "data.skip-invalid=true"])
            .unwrap();
    assert_eq!((cfg.optimizer.lr, cfg.data.skip_invalid), (2e-3, true));
    let cfg = resolve_args(&["--set", "optimizer.lr=2e-3", "--optimizer.lr", "1e-3", "--data.skip_invalid"]).unwrap();
    assert_eq!((cfg.optimizer.lr, cfg.data.skip_invalid), (1e-3, true));
    let cfg = resolve_args(&["--data.template", "Q: {prompt} A:", "--data.path", "x y.jsonl"]).unwrap();
    assert_eq!((cfg.data.template.as_str(), cfg.data.path.unwrap()), ("Q: {prompt} A:", "x y.jsonl".into()));

    let err = err_of(&["--set", "optimizer.learning_rate=1"]);
    assert!(err.contains("--set optimizer.learning_rate=1") && err.contains("unknown setting"), "{err}");
    let err = err_of(&["--set", "lr=1"]);
    assert!(err.contains("optimizer.lr"), "a hint names the key: {err}");
    let err = Cli::try_parse_from(["x", "--set", "seed"]).err().unwrap().to_string();
    assert!(err.contains("KEY=VALUE"), "{err}");
    let err = err_of(&["--seed", "abc"]);
    assert!(err.contains("seed") && err.contains("--seed"), "{err}");
}

#[test]
fn help_lists_every_setting_with_its_help_and_default() {
    let help = <Cli as clap::CommandFactory>::command().render_long_help().to_string();
    for key in KEYS.iter() {
        assert!(help.contains(&format!("--{}", key.path)), "--help lacks --{}", key.path);
        assert!(!key.help.is_empty(), "{} has no help", key.path);
    }
    for line in ["[default: 8192]", "[default: safedpo]", "[default: runs/safedpo]", "SafeDPO's safety margin"] {
        assert!(help.contains(line), "--help lacks {line:?}");
    }
    assert!(help.contains("simpo: must be a finite number > 0, default 2"), "{help}");
}

#[test]
fn the_objective_table_takes_its_names_defaults_and_bounds_from_the_loss() {
    let cfg = |args: &[&str]| resolve_args(args).unwrap().objective;
    assert_eq!(cfg(&[]), Objective::SafeDpo { beta: 0.1, delta: 10.0 });
    assert_eq!(cfg(&["--objective.name", "simpo"]), Objective::default_for("simpo").unwrap());
    assert_eq!(
        cfg(&["--objective.name", "sigmoid", "--objective.beta", "0.3"]),
        Objective::Dpo { beta: 0.3, safety_margin: 0.0 }
    );
    assert_eq!(
        cfg(&["--objective.name", "cdpo", "--objective.eps", "0.5"]),
        Objective::Cdpo { beta: 0.1, eps: 0.5, safety_margin: 0.0 }
    );

    let err = err_of(&["--objective.name", "dpo", "--objective.delta", "3"]);
    assert!(err.contains("objective.delta") && err.contains("dpo") && err.contains("--objective.delta"), "{err}");
    let err = err_of(&["--objective.name", "robust", "--objective.eps", "0.5"]);
    assert!(err.contains("objective.eps") && err.contains("[0, 0.5)") && err.contains("--objective.eps"), "{err}");
    let err = err_of(&["--objective.name", "gdpo"]);
    assert!(err.contains("gdpo") && err.contains("safedpo"), "{err}");

    // A file naming one objective; a flag naming another starts from that one's defaults, but a
    // parameter the file sets and the new objective lacks is an error at the file's line.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, "[objective]\nname = \"simpo\"\n").unwrap();
    let file = path.to_str().unwrap();
    assert_eq!(cfg(&["--config", file, "--objective.name", "ipo"]), Objective::Ipo { beta: 0.1, safety_margin: 0.0 });
    assert_eq!(
        cfg(&["--config", file, "--objective.gamma", "1"]),
        Objective::Simpo { beta: 2.0, gamma: 1.0, safety_margin: 0.0 }
    );
    std::fs::write(&path, "[objective]\nname = \"safedpo\"\ndelta = 5\n").unwrap();
    let err = err_of(&["--config", file, "--objective.name", "dpo"]);
    assert!(err.contains("objective.delta") && err.contains("run.toml:3"), "{err}");
    // The parameter's error points at its line even when `name` comes after it.
    std::fs::write(&path, "[objective]\neps = 0.2\nname = \"dpo\"\n").unwrap();
    let err = err_of(&["--config", file]);
    assert!(err.contains("eps") && err.contains("run.toml"), "{err}");
}

#[test]
fn a_length_given_later_replaces_the_other_length() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(&path, "[optimizer]\nepochs = 2\n").unwrap();
    let file = path.to_str().unwrap();
    let cfg = resolve_args(&["--config", file, "--optimizer.total_steps", "7"]).unwrap();
    assert_eq!((cfg.optimizer.total_steps, cfg.optimizer.epochs), (Some(7), None));
    let cfg = resolve_args(&["--config", file]).unwrap();
    assert_eq!(cfg.length(), RunLength::Epochs(2.0));
    let err = err_of(&["--optimizer.total_steps", "7", "--optimizer.epochs", "1"]);
    assert!(err.contains("optimizer.total_steps") && err.contains("exclusive"), "{err}");
}

#[test]
fn a_profile_takes_only_its_settings() {
    struct OnlyModel;
    impl Profile for OnlyModel {
        fn base() -> RunConfig {
            RunConfig { seed: 5, ..RunConfig::default() }
        }
        fn takes(path: &str) -> bool {
            path.starts_with("model.")
        }
        fn validate(_cfg: &RunConfig) -> Vec<FieldError> {
            Vec::new()
        }
    }
    let cfg = resolve::<OnlyModel>(&RunOverrides::default().set("model.n_layer", "2")).unwrap();
    assert_eq!((cfg.config.seed, cfg.config.model.n_layer), (5, 2));
    assert!(cfg.is_set("model.n_layer") && !cfg.is_set("seed"));
    assert_eq!(cfg.origin("model.n_layer"), &Origin::Flag("--model.n_layer".into()));
    let err = resolve::<OnlyModel>(&RunOverrides::default().set("data.path", "x")).unwrap_err().to_string();
    assert!(err.contains("does not take `data.path`"), "{err}");
}

#[test]
fn max_loss_is_checked_left_out_of_the_trajectory_and_of_a_default_file() {
    let cfg = resolve_args(&[]).unwrap();
    assert_eq!(cfg.train.max_loss, 1e6);
    assert!(!cfg.to_toml().unwrap().contains("[train]"), "configurations written before it are unchanged");
    let unbounded = resolve_args(&["--train.max_loss", "inf"]).unwrap();
    assert_eq!(unbounded.train.max_loss, f64::INFINITY);
    assert_eq!(unbounded.trajectory_hash(), cfg.trajectory_hash(), "a resume may change the bound");
    let back = RunConfig::from_toml_str(&unbounded.to_toml().unwrap(), Path::new("x.toml")).unwrap();
    assert_eq!(back, unbounded);
    for bad in ["0", "-1", "nan"] {
        let err = err_of(&["--train.max_loss", bad]);
        assert!(err.contains("train.max_loss") && err.contains("positive"), "{bad}: {err}");
    }
}

#[test]
fn grad_dtype_is_read_checked_and_left_out_of_a_default_file() {
    assert_eq!(RunConfig::default().train.grad_dtype, GradDtype::Auto);
    assert!(!RunConfig::default().to_toml().unwrap().contains("grad_dtype"));
    for (text, value) in [("auto", GradDtype::Auto), ("f32", GradDtype::F32), ("bf16", GradDtype::Bf16)] {
        let cfg = resolve_args(&["--train.grad_dtype", text]).unwrap();
        assert_eq!(cfg.train.grad_dtype, value);
        assert_eq!(cfg.trajectory_hash(), RunConfig::default().trajectory_hash(), "a storage choice, as the device");
        let back = RunConfig::from_toml_str(&cfg.to_toml().unwrap(), Path::new("x.toml")).unwrap();
        assert_eq!(back.train.grad_dtype, value);
    }
    let err = err_of(&["--train.grad_dtype", "f16"]);
    assert!(err.contains("train.grad_dtype") && err.contains("f16"), "{err}");
    assert!(GradDtype::Auto.accumulates_in_f32(2) && !GradDtype::Auto.accumulates_in_f32(1));
    assert!(GradDtype::F32.accumulates_in_f32(1) && !GradDtype::Bf16.accumulates_in_f32(8));
}
