"""`bigbatch scaling`: weak-scaling efficiency per world size, and an alpha-beta model of the
all-reduce that extrapolates it to 8 ... 4096 ranks.

Weak scaling keeps the per-device batch fixed, so the global batch grows with the world size
(Goyal et al. 2017, section 5: ~90 % efficiency from 8 to 256 GPUs). For each world size N the
model from CONFIG trains a few steps twice on N spawned ranks: once normally (DDP all-reduces
the gradients, with dist.allreduce's algorithm) and once under DDP's `no_sync` (no
communication). The second is the compute time, the difference the communication that the
backward pass did not hide.

    efficiency(N) = throughput(N) / (N * throughput(1))

The alpha-beta model itself (ring / 2D torus / hierarchical times, the fit from `bigbatch bench
allreduce` rows) is `bigbatch.distributed.alphabeta`; this module measures and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bigbatch import config as config_mod
from bigbatch.config import World
from bigbatch.distributed import env as dist_env
from bigbatch.distributed.alphabeta import fit_alpha_beta, predict
from bigbatch.distributed.bench import parse_size, spawn_sweep
from bigbatch.errors import ConfigError, UsageError
from bigbatch.trainer.data import build_data, tensor_batch
from bigbatch.trainer.build import prepare_model, wrap_ddp
from bigbatch.trainer.objective import TrainingLoss
from bigbatch.trainer.optim import build_optimizer


def efficiency_rows(measured: list[dict]) -> list[dict]:
    """Add samples_per_s and efficiency = throughput(N) / (N * throughput(smallest N) / smallest N)."""
    base = min(measured, key=lambda r: r["world_size"])
    per_rank_base = base["global_batch"] / base["step_s"] / base["world_size"]
    out = []
    for r in sorted(measured, key=lambda r: r["world_size"]):
        thr = r["global_batch"] / r["step_s"]
        out.append({**r, "samples_per_s": thr, "efficiency": thr / (r["world_size"] * per_rank_base),
                    "comm_fraction": r["comm_s"] / r["step_s"] if r["step_s"] > 0 else 0.0})
    return out


def format_efficiency(rows: list[dict]) -> str:
    lines = [f"{'ranks':>5} {'global_batch':>12} {'step(ms)':>9} {'compute(ms)':>11} {'comm(ms)':>9} "
             f"{'comm%':>6} {'samples/s':>10} {'efficiency':>10}"]
    for r in rows:
        lines.append(f"{r['world_size']:>5} {r['global_batch']:>12} {r['step_s'] * 1e3:>9.2f} {r['compute_s'] * 1e3:>11.2f} "
                     f"{r['comm_s'] * 1e3:>9.2f} {100 * r['comm_fraction']:>5.1f}% {r['samples_per_s']:>10.0f} {r['efficiency']:>10.3f}")
    return "\n".join(lines)


def format_model(rows: list[dict], nbytes: float, fit: dict) -> str:
    lines = [f"alpha-beta model: alpha = {fit['alpha_s'] * 1e6:.1f} us/step, beta = {fit['beta_bytes_per_s'] / 1e9:.3f} GB/s "
             f"(fit on {fit['points']} {fit['algo']} rows, median error {100 * fit['median_rel_err']:.0f} %), "
             f"message {nbytes / 2 ** 20:.2f} MiB",
             f"{'ranks':>5} {'grid':>7} {'ring(ms)':>10} {'torus2d(ms)':>11} {'hier(ms)':>10} {'steps ring/torus/hier':>22}"]
    for r in rows:
        lines.append(f"{r['world_size']:>5} {r['grid']:>7} {r['ring_ms']:>10.2f} {r['torus2d_ms']:>11.2f} {r['hierarchical_ms']:>10.2f} "
                     f"{r['ring_steps']:>8}/{r['torus2d_steps']}/{r['hierarchical_steps']}")
    return "\n".join(lines)


def plot_model(rows: list[dict], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    n = [r["world_size"] for r in rows]
    for key, label in (("ring_ms", "ring"), ("torus2d_ms", "2D torus"), ("hierarchical_ms", "hierarchical")):
        ax.plot(n, [r[key] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ranks")
    ax.set_ylabel("predicted all-reduce time (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the measurement (inside a process group) -------------------------------------------------


def measure_step_times(cfg, per_device_batch: int, steps: int, warmup: int) -> dict:
    """Per-step seconds with and without gradient all-reduce on this world (max over ranks)."""
    env = dist_env.init(cfg.dist.backend, cfg.dist.timeout_s)
    bundle = build_data(cfg.data)
    model = prepare_model(cfg, bundle, env)
    ddp = wrap_ddp(model, cfg, env)
    opt = build_optimizer(cfg.optim, model, cfg.optim.base_lr)
    loss_fn = TrainingLoss(cfg.train.label_smoothing, cfg.train.ignore_index)
    gen = torch.Generator().manual_seed(cfg.train.seed + env.rank)

    def batch():
        if bundle.in_memory:
            idx = torch.randint(len(bundle.train), (per_device_batch,), generator=gen)
            return tensor_batch(bundle.train, idx, env.device, train=True)
        # a folder dataset: the input pipeline is not what this measures
        x = torch.randn((per_device_batch, *bundle.input_shape), generator=gen).to(env.device)
        return x, torch.randint(bundle.num_classes, (per_device_batch,), generator=gen).to(env.device)

    def step():
        x, y = batch()
        opt.zero_grad(set_to_none=True)
        loss_fn(ddp(x), y).backward()
        opt.step()

    def timed(sync: bool) -> float:
        ctx = contextlib.nullcontext if sync or ddp is model else ddp.no_sync
        with ctx():
            for _ in range(warmup):
                step()
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            dist_env.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            if env.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = torch.tensor([(time.perf_counter() - t0) / steps], dtype=torch.float64)
        if env.initialized:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed.item())

    compute = timed(sync=False)
    total = timed(sync=True)
    params = sum(p.numel() for p in model.parameters())
    return {"world_size": env.world_size, "per_device_batch": per_device_batch, "global_batch": per_device_batch * env.world_size,
            "step_s": total, "compute_s": compute, "comm_s": max(total - compute, 0.0), "params": params,
            "grad_bytes": sum(p.numel() * p.element_size() for p in model.parameters()), "allreduce": cfg.dist.allreduce}


def spawn_measure(world: int, cfg, per_device: int, steps: int, warmup: int) -> dict:
    """`measure_step_times` on `world` spawned local ranks; rank 0's result."""
    return dist_env.spawn_local(world, measure_step_times, cfg, per_device, steps, warmup,
                       backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)


