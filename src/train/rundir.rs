//! The run directory's guard: one run writes an `out_dir` at a time, and a run already there is
//! continued (`--resume`) or started over (`--overwrite`) only when asked, never by default.
//!
//! The lock is `out_dir/run.lock`, created with `create_new` and holding the writer's pid and host;
//! the run removes it when it ends, on an error too. A lock whose process has ended (same host, pid
//! gone: the run was killed) is taken over with a warning; a live one is an error naming its pid.
//!
//! An `out_dir` holds a run when it has `latest`, a checkpoint directory or a non-empty
//! `metrics.jsonl`. Without `--resume` or `--overwrite` such a directory is refused, finished or not.
//! `--overwrite` deletes the run's checkpoints, `latest`, metrics and `config.toml` (the reference
//! cache stays: it is keyed by what it was computed from) before the new run writes anything.

use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::checkpoint::{
    finish_interrupted_commits, is_checkpoint_name, read_latest, resolve_resume, TrainState, LATEST_FILE, METRICS_FILE,
};
use super::TrainOptions;
use crate::config::RunConfig;

pub const LOCK_FILE: &str = "run.lock";
/// The resolved configuration a run writes at its start.
pub const CONFIG_FILE: &str = "config.toml";

/// Who holds a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockOwner {
    pub pid: u32,
    pub host: String,
}

impl LockOwner {
    pub fn this_process() -> Self {
        Self { pid: std::process::id(), host: host_name() }
    }

    /// Whether the process may still run: on another host nobody can tell, so it may.
    pub fn may_be_alive(&self) -> bool {
        self.host != host_name() || pid_alive(self.pid)
    }
}

#[cfg(unix)]
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates what fits.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..len]).into_owned()
    } else {
        "localhost".to_string()
    }
}

#[cfg(not(unix))]
fn host_name() -> String {
    std::env::var("COMPUTERNAME").unwrap_or_else(|_| "localhost".to_string())
}

#[cfg(unix)]
fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only asks whether the process exists; nothing is sent.
    let ok = unsafe { libc::kill(pid, 0) } == 0;
    ok || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn pid_alive(_pid: u32) -> bool {
    true
}

/// What a lock file says.
enum Holder {
    /// No lock file (any more).
    None,
    Owner(LockOwner),
    /// Not (yet) a lock: a holder between creating and writing it, or someone else's file.
    Unreadable(String),
}

fn read_holder(path: &Path) -> Holder {
    match fs::read_to_string(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Holder::None,
        Err(e) => Holder::Unreadable(e.to_string()),
        Ok(text) => match serde_json::from_str(&text) {
            Ok(owner) => Holder::Owner(owner),
            Err(_) => Holder::Unreadable(format!("{text:?}")),
        },
    }
}

/// The lock of a run directory, released when dropped.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    owner: LockOwner,
}

