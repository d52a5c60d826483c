//! Device-side tables of tensor descriptors for the multi-tensor launches (the optimizer's update,
//! `ops/optimizer.rs`, and the grad norm's partial sums, `ops/grad_norm.rs`): one launch reads every
//! tensor's pointers and length from such a table instead of taking one launch per tensor.
//!
//! A table is a function of its contents alone (pointers, lengths, flags), and the tensors of a
//! training run do not move between steps, so a table is uploaded the first time its contents are
//! asked for and reused while the same contents come back: an optimizer's table is built once, and
//! built again only when its tensor set changes (another shard of a ZeRO-1 group, LoRA's adapters,
//! moments restored from a checkpoint into new buffers). The host still writes each step's
//! descriptors (a few hundred words) to compare them; only a change costs an upload.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;

use super::{Device, DeviceBuffer};

/// Tables kept per backend: enough for an optimizer's update, its grad norm and a few other lists
/// (a reward model's trunk, a parameter norm) without evicting one another every step.
const KEPT_TABLES: usize = 8;

/// A table's host words and its device copy.
type KeptTable = (Vec<u64>, Arc<DeviceBuffer<u64>>);

/// The tables a backend has uploaded, most recently used last.
#[derive(Default)]
pub(crate) struct TensorTables {
    kept: Mutex<Vec<KeptTable>>,
    uploads: AtomicU64,
}

impl TensorTables {
    /// A device table holding `words`: a kept one with the same contents, else a fresh upload (which
    /// evicts the least recently used table beyond `KEPT_TABLES`). The caller holds the returned
    /// buffer until its launch is queued (the device orders the free after the launch).
    pub(crate) fn get(&self, device: &Device, words: Vec<u64>) -> Result<Arc<DeviceBuffer<u64>>> {
        let mut kept = self.kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(at) = kept.iter().position(|(key, _)| *key == words) {
            let entry = kept.remove(at);
            let table = entry.1.clone();
            kept.push(entry);
            return Ok(table);
        }
        let table = Arc::new(device.upload(&words)?);
        self.uploads.fetch_add(1, Ordering::Relaxed);
        if kept.len() == KEPT_TABLES {
            kept.remove(0);
        }
        kept.push((words, table.clone()));
        Ok(table)
    }

    /// Tables uploaded so far (each a rebuild: contents not kept).
    pub(crate) fn uploads(&self) -> u64 {
        self.uploads.load(Ordering::Relaxed)
    }
}
