//! Byte-level BPE tokenizers from `vocab.json` + `merges.txt` without a `tokenizer.json`
//! (`data::vocab_merges`): Qwen2's pipeline (its class named, or its model type) against the
//! `tokenizer.json` Qwen2 ships for the same vocabulary and merges, read by the `tokenizers` crate;
//! `added_tokens_decoder` at its ids; the classes and files not read named in errors; and an
//! `#[ignore]`d check of the ids against `transformers` (needs /work/torchenv or
//! `SAFEDPO_TORCH_PYTHON`).

use super::tokenize::gpt2_byte_chars;
use super::*;

/// Texts whose ids tell the pipelines apart: digit runs (Qwen2 splits every digit), contractions,
/// newlines, spaces, a composed and a decomposed accent (NFC), special-token text.
const TEXTS: [&str; 7] = [
    "the cat sat on 12345 mats",
    "it's 42, isn't it?\n\nok  then",
    "  leading and trailing  ",
    "caf\u{e9} vs cafe\u{301}",
    "<|im_start|>user\nhi 12<|im_end|>\n",
    "tabs\tand\r\nreturns",
    "<|endoftext|>",
];

/// A tiny vocabulary: the 256 byte symbols, merges that digits and words use, nothing special (the
/// special tokens live in `added_tokens_decoder`, as Qwen2's do).
fn tiny_vocab() -> (BTreeMap<String, u32>, Vec<(String, String)>) {
    let mut vocab: BTreeMap<String, u32> = BTreeMap::new();
    for (b, c) in gpt2_byte_chars().iter().enumerate() {
        vocab.insert(c.to_string(), b as u32);
    }
    let merges: Vec<(String, String)> = [
        ("1", "2"),
        ("12", "3"),
        ("Ġ", "t"),
        ("h", "e"),
        ("Ġt", "he"),
        ("a", "t"),
        ("Ġc", "at"),
        ("Ġ", "c"),
        ("'", "s"),
        ("i", "t"),
        ("Ċ", "Ċ"),
        ("Ġ", "Ġ"),
        ("c", "a"),
        ("ca", "f"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    for (a, b) in &merges {
        let id = vocab.len() as u32;
        vocab.entry(format!("{a}{b}")).or_insert(id);
    }
    (vocab, merges)
}

/// The special tokens after the vocabulary, as Qwen2's `added_tokens_decoder` lists them.
fn added(first_id: usize) -> Vec<(u32, &'static str)> {
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| ((first_id + i) as u32, *t))
        .collect()
}

fn tokenizer_config(class: Option<&str>, added: &[(u32, &str)], eos: &str) -> Value {
    let decoder: serde_json::Map<String, Value> = added
        .iter()
        .map(|(id, t)| {
            let entry = json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false,
                               "single_word": false, "special": true});
            (id.to_string(), entry)
        })
        .collect();
    let mut config = json!({"added_tokens_decoder": decoder, "eos_token": eos, "pad_token": "<|endoftext|>",
                            "bos_token": null, "model_max_length": 32768});
    if let Some(class) = class {
        config["tokenizer_class"] = json!(class);
    }
    config
}

/// `tokenizer.json` as Qwen2 ships it (`Qwen/Qwen2-0.5B`'s layout) for `vocab` and `merges`.
fn qwen2_tokenizer_json(vocab: &BTreeMap<String, u32>, merges: &[(String, String)], added: &[(u32, &str)]) -> Value {
    let added_tokens: Vec<Value> = added
        .iter()
        .map(|(id, t)| {
            json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": safedpo::data::vocab_merges::QWEN2_PRETOKENIZE_REGEX}, "behavior": "Isolated",
             "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
    })
}

