//! Unpaired preference data, the objectives on unpaired examples' (KTO): reading, the safety
//! selection, tokenization, and packing with KTO's mismatched KL sequences.
//!
//! One example is a prompt, a completion and a label (desirable or not), TRL's unpaired preference
//! format: JSONL rows `{"prompt": …, "completion": …, "label": true|false}` with an optional boolean
//! `completion_unsafe` (missing or null = false; the pairs' `chosen_unsafe`/`rejected_unsafe`, for
//! the one response). A file of pairs (PKU-SafeRLHF or generic rows) is read as pairs, selected
//! (T(D) under `safedpo`), then unpaired as TRL's `unpair_preference_dataset` does: each pair gives
//! its chosen response as a desirable example and its rejected one as an undesirable example.
//!
//! The selection ([`PairSelection`]) of an unpaired row: `better` keeps its label; `safer` labels
//! it by safety alone (desirable exactly when safe); `safedpo`, T(D)'s counterpart for a row that
//! has no pair to swap, reads an unsafe completion labelled desirable as undesirable. Every error of
//! the reader names the file, the line and the field, as the pairs' reader does (whose line reader
//! and field checks it uses).
//!
//! A batch ([`unpaired_batch`]) packs each example's prompt + completion and, for KTO, its KL
//! sequence: the batch's completions rotated by one, as TRL's `_prepare_dataset` builds
//! `KL_completion_ids` within each batch (`[c_{n−1}, c_0, …, c_{n−2}]`, so example k's prompt is
//! followed by example k−1's completion), cut from the right to `max_len` as TRL's collator cuts it.

use std::fmt;
use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::load::{detect_format, opt_bool, parse_object, read_jsonl_lines, req_bool, req_str};
use super::{load_pairs, DataFormat, LoadReport, PackedBatch, PairSelection, PreferencePair};
use super::{SequenceFormat, TextTokenizer, Truncation};

/// One unpaired example (the JSONL row's fields).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpairedExample {
    pub prompt: String,
    pub completion: String,
    /// True for a desirable completion.
    pub label: bool,
    #[serde(default)]
    pub completion_unsafe: bool,
}

impl UnpairedExample {
    /// A desirable (`label`) or undesirable example, labelled safe.
    pub fn new(prompt: impl Into<String>, completion: impl Into<String>, label: bool) -> Self {
        UnpairedExample { prompt: prompt.into(), completion: completion.into(), label, completion_unsafe: false }
    }

    /// The same example with the completion's safety flag given (`true` = unsafe).
    pub fn with_unsafe(self, completion_unsafe: bool) -> Self {
        UnpairedExample { completion_unsafe, ..self }
    }

    /// The example under `selection` (see the module docs), and whether its label changed.
    pub fn selected(self, selection: PairSelection) -> (Self, bool) {
        let label = match selection {
            PairSelection::Better => self.label,
            PairSelection::Safer => !self.completion_unsafe,
            PairSelection::SafeDpo => self.label && !self.completion_unsafe,
        };
        let relabelled = label != self.label;
        (UnpairedExample { label, ..self }, relabelled)
    }
}

/// Each pair's chosen response as a desirable example and its rejected one as an undesirable one,
/// in the pairs' order (chosen first); the safety labels travel with their responses.
pub fn unpair(pairs: Vec<PreferencePair>) -> Vec<UnpairedExample> {
    let mut out = Vec::with_capacity(2 * pairs.len());
    for p in pairs {
        out.push(UnpairedExample::new(p.prompt.clone(), p.chosen, true).with_unsafe(p.chosen_unsafe));
        out.push(UnpairedExample::new(p.prompt, p.rejected, false).with_unsafe(p.rejected_unsafe));
    }
    out
}

/// What reading a file of examples did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnpairedReport {
    /// Non-blank lines of unpaired rows (0 when the file held pairs).
    pub lines: usize,
    /// The pairs' report when the file held pairs, unpaired after their selection.
    pub pairs: Option<LoadReport>,
    pub desirable: usize,
    pub undesirable: usize,
    /// Rows whose label the selection changed (`safedpo`: unsafe rows labelled desirable).
    pub relabelled: usize,
    /// Invalid lines skipped (only with `skip_invalid`), and the first of them: `line N: why`.
    pub skipped_invalid: usize,
    pub first_invalid: Option<String>,
}

