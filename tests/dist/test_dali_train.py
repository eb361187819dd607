"""Training with data.backend = "dali" on a generated JPEG ImageFolder, decoded on the CPU: the
per-step losses are the same on 1 and 2 gloo ranks (DALI is fed the example stream's images,
with the stream's crops and flips), including across a batch-size phase change, and a SIGTERM +
resume ends exactly like an uninterrupted run."""

from __future__ import annotations


import pytest

from _helpers import ROOT, assert_same_run, bigbatch, preempt_at, step_losses
from _images import jpeg_folder
from bigbatch import config
from bigbatch.trainer.loop import run

pytest.importorskip("nvidia.dali")

MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")


def _sets(root, steps: int) -> list[str]:
    # an MLP on 16 px crops (no BatchNorm: 1 and 2 ranks compute the same function of the batch)
    return [f"data.root='{root}'", "data.name='imagefolder'", "data.backend='dali'", "data.image_size=16",
            "data.num_workers=1", "data.train_eval_samples=16", "model.hidden=32", "batch.global_batch=8",
            f"train.steps={steps}", "train.log_every=1", "train.eval_every=0", "train.amp='off'", "track.progress='off'",
            "optim.scaling='none'", "optim.base_lr=0.05"]


def test_dali_gives_the_same_losses_on_1_and_2_ranks(tmp_path):
    root = jpeg_folder(tmp_path / "imgs", {"a": 12, "b": 11, "c": 9})  # 32 train images
    sets = _sets(root, 14) + ["batch.phases=[[0, 8], [2, 16]]"]  # batch 16 from epoch 2 (step 8): a rebuilt pipeline
    run(config.load(MLP, sets), tmp_path / "one")
    p = bigbatch("train", MLP, "--nproc", "2", "--out", str(tmp_path / "two"), *[a for s in sets for a in ("--set", s)])
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 15))
    for step in one:
        assert abs(one[step] - two[step]) < 1e-4, (step, one[step], two[step])


def test_dali_resumes_exactly_after_sigterm(tmp_path):
    root = jpeg_folder(tmp_path / "imgs", {"a": 10, "b": 9})

    sets = _sets(root, 12)
    first = run(config.load(MLP, sets), tmp_path / "cut", reporter=preempt_at(5))
    assert first["status"] == "preempted" and first["steps"] == 5
    resumed = run(config.load(tmp_path / "cut" / "config.toml"), tmp_path / "cut", resume=True)
    whole = run(config.load(MLP, sets), tmp_path / "whole")
    assert resumed["steps"] == whole["steps"] == 12
    assert_same_run(tmp_path / "cut", tmp_path / "whole")
