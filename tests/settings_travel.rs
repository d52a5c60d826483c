//! What a model directory carries besides its weights, and the commands that reuse it: the byte
//! tokenizer written as a `tokenizer.json` (read back by our loader and by `transformers` with the same
//! ids), the tokenizer's BOS/EOS ids in `config.json` and `generation_config.json`, the template and
//! `max_len` a model was trained with taken by `eval`, `logps`, `generate`, `train --model.init` and
//! the `Engine`, `max_len` bounded by the model's context, a reference with another tokenizer refused,
//! and model-shape settings that contradict `model.init` refused.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use safedpo::backend::cpu::CpuBackend;
use safedpo::config::RunConfig;
use safedpo::data::tokenizer_files::{byte_tokenizer_json, tokenizer_difference};
use safedpo::data::{
    load_tokenizer, save_tokenizer_files, synthetic_pku_rows, write_pairs_jsonl, write_pku_jsonl, ByteTokenizer,
    PreferencePair, TextTokenizer,
};
use safedpo::model::{Decoder, DecoderConfig};
use safedpo::{DeviceKind, Engine};
use serde_json::{json, Value};

fn safedpo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safedpo")).args(args).output().expect("running the safedpo binary")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts success and returns (stdout, stderr).
fn ok(args: &[&str]) -> (String, String) {
    let out = safedpo(args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "safedpo {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    (stdout, stderr)
}

/// Asserts a clean user error (exit 1, no panic) and returns stderr.
fn user_error(args: &[&str]) -> String {
    let out = safedpo(args);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "safedpo {args:?}: expected exit code 1\nstderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "safedpo {args:?} panicked:\n{stderr}");
    stderr
}

/// `a` then `b`.
fn cat<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    [a, b].concat()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn data_file(dir: &Path, rows: usize) -> PathBuf {
    let path = dir.join("data.jsonl");
    write_pku_jsonl(&path, &synthetic_pku_rows(rows, 5)).unwrap();
    path
}

/// A random GPT-2 model directory (weights and config.json only).
fn model_dir(dir: &Path, name: &str, config: DecoderConfig) -> PathBuf {
    let path = dir.join(name);
    Decoder::random(Arc::new(CpuBackend::new()), config, 3).unwrap().save(&path).unwrap();
    path
}

/// Texts that probe every byte class: ASCII, multi-byte characters, control bytes, whitespace runs,
/// and the byte tokenizer's special-token names (text, so bytes).
fn probe_texts() -> Vec<String> {
    let mut texts: Vec<String> = [
        "",
        "hello world",
        "héllo wörld 日本語 🙂",
        "  two  spaces\tand\na newline\r\n",
        "</s>",
        "<s> x </s>",
        "BEGINNING OF CONVERSATION: USER: How? ASSISTANT: Sure.",
        "\u{0}\u{1}\u{7f}\u{80}\u{ff}\u{100}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    texts.push((1..128u8).map(char::from).collect());
    texts
}

/// A WordLevel `tokenizer.json` whose EOS `</s>` is id 0 and unknown words are `<unk>` (id 1).
fn word_level_tokenizer(dir: &Path, words: &[&str]) {
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["</s>", "<unk>"].iter().chain(words).enumerate() {
        vocab.insert(w.to_string(), json!(i));
    }
    let file = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false,
                          "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    fs::write(dir.join("tokenizer.json"), serde_json::to_vec_pretty(&file).unwrap()).unwrap();
}

#[test]
fn byte_tokenizer_files_read_back_with_the_same_ids() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path(), "bytes", DecoderConfig::gpt2(258, 32, 16, 1, 2));
    save_tokenizer_files(&ByteTokenizer, None, &model).unwrap();
    assert_eq!(fs::read_to_string(model.join("tokenizer.json")).unwrap(), byte_tokenizer_json().unwrap());
    let tok = load_tokenizer(Some(&model)).unwrap();
    assert_eq!(tokenizer_difference(tok.as_ref(), &ByteTokenizer), None);
    assert_eq!((tok.eos_id(), tok.bos_ids(), tok.stop_ids()), (257, &[][..], vec![257]));
    for s in probe_texts() {
        assert_eq!(tok.encode(&s), ByteTokenizer.encode(&s), "{s:?}");
        let ids = [&[ByteTokenizer::BOS][..], &ByteTokenizer.encode(&s), &[ByteTokenizer::EOS]].concat();
        assert_eq!(tok.decode(&ids), ByteTokenizer.decode(&ids), "{s:?}");
    }
    let config = read_json(&model.join("config.json"));
    assert_eq!((config["bos_token_id"].clone(), config["eos_token_id"].clone()), (json!(256), json!(257)));
    let generation = read_json(&model.join("generation_config.json"));
    assert_eq!(generation, json!({"bos_token_id": 256, "eos_token_id": 257}));
    // Written again (every checkpoint), nothing changes.
    let files = ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"];
    let before: Vec<String> = files.iter().map(|f| fs::read_to_string(model.join(f)).unwrap()).collect();
    save_tokenizer_files(&ByteTokenizer, None, &model).unwrap();
    save_tokenizer_files(tok.as_ref(), Some(&model), &model).unwrap();
    let after: Vec<String> = files.iter().map(|f| fs::read_to_string(model.join(f)).unwrap()).collect();
    assert_eq!(before, after);
}

