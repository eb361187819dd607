"""Sweeps over any config axis, and the width sweep (over-parametrisation) built on them.

- an [axes] table expands the grid batch x axis values x lr x seeds, each trial's config has its
  value, and a bad key or value is refused before anything runs (exit 2, the field named);
- MNIST-1D's label noise flips training labels only, the same ones for every training seed;
- the width analysis finds N* as the smallest N that fits, and its ensemble averages softmax outputs;
- a real Ray sweep over 2 widths leaves records with the axis values, parameter counts and test
  outputs, and `bigbatch report` draws the width section from them.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from bigbatch import cli
from bigbatch.config import DataConfig
from bigbatch.study import spec as spec_mod
from bigbatch.study import width

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
name = "w"
batch_sizes = [16, 64]
seeds = [0, 1]
[base.data]
name = "digits"
[base.model]
name = "mlp"
[target]
test_acc = 0.8
[trial]
max_steps = 100
[axes]
"model.hidden" = [8, 32]
"""


def test_axes_expand_the_grid_and_set_each_trials_config():
    spec = spec_mod.from_dict(tomllib.loads(GOOD))
    points = spec.points()
    assert len(points) == 2 * 2 * 2  # batch x hidden x seed
    assert {(p["batch"], p["axes"]["model.hidden"], p["seed"]) for p in points} == {
        (b, h, s) for b in (16, 64) for h in (8, 32) for s in (0, 1)}
    p = next(p for p in points if p["axes"]["model.hidden"] == 32 and p["batch"] == 64 and p["seed"] == 1)
    assert spec.trial_name(p) == "b64-lr1-s1-model.hidden32"
    assert spec.trial_config(p).model.hidden == 32
    # TOML's dotted keys read as the quoted form
    dotted = spec_mod.from_dict(tomllib.loads(GOOD.replace('"model.hidden" = [8, 32]', "model.hidden = [8, 32]")))
    assert dotted.points() == points


def test_a_sweep_without_axes_keeps_its_points_and_names():
    spec = spec_mod.from_dict(tomllib.loads(GOOD.split("[axes]")[0]))
    assert spec.axes == {} and all(set(p) == {"batch", "lr_multiplier", "seed"} for p in spec.points())
    assert spec.trial_name(spec.points()[0]) == "b16-lr1-s0"