impl UnpairedReport {
    pub fn examples(&self) -> usize {
        self.desirable + self.undesirable
    }
}

impl fmt::Display for UnpairedReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.pairs {
            Some(pairs) => write!(f, "{pairs}; unpaired into ")?,
            None => write!(f, "{} lines (unpaired): ", self.lines)?,
        }
        write!(
            f,
            "{} examples ({} desirable, {} undesirable), {} relabelled by the selection",
            self.examples(),
            self.desirable,
            self.undesirable,
            self.relabelled
        )?;
        if self.pairs.is_none() {
            write!(f, ", {} invalid skipped", self.skipped_invalid)?;
            if let Some(first) = &self.first_invalid {
                write!(f, " (the first, {first})")?;
            }
        }
        Ok(())
    }
}

fn parse_example(obj: &Map<String, Value>) -> std::result::Result<UnpairedExample, String> {
    Ok(UnpairedExample {
        prompt: req_str(obj, "prompt")?,
        completion: req_str(obj, "completion")?,
        label: req_bool(obj, "label")?,
        completion_unsafe: opt_bool(obj, "completion_unsafe")?,
    })
}

/// Reads unpaired examples from a JSONL file: unpaired rows, or pairs unpaired (see the module
/// docs). `format` may be forced or `Auto` (the first line whose fields announce a format decides).
/// Errors name the file, the 1-based line and the field; with `skip_invalid` invalid lines are
/// counted and skipped.
pub fn load_examples(
    path: &Path,
    format: DataFormat,
    selection: PairSelection,
    skip_invalid: bool,
) -> Result<(Vec<UnpairedExample>, UnpairedReport)> {
    let format = match format {
        DataFormat::Auto => first_format(path)?,
        given => given,
    };
    let mut report = UnpairedReport::default();
    let count = |examples: Vec<UnpairedExample>, report: &mut UnpairedReport| {
        let mut out = Vec::with_capacity(examples.len());
        for example in examples {
            let (example, relabelled) = example.selected(selection);
            report.relabelled += usize::from(relabelled);
            if example.label {
                report.desirable += 1;
            } else {
                report.undesirable += 1;
            }
            out.push(example);
        }
        out
    };
    if format != DataFormat::Unpaired {
        let (pairs, pair_report) = load_pairs(path, format, selection, skip_invalid)?;
        report.pairs = Some(pair_report);
        let examples = count(unpair(pairs), &mut report);
        return Ok((examples, report));
    }
    let mut rows = Vec::new();
    let lines = read_jsonl_lines(path, skip_invalid, |_, bytes| {
        rows.push(parse_example(&parse_object(bytes)?)?);
        Ok(())
    })?;
    (report.lines, report.skipped_invalid, report.first_invalid) =
        (lines.lines, lines.skipped_invalid, lines.first_invalid);
    let examples = count(rows, &mut report);
    Ok((examples, report))
}

/// The format the first line that announces one has (`Auto` when none does: the pairs' reader then
/// reports the lines).
fn first_format(path: &Path) -> Result<DataFormat> {
    let mut found = None;
    read_jsonl_lines(path, true, |_, bytes| {
        if found.is_none() {
            found = parse_object(bytes).ok().as_ref().and_then(detect_format);
        }
        Ok(())
    })?;
    Ok(found.unwrap_or(DataFormat::Auto))
}

/// Writes examples as unpaired JSONL rows (`prompt`, `completion`, `label`, `completion_unsafe`),
/// atomically.
pub fn write_examples_jsonl(path: &Path, examples: &[UnpairedExample]) -> Result<()> {
    super::load::write_jsonl(path, examples)
}

/// A tokenized example. The completion ends with EOS unless truncation cut it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedExample {
    pub prompt: Vec<i32>,
    pub completion: Vec<i32>,
    pub desirable: bool,
    pub completion_unsafe: bool,
}

impl TokenizedExample {
    /// Tokens of prompt + completion.
    pub fn sequence_tokens(&self) -> usize {
        self.prompt.len() + self.completion.len()
    }

