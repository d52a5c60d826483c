#!/usr/bin/env python3
"""Writes tests/fixtures/trl_losses.json, tests/fixtures/trl_loss_modifiers.json and
tests/fixtures/trl_ld_wpo.json: what Hugging Face TRL's preference losses compute on fixed inputs, so
that tests/loss.rs, tests/objectives.rs and tests/logp_modifiers.rs hold the objectives to TRL's own
code paths in CI (which has no torch).

    python3 scripts/make-trl-loss-fixtures.py                    # TRL as installed (not imported)
    python3 scripts/make-trl-loss-fixtures.py --trl-source FILE  # a given trl/trainer/dpo_trainer.py
    python3 scripts/make-trl-loss-fixtures.py --out FILE --out-modifiers FILE --out-ld-wpo FILE  # elsewhere

Needs torch. TRL itself is read, not imported (importing it needs transformers, accelerate and
datasets, and a trainer): the script parses TRL's `trl/trainer/dpo_trainer.py`, takes the
`if loss_type == ...: / elif ...:` chain of `DPOTrainer._compute_loss` (the per-`loss_type` branches
of TRL 1.x; older TRL had them in `DPOTrainer.dpo_loss`) and runs each branch's statements unchanged,
in float64 (torch's default dtype set to float64, so that constants TRL makes with `torch.tensor`,
such as EXO's ε, are not rounded to float32), with the variables TRL's branches read bound to the fixture's tensors:
`chosen_logps`, `rejected_logps`, `ref_chosen_logps`, `ref_rejected_logps` (sequence log-probs),
`chosen_logratios`, `rejected_logratios`, `chosen_scores`, `rejected_scores`, `delta_score` (the
default `f_divergence_type="reverse_kl"`), `completion_mask` and `shift_completion_mask` (2B rows,
chosen first, each row's first `length` entries 1), `per_token_logps` (each sequence's log-prob spread
evenly over its tokens: `sft` reads them), `device`, and `self.beta`, `self.label_smoothing`,
`self.args.discopop_tau`. A branch that reads anything else fails loudly (a NameError), so a TRL that
changes its code paths cannot silently produce a fixture. The gradient is torch's autograd of the
summed per-sequence loss with respect to the policy sequence log-probs; the rewards are TRL's logged
`beta * logratios`.

trl_loss_modifiers.json holds, each case with our objective's text form (`objective`):
- loss mixtures (`loss_type` lists with `loss_weights`, MPO's among them): TRL's
  `loss += per_sequence_loss.mean() * loss_weight`, each row the weighted sum of the branches' rows;
- the f-divergences: `_compute_loss`'s `if self.f_divergence_type == ...` chain, run unchanged before
  the loss branch, except that the α-divergence is run in float64 (TRL's clamp table has no float64
  entry and its `.float()` casts to float32: the script adds `torch.float64: 80.0` and reads
  `.float()` as `.double()`);
- ORPO: `ORPOTrainer.odds_ratio_loss` (trl/experimental/orpo/orpo_trainer.py, with its `log1mexp`,
  `.float()` read as `.double()`) on the mean token log-probs, the loss `nll − mean(losses)` with the
  NLL of the chosen response tokens (the `sft` branch; TRL's ORPO counts the prompt tokens too);
- CPO: `CPOTrainer.cpo_loss` (trl/experimental/cpo/cpo_trainer.py) for each `loss_type`, the mean
  token log-probs for `ipo` and `simpo` as TRL's `average_log_prob`, the loss
  `mean(losses) + cpo_alpha · nll`;
- `bco_pair` with the running reward mean of TRL < 1.0 (not in TRL 1.x; written here from TRL 0.x's
  `bco_pair` branch and `RunningMoments.update`: the batch's mean reward `cat(β x_c, β x_r).mean()`
  is one sample, `mean += (x − mean)·1/(count + 1)` from count 1e-24, in float32 as TRL's `.float()`
  does, and the loss `−log σ(β x_c − δ) − log σ(−(β x_r − δ))`) over three consecutive batches.

The committed files were made from TRL 1.16.0 (the wheel's trl/trainer/dpo_trainer.py and
trl/experimental/{orpo,cpo}) with torch 2.15.0; the files record both. The inputs are seeded and
distinct (AOT sorts the batch, and torch's sort is not stable), with log-ratios of moderate size,
where TRL's naive formulas are exact enough.

trl_ld_wpo.json holds TRL's two log-prob modifiers, on per-token inputs (each case with our
objective's text form and `trl`, what was run): `_compute_loss` from the per-token log-probs on,
unchanged: the policy's `if self.ld_alpha is None: ... else: ...` (LD-DPO's shared and tail masks and
`shared_logps + self.ld_alpha * tail_logps`), the reference's (the same on `ref_per_token_logps`), the
log-ratios, the f-divergence chain, and for each `loss_type` its branch followed by the
`if self.use_weighting:` block (WPO's weights from `outputs.log_sum_sq_probs`, under
`torch.no_grad()`; its in-place `per_sequence_loss *= ...` read out of place, the same values: in
place, autograd fails after `hinge`'s relu and on `sft`'s expanded scalar, as TRL 1.16 does when it
trains them with `use_weighting`). Its inputs are `per_token_logps`, `ref_per_token_logps` and `log_sum_sq_probs`
(`[2B, W]`, chosen rows first, zero past each row's length) with the lengths; its outputs the rows'
losses, the rewards and `d_per_token_logps`, torch's autograd of the rows' sum with respect to the
policy's per-token log-probs.

Format: {"made_with": {...}, "source": ..., "cases": [{"loss_type", "beta", "label_smoothing",
"discopop_tau", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
"chosen_len", "rejected_len", "losses", "d_chosen_logps", "d_rejected_logps", "chosen_rewards",
"rejected_rewards"}]}, floats in Python's repr (full f64 precision); the modifiers' cases have
`objective` and `trl` (what was run) in place of the first four keys, and the running-mean case
`batches` (each with its inputs and outputs and `delta`).
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
    ("sft", 0.1, 0.0, 0.05),
    ("sft", 0.5, 0.0, 0.05),
]

# (loss types, weights, beta, label_smoothing): TRL 1.x's loss mixtures, as `name`+`loss_weights`.
MIXTURES = [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.1, 0.0),  # MPO
    (["sigmoid", "sft"], [1.0, 0.7], 0.1, 0.0),  # RPO as TRL 1.x writes it
    (["robust", "exo_pair"], [0.5, 2.0], 0.3, 0.2),  # one label_smoothing for both
    (["apo_zero", "nca_pair", "sppo_hard"], [1.0, 1.0, 0.25], 0.2, 0.0),
    (["aot", "discopop", "sigmoid_norm"], [1.0, 0.5, 0.3], 0.4, 0.1),
]
# (f_divergence_type, f_alpha_divergence_coef, loss types): every loss TRL lets take an f-divergence
# (but ipo, whose TRL form divides each score by its length), under each divergence.
F_DIVERGENCE_LOSSES = ["sigmoid", "hinge", "robust", "exo_pair", "discopop", "sigmoid_norm", "sft"]
F_DIVERGENCES = [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 1.7)]
# CPO's loss types with (beta, label_smoothing, simpo_gamma, cpo_alpha).
CPO_CASES = [
    ("sigmoid", 0.1, 0.0, 0.5, 1.0),
    ("sigmoid", 0.3, 0.2, 0.5, 0.5),
    ("hinge", 0.1, 0.0, 0.5, 1.0),
    ("ipo", 0.2, 0.0, 0.5, 1.0),
    ("simpo", 2.0, 0.0, 0.5, 0.0),
    ("simpo", 1.5, 0.1, 0.8, 1.0),
]
ORPO_BETAS = [0.1, 0.5]
# Our objective's name for each of TRL's DPO loss types.
OURS = {"sigmoid": "dpo"}


def trl_source(path):
    """TRL's dpo_trainer.py: the given file, or the installed package's (found, not imported)."""
    if path:
        return Path(path)
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("trl is not installed: pip install --no-deps trl, or pass --trl-source")
    return Path(spec.submodule_search_locations[0]) / "trainer" / "dpo_trainer.py"


def compute_loss(source):
    """`DPOTrainer._compute_loss` of TRL's dpo_trainer.py."""
    tree = ast.parse(source)
    (trainer,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DPOTrainer"]
    (compute,) = [n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "_compute_loss"]
    return compute


def if_chain(compute, variable, attribute=None):
    """{value: compiled statements} of the `if <variable> == "...": / elif ...:` chain in `compute`
    (`variable` a name, or `self.<attribute>`)."""

    def tests(node):
        if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)):
            return False
        left = node.test.left
        if attribute is None:
            return isinstance(left, ast.Name) and left.id == variable
        return isinstance(left, ast.Attribute) and left.attr == attribute

    chains = [n for n in ast.walk(compute) if tests(n)]
    branches = {}
    node = chains[0]  # the head of the chain (ast.walk visits it before its elif nodes)
    while isinstance(node, ast.If) and tests(node):
        (name,) = [c.value for c in node.test.comparators]
        module = ast.Module(body=node.body, type_ignores=[])
        branches[name] = ast.fix_missing_locations(module)
        node = node.orelse[0] if len(node.orelse) == 1 else None
    return branches


