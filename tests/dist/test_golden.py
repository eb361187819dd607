"""Golden losses: the committed per-step loss and lr of six short runs are reproduced exactly.

The files in tests/assets/golden/ were written by `python tests/golden.py --write` before the
structure refactor; any change that is not about computation must leave every number identical
(on CPU, one thread per process). Integers and strings are compared with ==; floats to a relative
1e-6 (about 8 float32 ulps), because CPU kernels round differently by instruction set: on an AMD
EPYC the files written on another CPU differ by at most 1.3e-7 relative (one float32 ulp) in every
case, while any change to the computation itself moves the losses by orders of magnitude more.
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
        assert g.keys() == w.keys(), (case, w, g)
        for k, v in w.items():
            same = g[k] == pytest.approx(v, rel=1e-6, abs=0) if isinstance(v, float) else g[k] == v
            assert same, (case, k, w, g)


def test_the_golden_cases_cover_processes_accumulation_cnn_lars_phases_and_the_adaptive_batch():
    batches = {c: {r["global_batch"] for r in golden.read(golden.GOLDEN / f"{c}.jsonl")} for c in golden.CASES}
    assert batches["lars-phases"] == {128, 256} and len(batches["mlp-gns-adaptive"]) > 1
    assert golden.CASES["mlp-2ranks"][2] == 2
    one, two, acc = (golden.read(golden.GOLDEN / f"{c}.jsonl") for c in ("mlp-1proc", "mlp-2ranks", "mlp-accum4"))
    # the global batch means the same thing on 1 and 2 processes and with accumulation
    assert all(abs(a["loss"] - b["loss"]) < 1e-4 and abs(a["loss"] - c["loss"]) < 1e-4
               for a, b, c in zip(one, two, acc) if "loss" in a)
