"""benchmarks/recipe.py --sweep: the code path of the across-batch sweep, on a tiny budget.

Two batch sizes x two methods x one seed, a quarter of an epoch of a 2,000-example MNIST-1D: the
real CLI, real worker processes and real training runs through `bigbatch.trainer.loop.run`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "recipe.py"
TINY = ["--sweep", "--batches", "64,128", "--methods", "unscaled,linear+gradual", "--seeds", "1",
        "--epochs", "0.25", "--num-samples", "2000", "--jobs", "2"]


def _recipe(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_sweep_writes_one_row_per_run_and_a_cell_per_method_and_batch(tmp_path):
    critical = tmp_path / "critical.json"
    critical.write_text(json.dumps({"b_crit": 96.0, "s_min": 10.0}))  # a study's critical.json, as far as the plot reads it
    out = ["--json", "sweep.json", "--plot", "sweep.png", "--rows", "rows.jsonl", "--critical", str(critical),
           "--markdown", "table.md"]
    p = _recipe(tmp_path, *TINY, *out)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "sweep.json").read_text())
    assert report == json.loads(p.stdout)
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert report["critical"] == {"b_crit": 96.0, "source": str(critical)}

    # at the base batch (128) both rules give lr 0.05 and the warmup from it is flat: one shared run
    rows = report["rows"]
    assert len(rows) == 3 and len((tmp_path / "rows.jsonl").read_text().splitlines()) == 3
    assert sorted((r["key"].split("|")[1], r["seed"]) for r in rows) == [
        ("batch.global_batch=128", 0), ("batch.global_batch=64", 0), ("batch.global_batch=64", 0)]
    table = report["table"]
    assert set(table) == {"unscaled", "linear+gradual"}
    for method, cells in table.items():
        assert list(cells) == ["64", "128"]
        for batch, cell in cells.items():
            b = int(batch)
            assert cell["seeds"] == [0] and len(cell["test_acc"]) == 1 and cell["std"] == 0.0
            assert 0.0 < cell["mean"] <= 1.0 and cell["mean"] == cell["test_acc"][0]
            assert cell["steps"] == math.ceil(0.25 * 1600 / b)  # the same epoch budget at every batch
            assert cell["final_global_batch"] == b
    assert table["unscaled"]["128"]["run"] == table["linear+gradual"]["128"]["run"]
    assert table["unscaled"]["128"]["shared_with"] == ["linear+gradual"]
    assert table["unscaled"]["64"]["peak_lr"] == pytest.approx(0.05)  # the small-batch lr kept
    assert table["linear+gradual"]["64"]["peak_lr"] == pytest.approx(0.025)  # 0.05 * 64 / 128
    assert table["unscaled"]["64"]["run"] != table["linear+gradual"]["64"]["run"]
    assert report["baseline"]["mean"] == table["unscaled"]["128"]["mean"]
    for method, reach in report["matches_baseline_within_0.5_points"].items():
        assert reach["batch"] in (None, 64, 128) and (reach["batch"] is None or reach["x_b_crit"] == reach["batch"] / 96.0)
    md = (tmp_path / "table.md").read_text().splitlines()
    assert md[0] == "| method | 64 (0.67×) | 128 (1.3×) |" and len(md) == 4
    assert md[2].startswith("| unscaled | ") and "(n=1)" in md[2]
    t = report["time"]
    assert t["runs"] == 3 and t["wall_s"] > 0 and t["cpu_s_workers"] > 0 and t["cpu_s_runs_sum"] > 0

    # --resume keeps the finished rows and runs nothing again
    p = _recipe(tmp_path, *TINY, *out, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads(p.stdout)
    assert "0 to run" in p.stderr and again["time"]["runs_this_invocation"] == 0
    assert again["rows"] == rows and again["table"] == table


@pytest.mark.parametrize("args, message", [
    (["--methods", "linear,adam"], "--methods: unknown adam"),
    (["--batches", "128,2x"], "--batches: expected comma-separated integers"),
    (["--batches", "130,260"], "--batches: the batch schedule needs batches divisible by 4"),
    (["--epochs", "0"], "--epochs: must be > 0"),
    (["--critical", "missing.json"], "--critical:"),
])
def test_bad_sweep_flags_are_one_line_and_exit_2(tmp_path, args, message):
    p = _recipe(tmp_path, "--sweep", *args)
    err = p.stderr.strip()
    assert p.returncode == 2 and message in err and "\n" not in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # no rows file, no plot
