//! Data pipeline tests: dataset formats, pair selection and T(D), bad input, templates, tokenizers,
//! truncation, batching and resume, and the synthetic demo data. Every test makes its own data.

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

// ---------------------------------------------------------------------------------------------
// formats and selections

#[test]
fn pku_rows_parse_in_every_selection() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = rng(1);
    let rows: Vec<(Value, PkuRow)> = (0..200).map(|_| random_pku(&mut r)).collect();
    let lines: Vec<Vec<u8>> = rows.iter().map(|(v, _)| json_line(v)).collect();
    let path = write_lines(dir.path(), "pku.jsonl", &lines);

    for format in [DataFormat::Auto, DataFormat::PkuSafeRlhf] {
        // better: helpfulness order, every row kept.
        let (pairs, rep) = load_pairs(&path, format, PairSelection::Better, false).unwrap();
        let want: Vec<_> = rows.iter().map(|(_, row)| expected_pair(row, row.better_response_id)).collect();
        assert_eq!(pairs, want);
        assert_eq!(
            (rep.format, rep.lines, rep.kept, rep.swapped, rep.dropped),
            (DataFormat::PkuSafeRlhf, 200, 200, 0, 0)
        );

        // safer: safety order, every row kept.
        let (pairs, rep) = load_pairs(&path, format, PairSelection::Safer, false).unwrap();
        let want: Vec<_> = rows.iter().map(|(_, row)| expected_pair(row, row.safer_response_id)).collect();
        assert_eq!(pairs, want);
        assert_eq!((rep.kept, rep.swapped, rep.dropped), (200, 0, 0));

        // safedpo: better pairs through T(D).
        let (pairs, rep) = load_pairs(&path, format, PairSelection::SafeDpo, false).unwrap();
        let mut want = Vec::new();
        let (mut kept, mut swapped, mut dropped) = (0, 0, 0);
        for (_, row) in &rows {
            let better = row.better_response_id as usize;
            let safe = [row.is_response_0_safe, row.is_response_1_safe];
            if safe[better] {
                kept += 1;
                want.push(expected_pair(row, better as u8));
            } else if safe[1 - better] {
                swapped += 1;
                want.push(expected_pair(row, 1 - better as u8));
            } else {
                dropped += 1;
            }
        }
        assert!(kept > 0 && swapped > 0 && dropped > 0, "random rows should exercise every T(D) case");
        assert_eq!(pairs, want);
        assert_eq!(
            (rep.lines, rep.kept, rep.swapped, rep.dropped, rep.skipped_invalid),
            (200, kept, swapped, dropped, 0)
        );
        assert!(pairs.iter().all(|p| !p.chosen_unsafe), "after T(D) every chosen response is safe");
        let shown = rep.to_string();
        assert!(!shown.contains('\n'));
        assert!(
            shown.contains(&format!("{swapped} swapped")) && shown.contains(&format!("{dropped} dropped")),
            "{shown}"
        );
    }
}

#[test]
fn generic_rows_parse_in_every_selection() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = rng(2);
    let rows: Vec<(Value, PreferencePair)> = (0..200).map(|_| random_generic(&mut r)).collect();
    let lines: Vec<Vec<u8>> = rows.iter().map(|(v, _)| json_line(v)).collect();
    let path = write_lines(dir.path(), "pairs.jsonl", &lines);
    let originals: Vec<PreferencePair> = rows.iter().map(|(_, p)| p.clone()).collect();
    let swap = |p: &PreferencePair| PreferencePair {
        prompt: p.prompt.clone(),
        chosen: p.rejected.clone(),
        rejected: p.chosen.clone(),
        chosen_unsafe: p.rejected_unsafe,
        rejected_unsafe: p.chosen_unsafe,
    };

    for format in [DataFormat::Auto, DataFormat::Jsonl] {
        let (pairs, rep) = load_pairs(&path, format, PairSelection::Better, false).unwrap();
        assert_eq!(pairs, originals);
        assert_eq!((rep.format, rep.kept, rep.swapped, rep.dropped), (DataFormat::Jsonl, 200, 0, 0));

        // safer: safe-first where the flags differ, dropped where equal.
        let (pairs, rep) = load_pairs(&path, format, PairSelection::Safer, false).unwrap();
        let want: Vec<_> = originals
            .iter()
            .filter(|p| p.chosen_unsafe != p.rejected_unsafe)
            .map(|p| if p.chosen_unsafe { swap(p) } else { p.clone() })
            .collect();
        assert_eq!(pairs, want);
        let swapped = originals.iter().filter(|p| p.chosen_unsafe && !p.rejected_unsafe).count();
        assert_eq!((rep.kept, rep.swapped, rep.dropped), (want.len() - swapped, swapped, 200 - want.len()));

        // safedpo.
        let (pairs, rep) = load_pairs(&path, format, PairSelection::SafeDpo, false).unwrap();
        let want: Vec<_> = originals
            .iter()
            .filter(|p| !(p.chosen_unsafe && p.rejected_unsafe))
            .map(|p| if p.chosen_unsafe { swap(p) } else { p.clone() })
            .collect();
        assert_eq!(pairs, want);
        let dropped = originals.iter().filter(|p| p.chosen_unsafe && p.rejected_unsafe).count();
        assert_eq!((rep.kept, rep.swapped, rep.dropped), (200 - dropped - swapped, swapped, dropped));
        assert_eq!(rep.lines, rep.kept + rep.swapped + rep.dropped + rep.skipped_invalid);
    }
}

#[test]
fn safedpo_transform_counts_and_orientation() {
    let mut r = rng(3);
    let pairs: Vec<PreferencePair> = (0..500).map(|_| random_generic(&mut r).1).collect();
    let (out, counts) = safedpo_transform(pairs.clone());
    assert_eq!(counts.kept + counts.swapped + counts.dropped, pairs.len());
    assert_eq!(out.len(), counts.kept + counts.swapped);
    let mut it = out.iter();
    for p in &pairs {
        match (p.chosen_unsafe, p.rejected_unsafe) {
            (false, _) => assert_eq!(it.next().unwrap(), p),
            (true, false) => {
                let q = it.next().unwrap();
                assert_eq!(
                    (&q.chosen, &q.rejected, q.chosen_unsafe, q.rejected_unsafe),
                    (&p.rejected, &p.chosen, false, true)
                );
            }
            (true, true) => {}
        }
    }
    assert!(it.next().is_none());
}

