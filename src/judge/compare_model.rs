//! The model `demo --compare` starts from.
//!
//! The plain demo's model is byte-level (2 layers, 128 wide): it learns the opening of an answer and
//! little after it, which is enough to measure a preference but leaves the judges scoring openings.
//! The comparison therefore trains, by default, a byte-level BPE tokenizer on the demo's training
//! text ([`crate::data::train_byte_level_bpe`]; the held-out prompts are not in it) and a deeper
//! model over it. Its random initialisation is written as a model directory with the tokenizer
//! (`init/` in the output directory) and the SFT run starts from it, so that every checkpoint of the
//! comparison is an HF model directory that carries its tokenizer. `--tokenizer byte` runs the
//! comparison on the plain demo's byte-level model instead.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Result};

use crate::config::RunConfig;
use crate::data::{
    load_tokenizer, save_tokenizer_files, save_trained_tokenizer, train_byte_level_bpe, PkuRow, Template,
};
use crate::model::checkpoint::save_dir;
use crate::model::random_weights;

/// The tokenizer (and with it the model) of the comparison.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompareTokenizer {
    /// The plain demo's byte tokenizer and model.
    Byte,
    /// A BPE tokenizer trained on the demo's text, and a deeper model ([`BpeModel`]).
    #[default]
    Bpe,
}

impl FromStr for CompareTokenizer {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "byte" => Ok(Self::Byte),
            "bpe" => Ok(Self::Bpe),
            _ => bail!("unknown tokenizer {s:?}: expected byte or bpe"),
        }
    }
}

impl fmt::Display for CompareTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Byte => "byte",
            Self::Bpe => "bpe",
        })
    }
}

/// The BPE model's shape, its SFT run, the preference runs' rate, and the token budget of its SFT
/// and preference steps (the preference runs keep the demo's steps, the judges their own runs).
///
/// Chosen by measuring the SFT alone (seed 42, 300 steps; held-out loss per response token, and the
/// share of 40 answers sampled at temperature 0.7 for held-out prompts that are, word for word, an
/// answer of the data): 4 layers × 128 at 4096 tokens a step, 0.542 and 48%; the same at 1024
/// tokens a step (a quarter of the compute), 0.549 and 50%; 6 × 128 at 4096, 0.596 and 20%; 6 × 192
/// at 1024, 0.499 and 55%; 4 × 256 at 1024, 0.464 and 78%. At the demo's preference rate (3e-4) the
/// 4 × 256 model's preference runs collapsed into repeated words ("and and and …") within 15 steps;
/// at 1e-4 they answer in sentences.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BpeModel {
    /// The tokenizer's vocabulary (at most: the training text may have fewer pairs to merge).
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    /// Context, and the longest training sequence: a demo sequence is some 30 tokens.
    pub n_positions: usize,
    pub sft_steps: usize,
    pub sft_lr: f32,
    /// The preference runs' peak learning rate.
    pub preference_lr: f32,
    /// Tokens per SFT and preference step: a BPE sequence is a quarter of a byte sequence, and a
    /// quarter of the byte model's 4096 gives a step as many sequences.
    pub tokens_per_micro_batch: usize,
}

impl BpeModel {
    /// The comparison's model for the demo's size (`quick`: a smoke test).
    pub fn for_demo(quick: bool) -> Self {
        if quick {
            return Self {
                vocab_size: 384,
                n_layer: 1,
                n_embd: 32,
                n_head: 2,
                n_positions: 64,
                sft_steps: 12,
                sft_lr: 3e-3,
                preference_lr: 2e-3,
                tokens_per_micro_batch: 1024,
            };
        }
        Self {
            vocab_size: 768,
            n_layer: 4,
            n_embd: 256,
            n_head: 4,
            n_positions: 96,
            sft_steps: 300,
            sft_lr: 2e-3,
            preference_lr: 1e-4,
            tokens_per_micro_batch: 1024,
        }
    }
}

/// The directory of the BPE model's random initialisation, in the comparison's output directory.
pub const INIT_DIR: &str = "init";

/// The texts the tokenizer is trained on: each training row's prompt, rendered by `template`, with
/// each of its responses, as a training sequence spells them.
fn training_texts(rows: &[PkuRow], template: &Template) -> Vec<String> {
    rows.iter()
        .flat_map(|row| {
            let prompt = template.render(&row.prompt);
            [&row.response_0, &row.response_1].map(|r| format!("{prompt}{}", template.response_text(r)))
        })
        .collect()
}

/// Sets `sft` (and `preference`, which starts from the SFT model) up for `model`: trains the
/// tokenizer on `train_rows`, writes the random initialisation with it into `out/init` and points
/// the SFT run there. Returns the initialisation's directory.
pub fn use_bpe_model(
    model: &BpeModel,
    sft: &mut RunConfig,
    preference: &mut RunConfig,
    train_rows: &[PkuRow],
    out: &Path,
) -> Result<PathBuf> {
    let template = Template::new(sft.data.template.clone())?;
    let tokenizer = train_byte_level_bpe(&training_texts(train_rows, &template), model.vocab_size)?;
    let dir = out.join(INIT_DIR);
    save_trained_tokenizer(&tokenizer, &dir)?;
    let tok = load_tokenizer(Some(&dir))?;
    for cfg in [&mut *sft, &mut *preference] {
        (cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head) = (model.n_layer, model.n_embd, model.n_head);
        cfg.model.n_positions = model.n_positions;
        cfg.data.max_len = model.n_positions;
        cfg.batching.tokens_per_micro_batch = model.tokens_per_micro_batch;
    }
    save_dir(&random_weights(sft.model.random_shape(tok.vocab_size()), sft.seed)?, &dir)?;
    save_tokenizer_files(tok.as_ref(), Some(&dir), &dir)?;
    sft.model.init = Some(dir.clone());
    sft.optimizer.total_steps = Some(model.sft_steps);
    sft.optimizer.lr = model.sft_lr;
    preference.optimizer.lr = model.preference_lr;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_names_parse_and_print() {
        for t in [CompareTokenizer::Byte, CompareTokenizer::Bpe] {
            assert_eq!(t.to_string().parse::<CompareTokenizer>().unwrap(), t);
        }
        assert!("wordpiece".parse::<CompareTokenizer>().unwrap_err().to_string().contains("byte or bpe"));
        assert_eq!(CompareTokenizer::default(), CompareTokenizer::Bpe);
    }
}
