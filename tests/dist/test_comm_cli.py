"""The communication commands end to end: `bigbatch bench allreduce` on 4 spawned gloo ranks,
`bigbatch scaling` on 1 and 2 ranks fitted from that bench's JSON, and bad input (exit 2, one
line naming the option, before any rank starts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from _helpers import ROOT, bigbatch, free_port
from bigbatch import cli

MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")
KEYS = {"algo", "world_size", "dtype", "bytes", "time_us", "algbw_gbps", "busbw_gbps", "correct"}


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    p = bigbatch("bench", "allreduce", "--algo", "all", "--nproc", "4", "--local-size", "2", "--sizes", "8,1K,100K",
                 "--iters", "2", "--warmup", "1", "--json", str(d / "rows.jsonl"), "--plot", str(d / "busbw.png"))
    assert p.returncode == 0, p.stderr[-3000:]
    return d, p.stdout


def test_bench_all_algorithms_on_4_ranks_prints_correct_rows(bench_json):
    d, stdout = bench_json
    rows = [json.loads(line) for line in (d / "rows.jsonl").read_text().splitlines()]
    assert [(r["algo"], r["bytes"]) for r in rows] == [(a, s) for a in ("builtin", "ring", "torus2d", "hierarchical")
                                                       for s in (8, 1024, 102400)]
    assert all(set(r) == KEYS and r["correct"] and r["world_size"] == 4 and r["time_us"] > 0 for r in rows)
    assert all(r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * 1.5, abs=2e-4) for r in rows)
    assert "busbw(GB/s)" in stdout and stdout.count('"algo"') == 12
    assert (d / "busbw.png").stat().st_size > 0


def test_bench_runs_under_an_existing_torchrun_world(tmp_path):
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                        "-m", "bigbatch", "bench", "allreduce", "--algo", "ring,torus2d", "--sizes", "1K", "--iters", "1",
                        "--warmup", "0", "--json", str(tmp_path / "rows.jsonl")], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["algo"], r["world_size"], r["correct"]) for r in rows] == [("ring", 2, True), ("torus2d", 2, True)]
    assert p.stdout.count('"algo"') == 2  # printed by rank 0 only


def test_scaling_measures_1_and_2_ranks_and_extrapolates(bench_json, tmp_path):
    d, _ = bench_json
    p = bigbatch("scaling", MLP, "--nproc", "1,2", "--steps", "2", "--warmup", "1", "--bench", str(d / "rows.jsonl"),
                 "--set", "data.num_samples=4000", "--set", "dist.allreduce='ring'", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads((tmp_path / "scaling.json").read_text())
    eff = result["efficiency"]
    assert [r["world_size"] for r in eff] == [1, 2] and [r["global_batch"] for r in eff] == [128, 256]
    assert eff[0]["efficiency"] == pytest.approx(1.0)
    assert all(r["step_s"] > 0 and r["compute_s"] > 0 and r["allreduce"] == "ring" for r in eff)
    assert [r["world_size"] for r in result["model"]][-1] == 4096
    assert result["fit"]["algo"] == "ring" and result["fit"]["points"] == 3
    assert "efficiency" in p.stdout and "torus2d(ms)" in p.stdout
    assert (tmp_path / "scaling-model.png").stat().st_size > 0


@pytest.mark.parametrize("args,field", [
    (["bench", "allreduce", "--algo", "tree"], "--algo"),
    (["bench", "allreduce", "--sizes", "12Q"], "--sizes"),
    (["bench", "allreduce", "--nproc", "4", "--algo", "torus2d", "--torus-rows", "3"], "--torus-rows"),
    (["bench", "allreduce", "--nproc", "4", "--algo", "hierarchical", "--local-size", "3"], "--local-size"),
    (["scaling", MLP, "--nproc", "1,two"], "--nproc"),
    (["scaling", MLP, "--nproc", "2,4", "--set", "dist.allreduce='hierarchical'", "--set", "dist.local_size=3"], "dist.local_size"),
    (["scaling", MLP, "--set", "dist.allreduce='tree'"], "dist.allreduce"),
])
def test_bad_input_is_one_line_and_exit_2(args, field, tmp_path, monkeypatch, capsys):
    # the console script's own entry point, in this process (a subprocess per case would only
    # add torch's import time)
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], lines
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing started
