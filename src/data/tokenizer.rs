//! Tokenizers: Hugging Face `tokenizer.json` (GPT-2 byte-level BPE, the Llama family's SentencePiece-style
//! BPE with byte fallback and byte-level BPE with the Llama-3 / Qwen2 pre-tokenizer, added special
//! tokens) through the `tokenizers` crate, and a built-in byte tokenizer for tiny models and tests.
//!
//! A model directory's tokenizer is read as transformers 5 reads it:
//! - `tokenizer.json` as it is, except for the `LlamaTokenizer` class (Llama-2 and its like, named by
//!   `tokenizer_config.json`), which transformers 5 rebuilds around the file's vocabulary and merges:
//!   no normalizer, a `Metaspace` pre-tokenizer that puts `▁` before the first word of a text only
//!   (`legacy: true`: before every piece between special tokens; `add_prefix_space: false`: never),
//!   byte fallback. Not when `tokenizer.json` is byte-level, nor for Mistral's model types, which
//!   transformers (without `mistral-common`) reads as the file says.
//! - BOS: what `tokenizer.json`'s post-processor puts before a text (transformers ignores
//!   `add_bos_token` when there is a `tokenizer.json`); with a `vocab.json` + `merges.txt` pair,
//!   `add_bos_token` and `bos_token` from `tokenizer_config.json`.
//! - EOS: `tokenizer_config.json`'s `eos_token` (a string or an `AddedToken` object: what
//!   transformers calls `tokenizer.eos_token` and TRL appends to plain-text responses), else
//!   `special_tokens_map.json`'s, else the first id of `generation_config.json`'s `eos_token_id`, else
//!   the first of [`EOS_CANDIDATES`] in the vocabulary. Generation stops at EOS and at every id of
//!   `generation_config.json`'s `eos_token_id` (Llama-3-Instruct ends turns with `<|eot_id|>`).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::tokenizer_config::TokenizerSettings;
use super::vocab_merges::{byte_level_bpe, check_no_unread_tokenizer};

/// Text ↔ token ids. Encoding never adds special tokens (special-token text in the input, such as
/// `<|eot_id|>`, still maps to its token, as in transformers); callers put [`TextTokenizer::bos_ids`]
/// before a prompt and EOS where a text ends.
pub trait TextTokenizer: Send + Sync {
    fn encode(&self, s: &str) -> Vec<i32>;
    /// Decodes ids to text; special tokens are left out and invalid byte sequences are replaced
    /// (lossy), so any id sequence decodes.
    fn decode(&self, ids: &[i32]) -> String;
    fn eos_id(&self) -> i32;
    /// One more than the largest id `encode` or `eos_id` can return.
    fn vocab_size(&self) -> usize;
    /// What the tokenizer puts before a text it encodes with special tokens (a BOS): a sequence carries
    /// it once, at the start of its prompt.
    fn bos_ids(&self) -> &[i32] {
        &[]
    }
    /// The tokens generation stops at: EOS, and any other end-of-sequence token the model's generation
    /// configuration names.
    fn stop_ids(&self) -> Vec<i32> {
        vec![self.eos_id()]
    }
    /// The token with id `id` as its vocabulary spells it (`None` outside the vocabulary): two
    /// tokenizers that spell every id alike give every text the same ids.
    fn id_to_token(&self, id: u32) -> Option<String>;
}

/// Bytes as tokens: ids 0..=255 are the UTF-8 bytes, 256 is BOS, 257 is EOS (vocabulary 258). Nothing
/// is put before a text (BOS is in the vocabulary, never prepended). A model directory trained with it
/// carries it as a `tokenizer.json` (`data::tokenizer_files`) that reads back with the same ids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const BOS: i32 = 256;
    pub const EOS: i32 = 257;
    pub const VOCAB_SIZE: usize = 258;
    /// How a vocabulary spells BOS and EOS (special tokens: text never encodes to them).
    pub const BOS_TOKEN: &'static str = "<s>";
    pub const EOS_TOKEN: &'static str = "</s>";

    /// The character GPT-2's byte-level alphabet writes byte `b` as (its `bytes_to_unicode`): printable
    /// Latin-1 bytes as themselves, the others shifted to U+0100 and up, in order.
    pub fn byte_char(b: u8) -> char {
        let printable = |x: u8| matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        if printable(b) {
            return char::from(b);
        }
        let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + shifted).expect("U+0100..U+0143 are characters")
    }
}

impl TextTokenizer for ByteTokenizer {
    fn encode(&self, s: &str) -> Vec<i32> {
        s.bytes().map(i32::from).collect()
    }

