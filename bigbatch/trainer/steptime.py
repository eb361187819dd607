"""Where a training step's time goes: data wait, compute, exposed communication.

The loop calls one `StepTimer` at a few fixed points of a step:

    timer.start()                          step begins
    timer.data_ready(sync)                 a micro-batch is on the device (index, load, copy);
                                           `sync`: its backward all-reduces the gradients
    timer.backward_done()                  forward + backward of the micro-batch returned
    timer.lap("other")                     online probes (GNS norms, ...): not compute, not logged
    timer.lap("compute")                   optimizer step (and scaler update, zero_grad)
    timer.stop()                           step ends

Each is one call with no nested call but the clock's (they are on every step's hot path: on a
~1 ms CPU step each call is worth ~1 us); the loop makes the "other" lap only when a probe runs.

and reads it at log steps (`read()` -> per-step means in seconds):
`time/data(s)`, `time/compute(s)` (forward + backward + optimizer), `time/comm_exposed(s)` and
`time/step(s)`. step - (data + compute + comm_exposed) is the loop's own bookkeeping and the
probes.

Exposed communication is the part of DDP's gradient all-reduce that backward did not hide
(the quantity torchtitan and DeepSpeed call exposed comm): DDP starts a bucket's all-reduce as
soon as its gradients are ready and, at the end of backward, waits for all of them. A
post-accumulate-grad hook on the parameter whose gradient is produced last marks the end of
backward's arithmetic; from there until `backward()` returns is communication nothing overlapped.
The last parameter is found on the first synchronising backward (hooks on all parameters, once)
and only its hook is kept. One process without a process group has no all-reduce: 0.

Clocks: `time.perf_counter` on CPU. On GPU, CUDA events on the current stream, kept until the
next `read()`, which synchronises once on the last event: no host sync per step, and the
intervals are on the device timeline (a data interval is then time the GPU waited for the batch).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

KINDS = ("data", "compute", "comm_exposed", "other")
_START = "start"


class _HostClock:
    mark = staticmethod(time.perf_counter)

    def seconds(self, a: float, b: float) -> float:
        return b - a

    def settle(self, last: Any) -> None:
        pass

    def reset(self) -> None:
        pass


class _CudaClock:
    """CUDA events from a pool that is reused after every read (all its events have completed)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._pool: list[torch.cuda.Event] = []
        self._used = 0

    def mark(self) -> torch.cuda.Event:
        if self._used == len(self._pool):
            self._pool.append(torch.cuda.Event(enable_timing=True))
        ev = self._pool[self._used]
        self._used += 1
        ev.record()
        return ev

    def seconds(self, a: torch.cuda.Event, b: torch.cuda.Event) -> float:
        return a.elapsed_time(b) / 1000.0

    def settle(self, last: torch.cuda.Event) -> None:
        last.synchronize()  # the one host sync, at log steps only

    def reset(self) -> None:
        self._used = 0


class StepTimer:
    """Step-time breakdown; see the module docstring for where the loop calls it.

    `params`: the model's parameters, for the exposed-communication hook; None (or an empty list)
    when there is no all-reduce (one process), which makes comm_exposed 0.
    """

    def __init__(self, device: torch.device, params: list[nn.Parameter] | None = None):
        self._clock = _CudaClock(device) if device.type == "cuda" else _HostClock()
        self._now = self._clock.mark  # bound once: the laps are on every step's hot path
        self._marks: list[tuple[str, Any]] = []  # (kind of the interval that ends here, time stamp)
        self._add = self._marks.append
        self._steps = 0
        self._armed = False  # the hook stamps only during a synchronising backward
        self._grad_mark: Any = None
        self._handles: list[Any] = []
        self._last_idx: int | None = None
        params = [p for p in (params or []) if p.requires_grad]
        for i, p in enumerate(params):  # all of them until the first synchronising backward shows the last one
            self._handles.append(p.register_post_accumulate_grad_hook(lambda _p, i=i: self._on_grad(i)))

    def _on_grad(self, i: int) -> None:
        if self._armed:
            self._grad_mark = self._now()
            self._last_idx = i

    def start(self) -> None:
        self._add((_START, self._now()))

    def lap(self, kind: str) -> None:
        """The time since the previous mark was spent on `kind` (one of KINDS)."""
        self._add((kind, self._now()))

    def data_ready(self, sync: bool) -> None:
        """A micro-batch is ready (the time since the last mark was data); `sync` when its
        backward all-reduces the gradients (the exposed-communication hook stamps only then)."""
        self._add(("data", self._now()))
        if self._handles:
            self._armed = sync
            self._grad_mark = None

    def backward_done(self) -> None:
        """After backward returned: compute up to the last gradient, exposed communication after it."""
        if self._armed:
            self._armed = False
            if self._grad_mark is not None:
                self._add(("compute", self._grad_mark))
                self._add(("comm_exposed", self._now()))
                if len(self._handles) > 1 and self._last_idx is not None:  # keep only the last parameter's hook
                    for i, h in enumerate(self._handles):
                        if i != self._last_idx:
                            h.remove()
                    self._handles = [self._handles[self._last_idx]]
                return
        self._add(("compute", self._now()))

    def stop(self) -> None:
        self._add(("other", self._now()))  # whatever ran after the last lap
        self._steps += 1

    def read(self) -> dict[str, float]:
        """Per-step means since the last read, in seconds, under the metric keys; then reset."""
        totals = dict.fromkeys(KINDS, 0.0)
        if self._marks:
            self._clock.settle(self._marks[-1][1])
            seconds = self._clock.seconds
            prev = None
            for kind, stamp in self._marks:  # a step's laps tile it from its start mark to its stop
                if kind is not _START:
                    totals[kind] += seconds(prev, stamp)
                prev = stamp
        step_total = sum(totals.values())
        n = max(self._steps, 1)
        self._marks.clear()
        self._clock.reset()
        self._steps = 0
        return {
            "time/data(s)": totals["data"] / n,
            "time/compute(s)": totals["compute"] / n,
            "time/comm_exposed(s)": totals["comm_exposed"] / n,
            "time/step(s)": step_total / n,
        }

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
