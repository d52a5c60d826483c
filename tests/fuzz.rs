//! Fuzzing on stable: property tests that feed arbitrary bytes and mutated valid inputs to the
//! readers of user files — the JSONL pair parser, the TOML run configuration, a model directory
//! (`config.json` + `model.safetensors`) and a tokenizer (`tokenizer.json`). The property: each
//! returns `Ok` or `Err`, never panics. Seeds come from tests/fixtures and from files the project
//! writes itself. Case counts keep the file to seconds in release; `PROPTEST_CASES=10000` runs longer
//! (docs/TESTING.md).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use proptest::prelude::*;
use proptest::test_runner::Config;

use safedpo::backend::cpu::CpuBackend;
use safedpo::config::RunConfig;
use safedpo::data::{
    load_pairs, synthetic_pku_rows, write_pku_jsonl, DataFormat, HfTokenizer, PairSelection, TextTokenizer,
};
use safedpo::model::{checkpoint, Decoder, DecoderConfig};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// `cases` unless PROPTEST_CASES asks for more (or fewer).
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(cases);
    Config { cases, failure_persistence: None, ..Config::default() }
}

/// An edit of a seed input: bytes overwritten, a slice spliced out or in, the end cut.
#[derive(Clone, Debug)]
enum Edit {
    Set(usize, u8),
    Remove(usize, usize),
    Insert(usize, Vec<u8>),
    Truncate(usize),
}

/// Bytes that matter to the formats here, more often than chance would pick them.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![any::<u8>(), prop::sample::select(b"{}[]\":,0123456789-.eE \n\\tfnul=#'\xff\x00".to_vec())]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        4 => (any::<usize>(), interesting_byte()).prop_map(|(i, b)| Edit::Set(i, b)),
        1 => (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Remove(i, n)),
        1 => (any::<usize>(), prop::collection::vec(interesting_byte(), 1..16)).prop_map(|(i, b)| Edit::Insert(i, b)),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ]
}

/// `seed` with `edits` applied; `near` (when non-zero) keeps the edits within its first bytes, where a
/// format's header is.
fn mutate(seed: &[u8], edits: &[Edit], near: usize) -> Vec<u8> {
    let mut out = seed.to_vec();
    for e in edits {
        let len = out.len();
        let span = if near > 0 { near.min(len) } else { len };
        match e {
            Edit::Set(i, b) if span > 0 => out[i % span] = *b,
            Edit::Remove(i, n) if span > 0 => {
                let at = i % span;
                out.drain(at..(at + n).min(out.len()));
            }
            Edit::Insert(i, bytes) => {
                let at = i % (span + 1);
                out.splice(at..at, bytes.iter().copied());
            }
            Edit::Truncate(n) => out.truncate(n % (out.len() + 1)),
            _ => {}
        }
    }
    out
}

/// Arbitrary bytes, or a seed mutated.
fn input(seeds: &'static [Vec<u8>], near: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256),
        4 => (0..seeds.len(), prop::collection::vec(edit(), 1..8)).prop_map(move |(s, e)| mutate(&seeds[s], &e, near)),
    ]
}

// ---- JSONL pairs ---------------------------------------------------------------------------------

static PAIR_SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pku.jsonl");
    write_pku_jsonl(&path, &synthetic_pku_rows(3, 1)).unwrap();
    vec![
        fs::read(&path).unwrap(),
        br#"{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away.", "chosen_unsafe": false}"#.to_vec(),
        b"{\"prompt\": \"p\", \"chosen\": \"a\", \"rejected\": \"b\"}\n\n{\"prompt\": \"q\", \"chosen\": \"c\", \"rejected\": \"d\"}\n"
            .to_vec(),
        "\u{feff}{\"prompt\": \"\u{e9}\", \"chosen\": [1], \"rejected\": null}\n".as_bytes().to_vec(),
    ]
});

proptest! {
    #![proptest_config(config(768))]
    #[test]
    fn pair_rows_never_panic(bytes in input(&PAIR_SEEDS, 0), skip in any::<bool>(), which in 0usize..3) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.jsonl");
        fs::write(&path, &bytes).unwrap();
        let format = [DataFormat::Auto, DataFormat::PkuSafeRlhf, DataFormat::Jsonl][which];
        for selection in [PairSelection::SafeDpo, PairSelection::Better, PairSelection::Safer] {
            let _ = load_pairs(&path, format, selection, skip);
        }
    }
}