def compiled(module, name):
    return compile(module, f"<TRL {name}>", "exec")


def loss_branches(source):
    """{loss_type: compiled statements} of the `loss_type == "..."` chain in DPOTrainer._compute_loss."""
    return {k: compiled(v, k) for k, v in if_chain(compute_loss(source), "loss_type").items()}


def in_float64(module, name):
    """`module` compiled with `.float()` read as `.double()` and float64 added to TRL's clamp table (the
    α-divergence and ORPO cast to float32, which would round the fixture)."""
    text = ast.unparse(module)
    for old, new in [(".float()", ".double()"), ("torch.float32: 80.0}", "torch.float32: 80.0, torch.float64: 80.0}")]:
        text = text.replace(old, new)
    return compile(text, f"<TRL {name} in float64>", "exec")


def f_divergence_branches(source):
    """{f_divergence_type: compiled statements} of `_compute_loss`'s f-divergence chain."""
    chain = if_chain(compute_loss(source), None, attribute="f_divergence_type")
    return {k: in_float64(v, k) if k == "alpha_divergence" else compiled(v, k) for k, v in chain.items()}


def method(path, class_name, method_name, scope, float64=False):
    """A method of a class in a TRL file, defined in `scope` (with `.float()` read as `.double()`)."""
    tree = ast.parse(Path(path).read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    (fn,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == method_name]
    fn.decorator_list = []
    module = ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[]))
    exec(in_float64(module, method_name) if float64 else compiled(module, method_name), scope)
    return scope[method_name]


