//! Dataset formats, pair selection and T(D), and bad input named by file, line and field.

use super::*;

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
        ..Default::default()
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

#[test]
fn a_leading_byte_order_mark_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let mut r = rng(7);
    let (v0, p0) = random_generic(&mut r);
    let (v1, p1) = random_generic(&mut r);
    let mut first = b"\xEF\xBB\xBF".to_vec();
    first.extend(json_line(&v0));
    let path = write_lines(dir.path(), "bom.jsonl", &[first, json_line(&v1)]);
    let (pairs, rep) = load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap();
    assert_eq!((pairs, rep.lines), (vec![p0, p1], 2));
    // Only at the start of the file: elsewhere it is a bad line, named.
    let mut second = b"\xEF\xBB\xBF".to_vec();
    second.extend(json_line(&v1));
    let path = write_lines(dir.path(), "late_bom.jsonl", &[json_line(&v0), second]);
    let err = load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:2: malformed JSON", path.display())), "{err}");
}

#[test]
fn a_field_given_twice_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let good = json_line(&json!({"prompt": "p", "chosen": "a", "rejected": "b"}));
    let twice = br#"{"prompt": "p", "chosen": "a", "rejected": "b", "chosen": "c"}"#.to_vec();
    let path = write_lines(dir.path(), "twice.jsonl", &[good.clone(), twice]);
    let err = load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap_err().to_string();
    assert_eq!(err, format!("{}:2: field 'chosen' appears twice in the row", path.display()));
    // Repeated keys inside a field the loader does not read are that field's business.
    let nested = br#"{"prompt": "p", "chosen": "a", "rejected": "b", "meta": {"x": 1, "x": 2}}"#.to_vec();
    let path = write_lines(dir.path(), "nested.jsonl", &[good, nested]);
    assert_eq!(load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap().0.len(), 2);
}

#[test]
fn skipping_every_line_says_so_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let lines = vec![b"{oops".to_vec(), json_line(&json!({"prompt": "p", "chosen": 3})), b"[]".to_vec()];
    let path = write_lines(dir.path(), "all_bad.jsonl", &lines);
    let err = load_pairs(&path, DataFormat::Auto, PairSelection::Better, true).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}: all 3 lines are invalid", path.display())), "{err}");
    assert!(err.contains("the first, line 1: malformed JSON"), "{err}");

    // Some skipped: the report names the first and why.
    let mut r = rng(8);
    let lines = vec![json_line(&random_generic(&mut r).0), json_line(&json!({"prompt": "p", "chosen": 3}))];
    let path = write_lines(dir.path(), "one_bad.jsonl", &lines);
    let (_, rep) = load_pairs(&path, DataFormat::Auto, PairSelection::Better, true).unwrap();
    assert_eq!(
        rep.first_invalid.as_deref(),
        Some("line 2: field 'chosen': expected a non-empty string, found number 3")
    );
    assert!(
        rep.to_string().ends_with(
            "1 invalid skipped (the first, line 2: field 'chosen': expected a non-empty string, found number 3)"
        ),
        "{rep}"
    );
}
