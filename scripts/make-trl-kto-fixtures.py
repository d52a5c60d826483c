#!/usr/bin/env python3
"""Writes tests/fixtures/trl_kto.json: what Hugging Face TRL's KTO losses compute on fixed inputs, so
that tests/kto.rs holds the objectives on unpaired examples (`kto`, `apo_zero_unpaired`) to TRL's own
code in CI (which has no torch).

    python3 scripts/make-trl-kto-fixtures.py                    # TRL as installed (not imported)
    python3 scripts/make-trl-kto-fixtures.py --trl-source FILE  # a given trl/trainer/kto_trainer.py
    python3 scripts/make-trl-kto-fixtures.py --out FILE         # elsewhere (to compare)

Needs torch. TRL itself is read, not imported (as scripts/make-trl-loss-fixtures.py reads it): the
script parses `trl/trainer/kto_trainer.py`, takes from `KTOTrainer._compute_loss` the statements from
the KL estimate (`if self.calculate_KL: kl = ...`) through the weighted `losses = torch.cat(...)`, and
the batch loss `loss = losses.nanmean()`, and runs them unchanged in float64 with the variables they
read bound to the fixture's tensors: `KL_logps`, `ref_KL_logps` (the KL sequences' log-probs),
`chosen_logps`, `rejected_logps`, `ref_chosen_logps`, `ref_rejected_logps` (selected from the batch's
sequence log-probs by the labels, as the statements before them in `_compute_loss` select them),
`self.beta`, `self.loss_type`, `self.calculate_KL` (TRL: every loss type but `apo_zero_unpaired`),
`self.desirable_weight`, `self.undesirable_weight`, and `self.accelerator` (one process: its gather
returns its input). A statement that reads anything else fails loudly (a NameError or an
AttributeError), so a TRL that changes its code paths cannot silently produce a fixture. The gradient
is torch's autograd of the batch loss with respect to the policy's sequence log-probs (the KL term is
detached by TRL's own `.detach()`); the rewards are TRL's `chosen_rewards` and `rejected_rewards`.

The committed file was made from TRL 1.16.0 (the wheel's trl/trainer/kto_trainer.py) with the torch
it records. The inputs are seeded, with log-ratios of moderate size.

Format: {"made_with": {...}, "source": ..., "cases": [{"loss_type", "beta", "desirable_weight",
"undesirable_weight", "labels", "policy_logps", "ref_logps", "policy_kl_logps", "ref_kl_logps", "kl",
"losses" (each example's weighted loss, in the batch's order), "loss", "grad" (d loss / d policy
log-prob), "rewards"}]}, floats in Python's repr (full f64 precision).
"""

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import platform
import random
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent

# (loss_type, beta, desirable_weight, undesirable_weight, labels, kl_offset): TRL's defaults and
# other settings of what each loss type reads; `kl_offset` moves the KL sequences' policy log-probs
# (a negative mean is clamped to 0 by TRL).
CASES = [
    ("kto", 0.1, 1.0, 1.0, [True, False, True, True, False, False], 0.8),
    ("kto", 0.5, 1.33, 0.7, [False, True, False, True, True, False, True], 2.5),
    ("kto", 0.3, 1.0, 1.0, [True, False, False, True, False], -3.0),
    ("kto", 0.2, 1.0, 2.0, [True, True, True, True], 1.0),
    ("kto", 0.2, 1.0, 1.0, [False, False, False], 0.5),
    ("apo_zero_unpaired", 0.1, 1.0, 1.0, [True, False, True, False, False, True], 0.0),
    ("apo_zero_unpaired", 0.7, 0.8, 1.25, [False, True, True, False, True], 0.0),
]


def trl_statements(source: str):
    """The statements of `KTOTrainer._compute_loss` that compute the KL estimate, the losses and the
    batch loss, compiled."""
    tree = ast.parse(source)
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "KTOTrainer")
    method = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "_compute_loss")
    body = method.body

    def assigns(stmt, name):
        return isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets)

    def is_kl_branch(stmt):
        return (
            isinstance(stmt, ast.If)
            and ast.unparse(stmt.test) == "self.calculate_KL"
            and any(assigns(s, "kl") for s in stmt.body)
        )

    start = next(i for i, s in enumerate(body) if is_kl_branch(s))
    end = next(i for i, s in enumerate(body) if i > start and assigns(s, "losses"))
    loss = next(s for s in body[end:] if assigns(s, "loss") and "nanmean" in ast.unparse(s.value))
    segment = ast.Module(body=body[start : end + 1] + [loss], type_ignores=[])
    return compile(segment, "kto_trainer.py:KTOTrainer._compute_loss", "exec"), ast.unparse(segment)


