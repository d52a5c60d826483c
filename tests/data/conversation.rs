//! TRL's conversational rows (explicit and implicit prompts) and TRL's truncation, against what TRL
//! 1.x's `DPOTrainer` makes of the same rows with the tokenizers of tests/fixtures/tokenizers/
//! (tests/fixtures/trl_dpo_data.json, written by scripts/make-trl-option-fixtures.py); then the
//! loader's errors, the safety labels through T(D), and writing the rows back.

use super::*;

fn trl_fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trl_dpo_data.json");
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn tokenizer_dir(family: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers").join(family)
}

fn ids(v: &Value) -> Vec<i32> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect()
}

fn usize_of(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

/// The fixture's rows as a JSONL file, loaded in helpfulness order (the rows as written).
fn load_fixture_rows(dir: &Path, fixture: &Value) -> Vec<PreferencePair> {
    let lines: Vec<Vec<u8>> = fixture["rows"].as_array().unwrap().iter().map(json_line).collect();
    let path = write_lines(dir, "conversations.jsonl", &lines);
    let (pairs, report) = load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap();
    assert_eq!(
        (report.format, report.conversational, report.first_conversational_line),
        (DataFormat::Jsonl, 6, Some(1))
    );
    assert!(report.to_string().ends_with("; 6 conversational"), "{report}");
    pairs
}

const FAMILIES: [&str; 5] = ["llama2", "llama2_legacy", "mistral", "llama3", "qwen2"];

#[test]
fn conversational_rows_tokenize_as_trl() {
    let fixture = trl_fixture();
    let dir = tempfile::tempdir().unwrap();
    let pairs = load_fixture_rows(dir.path(), &fixture);
    for (pair, row) in pairs.iter().zip(fixture["rows"].as_array().unwrap()) {
        let flag = |field: &str| row.get(field).and_then(Value::as_bool).unwrap_or(false);
        assert_eq!((pair.chosen_unsafe, pair.rejected_unsafe), (flag("chosen_unsafe"), flag("rejected_unsafe")));
    }
    for family in FAMILIES {
        let dir = tokenizer_dir(family);
        let tok = load_tokenizer(Some(&dir)).unwrap();
        let format = sequence_format(CHAT_TEMPLATE, Some(&dir)).unwrap();
        let cases = fixture["families"][family].as_array().unwrap();
        let (tokenized, report) = tokenize_pairs(&pairs, tok.as_ref(), format.as_ref(), 100_000).unwrap();
        assert_eq!(report.kept, pairs.len(), "{family}: {report}");
        for (i, ((tp, case), pair)) in tokenized.iter().zip(cases).zip(&pairs).enumerate() {
            assert!(case.get("error").is_none(), "{family} row {i}: TRL refused it: {case}");
            // The prompt TRL extracted (or was given) is ours.
            let prompt: Vec<ChatMessage> = serde_json::from_value(case["prompt"].clone()).unwrap();
            assert_eq!(pair.conversation.as_ref().unwrap().prompt, prompt, "{family} row {i}");
            assert_eq!(tp.prompt, ids(&case["prompt_ids"]), "{family} row {i}: prompt");
            assert_eq!(tp.chosen, ids(&case["chosen_ids"]), "{family} row {i}: chosen");
            assert_eq!(tp.rejected, ids(&case["rejected_ids"]), "{family} row {i}: rejected");
        }
    }
}

/// One of TRL's truncated sequences: `(prompt + completion)[start..end]`, its completion from
/// `completion_start`.
struct TrlSequence {
    ids: Vec<i32>,
    completion_start: usize,
}

fn trl_sequence(prompt: &[i32], completion: &[i32], at: &Value) -> TrlSequence {
    let full = [prompt, completion].concat();
    TrlSequence {
        ids: full[usize_of(&at["start"])..usize_of(&at["end"])].to_vec(),
        completion_start: usize_of(&at["completion_start"]),
    }
}

/// `keep_start` gives TRL's sequences exactly (and drops what TRL's filter drops); `keep_end` gives
/// the longer sequence TRL's, and the shorter one TRL's without the prompt tokens the longer one cut
/// (the pair shares its prompt); a response of `max_len` tokens or more keeps the prompt's last token
/// and its own last `max_len − 1`, the tokens TRL's sequence carries loss on. A pair whose
/// responses end up identical is dropped here (TRL keeps it).
#[test]
fn truncation_modes_match_trl() {
    let fixture = trl_fixture();
    let dir = tempfile::tempdir().unwrap();
    let pairs = load_fixture_rows(dir.path(), &fixture);
    let (mut exact, mut identical) = (0, 0);
    for family in FAMILIES {
        let dir = tokenizer_dir(family);
        let tok = load_tokenizer(Some(&dir)).unwrap();
        let format = sequence_format(CHAT_TEMPLATE, Some(&dir)).unwrap();
        for (pair, case) in pairs.iter().zip(fixture["families"][family].as_array().unwrap()) {
            let (prompt, chosen, rejected) =
                (ids(&case["prompt_ids"]), ids(&case["chosen_ids"]), ids(&case["rejected_ids"]));
            for cut in case["truncation"].as_array().unwrap() {
                let max_len = usize_of(&cut["max_length"]);
                let mode = match cut["truncation_mode"].as_str().unwrap() {
                    "keep_start" => TruncationMode::KeepStart,
                    _ => TruncationMode::KeepEnd,
                };
                let limits = Truncation { mode, ..Truncation::new(max_len) };
                let what = format!("{family}, {mode:?} to {max_len}, prompt {}", prompt.len());
                let (out, report) =
                    tokenize_pairs_with(std::slice::from_ref(pair), tok.as_ref(), format.as_ref(), &limits).unwrap();
                if !cut["kept"].as_bool().unwrap() {
                    assert!(out.is_empty() && report.dropped_too_long == 1, "{what}: TRL drops it");
                    continue;
                }
                let trl = [
                    trl_sequence(&prompt, &chosen, &cut["chosen"]),
                    trl_sequence(&prompt, &rejected, &cut["rejected"]),
                ];
                let (want_prompt, want): (Vec<i32>, [Vec<i32>; 2]) = match mode {
                    TruncationMode::KeepStart => {
                        let p = trl[0].completion_start;
                        assert_eq!(p, trl[1].completion_start, "{what}");
                        (trl[0].ids[..p].to_vec(), [trl[0].ids[p..].to_vec(), trl[1].ids[p..].to_vec()])
                    }
                    _ => {
                        let longest = chosen.len().max(rejected.len());
                        if longest < max_len {
                            // The longer sequence as TRL; both responses whole after the shared prompt.
                            let longer = if chosen.len() >= rejected.len() { &trl[0] } else { &trl[1] };
                            let p = longer.completion_start;
                            assert_eq!(&longer.ids[..p], &prompt[prompt.len() - p..], "{what}");
                            (longer.ids[..p].to_vec(), [chosen.clone(), rejected.clone()])
                        } else {
                            let tail = |r: &[i32]| r[r.len() - r.len().min(max_len - 1)..].to_vec();
                            // TRL's sequence of the long response is its last max_len tokens, loss from the second.
                            let long =
                                if chosen.len() >= rejected.len() { (&trl[0], &chosen) } else { (&trl[1], &rejected) };
                            assert_eq!((long.0.completion_start, &long.0.ids[1..]), (0, &tail(long.1)[..]), "{what}");
                            (vec![*prompt.last().unwrap()], [tail(&chosen), tail(&rejected)])
                        }
                    }
                };
                if want[0] == want[1] {
                    assert!(out.is_empty() && report.dropped_identical == 1, "{what}: identical responses");
                    identical += 1;
                    continue;
                }
                assert_eq!(out.len(), 1, "{what}: {report}");
                let tp = &out[0];
                assert_eq!((&tp.prompt, &tp.chosen, &tp.rejected), (&want_prompt, &want[0], &want[1]), "{what}");
                for (ours, trl) in [&tp.chosen, &tp.rejected].into_iter().zip(&trl) {
                    let sequence = [&tp.prompt[..], ours].concat();
                    assert!(sequence.len() <= max_len, "{what}");
                    exact += usize::from(sequence == trl.ids && tp.prompt.len() == trl.completion_start);
                }
            }
        }
    }
    assert!(exact > 300 && identical > 0, "{exact} sequences as TRL's, {identical} pairs identical after the cut");
}

/// The loader's errors on conversational rows name the file, the line and the field.
#[test]
fn conversational_row_errors_name_file_line_and_field() {
    let user = json!({"role": "user", "content": "Hi"});
    let yes = json!({"role": "assistant", "content": "Hello"});
    let no = json!({"role": "assistant", "content": "Go away"});
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"prompt": [user], "chosen": [yes], "rejected": "Go away"}),
            "field 'rejected': expected a list of messages",
        ),
        (json!({"prompt": [user], "chosen": [yes]}), "field 'rejected': missing, expected a list of messages"),
        (
            json!({"prompt": [user], "chosen": [], "rejected": [no]}),
            "field 'chosen': an empty list, expected at least one message",
        ),
        (json!({"prompt": [], "chosen": [yes], "rejected": [no]}), "field 'prompt': an empty list"),
        (
            json!({"prompt": [user], "chosen": [{"role": 3, "content": "x"}], "rejected": [no]}),
            "field 'chosen[0].role': expected a non-empty string, found number 3",
        ),
        (
            json!({"prompt": [user], "chosen": [yes], "rejected": [{"content": "x"}]}),
            "field 'rejected[0].role': missing",
        ),
        (
            json!({"prompt": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "chosen": [yes], "rejected": [no]}),
            "field 'prompt[0].content': expected a string, found an array (multimodal content parts are not supported)",
        ),
        (
            json!({"prompt": [user], "chosen": [yes], "rejected": [{"role": "assistant"}]}),
            "field 'rejected[0].content': missing",
        ),
        (json!({"prompt": [user], "chosen": [yes, "more"], "rejected": [no]}), "field 'chosen[1]': expected a message"),
        (
            json!({"prompt": [user], "chosen": [yes], "rejected": [{"role": "assistant", "content": "", "tool_calls": []}]}),
            "field 'rejected[0].tool_calls': not supported",
        ),
        (
            json!({"chosen": [user, yes], "rejected": [no]}),
            "field 'rejected': its first message differs from 'chosen''s",
        ),
        (json!({"chosen": [user], "rejected": [user, no]}), "field 'rejected': one conversation is a single message"),
        (
            json!({"prompt": "Hi", "chosen": [yes], "rejected": [no]}),
            "field 'prompt': a string, but 'chosen' and 'rejected' are lists",
        ),
        (
            json!({"prompt": 1, "chosen": [yes], "rejected": [no]}),
            "field 'prompt': expected a list of messages, found number 1",
        ),
        (
            json!({"prompt": [user], "chosen": [yes], "rejected": [no], "chosen_unsafe": "yes"}),
            "field 'chosen_unsafe': expected true, false or null",
        ),
        (
            json!({"prompt": [user], "chosen": "Hello", "rejected": "Go away"}),
            "field 'prompt': expected a non-empty string, found an array (a prompt of messages needs",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let good = json_line(&json!({"prompt": [user], "chosen": [yes], "rejected": [no]}));
    for (k, (row, expect)) in cases.iter().enumerate() {
        let lines = vec![good.clone(), Vec::new(), json_line(row), good.clone()];
        let path = write_lines(dir.path(), &format!("bad{k}.jsonl"), &lines);
        let err = load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap_err().to_string();
        let want = format!("{}:3: {expect}", path.display());
        assert!(err.starts_with(&want), "case {k}: got\n  {err}\nwant prefix\n  {want}");
        let (pairs, report) = load_pairs(&path, DataFormat::Auto, PairSelection::Better, true).unwrap();
        assert_eq!((pairs.len(), report.skipped_invalid), (2, 1), "case {k}");
    }
}

