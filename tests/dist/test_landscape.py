"""`bigbatch interpolate`: the loss along the line between a small-batch and a large-batch run.

Two short MNIST-1D MLP runs (batch 32 and batch 512) are trained once for the module; the
interpolation's endpoints must reproduce each run's own test loss, the curve and the barrier
height are written as JSON and PNG, and bad input is a one-line error with exit code 2.
"""

import json
from pathlib import Path

import pytest
import torch

from bigbatch import cli, config
from bigbatch.study.landscape import barrier, interpolate_state
from bigbatch.trainer.loop import run

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mnist1d-mlp.toml"
SMALL = ["data.num_samples=3000", "data.train_eval_samples=1000", "train.eval_every=0", "train.log_every=50",
         "track.progress=off", "schedule.name=constant"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, batch, steps in (("small", 32, 150), ("large", 512, 40)):
        cfg = config.load(CONFIG, SMALL + [f"batch.global_batch={batch}", f"train.steps={steps}"])
        run(cfg, root / name)
        runs[name] = root / name
    return runs


def test_endpoints_reproduce_each_runs_test_loss_and_the_curve_is_written(two_runs, tmp_path, capsys):
    out = tmp_path / "interp"
    code = cli.main(["interpolate", str(two_runs["small"]), str(two_runs["large"]), "--points", "7", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "interpolation.json").read_text())
    assert (out / "interpolation.png").stat().st_size > 1000
    assert [r["t"] for r in result["curve"]] == pytest.approx([i / 6 for i in range(7)])
    for end, run_dir in (("a", two_runs["small"]), ("b", two_runs["large"])):
        own = json.loads((run_dir / "summary.json").read_text())["test_loss"]
        assert result["endpoints"][end]["test_loss"] == pytest.approx(own, rel=1e-6)
    curve = result["curve"]
    assert result["barrier_test_loss"] == pytest.approx(barrier([r["t"] for r in curve], [r["test_loss"] for r in curve]))
    assert result["barrier_test_loss"] >= 0.0  # the endpoints themselves lie on the chord
    printed = capsys.readouterr().out
    assert "barrier height" in printed and "losses in eval mode" in printed and result["loss_mode"] == "eval"


def test_bad_input_is_a_one_line_error_with_exit_2(two_runs, tmp_path, capsys):
    assert cli.main(["interpolate", str(tmp_path / "missing"), str(two_runs["large"])]) == 2
    assert "RUN_A" in capsys.readouterr().err
    assert cli.main(["interpolate", str(two_runs["small"]), str(two_runs["large"]), "--points", "1"]) == 2
    assert "--points" in capsys.readouterr().err
    assert not (two_runs["small"].parent / "interpolate-small-large").exists()


def test_barrier_is_the_rise_above_the_chord_and_interpolation_is_linear():
    assert barrier([0.0, 0.5, 1.0], [1.0, 3.0, 2.0]) == pytest.approx(1.5)
    assert barrier([0.0, 0.5, 1.0], [1.0, 1.5, 2.0]) == pytest.approx(0.0)
    a = {"w": torch.zeros(3), "n": torch.tensor(5)}
    b = {"w": torch.ones(3) * 4, "n": torch.tensor(9)}
    mid = interpolate_state(a, b, 0.25)
    assert torch.equal(mid["w"], torch.ones(3)) and int(mid["n"]) == 5
