#!/usr/bin/env python3
"""Writes tests/fixtures/tokenizers/: tiny model directories of the Llama family's tokenizers, and the
token ids that Hugging Face `transformers` and TRL produce from them (expected.json), so that
tests/data/chat.rs holds our tokenizers, chat templates and pair tokenization to theirs in CI (which has
no torch).

    python3 scripts/make-tokenizer-fixtures.py                 # transformers and TRL as installed
    python3 scripts/make-tokenizer-fixtures.py --trl-root DIR  # TRL's sources from DIR (trl/...)
    python3 scripts/make-tokenizer-fixtures.py --out DIR       # somewhere else (to compare, say)

Needs `transformers` and `tokenizers`. The tokenizers are trained here, on a few sentences, with the
`tokenizers` library (nothing is downloaded); each directory is laid out as its family's Hub repositories
are, with a `config.json` naming the model type (transformers picks the tokenizer class from it):

- llama2:  SentencePiece-style BPE with byte fallback (`<0x..>` tokens), the Llama-2 tokenizer.json
           pipeline (Prepend + Replace normalizer), `LlamaTokenizer`, a Llama-2-chat template;
- llama2_legacy: the same with `legacy: true` (`▁` before every piece between special tokens);
- mistral: the same tokenizer.json with model type `mistral` (transformers 5 then reads tokenizer.json
           as it is instead of rebuilding a `LlamaTokenizer`), a Mistral-instruct template in
           `chat_template.jinja` (the file transformers 5 writes);
- llama3:  byte-level BPE with the Llama-3 pre-tokenizer regex, `<|begin_of_text|>` from the
           post-processor, `PreTrainedTokenizerFast`, a Llama-3.1-style template (date string, tools);
- qwen2:   byte-level BPE with Qwen2's regex and NFC, `Qwen2Tokenizer`, a ChatML template with
           Qwen2's default system message.

TRL is read, not imported (importing it needs accelerate, datasets and pyarrow): the script takes
`_tokenize`, `common_prefix_length` and `is_conversational` from `trl/data_utils.py`, and the
`add_eos` and `tokenize_fn` functions nested in `DPOTrainer._prepare_dataset` from
`trl/trainer/dpo_trainer.py`, and runs them unchanged on each case:

- chat: the conversational row {"prompt": [user], "chosen": [assistant], "rejected": [assistant]};
- text: the plain row our `{prompt}` template makes ({"prompt": template(prompt), "chosen": " " +
        response, ...}), through `add_eos` as TRL's non-conversational path does.

Also in expected.json: `facts` (EOS, BOS, the generation config's EOS ids, the vocabulary size),
`encode` (texts encoded with no special tokens added, and decoded with special tokens skipped), and
`jinja` (small templates using the Jinja features Hugging Face templates use, rendered by transformers'
own Jinja2 environment, or the error they raise).

The committed files were made with transformers 5.25.0, tokenizers 0.23.3 and TRL 1.16.0; expected.json
records the versions. The script is deterministic: run again, it writes the same files.
"""

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import logging
import platform
import shutil
from pathlib import Path

from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent

# Training text: enough words for a few hundred merges; é, ü and ß are in the alphabet, CJK and emoji
# are not (SentencePiece-style models fall back to bytes for them).
CORPUS = """The quick brown fox jumps over the lazy dog.
Hello world! How are you today? I am fine, thank you.
I cannot help with that request, because it could hurt someone.
Sure, here is how to bake bread: mix flour, water, yeast and salt, then bake it for forty minutes.
The assistant answers the question of the user as well as it can.
Safety matters: a helpful answer is also a harmless answer.
Qu'est-ce que la crème brûlée? C'est un dessert très célèbre.
Grüße aus München, über die Straße.
Line one
Line two

List of items: 1, 2, 3, 12, 123, 1234 and 2024.
She said: "don't do that", and he'll listen; they're here, we've seen it, I'd go.
    indented code with    many   spaces and\ttabs
""".splitlines()

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Chat templates in the formats of the families' instruct models (written for these fixtures).
LLAMA2_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = none %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if loop.index0 == 0 and system_message is not none %}
        {%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {%- else %}
        {%- set content = message['content'] %}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + content.strip() + ' ' + eos_token }}
    {%- endif %}
{%- endfor %}
"""

MISTRAL_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- continue %}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- '[INST] ' + message['content'] + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}
"""

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant', 'system'] %}
        {{- raise_exception("Unsupported role: " + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN2_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] != 'system' %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first and tools %}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

TEXT_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"

# (prompt, chosen, rejected): plain text, unicode the tokenizers know and do not know, leading and
# trailing spaces, an empty response, special-token text inside user and assistant text, newlines,
# digits, tabs and CRLF, a whitespace-only response.
CASES = [
    ("How do I bake bread?", "Mix flour, water and salt, then bake it.", "I cannot help with that."),
    (
        "Qu'est-ce que la crème brûlée? 日本語で答えて 🙂",
        "C'est un dessert: crème + sucre. 日本 🍮",
        "Grüße, non.",
    ),
    ("  two leading spaces and trailing  ", " leading space response", "trailing space response "),
    ("Say nothing.", "", "Something."),
    (
        "Ignore </s> <s> [INST] <|eot_id|> <|im_end|> <|start_header_id|>system<|end_header_id|> this",
        "I see <|im_start|> and </s> and <|begin_of_text|>.",
        "ok",
    ),
    ("Line one\nLine two\n\nList 12345 items:\n- a\n- b", "1. first\n2. second\n", "\n\nnewlines first"),
    ("tabs\tand\r\nCRLF it's 2024", "   ", "x"),
]

# Texts encoded alone (no special tokens added) and decoded back (special tokens skipped).
ENCODE_TEXTS = [
    "",
    "Hello world",
    " Hello world",
    "  two",
    "héllo wörld crème",
    "日本語 🙂 ✓",
    "it's they're I'd 1234567 2024",
    "a\nb\r\n\tc  \n\n d",
    "</s><s> <|eot_id|>x<|im_end|>\n",
    "trailing   ",
    "cre\u0300me de\u0301ja\u0300\u00a0vu",  # decomposed accents (Qwen2's NFC composes them), a no-break space
]


# Jinja features Hugging Face chat templates use, each rendered by transformers' own environment on
# JINJA_MESSAGES (with the special tokens JINJA_TOKENS), or failing (`raise_exception`).
JINJA_MESSAGES = [
    {"role": "system", "content": "  Be brief.  "},
    {"role": "user", "content": "Hi 'there', \"you\"\n"},
    {"role": "assistant", "content": "Hello!"},
]
JINJA_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
JINJA_CASES = {
    "loop_controls": "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
    "{% if m.role == 'assistant' %}{% break %}{% endif %}[{{ m.content }}]{% endfor %}",
    "python_methods": "{{ messages[0].content.strip() }}|{{ messages[0].content.lstrip() }}|"
    "{{ messages[0].content.rstrip() }}|{{ messages[1].content.split(' ') }}|{{ 'ab'.upper() }}|"
    "{{ messages[2].content.startswith('Hel') }}|{{ messages[2].content.endswith('?') }}|"
    "{{ messages[2].content.replace('l', 'L') }}|{{ messages[0].get('role') }}|{{ messages[0].get('name', 'none') }}|"
    "{% for k, v in messages[2].items() %}{{ k }}={{ v }};{% endfor %}|{{ messages[0]['content'] | trim }}",
    "python_values": "{{ none }} {{ true }} {{ false }} {{ [1, 'a', none, true] }} {{ {'k': 'v', 'n': 2} }} "
    "{{ 1.5 }} {{ 2 }} {{ \"it's\" }} {{ ['it\\'s'] }} {{ messages[0] }}",
    "tojson": "{{ {'a': [1, 2.5, none, true, []], 'b': 'é\"\\n\\t<>&', 'c': {}} | tojson }}\n"
    "{{ {'a': [1, {'x': 'y'}], 'b': 'é'} | tojson(indent=2) }}\n"
    "{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}\n{{ 'é✓🙂' | tojson(ensure_ascii=true) }}\n"
    "{{ [1, {'a': 2}] | tojson(separators=(',', ':')) }}\n{{ messages | tojson }}",
    "namespace_and_tests": "{% set ns = namespace(found=false, n=0) %}{% for m in messages %}"
    "{% if m.role == 'system' %}{% set ns.found = true %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}"
    "{{ ns.found }} {{ ns.n }} {{ tools is none }} {{ documents is none }} {{ date_string is defined }} "
    "{{ messages[0].content is string }} {{ messages | length }} {{ messages[1:] | length }} "
    "{{ (messages | selectattr('role', 'equalto', 'user') | list | length) }} {{ messages[-1].role }} "
    "{{ missing | default('fallback') }} {{ (messages | first).role }} {{ bos_token }}{{ eos_token }}{{ pad_token }}",
    "generation_blocks": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
    "{{ m.content }}{% endgeneration %}\n{%- generation -%}\n  {{ m.content | upper }}  \n{%- endgeneration -%}\n!"
    "{% else %}<{{ m.role }}>{% endif %}{% endfor %}",
    "whitespace": "{%- for m in messages %}\n    {%- if loop.first %}\n  first: {{ m.role }}\n    {% endif %}\n"
    "    {% if not loop.last %}\n{{ m.role }},\n    {% else %}\n{{ m.role }}.\n    {% endif %}\n{% endfor %}\n"
    "{% if add_generation_prompt %}\n  GEN\n{% endif %}\n",
    "macros_and_strings": "{% macro show(m, sep=': ') %}{{ m.role | title }}{{ sep }}{{ m.content | trim }}"
    "{% endmacro %}{% for m in messages %}{{ show(m) ~ ' / ' + m.role | capitalize }}"
    "{{ '\\n' if not loop.last }}{% endfor %}{% set d = dict(a=1, b='x') %} {{ d.a }}{{ d['b'] }} "
    "{{ messages | map(attribute='role') | join(',') }} {{ 'x' * 3 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ -1 | abs }}",
    "raise_exception": "{% if messages[0].role == 'system' %}{{ raise_exception('System roles are not supported') }}"
    "{% endif %}never",
}


def train_bpe(pre_tokenizer, vocab_size, *, initial_alphabet=(), limit_alphabet=None, **model_args):
    """BPE vocabulary and merges trained on CORPUS (no special tokens)."""
    tok = Tokenizer(models.BPE(**model_args))
    tok.pre_tokenizer = pre_tokenizer
    args = dict(vocab_size=vocab_size, show_progress=False, initial_alphabet=list(initial_alphabet))
    if limit_alphabet is not None:
        args["limit_alphabet"] = limit_alphabet
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(**args))
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], model["merges"]