def short_ring_bench(nproc: int, backend: str) -> list[dict]:
    """A few seconds of `bench allreduce --algo ring` on nproc local ranks (1 KiB ... 4 MiB): rows to
    fit alpha and beta when the user gave none. 50 timed iterations per size: with 10, single
    scheduler stalls of a few ms moved the fitted alpha between 130 and 790 us from run to run on
    a 2-core VM (50: 277-297 us over three runs)."""
    print(f"fitting alpha-beta: ring bench on {nproc} local ranks ...", file=sys.stderr, flush=True)
    return spawn_sweep(nproc, backend, {"algos": ["ring"], "sizes": [1 << 10, 1 << 14, 1 << 18, 1 << 20, 1 << 22],
                                        "dtype_name": "fp32", "iters": 50, "warmup": 5, "rows": None, "local_size": None})


# --- the command ------------------------------------------------------------------------------


def parse_worlds(text: str) -> list[int]:
    try:
        worlds = sorted({int(v) for v in text.split(",")})
    except ValueError:
        raise UsageError("--nproc", f"expected a comma list of rank counts such as 1,2,4, got {text!r}") from None
    if not worlds or worlds[0] < 1:
        raise UsageError("--nproc", f"rank counts must be >= 1, got {text!r}")
    return worlds


def read_bench(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise UsageError("--bench", f"file {path!r} not found")
    try:
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise UsageError("--bench", f"{path!r} is not JSON lines from `bigbatch bench allreduce --json` ({e})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="training config (TOML); its model, data and dist.allreduce are used")
    parser.add_argument("--nproc", default="1,2", help="world sizes to measure, comma list (default 1,2)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--per-device-batch", type=int, default=None,
                        help="examples per rank per step, fixed across world sizes (default: the config's global batch)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per world size and mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--bench", default=None, help="bench allreduce JSON lines to fit alpha-beta (default: run a short ring bench)")
    parser.add_argument("--model-bytes", default=None, help="message size for the extrapolation, e.g. 100M (default: the model's gradients)")
    parser.add_argument("--local-size", type=int, default=8, help="ranks per node in the hierarchical model (default 8)")
    parser.add_argument("--intra-bandwidth-gbps", type=float, default=None, help="hierarchical model: intra-node beta (default: the fitted beta)")
    parser.add_argument("--out", default=None, help="folder for scaling.json and the plot (default runs/scaling-<name>)")


def main(args: argparse.Namespace) -> int:
    worlds = parse_worlds(args.nproc)
    cfg = config_mod.load(args.config, args.set)
    per_device = args.per_device_batch or cfg.batch.global_batch
    for name, v, low in (("--per-device-batch", per_device, 1), ("--steps", args.steps, 1), ("--warmup", args.warmup, 0),
                         ("--local-size", args.local_size, 1)):
        if v < low:
            raise UsageError(name, f"must be >= {low}, got {v}")
    model_bytes = parse_size(args.model_bytes, "--model-bytes") if args.model_bytes else None
    bench_rows = read_bench(args.bench) if args.bench else None
    if bench_rows is not None:
        fit = fit_alpha_beta(bench_rows)
    backend = dist_env.resolve_backend(cfg.dist.backend)
    for n in worlds:  # dist.torus_rows / dist.local_size must fit every world measured
        try:
            cfg.dist.check(World(n, n))
        except ConfigError as e:
            raise ConfigError(e.field, f"{e.message} (at --nproc {n})") from None
    out = Path(args.out or f"runs/scaling-{cfg.name}")
    out.mkdir(parents=True, exist_ok=True)

    measured = []
    for n in worlds:
        print(f"measuring {n} rank(s), per-device batch {per_device} ...", file=sys.stderr, flush=True)
        measured.append(spawn_measure(n, cfg, per_device, args.steps, args.warmup))
    eff = efficiency_rows(measured)
    print(f"weak scaling, {cfg.model.name} on {cfg.data.name}, dist.allreduce = {cfg.dist.allreduce}, "
          f"per-device batch {per_device}")
    print(format_efficiency(eff))

    if bench_rows is None:
        n_bench = max([n for n in worlds if n > 1] or [2])
        bench_rows = short_ring_bench(n_bench, backend)
        (out / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bench_rows))
        fit = fit_alpha_beta(bench_rows)
    nbytes = model_bytes or measured[0]["grad_bytes"]
    beta_intra = args.intra_bandwidth_gbps * 1e9 if args.intra_bandwidth_gbps else None
    model = predict(nbytes, fit["alpha_s"], fit["beta_bytes_per_s"], local=args.local_size, beta_intra=beta_intra)
    print(format_model(model, nbytes, fit))
    plot = out / "scaling-model.png"
    plot_model(model, plot, f"alpha-beta model, {nbytes / 2 ** 20:.2f} MiB all-reduce")
    (out / "scaling.json").write_text(json.dumps({"efficiency": eff, "fit": fit, "model_bytes": nbytes, "model": model}, indent=1))
    print(f"wrote {out / 'scaling.json'} and {plot}", file=sys.stderr)
    return 0
