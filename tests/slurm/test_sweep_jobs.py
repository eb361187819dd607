"""Sweeps on the real local SLURM cluster: a 4-trial job array collected into a sweep folder
that `bigbatch report` maps, and `bigbatch slurm submit-sweep` of 3 trials starting Ray on 3 nodes
(the Ray workers' srun step has 2 tasks, whose SLURM_NTASKS/SLURM_PROCID every trial inherits:
they train as one process each instead of waiting for a world that never forms)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from _slurm_helpers import cli, wait_gone

ROOT = Path(__file__).resolve().parents[2]
SWEEP = """name = "{name}"
base = "{base}"
overrides = ["data.name='digits'", "model.hidden=32", "track.progress='off'", "train.amp='off'"]
batch_sizes = {batches}
lr_multipliers = {lrs}
seeds = [0]

[target]
test_acc = 0.5

[trial]
max_steps = 60
eval_every_examples = 640
"""


@pytest.fixture(scope="module")
def sweeps(slurm_env, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("slurm-sweeps")
    base = ROOT / "configs" / "mnist1d-mlp.toml"
    (cwd / "array.toml").write_text(SWEEP.format(name="arr", base=base, batches="[32, 64]", lrs="[1.0, 2.0]"))
    (cwd / "ray.toml").write_text(SWEEP.format(name="ray", base=base, batches="[32, 64, 128]", lrs="[1.0]"))
    py = ["--python", sys.executable]
    array = cli("slurm", "array", "array.toml", "--out", str(cwd / "arr"), "--max-parallel", "2", *py,
                env=slurm_env, cwd=cwd)
    assert array.returncode == 0, array.stderr
    ray = cli("slurm", "submit-sweep", "ray.toml", "--nodes", "3", "--cpus-per-task", "1", "--out", str(cwd / "ray"), *py,
              env=slurm_env, cwd=cwd)
    assert ray.returncode == 0, ray.stderr
    array_id, ray_id = array.stdout.strip(), ray.stdout.strip()
    collector_id = array.stderr.split("collector job ")[1].split()[0]
    wait_gone([array_id, collector_id, ray_id], slurm_env, timeout_s=280)
    return cwd, array_id, ray_id


def test_d_array_sweep_of_4_trials_completes_and_report_maps_it(sweeps, slurm_env):
    cwd, array_id, _ = sweeps
    out = cwd / "arr"
    logs = sorted((cwd / "slurm-logs").glob(f"arr-{array_id}_*.out"))
    assert len(logs) == 4, logs  # one log per array task, named by array job and task id
    trials = [json.loads(l) for l in (out / "trials.jsonl").read_text().splitlines()]
    assert sorted((t["batch"], t["lr_multiplier"]) for t in trials) == [(32, 1.0), (32, 2.0), (64, 1.0), (64, 2.0)]
    for t in trials:
        assert t["status"] in ("ok", "not_reached"), t
        summary = json.loads((Path(t["run_dir"]) / "summary.json").read_text())
        assert t["test_acc"] == summary["test_acc"]
        if t["status"] == "ok":  # interpolated between the evaluations around the crossing, as in a Ray sweep
            assert t["steps_to_target_eval"] == summary["steps_to_target"] >= t["steps_to_target"] > 0
    assert any(t["status"] == "ok" for t in trials)
    # the collector measured the noise scales at the target of each batch's best trial
    assert any(t.get("b_simple_source") == "train_mode" and t["b_simple_at_target"] > 0 for t in trials)
    critical = json.loads((out / "critical.json").read_text())
    assert sum(critical["trials"].values()) == 4
    (out / "report.md").unlink()
    rep = cli("report", str(out), env=slurm_env, cwd=cwd)
    assert rep.returncode == 0, rep.stderr
    md = (out / "report.md").read_text()
    assert "Sweep `arr`" in md and "| 32 |" in md and "| 64 |" in md
    assert (out / "steps_vs_batch.png").stat().st_size > 0


def test_submit_sweep_over_three_nodes_completes(sweeps):
    cwd, _, ray_id = sweeps
    log = (cwd / "slurm-logs" / f"ray-{ray_id}.out").read_text()
    assert "bigbatch: Ray cluster up: 3 node(s)" in log, log
    assert "bigbatch: sweep exited with code 0" in log, log
    trials = [json.loads(l) for l in (cwd / "ray" / "trials.jsonl").read_text().splitlines()]
    assert sorted(t["batch"] for t in trials) == [32, 64, 128]
    assert all(json.loads((Path(t["run_dir"]) / "summary.json").read_text())["world_size"] == 1 for t in trials)
    assert all(t["status"] in ("ok", "not_reached") for t in trials), trials
