//! A byte-level BPE tokenizer from a model directory's `vocab.json` + `merges.txt` (no
//! `tokenizer.json`), built as transformers 5 builds one for the directory's tokenizer class:
//!
//! - `GPT2Tokenizer` (also when the directory names no class and is not a Qwen2 model): a
//!   `ByteLevel` pre-tokenizer with GPT-2's regex (`add_prefix_space` from `tokenizer_config.json`,
//!   default false), a `ByteLevel` decoder; `<|endoftext|>` (its default BOS, EOS, UNK) special.
//! - `Qwen2Tokenizer` (or a directory whose `config.json` says `model_type: qwen2` and names no
//!   class): NFC, a `Split` on Qwen2's regex (one digit a piece) then `ByteLevel` without its own
//!   regex, a `ByteLevel` decoder; `<|endoftext|>` (its default EOS, UNK and pad) special.
//!
//! Both then take `tokenizer_config.json`'s `added_tokens_decoder` at their ids (Qwen2's
//! `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` are there, not in `vocab.json`), and make the
//! configuration's special tokens special (one missing from the vocabulary is added after it, as
//! transformers adds it). A class that is not byte-level BPE from these files
//! (`LlamaTokenizer`: SentencePiece, `tokenizer.model`) is an error that names it, as is a directory
//! with a tokenizer file this reader does not build from (`tokenizer.model`, `tekken.json`, half of
//! the pair): transformers (`AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`) writes the
//! `tokenizer.json` safedpo reads.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::tokenizer_config::TokenizerSettings;

/// Qwen2's pre-tokenizer regex (transformers' `tokenization_qwen2.PRETOKENIZE_REGEX`).
pub const QWEN2_PRETOKENIZE_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GPT-2's BOS, EOS and UNK (Qwen2's defaults are the configuration's: `class_defaults`).
const ENDOFTEXT: &str = "<|endoftext|>";

/// The byte-level BPE classes a `vocab.json` + `merges.txt` pair is built as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ByteLevelClass {
    Gpt2,
    Qwen2,
}

impl ByteLevelClass {
    /// The class `settings` name (or, naming none, the model type's), or an error for a class
    /// these files do not make.
    fn of(settings: &TokenizerSettings) -> Result<Self> {
        match (settings.tokenizer_class.as_deref(), settings.model_type.as_deref()) {
            (Some("GPT2Tokenizer"), _) => Ok(Self::Gpt2),
            (Some("Qwen2Tokenizer"), _) => Ok(Self::Qwen2),
            (None, Some("qwen2")) => Ok(Self::Qwen2),
            (None, _) => Ok(Self::Gpt2),
            (Some(other), _) => bail!(
                "tokenizer_config.json names the tokenizer class {other}, which is not built from vocab.json + \
                 merges.txt here (GPT2Tokenizer and Qwen2Tokenizer are): save the tokenizer as tokenizer.json \
                 with transformers (AutoTokenizer.from_pretrained(dir).save_pretrained(dir))"
            ),
        }
    }
}

/// The tokenizer of `vocab` + `merges` for the class `settings` name (see the module docs).
pub(super) fn byte_level_bpe(
    vocab: &Path,
    merges: &Path,
    settings: &TokenizerSettings,
) -> Result<tokenizers::Tokenizer> {
    let class = ByteLevelClass::of(settings)?;
    let files = || format!("{} + {}", vocab.display(), merges.display());
    let bpe = tokenizers::models::bpe::BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| anyhow!("{}: cannot read BPE tokenizer: {e}", files()))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    match class {
        ByteLevelClass::Gpt2 => {
            let add_prefix_space = settings.add_prefix_space.unwrap_or(false);
            inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(add_prefix_space)));
        }
        ByteLevelClass::Qwen2 => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_PRETOKENIZE_REGEX.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("Qwen2's pre-tokenizer regex: {e}"))?;
            let byte_level =
                ByteLevel::default().add_prefix_space(settings.add_prefix_space.unwrap_or(false)).use_regex(false);
            inner.with_normalizer(Some(NFC));
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])));
        }
    }
    inner.with_decoder(Some(ByteLevel::default()));
    add_configured_tokens(&mut inner, class, settings).map_err(|e| anyhow!("{}: {e}", files()))?;
    Ok(inner)
}

/// `added_tokens_decoder` at its ids, then the configuration's special tokens (the class's
/// defaults among them; GPT-2's `<|endoftext|>` always) as special tokens, as transformers adds them:
/// a text holding one maps to its single id, and decoding leaves it out.
fn add_configured_tokens(
    inner: &mut tokenizers::Tokenizer,
    class: ByteLevelClass,
    settings: &TokenizerSettings,
) -> Result<()> {
    for entry in &settings.added_tokens {
        let token = entry.to_added_token();
        if entry.special {
            inner.add_special_tokens(&[token]);
        } else {
            inner.add_tokens(&[token]);
        }
        match inner.token_to_id(&entry.content) {
            Some(id) if id == entry.id => {}
            got => bail!(
                "tokenizer_config.json's added_tokens_decoder puts {:?} at id {}, but it takes id {} here (an id \
                 of vocab.json, or the added ids are not contiguous after the vocabulary)",
                entry.content,
                entry.id,
                got.map_or("none".into(), |id| id.to_string())
            ),
        }
    }
    let gpt2_default = (class == ByteLevelClass::Gpt2).then_some(ENDOFTEXT);
    let named = settings.special_tokens.iter().map(|(_, token)| token.as_str());
    for token in gpt2_default.into_iter().chain(named) {
        if !settings.added_tokens.iter().any(|t| t.content == token) {
            inner.add_special_tokens(&[AddedToken::from(token, true)]);
        }
    }
    Ok(())
}

/// The tokenizer files of `dir` that safedpo does not build a tokenizer from, when it has no
/// `tokenizer.json` and no `vocab.json` + `merges.txt` pair: an error naming them, so that the
/// directory is not read with the byte tokenizer by mistake.
pub(super) fn check_no_unread_tokenizer(dir: &Path) -> Result<()> {
    const UNREAD: [(&str, &str); 4] = [
        ("tokenizer.model", "a SentencePiece model (LlamaTokenizer, Mistral)"),
        ("tekken.json", "Mistral's tekken tokenizer"),
        ("vocab.json", "a vocabulary without its merges.txt"),
        ("merges.txt", "merges without their vocab.json"),
    ];
    for (file, what) in UNREAD {
        if dir.join(file).is_file() {
            bail!(
                "{}: {what} and no tokenizer.json: safedpo reads tokenizer.json (or a byte-level BPE's vocab.json \
                 + merges.txt); write one with transformers (AutoTokenizer.from_pretrained(dir).save_pretrained(dir))",
                dir.join(file).display()
            );
        }
    }
    Ok(())
}
