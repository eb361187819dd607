"""The gradient noise scale in your own training loop: a plain PyTorch DDP loop, no bigbatch trainer.

    torchrun --nproc-per-node 2 examples/gns_in_your_loop.py --steps 200 --global-batch 256

Three lines are bigbatch's: the import, `GradientNoiseScale(ddp_model, batch_size=...)` after
wrapping the model, and `gns.update()` after each backward. Rank 0 prints one JSON line:
{"b_simple": ..., "grad_sq": ..., "trace_sigma": ..., "steps": ..., "world_size": ...}.

The model and data functions double as bigbatch entry points, so the same model, data, batch and
seed under `bigbatch train` (its online probe, `measure.gns = true`) is

    PYTHONPATH=examples bigbatch train CONFIG --nproc 2 --set model.name='gns_in_your_loop:make_model' \
        --set data.name='gns_in_your_loop:make_data' --set measure.gns=true ...

(tests/dist/test_gns_example.py runs both and compares B_simple.)
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch
import torch.distributed as dist
from torch import nn

from bigbatch.measure import GradientNoiseScale


def make_data(n: int = 4096, features: int = 20, classes: int = 5, label_noise: float = 0.1, seed: int = 0):
    """Gaussian inputs labelled by a random teacher network (some labels flipped); 7/8 train."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    hidden = torch.tanh(x @ torch.randn(features, 32, generator=g) / math.sqrt(features))
    y = (hidden @ torch.randn(32, classes, generator=g)).argmax(1)
    flip = torch.rand(n, generator=g) < label_noise
    y[flip] = torch.randint(0, classes, (int(flip.sum()),), generator=g)
    cut = 7 * n // 8
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def make_model(input_shape, num_classes: int, width: int = 64) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


def global_batches(n: int, global_batch: int, seed: int):
    """Endless global batches of example indices: per-epoch permutations, each seeded by (seed,
    epoch) only, concatenated, cut into consecutive global batches. Each rank then takes its
    contiguous slice, so the examples of a step do not depend on the world size. (The rule of
    bigbatch's example stream: with it `bigbatch train` sees exactly these batches.)"""
    epoch, perm, pos = 0, torch.empty(0, dtype=torch.long), 0
    while True:
        while len(perm) - pos < global_batch:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perm, pos, epoch = torch.cat([perm[pos:], torch.randperm(n, generator=g)]), 0, epoch + 1
        yield perm[pos:pos + global_batch]
        pos += global_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decay", type=float, default=0.95, help="EMA decay of |G|^2 and tr(Sigma)")
    args = p.parse_args()

    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    (x, y), _ = make_data(seed=0)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = make_model(tuple(x.shape[1:]), int(y.max()) + 1).to(device)
    ddp_model = nn.parallel.DistributedDataParallel(model)
    gns = GradientNoiseScale(ddp_model, batch_size=args.global_batch // world, decay=args.decay)

    optimizer = torch.optim.SGD(ddp_model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    per_rank = args.global_batch // world
    batches = global_batches(len(y), args.global_batch, args.seed)

    for step in range(args.steps):
        mine = next(batches)[rank * per_rank:(rank + 1) * per_rank]
        loss = loss_fn(ddp_model(x[mine].to(device)), y[mine].to(device))
        loss.backward()
        gns.update()  # after the backward, before the optimizer step and zero_grad
        optimizer.step()
        optimizer.zero_grad()

    # every rank reads the estimate: it waits for the last step's all-reduce, which must finish
    # before the process group is destroyed (gloo aborts the process on a pending collective)
    stats = gns.metrics()
    if rank == 0:
        print(json.dumps({"b_simple": stats["gns/b_simple"], "grad_sq": stats["gns/grad_sq"],
                          "trace_sigma": stats["gns/trace_sigma"], "steps": args.steps, "world_size": world}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
