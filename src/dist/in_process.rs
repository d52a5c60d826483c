//! Ranks as threads of one process: a [`HostTransport`] over shared memory. CI runs 2- and 4-rank
//! training with it on the CPU backend and on emulated devices (one backend per thread).
//!
//! A rank whose handle is dropped (a thread that returned early or panicked) ends every later
//! collective of the others with an error naming it, and a rank that does not arrive within the
//! group's timeout ends the waiting ranks' collective with an error naming the missing ranks, so a
//! failure never leaves the other ranks waiting forever.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::HostTransport;

/// How long a rank waits for the others at a collective unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

struct Round {
    /// Counts completed collectives; a waiting rank is released when it changes.
    generation: u64,
    /// The messages of the round in progress, by rank.
    slots: Vec<Option<Vec<u8>>>,
    /// The messages of the last completed round (read by its ranks before any can complete the next).
    result: Arc<Vec<Vec<u8>>>,
    /// Set when a rank leaves the group: why, for every rank that waits afterwards.
    broken: Option<String>,
}

struct Shared {
    round: Mutex<Round>,
    arrived: Condvar,
    timeout: Duration,
}

/// One rank's handle on an in-process group; made by [`group`].
pub struct InProcessRank {
    rank: usize,
    world_size: usize,
    shared: Arc<Shared>,
}

/// `world_size` handles on one group, rank 0 first, with the default timeout.
pub fn group(world_size: usize) -> Vec<InProcessRank> {
    group_with_timeout(world_size, DEFAULT_TIMEOUT)
}

/// `world_size` handles on one group whose collectives give up after `timeout`.
pub fn group_with_timeout(world_size: usize, timeout: Duration) -> Vec<InProcessRank> {
    assert!(world_size > 0, "a group needs at least one rank");
    let shared = Arc::new(Shared {
        round: Mutex::new(Round { generation: 0, slots: vec![None; world_size], result: Arc::default(), broken: None }),
        arrived: Condvar::new(),
        timeout,
    });
    (0..world_size).map(|rank| InProcessRank { rank, world_size, shared: shared.clone() }).collect()
}

impl InProcessRank {
    fn lock(&self) -> MutexGuard<'_, Round> {
        // A panic while holding the lock leaves the round consistent (every update is one
        // assignment), so a poisoned lock is still usable; the panicking rank's drop breaks the group.
        self.shared.round.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl HostTransport for InProcessRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_gather(&self, data: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut round = self.lock();
        if let Some(why) = &round.broken {
            bail!("rank {}: the group is broken: {why}", self.rank);
        }
        round.slots[self.rank] = Some(data.to_vec());
        if round.slots.iter().all(Option::is_some) {
            let messages = round.slots.iter_mut().map(|slot| slot.take().expect("checked")).collect();
            round.result = Arc::new(messages);
            round.generation += 1;
            self.shared.arrived.notify_all();
            return Ok(round.result.as_ref().clone());
        }
        let generation = round.generation;
        let deadline = Instant::now() + self.shared.timeout;
        loop {
            if round.generation != generation {
                return Ok(round.result.as_ref().clone());
            }
            if let Some(why) = &round.broken {
                bail!("rank {}: the group is broken: {why}", self.rank);
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> =
                    round.slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(r, _)| r.to_string()).collect();
                let why = format!(
                    "rank(s) {} did not reach the collective within {:?} (rank {} waited)",
                    missing.join(", "),
                    self.shared.timeout,
                    self.rank
                );
                round.broken = Some(why.clone());
                self.shared.arrived.notify_all();
                bail!("{why}");
            }
            round = self.shared.arrived.wait_timeout(round, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl Drop for InProcessRank {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let mut round = self.lock();
        // Leaving between collectives is how every rank ends a run; it breaks the group only for
        // ranks that still wait for (or later start) a collective this rank will never join.
        if round.broken.is_none() {
            round.broken =
                Some(format!("rank {} left the group{}", self.rank, if panicking { " (it panicked)" } else { "" }));
        }
        self.shared.arrived.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::Buffers;
    use crate::dist::{Collective, Staged};

    #[test]
    fn all_reduce_sums_in_rank_order_on_every_rank() {
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let handles: Vec<_> = group(3)
                .into_iter()
                .map(|rank| {
                    s.spawn(move || {
                        let b = CpuBackend::new();
                        let r = rank.rank() as f32;
                        let mut x = b.upload(&[r, 1e8, -r]).unwrap();
                        let mut y = b.upload(&[1.0]).unwrap();
                        let group = Staged(rank);
                        Collective::<CpuBackend>::all_reduce_sum(&group, &b, &mut [&mut x, &mut y]).unwrap();
                        let mut out = b.download(&x).unwrap();
                        out.extend(b.download(&y).unwrap());
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expected = vec![3.0, ((1e8f32 + 1e8) + 1e8), -3.0, 3.0];
        for r in results {
            assert_eq!(r, expected);
        }
    }

    #[test]
    fn a_rank_that_leaves_breaks_the_others_collective() {
        let err = std::thread::scope(|s| {
            let mut ranks = group(2).into_iter();
            let (r0, r1) = (ranks.next().unwrap(), ranks.next().unwrap());
            let waiter = s.spawn(move || r0.all_gather(b"x").map(|_| ()));
            drop(r1);
            waiter.join().unwrap()
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("rank 1 left the group"), "{err:#}");
    }

    #[test]
    fn a_missing_rank_times_out_by_name() {
        let ranks = group_with_timeout(3, Duration::from_millis(50));
        let err = ranks[0].all_gather(b"x").unwrap_err();
        assert!(format!("{err:#}").contains("rank(s) 1, 2 did not reach"), "{err:#}");
    }
}
