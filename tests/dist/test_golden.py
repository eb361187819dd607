"""Golden losses: the committed per-step loss and lr of six short runs are reproduced exactly.

The files in tests/assets/golden/ were written by `python tests/golden.py --write` before the
structure refactor; any change that is not about computation must leave every number identical
(floats compared with ==, on CPU, one thread per process).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

import golden


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    # a fresh interpreter: one torch thread, nothing left over from other tests' process groups
    p = subprocess.run([sys.executable, str(golden.ROOT / "tests" / "golden.py"), str(out)],
                       capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.parametrize("case", sorted(golden.CASES))
def test_training_reproduces_the_golden_losses_exactly(case, fresh):
    want = golden.read(golden.GOLDEN / f"{case}.jsonl")
    got = golden.read(fresh / f"{case}.jsonl")
    assert len(got) == len(want)
    for w, g in zip(want, got):
        assert g == w, (case, w, g)


def test_the_golden_cases_cover_processes_accumulation_cnn_lars_phases_and_the_adaptive_batch():
    batches = {c: {r["global_batch"] for r in golden.read(golden.GOLDEN / f"{c}.jsonl")} for c in golden.CASES}
    assert batches["lars-phases"] == {128, 256} and len(batches["mlp-gns-adaptive"]) > 1
    assert golden.CASES["mlp-2ranks"][2] == 2
    one, two, acc = (golden.read(golden.GOLDEN / f"{c}.jsonl") for c in ("mlp-1proc", "mlp-2ranks", "mlp-accum4"))
    # the global batch means the same thing on 1 and 2 processes and with accumulation
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["loss"] - c["loss"]) < 1e-4
               for a, b, c in zip(one, two, acc) if "loss" in a)
