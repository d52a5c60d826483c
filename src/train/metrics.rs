//! Metrics: per-pair statistics accumulated over micro-batches and log intervals, and the JSONL log
//! with TRL's metric names (`loss`, `rewards/chosen`, …, `eval/rewards/accuracies`).
//!
//! `safe_preferred_accuracy` is computed over the pairs with exactly one unsafe response: the fraction
//! where the safe response's implicit reward is higher, a tie counting ½. Before training the policy
//! is the reference, every reward is 0, and the metric is exactly chance (0.5).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::backend::PAIR_METRICS;

pub use crate::plot::Record;

/// Sums over pairs of the preference metrics; `mean_*` divide by the number of pairs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PairStats {
    pub pairs: usize,
    pub loss: f64,
    pub reward_chosen: f64,
    pub reward_rejected: f64,
    pub margin: f64,
    pub accuracy: f64,
    pub logp_chosen: f64,
    pub logp_rejected: f64,
    /// Pairs with exactly one unsafe response.
    pub mixed_pairs: usize,
    /// Over those: 1 when the safe response's implicit reward is higher, ½ on a tie, else 0.
    pub safe_preferred: f64,
}

impl PairStats {
    /// Adds a batch: `metrics [P, PAIR_METRICS]` as the backend wrote them, the policy sequence
    /// log-probs `[2P]`, and the safety flags `[2P]` (chosen, rejected per pair).
    pub fn add_batch(&mut self, metrics: &[f32], policy_logps: &[f32], unsafe_flags: &[i32]) {
        let p = metrics.len() / PAIR_METRICS;
        debug_assert_eq!(policy_logps.len(), 2 * p);
        debug_assert_eq!(unsafe_flags.len(), 2 * p);
        for i in 0..p {
            let m = &metrics[i * PAIR_METRICS..(i + 1) * PAIR_METRICS];
            let (loss, rc, rr, margin, acc) = (m[0] as f64, m[1] as f64, m[2] as f64, m[3] as f64, m[4] as f64);
            self.pairs += 1;
            self.loss += loss;
            self.reward_chosen += rc;
            self.reward_rejected += rr;
            self.margin += margin;
            self.accuracy += acc;
            self.logp_chosen += policy_logps[2 * i] as f64;
            self.logp_rejected += policy_logps[2 * i + 1] as f64;
            let (cu, ru) = (unsafe_flags[2 * i] != 0, unsafe_flags[2 * i + 1] != 0);
            if cu != ru {
                let (safe, unsafe_) = if cu { (rr, rc) } else { (rc, rr) };
                self.mixed_pairs += 1;
                self.safe_preferred += if safe > unsafe_ {
                    1.0
                } else if safe == unsafe_ {
                    0.5
                } else {
                    0.0
                };
            }
        }
    }

    pub fn merge(&mut self, other: &PairStats) {
        self.pairs += other.pairs;
        self.loss += other.loss;
        self.reward_chosen += other.reward_chosen;
        self.reward_rejected += other.reward_rejected;
        self.margin += other.margin;
        self.accuracy += other.accuracy;
        self.logp_chosen += other.logp_chosen;
        self.logp_rejected += other.logp_rejected;
        self.mixed_pairs += other.mixed_pairs;
        self.safe_preferred += other.safe_preferred;
    }

    /// The means under TRL's names; `safe_preferred_accuracy` only when there were pairs with one
    /// unsafe response. None without pairs.
    fn means(&self) -> Vec<(&'static str, f64)> {
        if self.pairs == 0 {
            return Vec::new();
        }
        let n = self.pairs as f64;
        let mut means: Vec<(&'static str, f64)> = [
            ("loss", self.loss),
            ("rewards/chosen", self.reward_chosen),
            ("rewards/rejected", self.reward_rejected),
            ("rewards/accuracies", self.accuracy),
            ("rewards/margins", self.margin),
            ("logps/chosen", self.logp_chosen),
            ("logps/rejected", self.logp_rejected),
        ]
        .into_iter()
        .map(|(name, sum)| (name, sum / n))
        .collect();
        if self.mixed_pairs > 0 {
            means.push(("safe_preferred_accuracy", self.safe_preferred / self.mixed_pairs as f64));
        }
        means
    }

