#!/usr/bin/env python3
"""Writes tests/fixtures/trl_losses.json: what Hugging Face TRL's DPO losses compute on fixed inputs,
so that tests/loss.rs holds the objectives to TRL's own code paths in CI (which has no torch).

    python3 scripts/make-trl-loss-fixtures.py                    # TRL as installed (not imported)
    python3 scripts/make-trl-loss-fixtures.py --trl-source FILE  # a given trl/trainer/dpo_trainer.py
    python3 scripts/make-trl-loss-fixtures.py --out FILE         # somewhere else (to compare, say)

Needs torch. TRL itself is read, not imported (importing it needs transformers, accelerate and
datasets, and a trainer): the script parses TRL's `trl/trainer/dpo_trainer.py`, takes the
`if loss_type == ...: / elif ...:` chain of `DPOTrainer._compute_loss` (the per-`loss_type` branches
of TRL 1.x; older TRL had them in `DPOTrainer.dpo_loss`) and runs each branch's statements unchanged,
in float64 (torch's default dtype set to float64, so that constants TRL makes with `torch.tensor`,
such as EXO's ε, are not rounded to float32), with the variables TRL's branches read bound to the fixture's tensors:
`chosen_logps`, `rejected_logps`, `ref_chosen_logps`, `ref_rejected_logps` (sequence log-probs),
`chosen_logratios`, `rejected_logratios`, `chosen_scores`, `rejected_scores`, `delta_score` (the
default `f_divergence_type="reverse_kl"`), `completion_mask` (2B rows, chosen first, each row's first
`length` entries 1), `device`, and `self.beta`, `self.label_smoothing`, `self.args.discopop_tau`.
A branch that reads anything else fails loudly (a NameError), so a TRL that changes its code paths
cannot silently produce a fixture. The gradient is torch's autograd of the summed per-sequence loss
with respect to the policy log-probs; the rewards are TRL's logged `beta * logratios`.

The committed file was made from TRL 1.16.0 (the wheel's trl/trainer/dpo_trainer.py) with torch
2.15.0; the file records both. The inputs are seeded and distinct (AOT sorts the batch, and torch's
sort is not stable), with log-ratios of moderate size, where TRL's naive formulas are exact enough.
`sft` is left out: it is a token-mean NLL over the batch, not a pairwise loss.

Format: {"made_with": {...}, "source": ..., "cases": [{"loss_type", "beta", "label_smoothing",
"discopop_tau", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
"chosen_len", "rejected_len", "losses", "d_chosen_logps", "d_rejected_logps", "chosen_rewards",
"rejected_rewards"}]}, floats in Python's repr (full f64 precision).
"""

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import math
import platform
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
PAIRS = 5

# (loss_type, beta, label_smoothing, discopop_tau): every pairwise loss_type of TRL's DPOTrainer, each
# at TRL's defaults and at a second, non-default setting of what it reads.
CASES = [
    ("sigmoid", 0.1, 0.0, 0.05),
    ("sigmoid", 0.7, 0.0, 0.05),
    ("hinge", 0.1, 0.0, 0.05),
    ("hinge", 0.3, 0.0, 0.05),
    ("ipo", 0.1, 0.0, 0.05),
    ("ipo", 0.5, 0.0, 0.05),
    ("robust", 0.1, 0.1, 0.05),
    ("robust", 0.4, 0.3, 0.05),
    ("exo_pair", 0.1, 1e-3, 0.05),
    ("exo_pair", 0.5, 0.2, 0.05),
    ("nca_pair", 0.1, 0.0, 0.05),
    ("nca_pair", 0.6, 0.0, 0.05),
    ("bco_pair", 0.1, 0.0, 0.05),
    ("bco_pair", 0.6, 0.0, 0.05),
    ("sppo_hard", 0.1, 0.0, 0.05),
    ("sppo_hard", 0.5, 0.0, 0.05),
    ("aot", 0.1, 0.0, 0.05),
    ("aot", 0.5, 0.2, 0.05),
    ("aot_unpaired", 0.1, 0.0, 0.05),
    ("aot_unpaired", 0.5, 0.2, 0.05),
    ("apo_zero", 0.1, 0.0, 0.05),
    ("apo_zero", 0.6, 0.0, 0.05),
    ("apo_down", 0.1, 0.0, 0.05),
    ("apo_down", 0.6, 0.0, 0.05),
    ("discopop", 0.1, 0.0, 0.05),
    ("discopop", 0.4, 0.0, 0.5),
    ("sigmoid_norm", 0.1, 0.0, 0.05),
    ("sigmoid_norm", 2.0, 0.0, 0.05),
]


def trl_source(path):
    """TRL's dpo_trainer.py: the given file, or the installed package's (found, not imported)."""
    if path:
        return Path(path)
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("trl is not installed: pip install --no-deps trl, or pass --trl-source")
    return Path(spec.submodule_search_locations[0]) / "trainer" / "dpo_trainer.py"


