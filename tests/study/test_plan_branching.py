"""`bigbatch plan` by branching (the default) on a small MNIST-1D MLP: the plan's numbers follow
from its branches (S(B0) is the base run's own steps, the table is the integrated S(B), the
budget counts every branch), and the ramp it writes as batch.phases loads, runs on 1 and 2 gloo
ranks with the same per-step losses, resumes exactly after a preemption, and a world size that
does not divide a ramp batch exits 2 naming it."""

import json
from pathlib import Path

import pytest

from _helpers import assert_same_run, bigbatch, preempt_at
from bigbatch import config
from bigbatch.cli import main
from bigbatch.study import branching as br
from bigbatch.trainer.recipe import Schedule

ROOT = Path(__file__).resolve().parents[2]
MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")
SMALL = ["data.num_samples=4000", "data.train_eval_samples=1000", "train.log_every=1", "train.eval_every=0",
         "train.amp='off'", "track.progress='off'"]  # conftest's mlp_overrides, for a module-scoped fixture


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """One `bigbatch plan` (branching, 3 points) with --write-ramp for 2 ranks."""
    import os

    tmp = tmp_path_factory.mktemp("plan")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        sets = [a for o in SMALL + ["target.test_acc=0.4"] for a in ("--set", o)]
        assert main(["plan", MLP, *sets, "--alpha-us", "20", "--beta-gbps", "2", "--gpus", "1,2,8",
                     "--time-batches", "16,64", "--eval-every", "8", "--points", "3", "--eval-examples", "800",
                     "--out", "run", "--json", "plan.json", "--write-ramp", "ramp.toml", "--ramp-world", "2"]) == 0
    finally:
        os.chdir(cwd)
    return tmp, json.loads((tmp / "plan.json").read_text())


@pytest.mark.timeout(900)
def test_the_plan_follows_from_its_branches(planned):
    tmp, plan = planned
    m = plan["branching"]
    base = tmp / plan["run_dir"]  # as given: --out run
    assert base.parent == tmp / "run"  # run/lr-x<factor>: the lr search's fastest run
    summary = json.loads((base / "summary.json").read_text())
    assert plan["method"] == "branching" and plan["s0"] <= summary["steps_to_target"] and plan["b0"] == 128
    assert len(m["points"]) == 3 and all(0 < p["step"] < plan["s0"] for p in m["points"])
    assert sum(m["segment_examples"]) == pytest.approx(plan["s0"] * 128)
    seg = br.Segments.from_base(m["segment_examples"], [p["b_crit"] for p in m["points"]], 128)
    assert plan["b_crit"] == pytest.approx(seg.B_crit) and seg.cost(128)[0] == pytest.approx(plan["s0"])
    assert m["interval"]["b_crit"][0] <= plan["b_crit"] <= m["interval"]["b_crit"][1]
    for r in plan["rows"]:
        assert r["steps"] == pytest.approx(seg.cost(r["global_batch"])[0])
    # every branch at the same window of examples, batches doubling from B0, each counted
    window = m["window_steps"] * 128
    for p in m["points"]:
        assert [b["batch"] for b in p["branches"]] == [128 * 2 ** i for i in range(len(p["branches"]))]
        assert all(b["steps"] * b["batch"] == window and b["lr_factor"] in [2.0 ** i for i in range(-4, 5)]
                   for b in p["branches"])
        assert p["interval"][0] <= p["b_crit"] <= p["interval"][1]
    b = m["budget"]
    assert b["branches"] >= 3 * sum(len(p["branches"]) for p in m["points"])  # x0.5, x1, x2 and beyond an edge
    assert b["branch_examples"] == b["branches"] * window and b["examples"] == b["base_examples"] + b["branch_examples"]
    assert b["base_examples"] == sum(r["examples"] for r in plan["base_lr_search"])  # every lr the search tried
    branch_dirs = list((base / "branches").iterdir())
    assert len(branch_dirs) == b["branches"]
    # the ramps: batches multiples of 2 ranks x 8, predicted cost = the integrated model's
    for kind in ("sqrt", "proportional"):
        r = plan["ramps"][kind]
        assert all(x % 16 == 0 for x in r["batches"])
        assert (r["steps"], r["examples"]) == tuple(pytest.approx(v) for v in seg.cost(r["batches"]))