fn write_json(path: &Path, value: &Value) {
    fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

/// A model directory with `vocab.json`, `merges.txt` and `tokenizer_config.json` (and `config.json`'s
/// model type, when given).
fn vocab_merges_dir(root: &Path, name: &str, config: &Value, model_type: Option<&str>) -> PathBuf {
    let (vocab, merges) = tiny_vocab();
    let dir = root.join(name);
    fs::create_dir(&dir).unwrap();
    write_json(&dir.join("vocab.json"), &json!(vocab));
    let lines: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
    fs::write(dir.join("merges.txt"), format!("#version: 0.2\n{}\n", lines.join("\n"))).unwrap();
    write_json(&dir.join("tokenizer_config.json"), config);
    if let Some(model_type) = model_type {
        write_json(&dir.join("config.json"), &json!({"model_type": model_type}));
    }
    dir
}

/// Qwen2's directory without `tokenizer.json` reads with the ids of its `tokenizer.json`.
#[test]
fn qwen2_from_vocab_and_merges_matches_its_tokenizer_json() {
    let root = tempfile::tempdir().unwrap();
    let (vocab, merges) = tiny_vocab();
    let added = added(vocab.len());
    let config = tokenizer_config(Some("Qwen2TokenizerFast"), &added, "<|im_end|>");
    let with_json = root.path().join("with-json");
    fs::create_dir(&with_json).unwrap();
    write_json(&with_json.join("tokenizer.json"), &qwen2_tokenizer_json(&vocab, &merges, &added));
    write_json(&with_json.join("tokenizer_config.json"), &config);
    let want = load_tokenizer(Some(&with_json)).unwrap();

    let by_class = vocab_merges_dir(root.path(), "by-class", &config, None);
    let mut untyped = config.clone();
    untyped.as_object_mut().unwrap().remove("tokenizer_class");
    let by_model_type = vocab_merges_dir(root.path(), "by-model-type", &untyped, Some("qwen2"));
    for dir in [&by_class, &by_model_type] {
        let got = load_tokenizer(Some(dir)).unwrap();
        for text in TEXTS {
            let ids = got.encode(text);
            assert_eq!(ids, want.encode(text), "{}: {text:?}", dir.display());
            let plain = text.replace("<|im_start|>", "").replace("<|im_end|>", "").replace("<|endoftext|>", "");
            assert_eq!(got.decode(&ids), want.decode(&ids), "{text:?} decoded");
            assert_eq!(got.decode(&got.encode(&plain)), want.decode(&want.encode(&plain)));
        }
        assert_eq!((got.eos_id(), got.vocab_size(), got.bos_ids()), (want.eos_id(), want.vocab_size(), want.bos_ids()));
        assert_eq!(got.eos_id(), added[2].0 as i32, "eos_token <|im_end|>");
        assert_eq!(got.encode("<|im_start|>"), vec![added[1].0 as i32]);
        assert_eq!(got.vocab_size(), vocab.len() + 3);
    }
    // Qwen2 splits every digit; GPT-2's regex keeps " 12345" whole and merges "123".
    let qwen2 = load_tokenizer(Some(&by_class)).unwrap();
    let gpt2_config = tokenizer_config(Some("GPT2Tokenizer"), &added, "<|endoftext|>");
    let gpt2 = load_tokenizer(Some(&vocab_merges_dir(root.path(), "gpt2", &gpt2_config, None))).unwrap();
    let digit = |d: &str| vocab[d] as i32;
    assert_eq!(qwen2.encode("12345"), ["1", "2", "3", "4", "5"].map(digit).to_vec());
    assert_eq!(gpt2.encode("12345"), vec![vocab["123"] as i32, digit("4"), digit("5")]);
    assert_eq!(gpt2.eos_id(), added[0].0 as i32);
}

/// `added_tokens_decoder` ids that the tokenizer cannot give (a gap after the vocabulary), a class
/// that is not byte-level BPE, and tokenizer files safedpo does not build from are errors naming
/// them, not a silent byte tokenizer.
#[test]
fn what_vocab_and_merges_cannot_make_is_named() {
    let root = tempfile::tempdir().unwrap();
    let vocab_len = tiny_vocab().0.len();
    let gap: Vec<(u32, &str)> = vec![(vocab_len as u32 + 5, "<|endoftext|>")];
    let dir =
        vocab_merges_dir(root.path(), "gap", &tokenizer_config(Some("Qwen2Tokenizer"), &gap, "<|endoftext|>"), None);
    let err = format!("{:#}", load_tokenizer(Some(&dir)).err().expect("a gap must fail"));
    assert!(err.contains("added_tokens_decoder") && err.contains(&format!("id {}", vocab_len + 5)), "{err}");

    let llama = tokenizer_config(Some("LlamaTokenizer"), &added(vocab_len), "<|endoftext|>");
    let dir = vocab_merges_dir(root.path(), "llama", &llama, None);
    let err = format!("{:#}", load_tokenizer(Some(&dir)).err().expect("LlamaTokenizer must fail"));
    assert!(err.contains("LlamaTokenizer") && err.contains("tokenizer.json"), "{err}");

    for (file, what) in [("tokenizer.model", "SentencePiece"), ("tekken.json", "tekken"), ("vocab.json", "merges.txt")]
    {
        let dir = root.path().join(file.replace('.', "-"));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(file), b"{}").unwrap();
        let err = format!("{:#}", load_tokenizer(Some(&dir)).err().expect("an unread tokenizer file must fail"));
        assert!(err.contains(file) && err.contains(what) && err.contains("no tokenizer.json"), "{err}");
    }
    // A directory without tokenizer files keeps the byte tokenizer.
    let plain = root.path().join("plain");
    fs::create_dir(&plain).unwrap();
    assert_eq!(load_tokenizer(Some(&plain)).unwrap().vocab_size(), ByteTokenizer::VOCAB_SIZE);
}

/// `transformers`' `AutoTokenizer` on the Qwen2 and GPT-2 directories gives the ids safedpo gives.
#[test]
#[ignore = "needs torch and transformers (/work/torchenv or SAFEDPO_TORCH_PYTHON)"]
fn vocab_and_merges_ids_match_transformers() {
    let python = std::env::var("SAFEDPO_TORCH_PYTHON").unwrap_or_else(|_| "/work/torchenv/bin/python".into());
    let root = tempfile::tempdir().unwrap();
    let vocab_len = tiny_vocab().0.len();
    let qwen2 = tokenizer_config(Some("Qwen2Tokenizer"), &added(vocab_len), "<|im_end|>");
    let gpt2 = tokenizer_config(Some("GPT2Tokenizer"), &added(vocab_len), "<|endoftext|>");
    for dir in
        [vocab_merges_dir(root.path(), "qwen2", &qwen2, None), vocab_merges_dir(root.path(), "gpt2", &gpt2, None)]
    {
        let script = r#"
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
print(json.dumps({"ids": [tok(t, add_special_tokens=False)["input_ids"] for t in texts], "eos": tok.eos_token_id}))
"#;
        let out = std::process::Command::new(&python)
            .args(["-c", script, dir.to_str().unwrap(), &serde_json::to_string(&TEXTS).unwrap()])
            .output()
            .expect("running python");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let want: Value = serde_json::from_slice(&out.stdout).unwrap();
        let tok = load_tokenizer(Some(&dir)).unwrap();
        for (text, ids) in TEXTS.iter().zip(want["ids"].as_array().unwrap()) {
            let ids: Vec<i32> = ids.as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
            assert_eq!(tok.encode(text), ids, "{}: {text:?}", dir.display());
        }
        assert_eq!(tok.eos_id() as i64, want["eos"].as_i64().unwrap(), "{}", dir.display());
    }
}
