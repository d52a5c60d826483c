//! Data pipeline tests: dataset formats (TRL's conversational rows among them), pair selection and
//! T(D), bad input, templates, tokenizers, truncation (TRL's modes among them), batching and resume,
//! and the synthetic demo data. Every test makes its own data.
//!
//! One test binary; the tests are grouped by stage of the pipeline in the modules below, and the
//! helpers that make random data are here.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use safedpo::data::*;

// ---------------------------------------------------------------------------------------------
// helpers

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A random non-empty text of printable ASCII and a few multi-byte characters.
fn random_text(rng: &mut ChaCha8Rng, max_words: usize) -> String {
    const WORDS: &[&str] = &["the", "cat", "sat", "on", "a", "mat", "héllo", "wörld", "日本", "ok", "?", "!", "42"];
    let n = rng.random_range(1..=max_words);
    (0..n).map(|_| *WORDS.choose(rng).unwrap()).collect::<Vec<_>>().join(" ")
}

fn write_lines(dir: &Path, name: &str, lines: &[Vec<u8>]) -> PathBuf {
    let path = dir.join(name);
    let mut bytes = Vec::new();
    for l in lines {
        bytes.extend_from_slice(l);
        bytes.push(b'\n');
    }
    fs::write(&path, bytes).unwrap();
    path
}

fn json_line(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// A random PKU row as JSON plus its fields, with extra fields the loader must ignore.
fn random_pku(rng: &mut ChaCha8Rng) -> (Value, PkuRow) {
    let mut r0 = random_text(rng, 6);
    let r1 = random_text(rng, 6);
    if r0 == r1 {
        r0.push_str(" x");
    }
    let row = PkuRow {
        prompt: random_text(rng, 5),
        response_0: r0,
        response_1: r1,
        is_response_0_safe: rng.random_bool(0.5),
        is_response_1_safe: rng.random_bool(0.5),
        better_response_id: rng.random_range(0..2),
        safer_response_id: rng.random_range(0..2),
    };
    let v = json!({
        "prompt": row.prompt, "response_0": row.response_0, "response_1": row.response_1,
        "prompt_source": "test", "response_0_harm_category": {"x": true}, "response_0_severity_level": 2,
        "is_response_0_safe": row.is_response_0_safe, "is_response_1_safe": row.is_response_1_safe,
        "better_response_id": row.better_response_id, "safer_response_id": row.safer_response_id,
    });
    (v, row)
}

/// The pair preferring response `id`, written out by hand (independent of the library's helpers).
fn expected_pair(row: &PkuRow, id: u8) -> PreferencePair {
    let resp = [&row.response_0, &row.response_1];
    let safe = [row.is_response_0_safe, row.is_response_1_safe];
    let (w, l) = (id as usize, 1 - id as usize);
    PreferencePair {
        prompt: row.prompt.clone(),
        chosen: resp[w].clone(),
        rejected: resp[l].clone(),
        chosen_unsafe: !safe[w],
        rejected_unsafe: !safe[l],
        ..Default::default()
    }
}

fn random_generic(rng: &mut ChaCha8Rng) -> (Value, PreferencePair) {
    let mut chosen = random_text(rng, 6);
    let rejected = random_text(rng, 6);
    if chosen == rejected {
        chosen.push_str(" y");
    }
    let pair = PreferencePair {
        prompt: random_text(rng, 5),
        chosen,
        rejected,
        chosen_unsafe: rng.random_bool(0.5),
        rejected_unsafe: rng.random_bool(0.5),
        ..Default::default()
    };
    let mut v = json!({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "id": 7});
    // Optional flags: written as booleans, as null (= false) or left out (= false).
    for (field, flag) in [("chosen_unsafe", pair.chosen_unsafe), ("rejected_unsafe", pair.rejected_unsafe)] {
        match (flag, rng.random_range(0..3)) {
            (true, _) | (false, 0) => v[field] = json!(flag),
            (false, 1) => v[field] = Value::Null,
            _ => {}
        }
    }
    (v, pair)
}

mod batch;
mod chat;
mod conversation;
mod load;
mod synthetic;
mod tokenize;
mod truncate;
mod unpaired;
mod vocab_merges;
