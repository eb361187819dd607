"""`bigbatch bench allreduce`: an nccl-tests-style sweep of message sizes for each algorithm.

Like nccl-tests' all_reduce_perf (doc/PERFORMANCE.md): for every size, the median time of one
all-reduce after warmup, algbw = bytes / time and busbw = algbw * 2(n-1)/n, the number that is
comparable to a link's bandwidth whatever the rank count. Every size is checked for
correctness against the exact sum. On GPU the time is taken with CUDA events; on CPU with a
barrier and the monotonic clock. Each iteration's time is the slowest rank's; the row reports
the median over iterations. The algorithms are interleaved: every iteration runs each of them
once, in a rotating order, so algorithms compared in one run saw the same machine.

Runs under an existing world (torchrun, or an srun step with BIGBATCH_SRUN_RANKS=1, via
`bigbatch.distributed.env.init`) or spawns
--nproc local ranks itself.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

from bigbatch.errors import UsageError

ALGOS = ("builtin", "ring", "torus2d", "hierarchical")
DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_SIZES = "8,1K,64K,1M,16M"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


# --- input parsing (pure) -------------------------------------------------------------------


def parse_size(text: str, field: str = "--sizes") -> int:
    """'8', '1K', '64M', '1G' (binary units, optional trailing B) -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)I?B?\s*", text, flags=re.IGNORECASE)
    if not m or int(m.group(1)) <= 0:
        raise UsageError(field, f"cannot parse size {text!r}; expected a positive number with an optional K, M or G suffix (e.g. 64M)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def parse_sizes(text: str, field: str = "--sizes") -> list[int]:
    """Comma-separated sizes; 'A:B' expands to A, 2A, 4A, ... up to B (nccl-tests -b A -e B -f 2)."""
    sizes: list[int] = []
    for part in text.split(","):
        if ":" in part:
            lo, _, hi = part.partition(":")
            a, b = parse_size(lo, field), parse_size(hi, field)
            if a > b:
                raise UsageError(field, f"range {part!r} runs backwards")
            while a <= b:
                sizes.append(a)
                a *= 2
        else:
            sizes.append(parse_size(part, field))
    return sizes


def parse_algos(text: str) -> list[str]:
    algos = list(ALGOS) if text == "all" else text.split(",")
    for a in algos:
        if a not in ALGOS:
            raise UsageError("--algo", f"unknown algorithm {a!r}; expected one of {', '.join(ALGOS)} or all")
    return algos


def bus_factor(world_size: int) -> float:
    """busbw / algbw for all-reduce (nccl-tests): 2(n-1)/n."""
    return 2 * (world_size - 1) / world_size if world_size > 1 else 0.0


def make_row(algo: str, world_size: int, dtype: str, nbytes: int, seconds: float, correct: bool) -> dict:
    algbw = nbytes / seconds / 1e9 if seconds > 0 else float("inf")
    return {"algo": algo, "world_size": world_size, "dtype": dtype, "bytes": nbytes,
            "time_us": round(seconds * 1e6, 2), "algbw_gbps": round(algbw, 4),
            "busbw_gbps": round(algbw * bus_factor(world_size), 4), "correct": bool(correct)}


def format_table(rows: list[dict]) -> str:
    head = f"{'size(B)':>12} {'type':>5} {'algo':>13} {'ranks':>5} {'time(us)':>11} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12} {'correct':>7}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['bytes']:>12} {r['dtype']:>5} {r['algo']:>13} {r['world_size']:>5} {r['time_us']:>11.1f} "
                     f"{r['algbw_gbps']:>12.4f} {r['busbw_gbps']:>12.4f} {('yes' if r['correct'] else 'NO'):>7}")
    return "\n".join(lines)


