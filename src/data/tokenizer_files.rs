//! The tokenizer files a model directory carries, so that the directory alone says how text becomes its
//! token ids, for this crate and for `transformers` alike:
//! - a tokenizer of its own (`tokenizer.json`, or `vocab.json` + `merges.txt`) and the files beside it
//!   (`tokenizer_config.json`, `special_tokens_map.json`, `chat_template.jinja`,
//!   `generation_config.json`), copied from the directory the model came from;
//! - else the built-in [`ByteTokenizer`], written as a `tokenizer.json` that gives every text the same
//!   ids: a byte-level BPE without merges (the 256 bytes in GPT-2's byte-level alphabet, id = byte)
//!   with `<s>` (256) and `</s>` (257) as special tokens, and a `tokenizer_config.json` naming them,
//!   with `split_special_tokens` so that the text `</s>` stays four bytes, as the byte tokenizer
//!   encodes it;
//! - `generation_config.json`, when there is none, with the tokenizer's BOS and EOS ids;
//! - in `config.json`, `bos_token_id` and `eos_token_id` of the tokenizer (GPT-2's writer puts the
//!   last id of the vocabulary there, whatever the tokenizer; the Llama family's keep the ones the
//!   model came with and get the tokenizer's only where they have none).
//!
//! [`check_same_tokenizer`] holds a reference model's own tokenizer to the policy's.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use super::tokenizer::{load_tokenizer, ByteTokenizer, TextTokenizer};
use super::tokenizer_config::{GENERATION_CONFIG_FILE, MODEL_CONFIG_FILE, TOKENIZER_CONFIG_FILE};
use crate::util::write_atomic;

/// The files of a model directory that say how it tokenizes (copied with the model).
pub const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    TOKENIZER_CONFIG_FILE,
    "special_tokens_map.json",
    "chat_template.jinja",
    GENERATION_CONFIG_FILE,
];

/// Whether `dir` has a tokenizer of its own (`tokenizer.json`, or `vocab.json` + `merges.txt`);
/// [`load_tokenizer`] reads the byte tokenizer for a directory without one.
pub fn has_own_tokenizer(dir: &Path) -> bool {
    dir.join("tokenizer.json").is_file() || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file())
}

/// Where the tokenizer of `dir` comes from, for messages: `DIR/tokenizer.json`, `DIR/vocab.json +
/// merges.txt`, or the built-in byte tokenizer.
pub fn tokenizer_source(dir: Option<&Path>) -> String {
    match dir {
        Some(d) if d.join("tokenizer.json").is_file() => d.join("tokenizer.json").display().to_string(),
        Some(d) if has_own_tokenizer(d) => format!("{} + merges.txt", d.join("vocab.json").display()),
        _ => "the built-in byte tokenizer".to_string(),
    }
}

fn byte_level(add_prefix_space: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": false, "use_regex": false})
}

/// The [`ByteTokenizer`] as a `tokenizer.json` (see the module documentation), in the form the
/// `tokenizers` library writes it.
pub fn byte_tokenizer_json() -> Result<String> {
    let mut vocab = Map::new();
    for b in 0..=255u8 {
        vocab.insert(ByteTokenizer::byte_char(b).to_string(), json!(b));
    }
    let special = |id: i32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    for (id, content) in
        [(ByteTokenizer::BOS, ByteTokenizer::BOS_TOKEN), (ByteTokenizer::EOS, ByteTokenizer::EOS_TOKEN)]
    {
        vocab.insert(content.to_string(), json!(id));
    }
    let file = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            special(ByteTokenizer::BOS, ByteTokenizer::BOS_TOKEN),
            special(ByteTokenizer::EOS, ByteTokenizer::EOS_TOKEN),
        ],
        "normalizer": null,
        "pre_tokenizer": byte_level(false),
        "post_processor": null,
        "decoder": byte_level(false),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": [],
        },
    });
    let tokenizer = tokenizers::Tokenizer::from_bytes(serde_json::to_vec(&file)?)
        .map_err(|e| anyhow!("building the byte tokenizer's tokenizer.json: {e}"))?;
    let mut text =
        tokenizer.to_string(true).map_err(|e| anyhow!("writing the byte tokenizer's tokenizer.json: {e}"))?;
    text.push('\n');
    Ok(text)
}

/// The `tokenizer_config.json` beside [`byte_tokenizer_json`]: the generic class (no class-specific
/// rebuilding), the special tokens, no BOS put before a text, special-token text encoded as text.
pub fn byte_tokenizer_config() -> String {
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": ByteTokenizer::BOS_TOKEN,
        "eos_token": ByteTokenizer::EOS_TOKEN,
        "add_bos_token": false,
        "add_eos_token": false,
        "split_special_tokens": true,
        "clean_up_tokenization_spaces": false,
    });
    let mut text = serde_json::to_string_pretty(&config).expect("a JSON value always serialises");
    text.push('\n');
    text
}

