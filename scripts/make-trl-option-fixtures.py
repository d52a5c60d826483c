#!/usr/bin/env python3
"""Writes tests/fixtures/trl_lr_schedules.json and tests/fixtures/trl_dpo_data.json: what transformers'
learning-rate schedules and TRL's DPO data processing compute, so that tests/trl_options.rs and
tests/data/conversation.rs hold the engine's `lr_scheduler_type`, `warmup_ratio`, conversational
rows and `truncation_mode` to them in CI (which has no torch).

    python3 scripts/make-trl-option-fixtures.py                 # transformers and TRL as installed
    python3 scripts/make-trl-option-fixtures.py --trl-root DIR  # TRL's sources from DIR (trl/...)
    python3 scripts/make-trl-option-fixtures.py --out DIR       # somewhere else (to compare, say)

Needs torch, transformers and numpy.

trl_lr_schedules.json: for each `lr_scheduler_type` (linear, cosine, constant, constant_with_warmup,
cosine_with_min_lr, cosine_warmup_with_min_lr; the last two with `min_lr_rate`) and each run (total
steps; warmup as steps, or as a ratio in (0, 1), which transformers 5 reads from `warmup_steps` and
turns into steps with `TrainingArguments.get_warmup_steps`, called here), transformers' own scheduler
(`get_scheduler`) on a torch SGD optimizer stepped as the `Trainer` steps it (`optimizer.step()`, then
`lr_scheduler.step()`): `lr[k]` is the rate optimizer update k + 1 ran at, `multiplier[k]` the
scheduler's `lr_lambda(k)`. The peak rates and `min_lr_rate`s are float32 values (the engine keeps
them in f32), written as Python floats (full f64 precision).

trl_dpo_data.json: TRL's `DPOTrainer._prepare_dataset` on conversational rows (explicit prompt,
several turns, a system message, and implicit prompts), for each tokenizer of
tests/fixtures/tokenizers/ (made by scripts/make-tokenizer-fixtures.py). TRL is read, not imported
(importing it needs accelerate and datasets): the script takes `extract_prompt`, `is_conversational`,
`_tokenize` and `common_prefix_length` from `trl/data_utils.py`, the `tokenize_fn` nested in
`DPOTrainer._prepare_dataset` and the `keep_start` filter's lambda from `trl/trainer/dpo_trainer.py`,
`DataCollatorForPreference` from the same file and `pad` from `trl/trainer/utils.py`, and runs them
unchanged: `extract_prompt` when the row has no `prompt` (as `_prepare_dataset` maps it), then
`tokenize_fn`; then, for several `max_length`s and both `truncation_mode`s, the filter (`keep_start`)
and the collator's truncation of each sequence (its `input_ids` and `completion_mask` rows, the
padding removed). Each truncated sequence is recorded as the slice of the untruncated prompt + completion it is and
where its completion mask starts (the script checks both against the collator's output). A template
that refuses a row (`raise_exception`) records its error.

The committed files were made with transformers 5.25.0, torch 2.15.0 and TRL 1.16.0; the files
record the versions. The script is deterministic: run again, it writes the same files.
"""

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import logging
import platform
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ["llama2", "llama2_legacy", "mistral", "llama3", "qwen2"]

SCHEDULER_TYPES = [
    "linear",
    "cosine",
    "constant",
    "constant_with_warmup",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
]
# (total optimizer steps, warmup: an int number of steps or a float ratio)
RUNS = [(10, 0), (10, 3), (10, 10), (1, 0), (1, 1), (37, 4), (37, 0.1), (100, 0.07), (3, 0.5), (250, 0.05)]
PEAK_LRS = [3e-4, 1e-5]
MIN_LR_RATES = [0.1, 0.25]


def f32(x):
    return float(np.float32(x))


def schedule_cases():
    from transformers import get_scheduler
    from transformers.training_args import TrainingArguments

    cases = []
    for kind in SCHEDULER_TYPES:
        for i, (total, warmup) in enumerate(RUNS):
            peak = f32(PEAK_LRS[i % len(PEAK_LRS)])
            min_lr_rate = f32(MIN_LR_RATES[i % len(MIN_LR_RATES)]) if "min_lr" in kind else None
            # transformers 5: `warmup_steps` below 1 is a ratio of the run's steps.
            warmup_steps = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=warmup), total)
            param = torch.nn.Parameter(torch.zeros(1))
            optimizer = torch.optim.SGD([param], lr=peak)
            kwargs = {"min_lr_rate": min_lr_rate} if min_lr_rate is not None else None
            scheduler = get_scheduler(
                kind,
                optimizer,
                num_warmup_steps=warmup_steps,
                num_training_steps=total,
                scheduler_specific_kwargs=kwargs,
            )
            multipliers = [float(scheduler.lr_lambdas[0](k)) for k in range(total)]
            lrs = []
            for _ in range(total):
                lrs.append(optimizer.param_groups[0]["lr"])
                optimizer.step()
                scheduler.step()
            case = {"type": kind, "total_steps": total, "warmup": warmup, "warmup_steps": warmup_steps}
            case.update(peak_lr=peak, min_lr_rate=min_lr_rate, lr=lrs, multiplier=multipliers)
            cases.append(case)
    return cases


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You are a careful assistant. Answer briefly."}