#[test]
fn blank_lines_and_crlf_are_handled() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = rng(4);
    let (v0, p0) = random_generic(&mut r);
    let (v1, p1) = random_generic(&mut r);
    let mut l0 = json_line(&v0);
    l0.push(b'\r');
    let lines = vec![b"".to_vec(), l0, b"   \t".to_vec(), b"\r".to_vec(), json_line(&v1), b"".to_vec()];
    let path = write_lines(dir.path(), "blank.jsonl", &lines);
    let (pairs, rep) = load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap();
    assert_eq!(pairs, vec![p0, p1]);
    assert_eq!(rep.lines, 2);

    let empty = write_lines(dir.path(), "empty.jsonl", &[b"".to_vec(), b"  ".to_vec()]);
    let err = load_pairs(&empty, DataFormat::Auto, PairSelection::Better, false).unwrap_err().to_string();
    assert!(err.contains("empty.jsonl") && err.contains("empty dataset"), "{err}");
    let missing = dir.path().join("nope.jsonl");
    let err = format!("{:#}", load_pairs(&missing, DataFormat::Auto, PairSelection::Better, false).unwrap_err());
    assert!(err.contains("nope.jsonl"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// bad input

/// One bad line: its bytes and the text the error must contain after `path:line: `.
struct BadCase {
    name: &'static str,
    line: Vec<u8>,
    expect: &'static str,
}

fn pku_with(f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = random_pku(&mut rng(99)).0;
    f(&mut v);
    json_line(&v)
}

fn generic_with(f: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = random_generic(&mut rng(98)).0;
    f(&mut v);
    json_line(&v)
}

fn pku_bad_cases() -> Vec<BadCase> {
    let mut invalid_utf8 = pku_with(|_| {});
    let at = invalid_utf8.iter().position(|&b| b == b':').unwrap() + 3;
    invalid_utf8.insert(at, 0xff);
    vec![
        BadCase { name: "malformed JSON", line: b"{\"prompt\": \"x\", ".to_vec(), expect: "malformed JSON" },
        BadCase { name: "not an object", line: b"[1, 2]".to_vec(), expect: "expected a JSON object" },
        BadCase { name: "invalid UTF-8", line: invalid_utf8, expect: "invalid UTF-8" },
        BadCase {
            name: "missing field",
            line: pku_with(|v| {
                v.as_object_mut().unwrap().remove("response_1");
            }),
            expect: "field 'response_1': missing",
        },
        BadCase {
            name: "wrong type (string)",
            line: pku_with(|v| v["response_0"] = json!(17)),
            expect: "field 'response_0': expected a non-empty string, found number 17",
        },
        BadCase {
            name: "wrong type (bool)",
            line: pku_with(|v| v["is_response_1_safe"] = json!("yes")),
            expect: "field 'is_response_1_safe': expected true or false",
        },
        BadCase {
            name: "empty response",
            line: pku_with(|v| v["response_1"] = json!("  ")),
            expect: "field 'response_1': expected a non-empty string, found an empty string",
        },
        BadCase {
            name: "empty prompt",
            line: pku_with(|v| v["prompt"] = json!("")),
            expect: "field 'prompt': expected a non-empty string",
        },
        BadCase {
            name: "better id 2",
            line: pku_with(|v| v["better_response_id"] = json!(2)),
            expect: "field 'better_response_id': expected 0 or 1, found number 2",
        },
        BadCase {
            name: "safer id -1",
            line: pku_with(|v| v["safer_response_id"] = json!(-1)),
            expect: "field 'safer_response_id': expected 0 or 1",
        },
        BadCase {
            name: "id as string",
            line: pku_with(|v| v["better_response_id"] = json!("0")),
            expect: "field 'better_response_id': expected 0 or 1",
        },
    ]
}

fn generic_bad_cases() -> Vec<BadCase> {
    vec![
        BadCase {
            name: "missing rejected",
            line: generic_with(|v| {
                v.as_object_mut().unwrap().remove("rejected");
            }),
            expect: "field 'rejected': missing",
        },
        BadCase {
            name: "empty chosen",
            line: generic_with(|v| v["chosen"] = json!("")),
            expect: "field 'chosen': expected a non-empty string",
        },
        BadCase {
            name: "flag wrong type",
            line: generic_with(|v| v["rejected_unsafe"] = json!(1)),
            expect: "field 'rejected_unsafe': expected true, false or null, found number 1",
        },
        BadCase {
            name: "prompt wrong type",
            line: generic_with(|v| v["prompt"] = json!(["a"])),
            expect: "field 'prompt': expected a non-empty string, found an array",
        },
    ]
}

/// Places `bad` after `good_before` valid lines with blank lines in between; returns the file and
/// the bad line's 1-based number.
fn file_with_bad_line(dir: &Path, name: &str, good: &[Vec<u8>], good_before: usize, bad: &[u8]) -> (PathBuf, usize) {
    let mut lines = Vec::new();
    for (i, g) in good.iter().enumerate() {
        if i == good_before {
            lines.push(bad.to_vec());
        }
        lines.push(g.clone());
        if i % 3 == 1 {
            lines.push(Vec::new()); // blank lines still count in line numbers
        }
    }
    let bad_line = lines.iter().position(|l| l == bad).unwrap() + 1;
    (write_lines(dir, name, &lines), bad_line)
}

#[test]
fn every_bad_input_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = rng(5);
    let good_pku: Vec<Vec<u8>> = (0..12).map(|_| json_line(&random_pku(&mut r).0)).collect();
    let good_generic: Vec<Vec<u8>> = (0..12).map(|_| json_line(&random_generic(&mut r).0)).collect();
    let suites = [
        (pku_bad_cases(), &good_pku, DataFormat::PkuSafeRlhf),
        (generic_bad_cases(), &good_generic, DataFormat::Jsonl),
    ];
    for (cases, good, format) in suites {
        for (k, case) in cases.iter().enumerate() {
            let before = 1 + (k * 5) % (good.len() - 1); // after a valid first line, so Auto detects
            let name = format!("bad{k}-{format}.jsonl");
            let (path, line) = file_with_bad_line(dir.path(), &name, good, before, &case.line);
            for fmt in [DataFormat::Auto, format] {
                let err = load_pairs(&path, fmt, PairSelection::SafeDpo, false).unwrap_err().to_string();
                let want = format!("{}:{line}: {}", path.display(), case.expect);
                assert!(err.starts_with(&want), "case '{}': got\n  {err}\nwant prefix\n  {want}", case.name);
            }
            // skip_invalid: the line is counted, the rest is read.
            let (pairs, rep) = load_pairs(&path, format, PairSelection::Better, true).unwrap();
            assert_eq!((rep.lines, rep.skipped_invalid, rep.kept), (good.len() + 1, 1, good.len()), "{}", case.name);
            assert_eq!(pairs.len(), good.len());
        }
    }
}

#[test]
fn format_detection_errors_and_skips() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = rng(6);
    let good: Vec<Vec<u8>> = (0..5).map(|_| json_line(&random_pku(&mut r).0)).collect();
    // An undetectable first line is an error at line 1 without skip_invalid ...
    let mut lines = vec![json_line(&json!({"text": "hello"}))];
    lines.extend(good.iter().cloned());
    let path = write_lines(dir.path(), "undetectable.jsonl", &lines);
    let err = load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:1: cannot detect the format", path.display())), "{err}");
    // ... and skipped with it; the format comes from the first valid line.
    let (pairs, rep) = load_pairs(&path, DataFormat::Auto, PairSelection::Better, true).unwrap();
    assert_eq!((pairs.len(), rep.skipped_invalid, rep.format), (5, 1, DataFormat::PkuSafeRlhf));

    // Forcing the wrong format reports the missing field.
    let err = load_pairs(&path, DataFormat::Jsonl, PairSelection::Better, false).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:1: field 'prompt': missing", path.display())), "{err}");
    let path2 = write_lines(dir.path(), "pku.jsonl", &good);
    let err = load_pairs(&path2, DataFormat::Jsonl, PairSelection::Better, false).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:1: field 'chosen': missing", path2.display())), "{err}");

    // Many invalid lines, all skipped and counted.
    let mut lines = Vec::new();
    let mut bad = 0;
    for (i, g) in good.iter().enumerate() {
        lines.push(g.clone());
        for _ in 0..i {
            lines.push(b"{oops".to_vec());
            bad += 1;
        }
    }
    let path3 = write_lines(dir.path(), "many_bad.jsonl", &lines);
    let (_, rep) = load_pairs(&path3, DataFormat::Auto, PairSelection::Better, true).unwrap();
    assert_eq!((rep.lines, rep.kept, rep.skipped_invalid), (5 + bad, 5, bad));
    assert!(rep.to_string().contains(&format!("{bad} invalid skipped")));
}

