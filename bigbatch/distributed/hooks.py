"""DDP comm hooks: bigbatch's all-reduce algorithms inside DDP.

DDP hands each gradient bucket to the registered hook once all its gradients are ready and
expects a Future of the averaged bucket back. `install_comm_hook` registers one hook that

1. sums the bucket over ranks with `dist.allreduce` = builtin | ring | torus2d | hierarchical,
2. divides by the world size (DDP averages; the loss is a mean over the per-device batch):
   builtin before the all-reduce, as DDP's default does; the others after it.

builtin stays asynchronous (the backend's own all-reduce overlaps the rest of the backward
pass, as DDP's default does). ring / torus2d / hierarchical run their point-to-point exchanges
inside the hook and return a completed Future: correct, but the bucket's communication no
longer overlaps the backward pass; `bigbatch scaling` measures what that costs.
"""

from dataclasses import dataclass
import torch
import torch.distributed as dist

from bigbatch.distributed import allreduce as ar


@dataclass
class CommHookState:
    algo: str
    world_size: int
    rows: int | None = None  # torus2d
    local_size: int | None = None  # hierarchical
    group: object | None = None  # None = the world


def resolve(dist_cfg, env) -> CommHookState:
    """The hook's state for the running world: the torus's rows, the ranks per node (the config
    was checked for this world before launch: `DistConfig.check`)."""
    state = CommHookState(algo=dist_cfg.allreduce, world_size=env.world_size)
    if state.algo == "torus2d":
        state.rows, _ = ar.torus_shape(env.world_size, dist_cfg.torus_rows, "dist.torus_rows")
    elif state.algo == "hierarchical":
        state.local_size = ar.check_local_size(env.world_size, dist_cfg.local_size or env.local_world_size, "dist.local_size")
    return state


def _reduced(fut: torch.futures.Future) -> torch.Tensor:
    return fut.value()[0]


def allreduce_mean_hook(state: CommHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # (no `from __future__ import annotations` here: DDP checks these annotations as objects)
    """The comm hook: sum with the chosen algorithm, divide by the world."""
    tensor = bucket.buffer()
    if state.algo == "builtin":
        # divide first, as DDP's own C++ all-reduce does (exact for a power-of-two world)
        tensor.div_(state.world_size)
        return dist.all_reduce(tensor, group=state.group, async_op=True).get_future().then(_reduced)
    ar.allreduce(tensor, state.algo, group=state.group, rows=state.rows, local_size=state.local_size)
    tensor.div_(state.world_size)
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def install_comm_hook(ddp_model, dist_cfg, env) -> None:
    """Register the hook on `ddp_model` when dist.allreduce != builtin.

    Otherwise DDP keeps its default (C++) all-reduce. Bad dist values raise ConfigError naming
    dist.torus_rows / dist.local_size before anything is registered.
    """
    state = resolve(dist_cfg, env)
    if state.algo == "builtin":
        return
    ddp_model.register_comm_hook(state, allreduce_mean_hook)
