//! Tokenizers: Hugging Face `tokenizer.json` (GPT-2 byte-level BPE and others) through the
//! `tokenizers` crate, and a built-in byte tokenizer for tiny models and tests.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

/// Text ↔ token ids. Encoding never adds special tokens; callers append EOS where a text ends.
pub trait TextTokenizer: Send + Sync {
    fn encode(&self, s: &str) -> Vec<i32>;
    /// Decodes ids to text; special tokens are left out and invalid byte sequences are replaced
    /// (lossy), so any id sequence decodes.
    fn decode(&self, ids: &[i32]) -> String;
    fn eos_id(&self) -> i32;
    /// One more than the largest id `encode` or `eos_id` can return.
    fn vocab_size(&self) -> usize;
}

/// Bytes as tokens: ids 0..=255 are the UTF-8 bytes, 256 is BOS, 257 is EOS (vocabulary 258).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

impl ByteTokenizer {
    pub const BOS: i32 = 256;
    pub const EOS: i32 = 257;
    pub const VOCAB_SIZE: usize = 258;
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
}

/// End-of-sequence tokens looked for, in order, when a `tokenizer.json` names none explicitly.
const EOS_CANDIDATES: [&str; 6] = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]"];

/// A Hugging Face tokenizer read from `tokenizer.json`.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    eos_id: i32,
    vocab_size: usize,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer").field("eos_id", &self.eos_id).field("vocab_size", &self.vocab_size).finish()
    }
}

impl HfTokenizer {
    /// Reads `tokenizer.json`. The EOS token is the first of `<|endoftext|>` (GPT-2), `</s>`,
    /// `<|end_of_text|>`, `<eos>`, `<|eos|>`, `[SEP]` found in the vocabulary.
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
        let vocab = inner.get_vocab(true);
        let vocab_size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0).max(inner.get_vocab_size(true));
        if vocab_size == 0 {
            bail!("empty vocabulary");
        }
        if vocab_size > i32::MAX as usize {
            bail!("vocabulary of {vocab_size} tokens does not fit i32 ids");
        }
        Ok(HfTokenizer { inner, eos_id: eos as i32, vocab_size })
    }

    /// A GPT-2 byte-level BPE tokenizer from the older `vocab.json` + `merges.txt` pair, EOS
    /// `<|endoftext|>`.
    pub fn from_gpt2_files(vocab: &Path, merges: &Path) -> Result<Self> {
        use tokenizers::decoders::byte_level::ByteLevel;
        let bpe = tokenizers::models::bpe::BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(|e| anyhow!("{} + {}: cannot read BPE tokenizer: {e}", vocab.display(), merges.display()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)));
        inner.with_decoder(Some(ByteLevel::default()));
        // GPT-2's vocab.json lists <|endoftext|> as a plain entry; make it special so that decoding
        // skips it and the text "<|endoftext|>" maps to the single id, as tokenizer.json does.
        inner.add_special_tokens(&[tokenizers::AddedToken::from("<|endoftext|>", true)]);
        let eos =
            inner.token_to_id("<|endoftext|>").ok_or_else(|| anyhow!("{}: no <|endoftext|> token", vocab.display()))?;
        Self::with_eos_id(inner, eos).with_context(|| format!("{}", vocab.display()))
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
    /// When `tokenizers` fails, which a byte-level tokenizer never does (a model without byte fallback
    /// or unknown token can meet a word it cannot tokenize): dropping the text silently would corrupt
    /// the data.
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
}

/// The tokenizer of a model directory: its `tokenizer.json` when there is one, else a GPT-2
/// `vocab.json` + `merges.txt` pair, else the built-in [`ByteTokenizer`] (also when no directory is
/// given). Callers should check that `vocab_size()` fits the model's vocabulary.
pub fn load_tokenizer(model_dir: Option<&Path>) -> Result<Box<dyn TextTokenizer>> {
    if let Some(dir) = model_dir {
        let path = dir.join("tokenizer.json");
        if path.is_file() {
            return Ok(Box::new(HfTokenizer::from_file(&path)?));
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Ok(Box::new(HfTokenizer::from_gpt2_files(&vocab, &merges)?));
        }
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
    }
    Ok(Box::new(ByteTokenizer))
}
