"""The loss a run trains on, and what an evaluation counts, for classification and sequences.

- classification: logits (N, C) against labels (N,); the loss is the mean over examples;
- sequences: per-token logits (N, T, V) against targets (N, T); the loss is the mean over the
  micro-batch's tokens (targets equal to `ignore_index` count for nothing, as in
  `torch.nn.functional.cross_entropy`), accuracy is per token.

One definition serves both (the token axes are flattened into the batch axis), so the step, the
probes, evaluation and `bigbatch measure` train and measure the same function. The batch stays
in examples (sequences): the global batch, B_simple, B_crit and E_min are counted in sequences, and
in tokens as sequences x T (`tokens_per_example`). The noise scale is that of the token-averaged
loss: its per-example gradient is the gradient of one sequence's mean token loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # torch's default: no target is ignored unless a dataset uses it


class TrainingLoss(nn.Module):
    """Cross-entropy over the last axis, averaged over every other (examples, or examples x tokens)."""

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.label_smoothing, self.ignore_index = label_smoothing, ignore_index

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), label_smoothing=self.label_smoothing,
                               ignore_index=self.ignore_index)


def eval_sums(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """[summed cross-entropy, correct predictions, count] in float64 on the device (no host sync):
    per example for classification, per token not ignored for sequences. Plain cross-entropy (no
    label smoothing)."""
    out, y = logits.float().flatten(0, -2), targets.flatten()
    kept = y != ignore_index
    return torch.stack([F.cross_entropy(out, y, reduction="sum", ignore_index=ignore_index).double(),
                        ((out.argmax(-1) == y) & kept).sum().double(), kept.sum().double()])


def example_losses(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Plain cross-entropy per example in float64 (N,): a sequence's is the mean over its kept
    tokens, as `eval_sums` counts them."""
    out, y = logits.float().flatten(0, -2), targets.flatten()
    loss = F.cross_entropy(out, y, reduction="none", ignore_index=ignore_index).view(len(targets), -1)
    kept = (y != ignore_index).view(len(targets), -1).sum(1).clamp(min=1)
    return loss.sum(1).double() / kept


def tokens_per_example(target_shape: tuple[int, ...]) -> int:
    """Targets per example: 1 for classification, T for a sequence of T targets."""
    return math.prod(target_shape) if target_shape else 1