impl RunLock {
    /// Takes the lock of `out_dir` (which exists). `warn` hears of a stale lock taken over.
    pub fn acquire(out_dir: &Path, warn: &dyn Fn(&str)) -> Result<Self> {
        let path = out_dir.join(LOCK_FILE);
        let owner = LockOwner::this_process();
        let text = serde_json::to_string(&owner)?;
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    if let Err(e) = f.write_all(text.as_bytes()).and_then(|()| f.sync_all()) {
                        let _ = fs::remove_file(&path);
                        return Err(e).with_context(|| format!("writing the lock {}", path.display()));
                    }
                    return Ok(Self { path, owner });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e).with_context(|| format!("creating the lock {}", path.display())),
            }
            match read_holder(&path) {
                Holder::None => {}
                Holder::Owner(other) if other.may_be_alive() => bail!(
                    "{} is in use by another run (pid {} on {}); wait for it to end, or, if that process is no \
                     safedpo run writing here, remove {}",
                    out_dir.display(),
                    other.pid,
                    other.host,
                    path.display()
                ),
                Holder::Owner(stale) => {
                    warn(&format!(
                        "warning: taking over the lock {} of pid {} on {}, which has ended (an interrupted run)",
                        path.display(),
                        stale.pid,
                        stale.host
                    ));
                    match fs::remove_file(&path) {
                        Err(e) if e.kind() != ErrorKind::NotFound => {
                            return Err(e).with_context(|| format!("removing the stale lock {}", path.display()))
                        }
                        _ => {}
                    }
                }
                Holder::Unreadable(what) if attempt == ATTEMPTS => bail!(
                    "{} is locked by {}, which holds {what}, not a lock; remove it if no run is writing {}",
                    out_dir.display(),
                    path.display(),
                    out_dir.display()
                ),
                // Most likely its holder is writing it this very moment.
                Holder::Unreadable(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
        bail!("could not take the lock {}: other runs keep taking it", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Only our own lock: never one another run took over meanwhile.
        if matches!(read_holder(&self.path), Holder::Owner(o) if o == self.owner) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// What an `out_dir` holds of an earlier run.
struct PreviousRun {
    /// "a finished run (6/6 steps, …)".
    description: String,
    finished: bool,
}

impl PreviousRun {
    fn inspect(out_dir: &Path) -> Result<Option<Self>> {
        let metrics = fs::metadata(out_dir.join(METRICS_FILE)).is_ok_and(|m| m.len() > 0);
        if !out_dir.join(LATEST_FILE).exists() && !metrics && run_entries(out_dir)?.is_empty() {
            return Ok(None);
        }
        let state = |dir: &Path| TrainState::read(dir).map(|s| (s.step, s.total_steps));
        let (description, finished) = match read_latest(out_dir) {
            Ok(Some(dir)) => match state(&dir) {
                Ok((step, total)) if step == total => {
                    (format!("a finished run ({step}/{total} steps, {})", dir.display()), true)
                }
                Ok((step, total)) => (
                    format!("an unfinished run (its latest checkpoint {} is at step {step} of {total})", dir.display()),
                    false,
                ),
                Err(e) => (format!("a run whose latest checkpoint is unreadable ({e:#})"), false),
            },
            Ok(None) if metrics => ("the metrics of a run that wrote no checkpoint".to_string(), false),
            Ok(None) => ("the checkpoints of a run (without `latest`)".to_string(), false),
            Err(e) => (format!("a run whose `latest` is unusable ({e:#})"), false),
        };
        Ok(Some(Self { description, finished }))
    }
}

/// The checkpoint directories of `out_dir` and what interrupted commits left (`final`,
/// `checkpoint-<step>`, `.final.*`, `.checkpoint-*`).
fn run_entries(out_dir: &Path) -> Result<Vec<PathBuf>> {
    let is_checkpoint = |n: &str| {
        let of = n.strip_prefix('.').and_then(|rest| rest.split_once('.')).map_or(n, |(of, _)| of);
        is_checkpoint_name(of)
    };
    let mut found = Vec::new();
    for entry in fs::read_dir(out_dir).with_context(|| format!("listing {}", out_dir.display()))? {
        let entry = entry?;
        if is_checkpoint(&entry.file_name().to_string_lossy()) {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// A run's hold on its `out_dir`: the lock (taken as soon as the directory exists), and the
/// decision on what is there.
pub struct RunDir {
    out_dir: PathBuf,
    resume_requested: bool,
    overwrite: bool,
    /// `RunConfig::trajectory_hash` of this run.
    config_hash: String,
    /// Inputs that `--overwrite` must not delete (`model.init`, `model.reference`).
    inputs: Vec<PathBuf>,
    lock: Option<RunLock>,
    resume_from: Option<PathBuf>,
}

impl RunDir {
    /// Locks `cfg.out_dir` if it exists (finishing any commit a crash interrupted), and resolves
    /// `--resume`; refuses a run already there unless `opts` say what to do with it.
    pub fn open(cfg: &RunConfig, opts: &TrainOptions, warn: &dyn Fn(&str)) -> Result<Self> {
        if opts.overwrite && opts.resume.is_some() {
            bail!("--resume and --overwrite exclude each other: continue the run in out_dir, or start it over");
        }
        let inputs = [&cfg.model.init, &cfg.model.reference].into_iter().flatten().cloned().collect();
        let mut dir = Self {
            out_dir: cfg.out_dir.clone(),
            resume_requested: opts.resume.is_some(),
            overwrite: opts.overwrite,
            config_hash: cfg.trajectory_hash(),
            inputs,
            lock: None,
            resume_from: None,
        };
        if dir.out_dir.is_dir() {
            dir.lock(warn)?;
        }
        dir.resume_from = resolve_resume(opts.resume.as_ref(), &dir.out_dir)?;
        if dir.lock.is_some() {
            dir.admit()?;
        }
        Ok(dir)
    }

    /// The checkpoint to continue from, `None` for a fresh start.
    pub fn resume_from(&self) -> Option<&Path> {
        self.resume_from.as_deref()
    }

    /// Creates and locks the directory (if that did not happen in `open`); with `--overwrite`,
    /// deletes the run that was there. Called once the run is ready to write.
    pub fn create(&mut self, warn: &dyn Fn(&str)) -> Result<()> {
        let out = &self.out_dir;
        fs::create_dir_all(out).with_context(|| format!("creating out_dir {}", out.display()))?;
        if self.lock.is_none() {
            self.lock(warn)?;
            self.admit()?;
        }
        if self.overwrite {
            self.delete_previous_run(warn)?;
        }
        Ok(())
    }

    fn lock(&mut self, warn: &dyn Fn(&str)) -> Result<()> {
        self.lock = Some(RunLock::acquire(&self.out_dir, warn)?);
        finish_interrupted_commits(&self.out_dir)?;
        Ok(())
    }

    /// Whether this run may go on with what `out_dir` holds.
    fn admit(&self) -> Result<()> {
        let Some(previous) = PreviousRun::inspect(&self.out_dir)? else { return Ok(()) };
        let (out, what) = (self.out_dir.display(), &previous.description);
        if self.overwrite {
            return Ok(());
        }
        if !self.resume_requested {
            if previous.finished {
                bail!(
                    "{out} holds {what}; pass --overwrite to train again from the start (deleting its checkpoints \
                     and metrics), or choose another out_dir"
                );
            }
            bail!(
                "{out} holds {what}; pass --resume to continue it, or --overwrite to start over (deleting its \
                 checkpoints and metrics), or choose another out_dir"
            );
        }
        match &self.resume_from {
            Some(dir) if !same_dir(dir.parent().unwrap_or(dir), &self.out_dir) => bail!(
                "--resume {}: {out} holds {what} of its own; resume into an empty out_dir, or into that run's",
                dir.display()
            ),
            // The trainer checks the checkpoint's configuration.
            Some(_) => Ok(()),
            // Nothing to continue: starting over loses nothing only when it is the same run.
            None if self.previous_config_hash().as_deref() == Some(self.config_hash.as_str()) => Ok(()),
            None => bail!(
                "{out} holds {what}: its configuration differs from this one, and there is no checkpoint to resume; \
                 pass --overwrite to replace it, or choose another out_dir"
            ),
        }
    }

    /// The trajectory hash of the configuration the run in `out_dir` started with.
    fn previous_config_hash(&self) -> Option<String> {
        RunConfig::from_toml_file(&self.out_dir.join(CONFIG_FILE)).ok().map(|c| c.trajectory_hash())
    }

    /// `--overwrite`: `latest` first (it never names a missing directory), then the checkpoints,
    /// the metrics and the configuration of the previous run.
    fn delete_previous_run(&self, warn: &dyn Fn(&str)) -> Result<()> {
        let out = &self.out_dir;
        let mut doomed = run_entries(out)?;
        doomed.extend([LATEST_FILE, METRICS_FILE, CONFIG_FILE].map(|f| out.join(f)).into_iter().filter(|p| p.exists()));
        if doomed.is_empty() {
            return Ok(());
        }
        for input in &self.inputs {
            if let Some(dir) = doomed.iter().find(|d| input.starts_with(d) || inside(input, d)) {
                bail!(
                    "--overwrite would delete {}, which this run reads ({}); copy it out of {} first",
                    dir.display(),
                    input.display(),
                    out.display()
                );
            }
        }
        for path in &doomed {
            let removed = if path.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
            removed.with_context(|| format!("--overwrite: removing {}", path.display()))?;
        }
        warn(&format!("--overwrite: deleted the previous run's checkpoints and metrics in {}", out.display()));
        Ok(())
    }
}

/// Whether two paths name the same directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Whether `path` lies inside `dir`.
fn inside(path: &Path, dir: &Path) -> bool {
    match (path.canonicalize(), dir.canonicalize()) {
        (Ok(p), Ok(d)) => p.starts_with(d),
        _ => false,
    }
}