def loss_branches(source):
    """{loss_type: compiled statements} of the `loss_type == "..."` chain in DPOTrainer._compute_loss."""
    tree = ast.parse(source)
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DPOTrainer"]
    (compute,) = [n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "_compute_loss"]
    chains = [
        n
        for n in ast.walk(compute)
        if isinstance(n, ast.If)
        and isinstance(n.test, ast.Compare)
        and isinstance(n.test.left, ast.Name)
        and n.test.left.id == "loss_type"
    ]
    branches = {}
    node = chains[0]  # the head of the chain (ast.walk visits it before its elif nodes)
    while isinstance(node, ast.If):
        (name,) = [c.value for c in node.test.comparators]
        module = ast.Module(body=node.body, type_ignores=[])
        branches[name] = compile(ast.fix_missing_locations(module), f"<TRL {name}>", "exec")
        node = node.orelse[0] if len(node.orelse) == 1 else None
    return branches


def inputs(generator):
    """Distinct sequence log-probs (policy near the reference) and response lengths."""
    ref = -torch.rand(2, PAIRS, generator=generator, dtype=torch.float64) * 60.0 - 5.0
    policy = ref + (torch.rand(2, PAIRS, generator=generator, dtype=torch.float64) - 0.5) * 12.0
    lengths = torch.randint(1, 40, (2, PAIRS), generator=generator)
    return policy, ref, lengths


def run_case(branch, loss_type, beta, label_smoothing, tau, policy, ref, lengths):
    chosen_logps = policy[0].clone().requires_grad_(True)
    rejected_logps = policy[1].clone().requires_grad_(True)
    ref_chosen_logps, ref_rejected_logps = ref[0], ref[1]
    width = int(lengths.max())
    positions = torch.arange(width)
    completion_mask = torch.cat([positions < lengths[0][:, None], positions < lengths[1][:, None]]).long()
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    scope = {
        "torch": torch,
        "F": F,
        "math": math,
        "device": torch.device("cpu"),
        "self": SimpleNamespace(
            beta=beta, label_smoothing=label_smoothing, args=SimpleNamespace(discopop_tau=tau)
        ),
        "chosen_logps": chosen_logps,
        "rejected_logps": rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "chosen_logratios": chosen_logratios,
        "rejected_logratios": rejected_logratios,
        "chosen_scores": chosen_logratios,
        "rejected_scores": rejected_logratios,
        "delta_score": chosen_logratios - rejected_logratios,
        "completion_mask": completion_mask,
    }
    exec(branch, scope)
    losses = scope["per_sequence_loss"]
    d_chosen, d_rejected = torch.autograd.grad(losses.sum(), [chosen_logps, rejected_logps])
    floats = lambda t: [float(x) for x in t.detach()]
    return {
        "loss_type": loss_type,
        "beta": beta,
        "label_smoothing": label_smoothing,
        "discopop_tau": tau,
        "chosen_logps": floats(policy[0]),
        "rejected_logps": floats(policy[1]),
        "ref_chosen_logps": floats(ref[0]),
        "ref_rejected_logps": floats(ref[1]),
        "chosen_len": [int(x) for x in lengths[0]],
        "rejected_len": [int(x) for x in lengths[1]],
        "losses": floats(losses),
        "d_chosen_logps": floats(d_chosen),
        "d_rejected_logps": floats(d_rejected),
        "chosen_rewards": floats(beta * chosen_logratios),
        "rejected_rewards": floats(beta * rejected_logratios),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-source", help="TRL's trl/trainer/dpo_trainer.py (default: the installed one)")
    parser.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "trl_losses.json"))
    args = parser.parse_args()

    path = trl_source(args.trl_source)
    branches = loss_branches(path.read_text())
    try:
        trl_version = importlib.metadata.version("trl") if not args.trl_source else "from " + path.name
    except importlib.metadata.PackageNotFoundError:
        trl_version = "unknown"
    missing = sorted({c[0] for c in CASES} - set(branches))
    if missing:
        raise SystemExit(f"{path}: no branch for {missing} (found {sorted(branches)})")

    # float64 throughout, constants included: TRL builds EXO's ε with `torch.tensor(...)`, which is
    # float32 under torch's default dtype and would round ε (TRL's models run in f32/bf16 anyway).
    torch.set_default_dtype(torch.float64)
    generator = torch.Generator().manual_seed(20250516)
    cases = []
    for loss_type, beta, label_smoothing, tau in CASES:
        policy, ref, lengths = inputs(generator)
        cases.append(run_case(branches[loss_type], loss_type, beta, label_smoothing, tau, policy, ref, lengths))

    fixture = {
        "made_with": {"trl": trl_version, "torch": torch.__version__, "python": platform.python_version()},
        "source": "trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss, the `loss_type` branches, run unchanged",
        "not_covered": sorted(set(branches) - {c[0] for c in CASES}),
        "cases": cases,
    }
    # One case per line: small, and a regenerated file diffs case by case.
    head = json.dumps({k: v for k, v in fixture.items() if k != "cases"})[:-1]
    body = ",\n".join(json.dumps(case) for case in cases)
    Path(args.out).write_text(f'{head},\n"cases": [\n{body}\n]}}\n')
    print(f"wrote {len(cases)} cases to {args.out} (TRL {trl_version}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
