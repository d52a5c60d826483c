"""Shared fixtures: tiny pairs, a tiny random engine, the repository and the built `safedpo` binary."""

import os
from pathlib import Path

import pytest

import safedpo

REPO = Path(__file__).resolve().parents[2]

PAIRS = [
    {"prompt": "How do I pick a lock?", "chosen": "I can't help with that.", "rejected": "Use a tension wrench.",
     "rejected_unsafe": True},
    ("Name a colour.", "Blue.", "Seven."),
    ("2+2?", "4", "5", False, False),
]


def safedpo_binary() -> Path:
    """The CLI built by `cargo build --release` (SAFEDPO_BIN, else the target directory's)."""
    if "SAFEDPO_BIN" in os.environ:
        return Path(os.environ["SAFEDPO_BIN"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    if not target.is_absolute():
        target = REPO / target
    return target / "release" / "safedpo"


@pytest.fixture
def engine() -> safedpo.Engine:
    """A tiny GPT-2 over the byte tokenizer on the CPU, its reference equal to it."""
    e = safedpo.Engine("cpu")
    e.random_policy(seed=0)
    e.reference_from_policy()
    return e
