"""`bigbatch plan`: bad input exits 2 before any work; one real short run gives a plan whose numbers
follow from what it measured; --from the same run folder gives the same statistics; and, on the
recorded MNIST-1D CNN sweep, one run at batch 128 predicts the swept steps to target within 50 %
for every batch <= 1024 (McCandlish et al. 2018's S(B) through the run's noise scale).
"""

import json
from pathlib import Path

import pytest

from _helpers import one_line_error as _exit_2
from bigbatch.cli import main
from bigbatch.study.critical import crossing
from bigbatch.study.plan_model import Tradeoff, noise_near_target

ROOT = Path(__file__).resolve().parents[2]
MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")
CNN = str(ROOT / "configs" / "mnist1d-cnn.toml")
RECORDED = ROOT / "tests" / "assets" / "plan" / "mnist1d-cnn-study.json"
KEYS = {"b_crit", "s_min", "e_min", "noise_scale_at_target", "rows", "best", "best_efficient"}
ROW_KEYS = {"global_batch", "world_size", "steps", "examples", "step_s", "time_s", "efficiency"}


@pytest.mark.parametrize("argv, expect", [
    (["plan", CNN, "--algo", "ring,butterfly"], "--algo: unknown all-reduce algorithm 'butterfly'"),
    (["plan", MLP, "--set", "target.test_acc=0.6", "--gpus", "0,8"], "--gpus"),
    (["plan", CNN, "--alpha-us", "5"], "--beta-gbps: --alpha-us and --beta-gbps go together"),
    (["plan", CNN, "--bench", "no-such-bench.jsonl"], "--bench: file 'no-such-bench.jsonl' not found"),
    (["plan", CNN, "--scaling", "no-such.json"], "--scaling"),
    (["plan", CNN, "--method", "noise", "--set", "batch.global_batch=127"],
     "batch.global_batch: the noise scale needs two micro-batches"),
    (["plan", CNN, "--window-steps", "48"], "--window-steps: must be a power of 2"),
    (["plan", CNN, "--method", "noise", "--write-ramp", "r.toml"], "--write-ramp: the ramp comes from the branching"),
    (["plan", CNN, "--write-ramp", "{nulls}"], "--write-ramp: "),
    (["plan", "--from", "{empty}"], "has no metrics.jsonl"),
    (["plan", "--from", "{empty}", CNN], "--from: takes the run's own config.toml"),
    (["plan"], "config: a training config is required"),
    (["plan", CNN, "--base-lr-search", "0.5,x2"], "--base-lr-search: expected a comma list of lr factors"),
    (["plan", CNN, "--base-lr-search", "0.01,1"], "--base-lr-search: factors must lie in [1/16, 16]"),
    (["plan", "--from", "{empty}", "--base-lr-search", "1,2"], "--base-lr-search: searches the lr of a new short run"),
    (["plan", CNN, "--noise-from", "no-such-measure.json"], "--noise-from: file 'no-such-measure.json' not found"),
    (["plan", CNN, "--noise-from", "{nulls}"], "has no positive 'b_noise'"),
])
def test_bad_input_exits_2_naming_it_before_any_work(tmp_path, monkeypatch, capsys, argv, expect):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "nulls.json").write_text(json.dumps({"b_noise": None, "b_simple": 300.0}))
    _exit_2(capsys, [a.replace("{empty}", str(tmp_path / "empty")).replace("{nulls}", str(tmp_path / "nulls.json"))
                     for a in argv], expect)
    assert not (tmp_path / "runs").exists()


def test_a_config_without_target_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "no-target.toml"
    cfg.write_text("\n".join(line for line in Path(MLP).read_text().splitlines()
                             if not line.startswith(("[target]", "test_acc"))))
    _exit_2(capsys, ["plan", str(cfg)], "target: ")
    assert not (tmp_path / "runs").exists()


def _bare_run_folder(tmp_path) -> Path:
    """A run folder that reached its target, with neither noise-scale rows nor step checkpoints."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(Path(MLP).read_text())
    (run / "summary.json").write_text(json.dumps({"steps_to_target": 40}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0}) + "\n")
    return run


def test_a_run_folder_without_noise_scale_rows_exits_2(tmp_path, capsys):
    run = _bare_run_folder(tmp_path)
    _exit_2(capsys, ["plan", "--from", str(run), "--method", "noise"], "no gns/b_simple rows")


def test_a_base_run_without_checkpoints_exits_2_naming_it(tmp_path, capsys):
    """Branching (the default) starts from the base run's step checkpoints: none -> exit 2 before any branch."""
    run = _bare_run_folder(tmp_path)
    _exit_2(capsys, ["plan", "--from", str(run)], f"--from: the run in {str(run)!r} has no step checkpoints")
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "metrics.jsonl", "summary.json"]


