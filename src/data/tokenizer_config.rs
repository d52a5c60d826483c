//! What a Hugging Face model directory says about its tokenizer besides `tokenizer.json`:
//! `tokenizer_config.json` (the tokenizer class, the special tokens, `add_bos_token`, the chat
//! template), `chat_template.jinja` (where transformers 5 writes the template), `special_tokens_map.json`
//! (older directories), `generation_config.json` (the end-of-sequence ids generation stops at) and
//! `config.json`'s model type (from which transformers picks the tokenizer class).
//!
//! Every file is optional; a file that is there but malformed is an error naming it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";
pub const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const MODEL_CONFIG_FILE: &str = "config.json";

/// The named special tokens transformers passes to chat templates (`bos_token`, …), in its order.
const NAMED_SPECIAL_TOKENS: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A chat template and the file it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTemplateSource {
    pub source: String,
    pub path: PathBuf,
}

/// A token of `tokenizer_config.json`'s `added_tokens_decoder` (id → token): what transformers adds
/// to a tokenizer it builds from `vocab.json` + `merges.txt` (a `tokenizer.json` carries its own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedTokenEntry {
    pub id: u32,
    pub content: String,
    pub special: bool,
    pub single_word: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    pub normalized: bool,
}

impl AddedTokenEntry {
    /// The token as `tokenizers` takes it.
    pub fn to_added_token(&self) -> tokenizers::AddedToken {
        tokenizers::AddedToken::from(self.content.clone(), self.special)
            .single_word(self.single_word)
            .lstrip(self.lstrip)
            .rstrip(self.rstrip)
            .normalized(self.normalized)
    }
}

/// The tokenizer settings of a model directory (all absent for a directory without the files).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerSettings {
    /// The directory they were read from.
    pub dir: PathBuf,
    /// `tokenizer_config.json`'s `tokenizer_class`, without a `Fast` suffix.
    pub tokenizer_class: Option<String>,
    /// `config.json`'s `model_type`.
    pub model_type: Option<String>,
    /// Special tokens by name (`bos_token` → `<s>`): the named ones, then any other `*_token` key whose
    /// value is a token (transformers 5 passes both to chat templates). A token set to `null` is left out.
    pub special_tokens: Vec<(String, String)>,
    /// `add_bos_token` (transformers reads it only when there is no `tokenizer.json`).
    pub add_bos_token: Option<bool>,
    /// `legacy` and `add_prefix_space` (how `LlamaTokenizer` prepends `▁`).
    pub legacy: Option<bool>,
    pub add_prefix_space: Option<bool>,
    /// `split_special_tokens`: special-token text in the input is encoded as text, not as the token
    /// (transformers sets the `tokenizers` tokenizer's `encode_special_tokens` from it).
    pub split_special_tokens: bool,
    /// `generation_config.json`'s `eos_token_id` (an id or a list of ids).
    pub generation_eos_ids: Vec<u32>,
    /// The chat template: `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`.
    pub chat_template: Option<ChatTemplateSource>,
    /// `added_tokens_decoder`, by increasing id.
    pub added_tokens: Vec<AddedTokenEntry>,
}

fn read_json(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    match serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))? {
        Value::Object(map) => Ok(Some(map)),
        _ => bail!("{}: expected a JSON object", path.display()),
    }
}

/// A special token's text: a string, or an `AddedToken` object (`{"content": "<s>", …}`).
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn optional_bool(map: &Map<String, Value>, key: &str, path: &Path) -> Result<Option<bool>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => bail!("{}: `{key}` must be true or false, got {other}", path.display()),
    }
}

/// The defaults of the tokenizer classes whose special tokens templates may read without the
/// configuration naming them (transformers' `LlamaTokenizer` and `Qwen2Tokenizer` arguments).
fn class_defaults(class: &str) -> &'static [(&'static str, &'static str)] {
    match class {
        "LlamaTokenizer" => &[("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>")],
        "Qwen2Tokenizer" => {
            &[("eos_token", "<|endoftext|>"), ("unk_token", "<|endoftext|>"), ("pad_token", "<|endoftext|>")]
        }
        _ => &[],
    }
}