def added_token(id_, content, special=True, normalized=False):
    return {
        "id": id_,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": normalized,
        "special": special,
    }


def template_processing(bos, bos_id):
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def decoder_config(added_tokens):
    """tokenizer_config.json's `added_tokens_decoder`, as transformers writes it."""
    return {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in added_tokens
    }


def sentencepiece_tokenizer_json():
    """Llama-2's layout: <unk> <s> </s>, the 256 byte tokens, then the pieces; Prepend + Replace."""
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trained, merges = train_bpe(metaspace, 420, limit_alphabet=64)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in BYTE_TOKENS:
        vocab[b] = len(vocab)
    for piece in sorted(trained, key=trained.get):
        vocab.setdefault(piece, len(vocab))
    added = [added_token(0, "<unk>"), added_token(1, "<s>"), added_token(2, "</s>")]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": "▁"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": template_processing("<s>", 1),
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }, added


def byte_level_tokenizer_json(regex, specials, *, nfc, bos):
    """A byte-level BPE after a regex split, `specials` after the vocabulary: Llama-3's layout (no
    normalizer, merges ignored for whole words, BOS from the post-processor) or, with `nfc`, Qwen2's."""
    pre = [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": not nfc, "use_regex": False},
    ]
    trainer_pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    vocab, merges = train_bpe(trainer_pre, 700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    added = [added_token(len(vocab) + i, t) for i, t in enumerate(specials)]
    if bos is None:
        post = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    else:
        bos_id = next(t["id"] for t in added if t["content"] == bos)
        byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
        post = {"type": "Sequence", "processors": [byte_level, template_processing(bos, bos_id)]}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"} if nfc else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": not nfc,
            "vocab": vocab,
            "merges": merges,
        },
    }, added


def model_config(model_type, tokenizer_json):
    """A config.json naming the model type (transformers picks the tokenizer class from it)."""
    ids = list(tokenizer_json["model"]["vocab"].values()) + [t["id"] for t in tokenizer_json["added_tokens"]]
    return {"model_type": model_type, "vocab_size": max(ids) + 1}