def function(path, name, scope):
    """A module-level function of a TRL file, defined in `scope`."""
    tree = ast.parse(Path(path).read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    exec(compiled(ast.fix_missing_locations(ast.Module(body=[fn], type_ignores=[])), name), scope)
    return scope[name]


def inputs(generator):
    """Distinct sequence log-probs (policy near the reference) and response lengths."""
    ref = -torch.rand(2, PAIRS, generator=generator, dtype=torch.float64) * 60.0 - 5.0
    policy = ref + (torch.rand(2, PAIRS, generator=generator, dtype=torch.float64) - 0.5) * 12.0
    lengths = torch.randint(1, 40, (2, PAIRS), generator=generator)
    return policy, ref, lengths


def floats(t):
    return [float(x) for x in t.detach()]


def leaves(policy):
    """The policy's chosen and rejected sequence log-probs as autograd leaves."""
    return policy[0].clone().requires_grad_(True), policy[1].clone().requires_grad_(True)


def dpo_scope(chosen_logps, rejected_logps, ref, lengths, self_):
    """The variables TRL's `_compute_loss` branches read."""
    ref_chosen_logps, ref_rejected_logps = ref[0], ref[1]
    width = int(lengths.max())
    positions = torch.arange(width)
    completion_mask = torch.cat([positions < lengths[0][:, None], positions < lengths[1][:, None]]).long()
    # Each sequence's log-prob spread evenly over its tokens (a function of it, for autograd).
    logps = torch.cat([chosen_logps, rejected_logps])
    per_token_logps = completion_mask * (logps / torch.cat([lengths[0], lengths[1]]))[:, None]
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    return {
        "torch": torch,
        "F": F,
        "math": math,
        "device": torch.device("cpu"),
        "self": self_,
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
        "shift_completion_mask": completion_mask,
        "per_token_logps": per_token_logps,
    }


def dpo_self(beta, label_smoothing, tau=0.05, f_divergence_type="reverse_kl", coef=0.5):
    return SimpleNamespace(
        beta=beta,
        label_smoothing=label_smoothing,
        args=SimpleNamespace(discopop_tau=tau),
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=coef,
    )


def outputs(rows, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards):
    d_chosen, d_rejected = torch.autograd.grad(rows.sum(), [chosen_logps, rejected_logps])
    return {
        "losses": floats(rows),
        "d_chosen_logps": floats(d_chosen),
        "d_rejected_logps": floats(d_rejected),
        "chosen_rewards": floats(chosen_rewards),
        "rejected_rewards": floats(rejected_rewards),
    }


def input_fields(policy, ref, lengths):
    return {
        "chosen_logps": floats(policy[0]),
        "rejected_logps": floats(policy[1]),
        "ref_chosen_logps": floats(ref[0]),
        "ref_rejected_logps": floats(ref[1]),
        "chosen_len": [int(x) for x in lengths[0]],
        "rejected_len": [int(x) for x in lengths[1]],
    }


def run_case(branch, loss_type, beta, label_smoothing, tau, policy, ref, lengths):
    chosen_logps, rejected_logps = leaves(policy)
    scope = dpo_scope(chosen_logps, rejected_logps, ref, lengths, dpo_self(beta, label_smoothing, tau))
    exec(branch, scope)
    rewards = (beta * scope["chosen_logratios"], beta * scope["rejected_logratios"])
    return {
        "loss_type": loss_type,
        "beta": beta,
        "label_smoothing": label_smoothing,
        "discopop_tau": tau,
        **input_fields(policy, ref, lengths),
        **outputs(scope["per_sequence_loss"], chosen_logps, rejected_logps, *rewards),
    }


def dpo_rows(branches, f_branches, loss_types, weights, self_, policy, ref, lengths):
    """TRL's `_compute_loss` from the f-divergence to `loss`: each row the weighted sum of the branches'."""
    chosen_logps, rejected_logps = leaves(policy)
    scope = dpo_scope(chosen_logps, rejected_logps, ref, lengths, self_)
    exec(f_branches[self_.f_divergence_type], scope)
    scope["delta_score"] = scope["chosen_scores"] - scope["rejected_scores"]
    rows = 0.0
    for loss_type, weight in zip(loss_types, weights):
        exec(branches[loss_type], scope)
        rows = rows + scope["per_sequence_loss"] * weight
    rewards = (self_.beta * scope["chosen_logratios"], self_.beta * scope["rejected_logratios"])
    return outputs(rows, chosen_logps, rejected_logps, *rewards)


def ours(loss_types, weights):
    names = [OURS.get(t, t) for t in loss_types]
    return "+".join(n if w == 1.0 else f"{w!r}*{n}" for n, w in zip(names, weights))


def chosen_nll(chosen_logps, lengths):
    """The chosen response tokens' mean NLL, as TRL's `sft` branch and CPO's cross-entropy take it."""
    return -chosen_logps.sum() / lengths[0].sum()


def modifier_cases(path, generator):
    branches = loss_branches(path.read_text())
    f_branches = f_divergence_branches(path.read_text())
    experimental = path.parent.parent / "experimental"
    cases = []
    for loss_types, weights, beta, eps in MIXTURES:
        policy, ref, lengths = inputs(generator)
        self_ = dpo_self(beta, eps)
        objective = f"{ours(loss_types, weights)}:beta={beta!r}" + (f",eps={eps!r}" if eps else "")
        trl = {"loss_type": loss_types, "loss_weights": weights, "beta": beta, "label_smoothing": eps}
        out = dpo_rows(branches, f_branches, loss_types, weights, self_, policy, ref, lengths)
        cases.append({"objective": objective, "trl": trl, **input_fields(policy, ref, lengths), **out})
    for f_type, coef in F_DIVERGENCES:
        for loss_type in F_DIVERGENCE_LOSSES:
            policy, ref, lengths = inputs(generator)
            eps = {"robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0)
            self_ = dpo_self(0.1, eps, f_divergence_type=f_type, coef=coef)
            objective = f"{ours([loss_type], [1.0])}:beta=0.1,f_divergence_type={f_type}"
            objective += (f",eps={eps!r}" if eps else "") + (f",f_alpha_divergence_coef={coef!r}" if f_type == "alpha_divergence" else "")
            trl = {"loss_type": [loss_type], "beta": 0.1, "label_smoothing": eps, "f_divergence_type": f_type, "f_alpha_divergence_coef": coef}
            out = dpo_rows(branches, f_branches, [loss_type], [1.0], self_, policy, ref, lengths)
            cases.append({"objective": objective, "trl": trl, **input_fields(policy, ref, lengths), **out})

    orpo_file = experimental / "orpo" / "orpo_trainer.py"
    scope = {"torch": torch, "F": F, "math": math}
    function(orpo_file, "log1mexp", scope)
    odds_ratio_loss = method(orpo_file, "ORPOTrainer", "odds_ratio_loss", scope, float64=True)
    for beta in ORPO_BETAS:
        policy, ref, lengths = inputs(generator)
        policy = -policy.abs() * 0.1 - 0.5  # mean log-probs well inside (−∞, 0): probabilities of real text
        chosen_logps, rejected_logps = leaves(policy)
        self_ = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
        means = (chosen_logps / lengths[0], rejected_logps / lengths[1])
        losses, chosen_rewards, rejected_rewards, _, _ = odds_ratio_loss(self_, *means)
        rows = chosen_nll(chosen_logps, lengths) - losses  # ORPO: nll − losses.mean()
        trl = {"trainer": "ORPOTrainer", "beta": beta}
        out = outputs(rows, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)
        cases.append({"objective": f"orpo:beta={beta!r}", "trl": trl, **input_fields(policy, ref, lengths), **out})

    cpo_scope = {"torch": torch, "F": F, "math": math}
    cpo_loss = method(experimental / "cpo" / "cpo_trainer.py", "CPOTrainer", "cpo_loss", cpo_scope)
    for loss_type, beta, eps, gamma, cpo_alpha in CPO_CASES:
        policy, ref, lengths = inputs(generator)
        chosen_logps, rejected_logps = leaves(policy)
        self_ = SimpleNamespace(
            beta=beta,
            label_smoothing=eps,
            loss_type=loss_type,
            simpo_gamma=gamma,
            alpha=0.0,
            accelerator=SimpleNamespace(device=torch.device("cpu")),
        )
        average = loss_type in ["ipo", "simpo"]  # TRL's `average_log_prob`
        logps = (chosen_logps / lengths[0], rejected_logps / lengths[1]) if average else (chosen_logps, rejected_logps)
        losses, chosen_rewards, rejected_rewards = cpo_loss(self_, *logps)
        rows = losses + cpo_alpha * chosen_nll(chosen_logps, lengths)  # CPO: losses.mean() + cpo_alpha·nll
        name = "cpo" if loss_type == "sigmoid" else f"cpo_{loss_type}"
        objective = f"{name}:beta={beta!r},cpo_alpha={cpo_alpha!r}"
        objective += (f",eps={eps!r}" if loss_type in ["sigmoid", "simpo"] else "") + (f",gamma={gamma!r}" if loss_type == "simpo" else "")
        trl = {"trainer": "CPOTrainer", "loss_type": loss_type, "beta": beta, "label_smoothing": eps, "simpo_gamma": gamma, "cpo_alpha": cpo_alpha}
        out = outputs(rows, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)
        cases.append({"objective": objective, "trl": trl, **input_fields(policy, ref, lengths), **out})

    # bco_pair with TRL < 1.0's running mean, over consecutive batches.
    beta, running_mean, count = 0.2, 0.0, 1e-24
    batches = []
    for _ in range(3):
        policy, ref, lengths = inputs(generator)
        chosen_logps, rejected_logps = leaves(policy)
        chosen_logratios, rejected_logratios = chosen_logps - ref[0], rejected_logps - ref[1]
        rewards = torch.cat((beta * chosen_logratios, beta * rejected_logratios), 0).mean().detach()
        # RunningMoments.update(rewards), one sample: `delta = xs_mean.float() - self.mean`, in float32.
        delta = rewards.float() - running_mean
        running_mean += (delta * 1 / (count + 1)).item()
        count += 1
        rows = -F.logsigmoid(beta * chosen_logratios - running_mean) - F.logsigmoid(-(beta * rejected_logratios - running_mean))
        out = outputs(rows, chosen_logps, rejected_logps, beta * chosen_logratios, beta * rejected_logratios)
        batches.append({**input_fields(policy, ref, lengths), **out, "delta": running_mean})
    trl = {"loss_type": "bco_pair", "trl_version": "< 1.0 (RunningMoments)", "beta": beta}
    cases.append({"objective": f"bco_pair:beta={beta!r},bco_running_mean=true", "trl": trl, "batches": batches})
    return cases


# (loss types, weights, beta, label_smoothing, ld_alpha, use_weighting, f_divergence_type): TRL's two
# log-prob modifiers on every DPOTrainer loss type but ipo (whose TRL form divides by the lengths, ours
# not), alone and together, with a mixture, RPO as TRL 1.x writes it and an f-divergence.
LD_WPO_CASES = [
    (["sigmoid"], [1.0], 0.1, 0.0, 0.5, False, "reverse_kl"),
    (["sigmoid"], [1.0], 0.1, 0.0, None, True, "reverse_kl"),
    (["sigmoid"], [1.0], 0.3, 0.0, 0.3, True, "reverse_kl"),
    (["sigmoid"], [1.0], 0.2, 0.0, 0.0, False, "reverse_kl"),
    (["hinge"], [1.0], 0.1, 0.0, 0.7, True, "reverse_kl"),
    (["robust"], [1.0], 0.2, 0.1, 0.5, False, "reverse_kl"),
    (["exo_pair"], [1.0], 0.1, 1e-3, 0.6, True, "reverse_kl"),
    (["nca_pair"], [1.0], 0.2, 0.0, 0.4, True, "reverse_kl"),
    (["bco_pair"], [1.0], 0.1, 0.0, None, True, "reverse_kl"),
    (["sppo_hard"], [1.0], 0.5, 0.0, 0.5, False, "reverse_kl"),
    (["apo_zero"], [1.0], 0.3, 0.0, None, True, "reverse_kl"),
    (["apo_down"], [1.0], 0.3, 0.0, 0.5, False, "reverse_kl"),
    (["discopop"], [1.0], 0.1, 0.0, 0.5, True, "reverse_kl"),
    (["sigmoid_norm"], [1.0], 1.0, 0.0, 0.5, True, "reverse_kl"),
    (["sft"], [1.0], 0.1, 0.0, None, True, "reverse_kl"),
    (["aot"], [1.0], 0.2, 0.1, 0.5, False, "reverse_kl"),
    (["aot_unpaired"], [1.0], 0.2, 0.0, 0.25, False, "reverse_kl"),
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], 0.1, 0.0, 0.5, True, "reverse_kl"),
    (["sigmoid", "sft"], [1.0, 0.7], 0.1, 0.0, 0.5, False, "reverse_kl"),
    (["sigmoid", "sft"], [1.0, 0.7], 0.1, 0.0, 0.5, True, "reverse_kl"),
    (["sigmoid"], [1.0], 0.1, 0.0, 0.5, True, "js_divergence"),
]


