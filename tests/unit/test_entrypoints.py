"""Your model, your data: "torchvision:NAME" and "package.module:function" entry points train,
round-trip through the config, render into SLURM jobs and sweeps, and a bad one is a one-line
error naming model.name / data.name (exit 2) before any run folder exists."""

from __future__ import annotations

from pathlib import Path

import pytest

import _user_module
from _helpers import bigbatch, read_jsonl
from bigbatch import config
from bigbatch.cli import main

ROOT = Path(__file__).resolve().parents[2]
MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")
QUICK = ["train.log_every=1", "train.eval_every=0", "train.amp='off'", "track.progress='off'", "data.train_eval_samples=64"]
USER = ["model.name='mylab.zoo:make_model'", "data.name='mylab.zoo:make_data'", "batch.global_batch=32"]


@pytest.fixture
def user_path(tmp_path, monkeypatch):
    folder = _user_module.write(tmp_path / "src")
    monkeypatch.syspath_prepend(str(folder))
    return folder


def _sets(values):
    return [a for v in values for a in ("--set", v)]


def test_torchvision_mobilenet_v3_small_trains_on_32px_fake_images(tmp_path):
    from bigbatch.trainer.loop import run

    cfg = config.load(MLP, QUICK + ["model.name='torchvision:mobilenet_v3_small'", "data.name='fake_images'",
                                    "data.image_size=32", "data.num_samples=160", "batch.global_batch=16", "train.steps=3"])
    summary = run(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["steps"] == 3
    losses = [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)


def test_user_model_and_data_with_kwargs_train_and_round_trip_through_the_config(tmp_path, user_path):
    from bigbatch.trainer.loop import run

    cfg = config.load(MLP, QUICK + USER + ["train.steps=4", "model.kwargs={width=7}", "data.kwargs={classes=4, n=200}"])
    assert cfg.model.kwargs == {"width": 7} and cfg.data.kwargs == {"classes": 4, "n": 200}
    summary = run(cfg, tmp_path / "run")
    assert summary["steps"] == 4
    saved = config.load(tmp_path / "run" / "config.toml")
    assert saved == cfg
    from bigbatch.trainer.data import build_data
    from bigbatch.trainer.models import build_model

    bundle = build_data(saved.data)
    assert bundle.num_classes == 4 and bundle.input_shape == (12,) and len(bundle.train) == 150
    model = build_model(saved.model, bundle.input_shape, bundle.num_classes)
    assert model[1].out_features == 7  # model.kwargs reached the function
    assert "kwargs" not in config.to_dict(config.load(MLP))["model"]  # the default {} is left out


def _one_line_exit_2(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("sets, expect", [
    (["model.name='nosuchpkg.models:net'"], "error: model.name: cannot import module 'nosuchpkg.models'"),
    (["model.name='mylab.zoo:nope'"], "error: model.name: module 'mylab.zoo' has no attribute 'nope'"),
    (["model.name='mylab.zoo:NOT_CALLABLE'"], "error: model.name: 'mylab.zoo:NOT_CALLABLE' is a int, not a function"),
    (["model.name='mylab.zoo:not_a_model'"], "error: model.name: 'mylab.zoo:not_a_model' returned a str, expected a torch.nn.Module"),
    (["model.name='mylab.zoo:make_model'", "model.kwargs={depth=3}"], "error: model.kwargs: 'mylab.zoo:make_model' cannot be called"),
    (["model.name='torchvision:resnet9000'"], "error: model.name: torchvision has no classification model 'resnet9000'"),
    (["model.name='resnet 18'"], "error: model.name: expected one of mlp, cnn1d"),
    (["data.name='nosuchpkg.data:load'"], "error: data.name: cannot import module 'nosuchpkg.data'"),
    (["data.name='mylab.zoo:missing'"], "error: data.name: module 'mylab.zoo' has no attribute 'missing'"),
    (["data.name='mylab.zoo:not_data'"], "error: data.name: 'mylab.zoo:not_data' returned a int, expected (train, test)"),
    (["data.name='mylab.zoo:make_data'", "data.kwargs={colours=3}"], "error: data.kwargs: 'mylab.zoo:make_data' cannot be called"),
    (["data.name='torchvision:MNIST'"], "error: data.name: expected one of mnist1d"),
    (["model.kwargs={width=3}"], "error: model.kwargs: only for model.name"),
    (USER[:2] + ["data.kwargs={map_style=true}", "measure.tail_every=1"], "error: measure.tail_every: needs an in-memory dataset"),
])
def test_a_bad_entry_point_is_one_line_exit_2_and_no_run_folder(tmp_path, user_path, capsys, sets, expect):
    out = tmp_path / "run"
    err = _one_line_exit_2(capsys, ["train", MLP, *_sets(QUICK + ["train.steps=2"] + sets), "--out", str(out)])
    assert expect in err, err
    assert not out.exists()


def test_a_missing_module_stops_a_multi_process_launch_before_torchrun(tmp_path):
    """Real subprocess, --nproc 2: the launcher imports the entry point before starting ranks."""
    out = tmp_path / "run"
    p = bigbatch("train", MLP, "--nproc", "2", "--out", str(out), *_sets(["model.name='mylab.zoo:make_model'"]),
                 cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0 and "model.name: cannot import module 'mylab.zoo'" in p.stderr
    assert not out.exists()


def test_slurm_render_and_sweeps_accept_entry_point_configs(tmp_path, user_path, capsys):
    # rendering does not import the module: the cluster's PYTHONPATH (--env) is what counts
    assert main(["slurm", "render", MLP, "--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2",
                 *_sets(["model.name='elsewhere.nets:build'", "model.kwargs={width=64}"]),
                 "--env", "PYTHONPATH=/project/src"]) == 0
    script = capsys.readouterr().out
    assert "elsewhere.nets:build" in script and "export PYTHONPATH=/project/src" in script
    from bigbatch.study import spec as spec_mod

    sweep = {"name": "byo", "base": MLP, "batch_sizes": [32, 64], "overrides": USER[:2], "trial": {"max_steps": 5}}
    spec = spec_mod.from_dict(sweep)
    cfg = spec.trial_config(spec.points()[0])
    assert cfg.model.name == "mylab.zoo:make_model" and cfg.data.name == "mylab.zoo:make_data"
    from bigbatch.errors import ConfigError

    with pytest.raises(ConfigError) as e:  # a sweep checks every trial's entry points before Ray starts
        spec_mod.from_dict({**sweep, "overrides": ["data.name='mylab.zoo:gone'"]})
    assert e.value.field == "data.name"
