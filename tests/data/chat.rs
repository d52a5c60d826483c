//! The Llama family's tokenizers and chat templates against transformers and TRL, through the
//! committed fixtures (tests/fixtures/tokenizers/, written by scripts/make-tokenizer-fixtures.py):
//! tiny SentencePiece-style (Llama-2, Mistral) and byte-level (Llama-3, Qwen2) model directories and
//! the ids transformers 5 and TRL 1.x make from them. Then the Jinja features Hugging Face templates
//! use, how EOS and BOS are found, and the errors.

use super::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizers")
}

fn expected() -> Value {
    let text = fs::read_to_string(fixtures().join("expected.json")).expect("tests/fixtures/tokenizers/expected.json");
    serde_json::from_str(&text).unwrap()
}

const FAMILIES: [&str; 5] = ["llama2", "llama2_legacy", "mistral", "llama3", "qwen2"];

fn ids(v: &Value) -> Vec<i32> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32).collect()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap()
}

#[test]
fn fixture_tokenizers_encode_and_decode_as_transformers() {
    let expected = expected();
    for family in FAMILIES {
        let want = &expected["families"][family];
        let facts = &want["facts"];
        let tok = load_tokenizer(Some(&fixtures().join(family))).unwrap();
        assert_eq!(tok.eos_id() as i64, facts["eos_token_id"].as_i64().unwrap(), "{family}: EOS");
        assert_eq!(tok.bos_ids(), ids(&facts["prefix_ids"]), "{family}: BOS");
        assert_eq!(tok.vocab_size() as i64, facts["vocab_size"].as_i64().unwrap(), "{family}: vocabulary");
        let mut stop = vec![tok.eos_id()];
        stop.extend(ids(&facts["generation_eos_token_ids"]).into_iter().filter(|&id| id != tok.eos_id()));
        assert_eq!(tok.stop_ids(), stop, "{family}: stop tokens");
        for case in want["encode"].as_array().unwrap() {
            let s = text(&case["text"]);
            assert_eq!(tok.encode(s), ids(&case["ids"]), "{family}: encode {s:?}");
            assert_eq!(tok.decode(&ids(&case["ids"])), text(&case["decoded"]), "{family}: decode {s:?}");
        }
    }
}

#[test]
fn fixture_chat_templates_render_and_split_pairs_as_trl() {
    let expected = expected();
    for family in FAMILIES {
        let dir = fixtures().join(family);
        let tok = load_tokenizer(Some(&dir)).unwrap();
        let chat = ChatTemplate::from_model_dir(&dir).unwrap();
        let format = sequence_format(CHAT_TEMPLATE, Some(&dir)).unwrap();
        let cases = expected["families"][family]["chat"].as_array().unwrap();
        let mut pairs = Vec::new();
        for case in cases {
            let (prompt, chosen, rejected) = (text(&case["prompt"]), text(&case["chosen"]), text(&case["rejected"]));
            let user = Message::user(prompt);
            assert_eq!(chat.render(&[user], true).unwrap(), text(&case["prompt_text"]), "{family}: {prompt:?}");
            let conversation = [user, Message::assistant(chosen)];
            assert_eq!(chat.render(&conversation, false).unwrap(), text(&case["chosen_text"]), "{family}: {prompt:?}");
            let generation = format.generation_prompt(tok.as_ref(), prompt).unwrap();
            assert_eq!(generation, ids(&case["generation_prompt_ids"]), "{family}: generation prompt of {prompt:?}");
            let (p, [c, r]) = format.encode_pair(tok.as_ref(), prompt, [chosen, rejected]).unwrap();
            assert_eq!(p, ids(&case["prompt_ids"]), "{family}: prompt {prompt:?}");
            assert_eq!(c, ids(&case["chosen_ids"]), "{family}: chosen {chosen:?}");
            assert_eq!(r, ids(&case["rejected_ids"]), "{family}: rejected {rejected:?}");
            pairs.push(PreferencePair {
                prompt: prompt.into(),
                chosen: chosen.into(),
                rejected: rejected.into(),
                ..Default::default()
            });
        }
        // Through tokenize_pairs: nothing truncated, the same ids.
        let (tokenized, report) = tokenize_pairs(&pairs, tok.as_ref(), format.as_ref(), 100_000).unwrap();
        assert_eq!(report.kept, cases.len(), "{family}: {report}");
        for (tp, case) in tokenized.iter().zip(cases) {
            assert_eq!(
                (&tp.prompt, &tp.chosen, &tp.rejected),
                (&ids(&case["prompt_ids"]), &ids(&case["chosen_ids"]), &ids(&case["rejected_ids"]))
            );
        }
    }
}

