"""Rank-grid arithmetic of the all-reduce algorithms: the 2D torus's rows x cols and the ranks
per node of the hierarchical one. Pure and at the bottom of the layers, so that the config's
pre-launch checks (`bigbatch.config`) and the algorithms themselves (`bigbatch.distributed`) use
the same rules."""

from __future__ import annotations

import math

from bigbatch.errors import ConfigError


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def most_square_rows(world_size: int) -> int:
    """The largest divisor of world_size that is <= sqrt(world_size): 12 -> 3 (3 x 4), 7 -> 1."""
    return max(d for d in range(1, math.isqrt(world_size) + 1) if world_size % d == 0)


def torus_shape(world_size: int, rows: int | None = None, field: str = "dist.torus_rows") -> tuple[int, int]:
    """(rows, cols) of the torus grid; rows=None picks the most square factorisation."""
    if rows is None:
        rows = most_square_rows(world_size)
    if rows < 1 or world_size % rows != 0:
        raise ConfigError(field, f"{rows} rows do not tile {world_size} ranks (rows x cols must equal the world size; "
                                 f"divisors: {', '.join(str(d) for d in divisors(world_size))})")
    return rows, world_size // rows


def check_local_size(world_size: int, local_size: int, field: str = "dist.local_size") -> int:
    """Ranks per node for hierarchical all-reduce; must divide the world size."""
    if local_size < 1 or world_size % local_size != 0:
        raise ConfigError(field, f"local size {local_size} does not divide the world size {world_size} "
                                 f"(divisors: {', '.join(str(d) for d in divisors(world_size))})")
    return local_size
