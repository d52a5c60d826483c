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
//! A checkpoint is written into a hidden staging directory (`.checkpoint-<step>.<unique>.partial`),
//! every file atomically; only when all of it is on disk is the directory renamed into place, and
//! only then is `latest` atomically rewritten to name it. A crash or an error at any point leaves
//! `latest` naming a complete checkpoint: the previous one, or the new one. Replacing a directory of
//! the same name (see [`commit_dir_with`]) never removes the one `latest` names.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::data::BatcherState;
use crate::loss::LossState;
use crate::model::checkpoint::first_nonfinite;
use crate::model::HostWeights;
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

/// Whether `name` is that of a checkpoint directory: `final` or `checkpoint-<step>`.
pub fn is_checkpoint_name(name: &str) -> bool {
    name == FINAL_DIR || name.strip_prefix("checkpoint-").is_some_and(|s| s.parse::<usize>().is_ok())
}

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

/// A checkpoint's weights and optimizer state hold no NaN or infinite value; else an error naming
/// the first one.
pub fn ensure_finite_state(weights: &HostWeights, optimizer: &BTreeMap<String, Vec<f32>>) -> Result<()> {
    weights.ensure_finite()?;
    for (name, data) in optimizer {
        if let Some((i, x)) = first_nonfinite(data) {
            bail!("optimizer state `{name}` holds {x} at index {i}");
        }
    }
    Ok(())
}

/// Reads `optimizer.safetensors` from `dir`.
pub fn read_optimizer_state(dir: &Path) -> Result<BTreeMap<String, Vec<f32>>> {
    let (tensors, _) = read_f32_safetensors(&dir.join(OPTIMIZER_FILE))?;
    Ok(tensors.into_iter().map(|(k, (_, v))| (k, v)).collect())
}

/// The points of a commit after which a crash leaves the run directory in a different state; a
/// test hook ([`commit_dir_with`]) stops there as a kill would, to check that `latest` names a
/// complete checkpoint at every one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitStep {
    /// The new directory is complete on disk under its hidden staging name.
    Staged,
    /// Replacing a directory: `latest` names the new one under its hidden name.
    LatestOnNew,
    /// Replacing a directory: the old one is gone.
    OldRemoved,
    /// The new directory is in place under its own name.
    InPlace,
    /// `latest` names it.
    LatestMoved,
}

/// Writes the checkpoint directory `out_dir/name`: `write` fills a staging directory; when it
/// succeeds the staging directory takes the name and `latest` is pointed at it. On error the
/// staging directory is removed and nothing else changes.
pub fn commit_dir(out_dir: &Path, name: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    commit_dir_with(out_dir, name, write, &mut |_| Ok(()))
}

/// [`commit_dir`], calling `after` at each [`CommitStep`]; an error from it returns at once, leaving
/// the directory as a crash at that point would.
///
/// Whatever the point, `latest` names a complete directory that exists: a new name is put in place
/// before `latest` moves to it; a name that exists already (`final` again, after a resume from an
/// earlier checkpoint) is replaced while `latest` names the new directory under its unique hidden
/// name, and `latest` comes back to the name only once the name holds the new directory.
pub fn commit_dir_with(
    out_dir: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> Result<()>,
    after: &mut dyn FnMut(CommitStep) -> Result<()>,
) -> Result<PathBuf> {
    let target = out_dir.join(name);
    remove_leftovers(out_dir, Some(name))?;
    let stamp = unique_stamp();
    let staging = out_dir.join(format!(".{name}.{stamp}.partial"));
    fs::create_dir_all(&staging).with_context(|| format!("creating {}", staging.display()))?;
    if let Err(e) = write(&staging) {
        let _ = fs::remove_dir_all(&staging);
        return Err(e.context(format!("writing checkpoint {} (the previous checkpoint is intact)", target.display())));
    }
    sync_dir(&staging);
    after(CommitStep::Staged)?;
    if !target.exists() {
        rename(&staging, &target)?;
        sync_dir(out_dir);
        after(CommitStep::InPlace)?;
    } else {
        let fresh_name = format!(".{name}.{stamp}");
        rename(&staging, &out_dir.join(&fresh_name))?;
        write_latest(out_dir, &fresh_name)?;
        after(CommitStep::LatestOnNew)?;
        install(out_dir, name, &fresh_name, after)?;
    }
    write_latest(out_dir, name)?;
    after(CommitStep::LatestMoved)?;
    remove_leftovers(out_dir, Some(name))?;
    Ok(target)
}