def plot_busbw(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for algo in dict.fromkeys(r["algo"] for r in rows):
        mine = [r for r in rows if r["algo"] == algo]
        ax.plot([r["bytes"] for r in mine], [r["busbw_gbps"] for r in mine], marker="o", label=algo)
    n = rows[0]["world_size"] if rows else 0
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("busbw (GB/s)")
    ax.set_title(f"all-reduce bus bandwidth, {n} ranks, {rows[0]['dtype'] if rows else ''}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the measurement (inside a process group) -------------------------------------------------


def pattern(count: int, rank: int, dtype, device):
    """Small integers ((i + rank) mod 17 - 8): every partial sum of a few ranks is exact in any dtype."""
    import torch

    return ((torch.arange(count, device=device) + rank) % 17 - 8).to(dtype)


def expected_sum(count: int, world_size: int, device):
    import torch

    idx = torch.arange(count, device=device)
    return sum(((idx + r) % 17 - 8).double() for r in range(world_size))


def sweep(algos: list[str], sizes: list[int], dtype_name: str, iters: int, warmup: int,
          rows: int | None, local_size: int | None, backend: str = "auto") -> list[dict]:
    """Run on every rank of the current process group; returns the rows (identical on all ranks)."""
    import torch
    import torch.distributed as dist

    from bigbatch.distributed import allreduce as ar
    from bigbatch.distributed import env as dist_env

    env = dist_env.init(backend)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    n, device = env.world_size, env.device
    cuda = device.type == "cuda"
    eps = {"fp32": 2 ** -23, "bf16": 2 ** -8, "fp16": 2 ** -11}[dtype_name]
    results: dict[tuple[str, int], dict] = {}
    for nbytes in sizes:
        count = max(1, nbytes // torch.tensor([], dtype=dtype).element_size())
        src = pattern(count, env.rank, dtype, device)
        want = expected_sum(count, n, device)
        buf = torch.empty_like(src)
        times: dict[str, list[float]] = {a: [] for a in algos}
        correct: dict[str, bool] = {}
        for it in range(warmup + iters):
            # the algorithms take turns within an iteration, in an order that rotates: a change of
            # load on a shared machine falls on all of them, not on whichever ran during it
            shift = it % len(algos)
            for algo in algos[shift:] + algos[:shift]:
                buf.copy_(src)
                if cuda:
                    torch.cuda.synchronize()
                dist.barrier()
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    ar.allreduce(buf, algo, rows=rows, local_size=local_size)
                    end.record()
                    end.synchronize()
                    seconds = start.elapsed_time(end) / 1e3
                else:
                    t0 = time.perf_counter()
                    ar.allreduce(buf, algo, rows=rows, local_size=local_size)
                    seconds = time.perf_counter() - t0
                if it >= warmup:
                    times[algo].append(seconds)
                if it == warmup + iters - 1:
                    correct[algo] = bool(torch.allclose(buf.double(), want, rtol=n * eps, atol=0.0))
        for algo in algos:
            # the slowest rank defines each iteration; every rank must be correct
            stats = torch.tensor(times[algo] + [0.0 if correct[algo] else 1.0], dtype=torch.float64, device=device)
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            stats = stats.cpu().tolist()
            results[(algo, nbytes)] = make_row(algo, n, dtype_name, count * src.element_size(),
                                            statistics.median(stats[:-1]), stats[-1] == 0.0)
    return [results[(a, b)] for a in algos for b in sizes]


# --- the command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", metavar="allreduce", help="the collective to benchmark (allreduce)")
    parser.add_argument("--algo", default="all", help=f"{', '.join(ALGOS)}, a comma list, or all (default: all)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="local ranks to spawn (default 2); under torchrun (or srun with BIGBATCH_SRUN_RANKS=1) the existing world is used")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"bytes per rank: comma list or A:B doubling (default {DEFAULT_SIZES})")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (default fp32)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per size (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations per size first")
    parser.add_argument("--torus-rows", type=int, default=None, help="torus2d grid rows (default: most square)")
    parser.add_argument("--local-size", type=int, default=None, help="hierarchical: ranks per node (default: LOCAL_WORLD_SIZE)")
    parser.add_argument("--backend", default="auto", help="auto (nccl on GPU, else gloo), gloo or nccl, for spawned ranks")
    parser.add_argument("--json", default=None, help="write the rows as JSON lines to this file")
    parser.add_argument("--plot", default=None, help="busbw-vs-size PNG (default with --algo all: allreduce-busbw.png)")


def validate(args: argparse.Namespace, world_size: int) -> dict:
    """Everything checked before any process starts; returns the sweep's keyword arguments."""
    from bigbatch.distributed.allreduce import check_local_size, torus_shape

    algos = parse_algos(args.algo)
    sizes = parse_sizes(args.sizes)
    if args.dtype not in DTYPES:
        raise UsageError("--dtype", f"expected one of {', '.join(DTYPES)}, got {args.dtype!r}")
    if args.iters < 1:
        raise UsageError("--iters", f"must be >= 1, got {args.iters}")
    if args.warmup < 0:
        raise UsageError("--warmup", f"must be >= 0, got {args.warmup}")
    rows = local = None
    if "torus2d" in algos or args.torus_rows is not None:
        rows, _ = torus_shape(world_size, args.torus_rows, "--torus-rows")
    if "hierarchical" in algos or args.local_size is not None:
        local = check_local_size(world_size, args.local_size or args.local_world_size, "--local-size")
    return {"algos": algos, "sizes": sizes, "dtype_name": args.dtype, "iters": args.iters, "warmup": args.warmup,
            "rows": rows, "local_size": local}


def spawn_sweep(nproc: int, backend: str, kwargs: dict) -> list[dict]:
    """`sweep(**kwargs)` on nproc spawned local ranks; rank 0's rows."""
    from functools import partial

    from bigbatch.distributed.env import spawn_local

    return spawn_local(nproc, partial(sweep, **kwargs), backend=backend)


def main(args: argparse.Namespace) -> int:
    if args.what != "allreduce":
        raise UsageError("bench", f"unknown benchmark {args.what!r}; expected allreduce")
    from bigbatch.distributed import env as dist_env

    launched_world = dist_env.world_size_hint()
    if launched_world > 1:  # torchrun / srun / Ray: the world exists
        if args.nproc is not None and args.nproc != launched_world:
            raise UsageError("--nproc", f"{args.nproc} does not match the launcher's world size {launched_world}")
        nproc, local = launched_world, dist_env.launcher_world()[3]
    else:
        nproc = 2 if args.nproc is None else args.nproc
        if nproc < 1:
            raise UsageError("--nproc", f"must be >= 1, got {nproc}")
        local = nproc
    args.local_world_size = local
    kwargs = validate(args, nproc)
    if args.backend not in ("auto", "gloo", "nccl"):
        raise UsageError("--backend", f"expected auto, gloo or nccl, got {args.backend!r}")
    backend = dist_env.resolve_backend(args.backend)
    if backend == "nccl" and launched_world <= 1:
        import torch

        if nproc > torch.cuda.device_count():
            raise UsageError("--nproc", f"{nproc} NCCL ranks need {nproc} GPUs; {torch.cuda.device_count()} visible")

    if launched_world > 1:
        rows = sweep(**kwargs, backend=backend)
        is_main = dist_env.init().is_main
        # leave together: a rank whose peers have already gone can abort in gloo's teardown
        dist_env.barrier()
        dist_env.destroy()
    else:
        rows = spawn_sweep(nproc, backend, kwargs)
        is_main = True
    if not is_main:
        return 0
    print(format_table(rows))
    for r in rows:
        print(json.dumps(r))
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot = args.plot or ("allreduce-busbw.png" if len(kwargs["algos"]) > 1 else None)
    if plot:
        plot_busbw(rows, plot)
        print(f"plot: {plot}", file=sys.stderr)
    return 0 if all(r["correct"] for r in rows) else 1