/// `transformers` reads the byte tokenizer's files (`AutoTokenizer`, `GenerationConfig`) with our
/// ids, special tokens and decoding. Needs a Python with transformers (`$PYTHON`, else `python3`):
/// `PYTHON=/path/to/venv/bin/python cargo test --release --test settings_travel -- --ignored`.
#[test]
#[ignore = "needs a Python with transformers ($PYTHON or python3)"]
fn byte_tokenizer_files_match_transformers() {
    const SCRIPT: &str = r#"
import json, sys
from transformers import AutoTokenizer, GenerationConfig
d = sys.argv[1]
tok = AutoTokenizer.from_pretrained(d)
gen = GenerationConfig.from_pretrained(d)
texts = json.load(open(d + "/texts.json"))
out = {
    "len": len(tok), "eos": tok.eos_token_id, "bos": tok.bos_token_id,
    "generation": [gen.bos_token_id, gen.eos_token_id],
    "with_special": [tok(t)["input_ids"] for t in texts],
    "without_special": [tok.encode(t, add_special_tokens=False) for t in texts],
    "decoded": [tok.decode([256] + tok.encode(t, add_special_tokens=False) + [257], skip_special_tokens=True) for t in texts],
}
json.dump(out, open(d + "/out.json", "w"))
"#;
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path(), "bytes", DecoderConfig::gpt2(258, 32, 16, 1, 2));
    save_tokenizer_files(&ByteTokenizer, None, &model).unwrap();
    let texts = probe_texts();
    fs::write(model.join("texts.json"), serde_json::to_vec(&texts).unwrap()).unwrap();
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .arg("-c")
        .arg(SCRIPT)
        .arg(&model)
        .status()
        .unwrap_or_else(|e| panic!("running {python}: {e}"));
    assert!(status.success(), "the transformers script failed ({python})");
    let out = read_json(&model.join("out.json"));
    assert_eq!((out["len"].clone(), out["eos"].clone(), out["bos"].clone()), (json!(258), json!(257), json!(256)));
    assert_eq!(out["generation"], json!([256, 257]));
    for (i, s) in texts.iter().enumerate() {
        let ours = json!(ByteTokenizer.encode(s));
        assert_eq!(out["with_special"][i], ours, "{s:?}: transformers adds no BOS or EOS");
        assert_eq!(out["without_special"][i], ours, "{s:?}");
        assert_eq!(out["decoded"][i], json!(s), "{s:?}");
    }
}

