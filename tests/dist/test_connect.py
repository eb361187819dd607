"""`bigbatch connect`: a trained Bezier curve removes the straight line's barrier (Garipov et al. 2018).

Two short MNIST-1D MLP runs from different initialisations (batch 32, seed 0 and batch 512,
seed 1) are trained once for the module: their straight line has a real loss barrier. The
trained curve's barrier must be no larger than the line's, both paths must start and end at the
runs' own losses, and bad input is a one-line error with exit code 2 before any folder exists.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from bigbatch import cli, config
from bigbatch.study.landscape import barrier
from bigbatch.trainer.loop import run

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mnist1d-mlp.toml"
SMALL = ["data.num_samples=3000", "data.train_eval_samples=1000", "train.eval_every=0", "train.log_every=50",
         "track.progress=off", "schedule.name=constant", "model.hidden=64"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small steps on shared cores
    try:
        for name, batch, steps, seed in (("small", 32, 150, 0), ("large", 512, 40, 1)):
            cfg = config.load(CONFIG, SMALL + [f"batch.global_batch={batch}", f"train.steps={steps}", f"train.seed={seed}"])
            run(cfg, root / name)
    finally:
        torch.set_num_threads(threads)
    return {"small": root / "small", "large": root / "large"}


def test_the_trained_curve_has_no_larger_barrier_than_the_straight_line(two_runs, tmp_path, capsys):
    out = tmp_path / "connect"
    code = cli.main(["connect", str(two_runs["small"]), str(two_runs["large"]), "--points", "7", "--steps", "300",
                     "--batch", "64", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "connect.json").read_text())
    assert (out / "connect.png").stat().st_size > 1000
    line, bezier = result["line"], result["bezier"]
    ts = [i / 6 for i in range(7)]
    for path in (line, bezier):
        assert [r["t"] for r in path["curve"]] == pytest.approx(ts)
        for split in ("train", "test"):
            losses = [r[f"{split}_loss"] for r in path["curve"]]
            assert path[f"barrier_{split}_loss"] == pytest.approx(barrier(ts, losses))
    # the precondition: different initialisations, a real barrier on the line
    assert line["barrier_train_loss"] > 0.2 and line["barrier_test_loss"] > 0.2
    assert bezier["barrier_train_loss"] <= line["barrier_train_loss"]
    assert bezier["barrier_test_loss"] <= line["barrier_test_loss"]
    assert bezier["barrier_train_loss"] < 0.5 * line["barrier_train_loss"]  # not merely a tie
    # the curve's ends are the runs themselves: their own test loss (no BatchNorm in the MLP) and the line's ends
    for end, run_dir, row in (("a", two_runs["small"], 0), ("b", two_runs["large"], -1)):
        own = json.loads((run_dir / "summary.json").read_text())["test_loss"]
        assert result["endpoints"][end]["test_loss"] == pytest.approx(own, rel=1e-6)
        assert bezier["curve"][row] == line["curve"][row]
    history = result["training"]["loss_history"]
    assert history[-1]["step"] == 300 and result["training"]["steps"] == 300
    printed = capsys.readouterr().out
    assert "barrier, straight line" in printed and "barrier, Bezier curve" in printed


def test_the_line_is_the_one_interpolate_computes(two_runs, tmp_path):
    assert cli.main(["connect", str(two_runs["small"]), str(two_runs["large"]), "--points", "5", "--steps", "1",
                     "--out", str(tmp_path / "c")]) == 0
    assert cli.main(["interpolate", str(two_runs["small"]), str(two_runs["large"]), "--points", "5",
                     "--out", str(tmp_path / "i")]) == 0
    line = json.loads((tmp_path / "c" / "connect.json").read_text())["line"]
    interp = json.loads((tmp_path / "i" / "interpolation.json").read_text())
    assert line["curve"] == interp["curve"]
    assert line["barrier_test_loss"] == interp["barrier_test_loss"]


def _with_config_edit(src: Path, dst: Path, old: str, new: str) -> Path:
    shutil.copytree(src, dst)
    text = (dst / "config.toml").read_text()
    assert old in text
    (dst / "config.toml").write_text(text.replace(old, new, 1))
    return dst


@pytest.mark.parametrize("args, field", [
    (["--steps", "0"], "--steps"),
    (["--batch", "1"], "--batch"),
    (["--batch", "100000"], "--batch"),  # more than the training set
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--points", "1"], "--points"),
    (["--seed", "-1"], "--seed"),
    (["--device", "tpu"], "--device"),
])
def test_bad_options_are_one_line_errors_naming_the_option(two_runs, tmp_path, capsys, args, field):
    out = tmp_path / "never"
    assert cli.main(["connect", str(two_runs["small"]), str(two_runs["large"]), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert field in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_runs_are_one_line_errors_before_any_folder(two_runs, tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["connect", str(tmp_path / "missing"), str(two_runs["large"]), "--out", str(out)]) == 2
    assert "RUN_A" in capsys.readouterr().err
    no_ckpt = tmp_path / "no-ckpt"
    shutil.copytree(two_runs["large"], no_ckpt)
    for f in no_ckpt.glob("checkpoint*"):
        f.unlink()
    assert cli.main(["connect", str(two_runs["small"]), str(no_ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "RUN_B" in err and "checkpoint.pt" in err
    wider = _with_config_edit(two_runs["large"], tmp_path / "wider", "hidden = 64", "hidden = 128")
    assert cli.main(["connect", str(two_runs["small"]), str(wider), "--out", str(out)]) == 2
    assert "[model]" in capsys.readouterr().err
    other_data = _with_config_edit(two_runs["large"], tmp_path / "other-data", "num_samples = 3000", "num_samples = 4000")
    assert cli.main(["connect", str(two_runs["small"]), str(other_data), "--out", str(out)]) == 2
    assert "data.num_samples" in capsys.readouterr().err
    assert not out.exists()
    assert not (two_runs["small"].parent / "connect-small-large").exists()
