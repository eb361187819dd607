"""A user's sequence task (a model returning per-token logits (N, T, V) against targets (N, T))
trains through the entry-point path: the token-averaged loss falls, accuracy is per token, metrics
count tokens, the noise scale is measured on it, and 1 and 2 gloo ranks give the same per-step
losses. Targets equal to train.ignore_index count for nothing."""

from __future__ import annotations

import os

import pytest
import torch

import _user_module
from _helpers import ROOT, bigbatch, read_jsonl, step_losses
from bigbatch import config
from bigbatch.trainer.loop import run
from bigbatch.trainer.objective import TrainingLoss, eval_sums

MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")
LENGTH = 12
SETS = ["model.name='mylab.zoo:make_seq_model'", "data.name='mylab.zoo:make_seq_data'", f"data.kwargs.length={LENGTH}",
        "batch.global_batch=32", "optim.name='adamw'", "optim.base_lr=0.01", "optim.scaling='none'",
        "optim.weight_decay=0", "schedule.name='constant'", "train.log_every=5", "train.eval_every=20",
        "train.amp='off'", "track.progress='off'"]


def test_a_sequence_model_trains_with_token_loss_accuracy_and_counts(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(_user_module.write(tmp_path / "src")))
    summary = run(config.load(MLP, SETS + ["train.steps=120", "measure.gns=true", "batch.accum_steps=2"]),
                  tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    logged = [r for r in rows if "loss" in r]
    assert logged[-1]["loss"] < 0.5 * logged[0]["loss"]  # ln 8 = 2.08 at the start
    assert summary["test_acc"] > 0.9 and summary["tokens"] == summary["examples"] * LENGTH  # token accuracy
    assert summary["tokens_per_example"] == LENGTH
    for r in logged:
        assert r["tokens"] == r["examples"] * LENGTH and r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * LENGTH)
    assert logged[-1]["gns/b_simple"] > 0  # on the token-averaged loss, in sequences


def test_a_sequence_model_gives_the_same_losses_on_1_and_2_ranks(tmp_path, monkeypatch):
    src = _user_module.write(tmp_path / "src")
    monkeypatch.syspath_prepend(str(src))
    sets = SETS + ["train.steps=20", "train.log_every=1"]
    run(config.load(MLP, sets), tmp_path / "one")
    pythonpath = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    p = bigbatch("train", MLP, "--nproc", "2", "--out", str(tmp_path / "two"), *[a for s in sets for a in ("--set", s)],
                 env={"PYTHONPATH": pythonpath})
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 21))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4


def test_ignored_targets_count_for_nothing():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 6, 5), torch.randint(0, 5, (4, 6))
    padded = targets.clone()
    padded[:, 4:] = -100  # the last two positions are padding
    loss = TrainingLoss()
    assert loss(logits, padded) == pytest.approx(float(loss(logits[:, :4], targets[:, :4])), rel=1e-6)
    total, correct, count = eval_sums(logits, padded).tolist()
    want = eval_sums(logits[:, :4], targets[:, :4]).tolist()
    assert count == 16 and [total, correct, count] == pytest.approx(want)
    # classification is the same function with no token axis
    assert float(loss(logits[:, 0], targets[:, 0])) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits[:, 0], targets[:, 0])))