/// A run started from a model whose tokenizer's EOS is id 0 saves `eos_token_id` 0 (GPT-2's config
/// writer alone would put the vocabulary's last id, 299, there), through the trainer and the engine.
#[test]
fn saved_models_name_the_tokenizers_eos_even_at_id_zero() {
    let dir = tempfile::tempdir().unwrap();
    let words = ["hello", "world", "yes", "no", "maybe", "sure", "never"];
    let init = model_dir(dir.path(), "init", DecoderConfig::gpt2(300, 48, 16, 1, 2));
    word_level_tokenizer(&init, &words);
    assert_eq!(load_tokenizer(Some(&init)).unwrap().eos_id(), 0);

    let pairs: Vec<PreferencePair> = (0..8)
        .map(|i| PreferencePair::new(words[i % 7], words[(i + 1) % 7], words[(i + 2) % 7]).with_safety(false, true))
        .collect();
    let data = dir.path().join("pairs.jsonl");
    write_pairs_jsonl(&data, &pairs).unwrap();
    let mut cfg = RunConfig { device: DeviceKind::Cpu, out_dir: dir.path().join("run"), ..Default::default() };
    cfg.model.init = Some(init.clone());
    cfg.data.path = Some(data);
    cfg.data.max_len = 48;
    cfg.data.eval_fraction = 0.0;
    cfg.optimizer.total_steps = Some(1);
    cfg.batching.tokens_per_micro_batch = 400;
    let opts = safedpo::train::TrainOptions { quiet: true, ..Default::default() };
    let backend = Arc::new(CpuBackend::new());
    safedpo::train::train(backend, &cfg, safedpo::train::Task::Preference, &opts).unwrap();
    let engine_out = dir.path().join("engine");
    let mut engine = Engine::new(DeviceKind::Cpu).unwrap();
    engine.load_policy(&init).unwrap();
    engine.save(&engine_out).unwrap();

    for saved in [cfg.out_dir.join("final"), engine_out] {
        let config = read_json(&saved.join("config.json"));
        assert_eq!(config["eos_token_id"], json!(0), "{}", saved.display());
        assert_eq!(config["bos_token_id"], json!(0), "{}: GPT-2's BOS is its EOS", saved.display());
        assert_eq!(read_json(&saved.join("generation_config.json"))["eos_token_id"], json!(0));
        let tok = load_tokenizer(Some(&saved)).unwrap();
        assert_eq!(tokenizer_difference(tok.as_ref(), load_tokenizer(Some(&init)).unwrap().as_ref()), None);
    }
}

