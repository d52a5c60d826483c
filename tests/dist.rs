//! The process side of data parallelism: the TCP rendezvous and transport (ranks as threads of this
//! process on loopback), and `safedpo launch` / `safedpo dist-check` as processes.

use std::net::TcpListener;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use safedpo::backend::cpu::CpuBackend;
use safedpo::backend::Buffers;
use safedpo::dist::in_process;
use safedpo::dist::rendezvous::Rendezvous;
use safedpo::dist::tcp::TcpTransport;
use safedpo::dist::{Collective, HostTransport, Staged};

fn rendezvous(rank: usize, world_size: usize, port: u16, timeout: Duration) -> Rendezvous {
    Rendezvous {
        rank,
        world_size,
        master_addr: "127.0.0.1".into(),
        master_port: port,
        run_id: "test".into(),
        timeout,
        collective_timeout: timeout,
    }
}

/// A listener on a free loopback port, for rank 0.
fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// Each rank's result of joining with `rendezvous(rank)`, the ranks as threads.
fn join_all(
    world_size: usize,
    make: impl Fn(usize, u16) -> Option<Rendezvous> + Sync,
) -> Vec<anyhow::Result<TcpTransport>> {
    let (listener, port) = listener();
    let listener = Mutex::new(Some(listener));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world_size)
            .map(|rank| {
                let (make, listener) = (&make, &listener);
                s.spawn(move || {
                    let rendezvous = make(rank, port)?;
                    Some(if rank == 0 {
                        rendezvous.join_as_root(listener.lock().unwrap().take().unwrap())
                    } else {
                        rendezvous.join()
                    })
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().unwrap()).collect()
    })
}

fn tcp_group(world_size: usize, timeout: Duration) -> Vec<TcpTransport> {
    join_all(world_size, |rank, port| Some(rendezvous(rank, world_size, port, timeout)))
        .into_iter()
        .map(|joined| joined.unwrap())
        .collect()
}

