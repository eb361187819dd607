"""The built-in tiny GPT on the standard-library corpus (issue 31, Done when 1): the same per-step
losses on 1 and 2 gloo ranks (within 1e-4), and an exact resume after SIGTERM. Tiny: 2 layers,
width 32, context 32, a 40 kB corpus; AdamW with the batch-coupled beta2 and weight decay on."""

from __future__ import annotations

from _helpers import ROOT, assert_same_run, bigbatch, preempt_at, read_jsonl, step_losses
from bigbatch import config
from bigbatch.trainer.loop import run

MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")
SETS = ["data.name='pysrc'", "data.kwargs={context=32, max_bytes=40000}", "data.test_fraction=0.1",
        "model.name='gpt'", "model.kwargs={layers=2, width=32, heads=2}", "batch.global_batch=16",
        "optim.name='adamw'", "optim.base_lr=0.003", "optim.base_batch=16", "optim.scaling='sqrt'",
        "optim.beta2_scaling='tokens'", "optim.timescale=50.0", "schedule.name='cosine'",
        "schedule.warmup_steps=4", "schedule.warmup_start=0", "train.steps=20", "train.log_every=1",
        "train.eval_every=10", "data.train_eval_samples=256", "train.amp='off'", "track.progress='off'"]


def test_tiny_gpt_gives_the_same_losses_on_1_and_2_ranks(tmp_path):
    run(config.load(MLP, SETS), tmp_path / "one")
    p = bigbatch("train", MLP, "--nproc", "2", "--out", str(tmp_path / "two"), *[a for s in SETS for a in ("--set", s)],
                 env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 21))
    assert max(abs(one[s] - two[s]) for s in one) < 1e-4
    assert one[20] < one[1] - 1.0  # from ln 256 = 5.55 per byte
    last = [r for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "loss" in r][-1]
    assert last["tokens"] == 20 * 16 * 32


def test_tiny_gpt_resumes_exactly_after_sigterm(tmp_path):
    first = run(config.load(MLP, SETS), tmp_path / "cut", reporter=preempt_at(7))
    assert first["status"] == "preempted" and first["steps"] == 7
    resumed = run(config.load(tmp_path / "cut" / "config.toml"), tmp_path / "cut", resume=True)
    whole = run(config.load(MLP, SETS), tmp_path / "whole")
    assert resumed["steps"] == whole["steps"] == 20
    assert resumed["test_loss"] == whole["test_loss"]
    assert_same_run(tmp_path / "cut", tmp_path / "whole")