def if_node(compute, test_source, assigns, rewrite=lambda block: block):
    """The `if <test_source>:` statement in `compute` whose body assigns `assigns`, compiled whole
    (test included) after `rewrite`."""

    def assigned(node):
        names = set()
        for statement in ast.walk(node):
            if isinstance(statement, ast.Assign):
                names |= {t.id for t in statement.targets if isinstance(t, ast.Name)}
        return names

    found = [
        n
        for n in ast.walk(compute)
        if isinstance(n, ast.If) and ast.unparse(n.test) == test_source and assigns in assigned(n)
    ]
    if len(found) != 1:
        raise SystemExit(f"DPOTrainer._compute_loss: {len(found)} `if {test_source}:` assigning {assigns}")
    module = ast.fix_missing_locations(ast.Module(body=[found[0]], type_ignores=[]))
    return compiled(rewrite(module), test_source)


def out_of_place(block):
    """The `if self.use_weighting:` block with its in-place `per_sequence_loss *= w` read as
    `per_sequence_loss = per_sequence_loss * (w)`, the same values: the in-place product fails under
    autograd after `hinge`'s relu (which saves its output) and on `sft`'s expanded scalar (TRL 1.16
    raises there when it trains)."""
    for node in ast.walk(block):
        if isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Mult):
            if isinstance(node.target, ast.Name) and node.target.id == "per_sequence_loss":
                node.__class__ = ast.Assign
                node.targets = [ast.Name(id="per_sequence_loss", ctx=ast.Store())]
                node.value = ast.BinOp(left=ast.Name(id="per_sequence_loss", ctx=ast.Load()), op=ast.Mult(), right=node.value)
                node.type_comment = None
                return ast.fix_missing_locations(block)
    raise SystemExit("DPOTrainer._compute_loss: no `per_sequence_loss *= ...` in the `if self.use_weighting:` block")


