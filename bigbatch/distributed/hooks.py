"""DDP comm hooks: bigbatch's all-reduce algorithms (and a local-gradient tap) inside DDP.

DDP hands each gradient bucket to the registered hook once all its gradients are ready and
expects a Future of the averaged bucket back. `install_comm_hook` registers one hook that

1. calls `local_grad_tap(bucket.buffer())` on the local, not yet reduced gradient (the small
   batch of the gradient noise scale's two-batch estimator, McCandlish et al. 2018, app. A.1),
2. sums the bucket over ranks with `dist.allreduce` = builtin | ring | torus2d | hierarchical,
3. divides by the world size (DDP averages; the loss is a mean over the per-device batch):
   builtin before the all-reduce, as DDP's default does; the others after it.

builtin stays asynchronous (the backend's own all-reduce overlaps the rest of the backward
pass, as DDP's default does). ring / torus2d / hierarchical run their point-to-point exchanges
inside the hook and return a completed Future: correct, but the bucket's communication no
longer overlaps the backward pass; `bigbatch scaling` measures what that costs.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from bigbatch.distributed import allreduce as ar
from bigbatch.errors import ConfigError


@dataclass
class CommHookState:
    algo: str
    world_size: int
    rows: int | None = None  # torus2d
    local_size: int | None = None  # hierarchical
    local_grad_tap: Callable[[torch.Tensor], None] | None = None
    group: object | None = None  # None = the world


def check_topology(dist_cfg, world_size: int, local_world_size: int) -> CommHookState:
    """Validate dist.allreduce / dist.torus_rows / dist.local_size for a world of `world_size`
    ranks, `local_world_size` per node (ConfigError); no process group needed, so launchers call
    it before they start anything."""
    algo = dist_cfg.allreduce
    if algo not in ar.ALGORITHMS:
        raise ConfigError("dist.allreduce", f"unknown algorithm {algo!r}; expected one of {', '.join(ar.ALGORITHMS)}")
    state = CommHookState(algo=algo, world_size=world_size)
    if algo == "torus2d":
        state.rows, _ = ar.torus_shape(world_size, dist_cfg.torus_rows, "dist.torus_rows")
    elif algo == "hierarchical":
        state.local_size = ar.check_local_size(world_size, dist_cfg.local_size or local_world_size, "dist.local_size")
    return state


def resolve(dist_cfg, env) -> CommHookState:
    """`check_topology` for the running world."""
    return check_topology(dist_cfg, env.world_size, env.local_world_size)


def _reduced(fut: torch.futures.Future) -> torch.Tensor:
    return fut.value()[0]


def allreduce_mean_hook(state: CommHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # (no `from __future__ import annotations` here: DDP checks these annotations as objects)
    """The comm hook: tap the local gradient, sum with the chosen algorithm, divide by the world."""
    tensor = bucket.buffer()
    if state.local_grad_tap is not None:
        state.local_grad_tap(tensor)
    if state.algo == "builtin":
        # divide first, as DDP's own C++ all-reduce does (exact for a power-of-two world)
        tensor.div_(state.world_size)
        return dist.all_reduce(tensor, group=state.group, async_op=True).get_future().then(_reduced)
    ar.allreduce(tensor, state.algo, group=state.group, rows=state.rows, local_size=state.local_size)
    tensor.div_(state.world_size)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def install_comm_hook(ddp_model, dist_cfg, env, *, local_grad_tap: Callable[[torch.Tensor], None] | None = None) -> None:
    """Register the hook on `ddp_model` when dist.allreduce != builtin or a tap is given.

    Otherwise DDP keeps its default (C++) all-reduce. Bad dist values raise ConfigError naming
    dist.torus_rows / dist.local_size before anything is registered.
    """
    state = resolve(dist_cfg, env)
    if state.algo == "builtin" and local_grad_tap is None:
        return
    state.local_grad_tap = local_grad_tap
    ddp_model.register_comm_hook(state, allreduce_mean_hook)