# Conversational rows (with our safety labels, which TRL ignores).
ROWS = [
    {
        "prompt": [user("How do I bake bread?")],
        "chosen": [assistant("Mix flour, water, yeast and salt, then bake it for forty minutes.")],
        "rejected": [assistant("I cannot help with that.")],
        "rejected_unsafe": True,
    },
    {
        "prompt": [SYSTEM, user("Qu'est-ce que la crème brûlée? 日本語で答えて 🙂")],
        "chosen": [assistant("C'est un dessert: crème + sucre. 日本 🍮")],
        "rejected": [assistant("Grüße, non.")],
    },
    {
        "prompt": [user("Hello!"), assistant("Hello! How are you today?"), user("I am fine. Tell me about safety.")],
        "chosen": [assistant("Safety matters: a helpful answer is also a harmless answer.")],
        "rejected": [assistant("Sure, here is how to hurt someone.")],
        "chosen_unsafe": False,
        "rejected_unsafe": True,
    },
    {
        "chosen": [user("The quick brown fox?"), assistant("It jumps over the lazy dog.")],
        "rejected": [user("The quick brown fox?"), assistant("I do not know.")],
    },
    {
        "chosen": [
            SYSTEM,
            user("List of items: 1, 2, 3"),
            assistant("1. first\n2. second\n"),
            user("And the last one?"),
            assistant("3. third"),
        ],
        "rejected": [
            SYSTEM,
            user("List of items: 1, 2, 3"),
            assistant("1. first\n2. second\n"),
            user("And the last one?"),
            assistant("\n\nnewlines first"),
        ],
        "chosen_unsafe": True,
    },
    {
        "chosen": [user("Line one"), assistant("Line two"), user("tabs\tand\r\nCRLF"), assistant("it's 2024")],
        "rejected": [user("Line one"), assistant("x"), user("tabs\tand\r\nCRLF"), assistant("I'd go.")],
    },
]


