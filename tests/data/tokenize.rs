//! Templates, tokenizers (byte-level and HF tokenizer.json) and truncation.

use super::*;

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
pub(super) fn gpt2_byte_chars() -> Vec<char> {
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
pub(super) fn tiny_gpt2_vocab() -> (BTreeMap<String, u32>, Vec<(String, String)>) {
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
pub(super) fn gpt2_tokenizer_json(vocab: &BTreeMap<String, u32>, merges: &[(String, String)]) -> Value {
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

/// An `unk_token` missing from the vocabulary is an error when the tokenizer is read, not a panic on
/// the first text that needs it; so is a Unigram model with no `unk_id` and no byte fallback.
#[test]
fn a_missing_unknown_token_is_an_error_when_reading() {
    let dir = tempfile::tempdir().unwrap();
    let word_level = |unk: &str| {
        json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": {"hello": 0, "</s>": 1, "<unk>": 2}, "unk_token": unk},
        })
    };
    let cases = [
        ("word_level", word_level("[UNK]"), "the WordLevel model's `unk_token` \"[UNK]\" is not in its vocabulary"),
        (
            "unigram",
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
                "pre_tokenizer": null, "post_processor": null, "decoder": null,
                "model": {"type": "Unigram", "unk_id": null, "vocab": [["hello", -1.0], ["</s>", -2.0]], "byte_fallback": false},
            }),
            "the Unigram model has no `unk_id`",
        ),
    ];
    for (name, file, expect) in cases {
        let model = dir.path().join(name);
        fs::create_dir(&model).unwrap();
        fs::write(model.join("tokenizer.json"), serde_json::to_vec(&file).unwrap()).unwrap();
        let err = format!("{:#}", load_tokenizer(Some(&model)).err().expect("must fail"));
        assert!(err.contains(expect) && err.contains(name), "{err}");
        let err = format!("{:#}", HfTokenizer::from_file(&model.join("tokenizer.json")).unwrap_err());
        assert!(err.contains(expect), "{err}");
    }
    let fine = dir.path().join("fine");
    fs::create_dir(&fine).unwrap();
    fs::write(fine.join("tokenizer.json"), serde_json::to_vec(&word_level("<unk>")).unwrap()).unwrap();
    assert_eq!(load_tokenizer(Some(&fine)).unwrap().encode("hello there"), vec![0, 2]);
}

/// The byte tokenizer's characters are GPT-2's byte-level alphabet (its `tokenizer.json` is written
/// with them).
#[test]
fn byte_tokenizer_spells_bytes_in_the_byte_level_alphabet() {
    let chars = gpt2_byte_chars();
    for b in 0..=255u8 {
        assert_eq!(ByteTokenizer::byte_char(b), chars[b as usize], "byte {b}");
        assert_eq!(ByteTokenizer.id_to_token(b as u32), Some(chars[b as usize].to_string()));
    }
    assert_eq!(ByteTokenizer.id_to_token(257).as_deref(), Some(ByteTokenizer::EOS_TOKEN));
    assert_eq!(ByteTokenizer.id_to_token(258), None);
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
                        ..Default::default()
                    }
                })
                .collect();
            let limits = Truncation { min_prompt_tokens: min_prompt, ..Truncation::new(max_len) };
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
    let limits = Truncation { min_prompt_tokens: 8, ..Truncation::new(24) };
    let (out, rep) = tokenize_pairs_with(std::slice::from_ref(&pair), &tok, &t, &limits).unwrap();
    let tp = &out[0];
    assert_eq!(tok.decode(&tp.prompt), "cdefghij"); // the last 8 prompt bytes
    assert_eq!(tp.chosen.len(), 16);
    assert!(!tp.chosen.contains(&ByteTokenizer::EOS));
    assert_eq!(tp.rejected, vec![b' ' as i32, b'y' as i32, b'y' as i32, ByteTokenizer::EOS]);
    assert_eq!((rep.prompts_truncated, rep.responses_truncated, rep.longest_sequence), (1, 1, 24));

    // Only as much prompt as needed is cut.
    let limits = Truncation { min_prompt_tokens: 8, ..Truncation::new(45) };
    let (out, rep) = tokenize_pairs_with(std::slice::from_ref(&pair), &tok, &t, &limits).unwrap();
    assert_eq!(tok.decode(&out[0].prompt), "789abcdefghij"); // 45 − 32 prompt tokens
    assert_eq!(out[0].prompt.len() + out[0].chosen.len(), 45);
    assert_eq!((rep.prompts_truncated, rep.responses_truncated), (1, 0));
    assert_eq!(*out[0].chosen.last().unwrap(), ByteTokenizer::EOS);

    // A pair that cannot fit is dropped and counted.
    let limits = Truncation { min_prompt_tokens: 8, ..Truncation::new(8) };
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