/// Conversational rows need the chat template: with a text one, the load names the file and line of
/// the first, and tokenization refuses them.
#[test]
fn conversational_rows_need_the_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let text = json_line(&json!({"prompt": "p", "chosen": "a", "rejected": "b"}));
    let chat = json_line(&json!({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                 "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}));
    let path = write_lines(dir.path(), "mixed.jsonl", &[text.clone(), text, chat]);
    let (pairs, report) = load_pairs(&path, DataFormat::Auto, PairSelection::Better, false).unwrap();
    assert_eq!((report.conversational, report.first_conversational_line), (1, Some(3)));
    let err = report.check_template(&path, DEFAULT_TEMPLATE).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("{}:3: a conversational row", path.display()))
            && err.contains("data.template = \"chat\""),
        "{err}"
    );
    report.check_template(&path, CHAT_TEMPLATE).unwrap();
    let template = Template::new(DEFAULT_TEMPLATE).unwrap();
    let err = format!("{:#}", tokenize_pairs(&pairs, &ByteTokenizer, &template, 512).unwrap_err());
    assert!(err.contains("pair 2") && err.contains("needs the chat template"), "{err}");
    // A file without conversational rows passes with any template.
    let (_, report) = load_pairs(
        &write_lines(dir.path(), "text.jsonl", &[json_line(&json!({"prompt": "p", "chosen": "a", "rejected": "b"}))]),
        DataFormat::Auto,
        PairSelection::Better,
        false,
    )
    .unwrap();
    report.check_template(&path, DEFAULT_TEMPLATE).unwrap();
}