#[test]
fn fixture_text_template_pairs_match_trl_plain_text_rows() {
    let expected = expected();
    let template = Template::new(text(&expected["text_template"])).unwrap();
    for family in FAMILIES {
        let tok = load_tokenizer(Some(&fixtures().join(family))).unwrap();
        for case in expected["families"][family]["text"].as_array().unwrap() {
            let (prompt, chosen, rejected) = (text(&case["prompt"]), text(&case["chosen"]), text(&case["rejected"]));
            let (p, [c, r]) = template.encode_pair(tok.as_ref(), prompt, [chosen, rejected]).unwrap();
            assert_eq!(p, ids(&case["prompt_ids"]), "{family}: prompt {prompt:?}");
            assert_eq!(c, ids(&case["chosen_ids"]), "{family}: chosen {chosen:?}");
            assert_eq!(r, ids(&case["rejected_ids"]), "{family}: rejected {rejected:?}");
            // The BOS once, at the start of the prompt; never before a response.
            let bos = tok.bos_ids();
            if !bos.is_empty() {
                assert!(p.starts_with(bos) && !c.starts_with(bos) && !r.starts_with(bos), "{family}");
            }
            assert_eq!(template.encode_prompt(tok.as_ref(), prompt), p);
        }
    }
}

#[test]
fn jinja_features_render_as_transformers_jinja2() {
    let expected = expected();
    let jinja = &expected["jinja"];
    let tokens: Vec<(String, String)> = jinja["special_tokens"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, token)| (name.clone(), text(token).to_string()))
        .collect();
    let messages: Vec<(String, String)> = jinja["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (text(&m["role"]).to_string(), text(&m["content"]).to_string()))
        .collect();
    let messages: Vec<Message> = messages.iter().map(|(role, content)| Message { role, content }).collect();
    for case in jinja["cases"].as_array().unwrap() {
        let name = text(&case["name"]);
        let template = ChatTemplate::new(text(&case["template"]), Path::new(name), &tokens).unwrap();
        let rendered = template.render(&messages, case["add_generation_prompt"].as_bool().unwrap());
        match (&case.get("rendered"), rendered) {
            (Some(want), Ok(got)) => assert_eq!(got, text(want), "{name}"),
            (None, Err(e)) => {
                let message = format!("{e:#}");
                assert!(message.contains(text(&case["error"])) && message.contains(name), "{name}: {message}");
            }
            (want, got) => panic!("{name}: expected {want:?}, got {got:?}"),
        }
    }
}

/// A model directory holding `files` (name, content), in a fresh temporary directory.
fn model_dir(files: &[(&str, String)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        fs::write(dir.path().join(name), content).unwrap();
    }
    dir
}

fn fixture_file(family: &str, name: &str) -> String {
    fs::read_to_string(fixtures().join(family).join(name)).unwrap()
}

