//! Preference data: reading datasets, pair selection and the SafeDPO transform T(D), prompt
//! templates, tokenizers, and packing into padding-free batches.
//!
//! The path of a pair through this module, in the order a run uses it:
//! - [`load_pairs`] reads a JSONL file (PKU-SafeRLHF rows or generic `chosen`/`rejected` rows, as
//!   text or as TRL's conversational message lists, [`Conversation`]),
//!   selects the pair orientation ([`PairSelection`]) and, for SafeDPO, applies T(D)
//!   ([`safedpo_transform`]);
//! - [`tokenize_pairs`] renders the prompt through a [`SequenceFormat`] (a text [`Template`], or the
//!   model's [`ChatTemplate`]), tokenizes prompt and responses with a [`TextTokenizer`] (a model
//!   directory's, read as transformers reads it: [`load_tokenizer`]) and truncates to the model's
//!   context ([`Truncation`]);
//! - a [`Batcher`] shuffles the pairs per epoch and packs them, up to a token budget, into a
//!   [`PreferenceBatch`] (or a [`PackedBatch`] for SFT).
//!
//! The objectives on unpaired examples (KTO) read [`UnpairedExample`]s instead ([`load_examples`]:
//! unpaired rows, or pairs unpaired), tokenized by [`tokenize_examples`] and packed with their KL
//! sequences by [`unpaired_batch`].
//!
//! A model directory carries its tokenizer in Hugging Face's files (the byte tokenizer as a
//! `tokenizer.json` too): [`save_tokenizer_files`], in `tokenizer_files`.
//!
//! [`synthetic_safety_pairs`] is the demo's built-in dataset; [`train_byte_level_bpe`] trains a byte-level BPE
//! tokenizer on a corpus (`demo --compare` trains one on it).

mod batch;
mod bpe_trainer;
mod chat;
mod conversation;
mod jinja_python;
mod load;
pub mod pack;
mod synthetic;
mod tokenize;
mod tokenizer;
pub mod tokenizer_config;
pub mod tokenizer_files;
mod truncate;
mod unpaired;
pub mod vocab_merges;

pub use batch::{chunks_by_cost, preference_batch, sft_batch, BatchLimit, Batcher, BatcherState};
pub use bpe_trainer::{
    bpe_tokenizer_config, save_trained_tokenizer, train_byte_level_bpe, BPE_EOS_TOKEN, MIN_BPE_VOCAB,
};
pub use chat::{common_prefix_len, ChatTemplate, Message};
pub use conversation::{ChatMessage, Conversation};
pub use load::{
    load_pairs, safedpo_transform, write_pairs_jsonl, write_pku_jsonl, DataFormat, LoadReport, PairSelection, PkuRow,
    TransformCounts,
};
pub use pack::{PackedBatch, PreferenceBatch};
pub use synthetic::{split_holdout, split_holdout_by, synthetic_pku_rows, synthetic_safety_pairs};
pub use tokenize::{
    sequence_format, tokenize_pairs, tokenize_pairs_with, SequenceFormat, Template, TokenizedPair, TruncationReport,
    CHAT_TEMPLATE, DEFAULT_TEMPLATE,
};
pub use tokenizer::{load_tokenizer, ByteTokenizer, HfTokenizer, TextTokenizer, EOS_CANDIDATES};
pub use tokenizer_files::{check_same_tokenizer, has_own_tokenizer, save_tokenizer_files, tokenizer_source};
pub use truncate::{Truncation, TruncationMode, DEFAULT_MIN_PROMPT_TOKENS};
pub use unpaired::{
    load_examples, tokenize_examples, unpair, unpaired_batch, write_examples_jsonl, ExampleTruncationReport,
    TokenizedExample, UnpairedBatch, UnpairedExample, UnpairedReport,
};

use serde::{Deserialize, Serialize};

/// One preference pair: a prompt, the preferred (`chosen`) and the dispreferred (`rejected`)
/// response, and a safety label per response (`true` = unsafe).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferencePair {
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    #[serde(default)]
    pub chosen_unsafe: bool,
    #[serde(default)]
    pub rejected_unsafe: bool,
    /// A conversational row's messages (rendered with the chat template); the text fields then hold
    /// each part's messages as JSON (the prompt's groups pairs by prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<Conversation>,
}

impl PreferencePair {
    /// A pair with both responses labelled safe.
    ///
    /// ```
    /// let pair = safedpo::PreferencePair::new("Hi", "Hello!", "Go away.").with_safety(false, true);
    /// assert!(pair.rejected_unsafe && !pair.chosen_unsafe);
    /// ```
    pub fn new(prompt: impl Into<String>, chosen: impl Into<String>, rejected: impl Into<String>) -> Self {
        PreferencePair { prompt: prompt.into(), chosen: chosen.into(), rejected: rejected.into(), ..Default::default() }
    }

    /// The same pair with the safety labels given (`true` = unsafe).
    pub fn with_safety(self, chosen_unsafe: bool, rejected_unsafe: bool) -> Self {
        PreferencePair { chosen_unsafe, rejected_unsafe, ..self }
    }

    /// A conversational pair (see `Conversation`), both responses labelled safe.
    pub fn from_conversation(conversation: Conversation) -> Self {
        let json = |messages: &[ChatMessage]| serde_json::to_string(messages).expect("messages serialise");
        PreferencePair {
            prompt: json(&conversation.prompt),
            chosen: json(&conversation.chosen),
            rejected: json(&conversation.rejected),
            conversation: Some(conversation),
            ..Default::default()
        }
    }

    /// The same pair with chosen and rejected exchanged (labels travel with their responses).
    pub fn swapped(self) -> Self {
        PreferencePair {
            prompt: self.prompt,
            chosen: self.rejected,
            rejected: self.chosen,
            chosen_unsafe: self.rejected_unsafe,
            rejected_unsafe: self.chosen_unsafe,
            conversation: self.conversation.map(Conversation::swapped),
        }
    }
}
