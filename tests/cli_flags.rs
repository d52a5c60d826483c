//! Each subcommand takes only the flags it uses: a settings flag of another command's (the optimizer's
//! on `eval`) is refused by name, one it uses is accepted, and `--help` shows the defaults.

use std::process::{Command, Output};

fn safedpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safedpo")).args(args).output().expect("running the safedpo binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that `args` is refused before anything runs, naming `flag`.
fn refused(args: &[&str], flag: &str) {
    let out = safedpo(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "safedpo {args:?} accepted\nstderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(flag), "safedpo {args:?}: the error does not name {flag}:\n{stderr}");
}

/// Asserts that clap accepts `args` (it may still fail later, on missing files, but not on the flag).
fn accepted(args: &[&str], flag: &str) {
    let stderr = text(&safedpo(args).stderr);
    assert!(!stderr.contains("unexpected argument") && !stderr.contains("does not take"), "{args:?}:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let _ = flag;
}

/// (command and its required arguments, a flag it does not use, a flag it uses)
const CASES: [(&[&str], &str, &str); 7] = [
    (&["train"], "--no-such.flag", "--optimizer.lr"),
    (&["sft"], "--split", "--optimizer.warmup_steps"),
    (&["eval", "--model", "/nonexistent"], "--optimizer.lr", "--objective.beta"),
    (&["logps", "--model", "/nonexistent", "--out", "/nonexistent/x"], "--intervals.eval_every", "--data.max_len"),
    (&["generate", "--model", "/nonexistent", "--prompt", "x"], "--data.max_len", "--seed"),
    (&["demo", "--quick"], "--optimizer.lr", "--seed"),
    (&["bench", "--steps", "1"], "--data.path", "--objective.name"),
];

fn value_for(flag: &str) -> &'static str {
    match flag {
        "--objective.name" => "dpo",
        "--split" => "all",
        "--optimizer.lr" => "1e-3",
        "--objective.beta" => "0.2",
        "--data.path" => "/nonexistent.jsonl",
        _ => "7",
    }
}

#[test]
fn each_command_refuses_a_flag_it_does_not_use() {
    for (command, unused, _) in CASES {
        let mut args = command.to_vec();
        args.extend([unused, value_for(unused)]);
        refused(&args, unused);
    }
    // `--set` names the setting and the refusal.
    let out = safedpo(&["eval", "--model", "/nonexistent", "--set", "optimizer.lr=1e-3"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("does not take `optimizer.lr`"), "{stderr}");
}

#[test]
fn each_command_accepts_a_flag_it_uses() {
    // Parsing only: `--help` after the flag stops before anything runs.
    for (command, _, used) in CASES {
        let mut args = command.to_vec();
        args.extend([used, value_for(used), "--help"]);
        let out = safedpo(&args);
        assert!(out.status.success(), "safedpo {args:?}:\n{}", text(&out.stderr));
        accepted(&args, used);
    }
}

#[test]
fn help_shows_defaults_and_only_the_command_s_settings() {
    let help = |cmd: &str| {
        let out = safedpo(&[cmd, "--help"]);
        assert!(out.status.success());
        text(&out.stdout)
    };
    let train = help("train");
    assert!(train.contains("--optimizer.lr") && train.contains("[default: 0.00001]"), "{train}");
    let eval = help("eval");
    assert!(eval.contains("--objective.beta") && eval.contains("[default: all]"), "{eval}");
    assert!(!eval.contains("--optimizer.") && !eval.contains("--intervals."), "{eval}");
    let generate = help("generate");
    assert!(generate.contains("--data.template") && !generate.contains("--data.path"), "{generate}");
    assert!(generate.contains("[default: 64]"), "{generate}");
    assert!(help("plot").contains("[default: plot.svg]"));
}
