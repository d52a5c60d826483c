"""The module against the CLI (`safedpo logps`), `safedpo.train(config)`, and README's example."""

import json
import re
import subprocess

import numpy as np
import pytest

import safedpo
from conftest import PAIRS, REPO, safedpo_binary


def write_pairs(path, n=None):
    rows = []
    for i in range(n or len(PAIRS)):
        pair = PAIRS[i % len(PAIRS)]
        if isinstance(pair, dict):
            rows.append(dict(pair, prompt=f"{pair['prompt']} ({i})"))
        else:
            rows.append({"prompt": f"{pair[0]} ({i})", "chosen": pair[1], "rejected": pair[2]})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def test_logps_equal_the_cli(tmp_path):
    binary = safedpo_binary()
    assert binary.exists(), f"{binary} is not built (cargo build --release)"
    policy, reference = safedpo.Engine("cpu"), safedpo.Engine("cpu")
    policy.random_policy(seed=11)
    policy.save(tmp_path / "policy")
    reference.random_policy(seed=12)
    reference.save(tmp_path / "reference")
    rows = write_pairs(tmp_path / "pairs.jsonl")
    subprocess.run(
        [binary, "logps", "--model", tmp_path / "policy", "--model.reference", tmp_path / "reference",
         "--data.path", tmp_path / "pairs.jsonl", "--out", tmp_path / "logps.jsonl", "--device", "cpu"],
        check=True, capture_output=True,
    )
    cli = [json.loads(line) for line in (tmp_path / "logps.jsonl").read_text().splitlines()]
    engine = safedpo.Engine("cpu")
    engine.load_policy(tmp_path / "policy")
    engine.load_reference(tmp_path / "reference")
    ours = engine.logps(rows)
    assert len(cli) == len(rows)
    for key in ["policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected"]:
        np.testing.assert_allclose(ours[key], [line[f"{key}_logp"] for line in cli], rtol=1e-5, atol=1e-5)
    tokens = engine.tokenize(rows)
    assert [t["prompt"] + t["chosen"] for t in tokens] == [line["chosen_ids"] for line in cli]


def tiny_run(tmp_path):
    write_pairs(tmp_path / "train.jsonl", n=24)
    return {
        "beta": 0.1, "loss_type": "sigmoid", "learning_rate": 1e-3, "max_steps": 3, "num_train_epochs": 1,
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_length": 64, "seed": 3,
        "output_dir": str(tmp_path / "run"), "logging_steps": 1, "save_steps": 0,
        "data_path": tmp_path / "train.jsonl", "device": "cpu",
        "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.n_positions": 64,
    }


def test_train_from_a_dpo_config_writes_a_checkpoint(tmp_path):
    summary = safedpo.train(tiny_run(tmp_path))
    assert summary["completed"] and summary["steps"] == 3
    final = tmp_path / "run" / "final"
    assert (final / "config.json").exists() and (final / "model.safetensors").exists()
    saved = (final / "run_config.toml").read_text()
    assert 'name = "dpo"' in saved or "sigmoid" in saved or "dpo" in saved
    assert "grad_accum = 2" in saved and "pairs_per_micro_batch = 4" in saved
    # The checkpoint is a model the engine loads.
    engine = safedpo.Engine("cpu")
    engine.load_policy(final)
    assert engine.logps(PAIRS)["policy_chosen"].shape == (3,)


def test_safedpo_keys_and_resume(tmp_path):
    config = dict(tiny_run(tmp_path), loss_type="safedpo", delta=5.0, max_steps=2)
    safedpo.train(config)
    assert "delta = 5" in (tmp_path / "run" / "final" / "run_config.toml").read_text()
    with pytest.raises(RuntimeError, match="resume|overwrite"):
        safedpo.train(config)
    assert safedpo.train(dict(config, overwrite_output_dir=True))["steps"] == 2


def test_a_bad_config_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown DPOConfig key `report_to`"):
        safedpo.train(dict(tiny_run(tmp_path), report_to="wandb"))
    with pytest.raises(ValueError, match="padding_free"):
        safedpo.train(dict(tiny_run(tmp_path), padding_free=False))
    with pytest.raises(RuntimeError, match="objective"):
        safedpo.train(dict(tiny_run(tmp_path), loss_type="no_such_loss"))


def test_readme_python_example_runs(tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