def test_the_base_run_is_the_fastest_of_an_lr_search(planned):
    """The short run at x0.5, x1, x2 of the config's lr (and 2x beyond an edge), each to the target:
    the fastest (interpolated crossing) is the base run, and its lr is the one the branches, the
    table and the written ramp use."""
    tmp, plan = planned
    runs = plan["base_lr_search"]
    factors = [r["factor"] for r in runs]
    assert {0.5, 1.0, 2.0} <= set(factors) and factors == sorted(factors)
    assert all(b == 2 * a for a, b in zip(factors, factors[1:]))  # a grid of factors of 2, extended at an edge only
    reached = {r["factor"]: r["steps_to_target"] for r in runs if r["steps_to_target"] is not None}
    best = min(reached, key=reached.get)
    assert plan["s0"] == reached[best] and plan["run_dir"] == str(Path("run") / f"lr-x{best:g}")
    assert best not in (factors[0], factors[-1]) or best in (1 / 16, 16)  # an edge would have been extended
    for r in runs:  # each run is what it says: its own folder, its lr, its crossing
        cfg = config.load(tmp / r["run_dir"] / "config.toml")
        assert cfg.optim.base_lr == pytest.approx(r["lr"]) == pytest.approx(0.1 * r["factor"])
        assert r["steps_to_target"] is None or r["steps_to_target"] <= r["steps_to_target_eval"] == r["steps"]
    assert plan["base_lr"] == pytest.approx(0.1 * best)
    assert config.load(tmp / "ramp.toml").optim.base_lr == pytest.approx(plan["base_lr"])
    lr0 = Schedule(config.load(tmp / plan["run_dir"] / "config.toml"), 3200)
    assert all(p["lr0"] == pytest.approx(lr0.lr_at(p["step"])) for p in plan["branching"]["points"])


@pytest.mark.timeout(900)
def test_a_second_plan_from_the_base_run_branches_into_a_new_folder(planned, monkeypatch):
    """`plan --from` the base run (here with another window) keeps the first plan's branches and
    trains its own in branches-2 (it once trained into the old folders and failed on their checkpoints)."""
    tmp, plan = planned
    monkeypatch.chdir(tmp)
    base = tmp / plan["run_dir"]
    first = sorted(p.name for p in (base / "branches").iterdir())
    assert main(["plan", "--from", plan["run_dir"], "--points", "2", "--window-steps", "32", "--eval-examples", "400",
                 "--alpha-us", "20", "--beta-gbps", "2", "--gpus", "1,2", "--time-batches", "16,64",
                 "--json", "again.json"]) == 0
    again = json.loads((tmp / "again.json").read_text())
    assert sorted(p.name for p in (base / "branches").iterdir()) == first
    assert len(list((base / "branches-2").iterdir())) == again["branching"]["budget"]["branches"]
    assert again["s0"] == plan["s0"] and again["branching"]["window_steps"] == 32


def _ramp_for_test(tmp: Path) -> config.Config:
    """The written ramp, trained one epoch into its second phase (so a batch change is in every check)."""
    cfg = config.load(tmp / "ramp.toml")
    assert len(cfg.batch.phases) >= 2, cfg.batch.phases
    epochs = cfg.batch.phases[1][0] + 1.0
    return config.load(tmp / "ramp.toml", [f"train.epochs={epochs}", "train.eval_every=0", "train.log_every=1",
                                           "checkpoint.every=0", "track.progress='off'"])


def _losses(run_dir: Path) -> list[tuple[int, int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["global_batch"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.timeout(900)
def test_the_written_ramp_runs_on_one_and_two_ranks_and_resumes_exactly(planned, tmp_path):
    from bigbatch.trainer.loop import run

    tmp, plan = planned
    cfg = _ramp_for_test(tmp)
    assert cfg.batch.phases[0][1] == plan["ramps"]["sqrt"]["batches"][0]
    whole = tmp_path / "whole"
    summary = run(cfg, whole)
    assert summary["status"] == "completed"
    one = _losses(whole)
    batches = [b for _, b, _ in one]
    schedule = Schedule(cfg, 3200)  # 4,000 MNIST-1D examples, 80 % for training
    assert len(set(batches)) >= 2 and batches == [schedule.batch_at(s - 1) for s, _, _ in one]  # the phases, in order
    # two gloo ranks (real torchrun): the same batch and, up to summation order, the same loss at every step
    path = tmp_path / "ramp.toml"
    config.save(cfg, path)
    p = bigbatch("train", str(path), "--nproc", "2", "--out", str(tmp_path / "two"), cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    two = _losses(tmp_path / "two")
    assert [(s, b) for s, b, _ in two] == [(s, b) for s, b, _ in one]
    for (s, _, a), (_, _, b) in zip(one, two):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-6), s
    # preempted after the batch change, resumed: the same run
    change = next(s for s, b, _ in one if b != batches[0])
    assert change + 1 < len(one)  # preempted before the last step
    cut = tmp_path / "cut"
    assert run(cfg, cut, reporter=preempt_at(change + 1))["status"] == "preempted"
    assert run(cfg, cut, resume=True)["status"] == "completed"
    assert_same_run(cut, whole)


def test_a_world_size_that_does_not_divide_a_ramp_batch_exits_2(planned, tmp_path):
    tmp, _ = planned
    cfg = config.load(tmp / "ramp.toml")
    n = next(n for n in (3, 5, 7, 11, 13) if any(b % n for _, b in cfg.batch.phases))
    p = bigbatch("train", str(tmp / "ramp.toml"), "--nproc", str(n), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert f"not divisible by world size {n}" in p.stderr and "batch." in p.stderr
    assert not (tmp_path / "runs").exists()
