//! TRL's conversational preference rows: `prompt`, `chosen` and `rejected` as lists of messages
//! (`[{"role": "user", "content": "…"}, …]`), rendered with the model's chat template
//! (`data.template = "chat"`), as TRL 1.x's `DPOTrainer` renders them.
//!
//! Two forms, with the generic rows' optional safety labels (`chosen_unsafe`, `rejected_unsafe`):
//! - explicit prompt: `prompt` is the conversation so far (any roles, several turns), `chosen` and
//!   `rejected` the messages that follow (usually one assistant message each);
//! - implicit prompt: no `prompt` (or `null`); `chosen` and `rejected` are whole conversations, and the
//!   prompt is the messages they share at their start, as TRL's `extract_prompt` takes it: the first
//!   message where they differ starts the completions, and when one conversation is the other's
//!   start, the last message of the shorter one is its completion.
//!
//! TRL then tokenizes the prompt rendered with `add_generation_prompt=True` and prompt + completion
//! rendered without it; the prompt's tokens are those the three share at their start (see `chat`).
//! A message has exactly `role` and `content`, both strings (content may be empty); anything else
//! (multimodal content parts, tool calls, names) is an error naming the field.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::chat::Message;

/// One message of a conversational row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }

    /// The message as the chat template renders it.
    pub fn as_message(&self) -> Message<'_> {
        Message { role: &self.role, content: &self.content }
    }
}

/// The messages of a conversational pair: the prompt and each completion.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub prompt: Vec<ChatMessage>,
    pub chosen: Vec<ChatMessage>,
    pub rejected: Vec<ChatMessage>,
}

impl Conversation {
    /// The conversation with chosen and rejected exchanged.
    pub fn swapped(self) -> Self {
        Conversation { prompt: self.prompt, chosen: self.rejected, rejected: self.chosen }
    }

    /// TRL's `extract_prompt` on two whole conversations: the prompt is `chosen[..i]` where `i` is the
    /// first message at which they differ, or, when one is the other's start, the shorter one's last
    /// message (TRL's loop index stops there). Fails when they share no leading message.
    pub fn extract_prompt(chosen: Vec<ChatMessage>, rejected: Vec<ChatMessage>) -> Result<Self, String> {
        let shortest = chosen.len().min(rejected.len());
        let split = chosen.iter().zip(&rejected).position(|(c, r)| c != r).unwrap_or(shortest.saturating_sub(1));
        if split == 0 {
            let why = if chosen.first() == rejected.first() {
                "one conversation is a single message the other starts with, which leaves no prompt"
            } else {
                "its first message differs from 'chosen''s, so they share no prompt"
            };
            return Err(format!(
                "field 'rejected': {why} (without 'prompt', the prompt is the messages both conversations start \
                 with)"
            ));
        }
        let (mut chosen, mut rejected) = (chosen, rejected);
        let (chosen_tail, rejected_tail) = (chosen.split_off(split), rejected.split_off(split));
        Ok(Conversation { prompt: chosen, chosen: chosen_tail, rejected: rejected_tail })
    }

    /// The prompt's messages, and each completion's, as the chat template renders them.
    pub fn messages(&self) -> (Vec<Message<'_>>, [Vec<Message<'_>>; 2]) {
        fn list(messages: &[ChatMessage]) -> Vec<Message<'_>> {
            messages.iter().map(ChatMessage::as_message).collect()
        }
        (list(&self.prompt), [list(&self.chosen), list(&self.rejected)])
    }

    /// The row as TRL writes it (`prompt`, `chosen`, `rejected` as message lists).
    pub fn to_row(&self) -> Map<String, Value> {
        let mut row = Map::new();
        for (field, messages) in [("prompt", &self.prompt), ("chosen", &self.chosen), ("rejected", &self.rejected)] {
            row.insert(field.into(), serde_json::to_value(messages).expect("messages serialise"));
        }
        row
    }
}

/// Whether a row is conversational: `chosen` or `rejected` is a list.
pub(super) fn is_conversational(obj: &Map<String, Value>) -> bool {
    ["chosen", "rejected"].iter().any(|field| obj.get(*field).is_some_and(Value::is_array))
}

/// The conversation of a conversational row (see [`is_conversational`]); errors name the field
/// (`chosen[1].role`), without the `path:line: ` prefix.
pub(super) fn parse_conversation(
    obj: &Map<String, Value>,
    describe: fn(&Value) -> String,
) -> Result<Conversation, String> {
    let chosen = messages(obj, "chosen", describe)?;
    let rejected = messages(obj, "rejected", describe)?;
    match obj.get("prompt") {
        None | Some(Value::Null) => Conversation::extract_prompt(chosen, rejected),
        Some(Value::Array(_)) => Ok(Conversation { prompt: messages(obj, "prompt", describe)?, chosen, rejected }),
        Some(Value::String(_)) => Err("field 'prompt': a string, but 'chosen' and 'rejected' are lists of messages: \
                                       give the prompt as messages ([{\"role\": \"user\", \"content\": …}]), or leave \
                                       it out (the messages chosen and rejected start with are then the prompt)"
            .to_string()),
        Some(v) => Err(format!("field 'prompt': expected a list of messages, found {}", describe(v))),
    }
}

/// A non-empty list of messages at `field`.
fn messages(obj: &Map<String, Value>, field: &str, describe: fn(&Value) -> String) -> Result<Vec<ChatMessage>, String> {
    let list = match obj.get(field) {
        None => return Err(format!("field '{field}': missing, expected a list of messages")),
        Some(Value::Array(list)) => list,
        Some(v) => {
            return Err(format!(
                "field '{field}': expected a list of messages (the row's other responses are), found {}",
                describe(v)
            ))
        }
    };
    if list.is_empty() {
        return Err(format!("field '{field}': an empty list, expected at least one message"));
    }
    list.iter().enumerate().map(|(i, value)| message(value, &format!("{field}[{i}]"), describe)).collect()
}

/// One message `{"role": string, "content": string}`.
fn message(value: &Value, at: &str, describe: fn(&Value) -> String) -> Result<ChatMessage, String> {
    let Value::Object(obj) = value else {
        return Err(format!("field '{at}': expected a message {{\"role\", \"content\"}}, found {}", describe(value)));
    };
    if let Some(key) = obj.keys().find(|k| !matches!(k.as_str(), "role" | "content")) {
        return Err(format!("field '{at}.{key}': not supported (a message has a 'role' and a text 'content')"));
    }
    let role = match obj.get("role") {
        None => return Err(format!("field '{at}.role': missing, expected a string such as \"user\"")),
        Some(Value::String(role)) if !role.trim().is_empty() => role.clone(),
        Some(v) => return Err(format!("field '{at}.role': expected a non-empty string, found {}", describe(v))),
    };
    let content = match obj.get("content") {
        None => return Err(format!("field '{at}.content': missing, expected a string")),
        Some(Value::String(content)) => content.clone(),
        Some(v) => {
            return Err(format!(
                "field '{at}.content': expected a string, found {} (multimodal content parts are not supported)",
                describe(v)
            ))
        }
    };
    Ok(ChatMessage { role, content })
}