/// Writes into the model directory `dst` the tokenizer files of the model that came from `src`, whose
/// tokenizer is `tok` (`src` `None` or without a tokenizer of its own: the byte tokenizer's files when
/// `tok` is the byte tokenizer, none for a tokenizer set otherwise), the generation configuration when
/// there is none, and the tokenizer's BOS and EOS ids in `dst`'s `config.json` (see the module
/// documentation).
pub fn save_tokenizer_files(tok: &dyn TextTokenizer, src: Option<&Path>, dst: &Path) -> Result<()> {
    let own = src.filter(|dir| has_own_tokenizer(dir));
    // Also when read back from its own tokenizer.json (whose BOS is no longer known as such).
    let is_byte = tokenizer_difference(tok, &ByteTokenizer).is_none();
    if let Some(src) = own {
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.is_file() && from != dst.join(f) {
                let bytes = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
                write_atomic(&dst.join(f), &bytes)?;
            }
        }
    } else if is_byte {
        write_atomic(&dst.join("tokenizer.json"), byte_tokenizer_json()?.as_bytes())?;
        write_atomic(&dst.join(TOKENIZER_CONFIG_FILE), byte_tokenizer_config().as_bytes())?;
    }
    let bos = match tok.bos_ids().first() {
        Some(&id) => Some(id),
        None if is_byte => Some(ByteTokenizer::BOS),
        None => None,
    };
    let generation = dst.join(GENERATION_CONFIG_FILE);
    if !generation.is_file() {
        let mut config = Map::new();
        if let Some(bos) = bos {
            config.insert("bos_token_id".into(), json!(bos));
        }
        config.insert("eos_token_id".into(), json!(tok.eos_id()));
        write_json(&generation, &Value::Object(config))?;
    }
    set_config_token_ids(&dst.join(MODEL_CONFIG_FILE), bos, tok.eos_id())
}

/// Sets `config.json`'s `bos_token_id` and `eos_token_id`: always for GPT-2 (BOS, else EOS, as GPT-2's
/// single `<|endoftext|>`), where they are missing for the other families (BOS only when there is one).
fn set_config_token_ids(path: &Path, bos: Option<i32>, eos: i32) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut config: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let obj = config.as_object_mut().ok_or_else(|| anyhow!("{}: expected a JSON object", path.display()))?;
    let gpt2 = obj.get("model_type").and_then(Value::as_str) == Some("gpt2");
    let bos = if gpt2 { Some(bos.unwrap_or(eos)) } else { bos };
    let mut changed = false;
    for (key, id) in [("bos_token_id", bos), ("eos_token_id", Some(eos))] {
        let Some(id) = id else { continue };
        if gpt2 || obj.get(key).is_none_or(Value::is_null) {
            changed |= obj.insert(key.to_string(), json!(id)) != Some(json!(id));
        }
    }
    match changed {
        true => write_json(path, &config),
        false => Ok(()),
    }
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("a JSON value always serialises");
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Where two tokenizers first differ (vocabulary size, EOS, BOS, the spelling of an id), if they do.
pub fn tokenizer_difference(a: &dyn TextTokenizer, b: &dyn TextTokenizer) -> Option<String> {
    if a.vocab_size() != b.vocab_size() {
        return Some(format!("vocabularies of {} and {} tokens", a.vocab_size(), b.vocab_size()));
    }
    if a.eos_id() != b.eos_id() {
        return Some(format!("EOS ids {} and {}", a.eos_id(), b.eos_id()));
    }
    if a.bos_ids() != b.bos_ids() {
        return Some(format!("BOS ids {:?} and {:?}", a.bos_ids(), b.bos_ids()));
    }
    (0..a.vocab_size() as u32).find_map(|id| {
        let (x, y) = (a.id_to_token(id), b.id_to_token(id));
        (x != y).then(|| format!("id {id} is {x:?} in one and {y:?} in the other"))
    })
}

/// Fails when `reference_dir` has a tokenizer of its own that differs from the policy's `policy`
/// (read from `policy_dir`): the reference scores the policy's token ids, so it must read them as the
/// same tokens. A reference directory without a tokenizer passes.
pub fn check_same_tokenizer(policy: &dyn TextTokenizer, policy_dir: Option<&Path>, reference_dir: &Path) -> Result<()> {
    if !has_own_tokenizer(reference_dir) || policy_dir == Some(reference_dir) {
        return Ok(());
    }
    let reference = load_tokenizer(Some(reference_dir))
        .with_context(|| format!("reading the reference's tokenizer in {}", reference_dir.display()))?;
    if let Some(difference) = tokenizer_difference(policy, reference.as_ref()) {
        bail!(
            "the reference's tokenizer ({}) differs from the policy's ({}): {difference}; the reference scores \
             the policy's token ids, so both need the same vocabulary and ids",
            tokenizer_source(Some(reference_dir)),
            tokenizer_source(policy_dir)
        );
    }
    Ok(())
}
