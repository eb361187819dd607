"""All-reduce algorithms of the large-batch literature on torch.distributed point-to-point ops.

- `ring_allreduce`: reduce-scatter then all-gather around one ring, 2(n-1) steps
  (Patarasuk & Yuan 2009; what NCCL and Horovod use). Each step's segment is cut into chunks
  and every chunk is forwarded as soon as it has arrived and been added, so a large tensor
  pipelines through the ring instead of waiting for whole segments.
- `torus2d_allreduce`: Mikami et al. 2018 on a rows x cols grid: reduce-scatter along each
  horizontal ring (cols ranks), all-reduce the 1/cols shard along each vertical ring (rows
  ranks), all-gather along each horizontal ring. 2(cols-1) + 2(rows-1) latency steps instead of
  2(rows*cols - 1), with the same bytes on the wire as one flat ring.
- `hierarchical_allreduce`: Horovod / Goyal et al. 2017 style: reduce inside each node to its
  first rank (binomial tree), ring all-reduce among those leaders, broadcast inside each node.

All three sum in place, for any world size and any tensor length (segments differ by at most
one element), for floating and integer dtypes, on gloo and NCCL (every exchange is one
`batch_isend_irecv`, which NCCL needs so that a send and a receive to the same peer do not
deadlock). bf16/fp16 travel in their own dtype, as NCCL does; every addition is computed in
fp32 and rounded once per hop, and hierarchical's intra-node reduce (cheap, fast links)
accumulates in fp32 outright.

No algorithm creates process groups: the torus's rows and columns, hierarchical's nodes and
its ring of leaders are sets of group ranks of the parent group that exchange point-to-point.
(Subgroups would have to be created by every rank in the same order: torch names groups by a
per-process counter, so a subgroup made by only some ranks, e.g. under a parent subgroup,
desynchronises every later group creation. NCCL creates and caches its per-pair
communicators on first use, which is the "built once" the torus needs.)
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from bigbatch.errors import ConfigError
from bigbatch.topology import check_local_size, divisors, most_square_rows, torus_shape  # noqa: F401 (re-exported)

DEFAULT_CHUNK_BYTES = 4 << 20
"""Pipelining granularity of the ring: segments larger than this are sent in chunks."""

LOW_PRECISION = (torch.bfloat16, torch.float16)


# --- shapes and their validation (shared by the hooks and the benchmark) -----------------------


# --- groups ------------------------------------------------------------------------------------

def _parent(group) -> tuple[object, list[int]]:
    g = group if group is not None else dist.group.WORLD
    return g, dist.get_process_group_ranks(g)


# --- the ring ------------------------------------------------------------------------------------


def _bounds(length: int, parts: int, i: int) -> tuple[int, int]:
    """[start, stop) of part i when `length` elements are split into `parts` nearly equal parts."""
    base, rem = divmod(length, parts)
    start = i * base + min(i, rem)
    return start, start + base + (1 if i < rem else 0)


def _ring_steps(flat: torch.Tensor, group, ring: list[int], first: int, last: int, chunk_bytes: int) -> None:
    """Run steps [first, last) of the 2(n-1)-step ring on a 1-D contiguous tensor.

    `ring` lists the group ranks of the ring in order (this rank among them): a row or a column
    of the torus talks point-to-point inside the parent group, without a subgroup of its own.
    Position q in the ring at step s sends segment (q - s) mod n to the right neighbour and receives segment (q - s - 1)
    mod n from the left one; steps 0..n-2 add what arrives (reduce-scatter, after which rank q
    owns the full sum of segment (q + 1) mod n), steps n-1..2n-3 overwrite (all-gather).
    Chunk j of step s+1 is sent as soon as chunk j of step s has arrived, so up to one step per
    chunk is in flight: the pipeline.
    """
    n = len(ring)
    q = ring.index(dist.get_rank(group))
    right, left = ring[(q + 1) % n], ring[(q - 1) % n]
    seg = [_bounds(flat.numel(), n, i) for i in range(n)]
    seg_len = max(b - a for a, b in seg)
    chunks = max(1, math.ceil(seg_len * flat.element_size() / chunk_bytes))
    # two receive buffers, alternating by step: a step's buffer is reused two steps later,
    # after every chunk of its previous use has been added.
    bufs = [torch.empty(seg_len, dtype=flat.dtype, device=flat.device) for _ in range(2)] if first < n - 1 else []
    pending: dict[int, tuple] = {}

    def finish(j: int) -> None:
        works, target, received = pending.pop(j)
        for w in works:
            w.wait()
        if received is not None:
            target.add_(received)

    for s in range(first, last):
        reduce = s < n - 1
        send_a, send_b = seg[(q - s) % n]
        recv_a, recv_b = seg[(q - s - 1) % n]
        for j in range(chunks):
            if j in pending:
                finish(j)
            a, b = _bounds(send_b - send_a, chunks, j)
            c, d = _bounds(recv_b - recv_a, chunks, j)
            ops, received, target = [], None, flat[recv_a + c:recv_a + d]
            tag = s * chunks + j
            if b > a:
                ops.append(dist.P2POp(dist.isend, flat[send_a + a:send_a + b], group=group, group_peer=right, tag=tag))
            if d > c:
                # reduce steps land in a buffer and are added; gather steps land in place
                received = bufs[s % 2][c:d] if reduce else None
                ops.append(dist.P2POp(dist.irecv, received if reduce else target, group=group, group_peer=left, tag=tag))
            pending[j] = (dist.batch_isend_irecv(ops) if ops else [], target, received)
    for j in sorted(pending):
        finish(j)


class _Flat:
    """A contiguous 1-D view of `tensor` for the duration of a with-block, written back after."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.work = tensor if tensor.is_contiguous() else tensor.contiguous()

    def __enter__(self) -> torch.Tensor:
        return self.work.view(-1)

    def __exit__(self, *exc) -> None:
        if self.work is not self.tensor and exc[0] is None:
            self.tensor.copy_(self.work)


