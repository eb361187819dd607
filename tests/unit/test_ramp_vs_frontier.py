"""benchmarks/ramp_vs_frontier.py: the constant-batch frontier S(E) it compares runs against."""

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ramp_vs_frontier.py"
spec = importlib.util.spec_from_file_location("ramp_vs_frontier", SCRIPT)
rvf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rvf)


def test_fit_frontier_is_the_constant_batch_at_the_same_examples():
    # McCandlish eq. 2.11: batch B takes S_min + E_min / B steps and E_min + B S_min examples
    s_min, e_min = 80.0, 4.0e4
    for b in (16, 128, 500, 4096):
        steps, examples = s_min + e_min / b, e_min + b * s_min
        assert np.isclose(rvf.fit_frontier(s_min, e_min, np.array([examples]))[0], steps)
    assert np.isinf(rvf.fit_frontier(s_min, e_min, np.array([e_min]))[0])  # E_min needs infinitely many steps


def test_interp_frontier_passes_through_pareto_points_flat_beyond_the_last():
    pts = [(1e4, 400.0), (2e4, 150.0), (4e4, 60.0), (3e4, 200.0)]  # (3e4, 200) is beaten by (2e4, 150)
    assert rvf.pareto(pts) == [(1e4, 400.0), (2e4, 150.0), (4e4, 60.0)]
    got = rvf.interp_frontier(pts, np.array([1e4, 2e4, 4e4, np.sqrt(2e4 * 4e4), 5e3, 5e4]))
    assert np.allclose(got[:3], [400.0, 150.0, 60.0])
    assert np.isclose(got[3], np.sqrt(150.0 * 60.0))  # linear in log-log: the geometric mean halfway
    assert np.isnan(got[4])  # fewer examples than any constant batch spent: unknown
    assert np.isclose(got[5], 60.0)  # more than any: the fewest steps measured (more examples did not buy fewer)


def test_against_pairs_runs_by_seed():
    runs = [{"seed": s, "reached": True, "steps": st, "examples": ex} for s, st, ex in ((0, 50, 9e3), (1, 60, 1e4))]
    base = [{"seed": s, "reached": True, "steps": st, "examples": ex} for s, st, ex in ((1, 120, 1e4), (0, 100, 1e4))]
    out = rvf.against(runs, base)
    assert out["pairs"] == 2 and out["seeds"] == [0, 1]
    assert np.allclose(out["steps_ratio"], [0.5, 0.5]) and np.allclose(out["examples_ratio"], [0.9, 1.0])
