//! Prompt templates, tokenization of pairs, and truncation to the model's context.
//!
//! A pair becomes token ids through a [`SequenceFormat`]: a text [`Template`], or with
//! `--data.template chat` the model's own chat template ([`ChatTemplate`]; see `chat` for how it
//! renders and splits a pair, as TRL does).
//!
//! With a text template a sequence is BOS (when the tokenizer puts one before a text) +
//! `template(prompt)` followed by the response and EOS:
//! `BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:` + ` ` + response + EOS.
//! The response is joined with one space, as in PKU/safe-rlhf ("ASSISTANT:" then the answer): the
//! space belongs to the response text (`" Sure..."`), which is also how a GPT-2 byte-level BPE
//! tokenizes the whole string ("Ġ" starts the first response token) and what a model generating after
//! "ASSISTANT:" produces. No space is added when the template already ends in whitespace or the
//! response starts with whitespace. The response's tokens are those that follow the prompt's in the
//! tokenization of the whole text (as TRL splits a plain-text pair; it matters for SentencePiece
//! tokenizers, which mark the start of a text with `▁`); when the prompt's tokens are not a prefix of
//! the whole text's (the prompt's last token would merge with the response's first), the response is
//! tokenized on its own, so that the prompt stays the one generation starts from. Either way the
//! boundary between prompt and response (where the loss starts) is exact.
//!
//! Truncation ([`Truncation`], in `truncate`): a pair's two sequences share the prompt and must each
//! fit in `max_len` tokens. By default, when the longer one does not, the prompt is cut from the left
//! (its start is the least informative part for the answer) down to what fits, but not below
//! `min_prompt_tokens`; then each response still too long is cut from the right; TRL's `keep_start`
//! and `keep_end`, and TRL < 1.0's prompt and completion limits, are the other choices. A cut
//! response loses its EOS: the model must not learn to stop where the text was cut. A pair that cannot
//! keep one response token per side is dropped, as is a pair whose two responses are identical token
//! for token (no preference signal).

use std::borrow::Cow;
use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::chat::ChatTemplate;
use super::conversation::Conversation;
use super::truncate::Truncation;
use super::{PreferencePair, TextTokenizer};

/// The default template (PKU-SafeRLHF / safe-rlhf's conversation format).
pub const DEFAULT_TEMPLATE: &str = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:";

/// The `data.template` value that renders the model's own chat template.
pub const CHAT_TEMPLATE: &str = "chat";

/// How a prompt and its responses become token ids.
pub trait SequenceFormat: Send + Sync {
    /// Fails when the format cannot be used.
    fn check(&self) -> Result<()>;
    /// The tokens generation starts from.
    fn generation_prompt(&self, tok: &dyn TextTokenizer, prompt: &str) -> Result<Vec<i32>>;
    /// The prompt's tokens and each response's (untruncated; a response ends with EOS or the
    /// template's end of turn).
    fn encode_pair(
        &self,
        tok: &dyn TextTokenizer,
        prompt: &str,
        responses: [&str; 2],
    ) -> Result<(Vec<i32>, [Vec<i32>; 2])>;
    /// A conversational pair's prompt and completion tokens; only the chat template renders messages.
    fn encode_conversation(
        &self,
        tok: &dyn TextTokenizer,
        conversation: &Conversation,
    ) -> Result<(Vec<i32>, [Vec<i32>; 2])> {
        let _ = (tok, conversation);
        bail!("a conversational pair (lists of messages) needs the chat template, data.template = \"{CHAT_TEMPLATE}\"")
    }
}

/// The format `data.template` names: [`CHAT_TEMPLATE`] for the chat template of `model_dir`, else a
/// text template with one `{prompt}`.
pub fn sequence_format(template: &str, model_dir: Option<&Path>) -> Result<Box<dyn SequenceFormat>> {
    if template != CHAT_TEMPLATE {
        return Ok(Box::new(Template::new(template)?));
    }
    let dir = model_dir.ok_or_else(|| {
        anyhow!("`{CHAT_TEMPLATE}` renders the chat template of the model directory (model.init), and there is none")
    })?;
    Ok(Box::new(ChatTemplate::from_model_dir(dir)?))
}

impl SequenceFormat for ChatTemplate {
    fn check(&self) -> Result<()> {
        Ok(())
    }

    fn generation_prompt(&self, tok: &dyn TextTokenizer, prompt: &str) -> Result<Vec<i32>> {
        ChatTemplate::generation_prompt(self, tok, prompt)
    }

    fn encode_pair(
        &self,
        tok: &dyn TextTokenizer,
        prompt: &str,
        responses: [&str; 2],
    ) -> Result<(Vec<i32>, [Vec<i32>; 2])> {
        ChatTemplate::encode_pair(self, tok, prompt, responses)
    }