#[test]
fn format_and_selection_names_parse() {
    assert_eq!("pku".parse::<DataFormat>().unwrap(), DataFormat::PkuSafeRlhf);
    assert_eq!("JSONL".parse::<DataFormat>().unwrap(), DataFormat::Jsonl);
    assert_eq!("auto".parse::<DataFormat>().unwrap(), DataFormat::Auto);
    assert!("csv".parse::<DataFormat>().unwrap_err().to_string().contains("expected auto, pku-saferlhf or jsonl"));
    for s in [PairSelection::Better, PairSelection::Safer, PairSelection::SafeDpo] {
        assert_eq!(s.to_string().parse::<PairSelection>().unwrap(), s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<PairSelection>(&json).unwrap(), s);
    }
    assert!("best".parse::<PairSelection>().is_err());
}

// ---------------------------------------------------------------------------------------------
// templates and tokenizers

#[test]
fn template_requires_exactly_one_placeholder() {
    assert!(Template::new("USER: {prompt} ASSISTANT:").is_ok());
    let err = Template::new("USER: ASSISTANT:").unwrap_err().to_string();
    assert!(err.contains("no {prompt} placeholder"), "{err}");
    let err = Template::new("{prompt} and {prompt}").unwrap_err().to_string();
    assert!(err.contains("2 {prompt} placeholders"), "{err}");
    let pairs =
        vec![PreferencePair { prompt: "p".into(), chosen: "a".into(), rejected: "b".into(), ..Default::default() }];
    let bad = Template("no placeholder".into());
    assert!(tokenize_pairs(&pairs, &ByteTokenizer, &bad, 100).is_err());
    assert_eq!(Template::default().0, DEFAULT_TEMPLATE);
    assert_eq!(DEFAULT_TEMPLATE, "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:");
}

#[test]
fn template_renders_prompt_and_joins_response_with_one_space() {
    let t = Template::default();
    let mut r = rng(7);
    for _ in 0..50 {
        let prompt = random_text(&mut r, 5);
        let response = random_text(&mut r, 5);
        let pair = PreferencePair {
            prompt: prompt.clone(),
            chosen: response.clone(),
            rejected: format!("{response}!"),
            ..Default::default()
        };
        let (tp, _) = tokenize_pairs(&[pair], &ByteTokenizer, &t, 10_000).unwrap();
        let tp = &tp[0];
        let full_prompt = format!("BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:");
        assert_eq!(tp.prompt, full_prompt.bytes().map(i32::from).collect::<Vec<_>>());
        let mut want: Vec<i32> = format!(" {response}").bytes().map(i32::from).collect();
        want.push(ByteTokenizer::EOS);
        assert_eq!(tp.chosen, want);
        assert_eq!(
            ByteTokenizer.decode(&[tp.prompt.clone(), tp.chosen.clone()].concat()),
            format!("{full_prompt} {response}")
        );
    }
    // No second space when the response or the template already has one.
    assert_eq!(t.response_text(" hi"), " hi");
    assert_eq!(t.response_text("hi"), " hi");
    assert_eq!(Template::new("Q: {prompt}\nA: ").unwrap().response_text("hi"), "hi");
}

#[test]
fn byte_tokenizer_round_trips() {
    let tok = ByteTokenizer;
    assert_eq!((tok.vocab_size(), tok.eos_id(), ByteTokenizer::BOS), (258, 257, 256));
    let mut r = rng(8);
    for _ in 0..200 {
        let s: String = (0..r.random_range(0..40))
            .map(|_| loop {
                if let Some(c) = char::from_u32(r.random_range(0..0x11000)) {
                    break c;
                }
            })
            .collect();
        let ids = tok.encode(&s);
        assert_eq!(ids.len(), s.len());
        assert!(ids.iter().all(|&i| (0..256).contains(&i)));
        assert_eq!(tok.decode(&ids), s);
        // Specials are left out of the text.
        let mut with_specials = vec![ByteTokenizer::BOS];
        with_specials.extend(&ids);
        with_specials.push(ByteTokenizer::EOS);
        assert_eq!(tok.decode(&with_specials), s);
    }
    // Lossy decode of a cut multi-byte character.
    let ids = tok.encode("é");
    assert_eq!(tok.decode(&ids[..1]), "\u{FFFD}");
}

