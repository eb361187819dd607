"""Everything about a config that can be checked before a process or a folder exists.

`check(cfg, world_size, local_world_size)` is called with the world that is about to be started
by every entry point: `bigbatch train` (in the process, and by `--nproc N` before torchrun),
each trial of `bigbatch sweep`, and `bigbatch slurm render/submit` (nodes x processes per node).
It raises ConfigError naming the field; the CLI turns that into one line and exit code 2.

The checks themselves belong to the config's sections (`Config.validate`: each section's
`check(world)` — the batch and every batch phase divisible by world size x accum_steps, the
all-reduce's rank grid, paths and entry points, fp16 and torch.compile backends — then the few
across sections: the noise scale's two batch sizes, what needs in-memory data). Added here: the
schedule against the training length, where the dataset size is known without loading it.
"""

from __future__ import annotations

from bigbatch.config import Config
from bigbatch.trainer.data import train_size_hint
from bigbatch.trainer.recipe import Schedule


def check(cfg: Config, world_size: int, local_world_size: int | None = None, *, check_paths: bool = True) -> None:
    """ConfigError for anything in `cfg` that cannot work on `world_size` ranks
    (`local_world_size` per node, default all on one node)."""
    cfg.validate(world_size, check_paths, local_world_size)
    if (n := train_size_hint(cfg.data, exact=True)) is not None:
        Schedule(cfg, n)  # warmup longer than training, batch phases past the end, ...
