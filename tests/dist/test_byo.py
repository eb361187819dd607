"""A user's own model and dataset (a module on PYTHONPATH) keep bigbatch's guarantees: the same
per-step losses on 1 and 2 gloo ranks (global-batch semantics, the example stream's order and
sharding), and a SIGTERM + resume that ends exactly like an uninterrupted run."""

from __future__ import annotations

import os


import _user_module
from _helpers import ROOT, assert_same_run, bigbatch, preempt_at, step_losses
from bigbatch import config
from bigbatch.trainer.loop import run

MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")
SETS = ["model.name='mylab.zoo:make_model'", "data.name='mylab.zoo:make_data'", "data.kwargs={map_style=true}",
        "data.num_workers=0", "batch.global_batch=32", "train.log_every=1", "train.eval_every=10", "train.amp='off'",
        "track.progress='off'"]


def test_user_module_gives_the_same_losses_on_1_and_2_ranks(tmp_path, monkeypatch):
    src = _user_module.write(tmp_path / "src")
    monkeypatch.syspath_prepend(str(src))
    sets = SETS + ["train.steps=30"]
    run(config.load(MLP, sets), tmp_path / "one")
    pythonpath = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    p = bigbatch("train", MLP, "--nproc", "2", "--out", str(tmp_path / "two"), *[a for s in sets for a in ("--set", s)],
                 env={"PYTHONPATH": pythonpath})
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 31))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])
    assert one[30] < one[1]


def test_user_module_resumes_exactly_after_sigterm(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_user_module.write(tmp_path / "src")))
    sets = SETS + ["train.steps=24"]

    first = run(config.load(MLP, sets), tmp_path / "cut", reporter=preempt_at(9))
    assert first["status"] == "preempted" and first["steps"] == 9
    resumed = run(config.load(tmp_path / "cut" / "config.toml"), tmp_path / "cut", resume=True)
    whole = run(config.load(MLP, sets), tmp_path / "whole")
    assert resumed["steps"] == whole["steps"] == 24
    assert_same_run(tmp_path / "cut", tmp_path / "whole")