def ring_allreduce(tensor: torch.Tensor, group=None, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Sum `tensor` over `group` (default: the world) in place with the ring algorithm; returns it.

    Time model (alpha-beta): 2(n-1)·alpha + 2(n-1)/n · bytes/beta.
    """
    group, _ = _parent(group)
    n = dist.get_world_size(group)
    if n == 1 or tensor.numel() == 0:
        return tensor
    with _Flat(tensor) as flat:
        _ring_steps(flat, group, list(range(n)), 0, 2 * (n - 1), chunk_bytes)
    return tensor


def torus2d_allreduce(tensor: torch.Tensor, rows: int, cols: int, group=None, *,
                      chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Sum in place with Mikami et al.'s 2D-torus all-reduce on a rows x cols grid of the group.

    Group rank q sits in row q // cols, column q % cols. Horizontal rings are the rows (cols
    ranks each), vertical rings the columns (rows ranks each).
    """
    group, parent_ranks = _parent(group)
    n = len(parent_ranks)
    if rows * cols != n:
        raise ConfigError("dist.torus_rows", f"a {rows} x {cols} grid does not match the world size {n}")
    if n == 1 or tensor.numel() == 0:
        return tensor
    row, col = divmod(dist.get_rank(group), cols)
    row_ring = [row * cols + c for c in range(cols)]
    col_ring = [r * cols + col for r in range(rows)]
    with _Flat(tensor) as flat:
        if cols > 1:  # 1. reduce-scatter along the row: this rank now owns segment (col + 1) mod cols
            _ring_steps(flat, group, row_ring, 0, cols - 1, chunk_bytes)
            a, b = _bounds(flat.numel(), cols, (col + 1) % cols)
        else:
            a, b = 0, flat.numel()
        if rows > 1 and b > a:  # 2. all-reduce that shard along the column (same column = same shard)
            _ring_steps(flat[a:b], group, col_ring, 0, 2 * (rows - 1), chunk_bytes)
        if cols > 1:  # 3. all-gather along the row
            _ring_steps(flat, group, row_ring, cols - 1, 2 * (cols - 1), chunk_bytes)
    return tensor


def hierarchical_allreduce(tensor: torch.Tensor, local_size: int, group=None, *,
                           chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Sum in place: reduce inside each node, ring all-reduce among node leaders, broadcast.

    Nodes are consecutive blocks of `local_size` group ranks (torchrun / SLURM numbering); the
    first rank of each block is its leader. The intra-node reduce and broadcast use the
    backend's own collectives (NVLink on a GPU node); only leaders cross nodes.
    """
    group, parent_ranks = _parent(group)
    n = len(parent_ranks)
    check_local_size(n, local_size)
    if n == 1 or tensor.numel() == 0:
        return tensor
    if local_size == 1:
        return ring_allreduce(tensor, group, chunk_bytes=chunk_bytes)
    node, local_rank = divmod(dist.get_rank(group), local_size)
    nodes = n // local_size
    members = list(range(node * local_size, (node + 1) * local_size))
    # accumulate low precision in fp32 inside the node, where bandwidth is cheap
    acc = tensor.float() if tensor.dtype in LOW_PRECISION else tensor
    acc = acc if acc.is_contiguous() else acc.contiguous()
    _tree_reduce(acc, group, members)
    if local_rank == 0:
        if nodes > 1:  # the leaders' ring, point-to-point inside the parent group
            ring = [k * local_size for k in range(nodes)]
            if acc is not tensor and tensor.is_contiguous():
                tensor.copy_(acc)  # cross nodes in the tensor's own dtype (half the bytes of fp32)
                acc = tensor
            _ring_steps(acc.view(-1), group, ring, 0, 2 * (nodes - 1), chunk_bytes)
    out = tensor if tensor.is_contiguous() else torch.empty_like(tensor, memory_format=torch.contiguous_format)
    if local_rank == 0 and acc is not out:
        out.copy_(acc)
    _tree_broadcast(out, group, members)
    if out is not tensor:
        tensor.copy_(out)
    return tensor


def _tree_reduce(acc: torch.Tensor, group, members: list[int]) -> None:
    """Binomial-tree sum of `acc` onto members[0] in ceil(log2 L) rounds (point-to-point)."""
    p, size = members.index(dist.get_rank(group)), len(members)
    buf = None
    step = 1
    while step < size:
        if p % (2 * step) == step:
            dist.send(acc, group=group, group_dst=members[p - step])
            return
        if p % (2 * step) == 0 and p + step < size:
            buf = torch.empty_like(acc) if buf is None else buf
            dist.recv(buf, group=group, group_src=members[p + step])
            acc.add_(buf)
        step *= 2


def _tree_broadcast(out: torch.Tensor, group, members: list[int]) -> None:
    """Binomial-tree broadcast of members[0]'s `out` to the others, the reduce in reverse."""
    p, size = members.index(dist.get_rank(group)), len(members)
    step = 1
    while step * 2 < size:
        step *= 2
    while step >= 1:
        if p % (2 * step) == step:
            dist.recv(out, group=group, group_src=members[p - step])
        elif p % (2 * step) == 0 and p + step < size:
            dist.send(out, group=group, group_dst=members[p + step])
        step //= 2


ALGORITHMS = ("builtin", "ring", "torus2d", "hierarchical")


def allreduce(tensor: torch.Tensor, algo: str, *, group=None, rows: int | None = None, local_size: int | None = None,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    """Dispatch by name (the values of `dist.allreduce`); builtin = the backend's dist.all_reduce."""
    if algo == "builtin":
        dist.all_reduce(tensor, group=group)
        return tensor
    if algo == "ring":
        return ring_allreduce(tensor, group, chunk_bytes=chunk_bytes)
    n = dist.get_world_size(group)
    if algo == "torus2d":
        r, c = torus_shape(n, rows)
        return torus2d_allreduce(tensor, r, c, group, chunk_bytes=chunk_bytes)
    if algo == "hierarchical":
        if local_size is None:
            raise ConfigError("dist.local_size", "hierarchical all-reduce needs the number of ranks per node")
        return hierarchical_allreduce(tensor, local_size, group, chunk_bytes=chunk_bytes)
    raise ConfigError("dist.allreduce", f"unknown algorithm {algo!r}; expected one of {', '.join(ALGORITHMS)}")
