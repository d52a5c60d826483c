//! Training checkpoints: the layout of `out_dir`, crash-safe commits, and the files a resumed run
//! reads back.
//!
//! ```text
//! out_dir/
//!   config.toml            the resolved run configuration
//!   metrics.jsonl          appended as training goes
//!   reference_logps.safetensors   the reference cache (precompute_ref)
//!   checkpoint-<step>/     config.json, model.safetensors (HF), [tokenizer files],
//!                          optimizer.safetensors, state.json, metrics.jsonl (up to <step>),
//!                          run_config.toml
//!   final/                 the same, after the last step
//!   latest                 one line: the name of the newest complete checkpoint directory
//! ```
//!
//! A checkpoint is written into a hidden staging directory (`.checkpoint-<step>.partial`), every
//! file atomically; only when all of it is on disk is the directory renamed into place, and only then
//! is `latest` atomically rewritten to name it. A crash or an error at any point leaves the previous
//! checkpoint and `latest` as they were.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::data::BatcherState;
use crate::loss::LossState;
use crate::util::write_atomic;

pub const LATEST_FILE: &str = "latest";
pub const STATE_FILE: &str = "state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const FINAL_DIR: &str = "final";
/// The run configuration, copied into every checkpoint (the commands that read a model take its data
/// settings: `config::model_dir`).
pub use crate::config::RUN_CONFIG_FILE;
const STATE_FORMAT: &str = "safedpo-train-state-v1";

/// The name of the checkpoint directory of `step`.
pub fn checkpoint_name(step: usize) -> String {
    format!("checkpoint-{step}")
}

/// Everything besides weights and optimizer moments that a resumed run needs to continue exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub format: String,
    /// `"preference"` or `"sft"`.
    pub task: String,
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Where the data order stands.
    pub batcher: BatcherState,
    /// The run's random stream (for anything stochastic in a step).
    pub rng: ChaCha8Rng,
    /// `RunConfig::trajectory_hash` of the run that wrote it.
    pub config_hash: String,
    /// The trainer state the loss reads (`bco_pair`'s running reward mean); absent (the initial
    /// state) in checkpoints whose objective has none.
    #[serde(default, skip_serializing_if = "is_initial_loss_state")]
    pub loss: LossState,
}

fn is_initial_loss_state(state: &LossState) -> bool {
    *state == LossState::default()
}

impl TrainState {
    pub fn new(
        task: &str,
        step: usize,
        total_steps: usize,
        batcher: BatcherState,
        rng: ChaCha8Rng,
        config_hash: String,
    ) -> Self {
        let (format, task, loss) = (STATE_FORMAT.to_string(), task.to_string(), LossState::default());
        Self { format, task, step, total_steps, batcher, rng, config_hash, loss }
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(STATE_FILE);
        let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let state: Self = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        ensure!(
            state.format == STATE_FORMAT,
            "{}: format {:?}, expected {STATE_FORMAT:?}",
            path.display(),
            state.format
        );
        Ok(state)
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("serialising the training state")?;
        write_atomic(&dir.join(STATE_FILE), text.as_bytes())
    }
}

/// f32 tensors to a safetensors file (atomically), with string metadata.
pub fn write_f32_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>, &[f32])],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| anyhow::anyhow!("serialising {}: {e}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Tensors by name: (shape, data).
pub type F32Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// All tensors of a safetensors file as f32 (every tensor must be F32), and its metadata.
pub fn read_f32_safetensors(path: &Path) -> Result<(F32Tensors, HashMap<String, String>)> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        ensure!(view.dtype() == Dtype::F32, "{}: tensor {name} is {:?}, expected F32", path.display(), view.dtype());
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        out.insert(name, (view.shape().to_vec(), data));
    }
    Ok((out, metadata))
}

/// Writes the optimizer state (`AdamW::state_to_host`) as `optimizer.safetensors` in `dir`.
pub fn write_optimizer_state(dir: &Path, state: &BTreeMap<String, Vec<f32>>) -> Result<()> {
    let tensors: Vec<(String, Vec<usize>, &[f32])> =
        state.iter().map(|(k, v)| (k.clone(), vec![v.len()], v.as_slice())).collect();
    let meta = HashMap::from([("format".to_string(), "safedpo-adamw-v1".to_string())]);
    write_f32_safetensors(&dir.join(OPTIMIZER_FILE), &tensors, meta)
}

/// Reads `optimizer.safetensors` from `dir`.
pub fn read_optimizer_state(dir: &Path) -> Result<BTreeMap<String, Vec<f32>>> {
    let (tensors, _) = read_f32_safetensors(&dir.join(OPTIMIZER_FILE))?;
    Ok(tensors.into_iter().map(|(k, (_, v))| (k, v)).collect())
}