/// `eval`, `logps`, `generate` and the `Engine` read a trained model with the template and `max_len`
/// it was trained with, unless told otherwise, and say so; `max_len` never exceeds the context.
#[test]
fn eval_logps_generate_and_engine_take_the_settings_saved_with_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 40);
    let sft = dir.path().join("sft");
    let template = "Q: {prompt} A:";
    let mut args = vec!["sft", "--out-dir", p(&sft), "--data.path", p(&data), "--data.template", template];
    args.extend(["--data.max_len", "80", "--model.n_positions", "80", "--model.n_layer", "1", "--model.n_embd"]);
    args.extend(["16", "--model.n_head", "2", "--batching.tokens_per_micro_batch", "800"]);
    args.extend(["--optimizer.total_steps", "2", "--optimizer.lr", "1e-2", "--no-progress"]);
    ok(&args);
    let model = sft.join("final");
    for file in ["tokenizer.json", "tokenizer_config.json", "generation_config.json", "run_config.toml"] {
        assert!(model.join(file).is_file(), "the model directory lacks {file}");
    }

    let base = ["--model", p(&model), "--data.path", p(&data), "--device", "cpu"];
    let with = |extra: &[&'static str]| cat(&base, extra);
    let given = ["--data.template", template, "--data.max_len", "80"];
    let (saved, notes) = ok(&[&["eval"][..], &with(&[])].concat());
    assert!(notes.contains(&format!("using data.template = {template:?} (from {}", model.display())), "{notes}");
    assert!(notes.contains("using data.max_len = 80 (from"), "{notes}");
    assert!(notes.contains(&format!("the tokenizer {}", model.join("tokenizer.json").display())), "{notes}");
    let (explicit, _) = ok(&[&["eval"][..], &with(&given)].concat());
    assert_eq!(saved, explicit);
    let (default_template, _) =
        ok(&[&["eval"][..], &with(&["--data.template", safedpo::data::DEFAULT_TEMPLATE])].concat());
    assert_ne!(saved, default_template, "a template given wins over the saved one");
    let err = user_error(&[&["eval"][..], &with(&["--data.max_len", "512"])].concat());
    assert!(err.contains("data.max_len = 512 (from --data.max_len) exceeds the context of"), "{err}");
    assert!(err.contains("n_positions = 80"), "{err}");

    let logps = |extra: &[&'static str], name: &str| {
        let out = dir.path().join(name);
        ok(&[&["logps", "--out", p(&out)][..], &with(extra)].concat());
        fs::read_to_string(out).unwrap()
    };
    assert_eq!(logps(&[], "saved.jsonl"), logps(&given, "given.jsonl"));

    let generate = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", p(&model), "--prompt", "How do I?", "--max-new-tokens", "5"];
        args.extend(extra);
        ok(&args)
    };
    let (continuation, notes) = generate(&[]);
    assert!(notes.contains("using data.template"), "{notes}");
    assert_eq!(continuation, generate(&["--data.template", template]).0);

    // The engine: the saved template and max_len, unless set before (or after) loading.
    let pairs = [PreferencePair::new("Name a colour.".repeat(9), "Blue.", "Seven.")];
    let mut engine = Engine::new(DeviceKind::Cpu).unwrap();
    engine.load_policy(&model).unwrap();
    let mut told = Engine::new(DeviceKind::Cpu).unwrap();
    told.set_template(template).unwrap();
    told.set_max_len(Some(80));
    told.load_policy(&model).unwrap();
    let tokens = engine.tokenize(&pairs).unwrap();
    assert_eq!(tokens, told.tokenize(&pairs).unwrap());
    assert!(ByteTokenizer.decode(&tokens[0].prompt).ends_with(" A:"));
    let mut own = Engine::new(DeviceKind::Cpu).unwrap();
    own.set_template("U: {prompt} R:").unwrap();
    own.load_policy(&model).unwrap();
    assert!(ByteTokenizer.decode(&own.tokenize(&pairs).unwrap()[0].prompt).ends_with(" R:"));
}

/// `train --model.init DIR`: `data.max_len` defaults to DIR's context (no error for a context below
/// 512), a value given above it is an error before any data is read, and `[model]` shape settings
/// that contradict DIR's config are an error naming each.
#[test]
fn train_from_a_model_dir_takes_its_context_and_refuses_another_shape() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 30);
    let init = model_dir(dir.path(), "init", DecoderConfig::gpt2(258, 64, 16, 1, 2));
    let run = dir.path().join("run");
    let base = ["train", "--model.init", p(&init), "--data.path", p(&data), "--out-dir", p(&run), "--no-progress"];
    let with = |extra: &[&'static str]| cat(&base, extra);
    let (_, notes) = ok(&with(&["--optimizer.total_steps", "1", "--batching.tokens_per_micro_batch", "600"]));
    assert!(notes.contains("using data.max_len = 64 (from the context of"), "{notes}");
    let saved = RunConfig::from_toml_file(&run.join("config.toml")).unwrap();
    assert_eq!(saved.data.max_len, 64);

    let err = user_error(&with(&["--data.max_len", "512"]));
    assert!(err.contains("data.max_len = 512 (from --data.max_len) exceeds the context"), "{err}");
    let err = user_error(&with(&["--model.n_layer", "5", "--model.vocab_size", "1000", "--model.n_head", "2"]));
    assert!(err.contains(&format!("differs from the model in {}", init.display())), "{err}");
    assert!(err.contains("model.n_layer = 5 (from --model.n_layer), but the model has n_layer = 1"), "{err}");
    assert!(err.contains("model.vocab_size = 1000 (from --model.vocab_size), but the model has vocab_size = 258"));
    assert!(!err.contains("model.n_head"), "n_head given equal to the model's is fine: {err}");
}

