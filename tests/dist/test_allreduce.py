"""Ring, 2D-torus and hierarchical all-reduce equal dist.all_reduce on 1 to 6 gloo ranks.

One spawn of 6 ranks runs every check: worlds of 1..5 ranks are subgroups of it (which also
exercises the `group=` argument and subgroup caching under a parent subgroup), the world of 6
is the default group. For each world size: ring, the torus on every factorisation rows x cols,
hierarchical for every local size that divides the world; lengths that do not divide the world
(down to fewer elements than ranks); a 16-byte chunk size so the ring pipeline runs many chunks per
segment; a non-contiguous tensor; fp32, bf16 and fp16.

Exactness: with small integer values every partial sum is representable in every dtype, so any
summation order gives the same bits and the result must equal dist.all_reduce exactly. With
Gaussian values the algorithms add in a different order than gloo (ring: along the ring from
the segment's owner), so fp32 agrees to rounding (rtol 1e-6), and bf16/fp16, rounded once per
hop, agree with the float64 sum within a few units in the last place times the world size.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from _helpers import spawn
from bigbatch.distributed import allreduce as ar
from bigbatch.errors import ConfigError

WORLD = 6
LENGTHS = (1, 5, 97)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# ulp-scale tolerance per dtype for Gaussian inputs (relative to max |partial sum|, per hop)
EPS = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}


def algorithms(n: int):
    """(name, fn(tensor, group)) for every algorithm and shape valid on n ranks."""
    yield "ring", lambda t, g: ar.ring_allreduce(t, g)
    yield "ring-chunk16B", lambda t, g: ar.ring_allreduce(t, g, chunk_bytes=16)
    for rows in ar.divisors(n):
        yield f"torus{rows}x{n // rows}", lambda t, g, r=rows: ar.torus2d_allreduce(t, r, n // r, g, chunk_bytes=16)
    for local in ar.divisors(n):
        yield f"hier-local{local}", lambda t, g, l=local: ar.hierarchical_allreduce(t, l, g)


def inputs(rank: int, length: int, dtype: torch.dtype, kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * rank + length)
    if kind == "int":
        return torch.randint(-8, 9, (length,), generator=gen).to(dtype)
    return torch.randn(length, generator=gen).to(dtype)


def check_world(rank: int, n: int, group) -> list[str]:
    """All checks on the group of ranks 0..n-1; returns failure descriptions (empty = pass)."""
    failures = []
    for name, fn in algorithms(n):
        for dtype in DTYPES:
            for length in LENGTHS:
                for kind in ("int", "gauss"):
                    x = inputs(rank, length, dtype, kind)
                    want = x.clone()
                    dist.all_reduce(want, group=group)
                    got = x.clone()
                    fn(got, group)
                    if kind == "int":
                        ok = torch.equal(got, want)
                    else:
                        exact = sum(inputs(r, length, dtype, kind).double() for r in range(n))
                        scale = sum(inputs(r, length, dtype, kind).double().abs() for r in range(n)).max()
                        ok = bool(((got.double() - exact).abs() <= 2 * n * EPS[dtype] * scale + 1e-30).all())
                    if not ok:
                        failures.append(f"n={n} {name} {dtype} len={length} {kind}: max err "
                                        f"{(got.double() - want.double()).abs().max().item():.3g}")
        # a non-contiguous tensor (a transposed matrix) is reduced in place too
        m = inputs(rank, 6 * 7, torch.float32, "int").view(6, 7).t()
        want = m.contiguous()
        dist.all_reduce(want, group=group)
        fn(m, group)
        if not torch.equal(m, want):
            failures.append(f"n={n} {name} non-contiguous")
    return failures


def all_worlds(rank: int, world: int) -> dict:
    failures, checked = [], []
    # every rank creates every parent group, in one order, before ranks diverge
    groups = [dist.new_group(list(range(n))) for n in range(1, world)] + [None]
    for n, group in zip(range(1, world + 1), groups):
        if rank < n:
            failures += check_world(rank, n, group)
            checked.append(n)
    # a shape that does not tile the world is refused before any communication
    errors = []
    for call in (lambda: ar.torus2d_allreduce(torch.ones(3), 4, 2), lambda: ar.hierarchical_allreduce(torch.ones(3), 4)):
        try:
            call()
        except ConfigError as e:
            errors.append(e.field)
    dist.barrier()
    return {"failures": failures, "checked": checked, "errors": errors}


def test_every_algorithm_equals_dist_all_reduce_on_1_to_6_ranks():
    results = spawn(all_worlds, WORLD)
    assert [r["checked"] for r in results] == [list(range(r + 1, WORLD + 1)) for r in range(WORLD)]
    assert [f for r in results for f in r["failures"]] == []
    assert results[0]["errors"] == ["dist.torus_rows", "dist.local_size"]


@pytest.mark.parametrize("world,rows,want", [(12, None, (3, 4)), (7, None, (1, 7)), (16, None, (4, 4)), (6, 3, (3, 2))])
def test_torus_shape_is_the_most_square_factorisation(world, rows, want):
    assert ar.torus_shape(world, rows) == want


def test_bad_shapes_name_the_field():
    with pytest.raises(ConfigError, match="dist.torus_rows"):
        ar.torus_shape(6, 4)
    with pytest.raises(ConfigError, match="--local-size"):
        ar.check_local_size(6, 4, "--local-size")
