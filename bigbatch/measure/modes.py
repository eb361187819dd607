"""Measuring on the loss that is trained: BatchNorm mode, micro-batch losses, state restored.

SGD follows the gradient of the training loss: BatchNorm normalises each micro-batch of the
training micro-batch size b by that micro-batch's own statistics (train mode), and the loss
function is the training one (label smoothing as trained). A gradient measured in eval mode
(running statistics) is the gradient of a different function, so every measurement here runs
in train mode unless eval mode is asked for by name, and says which mode it used.

A measurement must not disturb training: `measuring` restores the module's mode, its buffers
(BatchNorm running statistics, which every train-mode forward updates) and the RNG (dropout,
augmentation) when it ends.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

MODES = ("train", "eval")


def has_batch_norm(model: nn.Module) -> bool:
    """True when a layer's output depends on the other examples of its batch (BatchNorm, SyncBN)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextlib.contextmanager
def measuring(model: nn.Module, mode: str = "train") -> Iterator[nn.Module]:
    """Put `model` in `mode` ("train": batch statistics; "eval": running statistics) for a
    measurement; on exit restore its mode, every buffer and the CPU/CUDA RNG state."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    was_training = model.training
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        model.train(mode == "train")
        try:
            yield model
        finally:
            model.train(was_training)
            with torch.no_grad():
                for buf, value in saved:
                    buf.copy_(value)


def micro_batch_loss(model: Callable[[torch.Tensor], torch.Tensor], loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, micro_batch: int | None = None) -> torch.Tensor:
    """The mean of loss_fn over consecutive micro-batches of `micro_batch` examples of (x, y).

    In train mode each micro-batch is normalised by its own statistics, as in training (a
    "ghost batch"): the expected value is the training loss at micro-batch b, whatever the size
    of (x, y). Trailing examples that do not fill a micro-batch are dropped. None: one batch.
    """
    n = x.shape[0]
    if micro_batch is None or micro_batch >= n:
        return loss_fn(model(x), y)
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    chunks = n // micro_batch
    total = sum(loss_fn(model(x[i * micro_batch:(i + 1) * micro_batch]), y[i * micro_batch:(i + 1) * micro_batch])
                for i in range(chunks))
    return total / chunks