@pytest.mark.timeout(900)  # two short runs' worth of spawned process groups: minutes on a loaded 2-core VM
def test_one_short_run_gives_a_consistent_plan_and_from_reproduces_it(tmp_path, monkeypatch, capsys, mlp_overrides):
    monkeypatch.chdir(tmp_path)
    sets = [a for o in mlp_overrides + ["target.test_acc=0.3"] for a in ("--set", o)]
    common = ["--method", "noise", "--alpha-us", "20", "--beta-gbps", "2", "--gpus", "1,2,8", "--batches", "16,64,256,1024",
              "--time-batches", "16,64"]
    assert main(["plan", MLP, *sets, *common, "--eval-every", "5", "--out", "run", "--base-lr-search", "1",
                 "--json", "plan.json", "--plot", "plan.png"]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert KEYS <= plan.keys() and (tmp_path / "plan.png").stat().st_size > 0
    # the statistics follow from the run: S0 its crossing (interpolated), B_crit = the noise scale at the target
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["test_acc"]) for r in rows if r.get("test_acc") is not None and r.get("eval_set") != "full"]
    assert plan["s0"] == crossing(evals, 0.3)["steps"] and plan["s0"] <= summary["steps_to_target"] and plan["b0"] == 128
    assert plan["base_lr_search"] is None or len(plan["base_lr_search"]) == 1
    history = [(r["step"], r["gns/b_simple"]) for r in rows if "gns/b_simple" in r]
    assert plan["noise_scale_at_target"] == noise_near_target(history, plan["s0"])["value"] == plan["b_crit"]
    assert plan["s_min"] == pytest.approx(plan["s0"] / (1 + plan["b_crit"] / 128))
    assert plan["e_min"] == pytest.approx(plan["s_min"] * plan["b_crit"])
    # the table: every batch x world with >= 1 example per device, consistent arithmetic
    assert {(r["global_batch"], r["world_size"]) for r in plan["rows"]} == {(b, n) for b in (16, 64, 256, 1024) for n in (1, 2, 8)}
    for r in plan["rows"]:
        assert ROW_KEYS <= r.keys()
        assert r["steps"] == pytest.approx(Tradeoff(plan["s_min"], plan["b_crit"]).steps(r["global_batch"]))
        assert r["time_s"] == pytest.approx(r["steps"] * r["step_s"])
        assert 0 < r["efficiency"] <= 1 + 1e-9 and (r["world_size"] > 1 or r["efficiency"] == pytest.approx(1.0))
    assert plan["best"]["time_s"] == min(r["time_s"] for r in plan["rows"])
    assert plan["best_efficient"]["efficiency"] >= 0.8
    assert plan["overlap"] == 0.0 and "assumed none" in plan["overlap_source"]
    assert "micro-batches of 64" in plan["notes"][0]
    capsys.readouterr()
    # --from the same folder: the same run statistics, no new run; B_crit from a `bigbatch measure` JSON
    (tmp_path / "measure.json").write_text(json.dumps({"b_noise": 50.0, "b_simple": 120.0, "step": plan["s0"]}))
    assert main(["plan", "--from", "run", *common, "--noise-from", "measure.json", "--json", "again.json"]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["s0"] == plan["s0"] and again["noise_scale"]["value"] == plan["noise_scale"]["value"]
    assert again["b_crit"] == again["noise_scale_at_target"] == 50.0 and "b_noise from measure.json" in again["b_crit_source"]
    assert again["s_min"] == pytest.approx(plan["s0"] / (1 + 50.0 / 128))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.json", "measure.json", "plan.json", "plan.png", "run"]


@pytest.mark.parametrize("run, sweep", [("plan_run", "sweep"), ("plan_run_2026_12_02", "sweep_2026_12_02")])
def test_recorded_sweep_steps_within_50_percent_up_to_batch_1024(run, sweep):
    """A recorded plan run (one run at B0 = 128 of the study's base config, its online noise scale
    near the target) against the recorded study sweep of the same base (best-lr steps to 95 % per batch)."""
    rec = json.loads(RECORDED.read_text())
    noise = noise_near_target([tuple(p) for p in rec[run]["noise_history"]], rec[run]["steps_to_target"])
    t = Tradeoff.from_run(rec[run]["steps_to_target"], rec[run]["global_batch"], noise["value"])
    assert 0.5 <= t.b_crit / rec[sweep]["b_crit"] <= 2.0  # Done-when 1: within 2x of the swept B_crit
    for b, measured in rec[sweep]["best_steps"].items():
        if int(b) <= 1024:
            assert abs(t.steps(int(b)) / measured - 1) <= 0.5, (b, t.steps(int(b)), measured)
