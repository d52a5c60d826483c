#!/usr/bin/env python3
"""Writes the LoRA fixtures that tests/lora.rs holds the engine to: a tiny random GPT-2 and a tiny
random Llama (grouped-query attention), each with a PEFT LoRA adapter whose A and B are random
(B non-zero, so that the adapter changes the model), and the log-probs PEFT computes with them.

    python3 scripts/make-lora-fixtures.py                        # into tests/fixtures/lora/
    python3 scripts/make-lora-fixtures.py --out DIR
    python3 scripts/make-lora-fixtures.py --score BASE ADAPTER SEQS.json
        # prints the sequence log-probs PEFT gives an adapter directory (one the engine wrote, say)

Needs torch, transformers, peft and safetensors (CPU is enough). Each fixture is a directory
tests/fixtures/lora/<name>/ with base/ (the model as `save_pretrained` writes it, f32), adapter/
(adapter_config.json + adapter_model.safetensors as `PeftModel.save_pretrained` writes them) and
expected.json: sequences as raw token ids with their prompt length, and for each the sum of its
response tokens' log-probs under the adapted model ("logp") and under the base alone
("base_logp"), computed in float64 from the f32 weights on disk, and the versions that made them.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

SEQUENCES = [([5, 9, 2], [17, 33, 8, 1]), ([40], [3, 3, 60, 12, 7]), ([11, 22, 33, 44, 55], [6])]

FIXTURES = {
    "gpt2": dict(
        config=lambda: GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2),
        model=GPT2LMHeadModel,
        lora=dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "llama-gqa": dict(
        config=lambda: LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32,
            tie_word_embeddings=False,
        ),
        model=LlamaForCausalLM,
        lora=dict(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    ),
}


def sequence_logps(model, sequences):
    out = []
    with torch.no_grad():
        for prompt, response in sequences:
            ids = torch.tensor([prompt + response])
            logits = model(input_ids=ids).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            total = 0.0
            for j, target in enumerate(response):
                total += float(logp[len(prompt) - 1 + j, target])
            out.append(total)
    return out


def make(name, spec, out):
    torch.manual_seed(1234)
    model = spec["model"](spec["config"]())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()
    base_dir, adapter_dir = out / name / "base", out / name / "adapter"
    model.save_pretrained(base_dir)
    base_model = spec["model"].from_pretrained(base_dir, torch_dtype=torch.float64).eval()
    base_logps = sequence_logps(base_model, SEQUENCES)

    lora = get_peft_model(model, LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **spec["lora"]))
    with torch.no_grad():
        for pname, p in lora.named_parameters():
            if "lora_B" in pname:
                p.normal_(0.0, 0.2)
    lora.save_pretrained(adapter_dir)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card: not needed
    # Loaded back from disk in float64: exact references for the f32 values in the files.
    base = spec["model"].from_pretrained(base_dir, torch_dtype=torch.float64).eval()
    adapted = PeftModel.from_pretrained(base, adapter_dir).double().eval()
    logps = sequence_logps(adapted, SEQUENCES)
    expected = {
        "sequences": [{"prompt": p, "response": r} for p, r in SEQUENCES],
        "logp": logps,
        "base_logp": base_logps,
        "made_with": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
    }
    (out / name / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(name, logps, base_logps)


def score(base_dir, adapter_dir, seqs_path):
    seqs = json.loads(Path(seqs_path).read_text())
    config = json.loads((Path(base_dir) / "config.json").read_text())
    cls = GPT2LMHeadModel if config["model_type"] == "gpt2" else LlamaForCausalLM
    base = cls.from_pretrained(base_dir, torch_dtype=torch.float64).eval()
    adapted = PeftModel.from_pretrained(base, adapter_dir).double().eval()
    print(json.dumps(sequence_logps(adapted, [(s["prompt"], s["response"]) for s in seqs])))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests/fixtures/lora"))
    parser.add_argument("--score", nargs=3, metavar=("BASE", "ADAPTER", "SEQS"))
    args = parser.parse_args()
    if args.score:
        score(*args.score)
        return
    out = Path(args.out)
    for name, spec in FIXTURES.items():
        make(name, spec, out)


if __name__ == "__main__":
    sys.exit(main())
