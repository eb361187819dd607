"""DDP training with bigbatch's all-reduce hooks gives the builtin loss, step for step.

One spawn of 2 gloo ranks trains the MNIST-1D MLP (fp32) five times through the real training
loop: dist.allreduce = builtin, ring, torus2d (2 x 1 grid: the column ring), hierarchical with
the 2 ranks on one node (tree reduce + broadcast) and hierarchical with one rank per node (the
leaders' ring). Every per-step loss must equal builtin's within 1e-5. The ring hook averages a
rank-dependent gradient to its mean, and a bad shape is a ConfigError naming the field.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from _helpers import spawn, step_losses
from bigbatch import config
from bigbatch.distributed import env as dist_env
from bigbatch.distributed.hooks import install_comm_hook
from bigbatch.errors import ConfigError
from bigbatch.trainer.loop import run

MLP = "configs/mnist1d-mlp.toml"
STEPS = 15
VARIANTS = {
    "builtin": ["dist.allreduce='builtin'"],
    "ring": ["dist.allreduce='ring'"],
    "torus2d": ["dist.allreduce='torus2d'", "dist.torus_rows=2"],
    "hierarchical-1node": ["dist.allreduce='hierarchical'"],
    "hierarchical-2nodes": ["dist.allreduce='hierarchical'", "dist.local_size=1"],
}
BASE = ["data.num_samples=4000", "data.train_eval_samples=500", "train.log_every=1", "train.eval_every=0",
        "train.amp='off'", "track.progress='off'", f"train.steps={STEPS}", "dist.bucket_cap_mb=0.05"]


def train_every_variant(rank: int, world: int, out_dir: str) -> dict:
    losses = {}
    for name, sets in VARIANTS.items():
        run(config.load(MLP, BASE + sets), f"{out_dir}/{name}")
        dist.barrier()
        losses[name] = step_losses(f"{out_dir}/{name}") if rank == 0 else None

    # each rank's own gradient (rank + 1) becomes the mean over ranks
    env = dist_env.init()
    model = torch.nn.Linear(3, 1, bias=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    install_comm_hook(ddp, config.load(None, ["dist.allreduce='ring'"]).dist, env)
    ddp(torch.full((1, 3), float(rank + 1))).sum().backward()
    mean_ok = torch.equal(model.weight.grad, torch.full((1, 3), 1.5))

    errors = []
    for sets in (["dist.allreduce='torus2d'", "dist.torus_rows=3"], ["dist.allreduce='hierarchical'", "dist.local_size=4"]):
        try:
            install_comm_hook(torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(1, 1)), config.load(None, sets).dist, env)
        except ConfigError as e:
            errors.append(e.field)
    return {"losses": losses, "mean_ok": mean_ok, "errors": errors}


def test_each_allreduce_hook_trains_like_builtin_on_2_ranks(tmp_path):
    results = spawn(train_every_variant, 2, str(tmp_path))
    losses = results[0]["losses"]
    builtin = losses["builtin"]
    assert sorted(builtin) == list(range(1, STEPS + 1))
    assert builtin[STEPS] < builtin[1]  # it trains
    for name in VARIANTS:
        assert sorted(losses[name]) == sorted(builtin), name
        worst = max(abs(losses[name][s] - builtin[s]) for s in builtin)
        assert worst < 1e-5, (name, worst)
    assert all(r["mean_ok"] for r in results)
    assert results[0]["errors"] == ["dist.torus_rows", "dist.local_size"]