/// The GPT-2 byte-level alphabet: byte b ↦ char, as in GPT-2's `bytes_to_unicode`.
fn gpt2_byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if printable.contains(&b) {
            chars[b as usize] = char::from_u32(b).unwrap();
        } else {
            chars[b as usize] = char::from_u32(256 + extra).unwrap();
            extra += 1;
        }
    }
    printable.clear();
    chars
}

/// A tiny GPT-2-style vocabulary: the 256 byte symbols, a few merges, and `<|endoftext|>` last.
fn tiny_gpt2_vocab() -> (BTreeMap<String, u32>, Vec<(String, String)>) {
    let byte_chars = gpt2_byte_chars();
    let mut vocab: BTreeMap<String, u32> = BTreeMap::new();
    for (b, c) in byte_chars.iter().enumerate() {
        vocab.insert(c.to_string(), b as u32);
    }
    let merges: Vec<(String, String)> =
        [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("o", "n"), ("Ġ", "on")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
    for (a, b) in &merges {
        let id = vocab.len() as u32;
        vocab.insert(format!("{a}{b}"), id);
    }
    let id = vocab.len() as u32;
    vocab.insert("<|endoftext|>".into(), id);
    (vocab, merges)
}

/// tokenizer.json as Hugging Face writes it for GPT-2 (merges as "a b" strings).
fn gpt2_tokenizer_json(vocab: &BTreeMap<String, u32>, merges: &[(String, String)]) -> Value {
    let eos = vocab["<|endoftext|>"];
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": eos, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": true, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "vocab": vocab,
                  "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>()}
    })
}

fn check_gpt2_like(tok: &dyn TextTokenizer, vocab: &BTreeMap<String, u32>) {
    assert_eq!(tok.eos_id(), vocab["<|endoftext|>"] as i32);
    assert_eq!(tok.vocab_size(), vocab.len());
    // Merges apply: " the cat on" is 4 tokens (Ġthe, Ġcat, Ġon after "x" ...).
    let ids = tok.encode("x the cat on");
    let want: Vec<i32> = ["x", "Ġthe", "Ġcat", "Ġon"].iter().map(|t| vocab[*t] as i32).collect();
    assert_eq!(ids, want);
    // The GPT-2 regex splits "'s" and digits; every byte round-trips.
    let mut r = rng(9);
    for _ in 0..100 {
        let s = format!("{} it's 42\n\t{}", random_text(&mut r, 8), random_text(&mut r, 3));
        let ids = tok.encode(&s);
        assert!(ids.iter().all(|&i| i >= 0 && (i as usize) < tok.vocab_size()));
        assert_eq!(tok.decode(&ids), s);
    }
    // EOS is a single special token, left out when decoding.
    let mut ids = tok.encode(" the");
    ids.push(tok.eos_id());
    assert_eq!(tok.decode(&ids), " the");
    assert_eq!(tok.encode("<|endoftext|>"), vec![tok.eos_id()]);
}

#[test]
fn hf_tokenizer_json_loads_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (vocab, merges) = tiny_gpt2_vocab();

    // 1. tokenizer.json in Hugging Face's GPT-2 layout.
    let model_dir = dir.path().join("gpt2-tiny");
    fs::create_dir(&model_dir).unwrap();
    let tokenizer_json = model_dir.join("tokenizer.json");
    fs::write(&tokenizer_json, serde_json::to_vec_pretty(&gpt2_tokenizer_json(&vocab, &merges)).unwrap()).unwrap();
    let tok = HfTokenizer::from_file(&tokenizer_json).unwrap();
    check_gpt2_like(&tok, &vocab);
    check_gpt2_like(load_tokenizer(Some(&model_dir)).unwrap().as_ref(), &vocab);

    // 2. Built through the tokenizers API from vocab.json + merges.txt, saved as tokenizer.json (the
    //    crate's current serialization), loaded back.
    let old_dir = dir.path().join("gpt2-old");
    fs::create_dir(&old_dir).unwrap();
    fs::write(old_dir.join("vocab.json"), serde_json::to_vec(&vocab).unwrap()).unwrap();
    let merges_txt: String = std::iter::once("#version: 0.2".to_string())
        .chain(merges.iter().map(|(a, b)| format!("{a} {b}")))
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(old_dir.join("merges.txt"), merges_txt + "\n").unwrap();
    let from_files = HfTokenizer::from_gpt2_files(&old_dir.join("vocab.json"), &old_dir.join("merges.txt")).unwrap();
    check_gpt2_like(&from_files, &vocab);
    check_gpt2_like(load_tokenizer(Some(&old_dir)).unwrap().as_ref(), &vocab);
    let saved_dir = dir.path().join("gpt2-saved");
    fs::create_dir(&saved_dir).unwrap();
    from_files.inner().save(saved_dir.join("tokenizer.json"), false).unwrap();
    check_gpt2_like(load_tokenizer(Some(&saved_dir)).unwrap().as_ref(), &vocab);

    // Through tokenize_pairs: the response's leading space merges into its first token ("Ġthe").
    let pair =
        PreferencePair { prompt: "x".into(), chosen: "the cat".into(), rejected: "on".into(), ..Default::default() };
    let (tp, _) = tokenize_pairs(&[pair], &tok, &Template::new("{prompt}:").unwrap(), 64).unwrap();
    let ids = |toks: &[&str]| toks.iter().map(|t| vocab[*t] as i32).collect::<Vec<_>>();
    assert_eq!(tp[0].prompt, ids(&["x", ":"]));
    assert_eq!(tp[0].chosen, ids(&["Ġthe", "Ġcat", "<|endoftext|>"]));
    assert_eq!(tp[0].rejected, ids(&["Ġon", "<|endoftext|>"]));

    // Errors name the file.
    let broken = dir.path().join("broken");
    fs::create_dir(&broken).unwrap();
    fs::write(broken.join("tokenizer.json"), b"{\"model\": 3}").unwrap();
    let err = load_tokenizer(Some(&broken)).err().expect("broken tokenizer.json must fail").to_string();
    assert!(err.contains("broken/tokenizer.json"), "{err}");
    let err = HfTokenizer::from_file_with_eos(&tokenizer_json, "</s>").unwrap_err().to_string();
    assert!(err.contains("\"</s>\" is not in the vocabulary"), "{err}");
}

