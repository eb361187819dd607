"""Shared test fixtures: small configs and a cached data folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/_helpers importable as plain modules

# Generated datasets (MNIST-1D) are cached once per machine, shared by all tests and subprocesses.
os.environ.setdefault("BIGBATCH_CACHE", str(Path.home() / ".cache" / "bigbatch"))
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def mlp_overrides() -> list[str]:
    """The MLP config shrunk for tests: 4k MNIST-1D examples, per-step logging, fp32."""
    return [
        "data.num_samples=4000", "data.train_eval_samples=1000", "train.log_every=1",
        "train.eval_every=0", "train.amp='off'", "track.progress='off'",
    ]
