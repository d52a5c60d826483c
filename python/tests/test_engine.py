"""safedpo.Engine: log-probs, losses, steps, checkpoints, errors."""

import math
import threading

import numpy as np
import pytest

import safedpo
from conftest import PAIRS


def test_logps_shapes_and_policy_equals_reference(engine):
    out = engine.logps(PAIRS)
    assert set(out) == {"policy_chosen", "policy_rejected", "reference_chosen", "reference_rejected"}
    for values in out.values():
        assert isinstance(values, np.ndarray) and values.dtype == np.float32 and values.shape == (len(PAIRS),)
        assert np.all(values < 0)
    np.testing.assert_array_equal(out["policy_chosen"], out["reference_chosen"])
    np.testing.assert_array_equal(out["policy_rejected"], out["reference_rejected"])


def test_no_reference_no_reference_keys():
    e = safedpo.Engine("cpu")
    e.random_policy({"n_layer": 1}, seed=1)
    assert set(e.logps(PAIRS[:1])) == {"policy_chosen", "policy_rejected"}
    assert e.policy_config["n_layer"] == 1 and e.device == "cpu" and e.precision == "f32"


def test_dpo_loss_is_log_2_at_policy_equal_reference(engine):
    out = engine.loss(PAIRS, "dpo", beta=0.1)
    assert out["objective"].startswith("dpo")
    assert out["loss"] == pytest.approx(math.log(2), abs=1e-5)
    np.testing.assert_allclose(out["losses"], math.log(2), atol=1e-5)
    np.testing.assert_allclose(out["margins"], 0.0, atol=1e-6)
    assert out["policy_chosen"].shape == (3,)


def test_safedpo_margin_enters_where_only_the_rejected_is_unsafe(engine):
    out = engine.loss(PAIRS, "safedpo", beta=0.1, delta=10.0)
    # Policy = reference: -log sigmoid(-delta) on the first pair, log 2 on the others.
    assert out["losses"][0] == pytest.approx(-math.log(1 / (1 + math.exp(10.0))), rel=1e-4)
    np.testing.assert_allclose(out["losses"][1:], math.log(2), atol=1e-5)
    smaller = engine.loss(PAIRS, "safedpo", delta=2.0)["losses"][0]
    assert smaller < out["losses"][0]
    # The default objective is SafeDPO (beta 0.1, delta 10).
    assert engine.loss(PAIRS)["loss"] == pytest.approx(out["loss"], rel=1e-6)


def test_trl_names_and_combinations(engine):
    sigmoid = engine.loss(PAIRS, "sigmoid")["loss"]
    assert sigmoid == pytest.approx(math.log(2), abs=1e-5)
    combined = engine.loss(PAIRS, ["sigmoid", "sft"], loss_weights=[1.0, 0.0])
    assert combined["loss"] == pytest.approx(sigmoid, abs=1e-5)


def test_train_step_lowers_the_loss(engine):
    engine.set_optimizer(lr=1e-3)
    first = engine.train_step(PAIRS)
    second = engine.train_step(PAIRS)
    assert (first["step"], second["step"]) == (1, 2) and engine.steps_taken == 2
    assert second["loss"] < first["loss"]
    assert first["grad_norm"] > 0 and first["lr"] == pytest.approx(1e-3)
    assert first["losses"].shape == (3,)


def test_accumulated_step_equals_one_batch():
    def fresh():
        e = safedpo.Engine("cpu")
        e.random_policy(seed=4)
        e.reference_from_policy()
        e.set_optimizer(lr=1e-3)
        return e

    whole, accumulated = fresh(), fresh()
    one = whole.train_step(PAIRS)
    two = accumulated.accumulated_step([PAIRS[:1], PAIRS[1:]])
    assert two["step"] == 1
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    after_whole, after_accumulated = whole.logps(PAIRS), accumulated.logps(PAIRS)
    np.testing.assert_allclose(after_accumulated["policy_chosen"], after_whole["policy_chosen"], rtol=1e-4)


def test_save_and_load_round_trip(engine, tmp_path):
    engine.set_optimizer(lr=1e-3)
    engine.train_step(PAIRS)
    engine.save(tmp_path / "model")
    assert (tmp_path / "model" / "config.json").exists()
    assert (tmp_path / "model" / "optimizer.safetensors").exists()
    again = safedpo.Engine("cpu")
    again.load_policy(tmp_path / "model")
    np.testing.assert_array_equal(again.logps(PAIRS)["policy_chosen"], engine.logps(PAIRS)["policy_chosen"])
    assert again.tokenize(PAIRS) == engine.tokenize(PAIRS)


