//! `safedpo launch --gpus N -- <command>`: a one-node job of N ranks, as `torchrun --nproc-per-node N`
//! starts one: N copies of this program, each with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR=127.0.0.1` and `MASTER_PORT` (a free port) set, each line of
//! their output prefixed with `[rank R]`.
//!
//! When a rank exits with an error (or is killed), the others are killed and launch fails naming the
//! rank. A rank that failed only because another did (its collective broke) exits with
//! [`FOLLOWER_EXIT_CODE`]; launch then waits a moment for the rank that caused it, so that the rank
//! it names is the one that failed first, not the first to notice. Killing a rank never damages a checkpoint: checkpoints are written to a temporary directory
//! and renamed into place, so the last complete one stays.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::backend::DeviceKind;

/// The exit code of a rank whose group broke because of another rank ([`super::GroupBroken`]).
pub const FOLLOWER_EXIT_CODE: u8 = 3;
/// How long launch waits, after a rank failed because of another, for the rank that caused it.
const CULPRIT_GRACE: Duration = Duration::from_secs(3);

/// What to launch.
#[derive(Clone, Debug)]
pub struct LaunchOptions {
    /// Ranks (processes) on this node.
    pub ranks: usize,
    /// Passed to each rank as `--device` (after the command's name), when given.
    pub device: Option<DeviceKind>,
    /// The program each rank runs (this one) and its arguments (a `safedpo` command line without
    /// the program name).
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// The first rank that failed, and how.
struct RankFailed {
    rank: usize,
    status: ExitStatus,
}

/// Runs the ranks to the end; an error names the first rank that failed.
pub fn launch(opts: &LaunchOptions) -> Result<()> {
    ensure!(opts.ranks > 0, "--gpus must be at least 1");
    ensure!(!opts.args.is_empty(), "no command to launch: give one after `--`, e.g. `launch --gpus 2 -- train …`");
    if opts.device == Some(DeviceKind::Cuda) {
        check_gpus(opts.ranks)?;
    }
    let args = rank_args(opts)?;
    // A free port, bound here: rank 0 inherits the listening socket (on Unix), so the port cannot be
    // taken in between; elsewhere rank 0 binds it again a moment later.
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port for the rendezvous")?;
    let port = listener.local_addr().context("binding a free port for the rendezvous")?.port();
    let run_id = format!("launch-{}-{port}", std::process::id());

    let (exits, exited) = mpsc::channel::<(usize, std::io::Result<ExitStatus>)>();
    let mut pids = Vec::new();
    let mut printers: Vec<JoinHandle<()>> = Vec::new();
    let mut waiters = Vec::new();
    for rank in 0..opts.ranks {
        let inherit = (rank == 0).then_some(&listener);
        let mut child = spawn_rank(opts, &args, rank, port, inherit, &run_id).inspect_err(|_| kill_all(&pids))?;
        pids.push(Some(child.id()));
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        printers.push(std::thread::spawn(move || copy_prefixed(stdout, rank, std::io::stdout)));
        printers.push(std::thread::spawn(move || copy_prefixed(stderr, rank, std::io::stderr)));
        let exits = exits.clone();
        waiters.push(std::thread::spawn(move || {
            let _ = exits.send((rank, child.wait()));
        }));
    }
    // Rank 0 holds its own descriptor of the socket now.
    drop(listener);
    drop(exits);

    // The rank to name: the first that failed on its own; else, once the grace is over, the first
    // that failed because of another (its error names the other).
    let mut culprit: Option<RankFailed> = None;
    let mut follower: Option<(RankFailed, Instant)> = None;
    let mut wait_error = None;
    let mut running = opts.ranks;
    while running > 0 {
        let next = match &follower {
            Some((_, since)) if culprit.is_none() => exited.recv_timeout(CULPRIT_GRACE.saturating_sub(since.elapsed())),
            _ => exited.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        let (rank, status) = match next {
            Ok(exit) => exit,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // The grace is over and no rank failed on its own.
                kill_all(&pids);
                culprit = follower.take().map(|(failed, _)| failed);
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        running -= 1;
        pids[rank] = None;
        match status {
            Ok(status) if status.success() => {}
            Ok(status) if status.code() == Some(FOLLOWER_EXIT_CODE.into()) => {
                follower.get_or_insert((RankFailed { rank, status }, Instant::now()));
            }
            Ok(status) => {
                if culprit.is_none() {
                    culprit = Some(RankFailed { rank, status });
                    kill_all(&pids);
                }
            }
            Err(e) => {
                wait_error.get_or_insert(format!("waiting for rank {rank}: {e}"));
                kill_all(&pids);
            }
        }
    }
    let first_failure = culprit.or(follower.map(|(failed, _)| failed));
    for thread in waiters.into_iter().chain(printers) {
        let _ = thread.join();
    }
    if let Some(RankFailed { rank, status }) = first_failure {
        bail!(
            "rank {rank} failed ({status}); the other ranks were stopped (its own error is in the lines marked \
             [rank {rank}] above)"
        );
    }
    if let Some(why) = wait_error {
        bail!("{why}");
    }
    Ok(())
}

/// The command line of every rank: `--device` added after the command's name when launch has one.
fn rank_args(opts: &LaunchOptions) -> Result<Vec<OsString>> {
    let mut args = opts.args.clone();
    if let Some(device) = opts.device {
        let has_device = args.iter().any(|a| {
            let a = a.to_string_lossy();
            a == "--device" || a.starts_with("--device=")
        });
        ensure!(!has_device, "--device is given to launch and to the command: give it once");
        ensure!(
            !args[0].to_string_lossy().starts_with('-'),
            "--device needs a command to pass it to (e.g. `-- train …`), not `{}`",
            args[0].to_string_lossy()
        );
        args.splice(1..1, [OsString::from("--device"), OsString::from(device.to_string())]);
    }
    Ok(args)
}

/// Starts rank `rank`; `listener`, when given, is handed to it as its rendezvous socket.
fn spawn_rank(
    opts: &LaunchOptions,
    args: &[OsString],
    rank: usize,
    port: u16,
    listener: Option<&TcpListener>,
    run_id: &str,
) -> Result<Child> {
    let mut command = Command::new(&opts.program);
    #[cfg(unix)]
    if let Some(listener) = listener {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = listener.as_raw_fd();
        command.env(super::rendezvous::INHERITED_LISTENER_VAR, fd.to_string());
        // SAFETY: runs in the child between fork and exec, and only calls fcntl (async-signal-safe):
        // the descriptor stays open across exec in this child alone.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    #[cfg(not(unix))]
    let _ = listener;
    command
        .args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", opts.ranks.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", opts.ranks.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("SAFEDPO_RUN_ID", run_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting rank {rank} ({})", opts.program.display()))
}

/// Copies `from` to `to` line by line, each prefixed with the rank.
fn copy_prefixed<W: Write>(from: impl Read, rank: usize, to: fn() -> W) {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                let mut out = to();
                // One write per line, so lines of different ranks never interleave.
                let mut prefixed = format!("[rank {rank}] ").into_bytes();
                prefixed.extend_from_slice(&line);
                let _ = out.write_all(&prefixed);
                let _ = out.flush();
            }
        }
    }
}

/// Kills the ranks still running (`None`: already exited and reaped).
fn kill_all(pids: &[Option<u32>]) {
    for pid in pids.iter().flatten() {
        #[cfg(unix)]
        // SAFETY: a plain signal to a child this process started. A pid is cleared when its rank's
        // exit is reported; in the moment between the waiter reaping it and the report, the pid
        // could in principle be reused, which pid allocation makes vanishingly unlikely.
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGKILL);
        }
        #[cfg(not(unix))]
        let _ = pid;
    }
}

/// On `cuda`, a GPU for every rank.
fn check_gpus(ranks: usize) -> Result<()> {
    if let Some(reason) = crate::backend::device::gpu_unavailable_reason() {
        bail!("--device cuda: {reason}");
    }
    let count = super::group::gpu_count()?;
    ensure!(ranks <= count, "--gpus {ranks} but {count} GPU(s) visible: one GPU per rank");
    Ok(())
}
