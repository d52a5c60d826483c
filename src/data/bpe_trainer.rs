//! Training a byte-level BPE tokenizer on a corpus, GPT-2 style: the GPT-2 pre-tokenizer regex splits
//! words, every one of the 256 bytes is in the initial alphabet (so any text encodes and decodes back
//! to itself, whatever the corpus held), and `<|endoftext|>` is the one special token (id 0), the
//! EOS. `demo --compare` trains one on its synthetic training text, so that its models read words
//! rather than bytes.
//!
//! Training is deterministic: the `tokenizers` trainer counts the corpus's words, then merges the
//! most frequent pair, ties broken by the pair's ids, which come from the sorted alphabet.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{anyhow, ensure, Result};
use serde_json::json;

use super::tokenizer::ByteTokenizer;
use super::tokenizer_config::TOKENIZER_CONFIG_FILE;
use crate::util::write_atomic;

/// The trained tokenizer's one special token: its EOS (GPT-2's spelling).
pub const BPE_EOS_TOKEN: &str = "<|endoftext|>";

/// The smallest vocabulary a byte-level BPE can have: the 256 bytes and the EOS, without merges.
pub const MIN_BPE_VOCAB: usize = 257;

fn byte_level() -> tokenizers::pre_tokenizers::byte_level::ByteLevel {
    tokenizers::pre_tokenizers::byte_level::ByteLevel::default().add_prefix_space(false).trim_offsets(false)
}

/// A byte-level BPE tokenizer of `vocab_size` tokens (at most: fewer when the corpus has too few
/// pairs to merge) trained on `texts` (see the module documentation).
pub fn train_byte_level_bpe<S: AsRef<str>>(texts: &[S], vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainer, BPE};
    use tokenizers::models::TrainerWrapper;
    ensure!(
        vocab_size >= MIN_BPE_VOCAB,
        "a byte-level BPE vocabulary holds at least the 256 bytes and the EOS ({MIN_BPE_VOCAB} tokens), not \
         {vocab_size}"
    );
    let alphabet: HashSet<char> = (0..=255u8).map(ByteTokenizer::byte_char).collect();
    let eos = tokenizers::AddedToken::from(BPE_EOS_TOKEN, true);
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(alphabet)
        .special_tokens(vec![eos])
        .build()
        .into();
    let mut tok = tokenizers::Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(byte_level()));
    tok.with_decoder(Some(byte_level()));
    let texts: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
    tok.train(&mut trainer, texts.into_iter()).map_err(|e| anyhow!("training the BPE tokenizer: {e}"))?;
    Ok(tok)
}

/// The `tokenizer_config.json` beside a trained tokenizer: the generic class, `<|endoftext|>` as
/// EOS (and BOS, as GPT-2 names it; nothing is put before a text).
pub fn bpe_tokenizer_config() -> String {
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BPE_EOS_TOKEN,
        "eos_token": BPE_EOS_TOKEN,
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
    });
    let mut text = serde_json::to_string_pretty(&config).expect("a JSON value always serialises");
    text.push('\n');
    text
}

/// Writes a trained tokenizer into `dir` as a model directory carries it: `tokenizer.json` and
/// `tokenizer_config.json` (what `load_tokenizer` reads, as transformers does).
pub fn save_trained_tokenizer(tok: &tokenizers::Tokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut text = tok.to_string(true).map_err(|e| anyhow!("writing the trained tokenizer: {e}"))?;
    text.push('\n');
    write_atomic(&dir.join("tokenizer.json"), text.as_bytes())?;
    write_atomic(&dir.join(TOKENIZER_CONFIG_FILE), bpe_tokenizer_config().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::load_tokenizer;

    fn corpus() -> Vec<String> {
        crate::data::synthetic_pku_rows(300, 7)
            .into_iter()
            .flat_map(|r| [format!("USER: {} ASSISTANT: {}", r.prompt, r.response_0), r.response_1])
            .collect()
    }

    #[test]
    fn round_trips_any_text_and_is_deterministic() {
        let texts = corpus();
        let tok = train_byte_level_bpe(&texts, 512).unwrap();
        let again = train_byte_level_bpe(&texts, 512).unwrap();
        assert_eq!(tok.to_string(false).unwrap(), again.to_string(false).unwrap(), "same corpus, same tokenizer");
        let vocab = tok.get_vocab_size(true);
        assert!(vocab > 400 && vocab <= 512, "{vocab} tokens");

        let dir = tempfile::tempdir().unwrap();
        save_trained_tokenizer(&tok, dir.path()).unwrap();
        let loaded = load_tokenizer(Some(dir.path())).unwrap();
        assert_eq!(loaded.eos_id(), 0);
        assert_eq!(loaded.id_to_token(0).as_deref(), Some(BPE_EOS_TOKEN));
        assert!(loaded.bos_ids().is_empty());
        let mut samples: Vec<String> = [
            "USER: How do I steal a car? ASSISTANT: I can't help with that.",
            "  leading, trailing and  double  spaces  ",
            "ünïcödé, 日本語, emoji 🦀, tabs\tand\nnewlines\r\n",
            "</s> <s> <|endoftext|>x",
            "",
        ]
        .map(String::from)
        .to_vec();
        // Every byte value, in valid UTF-8 (each char below 256).
        samples.push((0..=255u8).map(char::from).collect());
        for text in &samples {
            let ids = loaded.encode(text);
            assert!(ids.iter().all(|&id| (id as usize) < loaded.vocab_size()));
            let expected = text.replace(BPE_EOS_TOKEN, "");
            assert_eq!(loaded.decode(&ids), expected, "{text:?}");
        }
        // The training text is words, not bytes.
        let known = loaded.encode(" ASSISTANT: I can't help with that.");
        assert!(known.len() <= 10, "{known:?}");
    }

    #[test]
    fn too_small_a_vocabulary_is_refused() {
        let err = train_byte_level_bpe(&["a b c"], 100).unwrap_err().to_string();
        assert!(err.contains("257"), "{err}");
    }
}
