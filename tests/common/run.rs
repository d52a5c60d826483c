//! What the trainer's and the binary's tests share: the synthetic preference file, a tiny run's
//! configuration, and running the `safedpo` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safedpo::config::RunConfig;
use safedpo::data::{synthetic_pku_rows, write_pku_jsonl};

/// Writes `n` synthetic PKU-SafeRLHF rows to `dir/data.jsonl` and returns the file.
pub fn synthetic_data(dir: &Path, n: usize, seed: u64) -> PathBuf {
    let path = dir.join("data.jsonl");
    write_pku_jsonl(&path, &synthetic_pku_rows(n, seed)).unwrap();
    path
}

/// The part every tiny run shares: seed 7, the data at `data` with the `U: {prompt} A:` template,
/// a fifth held out, sequences (and the model's context) of `max_len`, one layer of width 16 with
/// two heads, lr 2e-3, no checkpoints. Each test sets its batching, schedule and intervals.
pub fn tiny_run(out: &Path, data: &Path, max_len: usize) -> RunConfig {
    let mut c = RunConfig { out_dir: out.to_path_buf(), seed: 7, ..Default::default() };
    c.data.path = Some(data.to_path_buf());
    c.data.template = "U: {prompt} A:".into();
    c.data.max_len = max_len;
    c.data.eval_fraction = 0.2;
    c.model.n_positions = max_len;
    (c.model.n_layer, c.model.n_embd, c.model.n_head) = (1, 16, 2);
    c.optimizer.lr = 2e-3;
    c.intervals.checkpoint_every = 0;
    c
}

/// Runs the `safedpo` binary with `args`.
pub fn safedpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safedpo")).args(args).output().expect("running the safedpo binary")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = safedpo(args);
    assert!(
        out.status.success(),
        "safedpo {args:?} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}
