//! What a benchmark run reports: per-phase and per-step times, rates, FLOPs, memory; as JSON (the
//! field names the PyTorch baseline prints too) or as a table.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{step_flops, BenchConfig};
use crate::backend::MemoryStats;
use crate::loss::Objective;
use crate::train::step::Phase;

/// The phases of a step, in order. `log_probs` is folded into `policy_forward` (and the reference
/// log-probs into `reference_forward`): `Decoder::forward` runs the LM head and the fused
/// log-softmax-gather as its last stage and exposes no hook between them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseTimes {
    /// Zeroing the gradients, then the reference model's forward, log-probs included (no forward for
    /// reference-free objectives).
    pub reference_forward: f64,
    /// Policy forward on chosen and rejected, log-probs included.
    pub policy_forward: f64,
    /// Separate log-prob time where the model exposes it; `null` when folded into the forwards.
    pub log_probs: Option<f64>,
    /// Preference loss and its gradient, metrics and log-probs copied to the host.
    pub loss: f64,
    /// The policy backward (log-softmax-gather backward included).
    pub backward: f64,
    /// Global grad norm, clipping scale and AdamW.
    pub optimizer: f64,
}

impl PhaseTimes {
    /// The time of a step's phase.
    pub(crate) fn of(&mut self, phase: Phase) -> &mut f64 {
        match phase {
            Phase::ReferenceForward => &mut self.reference_forward,
            Phase::PolicyForward => &mut self.policy_forward,
            Phase::Loss => &mut self.loss,
            Phase::Backward => &mut self.backward,
            Phase::Optimizer => &mut self.optimizer,
        }
    }

    pub(crate) fn sum(&self) -> f64 {
        self.reference_forward
            + self.policy_forward
            + self.log_probs.unwrap_or(0.0)
            + self.loss
            + self.backward
            + self.optimizer
    }
}

/// Step-time statistics in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTimes {
    pub median: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl StepTimes {
    pub fn from_samples(samples: &[f64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        Self { median: median_sorted(&s), mean: s.iter().sum::<f64>() / s.len() as f64, min: s[0], max: s[s.len() - 1] }
    }
}

fn median_sorted(s: &[f64]) -> f64 {
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

fn median(samples: impl Iterator<Item = f64>) -> f64 {
    let mut s: Vec<f64> = samples.collect();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        0.0
    } else {
        median_sorted(&s)
    }
}

/// The result of a benchmark run. Field names are stable (the PyTorch baseline prints the same).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    /// "safedpo", or "torch-eager" / "torch-compile" for the baseline.
    pub engine: String,
    /// The backend that ran, as it names itself.
    pub device: String,
    /// CPU worker threads (rayon's pool; torch's intra-op threads).
    pub threads: usize,
    pub config: BenchConfig,
    pub num_params: usize,
    pub policy_tokens_per_step: usize,
    /// Policy tokens (chosen + rejected sequences) per second at the median step time.
    pub tokens_per_s: f64,
    /// The same at the fastest step.
    pub tokens_per_s_best: f64,
    /// Step times over the timed steps, ms.
    pub step_ms: StepTimes,
    /// Median time of each phase over the timed steps, ms.
    pub phases_ms: PhaseTimes,
    /// Model FLOPs of one step (see the module doc).
    pub flops_per_step: f64,
    /// Model FLOPs per second at the median step time.
    pub flops_per_s: f64,
    /// `flops_per_s / peak_flops` when a peak was given.
    pub mfu: Option<f64>,
    /// Peak memory in bytes, with its source in `memory_source` (see the module doc): the device's
    /// peak allocation (weights, gradients, optimizer state, activations) where the backend counts
    /// it, else the process's peak resident set.
    pub peak_memory_bytes: Option<u64>,
    /// [`DEVICE_MEMORY_SOURCE`] (the backend's count of its device buffers;
    /// "torch.cuda.max_memory_allocated" in the baseline) or [`HOST_MEMORY_SOURCE`].
    pub memory_source: String,
    /// Peak resident set of the process (VmHWM), whatever the device; None where /proc is missing.
    /// Absent from reports written before the field existed.
    #[serde(default)]
    pub peak_host_rss_bytes: Option<u64>,
    /// The CPU backend's instruction-set path per kernel family and the CPU's vector extensions
    /// (absent for other backends and in reports written before the field existed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cpu_isa: BTreeMap<String, String>,
    /// Mean preference loss of the last timed step (a sanity check: finite, near ln 2 at the start).
    pub final_loss: f64,
    pub notes: Vec<String>,
}

