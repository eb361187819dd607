"""Everything about a config that can be checked before a process or a folder exists.

`check(cfg, world_size, local_world_size)` is called with the world that is about to be started
by every entry point: `bigbatch train` (in the process, and by `--nproc N` before torchrun),
each trial of `bigbatch sweep`, and `bigbatch slurm render/submit` (nodes x processes per node).
It raises ConfigError naming the field; the CLI turns that into one line and exit code 2.

What it covers: the batch for that world (global batch and every batch phase divisible by
world size x accum_steps), the all-reduce topology (dist.torus_rows, dist.local_size), the
online measurements and the adaptive batch (measure.*, batch.adaptive), the schedule against
the training length where the dataset size is known without loading it, and paths
(check_paths=False where the files live on another machine, e.g. a SLURM cluster).
"""

from __future__ import annotations

from bigbatch.config import Config
from bigbatch.errors import ConfigError
from bigbatch.distributed.hooks import check_topology
from bigbatch.trainer import batching, probes
from bigbatch.trainer.data import train_size_hint
from bigbatch.trainer.recipe import Schedule


def check(cfg: Config, world_size: int, local_world_size: int | None = None, *, check_paths: bool = True) -> None:
    """ConfigError for anything in `cfg` that cannot work on `world_size` ranks
    (`local_world_size` per node, default all on one node)."""
    cfg.validate(world_size, check_paths)
    if cfg.checkpoint.keep < 1:  # (config/sections.py is at its 400-line limit)
        raise ConfigError("checkpoint.keep", f"must be >= 1, got {cfg.checkpoint.keep}")
    batching.validate(cfg, world_size)
    if cfg.dist.allreduce != "builtin":
        check_topology(cfg.dist, world_size, local_world_size or world_size)
    probes.validate(cfg, world_size)
    batching.validate_adaptive(cfg, world_size)
    if (n := train_size_hint(cfg.data, exact=True)) is not None:
        Schedule(cfg, n)  # warmup longer than training, batch phases past the end, ...