    /// The example's cost in a batch: its sequence, and with `kl` its share of the KL sequences (a
    /// batch's KL sequences hold its prompts and its completions once each, at most, after the cut).
    pub fn batch_cost(&self, kl: bool) -> usize {
        if kl {
            2 * self.sequence_tokens()
        } else {
            self.sequence_tokens()
        }
    }
}

/// What tokenizing examples did: `examples_in = kept + dropped_too_long + dropped_empty_prompt`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExampleTruncationReport {
    pub examples_in: usize,
    pub kept: usize,
    pub prompts_truncated: usize,
    pub completions_truncated: usize,
    pub dropped_too_long: usize,
    pub dropped_empty_prompt: usize,
    pub longest_sequence: usize,
}

impl fmt::Display for ExampleTruncationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} examples: {} kept ({} prompts and {} completions truncated), dropped {} too long, {} empty prompt; \
             longest sequence {} tokens",
            self.examples_in,
            self.kept,
            self.prompts_truncated,
            self.completions_truncated,
            self.dropped_too_long,
            self.dropped_empty_prompt,
            self.longest_sequence
        )
    }
}

enum Encoded {
    Kept { example: TokenizedExample, prompt_truncated: bool, completion_truncated: usize },
    TooLong,
    EmptyPrompt,
}

fn encode_example(
    e: &UnpairedExample,
    tok: &dyn TextTokenizer,
    format: &dyn SequenceFormat,
    limits: &Truncation,
) -> Result<Encoded> {
    // The pair encoder with the completion on both sides: the same tokens as in a pair.
    let (mut prompt, [mut completion, _]) = format.encode_pair(tok, &e.prompt, [&e.completion, &e.completion])?;
    if prompt.is_empty() {
        return Ok(Encoded::EmptyPrompt);
    }
    // A pair's truncation with the completion on both sides (so both are cut alike).
    let mut twin = completion.clone();
    let Some((prompt_truncated, cut)) = limits.apply(&mut prompt, [&mut completion, &mut twin]) else {
        return Ok(Encoded::TooLong);
    };
    let completion_truncated = cut.min(1);
    let example = TokenizedExample { prompt, completion, desirable: e.label, completion_unsafe: e.completion_unsafe };
    Ok(Encoded::Kept { example, prompt_truncated, completion_truncated })
}

/// Tokenizes examples (in parallel, order kept) as pairs are tokenized (`data::tokenize_pairs_with`:
/// the same template, prompt/completion boundary and truncation, with one response). Fails on an
/// invalid template, or a chat template that fails on an example (the error names its index).
pub fn tokenize_examples(
    examples: &[UnpairedExample],
    tok: &dyn TextTokenizer,
    format: &dyn SequenceFormat,
    limits: &Truncation,
) -> Result<(Vec<TokenizedExample>, ExampleTruncationReport)> {
    format.check()?;
    let encoded: Vec<Encoded> = examples
        .par_iter()
        .enumerate()
        .map(|(i, e)| encode_example(e, tok, format, limits).with_context(|| format!("example {i}")))
        .collect::<Result<_>>()?;
    let mut report = ExampleTruncationReport { examples_in: examples.len(), ..Default::default() };
    let mut out = Vec::with_capacity(encoded.len());
    for outcome in encoded {
        match outcome {
            Encoded::Kept { example, prompt_truncated, completion_truncated } => {
                report.kept += 1;
                report.prompts_truncated += usize::from(prompt_truncated);
                report.completions_truncated += completion_truncated;
                report.longest_sequence = report.longest_sequence.max(example.sequence_tokens());
                out.push(example);
            }
            Encoded::TooLong => report.dropped_too_long += 1,
            Encoded::EmptyPrompt => report.dropped_empty_prompt += 1,
        }
    }
    Ok((out, report))
}

/// A batch of N unpaired examples: their sequences and, for KTO, their KL sequences.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UnpairedBatch {
    /// N sequences, prompt k + completion k.
    pub matched: PackedBatch,
    /// N sequences, prompt k + completion k−1 (k = 0: the last), cut to `max_len`; `None` when the
    /// objective reads no KL estimate.
    pub kl: Option<PackedBatch>,
    /// `[N]` labels.
    pub desirable: Vec<bool>,
    /// `[N]` completions' safety flags.
    pub completion_unsafe: Vec<bool>,
    /// `[N]` the examples' indices in their dataset.
    pub example_ids: Vec<usize>,
}