/// `memory_source` when `peak_memory_bytes` is the backend's own count of its device buffers.
pub const DEVICE_MEMORY_SOURCE: &str = "device allocator";
/// `memory_source` when `peak_memory_bytes` is the process's peak resident set (/proc/self/status).
pub const HOST_MEMORY_SOURCE: &str = "VmHWM";

/// One timed step's measurements.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepSample {
    pub total_ms: f64,
    pub phases: PhaseTimes,
    /// Mean loss over the pairs.
    pub loss: f64,
}

/// Peak resident set size of this process (VmHWM in /proc/self/status), in bytes; None where the
/// file or the field is missing (not Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// The `VmHWM:` line of a /proc status file, in bytes.
pub(crate) fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut fields = line["VmHWM:".len()..].split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(value * 1024),
        Some(_) => None,
    }
}

/// Builds the report from timed samples (split out so that it can be checked without a backend).
pub fn report_from_samples(
    cfg: &BenchConfig,
    samples: &[StepSample],
    num_params: usize,
    device: String,
    threads: usize,
) -> BenchReport {
    let step_ms = StepTimes::from_samples(&samples.iter().map(|s| s.total_ms).collect::<Vec<_>>());
    let tokens = cfg.policy_tokens_per_step();
    let per_s = |ms: f64| if ms > 0.0 { 1e3 / ms } else { 0.0 };
    let flops_per_step = step_flops(cfg);
    let flops_per_s = flops_per_step * per_s(step_ms.median);
    let phase = |f: fn(&PhaseTimes) -> f64| median(samples.iter().map(|s| f(&s.phases)));
    let phases_ms = PhaseTimes {
        reference_forward: phase(|p| p.reference_forward),
        policy_forward: phase(|p| p.policy_forward),
        log_probs: None,
        loss: phase(|p| p.loss),
        backward: phase(|p| p.backward),
        optimizer: phase(|p| p.optimizer),
    };
    let mut notes =
        vec!["log-probs (LM head + fused log-softmax-gather) are timed inside the forward phases".to_string()];
    if !cfg.objective.uses_reference() {
        notes.push("reference-free objective: no reference forward".to_string());
    }
    BenchReport {
        engine: "safedpo".to_string(),
        device,
        threads,
        config: cfg.clone(),
        num_params,
        policy_tokens_per_step: tokens,
        tokens_per_s: tokens as f64 * per_s(step_ms.median),
        tokens_per_s_best: tokens as f64 * per_s(step_ms.min),
        step_ms,
        phases_ms,
        flops_per_step,
        flops_per_s,
        mfu: cfg.peak_flops.map(|peak| flops_per_s / peak),
        peak_memory_bytes: None,
        memory_source: HOST_MEMORY_SOURCE.to_string(),
        peak_host_rss_bytes: None,
        cpu_isa: BTreeMap::new(),
        final_loss: samples.last().map_or(f64::NAN, |s| s.loss),
        notes,
    }
}

impl BenchReport {
    /// Records the CPU backend's instruction-set paths and the CPU's vector extensions.
    pub fn set_cpu_isa(&mut self) {
        self.cpu_isa =
            crate::backend::cpu::isa_paths().into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.cpu_isa.insert("cpu flags".to_string(), crate::backend::cpu::cpu_flags().join(" "));
    }

