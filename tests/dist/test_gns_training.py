"""B_simple measured while training the MNIST-1D MLP (McCandlish et al. 2018, section 3).

- The 2-rank DDP estimate (each rank's micro-batch = small batch, via per-parameter gradient hooks) and the 1-process
  estimate (micro-batches of accumulation = small batches) agree within a factor of 1.5 over the
  run; both trainings see the same examples in the same order.
- B_simple grows as the loss falls.
- The tail-index and sharpness probes log noise/alpha and sharpness/top.
- batch.adaptive = "gns" doubles the batch while B_simple exceeds it, rescales the lr with the
  batch (linear rule), logs both, and reaches the target accuracy.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median

import pytest

from bigbatch import config
from bigbatch.trainer.loop import run

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mnist1d-mlp.toml"
COMMON = ["data.num_samples=4000", "data.train_eval_samples=1000", "train.steps=300", "train.eval_every=0",
          "train.log_every=20", "track.progress=off", "measure.gns=true", "batch.global_batch=128", "train.amp=off"]


def rows(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gns")
    # the probes ride along in the 1-process run: they must not change its training (RNG and
    # BatchNorm buffers restored), so the two runs still see identical weights
    probes = ["measure.tail_every=100", "measure.sharpness=true", "measure.sharpness_samples=256", "train.eval_every=150"]
    cfg = config.load(CONFIG, COMMON + ["batch.accum_steps=2"] + probes)
    run(cfg, root / "accum")
    all_rows = [json.loads(line) for line in (root / "accum" / "metrics.jsonl").read_text().splitlines()]
    alphas = [r["noise/alpha"] for r in all_rows if "noise/alpha" in r]
    sharp = [r["sharpness/top"] for r in all_rows if "sharpness/top" in r]
    assert len(alphas) == 3 and all(0.5 < a < 3.0 for a in alphas)
    assert len(sharp) == 2 and all(s > 0 for s in sharp)
    sets = [a for s in COMMON for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bigbatch", "train", str(CONFIG), "--nproc", "2", "--out", str(root / "ddp"),
                           *sets], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return rows(root / "accum"), rows(root / "ddp")


def test_two_rank_ddp_and_one_process_accumulation_agree_within_1_5x(two_runs):
    accum, ddp = two_runs
    assert [r["step"] for r in accum] == [r["step"] for r in ddp] and len(accum) == 15
    for a, d in zip(accum, ddp):
        ratio = a["gns/b_simple"] / d["gns/b_simple"]
        assert 1 / 1.5 <= ratio <= 1.5, (a["step"], a["gns/b_simple"], d["gns/b_simple"])
        assert a["gns/grad_sq"] > 0 and a["gns/trace_sigma"] > 0


def test_b_simple_grows_as_the_loss_falls(two_runs):
    for r in two_runs:
        early, late = r[1:7], r[-6:]  # skip the first row: the EMA has only a few steps in it
        assert median(x["loss"] for x in late) < 0.8 * median(x["loss"] for x in early)
        assert median(x["gns/b_simple"] for x in late) > 2 * median(x["gns/b_simple"] for x in early)


def test_adaptive_batch_grows_rescales_the_lr_and_reaches_the_target(tmp_path):
    cfg = config.load(CONFIG, [
        "data.num_samples=10000", "data.train_eval_samples=1000", "train.epochs=10", "train.eval_every=50",
        "train.log_every=10", "track.progress=off", "train.stop_at_target=true", "target.test_acc=0.6",
        "schedule.name=constant", "measure.gns=true", "batch.accum_steps=2", "batch.global_batch=32",
        "batch.adaptive=gns", "batch.max=1024", "batch.adapt_every=20",
    ])
    summary = run(cfg, tmp_path / "adaptive")
    assert summary["status"] == "target_reached" and summary["test_acc"] >= 0.6
    assert summary["global_batch"] >= 256  # the batch it ended at, not the one it started with
    log = rows(tmp_path / "adaptive")
    batches = [r["global_batch"] for r in log]
    assert batches[0] == 32 and max(batches) >= 256
    assert batches == sorted(batches) and all(b & (b - 1) == 0 for b in batches)
    for r in log:  # linear rule: lr 0.1 per 128 examples (constant schedule)
        assert r["lr"] == pytest.approx(0.1 * r["global_batch"] / 128)
    changes = [line for line in (tmp_path / "adaptive" / "train.log").read_text().splitlines() if "batch.adaptive" in line]
    assert len(changes) == len(set(batches)) - 1


def test_gns_emas_and_the_adaptive_batch_survive_a_resume(tmp_path):
    sets = ["data.num_samples=4000", "data.train_eval_samples=500", "train.eval_every=0", "train.log_every=10",
            "track.progress=off", "schedule.name=constant", "measure.gns=true", "batch.accum_steps=2",
            "batch.global_batch=32", "batch.adaptive=gns", "batch.max=512", "batch.adapt_every=10"]
    run(config.load(CONFIG, sets + ["train.steps=60"]), tmp_path / "straight")
    run(config.load(CONFIG, sets + ["train.steps=30"]), tmp_path / "resumed")
    run(config.load(CONFIG, sets + ["train.steps=60"]), tmp_path / "resumed", resume=True)
    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    assert max(r["global_batch"] for r in straight) > 32
    for a, b in zip(straight, resumed):
        assert a["global_batch"] == b["global_batch"]
        assert a["gns/b_simple"] == pytest.approx(b["gns/b_simple"], rel=1e-4)


def test_two_rank_gns_continues_exactly_across_a_resume(tmp_path):
    """Under DDP each rank keeps EMAs of its own local norm and the average is taken when read;
    a checkpoint stores that average (a collective on every rank) and every rank resumes from it."""
    sets = [a for s in COMMON[:-1] + ["train.log_every=5", "schedule.name=constant"] for a in ("--set", s)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(steps, *args):
        done = subprocess.run([sys.executable, "-m", "bigbatch", "train", *args, "--nproc", "2", *sets,
                               "--set", f"train.steps={steps}"], env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]

    train(40, str(CONFIG), "--out", str(tmp_path / "straight"))
    train(20, str(CONFIG), "--out", str(tmp_path / "resumed"))
    train(40, "--resume", str(tmp_path / "resumed"))
    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(5, 45, 5))
    for a, b in zip(straight, resumed):
        assert a["loss"] == b["loss"]
        # the loss is bitwise equal; the tap's fp32 bucket norms are not: DDP rebuilds its buckets
        # (gradient-ready order) after the first step of each process, so the first step after a
        # resume sums its norm in another order (~1e-7, amplified by |small - big|; the EMA decays it)
        assert a["gns/b_simple"] == pytest.approx(b["gns/b_simple"], rel=1e-5)
