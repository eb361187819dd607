"""Evaluation: test and train loss/accuracy, every rank on its shard, sums all-reduced; the target."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from bigbatch.config import DataConfig, TargetConfig
from bigbatch.distributed.env import DistEnv
from bigbatch.trainer.data import DataBundle, eval_batch_counts, eval_batches
from bigbatch.trainer.objective import IGNORE_INDEX, eval_sums


def reached_target(t: TargetConfig, metrics: dict[str, float], within: float = 0.0) -> bool:
    """The target met (within = 0), or nearly: accuracy within `within` of it, loss within that fraction."""
    if t.test_acc is not None and metrics["test_acc"] >= t.test_acc - within:
        return True
    if t.train_acc is not None and metrics["train_acc"] >= t.train_acc - within:
        return True
    return t.test_loss is not None and metrics["test_loss"] <= t.test_loss * (1 + within)


@torch.no_grad()
def evaluate(model: nn.Module, bundle: DataBundle, env: DistEnv, data_cfg: DataConfig, batch_size: int = 1024,
             limit: int = 0, ignore_index: int = IGNORE_INDEX, stop=None) -> dict[str, float] | None:
    """Test loss/accuracy and train loss/accuracy (on a fixed training subset).

    Every rank evaluates its shard; the sums are all-reduced. Plain cross-entropy (no label
    smoothing), BatchNorm in eval mode; per token for sequences (`bigbatch.trainer.objective`).
    limit > 0: only the first `limit` examples of each set.
    With `stop` (a `bigbatch.trainer.stop.StopCheck`): None when the ranks agreed to stop during
    the evaluation (checked after the batches every rank has, so all ranks abandon it at the same
    batch; the evaluator redoes it after the resume).
    """
    model.eval()
    sums = []
    train_limit = data_cfg.train_eval_samples
    if limit:
        train_limit = min(train_limit, limit) if train_limit else limit
    checked = 0  # batches every rank has had so far: the stop check's count
    for data, limit in ((bundle.test, limit), (bundle.train, train_limit)):
        total = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, correct, count
        common = min(eval_batch_counts(min(limit, len(data)) if limit else len(data), env.world_size, batch_size))
        for i, (x, y) in enumerate(eval_batches(data, env.rank, env.world_size, batch_size, env.device, limit,
                                                data_cfg.num_workers)):
            if x.dim() == 4 and env.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            total += eval_sums(model(x), y, ignore_index)
            if stop is not None and i < common:
                checked += 1
                if stop.during_evaluation(checked):
                    model.train()
                    return None
        sums.append(total)
    t = torch.stack(sums)
    if env.initialized:
        dist.all_reduce(t)
    t = t.cpu()
    model.train()
    return {
        "test_loss": (t[0, 0] / t[0, 2]).item(), "test_acc": (t[0, 1] / t[0, 2]).item(),
        "train_loss": (t[1, 0] / t[1, 2]).item(), "train_acc": (t[1, 1] / t[1, 2]).item(),
    }