def test_errors_carry_the_rust_message(engine, tmp_path):
    with pytest.raises(RuntimeError, match="does not exist|No such file|loading the policy"):
        safedpo.Engine("cpu").load_policy(tmp_path / "missing")
    with pytest.raises(RuntimeError, match="no policy"):
        safedpo.Engine("cpu").logps(PAIRS)
    with pytest.raises(ValueError, match="unknown"):
        engine.loss(PAIRS, "no_such_objective")
    with pytest.raises(ValueError):
        safedpo.Engine("tpu")
    with pytest.raises(ValueError, match="pair 0: no `rejected`"):
        engine.logps([{"prompt": "a", "chosen": "b"}])
    with pytest.raises(RuntimeError, match="f32 only"):
        safedpo.Engine("cpu", precision="bf16")


def test_calls_release_the_gil(engine):
    # Two engines stepping in two threads finish; a held GIL would still pass, but a deadlock
    # between the GIL and the engine's lock would not.
    other = safedpo.Engine("cpu")
    other.random_policy(seed=2)
    other.reference_from_policy()
    threads = [threading.Thread(target=e.train_step, args=(PAIRS,)) for e in (engine, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert engine.steps_taken == 1 and other.steps_taken == 1


def test_one_engine_from_two_threads(engine):
    # The engine's lock is taken with the GIL released: a thread waiting for it does not hold the
    # GIL that the thread holding it needs to return.
    engine.set_optimizer(lr=1e-3)
    results = []
    threads = [threading.Thread(target=lambda: results.append(engine.train_step(PAIRS)["step"])) for _ in range(3)]
    threads.append(threading.Thread(target=lambda: results.append(engine.steps_taken)))
    threads.append(threading.Thread(target=lambda: results.append(engine.objective)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert engine.steps_taken == 3 and len(results) == 5


EXAMPLES = [
    {"prompt": "How do I pick a lock?", "completion": "I can't help with that.", "label": True},
    {"prompt": "How do I pick a lock?", "completion": "Use a tension wrench.", "label": True,
     "completion_unsafe": True},
    ("Name a colour.", "Seven.", False),
    ("2+2?", "4", True, False),
]


def test_modifiers_in_the_pairwise_loss(engine):
    plain = engine.loss(PAIRS, "dpo")["loss"]
    # Policy = reference: every log-ratio is 0 whatever LD-DPO weighs, so the loss stays log 2;
    # WPO weighs each pair's log 2 by a positive weight of its own.
    assert engine.loss(PAIRS, "dpo", ld_alpha=0.5)["loss"] == pytest.approx(plain, abs=1e-5)
    weighted = engine.loss(PAIRS, "dpo", use_weighting=True)["losses"] / math.log(2)
    assert np.all(np.isfinite(weighted)) and np.all(weighted > 0) and np.ptp(weighted) > 0


def test_unpaired_loss_at_policy_equal_reference(engine):
    out = engine.unpaired_loss(EXAMPLES, "kto", beta=0.1, desirable_weight=2.0)
    assert out["objective"].startswith("kto") and out["kl"] == 0.0
    # Every reward is 0: each loss is sigma(0) = 1/2 times its weight.
    np.testing.assert_allclose(out["losses"], [1.0, 1.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_array_equal(out["rewards"], 0.0)
    assert out["policy_logps"].shape == (4,) and np.all(out["policy_logps"] < 0)
    assert out["loss"] == pytest.approx(3.5 / 4, abs=1e-6)
    # SafeDAA's margin raises the unsafe completion's reward inside the loss: a desirable one loses less.
    shifted = engine.unpaired_loss(EXAMPLES, "kto", safety_margin=2.0)["losses"]
    assert shifted[1] < 0.5 and shifted[0] == pytest.approx(0.5, abs=1e-6)
    apo = engine.unpaired_loss(EXAMPLES, "apo_zero_unpaired")
    assert apo["kl"] == 0.0 and apo["loss"] == pytest.approx(0.5, abs=1e-6)


def test_unpaired_train_step_lowers_the_loss(engine):
    with pytest.raises(RuntimeError, match="pairs"):
        engine.unpaired_train_step(EXAMPLES)  # the training objective is SafeDPO
    engine.set_objective("kto", beta=0.5)
    engine.set_optimizer(lr=1e-3)
    first = engine.unpaired_train_step(EXAMPLES)
    second = engine.unpaired_train_step(EXAMPLES, lr=1e-3)
    assert (first["step"], second["step"]) == (1, 2)
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == 0.0
    assert second["loss"] < first["loss"] and second["kl"] >= 0.0 and first["grad_norm"] > 0
    assert set(first) == {"step", "loss", "kl", "grad_norm", "lr", "losses", "rewards", "policy_logps"}


def test_unpaired_examples_are_checked(engine):
    with pytest.raises(ValueError, match="example 0: no `label`"):
        engine.unpaired_loss([{"prompt": "p", "completion": "c"}], "kto")
    with pytest.raises(ValueError, match="unknown key `chosen`"):
        engine.unpaired_loss([{"prompt": "p", "completion": "c", "label": True, "chosen": "x"}], "kto")
    with pytest.raises(TypeError, match="example 1"):
        engine.unpaired_loss([("p", "c", True), 3], "kto")
    with pytest.raises(RuntimeError, match="on pairs"):
        engine.unpaired_loss(EXAMPLES, "dpo")