def trl_functions(trl_root):
    """TRL's own functions (see the module documentation), ready to call."""
    from transformers import ProcessorMixin
    from transformers.data.data_collator import DataCollatorMixin

    namespace = {
        "json": json,
        "ProcessorMixin": ProcessorMixin,
        "DataCollatorMixin": DataCollatorMixin,
        "Any": Any,
        "dataclass": dataclass,
        "torch": torch,
        "np": np,
    }

    class Logger:
        def warning_once(self, message):
            pass

    def prepare_multimodal_messages(*_args, **_kwargs):
        raise AssertionError("text-only fixtures")

    namespace.update(logger=Logger(), prepare_multimodal_messages=prepare_multimodal_messages)

    def run(nodes, name):
        for node in nodes:
            exec(compile(ast.Module(body=[node], type_ignores=[]), name, "exec"), namespace)

    def strip_annotations(node):
        node.returns = None
        for arg in node.args.args:
            arg.annotation = None

    data_utils = ast.parse((trl_root / "trl" / "data_utils.py").read_text())
    wanted = {"extract_prompt", "is_conversational", "_tokenize", "common_prefix_length"}
    found = [n for n in data_utils.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    utils = ast.parse((trl_root / "trl" / "trainer" / "utils.py").read_text())
    found += [n for n in utils.body if isinstance(n, ast.FunctionDef) and n.name == "pad"]
    for node in found:
        strip_annotations(node)
    if sorted(n.name for n in found) != sorted(wanted | {"pad"}):
        raise SystemExit(f"TRL's sources changed: found {sorted(n.name for n in found)}")
    run(found, str(trl_root / "trl" / "data_utils.py"))

    trainer = ast.parse((trl_root / "trl" / "trainer" / "dpo_trainer.py").read_text())
    collator = next(n for n in trainer.body if isinstance(n, ast.ClassDef) and n.name == "DataCollatorForPreference")
    dpo = next(n for n in trainer.body if isinstance(n, ast.ClassDef) and n.name == "DPOTrainer")
    prepare = next(n for n in dpo.body if isinstance(n, ast.FunctionDef) and n.name == "_prepare_dataset")
    tokenize_fn = [n for n in ast.walk(prepare) if isinstance(n, ast.FunctionDef) and n.name == "tokenize_fn"]
    # `dataset.filter(lambda example: len(example["prompt_ids"]) < args.max_length, ...)`
    filters = [
        n.args[0]
        for n in ast.walk(prepare)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "filter"
        and n.args
        and isinstance(n.args[0], ast.Lambda)
    ]
    if len(tokenize_fn) != 1 or len(filters) != 1:
        raise SystemExit("TRL's _prepare_dataset changed: expected one tokenize_fn and one filter lambda")
    strip_annotations(tokenize_fn[0])
    run([collator, tokenize_fn[0]], str(trl_root / "trl" / "trainer" / "dpo_trainer.py"))
    keep = ast.Assign(targets=[ast.Name(id="keep_start_filter", ctx=ast.Store())], value=filters[0])
    ast.fix_missing_locations(keep)
    run([keep], "dpo_trainer.py filter")
    return namespace


def sequences(trl, out, max_length, mode):
    """The collator's two truncated sequences (chosen, rejected), each as where it lies in the
    untruncated prompt + completion: `{"start", "end", "completion_start"}`, so that the sequence is
    `(prompt_ids + completion_ids)[start:end]` and its completion mask is 1 from `completion_start` on
    (both checked here)."""
    collator = trl["DataCollatorForPreference"](pad_token_id=0, max_length=max_length, truncation_mode=mode)
    batch = collator.torch_call([out])
    rows = []
    for row, completion in enumerate((out["chosen_ids"], out["rejected_ids"])):
        real = batch["attention_mask"][row].bool()
        ids, mask = batch["input_ids"][row][real].tolist(), batch["completion_mask"][row][real].tolist()
        full = out["prompt_ids"] + completion
        start = 0 if mode == "keep_start" else len(full) - len(ids)
        completion_start = mask.index(1) if 1 in mask else len(mask)
        if full[start : start + len(ids)] != ids or mask != [0] * completion_start + [1] * (len(mask) - completion_start):
            raise SystemExit(f"unexpected truncation by {mode} to {max_length}: {ids} {mask}")
        rows.append({"start": start, "end": start + len(ids), "completion_start": completion_start})
    return rows


def family_rows(directory, trl):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(directory))
    results = []
    for row in ROWS:
        example = {k: row[k] for k in ("prompt", "chosen", "rejected") if k in row}
        if "prompt" not in example:  # `_prepare_dataset`: `dataset.map(extract_prompt)`
            example.update(trl["extract_prompt"](example))
        assert trl["is_conversational"](example)
        try:
            out = trl["tokenize_fn"](dict(example), tok)
        except Exception as error:  # the template's own refusal
            results.append({"error": str(error)})
            continue
        result = {
            "prompt": example["prompt"],
            "prompt_ids": out["prompt_ids"],
            "chosen_ids": out["chosen_ids"],
            "rejected_ids": out["rejected_ids"],
            "truncation": [],
        }
        p, c, r = len(out["prompt_ids"]), len(out["chosen_ids"]), len(out["rejected_ids"])
        lengths = {p + max(c, r) - 3, p + min(c, r), p + 2, p + 1, p, max(c, r) - 1, max(c, r) + 1, 2}
        for max_length in sorted(m for m in lengths if m >= 2):
            for mode in ("keep_start", "keep_end"):
                trl["args"] = SimpleNamespace(max_length=max_length)  # what the filter's lambda reads
                kept = mode != "keep_start" or bool(trl["keep_start_filter"](out))
                case = {"max_length": max_length, "truncation_mode": mode, "kept": kept}
                if kept:
                    case["chosen"], case["rejected"] = sequences(trl, out, max_length, mode)
                result["truncation"].append(case)
        results.append(result)
    return results


def dump(value):
    """JSON with one key per line and lists of numbers on one line (floats in Python's repr)."""
    text = json.dumps(value, indent=1, ensure_ascii=False)
    numbers = re.compile(r"\[\s*(-?[0-9][^\[\]{}\"]*?)\s*\]")
    return numbers.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures")
    parser.add_argument("--trl-root", type=Path, help="a directory holding trl/ (default: the installed TRL)")
    args = parser.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.trl_root is None:
        args.trl_root = Path(importlib.util.find_spec("trl").submodule_search_locations[0]).parent
    made_with = {
        "transformers": importlib.metadata.version("transformers"),
        "torch": torch.__version__,
        "trl": importlib.metadata.version("trl"),
        "python": platform.python_version(),
    }
    schedules = {"made_with": made_with, "cases": schedule_cases()}
    path = args.out / "trl_lr_schedules.json"
    path.write_text(dump(schedules), encoding="utf-8")
    print(f"wrote {path}")

    trl = trl_functions(args.trl_root)
    tokenizers = ROOT / "tests" / "fixtures" / "tokenizers"
    data = {"made_with": made_with, "rows": ROWS, "families": {}}
    for family in FAMILIES:
        data["families"][family] = family_rows(tokenizers / family, trl)
    path = args.out / "trl_dpo_data.json"
    path.write_text(dump(data), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
