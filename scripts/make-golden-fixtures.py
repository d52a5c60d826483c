#!/usr/bin/env python3
"""Writes the golden fixtures that tests/golden.rs holds the engine to: tiny random Hugging Face
models and what `transformers` computes with them, so that CI (which has no torch) still compares
the engine against an implementation it shares no code with.

    python3 scripts/make-golden-fixtures.py                 # every fixture, into tests/fixtures/golden/
    python3 scripts/make-golden-fixtures.py --only NAME     # one fixture
    python3 scripts/make-golden-fixtures.py --out DIR       # somewhere else (to compare, say)

Needs torch, transformers and safetensors (CPU is enough). The committed fixtures were made with
torch 2.15.0, transformers 5.25.0, safetensors 0.8.0 and Python 3.11.7; each expected.json records
the versions that made it. Regenerating rewrites every file of a fixture; the weights come from a
seeded generator, so they are the same whenever torch's CPU generator is, and the test checks
expected.json against the weights it was made from (their SHA-256).

Each fixture is a directory tests/fixtures/golden/<name>/ with
- config.json, model.safetensors: the model exactly as `save_pretrained` writes it, f32 weights;
- expected.json:
  - "pairs": preference pairs as raw token ids (prompt, chosen, rejected; nothing packed), and per
    response: the log-prob of each response token given everything before it ("*_token_logps"),
    their sum ("*_logp"), and the weight of that sum in the loss below ("*_weight");
  - "grads": the gradient of  loss = Σ_pairs chosen_weight·chosen_logp + rejected_weight·rejected_logp
    for every parameter, keyed by the name `named_parameters()` gives it (the tied LM head is the
    token embedding and appears once): its shape, the largest |gradient| over the whole tensor
    ("abs_max", for tolerances scaled to the tensor), and either every value in row-major order
    ("indices": null) or, for tensors of more than FULL_GRAD_LIMIT entries, the values at sorted
    seeded random flat indices plus the largest entry's index;
  - "model_sha256" (of model.safetensors), "made_with" (versions), and the fixture's description.
The model is loaded back from the written directory in float64 with eager attention, so the
expected values are exact-arithmetic references for the f32 weights on disk. Floats are written
with Python's repr (shortest round-trip form), i.e. at full f64 precision.

The weights are not the families' initialisation: they are drawn at a larger scale (see init_weights)
so that attention is peaked, the activation curved and the norms' gains and biases matter, and a
wrong formula cannot hide in a near-linear regime.

Another architecture is one more FAMILIES entry (config and model class, which parameters are norm
gains) and one more FIXTURES entry; the loss, the token log-probs and the file format do not change.
"""

import argparse
import hashlib
import json
import platform
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "fixtures" / "golden"
FORMAT = 1
# Tensors with at most this many entries are stored whole; larger ones are sampled.
FULL_GRAD_LIMIT = 256
# Sampled entries per larger tensor (plus the entry of largest |gradient|).
GRAD_SAMPLES = 192


@dataclass(frozen=True)
class Family:
    config_class: type
    model_class: type
    # Whether a parameter is a normalisation gain (initialised around 1 instead of 0).
    is_norm_gain: object
    # The config's dropout fields, all switched off.
    dropout: tuple = ()


def llama_norm_gain(name):
    return name.endswith("norm.weight")


