"""Two real gloo ranks agree to stop at the same step when only one got the signal, within the
configured time, and abandon an evaluation together at the same batch (then still agree on the
next collective: nothing is left pending)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bigbatch import config as config_mod
from bigbatch.distributed import env as dist_env
from bigbatch.trainer import stop
from bigbatch.trainer.data import DataBundle, TensorData
from bigbatch.trainer.evaluate import evaluate

MLP = str(Path(__file__).resolve().parents[2] / "configs" / "mnist1d-mlp.toml")
SIGNAL_AT = 30


def _gather(value):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _stop_in_training(step_s: float, within_s: float):
    """Steps of `step_s` seconds; rank 1 alone is signalled after step SIGNAL_AT."""
    env = dist_env.init()
    t_signal, stopped = None, None
    with stop.StopCheck(env, within_s) as check:
        for step in range(1, 100_000):
            time.sleep(step_s)
            if step == SIGNAL_AT and env.rank == 1:
                os.kill(os.getpid(), signal.SIGTERM)
                t_signal = time.monotonic()
            if check.requested(step):
                stopped = step
                break
    waited = time.monotonic() - t_signal if t_signal is not None else None
    return _gather((stopped, waited))


def test_ranks_stop_at_the_same_step_within_the_budget():
    got = dist_env.spawn_local(2, _stop_in_training, 0.01, 0.3, backend="gloo", timeout_s=60)
    (step0, _), (step1, waited) = got
    assert step0 == step1 > SIGNAL_AT, got
    assert waited < 0.3 + 0.2, got  # the budget, plus one check's own time on 2 busy cores


def _evaluation(signal_rank: int | None):
    env = dist_env.init()
    cfg = config_mod.load(MLP, ["data.train_eval_samples=0"])
    g = torch.Generator().manual_seed(0)
    data = TensorData(torch.randn(3000, 40, generator=g), torch.randint(0, 10, (3000,), generator=g))
    bundle = DataBundle(data, data, 10, (40,), "synthetic")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    with stop.StopCheck(env, within_s=10.0) as check:
        if env.rank == signal_rank:
            os.kill(os.getpid(), signal.SIGUSR2)
        result = evaluate(model, bundle, env, cfg, batch_size=50, stop=check)
        agreed = check.agreed
    after = torch.ones(1)
    dist.all_reduce(after)  # the ranks are still in step: no collective was left behind
    return _gather((result, agreed, after.item()))


def test_an_evaluation_is_abandoned_by_every_rank_together():
    got = dist_env.spawn_local(2, _evaluation, 1, backend="gloo", timeout_s=60)
    assert got == [(None, True, 2.0), (None, True, 2.0)]
    whole = dist_env.spawn_local(2, _evaluation, None, backend="gloo", timeout_s=60)
    assert whole[0] == whole[1] and whole[0][0] is not None and whole[0][1] is False
    assert 0.0 <= whole[0][0]["test_acc"] <= 1.0