    /// Byte ids are decoded as UTF-8 (lossy); BOS, EOS and out-of-range ids are left out.
    fn decode(&self, ids: &[i32]) -> String {
        let bytes: Vec<u8> = ids.iter().filter(|&&id| (0..=255).contains(&id)).map(|&id| id as u8).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn eos_id(&self) -> i32 {
        Self::EOS
    }

    fn vocab_size(&self) -> usize {
        Self::VOCAB_SIZE
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        match id {
            0..=255 => Some(Self::byte_char(id as u8).to_string()),
            256 => Some(Self::BOS_TOKEN.to_string()),
            257 => Some(Self::EOS_TOKEN.to_string()),
            _ => None,
        }
    }
}

/// End-of-sequence tokens looked for, in order, when nothing names one explicitly.
pub const EOS_CANDIDATES: [&str; 6] = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]"];

/// Model types whose `LlamaTokenizer` configurations transformers 5 reads as `tokenizer.json` says (it
/// registers no tokenizer class of their own for them, or `mistral-common`'s).
const AS_IS_MODEL_TYPES: [&str; 8] =
    ["mistral", "mixtral", "ministral", "ministral3", "mistral3", "mistral_large4", "pixtral", "voxtral"];

/// Where a tokenizer's BOS comes from: `tokenizer.json`'s post-processor, or `tokenizer_config.json`'s
/// `add_bos_token` (without a `tokenizer.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BosSource {
    PostProcessor,
    AddBosToken,
}

/// A Hugging Face tokenizer read from `tokenizer.json` (or a byte-level BPE's `vocab.json` + `merges.txt`: GPT-2, Qwen2).
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: i32,
    vocab_size: usize,
    bos_ids: Vec<i32>,
    stop_ids: Vec<i32>,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("eos_id", &self.eos_id)
            .field("bos_ids", &self.bos_ids)
            .field("stop_ids", &self.stop_ids)
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

/// The `LlamaTokenizer` pipeline transformers 5 builds around a `tokenizer.json`'s BPE vocabulary and
/// merges (see the module documentation), as a change to the file's JSON.
fn rebuild_as_llama_tokenizer(json: &mut Value, settings: &TokenizerSettings) {
    let add_prefix_space = settings.add_prefix_space.unwrap_or(true);
    let prepend_scheme = match (add_prefix_space, settings.legacy.unwrap_or(false)) {
        (false, _) => "never",
        (true, true) => "always",
        (true, false) => "first",
    };
    json["normalizer"] = Value::Null;
    json["pre_tokenizer"] =
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": prepend_scheme, "split": false});
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    json["decoder"] = json!({"type": "Sequence", "decoders": decoders});
    let model = &mut json["model"];
    for (key, value) in [
        ("fuse_unk", json!(true)),
        ("byte_fallback", json!(true)),
        ("unk_token", Value::Null),
        ("dropout", Value::Null),
        ("continuing_subword_prefix", Value::Null),
        ("end_of_word_suffix", Value::Null),
        ("ignore_merges", json!(false)),
    ] {
        model[key] = value;
    }
}

/// Whether transformers 5 rebuilds this `tokenizer.json` as a `LlamaTokenizer`.
fn rebuilt_as_llama(text: &str, json: &Value, settings: &TokenizerSettings) -> bool {
    settings.tokenizer_class.as_deref() == Some("LlamaTokenizer")
        && json["model"]["type"] == "BPE"
        && !text.contains("\"ByteLevel\"")
        && !settings.model_type.as_deref().is_some_and(|t| AS_IS_MODEL_TYPES.contains(&t))
}

/// Fails when the model cannot encode every text: its unknown token is missing from its vocabulary (or a
/// Unigram model has none and no byte fallback), so that `tokenizers` would fail on the first text
/// that needs it.
fn check_unknown_token(inner: &tokenizers::Tokenizer) -> Result<()> {
    use tokenizers::models::ModelWrapper;
    use tokenizers::Model;
    let model = inner.get_model();
    let (kind, unk) = match model {
        ModelWrapper::BPE(bpe) => ("BPE", bpe.unk_token.as_deref()),
        ModelWrapper::WordPiece(wp) => ("WordPiece", Some(wp.unk_token.as_str())),
        ModelWrapper::WordLevel(wl) => ("WordLevel", Some(wl.unk_token.as_str())),
        ModelWrapper::Unigram(u) => {
            // `unk_id` has no getter; the model's serialised form names it.
            let unk_id = serde_json::to_value(u).ok().and_then(|v| v.get("unk_id").and_then(Value::as_u64));
            if unk_id.is_none() && !u.byte_fallback() {
                bail!(
                    "the Unigram model has no `unk_id` and no byte fallback: a text with a character outside its \
                     vocabulary cannot be encoded"
                );
            }
            return Ok(());
        }
    };
    match unk {
        Some(unk) if model.token_to_id(unk).is_none() => bail!(
            "the {kind} model's `unk_token` {unk:?} is not in its vocabulary: a text with a piece outside the \
             vocabulary cannot be encoded (add the token to `model.vocab`, or set `unk_token` to one that is there)"
        ),
        _ => Ok(()),
    }
}