def families():
    """name -> (files: {file name: JSON value or text}, description)."""
    out = {}
    sp_json, sp_added = sentencepiece_tokenizer_json()
    sp_added_token = lambda content: {  # noqa: E731 (the AddedToken objects of Llama-2's config)
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }
    out["llama2"] = {
        "tokenizer.json": sp_json,
        "tokenizer_config.json": {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": decoder_config(sp_added),
            "bos_token": sp_added_token("<s>"),
            "chat_template": LLAMA2_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": sp_added_token("</s>"),
            "legacy": False,
            "model_max_length": 4096,
            "pad_token": None,
            "padding_side": "right",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": sp_added_token("<unk>"),
            "use_default_system_prompt": False,
        },
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
        "config.json": model_config("llama", sp_json),
    }
    # `legacy: true`: transformers' LlamaTokenizer puts `▁` before every piece between special tokens.
    out["llama2_legacy"] = dict(out["llama2"])
    out["llama2_legacy"]["tokenizer_config.json"] = {**out["llama2"]["tokenizer_config.json"], "legacy": True}
    out["mistral"] = {
        "tokenizer.json": sp_json,
        "tokenizer_config.json": {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": decoder_config(sp_added),
            "bos_token": "<s>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "</s>",
            "legacy": False,
            "model_max_length": 32768,
            "pad_token": None,
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
            "unk_token": "<unk>",
        },
        "chat_template.jinja": MISTRAL_TEMPLATE,
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2},
        "config.json": model_config("mistral", sp_json),
    }
    llama3_specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    l3_json, l3_added = byte_level_tokenizer_json(LLAMA3_REGEX, llama3_specials, nfc=False, bos="<|begin_of_text|>")
    l3_id = {t["content"]: t["id"] for t in l3_added}
    out["llama3"] = {
        "tokenizer.json": l3_json,
        "tokenizer_config.json": {
            "added_tokens_decoder": decoder_config(l3_added),
            "bos_token": "<|begin_of_text|>",
            "chat_template": LLAMA3_TEMPLATE,
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
        "generation_config.json": {
            "bos_token_id": l3_id["<|begin_of_text|>"],
            "eos_token_id": [l3_id["<|end_of_text|>"], l3_id["<|eom_id|>"], l3_id["<|eot_id|>"]],
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.9,
        },
        "config.json": model_config("llama", l3_json),
    }
    qwen_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    q_json, q_added = byte_level_tokenizer_json(QWEN2_REGEX, qwen_specials, nfc=True, bos=None)
    q_id = {t["content"]: t["id"] for t in q_added}
    out["qwen2"] = {
        "tokenizer.json": q_json,
        "tokenizer_config.json": {
            "add_prefix_space": False,
            "added_tokens_decoder": decoder_config(q_added),
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "chat_template": QWEN2_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
        "generation_config.json": {
            "bos_token_id": q_id["<|endoftext|>"],
            "eos_token_id": [q_id["<|im_end|>"], q_id["<|endoftext|>"]],
            "pad_token_id": q_id["<|endoftext|>"],
        },
        "config.json": model_config("qwen2", q_json),
    }
    return out


def write_family(directory, files):
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        (directory / name).write_text(text, encoding="utf-8")


def trl_functions(trl_root):
    """TRL's own tokenization functions (see the module documentation), ready to call."""
    from transformers import ProcessorMixin

    namespace = {"json": json, "ProcessorMixin": ProcessorMixin, "Any": object}
    warnings = []

    class Logger:
        def warning_once(self, message):
            warnings.append(message)

    def prepare_multimodal_messages(*_args, **_kwargs):
        raise AssertionError("text-only fixtures")

    namespace.update(logger=Logger(), prepare_multimodal_messages=prepare_multimodal_messages)
    data_utils = ast.parse((trl_root / "trl" / "data_utils.py").read_text())
    wanted = {"_tokenize", "common_prefix_length", "is_conversational"}
    found = [node for node in data_utils.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    trainer = ast.parse((trl_root / "trl" / "trainer" / "dpo_trainer.py").read_text())
    dpo = next(n for n in trainer.body if isinstance(n, ast.ClassDef) and n.name == "DPOTrainer")
    prepare = next(n for n in dpo.body if isinstance(n, ast.FunctionDef) and n.name == "_prepare_dataset")
    nested = [n for n in ast.walk(prepare) if isinstance(n, ast.FunctionDef) and n.name in ("add_eos", "tokenize_fn")]
    names = sorted(n.name for n in found + nested)
    if names != ["_tokenize", "add_eos", "common_prefix_length", "is_conversational", "tokenize_fn"]:
        raise SystemExit(f"TRL's sources changed: found {names}")
    for node in found + nested:
        node.returns = None
        for arg in node.args.args:
            arg.annotation = None
        exec(compile(ast.Module(body=[node], type_ignores=[]), str(trl_root), "exec"), namespace)
    return namespace, warnings


def family_expectations(directory, trl, warnings):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    gen = json.loads((directory / "generation_config.json").read_text())
    eos_ids = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    facts = {
        "tokenizer_class": type(tok).__name__,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "prefix_ids": tok("x").input_ids[: -len(tok("x", add_special_tokens=False).input_ids)],
        "generation_eos_token_ids": eos_ids,
        "vocab_size": len(tok),
    }
    encode = [
        {
            "text": text,
            "ids": tok(text, add_special_tokens=False).input_ids,
            "decoded": tok.decode(tok(text, add_special_tokens=False).input_ids, skip_special_tokens=True),
        }
        for text in ENCODE_TEXTS
    ]
    chat, text_rows = [], []
    for prompt, chosen, rejected in CASES:
        user = [{"role": "user", "content": prompt}]
        row = {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }
        warnings.clear()
        out = trl["tokenize_fn"](dict(row), tok)
        chat.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "prompt_text": tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True),
                "chosen_text": tok.apply_chat_template(user + row["chosen"], tokenize=False),
                "generation_prompt_ids": tok.apply_chat_template(user, add_generation_prompt=True)["input_ids"],
                "prompt_ids": out["prompt_ids"],
                "chosen_ids": out["chosen_ids"],
                "rejected_ids": out["rejected_ids"],
                "trl_warned": bool(warnings),
            }
        )
        space = lambda r: r if r[:1].isspace() else " " + r  # noqa: E731 (our Template::response_text)
        plain = {"prompt": TEXT_TEMPLATE.replace("{prompt}", prompt), "chosen": space(chosen), "rejected": space(rejected)}
        plain = trl["add_eos"](dict(plain), tok.eos_token)
        out = trl["tokenize_fn"](plain, tok)
        text_rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "prompt_ids": out["prompt_ids"],
                "chosen_ids": out["chosen_ids"],
                "rejected_ids": out["rejected_ids"],
            }
        )
    return {"facts": facts, "encode": encode, "chat": chat, "text": text_rows}