/// The safety labels travel with their messages through T(D) and `safer`, and written pairs read
/// back as they were.
#[test]
fn conversational_pairs_swap_with_their_labels_and_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let user = json!({"role": "user", "content": "How do I pick a lock?"});
    let safe = json!({"role": "assistant", "content": "I can't help with that."});
    let unsafe_ = json!({"role": "assistant", "content": "Use a tension wrench."});
    let row = json!({"prompt": [user], "chosen": [unsafe_], "rejected": [safe], "chosen_unsafe": true});
    let path = write_lines(dir.path(), "td.jsonl", &[json_line(&row)]);
    for selection in [PairSelection::SafeDpo, PairSelection::Safer] {
        let (pairs, report) = load_pairs(&path, DataFormat::Auto, selection, false).unwrap();
        assert_eq!((report.swapped, report.conversational), (1, 1));
        let conversation = pairs[0].conversation.as_ref().unwrap();
        assert_eq!(conversation.chosen, vec![ChatMessage::new("assistant", "I can't help with that.")]);
        assert_eq!(conversation.rejected, vec![ChatMessage::new("assistant", "Use a tension wrench.")]);
        assert_eq!((pairs[0].chosen_unsafe, pairs[0].rejected_unsafe), (false, true));
        assert!(pairs[0].chosen.contains("I can't help") && pairs[0].prompt.contains("pick a lock"));
    }
    let fixture = trl_fixture();
    let pairs = load_fixture_rows(dir.path(), &fixture);
    let out = dir.path().join("written.jsonl");
    write_pairs_jsonl(&out, &pairs).unwrap();
    let (back, _) = load_pairs(&out, DataFormat::Auto, PairSelection::Better, false).unwrap();
    assert_eq!(back, pairs);
}

