"""A user's dataset: `data.name = "package.module:function"`, called as `function(**data.kwargs)`.

The function returns `(train, test)`, each either
- a pair `(x, y)` of tensors or numpy arrays (x[i] one example, y[i] its integer class, or for a
  sequence task y[i] its T integer targets: y of shape (N, T), e.g. the next token at each
  position, with the model returning logits (N, T, V)), or a `torch.utils.data.TensorDataset` of
  two tensors: held in memory, a batch is one index operation;
- a map-style dataset (`__len__`, `__getitem__(i) -> (x, y)`): loaded through a DataLoader with
  `data.num_workers` workers, like an image folder.

Either way the batches come from bigbatch's example stream, so the data order, the sharding over
ranks, the global-batch semantics and exact resume are the same as for the built-in datasets.

The number of classes is `train.classes` (its length) or `train.num_classes` when the dataset has
one, else the largest label (or target token) + 1 (read from `train.targets`, the label tensor,
or, for other map-style datasets, one pass over the training set's labels).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from bigbatch import entrypoints
from bigbatch.errors import ConfigError

KEY = "data.name"


class InMemory(NamedTuple):
    """A split held as tensors: x[i] one example, y[i] its class (int64)."""

    x: torch.Tensor
    y: torch.Tensor


def _tensor(v: Any, what: str, name: str) -> torch.Tensor:
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(v)
    if not isinstance(v, torch.Tensor):
        raise ConfigError(KEY, f"{name!r}: {what} is a {type(v).__name__}, expected a tensor or numpy array")
    return v


def _as_split(obj: Any, split: str, name: str):
    """(x float32 if floating, y int64) tensors, or the map-style dataset itself (checked)."""
    if isinstance(obj, torch.utils.data.TensorDataset):
        if len(obj.tensors) != 2:
            raise ConfigError(KEY, f"{name!r}: the {split} TensorDataset has {len(obj.tensors)} tensors, expected (x, y)")
        obj = obj.tensors
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], (torch.Tensor, np.ndarray)):
        x, y = _tensor(obj[0], f"{split} x", name), _tensor(obj[1], f"{split} y", name)
        if x.is_floating_point():
            x = x.float()
        if y.dim() not in (1, 2) or y.is_floating_point() or len(y) != len(x) or len(y) == 0:
            raise ConfigError(KEY, f"{name!r}: {split} y must be a non-empty integer tensor as long as x, 1-D (a class "
                                   f"per example) or 2-D (a target per token); got shape {tuple(y.shape)}, dtype "
                                   f"{y.dtype}, x shape {tuple(x.shape)}")
        return InMemory(x, y.long())
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        if len(obj) == 0:
            raise ConfigError(KEY, f"{name!r}: the {split} dataset is empty")
        item = obj[0]
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(KEY, f"{name!r}: {split}[0] is a {type(item).__name__}, expected an (x, y) pair")
        return obj
    raise ConfigError(KEY, f"{name!r}: {split} is a {type(obj).__name__}, expected a map-style dataset or (x, y) tensors")


def _in_memory(split) -> bool:
    return isinstance(split, InMemory)


def _num_classes(train, test) -> int:
    for attr in ("classes", "num_classes"):
        v = getattr(train, attr, None)
        if v is not None:
            return len(v) if attr == "classes" else int(v)
    if _in_memory(train):
        labels = [train[1]] + ([test[1]] if _in_memory(test) else [])
    elif getattr(train, "targets", None) is not None:
        labels = [torch.as_tensor(train.targets)]
    else:
        labels = [torch.as_tensor(train[i][1]).max() for i in range(len(train))]
    return int(max(int(t.max()) for t in labels)) + 1


def load_entry_point(cfg) -> tuple[Any, Any, int, tuple[int, ...]]:
    """(train, test, num_classes, input_shape) of data.name = "package.module:function"; each split
    is an `InMemory` (x, y) tensor pair or a map-style dataset. ConfigError naming data.name
    when the function returns anything else."""
    fn = entrypoints.resolve(cfg.name, KEY)
    entrypoints.check_call(fn, (), cfg.kwargs, cfg.name, "data.kwargs")
    out = fn(**cfg.kwargs)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ConfigError(KEY, f"{cfg.name!r} returned a {type(out).__name__}, expected (train, test)")
    train, test = (_as_split(o, s, cfg.name) for o, s in zip(out, ("train", "test")))
    x0 = train[0][0] if _in_memory(train) else _tensor(train[0][0], "train[0] x", cfg.name)
    return train, test, _num_classes(train, test), tuple(x0.shape)