def jinja_expectations():
    from transformers.utils.chat_template_utils import render_jinja_template

    cases = []
    for name, source in JINJA_CASES.items():
        case = {"name": name, "template": source, "add_generation_prompt": True}
        try:
            rendered, _ = render_jinja_template(
                conversations=[JINJA_MESSAGES], chat_template=source, add_generation_prompt=True, **JINJA_TOKENS
            )
            case["rendered"] = rendered[0]
        except Exception as error:  # the template's own failure (raise_exception)
            case["error"] = str(error)
        cases.append(case)
    return {"messages": JINJA_MESSAGES, "special_tokens": JINJA_TOKENS, "cases": cases}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "tokenizers")
    parser.add_argument("--trl-root", type=Path, help="a directory holding trl/ (default: the installed TRL)")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.trl_root is None:
        args.trl_root = Path(importlib.util.find_spec("trl").submodule_search_locations[0]).parent
    trl, warnings = trl_functions(args.trl_root)
    expected = {
        "made_with": {
            "transformers": importlib.metadata.version("transformers"),
            "tokenizers": importlib.metadata.version("tokenizers"),
            "trl": importlib.metadata.version("trl"),
            "python": platform.python_version(),
        },
        "text_template": TEXT_TEMPLATE,
        "families": {},
        "jinja": jinja_expectations(),
    }
    for name, files in families().items():
        directory = args.out / name
        write_family(directory, files)
        expected["families"][name] = family_expectations(directory, trl, warnings)
    path = args.out / "expected.json"
    path.write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {path} and {', '.join(expected['families'])}")


if __name__ == "__main__":
    main()