/// Puts a copy of the complete directory `out_dir/fresh` (which `latest` names) in place as
/// `out_dir/name`, replacing any directory there. The copy is hard links (a copy where the file
/// system has none), so that `fresh` stays whole until `latest` names `name` again.
fn install(out_dir: &Path, name: &str, fresh: &str, after: &mut dyn FnMut(CommitStep) -> Result<()>) -> Result<()> {
    let target = out_dir.join(name);
    if target.exists() {
        let old = out_dir.join(format!(".{name}.{}.old", unique_stamp()));
        rename(&target, &old)?;
        fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    after(CommitStep::OldRemoved)?;
    let linking = out_dir.join(format!(".{name}.{}.linking", unique_stamp()));
    link_tree(&out_dir.join(fresh), &linking)?;
    sync_dir(&linking);
    rename(&linking, &target)?;
    sync_dir(out_dir);
    after(CommitStep::InPlace)
}

/// Tidies what crashed commits left, at the start of a run (which holds the directory's lock): a
/// commit interrupted after `latest` moved to a replacing directory's hidden name (see
/// [`commit_dir_with`]) is completed, the directory taking its name; every other leftover goes.
pub fn finish_interrupted_commits(out_dir: &Path) -> Result<()> {
    if let Some(dir) = read_latest(out_dir)? {
        let hidden = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some((name, _)) = hidden.strip_prefix('.').and_then(|rest| rest.split_once('.')) {
            install(out_dir, name, &hidden, &mut |_| Ok(()))?;
            write_latest(out_dir, name)?;
        }
    }
    remove_leftovers(out_dir, None)
}

/// A name no other commit of this or another process uses.
fn unique_stamp() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{nanos}-{n}", std::process::id())
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))
}

/// Points `latest` at `name`, atomically (a temporary file renamed over it).
fn write_latest(out_dir: &Path, name: &str) -> Result<()> {
    write_atomic(&out_dir.join(LATEST_FILE), format!("{name}\n").as_bytes())
}

/// Removes what interrupted commits of `name` (of any checkpoint: `None`) left (`.name.*`:
/// staging, replaced and half-copied directories), except the one `latest` names.
fn remove_leftovers(out_dir: &Path, name: Option<&str>) -> Result<()> {
    let keep = read_latest_name(out_dir);
    for entry in fs::read_dir(out_dir).with_context(|| format!("listing {}", out_dir.display()))? {
        let entry = entry?;
        let file = entry.file_name().to_string_lossy().into_owned();
        let of = file.strip_prefix('.').and_then(|rest| rest.split_once('.')).map(|(of, _)| of);
        let leftover = match (of, name) {
            (Some(of), Some(name)) => of == name,
            (Some(of), None) => is_checkpoint_name(of),
            (None, _) => false,
        };
        if leftover && Some(&file) != keep.as_ref() {
            let path = entry.path();
            let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            removed.with_context(|| format!("removing {} (left by an interrupted checkpoint)", path.display()))?;
        }
    }
    Ok(())
}

