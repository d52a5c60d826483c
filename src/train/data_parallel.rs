//! Data-parallel training: the same run on every rank of a [`Collective`] group, each rank taking its
//! share of every step's micro-batches.

use std::sync::Arc;

use anyhow::{bail, Result};

use super::{train, RunSummary, Task, TrainOptions};
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::dist::Collective;

/// [`train`] as one rank of `group` (a group of one is plain [`train`]).
pub fn train_in_group<B: Backend>(
    backend: Arc<B>,
    cfg: &RunConfig,
    task: Task,
    opts: &TrainOptions,
    group: Arc<dyn Collective<B>>,
) -> Result<RunSummary> {
    if group.world_size() == 1 {
        return train(backend, cfg, task, opts);
    }
    bail!("data-parallel training (a group of {} ranks) is not implemented yet", group.world_size())
}