FAMILIES = {
    "gpt2": Family(
        config_class=GPT2Config,
        model_class=GPT2LMHeadModel,
        is_norm_gain=lambda name: ".ln_" in name and name.endswith(".weight"),
        dropout=("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    ),
    "llama": Family(LlamaConfig, LlamaForCausalLM, llama_norm_gain, ("attention_dropout",)),
    "mistral": Family(MistralConfig, MistralForCausalLM, llama_norm_gain, ("attention_dropout",)),
    "qwen2": Family(Qwen2Config, Qwen2ForCausalLM, llama_norm_gain, ("attention_dropout",)),
}


@dataclass(frozen=True)
class Fixture:
    name: str
    family: str
    description: str
    # Keyword arguments of the family's config class (dropout is switched off for every fixture).
    config: dict
    seed: int
    # (prompt length, chosen length, rejected length) of each pair.
    pairs: list = field(default_factory=list)
    # Rewrite config.json as transformers 4.x writes it (rope_theta + rope_scaling instead of
    # rope_parameters; no layer_types, which Qwen2 then derives from max_window_layers): the engine
    # reads both forms, and transformers 5.x still loads the 4.x one.
    hf4_config: bool = False


def to_hf4_config(path):
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    config.pop("layer_types", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


FIXTURES = [
    Fixture(
        name="gpt2-2layer-4head",
        family="gpt2",
        description="GPT-2, 2 layers, 4 heads of width 8, a vocabulary of 101 (not a multiple of 32); "
        "pairs with a one-token prompt, a one-token response, and a sequence that fills the context",
        config=dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=1e-5,
                    bos_token_id=100, eos_token_id=100),
        seed=20,
        pairs=[(5, 7, 4), (1, 3, 9), (8, 1, 6), (20, 44, 13)],
    ),
    Fixture(
        name="gpt2-1layer-1head-wide",
        family="gpt2",
        description="GPT-2, 1 layer, a single head of width 72 (the wide-head attention kernels), a "
        "vocabulary of 50, LayerNorm epsilon 1e-6; one-token prompt and responses, a sequence that "
        "fills the context",
        config=dict(vocab_size=50, n_positions=24, n_embd=72, n_layer=1, n_head=1, layer_norm_epsilon=1e-6,
                    bos_token_id=49, eos_token_id=49),
        seed=21,
        pairs=[(3, 5, 2), (1, 1, 1), (10, 14, 6)],
    ),
    Fixture(
        name="llama-gqa-llama3-rope-untied",
        family="llama",
        description="Llama, 2 layers, 6 query heads sharing 2 key/value heads (GQA) of width 8, SwiGLU "
        "of 72, llama3 RoPE scaling (theta 5e5), an untied LM head, a vocabulary of 97; config.json as "
        "transformers 5.x writes it (rope_parameters)",
        config=dict(vocab_size=97, hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0, original_max_position_embeddings=16),
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        seed=22,
        pairs=[(4, 6, 3), (1, 2, 5), (9, 1, 12), (16, 30, 9)],
    ),
    Fixture(
        name="mistral-mqa-headdim",
        family="mistral",
        description="Mistral, 1 layer, 4 query heads and one key/value head (MQA) of width 12 (head_dim "
        "given, not hidden/heads), hidden 40, SwiGLU of 56, theta 1e6, a sliding window longer than any "
        "sequence; config.json rewritten in the transformers 4.x form (rope_theta, rope_scaling null)",
        config=dict(vocab_size=61, hidden_size=40, intermediate_size=56, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=12, max_position_embeddings=48, rms_norm_eps=1e-5,
                    rope_parameters=dict(rope_type="default", rope_theta=1000000.0), sliding_window=48,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        seed=23,
        pairs=[(2, 4, 7), (1, 1, 1), (12, 20, 5)],
        hf4_config=True,
    ),
    Fixture(
        name="qwen2-tied-qkv-bias-linear-rope",
        family="qwen2",
        description="Qwen2, 2 layers, 4 query heads sharing 2 key/value heads of width 8, biases on q, k "
        "and v, a tied LM head, linear RoPE scaling (factor 2), SwiGLU of 40, a vocabulary of 53",
        config=dict(vocab_size=53, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
                    tie_word_embeddings=True, use_sliding_window=False, bos_token_id=52, eos_token_id=52),
        seed=24,
        pairs=[(5, 3, 8), (1, 6, 2), (20, 25, 11)],
    ),
    Fixture(
        name="mistral-sliding-window",
        family="mistral",
        description="Mistral, 2 layers, 4 query heads sharing 2 key/value heads of width 8, SwiGLU of 48, "
        "a sliding window of 5 tokens, shorter than most sequences (sliding-window attention in every "
        "layer); config.json as transformers 5.x writes it",
        config=dict(vocab_size=43, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0), sliding_window=5,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        seed=25,
        pairs=[(6, 10, 3), (1, 1, 4), (12, 9, 20)],
    ),
    Fixture(
        name="qwen2-sliding-window-layers",
        family="qwen2",
        description="Qwen2, 3 layers, 4 query heads sharing 2 key/value heads of width 8, q/k/v biases, "
        "tied, use_sliding_window with a window of 6 and max_window_layers 1: layer 0 attends to the "
        "whole prefix, layers 1 and 2 through the window; config.json in the transformers 4.x form "
        "(rope_theta, no layer_types)",
        config=dict(vocab_size=37, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0), use_sliding_window=True,
                    sliding_window=6, max_window_layers=1, tie_word_embeddings=True, bos_token_id=36,
                    eos_token_id=36),
        seed=26,
        pairs=[(5, 8, 2), (1, 3, 1), (9, 14, 7)],
        hf4_config=True,
    ),
]


def init_weights(model, family, gen):
    """Every parameter from N(0, σ²) at a scale far from the usual initialisation: norm gains
    1 + N(0, 0.2²), biases N(0, 0.1²), matrices N(0, 0.3²); each value exact in bf16."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if family.is_norm_gain(name):
                value = 1.0 + 0.2 * noise
            elif name.endswith(".bias"):
                value = 0.1 * noise
            else:
                value = 0.3 * noise
            # Rounded to bf16: a bf16 engine holds exactly these weights, so that its comparison
            # measures its arithmetic, not the rounding of the checkpoint.
            p.copy_(value.to(torch.bfloat16).to(p.dtype))


def make_pairs(fixture, vocab, rng):
    pairs = []
    for prompt_len, chosen_len, rejected_len in fixture.pairs:
        ids = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
        pairs.append({"prompt": ids(prompt_len), "chosen": ids(chosen_len), "rejected": ids(rejected_len)})
    # The first and last token id appear (the embedding's and the head's edge rows).
    pairs[0]["prompt"][0] = vocab - 1
    pairs[0]["chosen"][-1] = 0
    pairs[0]["rejected"][0] = vocab - 1
    for pair in pairs:
        for which in ("chosen", "rejected"):
            # A weight in ±[0.25, 1), so that no sequence's gradient is negligible, and a multiple of
            # 1/64, so that it is exact in bf16 (a bf16 engine computes with the same loss).
            pair[which + "_weight"] = rng.choice([-1, 1]) * rng.randrange(16, 64) / 64
    return pairs


def token_logps(model, prompt, response):
    """log p(response[j] | prompt, response[:j]) for each j, one sequence on its own."""
    tokens = torch.tensor([prompt + response])
    logp = torch.log_softmax(model(input_ids=tokens).logits[0], dim=-1)
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[rows, torch.tensor(response)]


def grad_entry(grad, rng):
    flat = grad.flatten()
    entry = {"shape": list(grad.shape), "abs_max": flat.abs().max().item()}
    if flat.numel() <= FULL_GRAD_LIMIT:
        entry["indices"] = None
        entry["values"] = flat.tolist()
    else:
        picked = set(rng.sample(range(flat.numel()), GRAD_SAMPLES))
        picked.add(int(flat.abs().argmax()))
        indices = sorted(picked)
        entry["indices"] = indices
        entry["values"] = [flat[i].item() for i in indices]
    return entry


def to_json(value, indent=""):
    """JSON with objects one key a line and lists of numbers on one line (floats in repr form)."""
    inner = indent + " "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {to_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + to_json(v, inner) for v in value) + "\n" + indent + "]"
    return json.dumps(value)


def make_fixture(fixture, out_root):
    family = FAMILIES[fixture.family]
    out = out_root / fixture.name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    # The model in f32, written as HF writes it.
    config = family.config_class(**fixture.config, **{k: 0.0 for k in family.dropout})
    torch.manual_seed(fixture.seed)
    model = family.model_class(config).to(torch.float32)
    init_weights(model, family, torch.Generator().manual_seed(fixture.seed))
    model.save_pretrained(out, safe_serialization=True)
    # Only the model itself: generation settings are not part of what the engine reads.
    (out / "generation_config.json").unlink(missing_ok=True)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors"], f"save_pretrained wrote {names}"
    if fixture.hf4_config:
        to_hf4_config(out / "config.json")

    # The expected values, in f64 from exactly the weights on disk.
    model = family.model_class.from_pretrained(out, dtype=torch.float64, attn_implementation="eager")
    model.eval()
    rng = random.Random(fixture.seed)
    pairs = make_pairs(fixture, fixture.config["vocab_size"], rng)
    loss = torch.zeros((), dtype=torch.float64)
    for pair in pairs:
        for which in ("chosen", "rejected"):
            lp = token_logps(model, pair["prompt"], pair[which])
            pair[which + "_token_logps"] = lp.tolist()
            pair[which + "_logp"] = lp.sum().item()
            loss = loss + pair[which + "_weight"] * lp.sum()
    loss.backward()
    grads = {name: grad_entry(p.grad, rng) for name, p in model.named_parameters()}

    expected = {
        "format": FORMAT,
        "name": fixture.name,
        "family": fixture.family,
        "description": fixture.description,
        "made_with": {
            "script": "scripts/make-golden-fixtures.py",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
            "precision": "float64, eager attention",
        },
        "model_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
        "loss": "sum over pairs of chosen_weight * chosen_logp + rejected_weight * rejected_logp",
        "pairs": pairs,
        "grads": grads,
    }
    (out / "expected.json").write_text(to_json(expected) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{out}: {len(pairs)} pairs, {len(grads)} gradient tensors, {size / 1024:.0f} KiB", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="root directory (default: %(default)s)")
    p.add_argument("--only", action="append", help="fixture name (repeatable; default: all)")
    args = p.parse_args()
    torch.use_deterministic_algorithms(True)
    known = {f.name for f in FIXTURES}
    unknown = set(args.only or []) - known
    if unknown:
        p.error(f"unknown fixture {sorted(unknown)}; known: {sorted(known)}")
    for fixture in FIXTURES:
        if not args.only or fixture.name in args.only:
            make_fixture(fixture, args.out)


if __name__ == "__main__":
    main()