def run_case(code, case, rng):
    loss_type, beta, desirable_weight, undesirable_weight, labels, kl_offset = case
    n = len(labels)
    ref = [rng.uniform(-120.0, -5.0) for _ in range(n)]
    policy = [r + rng.uniform(-6.0, 6.0) for r in ref]
    ref_kl = [rng.uniform(-150.0, -10.0) for _ in range(n)]
    policy_kl = [r + kl_offset + rng.uniform(-1.0, 1.0) for r in ref_kl]

    completion_logps = torch.tensor(policy, requires_grad=True)
    ref_completion_logps = torch.tensor(ref)
    bool_labels = torch.tensor(labels, dtype=torch.bool)
    chosen_idx = torch.nonzero(bool_labels, as_tuple=False).view(-1)
    rejected_idx = torch.nonzero(~bool_labels, as_tuple=False).view(-1)
    scope = {
        "torch": torch,
        "F": F,
        "self": SimpleNamespace(
            calculate_KL=loss_type != "apo_zero_unpaired",
            loss_type=loss_type,
            beta=beta,
            desirable_weight=desirable_weight,
            undesirable_weight=undesirable_weight,
            accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, device="cpu"),
        ),
        "KL_logps": torch.tensor(policy_kl),
        "ref_KL_logps": torch.tensor(ref_kl),
        "chosen_logps": completion_logps.index_select(0, chosen_idx),
        "rejected_logps": completion_logps.index_select(0, rejected_idx),
        "ref_chosen_logps": ref_completion_logps.index_select(0, chosen_idx),
        "ref_rejected_logps": ref_completion_logps.index_select(0, rejected_idx),
    }
    exec(code, scope)
    scope["loss"].backward()
    # TRL's `losses` holds the chosen examples' losses, then the rejected ones': back to batch order.
    losses, rewards = [0.0] * n, [0.0] * n
    chosen_losses = scope["losses"][: len(chosen_idx)].tolist()
    rejected_losses = scope["losses"][len(chosen_idx) :].tolist()
    for k, i in enumerate(chosen_idx.tolist()):
        losses[i], rewards[i] = chosen_losses[k], scope["chosen_rewards"][k].item()
    for k, i in enumerate(rejected_idx.tolist()):
        losses[i], rewards[i] = rejected_losses[k], scope["rejected_rewards"][k].item()
    return {
        "loss_type": loss_type,
        "beta": beta,
        "desirable_weight": desirable_weight,
        "undesirable_weight": undesirable_weight,
        "labels": labels,
        "policy_logps": policy,
        "ref_logps": ref,
        "policy_kl_logps": policy_kl,
        "ref_kl_logps": ref_kl,
        "kl": float(scope["kl"].reshape(-1)[0]),
        "losses": losses,
        "loss": scope["loss"].item(),
        "grad": completion_logps.grad.tolist(),
        "rewards": rewards,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trl-source", type=Path, help="trl/trainer/kto_trainer.py (default: TRL as installed)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests/fixtures/trl_kto.json")
    args = parser.parse_args()
    source_path = args.trl_source
    if source_path is None:
        spec = importlib.util.find_spec("trl")
        source_path = Path(spec.origin).parent / "trainer" / "kto_trainer.py"
    code, text = trl_statements(source_path.read_text())
    torch.set_default_dtype(torch.float64)
    rng = random.Random(20260116)
    cases = [run_case(code, case, rng) for case in CASES]
    made_with = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        made_with = {"trl": importlib.metadata.version("trl"), **made_with}
    except importlib.metadata.PackageNotFoundError:
        pass
    lines = [
        "{" + f'"made_with": {json.dumps(made_with)}, "source": '
        + json.dumps("trl/trainer/kto_trainer.py, KTOTrainer._compute_loss, from the KL estimate to the batch loss, run unchanged")
        + ", "
        + f'"statements": {json.dumps(text)},',
        '"cases": [',
        ",\n".join(json.dumps(case) for case in cases),
        "]}",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