def ld_wpo_inputs(generator):
    """Per-token log-probs of the policy and the reference, the squared masses, and the lengths."""
    lengths = torch.randint(1, 16, (2, PAIRS), generator=generator)
    width = int(lengths.max())
    mask = torch.cat([torch.arange(width) < lengths[0][:, None], torch.arange(width) < lengths[1][:, None]])
    uniform = lambda lo, hi: lo + (hi - lo) * torch.rand(2 * PAIRS, width, generator=generator, dtype=torch.float64)
    ref = uniform(-4.0, -0.05) * mask
    policy = (ref + uniform(-0.6, 0.6)).clamp(max=-0.01) * mask
    log_sum_sq = uniform(-3.0, -0.1) * mask
    return policy, ref, log_sum_sq, lengths, mask.long()


def ld_wpo_cases(path, generator):
    source = path.read_text()
    compute = compute_loss(source)
    branches = loss_branches(source)
    f_branches = f_divergence_branches(source)
    policy_block = if_node(compute, "self.ld_alpha is None", "logps")
    reference_block = if_node(compute, "self.ld_alpha is None", "ref_logps")
    weighting_block = if_node(compute, "self.use_weighting", "weights", out_of_place)
    cases = []
    for loss_types, weights, beta, eps, ld_alpha, use_weighting, f_type in LD_WPO_CASES:
        policy, ref, log_sum_sq, lengths, mask = ld_wpo_inputs(generator)
        per_token_logps = policy.clone().requires_grad_(True)
        self_ = dpo_self(beta, eps, f_divergence_type=f_type)
        self_.ld_alpha, self_.use_weighting = ld_alpha, use_weighting
        scope = {
            "torch": torch,
            "F": F,
            "math": math,
            "device": torch.device("cpu"),
            "self": self_,
            "per_token_logps": per_token_logps,
            "ref_per_token_logps": ref,
            "completion_mask": mask,
            "shift_completion_mask": mask,
            "seq_len": mask.size(1),
            "outputs": SimpleNamespace(log_sum_sq_probs=log_sum_sq),
        }
        exec(policy_block, scope)
        scope["chosen_logps"], scope["rejected_logps"] = scope["logps"].chunk(2, dim=0)
        exec(reference_block, scope)
        scope["ref_chosen_logps"], scope["ref_rejected_logps"] = scope["ref_logps"].chunk(2, dim=0)
        scope["chosen_logratios"] = scope["chosen_logps"] - scope["ref_chosen_logps"]
        scope["rejected_logratios"] = scope["rejected_logps"] - scope["ref_rejected_logps"]
        exec(f_branches[f_type], scope)
        scope["delta_score"] = scope["chosen_scores"] - scope["rejected_scores"]
        rows = 0.0
        for loss_type, weight in zip(loss_types, weights):
            exec(branches[loss_type], scope)
            exec(weighting_block, scope)
            rows = rows + scope["per_sequence_loss"] * weight
        (d_tokens,) = torch.autograd.grad(rows.sum(), [per_token_logps])
        objective = f"{ours(loss_types, weights)}:beta={beta!r}" + (f",eps={eps!r}" if eps else "")
        objective += (f",ld_alpha={ld_alpha!r}" if ld_alpha is not None else "") + (",use_weighting=true" if use_weighting else "")
        objective += f",f_divergence_type={f_type}" if f_type != "reverse_kl" else ""
        trl = {"loss_type": loss_types, "loss_weights": weights, "beta": beta, "label_smoothing": eps, "ld_alpha": ld_alpha, "use_weighting": use_weighting, "f_divergence_type": f_type}
        rows_of = lambda t: [[float(x) for x in row] for row in t.detach()]
        cases.append(
            {
                "objective": objective,
                "trl": trl,
                "chosen_len": [int(x) for x in lengths[0]],
                "rejected_len": [int(x) for x in lengths[1]],
                "per_token_logps": rows_of(policy),
                "ref_per_token_logps": rows_of(ref),
                "log_sum_sq_probs": rows_of(log_sum_sq),
                "losses": floats(rows),
                "chosen_rewards": floats(beta * scope["chosen_logratios"]),
                "rejected_rewards": floats(beta * scope["rejected_logratios"]),
                "d_per_token_logps": rows_of(d_tokens),
            }
        )
    return cases