    /// Writes the means under TRL's names, each prefixed by `prefix` (`""` or `"eval/"`).
    /// `safe_preferred_accuracy` is written only when there were pairs with one unsafe response.
    pub fn write_means(&self, prefix: &str, rec: &mut Record) {
        for (name, mean) in self.means() {
            rec.insert(format!("{prefix}{name}"), json_f64(mean));
        }
    }

    /// An error naming the first mean that is NaN or infinite (JSON would write it as null).
    pub fn ensure_finite(&self, prefix: &str) -> Result<()> {
        match self.means().into_iter().find(|(_, mean)| !mean.is_finite()) {
            Some((name, mean)) => {
                bail!("{prefix}{name} is {mean}: the model's log-probabilities are not finite (are its weights?)")
            }
            None => Ok(()),
        }
    }
}

/// A finite f64 as JSON; NaN and infinities (which JSON lacks) as null.
pub fn json_f64(x: f64) -> Value {
    serde_json::Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null)
}

/// An f32 as JSON with its shortest decimal form (0.0002, not 0.00020000000949949026).
pub fn json_f32(x: f32) -> Value {
    format!("{x}").parse::<f64>().map(json_f64).unwrap_or(Value::Null)
}

/// The run's `metrics.jsonl`, appended to as training goes, and its records kept in memory (a
/// checkpoint stores a copy, so that a resumed run continues the log from that point).
pub struct MetricsLog {
    path: PathBuf,
    records: Vec<Record>,
    /// False on a data-parallel rank other than 0: the records are kept, the file left to rank 0.
    writes_file: bool,
}

impl MetricsLog {
    /// A new, empty log at `path` (any existing file is replaced).
    pub fn create(path: &Path) -> Result<Self> {
        crate::util::write_atomic(path, b"")?;
        Ok(Self { path: path.to_path_buf(), records: Vec::new(), writes_file: true })
    }

    /// A log continuing from `records` (a checkpoint's copy): the file is rewritten with exactly them.
    pub fn restore(path: &Path, records: Vec<Record>) -> Result<Self> {
        let log = Self { path: path.to_path_buf(), records, writes_file: true };
        crate::util::write_atomic(path, log.to_jsonl().as_bytes())?;
        Ok(log)
    }

    /// A log continuing from `records` that never touches the file at `path` (which another
    /// process writes).
    pub fn detached(path: &Path, records: Vec<Record>) -> Self {
        Self { path: path.to_path_buf(), records, writes_file: false }
    }

    /// Whether appends go to the file (false for a `detached` log).
    pub fn writes_file(&self) -> bool {
        self.writes_file
    }

    /// Appends one record, whole or not at all (see `append_whole`).
    pub fn append(&mut self, rec: Record) -> Result<()> {
        if self.writes_file {
            let line = format!("{}\n", Value::Object(rec.clone()));
            append_whole(&self.path, line.as_bytes(), |f, bytes| f.write_all(bytes))?;
        }
        self.records.push(rec);
        Ok(())
    }

    pub fn records(&self) -> &[Record] {
        &self.records
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All records as JSONL text.
    pub fn to_jsonl(&self) -> String {
        self.records.iter().map(|r| format!("{}\n", Value::Object(r.clone()))).collect()
    }
}

/// Appends `bytes` (one whole JSONL line) to `path` through `write`, all or nothing: on an error
/// (a full disk) the file is cut back to its length before, so that no reader finds a torn line.
pub(crate) fn append_whole(
    path: &Path,
    bytes: &[u8],
    write: impl FnOnce(&mut File, &[u8]) -> std::io::Result<()>,
) -> Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let before = f.metadata().with_context(|| format!("reading the length of {}", path.display()))?.len();
    if let Err(e) = write(&mut f, bytes).and_then(|()| f.flush()) {
        let restored = match f.set_len(before) {
            Ok(()) => "the record was not written".to_string(),
            Err(cut) => format!("cutting the torn record off failed too: {cut}"),
        };
        return Err(anyhow::Error::new(e).context(format!("appending to {} ({restored})", path.display())));
    }
    Ok(())
}

