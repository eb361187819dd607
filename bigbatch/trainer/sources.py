"""The training data source: one interface over in-memory tensors, image folders and DALI, so the
loop does not branch per micro-batch.

    source = make_source(cfg, env, bundle, stream, per_device)
    for x, y, n in source.micro_batches(step, global_batch, accum):   # this rank's micro-batches
        ...

Every source takes the step's `global_batch` examples from the seeded example stream and shards
them over ranks and micro-batches (`bigbatch.trainer.data.shard`), so the stream's position (what
a checkpoint records) is the same whichever source reads the examples:
- tensors: the examples are indexed directly;
- image folders: a DataLoader fed by a copy of the stream (rebuilt when the batch changes);
- DALI (data.backend = "dali"): DALI shards and shuffles by itself, with a fixed per-device batch.
"""

from __future__ import annotations

from typing import Iterator

import torch

from bigbatch.config import Config
from bigbatch.distributed.env import DistEnv
from bigbatch.trainer.dali import build_dali_loader
from bigbatch.trainer.data import DataBundle, ExampleStream, FolderBatches, shard, tensor_batch

Batch = tuple[torch.Tensor, torch.Tensor, int]  # inputs, labels, examples of the stream they stand for


class TensorSource:
    """In-memory datasets: index the stream's examples directly."""

    def __init__(self, bundle: DataBundle, stream: ExampleStream, env: DistEnv):
        self.data, self.stream, self.env = bundle.train, stream, env

    def _shards(self, global_batch: int, accum: int) -> list[torch.Tensor]:
        return shard(self.stream.take(global_batch), self.env.rank, self.env.world_size, accum)

    def _load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tensor_batch(self.data, idx, self.env.device, train=True)

    def micro_batches(self, step: int, global_batch: int, accum: int) -> Iterator[Batch]:
        for idx in self._shards(global_batch, accum):
            x, y = self._load(idx)
            if x.dim() == 4 and self.env.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y, len(idx)


class FolderSource(TensorSource):
    """Image folders: a DataLoader whose sampler follows a copy of the stream, loading ahead in
    worker processes; rebuilt when the global batch changes."""

    def __init__(self, bundle: DataBundle, stream: ExampleStream, env: DistEnv, num_workers: int):
        super().__init__(bundle, stream, env)
        self.folder = FolderBatches(bundle.train, num_workers, env.device.type == "cuda")
        self.loader_batch: int | None = None

    def micro_batches(self, step: int, global_batch: int, accum: int) -> Iterator[Batch]:
        if global_batch != self.loader_batch:
            self.folder.restart(self.stream, lambda s, b=global_batch: b, step, self.env.rank, self.env.world_size,
                                lambda s, a=accum: a)
            self.loader_batch = global_batch
        return super().micro_batches(step, global_batch, accum)

    def _load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.folder.next(self.env.device)


class DaliSource(TensorSource):
    """NVIDIA DALI: endless micro-batches of this rank's DALI shard, epoch after epoch."""

    def __init__(self, cfg: Config, bundle: DataBundle, stream: ExampleStream, env: DistEnv, per_device: int):
        super().__init__(bundle, stream, env)
        self.batches = _dali_batches(cfg, env, per_device)

    def _load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self.batches)


def _dali_batches(cfg: Config, env: DistEnv, per_device: int):
    """The DALI pipeline is built at the first micro-batch, then read epoch after epoch."""
    loader = build_dali_loader(cfg.data.root, cfg.data.image_size, per_device, env.rank, env.world_size,
                               cfg.train.seed, train=True, num_threads=max(cfg.data.num_workers, 1))
    while True:
        yield from loader


def make_source(cfg: Config, env: DistEnv, bundle: DataBundle, stream: ExampleStream, per_device: int) -> TensorSource:
    if cfg.data.backend == "dali":
        return DaliSource(cfg, bundle, stream, env, per_device)
    if not bundle.in_memory:
        return FolderSource(bundle, stream, env, cfg.data.num_workers)
    return TensorSource(bundle, stream, env)
