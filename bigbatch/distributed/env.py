"""The one place that initialises the process group.

Rank and world size come from the launcher's environment, read here and nowhere else:
- torchrun (and Ray Train, which exports the same variables): RANK, WORLD_SIZE, LOCAL_RANK,
  LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT;
- srun without torchrun, only in a job step whose tasks were launched as the ranks of one run:
  the step says so with BIGBATCH_SRUN_RANKS=1 (`srun --export=ALL,BIGBATCH_SRUN_RANKS=1 ...`)
  and SLURM_STEP_ID is set (an srun step, not the batch script). Then SLURM_PROCID,
  SLURM_STEP_NUM_TASKS, SLURM_LOCALID and SLURM_STEP_TASKS_PER_NODE give the world, MASTER_ADDR
  is the first node of SLURM_JOB_NODELIST and the port is derived from the job id (as submitit
  does);
- anything else: one process, no process group.

SLURM's task variables alone do not make a rank: every process started inside a step inherits
them. A Ray worker started by `srun --ntasks=W` (the sweep job script) and every trial it runs
carry SLURM_NTASKS=W and their own SLURM_PROCID; a `bigbatch train` run by a batch script with
`--ntasks=2` carries SLURM_NTASKS=2 and SLURM_PROCID=0. Read as a world, the first waited
dist.timeout_s for peers that never come. `slurm_misfire` says why `bigbatch train` should
refuse the second case (exit 2) rather than silently train alone.

`init` is idempotent and adopts a process group someone else created (Ray Train's TorchTrainer).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bigbatch.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None when no process group
    initialized: bool  # a process group exists

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV: DistEnv | None = None
_OWNS_GROUP = False  # True when init() created the group (so destroy() may tear it down)


def _int_env(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            try:
                return int(v)
            except ValueError:
                raise ConfigError(n, f"environment variable is not an integer: {v!r}") from None
    return None


SRUN_RANKS_ENV = "BIGBATCH_SRUN_RANKS"  # "1": the tasks of this srun step are the ranks of one run


def _slurm_tasks_per_node() -> int | None:
    # SLURM_STEP_TASKS_PER_NODE looks like "4(x2),3" — the first node's count is what we need.
    v = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not v:
        return None
    m = re.match(r"(\d+)", v)
    return int(m.group(1)) if m else None


def _slurm_tasks() -> int:
    """Tasks of this srun step, or of the allocation in a batch script."""
    return _int_env("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1


def srun_ranks() -> bool:
    """True in an srun step launched as the ranks of one run (BIGBATCH_SRUN_RANKS=1 + SLURM_STEP_ID)."""
    return (os.environ.get(SRUN_RANKS_ENV) == "1" and os.environ.get("SLURM_STEP_ID", "") != ""
            and "SLURM_PROCID" in os.environ)


def _torchrun_world() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def slurm_misfire() -> str | None:
    """Why this process, in a SLURM job of several tasks, is not one of those tasks' ranks, or None.

    For `bigbatch train` without a launcher: in a batch script with --ntasks=2 (one process, where
    two ranks were meant) or in an srun step of 2 tasks without BIGBATCH_SRUN_RANKS=1 (every task
    would train the whole run alone, into the same folder). Not asked inside Ray workers or
    torchrun ranks: those train as what their own launcher says."""
    if _torchrun_world() or srun_ranks() or "SLURM_JOB_ID" not in os.environ or _slurm_tasks() <= 1:
        return None
    n = _slurm_tasks()
    how = (f"start one rank per task with `srun --export=ALL,{SRUN_RANKS_ENV}=1 bigbatch train ...`, or "
           f"`bigbatch train --nproc {n}` on one node, or submit with `bigbatch slurm submit`")
    if os.environ.get("SLURM_STEP_ID", "") == "":
        return (f"SLURM_NTASKS={n}, but `bigbatch train` runs in the batch script, as one process, not as {n} ranks: "
                f"{how}; to train in one process run it under `srun --ntasks=1`")
    return (f"this srun step has {n} tasks and each would train the whole run alone (the step does not set "
            f"{SRUN_RANKS_ENV}=1, which makes its tasks the ranks of one run): {how}")


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        # "n[1-2],m3" -> "n1" without scontrol
        m = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
        return (m.group(1) + (m.group(2) or "")) if m else nodelist


def launcher_world() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from the environment, without side effects."""
    if _torchrun_world():
        rank = _int_env("RANK") or 0
        world = _int_env("WORLD_SIZE") or 1
        local_rank = _int_env("LOCAL_RANK") or 0
        local_world = _int_env("LOCAL_WORLD_SIZE") or world
        return rank, world, local_rank, local_world
    if srun_ranks() and _slurm_tasks() > 1:
        rank = _int_env("SLURM_PROCID") or 0
        world = _slurm_tasks()
        local_rank = _int_env("SLURM_LOCALID") or 0
        local_world = _slurm_tasks_per_node() or world
        return rank, world, local_rank, local_world
    return 0, 1, 0, 1


