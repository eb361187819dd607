"""The checkpointer: when a run saves ([checkpoint] every), what it saves (every component's
`state_dict()` under its own key) and how it comes back (a resumed run, or a branch started from
another run's checkpoint).

    progress     step, examples consumed (the example stream's position), training and wall time
    model        the module's weights          optimizer   its state (momentum, Adam moments)
    scaler       the AMP grad scaler           batch       the adaptive batch controller
    probes       the noise-scale EMAs          metrics     the loss summed since the last log row
    evaluator    the last evaluation, steps/examples to target
    rng          every rank's RNG state

A save is a collective (the probes' rank average, the RNG states), so every rank saves together;
the logging rank writes the file (`bigbatch.trainer.checkpoint`: temp file + rename, the newest
checkpoint.keep kept).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from bigbatch.config import CheckpointConfig
from bigbatch.distributed import env as dist_env
from bigbatch.errors import ConfigError
from bigbatch.trainer import checkpoint as ckpt
from bigbatch.trainer.rundir import NullRunDir
from bigbatch.trainer.stream import ExampleStream

log = logging.getLogger("bigbatch")

Saved = tuple[Path, dict[str, Any], list]  # (path, state, checkpoints that did not load)


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def select_checkpoint(run_dir: Path, env: dist_env.DistEnv) -> Saved:
    """(path, state, bad ones) of the newest checkpoint that loads. Rank 0 chooses and every rank
    loads that file; ConfigError("--resume") on every rank when none loads. Changes nothing on disk."""
    chosen, error = None, None
    if env.is_main:
        try:
            path, state, bad = ckpt.select(run_dir, map_location=env.device)
            chosen = (str(path), [(str(p), why) for p, why in bad])
        except ckpt.NoCheckpointError as e:
            error = str(e)
    chosen, error = dist_env.broadcast_object((chosen, error))
    if error is not None:
        raise ConfigError("--resume", error)
    if not env.is_main:
        state = ckpt.load(chosen[0], map_location=env.device)
    return Path(chosen[0]), state, [(Path(p), why) for p, why in chosen[1]]


class RankRNG:
    """Every rank's RNG state (a collective to save), each rank restoring its own."""

    def __init__(self, env: dist_env.DistEnv):
        self.env = env

    def state_dict(self) -> list[dict[str, Any]]:
        states = [ckpt.rng_state()]
        if self.env.initialized:
            states = [None] * self.env.world_size
            dist.all_gather_object(states, ckpt.rng_state())
        return states

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        rank = self.env.rank
        ckpt.set_rng_state(states[rank] if rank < len(states) else states[0])


class Checkpointer:
    def __init__(self, section: CheckpointConfig, env: dist_env.DistEnv, run_dir: NullRunDir, tracker,
                 stream: ExampleStream, components: dict[str, Stateful]):
        self.every = section.every
        self.env, self.run_dir, self.tracker, self.stream = env, run_dir, tracker, stream
        self.components = components

    def after_step(self, p) -> None:
        """A periodic checkpoint every checkpoint.every steps (the last step's comes from `at_end`)."""
        if self.every and p.step % self.every == 0 and not p.last:
            self.save(p)

    def at_end(self, p, status: str, signum: int | None = None) -> None:
        """The final state (`bigbatch interpolate` and fine-tuning read it) or a stop signal's state
        (to resume); nothing after a divergence (the weights are not finite) or a stop rule."""
        if status in ("completed", "target_reached", "preempted"):
            self.save(p)
        if status == "preempted":
            log.warning("stop signal %s: checkpointed at step %d; continue with `bigbatch train --resume %s`",
                        signum if signum is not None else "?", p.step, self.run_dir.path)

    def save(self, p) -> None:
        self.tracker.flush()  # metrics.jsonl holds every row up to the checkpoint: a resume truncates it there
        state = {"progress": p.state_dict(), "rng": RankRNG(self.env).state_dict()}
        state.update({name: c.state_dict() for name, c in self.components.items()})  # same order on every rank
        error = self.run_dir.save_checkpoint(p.step, state)
        if (error := dist_env.broadcast_object(error)) is not None:  # full disk, unwritable: every rank stops
            raise ckpt.CheckpointWriteError(error)

    def restore(self, saved: Saved | None, p) -> None:
        """A resumed run: every component from its key, the example stream at the saved position,
        metrics.jsonl cut back to the saved step, the RNG last."""
        if saved is None:
            return
        path, state, bad = saved
        self.run_dir.set_aside(bad, path)  # the ones that did not load: one warning
        for name, c in self.components.items():
            c.load_state_dict(state[name])
        p.load_state_dict(state["progress"])
        self.stream.position = p.examples
        self.tracker.rewind(p.step)  # metrics.jsonl cut back to the saved step
        self.tracker.progress(p.step)
        RankRNG(self.env).load_state_dict(state["rng"])
        log.info("resumed from %s at step %d (%d examples)", path, p.step, p.examples)

    def branch_from(self, path: str | Path, p) -> None:
        """Start from another run's checkpoint (a branch point): its weights, its optimizer state
        (SGD's momentum buffers, Adam's moments: kept, as in continuing that run) and its position
        in the example stream, so the branch sees the examples that run would have seen next. The
        optimizer's settings (lr, momentum, weight decay) and the batch are this run's; steps count
        from 0 and examples on from the branch point; the RNG continues the base run's."""
        try:
            state = ckpt.load(path, map_location=self.env.device)
        except (OSError, ValueError, RuntimeError) as e:
            raise ConfigError("init_from", f"cannot load checkpoint {str(path)!r}: {e}") from None
        self.components["model"].load_state_dict(state["model"])
        optimizer = self.components["optimizer"]
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(state["optimizer"])
        for group, mine in zip(optimizer.param_groups, settings):
            group.update(mine)
        p.examples = int(state["progress"]["examples"])
        self.stream.position = p.examples
        RankRNG(self.env).load_state_dict(state["rng"])  # a k = 1 branch continues the base run exactly
        log.info("branched from %s (step %d, %d examples)", path, state["progress"]["step"], p.examples)