/// Writes the checkpoint directory `out_dir/name`: `write` fills a staging directory; when it
/// succeeds the staging directory replaces `out_dir/name` and `latest` is pointed at it. On error
/// the staging directory is removed and nothing else changes.
pub fn commit_dir(out_dir: &Path, name: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let staging = out_dir.join(format!(".{name}.partial"));
    let target = out_dir.join(name);
    if staging.exists() {
        // Left over from a crash: never a valid checkpoint.
        fs::remove_dir_all(&staging).with_context(|| format!("removing stale {}", staging.display()))?;
    }
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    if let Err(e) = write(&staging) {
        let _ = fs::remove_dir_all(&staging);
        return Err(e.context(format!("writing checkpoint {} (the previous checkpoint is intact)", target.display())));
    }
    sync_dir(&staging);
    // Move any older directory of the same name aside first; `latest` never names it meanwhile
    // unless it is being rewritten with the same content (the final directory).
    let old = out_dir.join(format!(".{name}.old"));
    if target.exists() {
        if old.exists() {
            fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        fs::rename(&target, &old).with_context(|| format!("moving {} aside", target.display()))?;
    }
    fs::rename(&staging, &target).with_context(|| format!("renaming {} to {}", staging.display(), target.display()))?;
    sync_dir(out_dir);
    write_atomic(&out_dir.join(LATEST_FILE), format!("{name}\n").as_bytes())?;
    if old.exists() {
        let _ = fs::remove_dir_all(&old);
    }
    Ok(target)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The checkpoint `out_dir/latest` names, if there is one.
pub fn read_latest(out_dir: &Path) -> Result<Option<PathBuf>> {
    let path = out_dir.join(LATEST_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let name = name.trim();
    ensure!(
        !name.is_empty() && !name.contains('/') && !name.contains(".."),
        "{}: expected a checkpoint directory name, found {name:?}",
        path.display()
    );
    let dir = out_dir.join(name);
    ensure!(dir.join(STATE_FILE).is_file(), "{} names {}, which has no {STATE_FILE}", path.display(), dir.display());
    Ok(Some(dir))
}

/// Where to resume from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The checkpoint `out_dir/latest` names; a fresh start when there is none.
    Auto,
    /// A checkpoint directory, or a run directory with a `latest` file.
    Dir(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(if s == "auto" { Resume::Auto } else { Resume::Dir(PathBuf::from(s)) })
    }
}

/// The checkpoint directory to resume from, or `None` for a fresh start.
pub fn resolve_resume(resume: Option<&Resume>, out_dir: &Path) -> Result<Option<PathBuf>> {
    match resume {
        None => Ok(None),
        Some(Resume::Auto) => read_latest(out_dir),
        Some(Resume::Dir(dir)) => {
            if dir.join(STATE_FILE).is_file() {
                Ok(Some(dir.clone()))
            } else if dir.join(LATEST_FILE).is_file() {
                read_latest(dir)
            } else {
                bail!(
                    "--resume {}: neither a checkpoint (no {STATE_FILE}) nor a run directory (no {LATEST_FILE})",
                    dir.display()
                )
            }
        }
    }
}

/// Removes the oldest `checkpoint-<step>` directories so that at most `keep` remain (0 keeps all);
/// never removes `protect`.
pub fn prune_checkpoints(out_dir: &Path, keep: usize, protect: &Path) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let mut found: Vec<(usize, PathBuf)> = Vec::new();
    for entry in fs::read_dir(out_dir).with_context(|| format!("listing {}", out_dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) {
            found.push((step, entry.path()));
        }
    }
    found.sort();
    let excess = found.len().saturating_sub(keep);
    for (_, dir) in found.into_iter().take(excess) {
        if dir != protect {
            fs::remove_dir_all(&dir).with_context(|| format!("removing old checkpoint {}", dir.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_commit_keeps_previous_checkpoint_and_latest() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        commit_dir(out, "checkpoint-1", |d| write_atomic(&d.join("a"), b"one")).unwrap();
        let err = commit_dir(out, "checkpoint-2", |d| {
            write_atomic(&d.join("a"), b"two")?;
            bail!("disk full")
        });
        assert!(err.is_err());
        assert_eq!(fs::read_to_string(out.join(LATEST_FILE)).unwrap().trim(), "checkpoint-1");
        assert_eq!(fs::read(out.join("checkpoint-1/a")).unwrap(), b"one");
        assert!(!out.join("checkpoint-2").exists());
        assert!(!out.join(".checkpoint-2.partial").exists());
    }

    #[test]
    fn optimizer_state_round_trips_bit_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let state = BTreeMap::from([
            ("m.wte.weight".to_string(), vec![1.5f32, -0.0, f32::MIN_POSITIVE, 3.0e-39]),
            ("step".to_string(), vec![7.0]),
        ]);
        write_optimizer_state(dir.path(), &state).unwrap();
        let back = read_optimizer_state(dir.path()).unwrap();
        assert_eq!(back.len(), 2);
        for (k, v) in &state {
            let bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
            let back_bits: Vec<u32> = back[k].iter().map(|x| x.to_bits()).collect();
            assert_eq!(bits, back_bits, "{k}");
        }
    }

    #[test]
    fn prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for s in [2, 10, 4] {
            commit_dir(dir.path(), &checkpoint_name(s), |_| Ok(())).unwrap();
        }
        prune_checkpoints(dir.path(), 2, &dir.path().join("checkpoint-4")).unwrap();
        assert!(!dir.path().join("checkpoint-2").exists());
        assert!(dir.path().join("checkpoint-4").exists() && dir.path().join("checkpoint-10").exists());
    }
}