    fn encode_conversation(
        &self,
        tok: &dyn TextTokenizer,
        conversation: &Conversation,
    ) -> Result<(Vec<i32>, [Vec<i32>; 2])> {
        let (prompt, [chosen, rejected]) = conversation.messages();
        self.encode_messages(tok, &prompt, [&chosen, &rejected])
    }
}

const PLACEHOLDER: &str = "{prompt}";

/// A prompt template: text with exactly one `{prompt}` placeholder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template(pub String);

impl Default for Template {
    fn default() -> Self {
        Template(DEFAULT_TEMPLATE.to_string())
    }
}

impl Template {
    /// A checked template (see [`Template::validate`]).
    pub fn new(text: impl Into<String>) -> Result<Self> {
        let t = Template(text.into());
        t.validate()?;
        Ok(t)
    }

    /// The template must contain `{prompt}` exactly once.
    pub fn validate(&self) -> Result<()> {
        match self.0.matches(PLACEHOLDER).count() {
            1 => Ok(()),
            0 => bail!("template {:?}: no {PLACEHOLDER} placeholder, expected exactly one", self.0),
            n => bail!("template {:?}: {n} {PLACEHOLDER} placeholders, expected exactly one", self.0),
        }
    }

    /// The prompt text: the template with `{prompt}` replaced.
    pub fn render(&self, prompt: &str) -> String {
        self.0.replacen(PLACEHOLDER, prompt, 1)
    }

    /// The response text as it follows the rendered prompt: with one leading space unless the
    /// template ends in whitespace or the response starts with whitespace.
    pub fn response_text<'a>(&self, response: &'a str) -> Cow<'a, str> {
        let template_ends_in_space = self.0.chars().last().is_some_and(char::is_whitespace);
        let response_starts_with_space = response.chars().next().is_some_and(char::is_whitespace);
        if template_ends_in_space || response_starts_with_space {
            Cow::Borrowed(response)
        } else {
            Cow::Owned(format!(" {response}"))
        }
    }

    /// The prompt's tokens (what generation starts from): the tokenizer's BOS, then the rendered
    /// prompt.
    pub fn encode_prompt(&self, tok: &dyn TextTokenizer, prompt: &str) -> Vec<i32> {
        let mut ids = tok.bos_ids().to_vec();
        ids.extend(tok.encode(&self.render(prompt)));
        ids
    }

    /// A response's tokens, tokenized on its own, followed by EOS (untruncated).
    pub fn encode_response(&self, tok: &dyn TextTokenizer, response: &str) -> Vec<i32> {
        let mut ids = tok.encode(&self.response_text(response));
        ids.push(tok.eos_id());
        ids
    }

    /// A response's tokens as they follow the prompt (see the module documentation), then EOS;
    /// `prompt_text` is the rendered prompt and `prompt_ids` its tokens without BOS.
    fn encode_continuation(
        &self,
        tok: &dyn TextTokenizer,
        prompt_text: &str,
        prompt_ids: &[i32],
        response: &str,
    ) -> Vec<i32> {
        let whole = tok.encode(&format!("{prompt_text}{}", self.response_text(response)));
        match whole.strip_prefix(prompt_ids) {
            Some(rest) => [rest, &[tok.eos_id()]].concat(),
            None => self.encode_response(tok, response),
        }
    }
}

impl SequenceFormat for Template {
    fn check(&self) -> Result<()> {
        self.validate()
    }

    fn generation_prompt(&self, tok: &dyn TextTokenizer, prompt: &str) -> Result<Vec<i32>> {
        Ok(self.encode_prompt(tok, prompt))
    }

    fn encode_pair(
        &self,
        tok: &dyn TextTokenizer,
        prompt: &str,
        responses: [&str; 2],
    ) -> Result<(Vec<i32>, [Vec<i32>; 2])> {
        let text = self.render(prompt);
        let body = tok.encode(&text);
        let responses = responses.map(|r| self.encode_continuation(tok, &text, &body, r));
        let mut ids = tok.bos_ids().to_vec();
        ids.extend(body);
        Ok((ids, responses))
    }
}

/// A tokenized pair. Responses end with EOS unless truncation cut them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedPair {
    pub prompt: Vec<i32>,
    pub chosen: Vec<i32>,
    pub rejected: Vec<i32>,
    pub chosen_unsafe: bool,
    pub rejected_unsafe: bool,
}

impl TokenizedPair {
    /// Tokens of both sequences (prompt + chosen, prompt + rejected): the pair's cost in a batch.
    pub fn num_tokens(&self) -> usize {
        2 * self.prompt.len() + self.chosen.len() + self.rejected.len()
    }

    /// Tokens of the SFT sequence (prompt + chosen).
    pub fn sft_tokens(&self) -> usize {
        self.prompt.len() + self.chosen.len()
    }
}