// ---- TOML run configuration ----------------------------------------------------------------------

static TOML_SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let mut seeds: Vec<Vec<u8>> = ["examples", "configs"]
        .iter()
        .flat_map(|d| fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(d)).into_iter().flatten())
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .filter_map(|p| fs::read(p).ok())
        .collect();
    seeds.push(toml::to_string(&RunConfig::default()).unwrap().into_bytes());
    seeds.push(b"[objective]\nname = \"safedpo\"\nbeta = 0.1\n[optimizer]\nlr = 1e-6\nepochs = 1.5\n".to_vec());
    seeds
});

proptest! {
    #![proptest_config(config(1536))]
    #[test]
    fn run_configs_never_panic(bytes in input(&TOML_SEEDS, 0)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = RunConfig::from_toml_str(&text, Path::new("run.toml"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.toml");
        fs::write(&path, &bytes).unwrap();
        let overrides = safedpo::config::RunOverrides { config: Some(path), values: Vec::new() };
        let _ = RunConfig::resolve(&overrides);
    }
}

// ---- model directory -----------------------------------------------------------------------------

/// A tiny model directory's `config.json` and `model.safetensors`.
static MODEL_SEED: LazyLock<(Vec<u8>, Vec<u8>)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DecoderConfig::gpt2(64, 16, 8, 1, 2);
    Decoder::random(Arc::new(CpuBackend::new()), cfg, 1).unwrap().save(dir.path()).unwrap();
    (fs::read(dir.path().join("config.json")).unwrap(), fs::read(dir.path().join("model.safetensors")).unwrap())
});
static CONFIG_SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let mut seeds = vec![MODEL_SEED.0.clone()];
    let tokenizers = fixtures().join("tokenizers");
    for family in ["llama2", "llama3", "mistral", "qwen2"] {
        seeds.push(fs::read(tokenizers.join(family).join("config.json")).unwrap());
    }
    seeds
});
static WEIGHT_SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| vec![MODEL_SEED.1.clone()]);

proptest! {
    #![proptest_config(config(768))]
    #[test]
    fn model_configs_never_panic(config in input(&CONFIG_SEEDS, 0)) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), &config).unwrap();
        fs::write(dir.path().join("model.safetensors"), &MODEL_SEED.1).unwrap();
        let _ = checkpoint::load_dir(dir.path());
    }

    #[test]
    fn safetensors_never_panic(weights in input(&WEIGHT_SEEDS, 512)) {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), &MODEL_SEED.0).unwrap();
        fs::write(dir.path().join("model.safetensors"), &weights).unwrap();
        let _ = checkpoint::load_dir(dir.path());
    }
}

// ---- tokenizer.json ------------------------------------------------------------------------------

static TOKENIZER_FAMILIES: [&str; 4] = ["llama2", "llama3", "mistral", "qwen2"];
static TOKENIZER_SEEDS: LazyLock<Vec<Vec<u8>>> = LazyLock::new(|| {
    let tokenizers = fixtures().join("tokenizers");
    TOKENIZER_FAMILIES.iter().map(|f| fs::read(tokenizers.join(f).join("tokenizer.json")).unwrap()).collect()
});

proptest! {
    #![proptest_config(config(128))]
    #[test]
    fn tokenizers_never_panic(bytes in input(&TOKENIZER_SEEDS, 0), family in 0usize..4) {
        let dir = tempfile::tempdir().unwrap();
        let src = fixtures().join("tokenizers").join(TOKENIZER_FAMILIES[family]);
        for file in ["tokenizer_config.json", "config.json", "generation_config.json"] {
            fs::copy(src.join(file), dir.path().join(file)).unwrap();
        }
        fs::write(dir.path().join("tokenizer.json"), &bytes).unwrap();
        if let Ok(tok) = HfTokenizer::from_model_dir(dir.path()) {
            // A tokenizer that loads encodes and decodes.
            let ids = tok.encode("Hello, world! 123 éà");
            let _ = tok.decode(&ids);
        }
    }
}