@pytest.mark.parametrize("edit,field,words", [
    (('"model.hidden" = [8, 32]', '"model.hiden" = [8, 32]'), "axes.model.hiden", "unknown key"),
    (('"model.hidden" = [8, 32]', '"modle.hidden" = [8, 32]'), "axes.modle.hidden", "unknown section"),
    (('"model.hidden" = [8, 32]', '"model.hidden" = [8, 0]'), "axes.model.hidden[1]", "model.hidden"),
    (('"model.hidden" = [8, 32]', '"model.hidden" = [8, "wide"]'), "axes.model.hidden[1]", "integer"),
    (('"model.hidden" = [8, 32]', '"model.hidden" = []'), "axes.model.hidden", "non-empty"),
    (('"model.hidden" = [8, 32]', '"model.hidden" = [8, 8]'), "axes.model.hidden", "repeated"),
    (('"model.hidden" = [8, 32]', '"model.hidden" = [[8], [32]]'), "axes.model.hidden[0]", "integer"),
    (('"model.hidden" = [8, 32]', '"batch.global_batch" = [8, 32]'), "axes.batch.global_batch", "batch_sizes"),
    (('"model.hidden" = [8, 32]', '"train.seed" = [1, 2]'), "axes.train.seed", "seeds"),
    (('"model.hidden" = [8, 32]', '"model.hidden.x" = [1]'), "axes.model.hidden.x[0]", "not a table"),
    (("[trial]", "[search]\nadaptive = true\n[trial]"), "axes", "search.adaptive = false"),
    # two values, one trial name: they would share a run folder
    (('"model.hidden" = [8, 32]', '"track.project" = ["a b", "a_b"]'), "axes.track.project", "same trial name"),
    # a value that breaks only the larger batch's split (48 / 3 is whole, 64 / 3 is not)
    (('batch_sizes = [16, 64]\n', 'batch_sizes = [48, 64]\n'), "axes.batch.accum_steps[1]", "accum_steps 3"),
])
def test_bad_axis_exits_2_naming_the_field_before_anything_is_written(tmp_path, capsys, edit, field, words):
    path = tmp_path / "sweep.toml"
    text = GOOD.replace(*edit)
    if field == "axes.batch.accum_steps[1]":
        text = text.replace('"model.hidden" = [8, 32]', '"batch.accum_steps" = [1, 3]')
    assert text != GOOD
    path.write_text(text)
    rc = cli.main(["sweep", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {field}" in err and words in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_mnist1d_label_noise_flips_training_labels_only_the_same_for_every_seed():
    from bigbatch.trainer.data import build_data

    clean = build_data(DataConfig(name="mnist1d", num_samples=2000, test_fraction=0.5))
    noisy = build_data(DataConfig(name="mnist1d", num_samples=2000, test_fraction=0.5, label_noise=0.3))
    again = build_data(DataConfig(name="mnist1d", num_samples=2000, test_fraction=0.5, label_noise=0.3))
    changed = (noisy.train.y != clean.train.y).float().mean().item()
    assert 0.3 * 0.9 - 0.05 < changed < 0.3 * 0.9 + 0.05  # a redrawn label keeps its class 1 time in 10
    assert torch_equal(noisy.test.y, clean.test.y) and torch_equal(noisy.train.x, clean.train.x)
    assert torch_equal(noisy.train.y, again.train.y)


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def _outputs(tmp_path: Path, name: str, probs: np.ndarray, labels: np.ndarray) -> str:
    path = tmp_path / f"{name}.npz"
    np.savez(path, probs=probs, labels=labels)
    return str(path)


def test_n_star_is_the_smallest_n_that_fits_and_the_ensemble_averages_softmax(tmp_path):
    labels = np.array([0, 1, 2])
    # three networks, each wrong on a different example but by a small margin: each has test
    # error 1/3, their softmax mean is right on all three
    right, wrong = 0.5, 0.55
    nets = []
    for miss in range(3):
        p = np.full((3, 3), (1 - right) / 2)
        p[np.arange(3), labels] = right
        p[miss] = (1 - wrong) / 2
        p[miss, (labels[miss] + 1) % 3] = wrong
        nets.append(p)
    assert width.ensemble_error([(p, labels) for p in nets]) == 0.0
    trials = []
    for h, n_params, train_acc in ((4, 100, 0.8), (8, 200, 0.999), (16, 400, 1.0)):
        for seed, p in enumerate(nets):
            trials.append({"axes": {"model.hidden": h}, "seed": seed, "status": "ok", "n_params": n_params,
                           "n_train": 50, "num_classes": 3, "train_acc": train_acc - 0.001 * seed, "test_acc": 0.0,
                           "train_loss": 0.1, "test_outputs": _outputs(tmp_path, f"{h}-{seed}", p, labels)})
    w = width.analyse(trials, "model.hidden", tolerance=0.005)
    assert w["n_star"] == 200 and w["n_star_value"] == 8 and w["n_star_over_p"] == 4.0  # median train error 0.002
    assert w["p_times_classes"] == 150
    rows = {r["value"]: r for r in w["rows"]}
    assert rows[8]["test_error"]["median"] == pytest.approx(1 / 3)  # from the outputs, not the records' test_acc
    assert rows[8]["ensemble_k"] == 3 and rows[8]["ensemble_test_error"] == 0.0
    assert w["ensemble_gain_past_n_star"]["widths"] == [8, 16]
    assert w["ensemble_gain_past_n_star"]["mean"] == pytest.approx(1 / 3)


def _row(value: int, n_params: int, median: float, lo: float, hi: float) -> dict:
    return {"value": value, "n_params": n_params, "test_error": {"median": median, "min": lo, "max": hi}}


def test_a_peak_near_n_star_counts_only_when_it_rises_above_the_seed_range():
    under = [_row(4, 100, 0.40, 0.39, 0.41), _row(8, 200, 0.30, 0.29, 0.31)]  # the first descent, N < N*/2
    near = [_row(16, 400, 0.36, 0.35, 0.37), _row(32, 800, 0.38, 0.37, 0.39), _row(64, 1600, 0.33, 0.32, 0.34)]
    past = [_row(128, 3200, 0.25, 0.24, 0.26)]
    p = width.peak_near_n_star(under + near + past, n_star=800)
    assert p["value"] == 32 and p["below_value"] == 8
    assert p["rise"] == pytest.approx(0.08) and p["seed_range"] == pytest.approx(0.02) and p["resolved"]
    wide = [_row(8, 200, 0.30, 0.20, 0.40)] + near  # the same rise inside a 20-point seed range
    assert not width.peak_near_n_star(wide, n_star=800)["resolved"]
    assert width.peak_near_n_star(near + past, n_star=800) is None  # nothing below N*/2 to compare with


def test_shipped_width_config_spans_n_over_p_below_and_above_one():
    from bigbatch.trainer.data import train_size_hint
    from bigbatch.trainer.models import build_model

    spec = spec_mod.load(ROOT / "configs" / "sweep-width-mnist1d.toml")
    assert spec.axes and len(spec.seeds) >= 3 and len(spec.batch_sizes) == 1 and spec.trial.test_outputs
    assert not spec.trial.stop_at_target and spec.base["model"]["name"] == "mlp"
    ratios = []
    for h in spec.axes["model.hidden"]:
        cfg = spec.trial_config({"batch": spec.batch_sizes[0], "lr_multiplier": 1.0, "seed": 0, "axes": {"model.hidden": h}})
        assert cfg.data.label_noise > 0 and cfg.optim.weight_decay == 0
        n = sum(p.numel() for p in build_model(cfg.model, (40,), 10).parameters())
        ratios.append(n / train_size_hint(cfg.data))  # N / P
    assert min(ratios) < 0.5 and max(ratios) > 10


def test_width_sweep_on_two_widths_records_outputs_and_reports_the_width_section(tmp_path, local_ray):
    from bigbatch.study.sweep import run_sweep

    d = {"name": "w2", "batch_sizes": [25], "seeds": [0, 1],
         "base": {"data": {"name": "mnist1d", "num_samples": 600, "test_fraction": 0.5, "train_samples": 100,
                           "label_noise": 0.2, "train_eval_samples": 0},
                  "model": {"name": "mlp", "depth": 1},
                  "optim": {"name": "adamw", "base_lr": 0.01, "base_batch": 25, "scaling": "none", "weight_decay": 0.0},
                  "schedule": {"name": "constant"}, "train": {"amp": "off"}},
         "axes": {"model": {"hidden": [4, 64]}}, "target": {"train_acc": 1.0},
         "trial": {"max_steps": 200, "eval_every_examples": 2500, "stop_at_target": False, "test_outputs": True,
                   "b_simple_samples": 0}}
    out = tmp_path / "sweep"
    analysis = run_sweep(spec_mod.from_dict(d), d, out, num_cpus=2, quiet=True)
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert sorted((t["axes"]["model.hidden"], t["seed"]) for t in trials) == [(4, 0), (4, 1), (64, 0), (64, 1)]
    for t in trials:
        h = t["axes"]["model.hidden"]
        assert t["status"] in ("ok", "not_reached") and t["steps"] == 200
        assert t["n_params"] == 40 * h + h + 10 * h + 10 and t["n_train"] == 100 and t["num_classes"] == 10
        with np.load(t["test_outputs"]) as z:
            probs, labels = z["probs"], z["labels"]
        assert probs.shape == (300, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
        # the saved outputs are the final network the run evaluated: the same test accuracy
        assert np.mean(probs.argmax(1) == labels) == pytest.approx(t["test_acc"], abs=1e-9)
    w = analysis["width"]
    assert [r["value"] for r in w["rows"]] == [4, 64] and w["p"] == 100 and w["ensemble_k"] == 2
    narrow, wide = w["rows"]
    assert wide["train_error"]["median"] < narrow["train_error"]["median"]  # 650 vs 10,000+ parameters for 100 examples

    for f in ("report.md", "width.png", "critical.json"):
        (out / f).unlink()
    assert cli.main(["report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "## Width sweep (over-parametrisation)" in md and "![width](width.png)" in md
    assert "N = P x K = 1,000" in md and "k = 2" in md
    assert (out / "width.png").stat().st_size > 10_000
    assert json.loads((out / "critical.json").read_text())["width"]["rows"][1]["n_params"] == 64 * 51 + 10
