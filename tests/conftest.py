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


LONG_MODULE = 400  # lines


def pytest_terminal_summary(terminalreporter) -> None:
    """A soft signal, not a rule: modules past LONG_MODULE lines are listed after the test summary
    for a reader to judge whether each still owns one concept (a line count must not decide where
    code goes)."""
    long = [(str(f.relative_to(ROOT)), n) for f in sorted((ROOT / "bigbatch").rglob("*.py"))
            if (n := len(f.read_text().splitlines())) > LONG_MODULE]
    if long:
        terminalreporter.section(f"modules over {LONG_MODULE} lines (does each own one concept?)", sep="-")
        for path, n in long:
            terminalreporter.write_line(f"{path}: {n} lines")
