"""The example stream: which examples each step trains on, and which of them each rank takes.

One stream of examples, the concatenation of per-epoch permutations, each drawn from a generator
seeded by (seed, epoch) only (`ExampleStream`; its position is what a checkpoint records). A step
at global batch B takes the next B indices; rank r takes the r-th contiguous slice of them and
splits it into accumulation micro-batches (`shard`). So for one seed and global batch the examples
of every step are the same on 1, 2 or 4 ranks and with any accumulation.
"""

from __future__ import annotations

import torch


class ExampleStream:
    """Global example indices for each step; depends only on (seed, epoch) and the position.

    `position` is the number of examples consumed so far: the checkpointed sampler state.
    """

    def __init__(self, num_examples: int, seed: int, position: int = 0):
        self.n = num_examples
        self.seed = seed
        self.position = position
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def take(self, global_batch: int) -> torch.Tensor:
        """The next `global_batch` global indices (may straddle an epoch boundary)."""
        epoch, offset = divmod(self.position, self.n)
        if offset + global_batch <= self.n:  # within one epoch: a view of its permutation
            self.position += global_batch
            perm = self._perm if epoch == self._epoch else self.permutation(epoch)
            return perm[offset: offset + global_batch]
        parts, need, pos = [], global_batch, self.position
        while need > 0:
            epoch, offset = divmod(pos, self.n)
            chunk = self.permutation(epoch)[offset: offset + need]
            parts.append(chunk)
            need -= len(chunk)
            pos += len(chunk)
        self.position = pos
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def epoch(self) -> float:
        return self.position / self.n


def shard(indices: torch.Tensor, rank: int, world_size: int, accum_steps: int) -> list[torch.Tensor]:
    """This rank's micro-batches of one global batch: contiguous slice, split `accum_steps` ways."""
    if world_size == 1 and accum_steps == 1:
        return [indices]
    per_rank = len(indices) // world_size
    mine = indices[rank * per_rank: (rank + 1) * per_rank]
    return list(mine.chunk(accum_steps)) if accum_steps > 1 else [mine]


def eval_shard(n: int, rank: int, world_size: int) -> range:
    """Contiguous shard of an evaluation set (sums are all-reduced, so uneven shards are fine)."""
    per = -(-n // world_size)
    return range(rank * per, min((rank + 1) * per, n))