/// Hard-links every file of `from` into a new directory `to` (copies where linking fails).
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("listing {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            link_tree(&src, &dst)?;
        } else if fs::hard_link(&src, &dst).is_err() {
            fs::copy(&src, &dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The name `out_dir/latest` holds, if it can be read.
fn read_latest_name(out_dir: &Path) -> Option<String> {
    fs::read_to_string(out_dir.join(LATEST_FILE)).ok().map(|s| s.trim().to_string())
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

/// Where a stopped run's last good checkpoint is, for its error message.
pub fn describe_latest(out_dir: &Path) -> String {
    match read_latest(out_dir) {
        Ok(Some(dir)) => format!("`latest` still names {}", dir.display()),
        _ => "no checkpoint was written".to_string(),
    }
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

    /// A directory `read_latest` accepts (a `state.json`), holding `content` in `a`.
    fn fake_checkpoint(dir: &Path, content: &str) -> Result<()> {
        write_atomic(&dir.join(STATE_FILE), b"{}")?;
        write_atomic(&dir.join("a"), content.as_bytes())
    }

    fn hidden_entries(out: &Path) -> Vec<String> {
        let names = fs::read_dir(out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned());
        names.filter(|n| n.starts_with('.')).collect()
    }

    /// A commit killed after any of its steps, of a new name or of one that exists (`final` again):
    /// `latest` names a complete directory, the old one until the new one is whole; a later start
    /// (`finish_interrupted_commit`) and a later commit of the name clean up.
    #[test]
    fn a_commit_killed_at_any_step_leaves_latest_naming_a_complete_checkpoint() {
        use CommitStep::*;
        let cases = [
            (false, Staged, "one"),
            (false, InPlace, "one"),
            (false, LatestMoved, "new"),
            (true, Staged, "old"),
            (true, LatestOnNew, "new"),
            (true, OldRemoved, "new"),
            (true, InPlace, "new"),
            (true, LatestMoved, "new"),
        ];
        for (replacing, stop, want) in cases {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path();
            commit_dir(out, "checkpoint-1", |d| fake_checkpoint(d, "one")).unwrap();
            if replacing {
                commit_dir(out, FINAL_DIR, |d| fake_checkpoint(d, "old")).unwrap();
            }
            let mut kill = |at: CommitStep| if at == stop { bail!("killed") } else { Ok(()) };
            let err = commit_dir_with(out, FINAL_DIR, |d| fake_checkpoint(d, "new"), &mut kill).unwrap_err();
            assert_eq!(err.to_string(), "killed");
            let case = format!("replacing {replacing}, killed after {stop:?}");
            let latest = read_latest(out).unwrap_or_else(|e| panic!("{case}: {e:#}")).unwrap();
            assert_eq!(fs::read_to_string(latest.join("a")).unwrap(), want, "{case}");
            assert!(latest.join(STATE_FILE).is_file(), "{case}");

            // The next run's start puts a replaced directory in place under its name, and tidies.
            finish_interrupted_commits(out).unwrap();
            let latest = read_latest(out).unwrap().unwrap();
            assert!(!latest.file_name().unwrap().to_string_lossy().starts_with('.'), "{case}: {}", latest.display());
            assert_eq!(fs::read_to_string(latest.join("a")).unwrap(), want, "{case}");
            assert_eq!(hidden_entries(out), Vec::<String>::new(), "{case}");
            commit_dir(out, FINAL_DIR, |d| fake_checkpoint(d, "newer")).unwrap();
            assert_eq!(read_latest(out).unwrap().unwrap(), out.join(FINAL_DIR), "{case}");
            assert_eq!(fs::read_to_string(out.join("final/a")).unwrap(), "newer", "{case}");
            assert_eq!(hidden_entries(out), Vec::<String>::new(), "{case}");
        }
    }

    /// Replacing the directory `latest` names: the name holds the new files, the hidden copy is gone.
    #[test]
    fn replacing_the_latest_directory_keeps_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path();
        commit_dir(out, FINAL_DIR, |d| fake_checkpoint(d, "old")).unwrap();
        let mut seen = Vec::new();
        let mut watch = |at: CommitStep| {
            let latest = read_latest(out)?.expect("latest names a checkpoint");
            seen.push((at, fs::read_to_string(latest.join("a"))?));
            Ok(())
        };
        commit_dir_with(out, FINAL_DIR, |d| fake_checkpoint(d, "new"), &mut watch).unwrap();
        let steps: Vec<CommitStep> = seen.iter().map(|(at, _)| *at).collect();
        use CommitStep::*;
        assert_eq!(steps, [Staged, LatestOnNew, OldRemoved, InPlace, LatestMoved]);
        assert_eq!(seen[0].1, "old");
        assert!(seen[1..].iter().all(|(_, a)| a == "new"), "{seen:?}");
        assert_eq!(fs::read_to_string(out.join(LATEST_FILE)).unwrap(), "final\n");
        assert_eq!(hidden_entries(out), Vec::<String>::new());
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
