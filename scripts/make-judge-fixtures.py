#!/usr/bin/env python3
"""Judges (reward and cost models) as `transformers` computes them, for tests/reward_model.rs.

    python3 scripts/make-judge-fixtures.py                       # fixtures into tests/fixtures/judges/
    python3 scripts/make-judge-fixtures.py --score DIR SEQS.json  # scores of a saved judge, as JSON

The first form writes, per fixture, a tiny random `*ForSequenceClassification` (num_labels = 1) with
`save_pretrained` (f32) and `scores.json`: token sequences of several lengths and the score
`transformers` gives each, all of them in one right-padded batch (so that its last-non-pad-token
rule is what picks the position). The second loads a judge safedpo wrote and prints the scores of
the sequences in SEQS.json (a list of lists of ids), one sequence at a time: the `#[ignore]`d live
test of tests/reward_model.rs.

Needs torch and transformers (CPU). Weights are drawn at a larger scale than the usual
initialisation (as in make-golden-fixtures.py) so that the scores are far from zero and a wrong
position or a missing norm cannot hide. The models run in float64 from the f32 weights on disk.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
)

ROOT = Path(__file__).resolve().parent.parent
PAD = 63

FIXTURES = {
    "gpt2-judge": (
        GPT2ForSequenceClassification,
        GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, num_labels=1, pad_token_id=PAD,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    ),
    "llama-gqa-judge": (
        LlamaForSequenceClassification,
        LlamaConfig(vocab_size=64, max_position_embeddings=32, hidden_size=16, intermediate_size=24,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                    pad_token_id=PAD, tie_word_embeddings=False),
    ),
}


def init_weights(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if "norm" in name or ".ln_" in name:
                value = (1.0 + 0.2 * noise) if name.endswith("weight") else 0.1 * noise
            elif name.endswith(".bias"):
                value = 0.1 * noise
            else:
                value = 0.3 * noise
            p.copy_(value.to(p.dtype))


def scores_of(model, sequences, batched):
    model = model.double().eval()
    with torch.no_grad():
        if not batched:
            return [model(torch.tensor([s])).logits[0, 0].item() for s in sequences]
        width = max(len(s) for s in sequences)
        ids = torch.tensor([s + [PAD] * (width - len(s)) for s in sequences])
        mask = (ids != PAD).long()
        return model(ids, attention_mask=mask).logits[:, 0].tolist()


def make(out):
    rng = random.Random(7)
    for name, (cls, config) in FIXTURES.items():
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(11)
        model = cls(config)
        init_weights(model, gen)
        directory = out / name
        model.save_pretrained(directory, safe_serialization=True)
        sequences = [[rng.randrange(PAD) for _ in range(n)] for n in (1, 5, 9, 17, 32)]
        loaded = AutoModelForSequenceClassification.from_pretrained(directory, attn_implementation="eager")
        expected = {
            "sequences": sequences,
            "scores": scores_of(loaded, sequences, batched=True),
            "made_with": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        (directory / "scores.json").write_text(json.dumps(expected, indent=1) + "\n")
        print(directory)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/judges")
    parser.add_argument("--score", nargs=2, metavar=("DIR", "SEQS"))
    args = parser.parse_args()
    if args.score:
        directory, seqs = args.score
        model = AutoModelForSequenceClassification.from_pretrained(directory, attn_implementation="eager")
        print(json.dumps(scores_of(model, json.loads(Path(seqs).read_text()), batched=False)))
        return
    make(args.out)


if __name__ == "__main__":
    sys.exit(main())