#[test]
fn load_tokenizer_falls_back_to_bytes() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(load_tokenizer(None).unwrap().vocab_size(), ByteTokenizer::VOCAB_SIZE);
    assert_eq!(load_tokenizer(Some(dir.path())).unwrap().eos_id(), ByteTokenizer::EOS);
    let err = load_tokenizer(Some(&dir.path().join("missing"))).err().unwrap().to_string();
    assert!(err.contains("does not exist"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// truncation

#[test]
fn truncation_follows_the_rules_and_counts() {
    let mut r = rng(10);
    let template = Template::new("U:{prompt}A:").unwrap();
    let tok = ByteTokenizer;
    let mut totals = (0, 0, 0, 0);
    for max_len in [6usize, 12, 20, 40, 80] {
        for min_prompt in [1usize, 4, 8] {
            let pairs: Vec<PreferencePair> = (0..300)
                .map(|_| {
                    let word = |r: &mut ChaCha8Rng, n: usize| -> String {
                        (0..r.random_range(1..=n)).map(|_| (b'a' + r.random_range(0..3u8)) as char).collect()
                    };
                    PreferencePair {
                        prompt: word(&mut r, 40),
                        chosen: word(&mut r, 40),
                        rejected: word(&mut r, 40),
                        chosen_unsafe: r.random_bool(0.5),
                        rejected_unsafe: r.random_bool(0.5),
                    }
                })
                .collect();
            let limits = Truncation { max_len, min_prompt_tokens: min_prompt };
            let (out, rep) = tokenize_pairs_with(&pairs, &tok, &template, &limits).unwrap();
            assert_eq!(rep.pairs_in, pairs.len());
            assert_eq!(rep.kept, out.len());
            assert_eq!(rep.kept + rep.dropped(), pairs.len());
            assert!(!rep.to_string().contains('\n'));

            // Recompute each pair's fate independently and compare.
            let mut expect_out = Vec::new();
            let (mut too_long, mut identical, mut prompts_cut, mut responses_cut, mut longest) = (0, 0, 0, 0, 0);
            for p in &pairs {
                let full_prompt: Vec<i32> = template.render(&p.prompt).bytes().map(i32::from).collect();
                let mut prompt = full_prompt.clone();
                let mut c: Vec<i32> = format!(" {}", p.chosen).bytes().map(i32::from).collect();
                let mut rj: Vec<i32> = format!(" {}", p.rejected).bytes().map(i32::from).collect();
                c.push(257);
                rj.push(257);
                let resp_max = c.len().max(rj.len());
                let mut cut = 0;
                if prompt.len() + resp_max > max_len {
                    // The prompt keeps as much as fits, at least min(prompt, min_prompt).
                    let floor = prompt.len().min(min_prompt);
                    let keep = (floor..=prompt.len()).rev().find(|&k| k + resp_max <= max_len).unwrap_or(floor);
                    prompt = prompt[prompt.len() - keep..].to_vec();
                    if prompt.len() >= max_len {
                        too_long += 1;
                        continue;
                    }
                    let room = max_len - prompt.len();
                    for resp in [&mut c, &mut rj] {
                        if resp.len() > room {
                            resp.truncate(room);
                            cut += 1;
                        }
                    }
                }
                if c == rj {
                    identical += 1;
                    continue;
                }
                prompts_cut += usize::from(prompt.len() < full_prompt.len());
                responses_cut += cut;
                longest = longest.max(prompt.len() + c.len().max(rj.len()));
                expect_out.push(TokenizedPair {
                    prompt,
                    chosen: c,
                    rejected: rj,
                    chosen_unsafe: p.chosen_unsafe,
                    rejected_unsafe: p.rejected_unsafe,
                });
            }
            assert_eq!(out, expect_out, "max_len {max_len} min_prompt {min_prompt}");
            assert_eq!(
                (
                    rep.dropped_too_long,
                    rep.dropped_identical,
                    rep.prompts_truncated,
                    rep.responses_truncated,
                    rep.longest_sequence
                ),
                (too_long, identical, prompts_cut, responses_cut, longest),
                "max_len {max_len} min_prompt {min_prompt}"
            );

            // The rules, stated directly on the output.
            for t in &out {
                assert!(t.prompt.len() + t.chosen.len() <= max_len && t.prompt.len() + t.rejected.len() <= max_len);
                assert!(!t.prompt.is_empty() && !t.chosen.is_empty() && !t.rejected.is_empty());
                for resp in [&t.chosen, &t.rejected] {
                    let eos_count = resp.iter().filter(|&&i| i == 257).count();
                    assert!(eos_count <= 1 && (eos_count == 0 || *resp.last().unwrap() == 257));
                }
            }
            totals.0 += rep.prompts_truncated;
            totals.1 += rep.responses_truncated;
            totals.2 += rep.dropped_too_long;
            totals.3 += rep.dropped_identical;
        }
    }
    assert!(totals.0 > 0 && totals.1 > 0 && totals.2 > 0 && totals.3 > 0, "every rule exercised: {totals:?}");
}

#[test]
fn truncated_responses_lose_eos_and_prompts_are_cut_from_the_left() {
    let tok = ByteTokenizer;
    let t = Template::new("{prompt}").unwrap();
    let pair = PreferencePair {
        prompt: "0123456789abcdefghij".into(),
        chosen: "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx".into(), // " " + 30 + EOS = 32 tokens
        rejected: "yy".into(),                           // 4 tokens
        ..Default::default()
    };
    let limits = Truncation { max_len: 24, min_prompt_tokens: 8 };
    let (out, rep) = tokenize_pairs_with(std::slice::from_ref(&pair), &tok, &t, &limits).unwrap();
    let tp = &out[0];
    assert_eq!(tok.decode(&tp.prompt), "cdefghij"); // the last 8 prompt bytes
    assert_eq!(tp.chosen.len(), 16);
    assert!(!tp.chosen.contains(&ByteTokenizer::EOS));
    assert_eq!(tp.rejected, vec![b' ' as i32, b'y' as i32, b'y' as i32, ByteTokenizer::EOS]);
    assert_eq!((rep.prompts_truncated, rep.responses_truncated, rep.longest_sequence), (1, 1, 24));

    // Only as much prompt as needed is cut.
    let limits = Truncation { max_len: 45, min_prompt_tokens: 8 };
    let (out, rep) = tokenize_pairs_with(std::slice::from_ref(&pair), &tok, &t, &limits).unwrap();
    assert_eq!(tok.decode(&out[0].prompt), "789abcdefghij"); // 45 − 32 prompt tokens
    assert_eq!(out[0].prompt.len() + out[0].chosen.len(), 45);
    assert_eq!((rep.prompts_truncated, rep.responses_truncated), (1, 0));
    assert_eq!(*out[0].chosen.last().unwrap(), ByteTokenizer::EOS);

    // A pair that cannot fit is dropped and counted.
    let limits = Truncation { max_len: 8, min_prompt_tokens: 8 };
    let (out, rep) = tokenize_pairs_with(std::slice::from_ref(&pair), &tok, &t, &limits).unwrap();
    assert!(out.is_empty());
    assert_eq!(rep.dropped_too_long, 1);

    // Responses that become identical after truncation are dropped.
    let same_start =
        PreferencePair { prompt: "p".into(), chosen: "abcdef".into(), rejected: "abcxyz".into(), ..Default::default() };
    let (out, rep) = tokenize_pairs(&[same_start], &tok, &t, 4).unwrap();
    assert!(out.is_empty());
    assert_eq!(rep.dropped_identical, 1);
}

// ---------------------------------------------------------------------------------------------
// batching

fn random_tokenized(n: usize, seed: u64) -> Vec<TokenizedPair> {
    let mut r = rng(seed);
    let seq = |r: &mut ChaCha8Rng, lo: usize, hi: usize| -> Vec<i32> {
        (0..r.random_range(lo..=hi)).map(|_| r.random_range(0..258)).collect()
    };
    (0..n)
        .map(|_| TokenizedPair {
            prompt: seq(&mut r, 1, 30),
            chosen: seq(&mut r, 1, 40),
            rejected: seq(&mut r, 1, 40),
            chosen_unsafe: r.random_bool(0.3),
            rejected_unsafe: r.random_bool(0.5),
        })
        .collect()
}

fn check_preference_batch(batch: &PreferenceBatch, pairs: &[TokenizedPair]) {
    let pk = &batch.packed;
    assert_eq!(pk.num_seqs(), 2 * batch.num_pairs());
    assert_eq!((batch.unsafe_flags.len(), batch.lengths.len()), (2 * batch.num_pairs(), 2 * batch.num_pairs()));
    assert_eq!(
        (pk.tokens.len(), pk.targets.len(), pk.positions.len()),
        (pk.num_tokens(), pk.num_tokens(), pk.num_tokens())
    );
    for (k, &id) in batch.pair_ids.iter().enumerate() {
        let p = &pairs[id];
        for (s, resp, uns) in [(2 * k, &p.chosen, p.chosen_unsafe), (2 * k + 1, &p.rejected, p.rejected_unsafe)] {
            let (a, b) = (pk.cu_seqlens[s] as usize, pk.cu_seqlens[s + 1] as usize);
            assert_eq!(&pk.tokens[a..b], &[p.prompt.clone(), resp.clone()].concat()[..]);
            assert_eq!(batch.lengths[s] as usize, resp.len());
            assert_eq!(pk.num_targets(s), resp.len());
            assert_eq!(batch.unsafe_flags[s], uns as i32);
            // Targets: the response tokens, from the last prompt position on.
            let want: Vec<i32> = (0..b - a)
                .map(|i| if i + 1 >= p.prompt.len() && i + 1 < b - a { resp[i + 1 - p.prompt.len()] } else { -1 })
                .collect();
            assert_eq!(&pk.targets[a..b], &want[..]);
        }
    }
}

#[test]
fn batches_respect_the_budget_and_cover_each_pair_once_per_epoch() {
    let pairs = random_tokenized(97, 11);
    let max_pair = pairs.iter().map(TokenizedPair::num_tokens).max().unwrap();
    for budget in [1usize, 60, max_pair, 400, 5000] {
        let mut b = Batcher::new(pairs.len(), 42);
        for epoch in 0..3 {
            assert_eq!(b.epoch(), epoch);
            let expected_batches = b.batches_in_epoch(&pairs, budget, epoch);
            let order = b.order_of_epoch(epoch);
            let mut seen = Vec::new();
            let mut batches = 0;
            loop {
                let batch = b.next_batch(&pairs, budget);
                batches += 1;
                check_preference_batch(&batch, &pairs);
                let tokens: usize = batch.pair_ids.iter().map(|&i| pairs[i].num_tokens()).sum();
                assert_eq!(tokens, batch.packed.num_tokens());
                assert!(
                    tokens <= budget || batch.num_pairs() == 1,
                    "budget {budget}: {tokens} tokens in {} pairs",
                    batch.num_pairs()
                );
                seen.extend(batch.pair_ids.iter().copied());
                // Greedy: the next pair in this epoch's order would not have fit.
                if seen.len() < pairs.len() {
                    assert!(tokens + pairs[order[seen.len()]].num_tokens() > budget);
                }
                if b.epoch() != epoch {
                    break;
                }
            }
            assert_eq!(seen, order, "epoch {epoch} visits the pairs in its order, each once");
            let unique: HashSet<_> = seen.iter().collect();
            assert_eq!(unique.len(), pairs.len());
            assert_eq!(batches, expected_batches);
            if budget == 1 {
                assert_eq!(batches, pairs.len());
            }
            if budget == 5000 {
                assert!(batches < pairs.len() / 3);
            }
        }
    }
}

#[test]
fn shuffle_is_deterministic_by_seed_and_differs_across_epochs() {
    let pairs = random_tokenized(60, 12);
    let run = |seed: u64| -> Vec<Vec<usize>> {
        let mut b = Batcher::new(pairs.len(), seed);
        (0..40).map(|_| b.next_batch(&pairs, 300).pair_ids).collect()
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
    let b = Batcher::new(pairs.len(), 5);
    assert_ne!(b.order_of_epoch(0), b.order_of_epoch(1));
    let mut sorted = b.order_of_epoch(3);
    sorted.sort();
    assert_eq!(sorted, (0..60).collect::<Vec<_>>());
}

#[test]
fn restored_batcher_yields_the_same_batches() {
    let pairs = random_tokenized(37, 13);
    let budget = 250;
    let mut reference = Batcher::new(pairs.len(), 77);
    let all: Vec<PreferenceBatch> = (0..60).map(|_| reference.next_batch(&pairs, budget)).collect();
    assert!(reference.epoch() >= 3, "the run must cross epochs");
    for stop in [0usize, 1, 7, 19, 33, 59] {
        let mut b = Batcher::new(pairs.len(), 77);
        for batch in &all[..stop] {
            assert_eq!(&b.next_batch(&pairs, budget), batch);
        }
        // Save through JSON, as a checkpoint's state.json would.
        let saved = serde_json::to_string(&b.state()).unwrap();
        let state: BatcherState = serde_json::from_str(&saved).unwrap();
        let mut resumed = Batcher::restore(pairs.len(), 77, state).unwrap();
        assert_eq!((resumed.epoch(), resumed.position()), (b.epoch(), b.position()));
        for batch in &all[stop..] {
            assert_eq!(&resumed.next_batch(&pairs, budget), batch);
        }
    }
    let state = BatcherState { epoch: 2, position: 3, num_pairs: 37 };
    let err = Batcher::restore(40, 77, state).unwrap_err().to_string();
    assert!(err.contains("37 pairs") && err.contains("40"), "{err}");
    let err = Batcher::restore(37, 77, BatcherState { position: 37, ..state }).unwrap_err().to_string();
    assert!(err.contains("outside"), "{err}");
}

#[test]
fn sft_batches_pack_prompt_and_chosen() {
    let pairs = random_tokenized(30, 14);
    let ids: Vec<usize> = vec![4, 0, 17, 4];
    let packed = sft_batch(&pairs, &ids);
    assert_eq!(packed.num_seqs(), ids.len());
    for (s, &id) in ids.iter().enumerate() {
        let (a, b) = (packed.cu_seqlens[s] as usize, packed.cu_seqlens[s + 1] as usize);
        assert_eq!(&packed.tokens[a..b], &[pairs[id].prompt.clone(), pairs[id].chosen.clone()].concat()[..]);
        assert_eq!(packed.num_targets(s), pairs[id].chosen.len());
    }
    let mut b = Batcher::new(pairs.len(), 3);
    let mut seen = BTreeSet::new();
    while b.epoch() == 0 {
        let (packed, ids) = b.next_sft_batch(&pairs, 100);
        assert!(packed.num_tokens() <= 100 || ids.len() == 1);
        assert_eq!(packed.num_tokens(), ids.iter().map(|&i| pairs[i].sft_tokens()).sum::<usize>());
        for i in ids {
            assert!(seen.insert(i));
        }
    }
    assert_eq!(seen.len(), pairs.len());
    let eval = preference_batch(&pairs, &[3, 1]);
    check_preference_batch(&eval, &pairs);
    assert_eq!(eval.pair_ids, vec![3, 1]);
}

// ---------------------------------------------------------------------------------------------
// synthetic data

#[test]
fn synthetic_rows_round_trip_through_the_loader() {
    let dir = tempfile::tempdir().unwrap();
    let rows = synthetic_pku_rows(800, 21);
    assert_eq!(rows, synthetic_pku_rows(800, 21));
    assert_ne!(rows, synthetic_pku_rows(800, 22));
    let path = dir.path().join("synthetic.jsonl");
    write_pku_jsonl(&path, &rows).unwrap();

    let (better, rep) = load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap();
    assert_eq!(rep.format, DataFormat::PkuSafeRlhf);
    assert_eq!(better, synthetic_safety_pairs(800, 21));

    let (safe, rep) = load_pairs(&path, DataFormat::Auto, PairSelection::SafeDpo, false).unwrap();
    let (transformed, counts) = safedpo_transform(better.clone());
    assert_eq!(safe, transformed);
    assert_eq!((rep.kept, rep.swapped, rep.dropped), (counts.kept, counts.swapped, counts.dropped));
    // PKU-like mix: T(D) swaps a good share and drops a few; some pairs are helpfulness-only.
    assert!(counts.swapped > 150 && counts.dropped > 10 && counts.kept > 300, "{counts:?}");
    let both_safe = better.iter().filter(|p| !p.chosen_unsafe && !p.rejected_unsafe).count();
    let mixed = better.iter().filter(|p| p.chosen_unsafe != p.rejected_unsafe).count();
    assert!(both_safe > 200 && mixed > 200, "both safe {both_safe}, mixed {mixed}");
    assert!(safe.iter().all(|p| !p.chosen_unsafe));

    // Short texts, and each prompt is its own topic with one phrasing.
    for p in &better {
        assert!(p.prompt.len() + p.chosen.len().max(p.rejected.len()) <= 140, "{p:?}");
        assert_ne!(p.chosen, p.rejected);
    }
    let prompts: BTreeSet<&str> = better.iter().map(|p| p.prompt.as_str()).collect();
    assert!(prompts.len() >= 60, "{} prompts", prompts.len());

    // Written pairs (generic format) also read back.
    let generic = dir.path().join("pairs.jsonl");
    write_pairs_jsonl(&generic, &safe).unwrap();
    let (again, rep) = load_pairs(&generic, DataFormat::Auto, PairSelection::Better, false).unwrap();
    assert_eq!((again, rep.format), (safe, DataFormat::Jsonl));
}

#[test]
fn holdout_split_keeps_prompts_on_one_side() {
    let pairs = synthetic_safety_pairs(1000, 31);
    for fraction in [0.1, 0.2, 0.5] {
        let (train, eval) = split_holdout(pairs.clone(), fraction, 4);
        assert_eq!(train.len() + eval.len(), pairs.len());
        let train_prompts: HashSet<&str> = train.iter().map(|p| p.prompt.as_str()).collect();
        assert!(eval.iter().all(|p| !train_prompts.contains(p.prompt.as_str())), "no held-out prompt is trained on");
        let got = eval.len() as f64 / pairs.len() as f64;
        assert!((got - fraction).abs() < 0.05, "fraction {fraction}: got {got}");
        // Both sides keep the input order.
        let mut it = pairs.iter();
        assert!(eval.iter().all(|e| it.any(|p| p == e)));
        assert_eq!(split_holdout(pairs.clone(), fraction, 4), (train.clone(), eval.clone()));
        assert_ne!(split_holdout(pairs.clone(), fraction, 5).1, eval);
    }
    // Degenerate fractions and a single group.
    assert_eq!(split_holdout(pairs.clone(), 0.0, 1).1.len(), 0);
    let (train, eval) = split_holdout(pairs.clone(), 1.0, 1);
    assert_eq!((train.len(), eval.len()), (0, pairs.len()));
    let one_prompt: Vec<PreferencePair> = pairs.iter().filter(|p| p.prompt == pairs[0].prompt).cloned().collect();
    let (train, eval) = split_holdout(one_prompt.clone(), 0.3, 1);
    assert_eq!((train.len(), eval.len()), (one_prompt.len(), 0));
    // Generic keys.
    let (a, b) = split_holdout_by((0..100).collect::<Vec<u32>>(), 0.25, 9, |x| x / 10);
    assert_eq!((a.len(), b.len()), (70, 30)); // whole groups of 10 until at least 25 are held out
    let groups_b: HashSet<u32> = b.iter().map(|x| x / 10).collect();
    assert!(a.iter().all(|x| !groups_b.contains(&(x / 10))));
}

#[test]
fn synthetic_pairs_tokenize_short_with_the_byte_tokenizer() {
    let pairs = synthetic_safety_pairs(500, 41);
    let (tokenized, rep) = tokenize_pairs(&pairs, &ByteTokenizer, &Template::default(), 256).unwrap();
    assert_eq!(rep.kept, pairs.len());
    assert_eq!((rep.prompts_truncated, rep.responses_truncated), (0, 0));
    assert!(rep.longest_sequence <= 190, "{rep}");
    assert!(tokenized.iter().all(|t| *t.chosen.last().unwrap() == ByteTokenizer::EOS));
}

// ---------------------------------------------------------------------------------------------
// learnability of the demo data (slow: about a minute on 2 cores; `cargo test --release -- --ignored`)

mod learnability {
    use std::sync::Arc;

    use safedpo::backend::cpu::CpuBackend;
    use safedpo::backend::prelude::*;
    use safedpo::data::*;
    use safedpo::loss::{pair_loss, Objective, PairInput};
    use safedpo::model::{DeviceBatch, Gpt2, Gpt2Config};
    use safedpo::optim::{clip_scale, AdamW, AdamWConfig};

    fn seq_logps(model: &mut Gpt2<CpuBackend>, backend: &CpuBackend, packed: &PackedBatch) -> Vec<f32> {
        let batch = DeviceBatch::upload(backend, packed).unwrap();
        backend.download(model.forward(&batch).unwrap()).unwrap()
    }

    fn adamw(lr: f32) -> AdamWConfig {
        AdamWConfig { lr, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.0 }
    }

    /// SFT on the chosen (safe) responses, then SafeDPO against the SFT model: on held-out topics the
    /// implicit reward must prefer the safe response of nearly every pair with one unsafe response.
    #[test]
    #[ignore = "slow: trains a tiny GPT-2 for about a minute"]
    fn synthetic_data_is_learnable_by_a_tiny_gpt2() {
        let (pairs, _) = safedpo_transform(synthetic_safety_pairs(3000, 1));
        let (train, eval) = split_holdout(pairs, 0.2, 7);
        let template = Template::default();
        let (train, _) = tokenize_pairs(&train, &ByteTokenizer, &template, 256).unwrap();
        let (eval, _) = tokenize_pairs(&eval, &ByteTokenizer, &template, 256).unwrap();
        let mixed: Vec<usize> = (0..eval.len()).filter(|&i| eval[i].chosen_unsafe != eval[i].rejected_unsafe).collect();
        assert!(mixed.len() > 100);

        let backend = Arc::new(CpuBackend::new());
        let config = Gpt2Config {
            vocab_size: 258,
            n_positions: 256,
            n_embd: 64,
            n_layer: 2,
            n_head: 4,
            layer_norm_epsilon: 1e-5,
        };
        let mut model = Gpt2::random(backend.clone(), config, 0).unwrap();
        let mut opt = AdamW::new(&mut model, adamw(3e-3)).unwrap();
        let mut batcher = Batcher::new(train.len(), 1);
        let sft_steps = 60;
        for step in 0..sft_steps {
            let (packed, _) = batcher.next_sft_batch(&train, 4096);
            let batch = DeviceBatch::upload(&*backend, &packed).unwrap();
            model.zero_grad().unwrap();
            let num_seqs = backend.buf_len(model.forward(&batch).unwrap());
            let targets: usize = (0..packed.num_seqs()).map(|s| packed.num_targets(s)).sum();
            let grad = backend.upload(&vec![-1.0 / targets as f32; num_seqs]).unwrap();
            model.backward(&batch, &grad).unwrap();
            let (_, scale) = clip_scale(&model, 1.0).unwrap();
            opt.step(&mut model, 3e-3 * (1.0 - step as f32 / sft_steps as f32).max(0.1), scale).unwrap();
        }

        let eval_batch = preference_batch(&eval, &mixed);
        let ref_eval = seq_logps(&mut model, &backend, &eval_batch.packed);
        let mut reference = Gpt2::from_host(backend.clone(), &model.to_host().unwrap()).unwrap();
        let mut opt = AdamW::new(&mut model, adamw(1e-3)).unwrap();
        let objective = Objective::SafeDpo { beta: 0.1, delta: 10.0 };
        let mut batcher = Batcher::new(train.len(), 2);
        for _ in 0..30 {
            let batch = batcher.next_batch(&train, 4096);
            let ref_logp = seq_logps(&mut reference, &backend, &batch.packed);
            let device_batch = DeviceBatch::upload(&*backend, &batch.packed).unwrap();
            model.zero_grad().unwrap();
            let logp = backend.download(model.forward(&device_batch).unwrap()).unwrap();
            let p = batch.num_pairs();
            let mut grad = vec![0f32; 2 * p];
            for k in 0..p {
                let (c, r) = (2 * k, 2 * k + 1);
                let out = pair_loss(
                    &objective,
                    &PairInput {
                        policy_chosen: logp[c] as f64,
                        policy_rejected: logp[r] as f64,
                        ref_chosen: ref_logp[c] as f64,
                        ref_rejected: ref_logp[r] as f64,
                        chosen_unsafe: batch.unsafe_flags[c] == 1,
                        rejected_unsafe: batch.unsafe_flags[r] == 1,
                        chosen_len: batch.lengths[c] as u32,
                        rejected_len: batch.lengths[r] as u32,
                    },
                );
                grad[c] = (out.d_policy_chosen / p as f64) as f32;
                grad[r] = (out.d_policy_rejected / p as f64) as f32;
            }
            model.backward(&device_batch, &backend.upload(&grad).unwrap()).unwrap();
            let (_, scale) = clip_scale(&model, 1.0).unwrap();
            opt.step(&mut model, 1e-3, scale).unwrap();
        }

        let policy_eval = seq_logps(&mut model, &backend, &eval_batch.packed);
        let prefers_safe = (0..mixed.len())
            .filter(|&k| {
                let reward = |s: usize| policy_eval[s] - ref_eval[s];
                let (safe, unsafe_) =
                    if eval_batch.unsafe_flags[2 * k] == 0 { (2 * k, 2 * k + 1) } else { (2 * k + 1, 2 * k) };
                reward(safe) > reward(unsafe_)
            })
            .count();
        let accuracy = prefers_safe as f64 / mixed.len() as f64;
        assert!(accuracy > 0.9, "held-out safe preference {accuracy:.3}");
    }
}