/// What tokenization and truncation did. `pairs_in = kept + dropped_too_long + dropped_identical +
/// dropped_empty_prompt`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TruncationReport {
    pub pairs_in: usize,
    pub kept: usize,
    /// Kept pairs whose prompt was cut from the left.
    pub prompts_truncated: usize,
    /// Responses (of kept pairs) cut from the right; each loses its EOS.
    pub responses_truncated: usize,
    /// Pairs that cannot keep `min_prompt_tokens` and one response token within `max_len`.
    pub dropped_too_long: usize,
    /// Pairs whose responses are identical after tokenization and truncation.
    pub dropped_identical: usize,
    /// Pairs whose rendered prompt encodes to no tokens.
    pub dropped_empty_prompt: usize,
    /// The longest kept sequence, in tokens.
    pub longest_sequence: usize,
}

impl TruncationReport {
    pub fn dropped(&self) -> usize {
        self.dropped_too_long + self.dropped_identical + self.dropped_empty_prompt
    }
}

impl fmt::Display for TruncationReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} pairs: {} kept ({} prompts and {} responses truncated), dropped {} too long, {} identical, \
             {} empty prompt; longest sequence {} tokens",
            self.pairs_in,
            self.kept,
            self.prompts_truncated,
            self.responses_truncated,
            self.dropped_too_long,
            self.dropped_identical,
            self.dropped_empty_prompt,
            self.longest_sequence
        )
    }
}

enum Outcome {
    Kept { pair: TokenizedPair, prompt_truncated: bool, responses_truncated: usize },
    TooLong,
    Identical,
    EmptyPrompt,
}

fn tokenize_one(
    pair: &PreferencePair,
    tok: &dyn TextTokenizer,
    format: &dyn SequenceFormat,
    limits: &Truncation,
) -> Result<Outcome> {
    let (mut prompt, [mut chosen, mut rejected]) = match &pair.conversation {
        Some(conversation) => format.encode_conversation(tok, conversation)?,
        None => format.encode_pair(tok, &pair.prompt, [&pair.chosen, &pair.rejected])?,
    };
    if prompt.is_empty() {
        return Ok(Outcome::EmptyPrompt);
    }
    let Some((prompt_truncated, responses_truncated)) = limits.apply(&mut prompt, [&mut chosen, &mut rejected]) else {
        return Ok(Outcome::TooLong);
    };
    if chosen == rejected {
        return Ok(Outcome::Identical);
    }
    let pair = TokenizedPair {
        prompt,
        chosen,
        rejected,
        chosen_unsafe: pair.chosen_unsafe,
        rejected_unsafe: pair.rejected_unsafe,
    };
    Ok(Outcome::Kept { pair, prompt_truncated, responses_truncated })
}

/// Tokenizes pairs with the default minimum prompt length; see [`tokenize_pairs_with`].
pub fn tokenize_pairs(
    pairs: &[PreferencePair],
    tok: &dyn TextTokenizer,
    template: &dyn SequenceFormat,
    max_len: usize,
) -> Result<(Vec<TokenizedPair>, TruncationReport)> {
    tokenize_pairs_with(pairs, tok, template, &Truncation::new(max_len))
}

/// Tokenizes pairs (in parallel, order preserved) and truncates them by the rules in the module
/// documentation. Fails on an invalid template, or a chat template that fails on a pair (the error
/// names the pair's index).
pub fn tokenize_pairs_with(
    pairs: &[PreferencePair],
    tok: &dyn TextTokenizer,
    template: &dyn SequenceFormat,
    limits: &Truncation,
) -> Result<(Vec<TokenizedPair>, TruncationReport)> {
    template.check()?;
    let outcomes: Vec<Outcome> = pairs
        .par_iter()
        .enumerate()
        .map(|(i, p)| tokenize_one(p, tok, template, limits).with_context(|| format!("pair {i}")))
        .collect::<Result<_>>()?;
    let mut report = TruncationReport { pairs_in: pairs.len(), ..Default::default() };
    let mut out = Vec::with_capacity(outcomes.len());
    for outcome in outcomes {
        match outcome {
            Outcome::Kept { pair, prompt_truncated, responses_truncated } => {
                report.kept += 1;
                report.prompts_truncated += prompt_truncated as usize;
                report.responses_truncated += responses_truncated;
                let longest = pair.prompt.len() + pair.chosen.len().max(pair.rejected.len());
                report.longest_sequence = report.longest_sequence.max(longest);
                out.push(pair);
            }
            Outcome::TooLong => report.dropped_too_long += 1,
            Outcome::Identical => report.dropped_identical += 1,
            Outcome::EmptyPrompt => report.dropped_empty_prompt += 1,
        }
    }
    Ok((out, report))
}