/// A reference whose own tokenizer differs from the policy's is an error naming both, in `train`,
/// `eval` and the `Engine`; one with the same tokenizer is fine.
#[test]
fn a_reference_with_another_tokenizer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = data_file(dir.path(), 20);
    let config = DecoderConfig::gpt2(258, 64, 16, 1, 2);
    let policy = model_dir(dir.path(), "policy", config.clone());
    save_tokenizer_files(&ByteTokenizer, None, &policy).unwrap();
    let same = model_dir(dir.path(), "same", config.clone());
    save_tokenizer_files(&ByteTokenizer, None, &same).unwrap();
    let other = model_dir(dir.path(), "other", config);
    word_level_tokenizer(&other, &["hello"]);

    let names_both = |err: &str| {
        for path in [policy.join("tokenizer.json"), other.join("tokenizer.json")] {
            assert!(err.contains(&path.display().to_string()), "{err}");
        }
        assert!(err.contains("the reference's tokenizer"), "{err}");
    };
    let run = dir.path().join("run");
    let mut args = vec!["train", "--model.init", p(&policy), "--model.reference", p(&other), "--data.path", p(&data)];
    args.extend(["--out-dir", p(&run), "--optimizer.total_steps", "1", "--no-progress"]);
    args.extend(["--batching.tokens_per_micro_batch", "600"]);
    names_both(&user_error(&args));
    let eval = |reference: &Path| {
        let args = ["eval", "--model", p(&policy), "--model.reference", p(reference), "--data.path", p(&data)];
        args.map(str::to_string)
    };
    let args = eval(&other);
    names_both(&user_error(&args.iter().map(String::as_str).collect::<Vec<_>>()));
    let args = eval(&same);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());

    let mut engine = Engine::new(DeviceKind::Cpu).unwrap();
    engine.load_policy(&policy).unwrap();
    names_both(&format!("{:#}", engine.load_reference(&other).unwrap_err()));
    engine.load_reference(&same).unwrap();
}

/// `data.skip_invalid` on a file whose every line is invalid, or whose valid lines all drop out,
/// says how many lines were skipped and why.
#[test]
fn skipped_lines_are_counted_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let all_bad = dir.path().join("all_bad.jsonl");
    fs::write(&all_bad, "{oops\n{\"prompt\": 1}\n").unwrap();
    let run = dir.path().join("run");
    let train = |data: &Path| {
        let args = ["train", "--data.path", p(data), "--data.skip_invalid", "--out-dir", p(&run), "--no-progress"];
        user_error(&args)
    };
    let err = train(&all_bad);
    assert!(err.contains("all 2 lines are invalid") && err.contains("the first, line 1: malformed JSON"), "{err}");
    // One valid row, both of its responses unsafe (T(D) drops it), and one invalid line.
    let dropped = dir.path().join("dropped.jsonl");
    let row = json!({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_unsafe": true, "rejected_unsafe": true});
    fs::write(&dropped, format!("{row}\n{{\"prompt\": \"p\"}}\n")).unwrap();
    let err = train(&dropped);
    assert!(err.contains("no training pairs left"), "{err}");
    assert!(err.contains("1 invalid lines skipped, the first, line 2: field 'chosen': missing"), "{err}");
}
