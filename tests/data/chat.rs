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

const FAMILIES: [&str; 4] = ["llama2", "mistral", "llama3", "qwen2"];

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
