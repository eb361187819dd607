"""Two real gloo ranks agree to stop at the same step when only one got the signal, within the
configured time, and abandon an evaluation together at the same batch (then still agree on the
next collective: nothing is left pending)."""

from __future__ import annotations

import json
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
        result = evaluate(model, bundle, env, cfg.data, batch_size=50, stop=check)
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


STOPLAB = '''
import os
import signal
from pathlib import Path

import torch


class Pairs(torch.utils.data.Dataset):
    def __init__(self, x, y, marker=None):
        self.x, self.y, self.marker = x, y, marker

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if self.marker is not None and i == 5 and not Path(self.marker).exists():
            Path(self.marker).touch()  # once: SLURM's SIGTERM while the first evaluation runs
            os.kill(os.getpid(), signal.SIGTERM)
        return self.x[i], int(self.y[i])


def make_data(marker="", n=800, features=12, classes=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    return Pairs(x[:600], y[:600]), Pairs(x[600:], y[600:], marker or None)
'''


def test_a_stop_during_an_evaluation_is_redone_after_the_resume_and_the_run_ends_as_if_uninterrupted(tmp_path):
    """One process, SIGTERM inside the evaluation of step 20: checkpoint at 20 (exit 3), the resumed
    run evaluates step 20 first; every metrics row and the summary equal an uninterrupted run's."""
    from _helpers import bigbatch, read_jsonl

    (tmp_path / "src" / "stoplab").mkdir(parents=True)
    (tmp_path / "src" / "stoplab" / "__init__.py").write_text("")
    (tmp_path / "src" / "stoplab" / "data.py").write_text(STOPLAB)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "src"), os.environ.get("PYTHONPATH", "")])}

    def run(name: str, *extra: str):
        sets = ["data.name='stoplab.data:make_data'", f"data.kwargs={{marker='{tmp_path / name}.marker'}}",
                "data.num_workers=0", "model.hidden=16", "batch.global_batch=32", "train.steps=40",
                "train.eval_every=20", "train.log_every=5", "train.amp='off'", "track.progress='off'"]
        return bigbatch("train", MLP, "--out", str(tmp_path / name), *[a for s in sets for a in ("--set", s)], *extra,
                        env=env, timeout=300)

    (tmp_path / "whole.marker").touch()  # never signalled
    whole = run("whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = run("cut")
    assert cut.returncode == 3, cut.stderr[-3000:]
    assert "checkpointed at step 20" in cut.stderr, cut.stderr[-3000:]
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert saved["progress"]["step"] == 20 and saved["evaluator"]["pending"] is True
    resumed = bigbatch("train", "--resume", str(tmp_path / "cut"), env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    def measured(name: str) -> list[dict]:  # every row without its timings
        return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in ("samples_per_s", "mfu")}
                for r in read_jsonl(tmp_path / name / "metrics.jsonl")]

    assert measured("cut") == measured("whole")
    assert [r["step"] for r in measured("cut") if "test_loss" in r] == [20, 40]
    a, b = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("cut", "whole"))
    assert {k: a[k] for k in ("test_loss", "test_acc", "train_loss", "steps")} == \
           {k: b[k] for k in ("test_loss", "test_acc", "train_loss", "steps")}