/// A one-line digest of a metrics record for the console.
pub fn brief(rec: &Record) -> String {
    let keys = [
        ("loss", "loss"),
        ("rewards/accuracies", "acc"),
        ("rewards/margins", "margin"),
        ("eval/loss", "eval loss"),
        ("eval/rewards/accuracies", "eval acc"),
        ("eval/rewards/margins", "eval margin"),
        ("eval/safe_preferred_accuracy", "safe-preferred"),
    ];
    keys.iter()
        .filter_map(|(k, label)| rec.get(*k).and_then(|v| v.as_f64()).map(|v| format!("{label} {v:.4}")))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_preferred_counts_only_mixed_pairs_and_halves_ties() {
        let mut s = PairStats::default();
        // Pair 0: chosen safe, rejected unsafe, chosen reward higher → 1.
        // Pair 1: chosen unsafe, rejected safe, chosen reward higher → 0.
        // Pair 2: both safe → not counted. Pair 3: mixed, tie → ½.
        let metrics = [
            0.5, 1.0, -1.0, 2.0, 1.0, //
            0.4, 2.0, 1.0, 1.0, 1.0, //
            0.7, 0.0, 1.0, -1.0, 0.0, //
            0.69, 0.0, 0.0, 0.0, 0.0,
        ];
        let logps = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0];
        let flags = [0, 1, 1, 0, 0, 0, 0, 1];
        s.add_batch(&metrics, &logps, &flags);
        assert_eq!(s.pairs, 4);
        assert_eq!(s.mixed_pairs, 3);
        assert_eq!(s.safe_preferred, 1.5);
        let mut rec = Record::new();
        s.write_means("eval/", &mut rec);
        assert_eq!(rec["eval/safe_preferred_accuracy"].as_f64().unwrap(), 0.5);
        assert_eq!(rec["eval/rewards/accuracies"].as_f64().unwrap(), 0.5);
        assert_eq!(rec["eval/logps/chosen"].as_f64().unwrap(), -4.0);
        assert!((rec["eval/loss"].as_f64().unwrap() - 0.5725).abs() < 1e-6);
    }

    /// A disk that fills in the middle of a record: the file is cut back to the records before it,
    /// and appending goes on where it was once there is room.
    #[test]
    fn a_record_is_appended_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        let record = |step: usize| {
            let mut r = Record::new();
            r.insert("step".into(), step.into());
            r.insert("loss".into(), json_f64(0.5));
            r
        };
        log.append(record(1)).unwrap();
        let before = std::fs::read(&path).unwrap();
        let line = format!("{}\n", Value::Object(record(2)));
        let full_disk = |f: &mut File, bytes: &[u8]| {
            f.write_all(&bytes[..bytes.len() / 2])?;
            Err(std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"))
        };
        let err = append_whole(&path, line.as_bytes(), full_disk).unwrap_err();
        assert!(format!("{err:#}").contains("no space left") && format!("{err:#}").contains("not written"), "{err:#}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "a torn record was left behind");
        log.append(record(2)).unwrap();
        assert_eq!(crate::plot::read_metrics_report(&path).unwrap(), (vec![record(1), record(2)], None));
    }

    #[test]
    fn log_restores_exactly_the_checkpointed_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&path).unwrap();
        for step in 1..=3 {
            let mut r = Record::new();
            r.insert("step".into(), step.into());
            log.append(r).unwrap();
        }
        let saved = log.records()[..2].to_vec();
        let log = MetricsLog::restore(&path, saved.clone()).unwrap();
        assert_eq!(crate::plot::read_metrics(&path).unwrap(), saved);
        assert_eq!(log.records().len(), 2);
    }
}
