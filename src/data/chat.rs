//! A model's own chat template (`--data.template chat`), rendered and tokenized the way transformers 5
//! and TRL 1.x do for single-turn preference data.
//!
//! Rendering: the Jinja template from `chat_template.jinja` or `tokenizer_config.json` (see
//! [`TokenizerSettings`]), in an environment set up as transformers sets up Jinja2 (`trim_blocks`,
//! `lstrip_blocks`, loop controls, Python's string and dict methods, `raise_exception`,
//! `strftime_now`, its `tojson`; `{% generation %}` blocks render their body), with the variables
//! transformers passes: `messages`, `add_generation_prompt`, `tools` and `documents` (none), and the
//! special tokens by name (`bos_token`, `eos_token`, …).
//!
//! Conversational rows (`conversation`) bring their own messages: the prompt's, however many, in
//! place of the one user message, and each completion's in place of the assistant message.
//!
//! Tokenization (TRL's `DPOTrainer` on conversational rows): the prompt is the user message rendered
//! with `add_generation_prompt=True`; each response is the conversation user + assistant rendered
//! without it; all three are tokenized with no special tokens added (a BOS comes from the template,
//! e.g. `{{ bos_token }}`, and appears once). The prompt's tokens are those the three tokenizations share
//! at their start, and each response's tokens are the rest of its conversation: its text, then whatever
//! the template ends an assistant turn with (`<|eot_id|>`, `<|im_end|>\n`, ` </s>`). No EOS is
//! added: the template's end-of-turn is what the model learns to stop at. Generation starts from the
//! prompt rendered with `add_generation_prompt=True`, whole.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::{context, AutoEscape, Environment, Value};

use super::jinja_python;
use super::tokenizer_config::{TokenizerSettings, CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE};
use super::TextTokenizer;

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

impl<'a> Message<'a> {
    pub fn user(content: &'a str) -> Self {
        Message { role: "user", content }
    }

    pub fn assistant(content: &'a str) -> Self {
        Message { role: "assistant", content }
    }
}

/// A compiled chat template with the special tokens it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: Value,
    path: PathBuf,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("path", &self.path).finish()
    }
}

/// transformers' `{% generation %}` … `{% endgeneration %}` (it marks the assistant's tokens for
/// masks) as a block minijinja knows that renders its body, with the same whitespace control.
fn generation_blocks_as_ifs(source: &str) -> String {
    let tag = regex::Regex::new(r"\{%(-|\+)?\s*(end)?generation\s*(-|\+)?%\}").expect("a valid regex");
    tag.replace_all(source, |caps: &regex::Captures| {
        let (open, close) = (caps.get(1).map_or("", |m| m.as_str()), caps.get(3).map_or("", |m| m.as_str()));
        let statement = if caps.get(2).is_some() { "endif" } else { "if true" };
        format!("{{%{open} {statement} {close}%}}")
    })
    .into_owned()
}

impl ChatTemplate {
    /// The chat template of a model directory. Fails, naming the files looked at, when it has none.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let settings = TokenizerSettings::read(dir)?;
        let Some(template) = &settings.chat_template else {
            bail!(
                "{}: no chat template: neither {CHAT_TEMPLATE_FILE} nor a `chat_template` in {TOKENIZER_CONFIG_FILE} \
                 (use a `{{prompt}}` text template for --data.template instead)",
                dir.display()
            );
        };
        Self::new(&template.source, &template.path, &settings.special_tokens)
    }

    /// Compiles `source` (read from `path`, which errors name) with the special tokens by name.
    pub fn new(source: &str, path: &Path, special_tokens: &[(String, String)]) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build()?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_debug(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(jinja_python::python_formatter);
        env.add_function("raise_exception", jinja_python::raise_exception);
        env.add_function("strftime_now", jinja_python::strftime_now);
        env.add_filter("tojson", jinja_python::tojson);
        env.add_template_owned(TEMPLATE_NAME, generation_blocks_as_ifs(source))
            .map_err(|e| anyhow!("{}: the chat template does not compile: {e:#}", path.display()))?;
        let special_tokens =
            Value::from_object(special_tokens.iter().cloned().collect::<std::collections::BTreeMap<String, String>>());
        Ok(ChatTemplate { env, special_tokens, path: path.to_path_buf() })
    }

    /// Where the template was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The conversation as text, as `tokenizer.apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=…)` renders it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> = messages.iter().map(|m| context! { role => m.role, content => m.content }).collect();
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            tools => (),
            documents => (),
            ..self.special_tokens.clone()
        };
        let template = self.env.get_template(TEMPLATE_NAME)?;
        template.render(ctx).map_err(|e| anyhow!("{}: the chat template fails: {e:#}", self.path.display()))
    }

    /// The tokens generation starts from: the user message with the generation prompt.
    pub fn generation_prompt(&self, tok: &dyn TextTokenizer, prompt: &str) -> Result<Vec<i32>> {
        Ok(tok.encode(&self.render(&[Message::user(prompt)], true)?))
    }

    /// A single-turn pair's prompt and response tokens, as TRL's `DPOTrainer` makes them (see the
    /// module documentation): [`ChatTemplate::encode_messages`] of the user message and each
    /// response as an assistant message.
    pub fn encode_pair(
        &self,
        tok: &dyn TextTokenizer,
        prompt: &str,
        responses: [&str; 2],
    ) -> Result<(Vec<i32>, [Vec<i32>; 2])> {
        let [chosen, rejected] = responses.map(Message::assistant);
        self.encode_messages(tok, &[Message::user(prompt)], [&[chosen], &[rejected]])
    }

    /// A conversational pair's prompt and completion tokens, as TRL's `DPOTrainer` makes them: the
    /// prompt rendered with the generation prompt, each prompt + completion without; the prompt's
    /// tokens are those the three share at their start, each completion's the rest of its own.
    pub fn encode_messages(
        &self,
        tok: &dyn TextTokenizer,
        prompt: &[Message],
        completions: [&[Message]; 2],
    ) -> Result<(Vec<i32>, [Vec<i32>; 2])> {
        let prompt_ids = tok.encode(&self.render(prompt, true)?);
        let full = completions
            .map(|completion| self.render(&[prompt, completion].concat(), false).map(|text| tok.encode(&text)));
        let [chosen, rejected] = full;
        let (chosen, rejected) = (chosen.context("the chosen response")?, rejected.context("the rejected response")?);
        let shared = common_prefix_len(&prompt_ids, &chosen).min(common_prefix_len(&prompt_ids, &rejected));
        Ok((prompt_ids[..shared].to_vec(), [chosen[shared..].to_vec(), rejected[shared..].to_vec()]))
    }
}

/// How many leading tokens `a` and `b` share.
pub fn common_prefix_len(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