def world_size_hint() -> int:
    """The world size this process will run in (for validation before any work)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return launcher_world()[1]


def _export_slurm_as_torch(rank: int, world: int, local_rank: int, local_world: int) -> None:
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(local_world))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1"))
    if "MASTER_PORT" not in os.environ:
        job = _int_env("SLURM_JOB_ID") or 0
        os.environ["MASTER_PORT"] = str(20000 + job % 20000)


def resolve_backend(backend: str = "auto") -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("dist.backend", "nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    return backend


def init(backend: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Initialise (or adopt) the process group and pick the device. Idempotent."""
    global _ENV, _OWNS_GROUP
    if _ENV is not None and (not _ENV.initialized or dist.is_initialized()):
        return _ENV
    if dist.is_available() and dist.is_initialized():  # made by someone else (Ray Train)
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _int_env("LOCAL_RANK") or 0
        local_world = _int_env("LOCAL_WORLD_SIZE") or world
        backend_name = dist.get_backend()
        initialized = True
    else:
        rank, world, local_rank, local_world = launcher_world()
        launched = _torchrun_world() or world > 1
        backend_name = resolve_backend(backend)
        initialized = False
        if launched:
            if "RANK" not in os.environ:
                _export_slurm_as_torch(rank, world, local_rank, local_world)
            if backend_name == "nccl":
                torch.cuda.set_device(local_rank % torch.cuda.device_count())
            dist.init_process_group(backend=backend_name, timeout=datetime.timedelta(seconds=timeout_s))
            initialized = True
            _OWNS_GROUP = True
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    _ENV = DistEnv(rank, world, local_rank, local_world, device, backend_name if initialized else None, initialized)
    return _ENV


def destroy() -> bool:
    """Tear down the process group this module created (not one it adopted); True if it did."""
    global _ENV, _OWNS_GROUP
    owned = _OWNS_GROUP and dist.is_available() and dist.is_initialized()
    if owned:
        dist.destroy_process_group()
    _ENV = None
    _OWNS_GROUP = False
    return owned


# How the backends report a peer that stopped answering (torch 2.x): gloo raises a plain
# RuntimeError "Timed out waiting 15000ms for recv operation" or "Connection reset/closed by peer";
# NCCL's watchdog reports "Watchdog caught collective operation timeout" or an aborted communicator.
_TIMEOUT_MARKERS = ("timed out", "timeout")
_LOST_MARKERS = ("connection reset by peer", "connection closed by peer", "broken pipe", "communicator was aborted",
                 "socket closed", "connection refused")


def peer_failure(exc: BaseException) -> str | None:
    """"timeout" when a collective waited out the process-group timeout, "lost" when a peer's
    connection went away, None for any other error (searched along the exception's causes)."""
    seen = 0
    while exc is not None and seen < 8:
        text = str(exc).lower()
        if isinstance(exc, RuntimeError) or isinstance(exc, getattr(dist, "DistError", ())):
            if any(m in text for m in _TIMEOUT_MARKERS):
                return "timeout"
            if any(m in text for m in _LOST_MARKERS):
                return "lost"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank src's object on every rank (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def usable_cpus() -> int:
    """The cores this process may run on: a SLURM allocation, a cgroup cpuset or `taskset`
    gives fewer than the machine's `os.cpu_count()`, and threads sized by that oversubscribe."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int, *, cpu_only: bool = False, unless_omp: bool = False):
    """torch's intra-op thread count set to n inside the block, the caller's count restored after.
    cpu_only: left alone when a CUDA device is present (the GPU does the work); unless_omp: left
    alone when the user set OMP_NUM_THREADS (their choice stands). Many small steps or backward
    passes on shared cores: a second thread mostly spins (20-70x slower measured on a busy 2-core VM)."""
    before = torch.get_num_threads()
    if not (cpu_only and torch.cuda.is_available()) and not (unless_omp and "OMP_NUM_THREADS" in os.environ):
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a local rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_now(code: int) -> None:
    """End a process that had a process group, without the interpreter's finalization.

    Why: once DDP has wrapped a model, torch keeps the gloo group alive past
    destroy_process_group (the reducer, C++, holds it: measured with /proc/self/task, a 2-rank
    gloo group's worker threads are still running after destroy when DDP wrapped a model, and gone
    without DDP). A worker thread that is still dropping its last collective's tensors then needs
    the GIL while the interpreter is torn down: SIGABRT, "terminate called without an active
    exception", after the work was done and reported (about 1 in 20 two-rank runs on 2 busy cores;
    pytorch/pytorch#179291 describes the same crash). The caller has closed what it writes;
    logging and the standard streams are flushed here.
    """
    import gc
    import logging
    import sys

    gc.collect()  # files only a dropped traceback still held are closed (and flushed)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _spawned_rank(rank: int, world: int, port: int, backend: str, timeout_s: float, fn, args: tuple, queue) -> None:
    torch.set_num_threads(1)  # one core's worth per rank, like one GPU per rank
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init(backend, timeout_s)
    try:
        result = fn(*args)
        if rank == 0:
            queue.put(result)  # written to the pipe before put returns (SimpleQueue has no feeder thread)
        barrier()  # leave together: a rank whose peers have already gone can abort in gloo's teardown
    finally:
        destroy()
    exit_now(0)  # the group's threads may outlive destroy (see exit_now); an exception above exits as usual


def spawn_local(world: int, fn, *args, backend: str = "auto", timeout_s: float = 600.0):
    """Run fn(*args) on `world` spawned local processes that form one process group (127.0.0.1,
    a free port, one torch thread each); returns rank 0's result. fn must be picklable."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_spawned_rank, args=(world, free_port(), backend, timeout_s, fn, args, queue), nprocs=world,
                       join=True, start_method="spawn")
    return queue.get()
