"""The training data source: one interface over in-memory tensors, image folders and DALI, so the
loop does not branch per micro-batch.

    source = make_source(cfg, env, bundle, stream, per_device)
    for x, y, n in source.micro_batches(step, global_batch, accum):   # this rank's micro-batches
        ...

Every source takes the step's `global_batch` examples from the seeded example stream and shards
them over ranks and micro-batches (`bigbatch.trainer.data.shard`), so the stream's position (what
a checkpoint records) is the same whichever source reads the examples:
- tensors: the examples are indexed directly;
- image folders (and map-style "module:function" datasets): a DataLoader fed by a copy of the
  stream (rebuilt when the batch changes);
- DALI (data.backend = "dali"): the same, with a DALI pipeline in place of the DataLoader
  (`bigbatch.trainer.dali.DaliBatches`: fed the stream's files through a parallel fn.external_source).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from bigbatch.config import Config
from bigbatch.distributed.env import DistEnv
from bigbatch.trainer.dali import DaliBatches
from bigbatch.trainer.data import DataBundle, FolderBatches, TensorData, tensor_batch
from bigbatch.trainer.stream import ExampleStream, shard

Batch = tuple[torch.Tensor, torch.Tensor, int]  # inputs, labels, examples of the stream they stand for


class TensorSource:
    """In-memory datasets: index the stream's examples directly."""

    def __init__(self, bundle: DataBundle, stream: ExampleStream, env: DistEnv):
        self.data, self.stream, self.env = bundle.train, stream, env
        d = self.data
        # the common case, decided once: the tensors are on the device and nothing is applied per
        # batch, so a micro-batch is two index_selects (`tensor_batch` would do the same, with more
        # Python per step: a generator, a copy check, two None checks)
        self._plain = (isinstance(d, TensorData) and d.augment is None and d.normalize is None
                       and d.x.device == env.device and d.y.device == env.device
                       and not (d.x.dim() == 4 and env.device.type == "cuda"))

    def _shards(self, global_batch: int, accum: int) -> list[torch.Tensor]:
        return shard(self.stream.take(global_batch), self.env.rank, self.env.world_size, accum)

    def _load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tensor_batch(self.data, idx, self.env.device, train=True)

    def micro_batches(self, step: int, global_batch: int, accum: int) -> Iterable[Batch]:
        if self._plain and accum == 1:
            idx = shard(self.stream.take(global_batch), self.env.rank, self.env.world_size, 1)[0]
            return ((self.data.x.index_select(0, idx), self.data.y.index_select(0, idx), len(idx)),)
        return self._each(global_batch, accum)

    def _each(self, global_batch: int, accum: int) -> Iterator[Batch]:
        for idx in self._shards(global_batch, accum):
            x, y = self._load(idx)
            if x.dim() == 4 and self.env.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y, len(idx)


class FolderSource(TensorSource):
    """Image folders: a DataLoader (or a DALI pipeline) whose sampler follows a copy of the stream,
    loading ahead in worker processes (DALI threads); rebuilt when the global batch changes."""

    def __init__(self, bundle: DataBundle, stream: ExampleStream, env: DistEnv, folder: FolderBatches | DaliBatches):
        super().__init__(bundle, stream, env)
        self.folder = folder
        self.loader_batch: int | None = None

    def micro_batches(self, step: int, global_batch: int, accum: int) -> Iterator[Batch]:
        if global_batch != self.loader_batch:
            self.folder.restart(self.stream, lambda s, b=global_batch: b, step, self.env.rank, self.env.world_size,
                                lambda s, a=accum: a)
            self.loader_batch = global_batch
        return self._each(global_batch, accum)  # from the loader, whatever the tensors

    def _load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.folder.next(self.env.device)


def make_source(cfg: Config, env: DistEnv, bundle: DataBundle, stream: ExampleStream, per_device: int) -> TensorSource:
    if cfg.data.backend == "dali":
        # data.num_workers decoding threads; one feed process reads the files ahead (none when
        # num_workers = 0, which means "all in this process" for the torch backend too)
        dali = DaliBatches(bundle.train.samples, cfg.data.image_size, cfg.data.augment, cfg.train.seed, env.device,
                           num_threads=cfg.data.num_workers, feed_workers=min(cfg.data.num_workers, 1))
        return FolderSource(bundle, stream, env, dali)
    if not bundle.in_memory:
        return FolderSource(bundle, stream, env, FolderBatches(bundle.train, cfg.data.num_workers, env.device.type == "cuda"))
    return TensorSource(bundle, stream, env)