/// TRL's `extract_prompt`: the first differing message starts the completions; when one conversation
/// is the other's start, the shorter one's last message is its completion (TRL's loop index).
#[test]
fn implicit_prompts_are_extracted_as_trl_does() {
    let m = |role: &str, content: &str| ChatMessage::new(role, content);
    let (u, a, u2, a2, b) =
        (m("user", "q"), m("assistant", "a"), m("user", "q2"), m("assistant", "a2"), m("assistant", "b"));
    let c =
        Conversation::extract_prompt(vec![u.clone(), a.clone(), u2.clone(), a2.clone()], vec![u.clone(), b.clone()])
            .unwrap();
    assert_eq!(
        (c.prompt, c.chosen, c.rejected),
        (vec![u.clone()], vec![a.clone(), u2.clone(), a2.clone()], vec![b.clone()])
    );
    let c =
        Conversation::extract_prompt(vec![u.clone(), a.clone(), u2.clone(), a2.clone()], vec![u.clone(), a.clone()])
            .unwrap();
    assert_eq!((c.prompt, c.chosen, c.rejected), (vec![u.clone()], vec![a.clone(), u2, a2], vec![a.clone()]));
    let c = Conversation::extract_prompt(vec![u.clone(), a.clone()], vec![u.clone(), a.clone()]).unwrap();
    assert_eq!((c.prompt, c.chosen, c.rejected), (vec![u], vec![a.clone()], vec![a]));
}