/// The ids the post-processor puts before a text (its BOS), found by encoding a probe with and
/// without special tokens.
fn post_processor_prefix(inner: &tokenizers::Tokenizer) -> Vec<i32> {
    let probe = "a";
    let (Ok(with), Ok(without)) = (inner.encode_fast(probe, true), inner.encode_fast(probe, false)) else {
        return Vec::new();
    };
    let (with, without) = (with.get_ids(), without.get_ids());
    match (0..=with.len().saturating_sub(without.len())).find(|&at| with[at..].starts_with(without)) {
        Some(at) if !without.is_empty() => with[..at].iter().map(|&id| id as i32).collect(),
        _ => Vec::new(),
    }
}

impl HfTokenizer {
    /// Reads `tokenizer.json` alone, as it is: BOS from its post-processor; the EOS token is the first
    /// of `<|endoftext|>` (GPT-2), `</s>`, `<|end_of_text|>`, `<eos>`, `<|eos|>`, `[SEP]` found in the
    /// vocabulary. [`HfTokenizer::from_model_dir`] also reads the files beside it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot read tokenizer: {e}", path.display()))?;
        let eos = EOS_CANDIDATES.iter().find_map(|t| inner.token_to_id(t)).ok_or_else(|| {
            anyhow!("{}: no end-of-sequence token: expected one of {}", path.display(), EOS_CANDIDATES.join(", "))
        })?;
        Self::with_eos_id(inner, eos).with_context(|| format!("{}", path.display()))
    }

    /// Reads `tokenizer.json` with an explicit EOS token.
    pub fn from_file_with_eos(path: &Path, eos_token: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| anyhow!("{}: cannot read tokenizer: {e}", path.display()))?;
        let eos = inner
            .token_to_id(eos_token)
            .ok_or_else(|| anyhow!("{}: EOS token {eos_token:?} is not in the vocabulary", path.display()))?;
        Self::with_eos_id(inner, eos).with_context(|| format!("{}", path.display()))
    }

    fn with_eos_id(inner: tokenizers::Tokenizer, eos: u32) -> Result<Self> {
        check_unknown_token(&inner)?;
        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0).max(inner.get_vocab_size(true));
        if vocab_size == 0 {
            bail!("empty vocabulary");
        }
        if vocab_size > i32::MAX as usize {
            bail!("vocabulary of {vocab_size} tokens does not fit i32 ids");
        }
        let bos_ids = post_processor_prefix(&inner);
        Ok(HfTokenizer { inner, eos_id: eos as i32, vocab_size, bos_ids, stop_ids: vec![eos as i32] })
    }

    /// Reads a model directory's `tokenizer.json` with the settings beside it, as transformers 5
    /// does (see the module documentation).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let settings = TokenizerSettings::read(dir)?;
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: cannot read tokenizer: invalid JSON", path.display()))?;
        if rebuilt_as_llama(&text, &json, &settings) {
            rebuild_as_llama_tokenizer(&mut json, &settings);
        }
        let inner = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&json)?)
            .map_err(|e| anyhow!("{}: cannot read tokenizer: {e}", path.display()))?;
        Self::with_settings(inner, &settings, BosSource::PostProcessor).with_context(|| format!("{}", dir.display()))
    }

    /// EOS, BOS and the stop ids from `settings` (see the module documentation).
    fn with_settings(mut inner: tokenizers::Tokenizer, settings: &TokenizerSettings, bos: BosSource) -> Result<Self> {
        inner.set_encode_special_tokens(settings.split_special_tokens);
        let named = |name: &str| -> Result<Option<u32>> {
            match settings.token(name) {
                None => Ok(None),
                Some(token) => inner.token_to_id(token).map(Some).ok_or_else(|| {
                    anyhow!(
                        "the {name} {token:?} of tokenizer_config.json (or special_tokens_map.json) is not in \
                         the vocabulary"
                    )
                }),
            }
        };
        let eos = match (named("eos_token")?, settings.generation_eos_ids.first()) {
            (Some(id), _) | (None, Some(&id)) => id,
            (None, None) => EOS_CANDIDATES.iter().find_map(|t| inner.token_to_id(t)).ok_or_else(|| {
                anyhow!(
                    "no end-of-sequence token: no eos_token in tokenizer_config.json, no eos_token_id in \
                     generation_config.json, and none of {} in the vocabulary",
                    EOS_CANDIDATES.join(", ")
                )
            })?,
        };
        let config_bos = match (bos, settings.add_bos_token, named("bos_token")?) {
            (BosSource::AddBosToken, Some(true), Some(id)) => vec![id as i32],
            _ => Vec::new(),
        };
        let mut tok = Self::with_eos_id(inner, eos)?;
        if bos == BosSource::AddBosToken {
            tok.bos_ids = config_bos;
        }
        for &id in &settings.generation_eos_ids {
            if id as usize >= tok.vocab_size {
                bail!(
                    "generation_config.json: eos_token_id {id} is outside the vocabulary ({} tokens)",
                    tok.vocab_size
                );
            }
            if !tok.stop_ids.contains(&(id as i32)) {
                tok.stop_ids.push(id as i32);
            }
        }
        Ok(tok)
    }

    /// A GPT-2 byte-level BPE tokenizer from the older `vocab.json` + `merges.txt` pair, EOS
    /// `<|endoftext|>`.
    pub fn from_gpt2_files(vocab: &Path, merges: &Path) -> Result<Self> {
        byte_level_bpe(vocab, merges, &TokenizerSettings::default()).and_then(|inner| {
            let eos = inner
                .token_to_id("<|endoftext|>")
                .ok_or_else(|| anyhow!("{}: no <|endoftext|> token", vocab.display()))?;
            Self::with_eos_id(inner, eos).with_context(|| format!("{}", vocab.display()))
        })
    }

    /// A model directory's `vocab.json` + `merges.txt` pair, built for its tokenizer class (GPT-2's
    /// or Qwen2's byte-level BPE: `data::vocab_merges`), with the settings beside the files.
    fn from_vocab_merges_dir(dir: &Path, vocab: &Path, merges: &Path) -> Result<Self> {
        let settings = TokenizerSettings::read(dir)?;
        let inner = byte_level_bpe(vocab, merges, &settings)?;
        Self::with_settings(inner, &settings, BosSource::AddBosToken).with_context(|| format!("{}", dir.display()))
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl TextTokenizer for HfTokenizer {
    /// Encodes without special tokens.
    ///
    /// # Panics
    /// When `tokenizers` fails: dropping the text silently would corrupt the data. Reading a tokenizer
    /// refuses the models that could (an unknown token missing from the vocabulary, a Unigram model
    /// with neither `unk_id` nor byte fallback), so no input file leads here.
    fn encode(&self, s: &str) -> Vec<i32> {
        match self.inner.encode_fast(s, false) {
            Ok(enc) => enc.get_ids().iter().map(|&id| id as i32).collect(),
            Err(e) => panic!("tokenizer cannot encode {s:?}: {e}"),
        }
    }

    fn decode(&self, ids: &[i32]) -> String {
        let ids: Vec<u32> = ids.iter().filter(|&&id| id >= 0).map(|&id| id as u32).collect();
        self.inner.decode(&ids, true).unwrap_or_default()
    }

    fn eos_id(&self) -> i32 {
        self.eos_id
    }

    fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    fn bos_ids(&self) -> &[i32] {
        &self.bos_ids
    }

    fn stop_ids(&self) -> Vec<i32> {
        self.stop_ids.clone()
    }

    fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// The tokenizer of a model directory: its `tokenizer.json` when there is one, else a byte-level BPE
/// `vocab.json` + `merges.txt` pair (GPT-2's or Qwen2's, `data::vocab_merges`), each with the
/// settings beside it (see the module documentation), else the built-in [`ByteTokenizer`] (also when
/// no directory is given); a directory with another tokenizer file and no `tokenizer.json`
/// (`tokenizer.model`, `tekken.json`, half of the pair) is an error. Callers should check that
/// `vocab_size()` fits the model's vocabulary.
pub fn load_tokenizer(model_dir: Option<&Path>) -> Result<Box<dyn TextTokenizer>> {
    if let Some(dir) = model_dir {
        if dir.join("tokenizer.json").is_file() {
            return Ok(Box::new(HfTokenizer::from_model_dir(dir)?));
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Ok(Box::new(HfTokenizer::from_vocab_merges_dir(dir, &vocab, &merges)?));
        }
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        check_no_unread_tokenizer(dir)?;
    }
    Ok(Box::new(ByteTokenizer))
}