impl TokenizerSettings {
    /// Reads the settings of `dir` (see the module documentation).
    pub fn read(dir: &Path) -> Result<Self> {
        let mut settings = TokenizerSettings { dir: dir.to_path_buf(), ..Default::default() };
        let config_path = dir.join(TOKENIZER_CONFIG_FILE);
        let config = read_json(&config_path)?.unwrap_or_default();
        settings.tokenizer_class = config
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .map(|c| c.strip_suffix("Fast").unwrap_or(c).to_string());
        settings.add_bos_token = optional_bool(&config, "add_bos_token", &config_path)?;
        settings.legacy = optional_bool(&config, "legacy", &config_path)?;
        settings.add_prefix_space = optional_bool(&config, "add_prefix_space", &config_path)?;
        settings.split_special_tokens = optional_bool(&config, "split_special_tokens", &config_path)?.unwrap_or(false);
        settings.read_special_tokens(&config)?;
        settings.added_tokens = added_tokens(&config, &config_path)?;
        settings.chat_template = chat_template(dir, &config, &config_path)?;
        if let Some(model_config) = read_json(&dir.join(MODEL_CONFIG_FILE))? {
            settings.model_type = model_config.get("model_type").and_then(Value::as_str).map(str::to_string);
        }
        let generation_path = dir.join(GENERATION_CONFIG_FILE);
        if let Some(generation) = read_json(&generation_path)? {
            settings.generation_eos_ids = match generation.get("eos_token_id") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(ids)) => ids.iter().map(|v| token_id(v, &generation_path)).collect::<Result<_>>()?,
                Some(v) => vec![token_id(v, &generation_path)?],
            };
        }
        Ok(settings)
    }

    /// The named tokens of `tokenizer_config.json`, else of `special_tokens_map.json` (which
    /// transformers reads only when the configuration has no `added_tokens_decoder`), else the class's
    /// defaults; then the configuration's other `*_token` keys.
    fn read_special_tokens(&mut self, config: &Map<String, Value>) -> Result<()> {
        let legacy_map = match config.contains_key("added_tokens_decoder") {
            true => None,
            false => read_json(&self.dir.join(SPECIAL_TOKENS_MAP_FILE))?,
        };
        let defaults = class_defaults(self.tokenizer_class.as_deref().unwrap_or(""));
        for name in NAMED_SPECIAL_TOKENS {
            let value = match (config.get(name), legacy_map.as_ref().and_then(|m| m.get(name))) {
                (Some(v), _) | (None, Some(v)) => token_content(v),
                (None, None) => defaults.iter().find(|(n, _)| *n == name).map(|(_, t)| t.to_string()),
            };
            if let Some(content) = value {
                self.special_tokens.push((name.to_string(), content));
            }
        }
        for (key, value) in config {
            let named = NAMED_SPECIAL_TOKENS.contains(&key.as_str());
            if key.ends_with("_token") && !named && matches!(value, Value::String(_) | Value::Object(_)) {
                if let Some(content) = token_content(value) {
                    self.special_tokens.push((key.clone(), content));
                }
            }
        }
        Ok(())
    }

    /// The text of the special token `name` (`eos_token`, …).
    pub fn token(&self, name: &str) -> Option<&str> {
        self.special_tokens.iter().find(|(n, _)| n == name).map(|(_, t)| t.as_str())
    }
}

/// `added_tokens_decoder`: `{"151643": {"content": "<|endoftext|>", "special": true, …}, …}` (an
/// object per id as transformers writes it; the flags default as `AddedToken`'s do), by increasing id.
fn added_tokens(config: &Map<String, Value>, path: &Path) -> Result<Vec<AddedTokenEntry>> {
    let Some(decoder) = config.get("added_tokens_decoder") else { return Ok(Vec::new()) };
    let Value::Object(entries) = decoder else {
        bail!("{}: `added_tokens_decoder` must map token ids to tokens, got {decoder}", path.display())
    };
    let mut tokens = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let id: u32 = key
            .parse()
            .with_context(|| format!("{}: `added_tokens_decoder` key {key:?} is not a token id", path.display()))?;
        let content = token_content(value).with_context(|| {
            format!("{}: `added_tokens_decoder` entry {key}: expected a token, got {value}", path.display())
        })?;
        let flag = |name: &str, default: bool| value.get(name).and_then(Value::as_bool).unwrap_or(default);
        let special = flag("special", false);
        tokens.push(AddedTokenEntry {
            id,
            content,
            special,
            single_word: flag("single_word", false),
            lstrip: flag("lstrip", false),
            rstrip: flag("rstrip", false),
            normalized: flag("normalized", !special),
        });
    }
    tokens.sort_by_key(|t| t.id);
    Ok(tokens)
}

fn token_id(value: &Value, path: &Path) -> Result<u32> {
    value.as_u64().and_then(|id| u32::try_from(id).ok()).with_context(|| {
        format!("{}: `eos_token_id` must be a token id or a list of them, got {value}", path.display())
    })
}

/// `chat_template.jinja` when there is one (transformers 5 prefers it), else the configuration's
/// `chat_template`: a string, or a list of named templates of which `default` is taken.
fn chat_template(dir: &Path, config: &Map<String, Value>, config_path: &Path) -> Result<Option<ChatTemplateSource>> {
    let file = dir.join(CHAT_TEMPLATE_FILE);
    if file.is_file() {
        let source = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        return Ok(Some(ChatTemplateSource { source, path: file }));
    }
    let source = match config.get("chat_template") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(named)) => {
            let default = named.iter().find(|t| t.get("name").and_then(Value::as_str) == Some("default"));
            match default.and_then(|t| t.get("template")).and_then(Value::as_str) {
                Some(s) => s.to_string(),
                None => {
                    bail!("{}: `chat_template` lists named templates but none named \"default\"", config_path.display())
                }
            }
        }
        Some(other) => bail!("{}: `chat_template` must be a string, got {other}", config_path.display()),
    };
    Ok(Some(ChatTemplateSource { source, path: config_path.to_path_buf() }))
}
