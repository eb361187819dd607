"""Claim: on a GPU, bigbatch trains ResNet-50 as fast as a bare PyTorch loop, in one process and as
a one-rank NCCL DDP job.

Evidence: ResNet-50 on random 224x224 images held in memory (the same uint8 tensor feeds both
loops, normalised on the device), bf16 autocast, channels_last, SGD momentum, optionally
torch.compile. Three measurements in one run on one card:
  bare     a hand-written loop (this file), timed over all steps after warm-up with one pair of
           CUDA events and one synchronisation (no per-step sync, like bigbatch's loop);
  bigbatch bigbatch.trainer.loop.run in this process (no process group);
  nccl     `bigbatch train --nproc 1` (torchrun, DDP over NCCL with one rank; --no-ddp skips it).
Prints JSON with images/s for each, the ratios to the bare loop, FLOPs per example
(bigbatch.trainer.flops: forward + backward, 2 FLOPs per multiply-add), MFU when the card's peak
is known (--peak-tflops, or the H100/H200 table), and bigbatch's step-time breakdown.

    python benchmarks/gpu_throughput.py [--batch 256] [--steps 100] [--compile] [--json FILE]
    python benchmarks/gpu_throughput.py --device cpu --model resnet18 --image-size 32 --batch 8 --steps 12  # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bigbatch import config
from bigbatch.trainer import flops
from bigbatch.trainer.build import amp_settings
from bigbatch.trainer.data import build_data
from bigbatch.trainer.loop import run
from bigbatch.trainer.models import build_model


def overrides(args) -> list[str]:
    return [
        "data.name='fake_images'", f"data.image_size={args.image_size}", f"data.num_samples={args.samples}",
        "data.num_classes=1000", "data.test_fraction=0.02", "data.train_eval_samples=64",
        f"model.name='{args.model}'", f"batch.global_batch={args.batch}", "optim.name='sgd'",
        "optim.base_lr=0.1", "optim.base_batch=256", f"train.steps={args.steps}", "train.eval_every=0",
        f"train.log_every={args.log_every}", f"train.amp='{amp_name(args)}'",
        f"train.compile={'true' if args.compile else 'false'}", f"train.compile_backend='{args.compile_backend}'",
        "track.progress='off'",
    ] + ([f"train.peak_tflops={args.peak_tflops}"] if args.peak_tflops else [])


def amp_name(args) -> str:
    return "bf16" if args.device == "cuda" else "off"


def bare(args, cfg, bundle) -> float:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model, backend=args.compile_backend)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255
    x_all, y_all, n = bundle.train.x, bundle.train.y, len(bundle.train)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    cuda = device.type == "cuda"
    for step in range(args.steps):
        if step == args.warmup:  # one timing window over all steps after warm-up
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
        idx = torch.randint(0, n, (args.batch,))
        x = (x_all[idx].to(device, non_blocking=True).float() - mean) / std
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y_all[idx].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        seconds = time.perf_counter() - t0
    return args.batch * (args.steps - args.warmup) / seconds


def run_folder(args, name: str):
    """A run folder under --out (kept), or a temporary one."""
    if args.out:
        path = Path(args.out) / name
        path.mkdir(parents=True, exist_ok=True)
        return contextlib.nullcontext(str(path))
    return tempfile.TemporaryDirectory()


def ours(args, cfg) -> tuple[float, dict]:
    """bigbatch's images/s after warm-up, and its last logged step-time breakdown and mfu."""
    stamps, rows = {}, []

    def reporter(row):
        if "loss" in row:
            stamps[row["step"]] = (time.perf_counter(), row["examples"])
            rows.append(row)

    with run_folder(args, "bigbatch") as d:
        run(cfg, d, reporter=reporter)
    steps = sorted(s for s in stamps if s >= args.warmup)
    (t0, e0), (t1, e1) = stamps[steps[0]], stamps[steps[-1]]
    last = {k: v for k, v in rows[-1].items() if k.startswith("time/") or k in ("mfu", "flops_per_example")}
    return (e1 - e0) / (t1 - t0), last


def nccl_one_rank(args) -> tuple[float | None, str | None]:
    """`bigbatch train --nproc 1`: DDP over NCCL (gloo on CPU) with one rank: (images/s from its
    metrics, the backend its train.log names)."""
    with run_folder(args, "ddp-1rank") as d:
        cfg_path = Path(d) / "bench.toml"
        config.save(config.load(None, overrides(args)), cfg_path)
        out = Path(d) / "run"
        p = subprocess.run([sys.executable, "-m", "bigbatch", "train", str(cfg_path), "--nproc", "1", "--out", str(out)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            return None, None
        rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "loss" in r and r["step"] > args.warmup]
        log = (out / "train.log").read_text()
        backend = next((b for b in ("nccl", "gloo") if f"backend {b}" in log), None)
        return statistics.median(r["samples_per_s"] for r in rows), backend


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: trace only, for smoke runs)")
    p.add_argument("--no-ddp", action="store_true", help="skip the one-rank DDP (`bigbatch train --nproc 1`) run")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense TFLOP/s of the card (default: H100/H200 table)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    p.add_argument("--out", default=None, help="keep the bigbatch run folders under this folder (default: temporary)")
    args = p.parse_args()
    cfg = config.load(None, overrides(args))
    bundle = build_data(cfg.data)
    result = {"benchmark": "gpu_throughput", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "model": args.model, "batch": args.batch, "image_size": args.image_size, "compile": args.compile,
              "compile_backend": args.compile_backend if args.compile else None, "amp": amp_name(args),
              "torch": torch.__version__, "cuda": torch.version.cuda}
    flops_per_example = flops.train_flops_per_example(build_model(cfg.model, bundle.input_shape, bundle.num_classes),
                                                      bundle.input_shape)
    peak = flops.resolve_peak_tflops(args.peak_tflops, torch.device(args.device), amp_settings(cfg.train.amp, torch.device(args.device))[0])
    result.update(flops_per_example=flops_per_example, peak_tflops=peak)
    result["bare_images_per_s"] = bare(args, cfg, bundle)
    result["bigbatch_images_per_s"], result["bigbatch_last_log"] = ours(args, cfg)
    if not args.no_ddp:
        result["ddp_1rank_images_per_s"], result["backend_1rank"] = nccl_one_rank(args)
    result["ratio_bigbatch_vs_bare"] = result["bigbatch_images_per_s"] / result["bare_images_per_s"]
    if result.get("ddp_1rank_images_per_s"):
        result["ratio_ddp_1rank_vs_bare"] = result["ddp_1rank_images_per_s"] / result["bare_images_per_s"]
    if peak and flops_per_example:
        for who in ("bare", "bigbatch"):
            result[f"mfu_{who}"] = flops.mfu(flops_per_example, result[f"{who}_images_per_s"], peak, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if not args.no_ddp and not result.get("ddp_1rank_images_per_s") else 0


if __name__ == "__main__":
    sys.exit(main())