fn error_of<T>(result: anyhow::Result<T>) -> String {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn chat_template_errors_name_the_files() {
    let tokenizer = ("tokenizer.json", fixture_file("llama3", "tokenizer.json"));
    // No template anywhere: the error names both places looked at.
    let bare = model_dir(std::slice::from_ref(&tokenizer));
    let err = error_of(sequence_format(CHAT_TEMPLATE, Some(bare.path())));
    assert!(err.contains("no chat template") && err.contains("chat_template.jinja"), "{err}");
    assert!(err.contains("tokenizer_config.json") && err.contains(&bare.path().display().to_string()), "{err}");
    let err = error_of(sequence_format(CHAT_TEMPLATE, None));
    assert!(err.contains("model.init"), "{err}");
    // A template that does not compile, in either file.
    let config = json!({"eos_token": "<|eot_id|>", "chat_template": "{% for m in messages %}{{ m.content }}"});
    let broken = model_dir(&[tokenizer.clone(), ("tokenizer_config.json", config.to_string())]);
    let err = error_of(sequence_format(CHAT_TEMPLATE, Some(broken.path())));
    assert!(err.contains("tokenizer_config.json: the chat template does not compile"), "{err}");
    let jinja = ("chat_template.jinja", "{{ messages[0].content ".to_string());
    let broken = model_dir(&[tokenizer.clone(), jinja]);
    let err = error_of(sequence_format(CHAT_TEMPLATE, Some(broken.path())));
    assert!(err.contains("chat_template.jinja: the chat template does not compile"), "{err}");
    // chat_template.jinja wins over the configuration's template (as in transformers 5).
    let both = model_dir(&[
        tokenizer.clone(),
        ("tokenizer_config.json", json!({"chat_template": "config"}).to_string()),
        ("chat_template.jinja", "file:{{ messages[0].content }}".into()),
    ]);
    let chat = ChatTemplate::from_model_dir(both.path()).unwrap();
    assert_eq!(chat.render(&[Message::user("x")], true).unwrap(), "file:x");
    assert!(chat.path().ends_with("chat_template.jinja"));
    // Named templates: `default` is taken; a list without one is an error.
    let named = json!({"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]});
    let dir = model_dir(&[tokenizer.clone(), ("tokenizer_config.json", named.to_string())]);
    assert_eq!(ChatTemplate::from_model_dir(dir.path()).unwrap().render(&[Message::user("x")], true).unwrap(), "d");
    let unnamed = json!({"chat_template": [{"name": "tool_use", "template": "t"}]});
    let dir = model_dir(&[tokenizer.clone(), ("tokenizer_config.json", unnamed.to_string())]);
    assert!(error_of(ChatTemplate::from_model_dir(dir.path())).contains("none named \"default\""));
    // Malformed JSON names the file.
    let dir = model_dir(&[tokenizer.clone(), ("tokenizer_config.json", "{".into())]);
    let err = error_of(load_tokenizer(Some(dir.path())));
    assert!(err.contains("tokenizer_config.json: invalid JSON"), "{err}");
    // A template that raises on a pair: the error names the template, the pair and the message.
    let raising = "{% if messages | length > 1 %}{{ raise_exception('only one turn') }}{% endif %}x";
    let dir = model_dir(&[tokenizer, ("chat_template.jinja", raising.into())]);
    let tok = load_tokenizer(Some(dir.path())).unwrap();
    let format = sequence_format(CHAT_TEMPLATE, Some(dir.path())).unwrap();
    let pairs =
        vec![PreferencePair { prompt: "p".into(), chosen: "a".into(), rejected: "b".into(), ..Default::default() }];
    let err = error_of(tokenize_pairs(&pairs, tok.as_ref(), format.as_ref(), 64));
    assert!(err.contains("pair 0") && err.contains("only one turn") && err.contains("chat_template.jinja"), "{err}");
}

#[test]
fn eos_and_stop_tokens_come_from_the_model_files() {
    let tokenizer = ("tokenizer.json", fixture_file("llama3", "tokenizer.json"));
    let vocab: Value = serde_json::from_str(&tokenizer.1).unwrap();
    let id = |token: &str| -> i32 {
        let added = vocab["added_tokens"].as_array().unwrap().iter().find(|t| t["content"] == token).unwrap();
        added["id"].as_i64().unwrap() as i32
    };
    let (end_of_text, eom, eot, bos) =
        (id("<|end_of_text|>"), id("<|eom_id|>"), id("<|eot_id|>"), id("<|begin_of_text|>"));
    let load = |files: &[(&str, String)]| {
        let dir = model_dir(files);
        load_tokenizer(Some(dir.path())).map(|t| (t.eos_id(), t.stop_ids(), t.bos_ids().to_vec()))
    };
    // tokenizer.json alone: the candidates; BOS from the post-processor.
    assert_eq!(load(std::slice::from_ref(&tokenizer)).unwrap(), (end_of_text, vec![end_of_text], vec![bos]));
    // generation_config.json: an id, or a list whose first is EOS and all of which stop generation.
    let generation = |ids: Value| ("generation_config.json", json!({"eos_token_id": ids}).to_string());
    assert_eq!(load(&[tokenizer.clone(), generation(json!(eot))]).unwrap().0, eot);
    let files = [tokenizer.clone(), generation(json!([eom, eot]))];
    assert_eq!(load(&files).unwrap(), (eom, vec![eom, eot], vec![bos]));
    // tokenizer_config.json's eos_token (a string or an AddedToken object) comes first.
    let added = json!({"eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "lstrip": false}});
    let files =
        [tokenizer.clone(), generation(json!([end_of_text, eom])), ("tokenizer_config.json", added.to_string())];
    assert_eq!(load(&files).unwrap(), (eot, vec![eot, end_of_text, eom], vec![bos]));
    // special_tokens_map.json, read when tokenizer_config.json has no added_tokens_decoder.
    let map = ("special_tokens_map.json", json!({"eos_token": "<|eom_id|>"}).to_string());
    assert_eq!(load(&[tokenizer.clone(), map]).unwrap().0, eom);
    // Errors name the file.
    let unknown = ("tokenizer_config.json", json!({"eos_token": "<nope>"}).to_string());
    let err = error_of(load(&[tokenizer.clone(), unknown]));
    assert!(err.contains("\"<nope>\"") && err.contains("tokenizer_config.json"), "{err}");
    let err = error_of(load(&[tokenizer.clone(), generation(json!([1_000_000]))]));
    assert!(err.contains("generation_config.json: eos_token_id 1000000 is outside the vocabulary"), "{err}");
    let err = error_of(load(&[tokenizer, generation(json!("x"))]));
    assert!(err.contains("generation_config.json") && err.contains("eos_token_id"), "{err}");
}

#[test]
fn gpt2_directories_keep_their_tokens_and_add_bos_token_needs_the_older_files() {
    let (vocab, merges) = super::tokenize::tiny_gpt2_vocab();
    let eos = vocab["<|endoftext|>"] as i32;
    let json_file =
        ("tokenizer.json", serde_json::to_string(&super::tokenize::gpt2_tokenizer_json(&vocab, &merges)).unwrap());
    let merges_txt: String = std::iter::once("#version: 0.2".to_string())
        .chain(merges.iter().map(|(a, b)| format!("{a} {b}")))
        .collect::<Vec<_>>()
        .join("\n");
    let older = [("vocab.json", serde_json::to_string(&vocab).unwrap()), ("merges.txt", merges_txt + "\n")];
    let config = ("tokenizer_config.json", json!({"add_bos_token": true, "bos_token": "<|endoftext|>"}).to_string());
    // GPT-2's files as the Hub has them (generation_config.json names <|endoftext|>): as before.
    let generation = ("generation_config.json", json!({"bos_token_id": eos, "eos_token_id": eos}).to_string());
    let older_dir = model_dir(&older);
    for files in [vec![json_file.clone()], vec![json_file.clone(), generation.clone()], older.to_vec()] {
        let dir = model_dir(&files);
        let tok = load_tokenizer(Some(dir.path())).unwrap();
        assert_eq!((tok.eos_id(), tok.stop_ids(), tok.bos_ids()), (eos, vec![eos], &[][..]));
    }
    // transformers ignores add_bos_token beside a tokenizer.json (its post-processor decides) ...
    let dir = model_dir(&[json_file, config.clone()]);
    assert!(load_tokenizer(Some(dir.path())).unwrap().bos_ids().is_empty());
    // ... and follows it with vocab.json + merges.txt: the BOS starts the prompt, once.
    let mut files = older.to_vec();
    files.push(config);
    let dir = model_dir(&files);
    let tok = load_tokenizer(Some(dir.path())).unwrap();
    assert_eq!(tok.bos_ids(), [eos]);
    let template = Template::new("{prompt}:").unwrap();
    let (prompt, [chosen, _]) = template.encode_pair(tok.as_ref(), "x", ["the cat", "on"]).unwrap();
    assert_eq!(prompt, [eos, vocab["x"] as i32, vocab[":"] as i32]);
    assert_eq!(chosen, [vocab["Ġthe"] as i32, vocab["Ġcat"] as i32, eos]);
    // A template ending in a space that would merge into the response's first token: the prompt stays
    // what generation starts from, and the response is tokenized on its own (as before).
    let tok = load_tokenizer(Some(older_dir.path())).unwrap();
    let template = Template::new("{prompt}: ").unwrap();
    let (prompt, [chosen, _]) = template.encode_pair(tok.as_ref(), "x", ["the cat", "on"]).unwrap();
    let id = |t: &str| vocab[t] as i32;
    assert_eq!(prompt, [id("x"), id(":"), id("Ġ")]);
    assert_eq!(chosen, [id("t"), id("he"), id("Ġcat"), eos]);
    assert_eq!(tok.encode("x: the cat")[..3], [id("x"), id(":"), id("Ġthe")]);
}

#[test]
fn strftime_now_formats_the_local_time() {
    let chat = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}|{{ strftime_now('') }}", Path::new("t"), &[]).unwrap();
    let rendered = chat.render(&[Message::user("x")], false).unwrap();
    let (date, empty) = rendered.split_once('|').unwrap();
    let digits: Vec<&str> = date.split('-').collect();
    assert!(digits.len() == 3 && digits.iter().all(|d| d.chars().all(|c| c.is_ascii_digit())), "{date}");
    assert_eq!((digits[0].len(), empty), (4, ""));
}