/// What each rank of `transports` computes: an all-reduce of awkward values, a broadcast, a reduce
/// and a host sum, through `Staged` on the CPU backend.
fn collectives<T: HostTransport>(transports: Vec<T>) -> Vec<Vec<f32>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = transports
            .into_iter()
            .map(|transport| {
                s.spawn(move || {
                    let b = CpuBackend::new();
                    let group = Staged(transport);
                    let r = Collective::<CpuBackend>::rank(&group) as f32;
                    let values: Vec<f32> =
                        (0..1000).map(|i| ((i as f32 + 0.37) * (r + 1.3)).sin() * 1e3f32.powf(r)).collect();
                    let mut x = b.upload(&values).unwrap();
                    let mut y = b.upload(&[r, 0.1 + r]).unwrap();
                    group.all_reduce_sum(&b, &mut [&mut x, &mut y]).unwrap();
                    let mut z = b.upload(&[r * 7.0; 3]).unwrap();
                    group.broadcast(&b, &mut [&mut z], 1).unwrap();
                    let mut w = b.upload(&[r + 0.5; 2]).unwrap();
                    group.reduce_sum(&b, &mut [&mut w], 0).unwrap();
                    let mut host = [r as f64 * 0.1, 1.0];
                    Collective::<CpuBackend>::all_reduce_host(&group, &mut host).unwrap();
                    Collective::<CpuBackend>::barrier(&group).unwrap();
                    let mut out = b.download(&x).unwrap();
                    for buf in [&y, &z, &w] {
                        out.extend(b.download(buf).unwrap());
                    }
                    out.extend(host.iter().map(|&v| v as f32));
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn tcp_ranks_give_the_bits_of_in_process_ranks() {
    for world_size in [2, 4] {
        let over_tcp = collectives(tcp_group(world_size, Duration::from_secs(30)));
        let in_process = collectives(in_process::group(world_size));
        assert_eq!(over_tcp.len(), world_size);
        for (rank, (tcp, threads)) in over_tcp.iter().zip(&in_process).enumerate() {
            let same_bits = tcp.iter().zip(threads).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same_bits && tcp.len() == threads.len(), "world size {world_size}, rank {rank}");
        }
        // Every rank holds the same sums.
        let sums = |v: &Vec<f32>| v[..1002].to_vec();
        assert!(over_tcp.iter().all(|v| sums(v) == sums(&over_tcp[0])), "world size {world_size}");
    }
}

#[test]
fn a_rank_that_leaves_ends_every_rank_by_name() {
    let mut ranks = tcp_group(3, Duration::from_secs(30)).into_iter();
    let (r0, r1, r2) = (ranks.next().unwrap(), ranks.next().unwrap(), ranks.next().unwrap());
    drop(r2);
    let (e0, e1) = std::thread::scope(|s| {
        let a = s.spawn(|| r0.all_gather(b"x").unwrap_err());
        let b = s.spawn(|| r1.all_gather(b"y").unwrap_err());
        (format!("{:#}", a.join().unwrap()), format!("{:#}", b.join().unwrap()))
    });
    assert!(e0.contains("rank 2 (127.0.0.1:") && e0.contains("closed its connection"), "{e0}");
    assert!(e1.contains("rank 2 (127.0.0.1:") && e1.contains("closed its connection"), "rank 0 passes it on: {e1}");
    // The group stays broken, with the same reason.
    let again = format!("{:#}", r0.all_gather(b"x").unwrap_err());
    assert!(again.contains("broken") && again.contains("rank 2"), "{again}");
}

#[test]
fn rank_zero_leaving_ends_the_others() {
    let mut ranks = tcp_group(2, Duration::from_secs(30)).into_iter();
    let (r0, r1) = (ranks.next().unwrap(), ranks.next().unwrap());
    drop(r0);
    let err = format!("{:#}", r1.all_gather(b"x").unwrap_err());
    assert!(err.contains("rank 1: rank 0 (127.0.0.1:") && err.contains("closed its connection"), "{err}");
}

#[test]
fn a_rank_that_does_not_arrive_at_a_collective_times_out_by_name() {
    let mut ranks = tcp_group(3, Duration::from_millis(300)).into_iter();
    let (r0, r1, _r2) = (ranks.next().unwrap(), ranks.next().unwrap(), ranks.next().unwrap());
    let (e0, e1) = std::thread::scope(|s| {
        let a = s.spawn(|| r0.all_gather(b"x").unwrap_err());
        let b = s.spawn(|| r1.all_gather(b"y").unwrap_err());
        (format!("{:#}", a.join().unwrap()), format!("{:#}", b.join().unwrap()))
    });
    assert!(e0.contains("rank 2 (127.0.0.1:") && e0.contains("did not reach the collective"), "{e0}");
    assert!(e1.contains("rank 2 (127.0.0.1:") && e1.contains("did not reach the collective"), "{e1}");
}

#[test]
fn a_rendezvous_that_times_out_names_the_missing_rank() {
    let timeout = Duration::from_millis(400);
    // Rank 2 never comes.
    let joined = join_all(3, |rank, port| (rank < 2).then(|| rendezvous(rank, 3, port, timeout)));
    let errors: Vec<String> = joined.into_iter().map(|j| format!("{:#}", j.expect_err("an error"))).collect();
    for err in &errors {
        assert!(err.contains("rank(s) 2 did not reach the rendezvous at 127.0.0.1:"), "{err}");
    }
    assert!(errors[1].starts_with("rank 1: the rendezvous failed"), "{}", errors[1]);

    // Rank 0 never comes: the others give up naming it and its address.
    let (listener, port) = listener();
    drop(listener);
    let err = format!("{:#}", rendezvous(1, 2, port, timeout).join().unwrap_err());
    assert!(err.contains(&format!("rank 1: could not reach rank 0 at 127.0.0.1:{port} within")), "{err}");
}

#[test]
fn a_handshake_that_does_not_match_fails_both_sides() {
    let timeout = Duration::from_secs(10);
    let joined = join_all(2, |rank, port| {
        let mut r = rendezvous(rank, 2, port, timeout);
        if rank == 1 {
            r.world_size = 3;
        }
        Some(r)
    });
    for result in joined {
        let err = format!("{:#}", result.expect_err("an error"));
        assert!(err.contains("rank 1 at 127.0.0.1:") && err.contains("has WORLD_SIZE=3, rank 0 has 2"), "{err}");
    }
    let joined = join_all(2, |rank, port| {
        let mut r = rendezvous(rank, 2, port, timeout);
        r.run_id = format!("job{rank}");
        Some(r)
    });
    for result in joined {
        let err = format!("{:#}", result.expect_err("an error"));
        assert!(err.contains("belongs to run \"job1\", rank 0 to run \"job0\""), "{err}");
    }
}

#[test]
fn a_stray_connection_is_ignored() {
    let (listener, port) = listener();
    let stray = std::thread::spawn(move || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    });
    stray.join().unwrap();
    let ranks = std::thread::scope(|s| {
        let root = s.spawn(move || rendezvous(0, 2, port, Duration::from_secs(10)).join_as_root(listener));
        let peer = s.spawn(move || rendezvous(1, 2, port, Duration::from_secs(10)).join());
        (root.join().unwrap().unwrap(), peer.join().unwrap().unwrap())
    });
    let gathered = std::thread::scope(|s| {
        let a = s.spawn(|| ranks.0.all_gather(b"zero").unwrap());
        let b = s.spawn(|| ranks.1.all_gather(b"one").unwrap());
        (a.join().unwrap(), b.join().unwrap())
    });
    let expected = vec![b"zero".to_vec(), b"one".to_vec()];
    assert_eq!((gathered.0, gathered.1), (expected.clone(), expected));
}

// ---- processes ---------------------------------------------------------------------------------

fn safedpo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_safedpo"))
        .args(args)
        .env_remove("WORLD_SIZE")
        .env_remove("RANK")
        .env_remove("SLURM_NTASKS")
        .output()
        .unwrap()
}

#[test]
fn launch_runs_every_rank_with_its_place_in_the_group() {
    for device in ["cpu", "emu"] {
        let out = safedpo(&["launch", "--gpus", "2", "--device", device, "--", "dist-check"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{device}: {stdout}\n{stderr}");
        for rank in 0..2 {
            let line = format!("[rank {rank}] rank {rank} of 2 (local {rank} of 2), rendezvous 127.0.0.1:");
            assert!(stdout.contains(&line) && stdout.contains("the sums over the ranks are right"), "{stdout}");
        }
        assert!(stdout.contains(", TCP;"), "{device}: {stdout}");
    }
}

#[test]
fn launch_fails_naming_the_rank_that_failed_and_stops_the_others() {
    let out = safedpo(&["launch", "--gpus", "3", "--device", "cpu", "--", "dist-check", "--fail-rank", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("[rank 1] error: rank 1: failing as asked"), "{stderr}");
    assert!(stderr.contains("error: rank 1 failed (exit status: 1); the other ranks were stopped"), "{stderr}");
}

#[test]
fn launch_and_dist_check_refuse_bad_input() {
    let out = safedpo(&["launch", "--gpus", "2", "--device", "cpu", "--", "dist-check", "--device", "cpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("give it once"), "{out:?}");
    let out = safedpo(&["launch", "--gpus", "0", "--", "dist-check"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--gpus must be at least 1"), "{out:?}");
    let out = safedpo(&["dist-check"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no group in the environment"), "{out:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_safedpo"))
        .args(["dist-check", "--device", "cpu"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "2")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("RANK=2 must be below WORLD_SIZE=2"), "{out:?}");
}

/// The last record of a run's metrics.jsonl that has an evaluation.
fn last_eval(run: &std::path::Path) -> serde_json::Value {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|r| r.get("eval/loss").is_some())
        .unwrap()
}

/// `safedpo launch -- train` end to end: two processes on the CPU train the run one process trains
/// (within the f32 summation order of the gradient sum over the ranks), rank 0 alone writes the run
/// and prints the summary.
#[test]
fn launch_trains_as_one_process_does() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = safedpo(&["demo", "--data-only", "--rows", "60", "--quiet", "--out-dir", data.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let data_file = data.join("data.jsonl");
    let run = |ranks: usize, name: &str| {
        let out_dir = dir.path().join(name);
        let mut settings = vec!["--data.path", data_file.to_str().unwrap(), "--out_dir", out_dir.to_str().unwrap()];
        settings.extend(["--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2"]);
        settings.extend(["--optimizer.total_steps", "4", "--batching.tokens_per_micro_batch", "1024"]);
        settings.extend(["--batching.grad_accum", "4", "--intervals.eval_every", "4", "--no-progress"]);
        let gpus = ranks.to_string();
        let command: Vec<&str> = match ranks {
            1 => ["train", "--device", "cpu"].into_iter().chain(settings).collect(),
            _ => ["launch", "--gpus", &gpus, "--device", "cpu", "--", "train"].into_iter().chain(settings).collect(),
        };
        let out = safedpo(&command);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{ranks} ranks: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        (out_dir, stdout)
    };
    let (one, _) = run(1, "one");
    let (two, stdout) = run(2, "two");
    assert_eq!(stdout.matches("\"completed\":true").count(), 1, "one summary, rank 0's: {stdout}");
    assert!(stdout.contains("[rank 0] {\"checkpoint\""), "{stdout}");
    let (a, b) = (last_eval(&one), last_eval(&two));
    for key in ["eval/loss", "eval/rewards/margins", "eval/logps/chosen"] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{key}: one rank {x}, two ranks {y}");
    }
    assert!(two.join("final/model.safetensors").exists());
}