impl UnpairedBatch {
    pub fn num_examples(&self) -> usize {
        self.example_ids.len()
    }

    /// Tokens of every sequence of the batch.
    pub fn num_tokens(&self) -> usize {
        self.matched.num_tokens() + self.kl.as_ref().map_or(0, PackedBatch::num_tokens)
    }
}

/// Packs `examples[ids]` (in that order) as a batch, with KL sequences cut to `kl_max_len` when it
/// is given (see the module docs).
pub fn unpaired_batch(examples: &[TokenizedExample], ids: &[usize], kl_max_len: Option<usize>) -> UnpairedBatch {
    let mut seq = Vec::new();
    let mut matched = PackedBatch { cu_seqlens: vec![0], ..Default::default() };
    for &id in ids {
        let e = &examples[id];
        seq.clear();
        seq.extend_from_slice(&e.prompt);
        seq.extend_from_slice(&e.completion);
        matched.push(&seq, e.prompt.len());
    }
    let kl = kl_max_len.map(|max_len| {
        let mut kl = PackedBatch { cu_seqlens: vec![0], ..Default::default() };
        for (k, &id) in ids.iter().enumerate() {
            let (prompt, other) = (&examples[id].prompt, &examples[ids[(k + ids.len() - 1) % ids.len()]].completion);
            let room = max_len.saturating_sub(prompt.len());
            seq.clear();
            seq.extend_from_slice(prompt);
            seq.extend_from_slice(&other[..other.len().min(room)]);
            kl.push(&seq, prompt.len());
        }
        kl
    });
    UnpairedBatch {
        matched,
        kl,
        desirable: ids.iter().map(|&i| examples[i].desirable).collect(),
        completion_unsafe: ids.iter().map(|&i| examples[i].completion_unsafe).collect(),
        example_ids: ids.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(prompt: &[i32], completion: &[i32]) -> TokenizedExample {
        TokenizedExample { prompt: prompt.to_vec(), completion: completion.to_vec(), ..Default::default() }
    }

    #[test]
    fn kl_sequences_rotate_the_completions_by_one_and_are_cut_to_max_len() {
        let examples = [example(&[1, 2], &[10, 11, 12]), example(&[3], &[20]), example(&[4, 5, 6], &[30, 31])];
        let batch = unpaired_batch(&examples, &[2, 0, 1], Some(5));
        let kl = batch.kl.unwrap();
        // Batch order 2, 0, 1: prompts 2, 0, 1 with completions 1, 2, 0; prompt 0 + completion 2
        // fits, prompt 1 + completion 0 too, prompt 2 (3 tokens) + completion 1 (1 token) too.
        assert_eq!(kl.tokens, vec![4, 5, 6, 20, 1, 2, 30, 31, 3, 10, 11, 12]);
        assert_eq!(kl.cu_seqlens, vec![0, 4, 8, 12]);
        assert_eq!(batch.matched.tokens, vec![4, 5, 6, 30, 31, 1, 2, 10, 11, 12, 3, 20]);
        let cut = unpaired_batch(&examples, &[1, 0], Some(3)).kl.unwrap();
        // Prompt 1 (1 token) + completion 0 cut to 2 tokens; prompt 0 (2 tokens) + completion 1.
        assert_eq!(cut.tokens, vec![3, 10, 11, 1, 2, 20]);
        assert_eq!(unpaired_batch(&examples, &[1], Some(8)).kl.unwrap().tokens, vec![3, 20]);
    }

    #[test]
    fn the_selection_relabels_as_documented() {
        let unsafe_good = UnpairedExample::new("p", "c", true).with_unsafe(true);
        assert_eq!(unsafe_good.clone().selected(PairSelection::Better), (unsafe_good.clone(), false));
        assert!(!unsafe_good.clone().selected(PairSelection::SafeDpo).0.label);
        let safe_bad = UnpairedExample::new("p", "c", false);
        assert_eq!(safe_bad.clone().selected(PairSelection::SafeDpo), (safe_bad.clone(), false));
        assert!(safe_bad.clone().selected(PairSelection::Safer).0.label);
    }
}