    /// Fills the memory fields: the device's peak where the backend counts its memory, else the
    /// process's peak resident set; the resident set separately in any case.
    pub fn set_memory(&mut self, device: Option<MemoryStats>, host_rss: Option<u64>) {
        self.peak_host_rss_bytes = host_rss;
        (self.peak_memory_bytes, self.memory_source) = match device {
            Some(stats) => (Some(stats.peak_bytes), DEVICE_MEMORY_SOURCE.to_string()),
            None => (host_rss, HOST_MEMORY_SOURCE.to_string()),
        };
    }
}

fn objective_label(o: &Objective) -> String {
    match o {
        Objective::Dpo { beta, safety_margin } if *safety_margin == 0.0 => format!("DPO β={beta}"),
        Objective::SafeDpo { beta, delta } => format!("SafeDPO β={beta} Δ={delta}"),
        other => format!("{other:?}"),
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let threads =
            if self.device.contains("thread") { String::new() } else { format!(" ({} threads)", self.threads) };
        writeln!(f, "{} on {}{threads}, {}", self.engine, self.device, objective_label(&c.objective))?;
        if !self.cpu_isa.is_empty() {
            let paths: Vec<String> = self.cpu_isa.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            writeln!(f, "isa     {}", paths.join("; "))?;
        }
        let m = c.model_config();
        let heads =
            if m.n_kv_head == m.n_head { format!("{}", m.n_head) } else { format!("{}/{}kv", m.n_head, m.n_kv_head) };
        writeln!(
            f,
            "model   {} L={} d={} heads={heads} mlp={} vocab={}  ({:.3} M params)",
            m.family,
            m.n_layer,
            m.n_embd,
            m.intermediate_size,
            m.vocab_size,
            self.num_params as f64 / 1e6
        )?;
        writeln!(
            f,
            "batch   {} pairs × 2 sequences × {} tokens ({} prompt) = {} policy tokens/step; {} warm-up + {} timed steps",
            c.pairs, c.seq_len, c.prompt_len, self.policy_tokens_per_step, c.warmup_steps, c.steps
        )?;
        writeln!(
            f,
            "policy tokens/s   {:>10.0} (median step)  {:>10.0} (best step)",
            self.tokens_per_s, self.tokens_per_s_best
        )?;
        writeln!(
            f,
            "step time ms      median {:.2}  mean {:.2}  min {:.2}  max {:.2}",
            self.step_ms.median, self.step_ms.mean, self.step_ms.min, self.step_ms.max
        )?;
        let mfu = match self.mfu {
            Some(m) => format!("MFU {:.1}%", 100.0 * m),
            None => "MFU n/a (no peak FLOP/s given)".to_string(),
        };
        writeln!(
            f,
            "model FLOPs       {:.3} GFLOP/step, {:.2} GFLOP/s, {mfu}",
            self.flops_per_step / 1e9,
            self.flops_per_s / 1e9
        )?;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        match self.peak_memory_bytes {
            Some(b) => writeln!(f, "peak memory       {:.1} MiB ({})", mib(b), self.memory_source)?,
            None => writeln!(f, "peak memory       n/a")?,
        }
        // The resident set again only when the line above is about the device.
        if let (Some(rss), true) = (self.peak_host_rss_bytes, self.memory_source != HOST_MEMORY_SOURCE) {
            writeln!(f, "peak host RSS     {:.1} MiB ({HOST_MEMORY_SOURCE})", mib(rss))?;
        }
        writeln!(f, "final loss        {:.6}", self.final_loss)?;
        let p = &self.phases_ms;
        let total = p.sum().max(f64::MIN_POSITIVE);
        writeln!(f, "{:<34}{:>12}{:>8}", "phase (median)", "ms", "share")?;
        let mut row = |name: &str, ms: f64| writeln!(f, "{name:<34}{ms:>12.2}{:>7.1}%", 100.0 * ms / total);
        row("reference forward (+log-probs)", p.reference_forward)?;
        row("policy forward (+log-probs)", p.policy_forward)?;
        if let Some(lp) = p.log_probs {
            row("log-probs", lp)?;
        }
        row("preference loss", p.loss)?;
        row("backward", p.backward)?;
        row("optimizer (grad norm, AdamW)", p.optimizer)?;
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}