def write(path, fixture):
    # One case per line: small, and a regenerated file diffs case by case.
    head = json.dumps({k: v for k, v in fixture.items() if k != "cases"})[:-1]
    body = ",\n".join(json.dumps(case) for case in fixture["cases"])
    Path(path).write_text(f'{head},\n"cases": [\n{body}\n]}}\n')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl-source", help="TRL's trl/trainer/dpo_trainer.py (default: the installed one)")
    parser.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "trl_losses.json"))
    parser.add_argument("--out-modifiers", default=str(ROOT / "tests" / "fixtures" / "trl_loss_modifiers.json"))
    parser.add_argument("--out-ld-wpo", default=str(ROOT / "tests" / "fixtures" / "trl_ld_wpo.json"))
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
    made_with = {"trl": trl_version, "torch": torch.__version__, "python": platform.python_version()}
    write(
        args.out,
        {
            "made_with": made_with,
            "source": "trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss, the `loss_type` branches, run unchanged",
            "not_covered": sorted(set(branches) - {c[0] for c in CASES}),
            "cases": cases,
        },
    )
    print(f"wrote {len(cases)} cases to {args.out} (TRL {trl_version}, torch {torch.__version__})")

    modifiers = modifier_cases(path, torch.Generator().manual_seed(20250517))
    source = (
        "trl/trainer/dpo_trainer.py (DPOTrainer._compute_loss: the f-divergence chain, the `loss_type` branches, "
        "loss_weights), trl/experimental/orpo (ORPOTrainer.odds_ratio_loss), trl/experimental/cpo "
        "(CPOTrainer.cpo_loss); bco_pair's running mean from TRL < 1.0"
    )
    write(args.out_modifiers, {"made_with": made_with, "source": source, "cases": modifiers})
    print(f"wrote {len(modifiers)} cases to {args.out_modifiers}")

    ld_wpo = ld_wpo_cases(path, torch.Generator().manual_seed(20250518))
    source = (
        "trl/trainer/dpo_trainer.py, DPOTrainer._compute_loss: the policy's and the reference's `if self.ld_alpha "
        "is None:` blocks, the f-divergence chain, each `loss_type` branch and the `if self.use_weighting:` block"
    )
    write(args.out_ld_wpo, {"made_with": made_with, "source": source, "cases": ld_wpo})
    print(f"wrote {len(ld_wpo)} cases to {args.out_ld_wpo}")


if __name__ == "__main__":
    main()
