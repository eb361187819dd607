"""Atomic save and restore of everything a run needs to continue exactly where it stopped, with
the last `checkpoint.keep` checkpoints kept to fall back on.

A checkpoint holds one key per component of the run (`bigbatch.trainer.checkpointer`: progress,
model, optimizer, scaler, batch, probes, metrics, evaluator, rng). It only holds tensors and plain
Python values, so it loads with `weights_only=True`. Checkpoints of format 1 (one "loop" and one
"measure" key) are read as format 2.

Files in the run folder:
- `checkpoint-<step>.pt` (step zero-padded to 8 digits): one per save, written to a temporary
  file, flushed to disk and renamed, so a crash or a full disk mid-write never leaves a partial
  file under that name. After a save only the newest `keep` of them remain.
- `checkpoint.pt`: a relative symlink to the newest one (replaced atomically), so readers such
  as `bigbatch interpolate` keep one name. Where the file system has no symlinks it is a hard
  link or a copy.
On resume the newest file that loads is used (`select`); one that does not (truncated by a lost
node, garbage, another format) is named in one warning and renamed `*.pt.corrupt` out of the
rotation, and the previous one is used. Run folders from before `keep` existed hold only a plain
`checkpoint.pt`; it is read the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from bigbatch import folders

log = logging.getLogger("bigbatch")

FILENAME = folders.CHECKPOINT  # the newest checkpoint, whatever its step
FORMAT = 2


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, quota, unwritable folder). The previous
    checkpoint is intact; the message says which one it is."""


class NoCheckpointError(RuntimeError):
    """No checkpoint in the run folder loads; the message names each one and why."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


step_file = folders.checkpoint_file


def candidates(run_dir: str | Path) -> list[Path]:
    """The run folder's checkpoints, newest first: the step files, else a plain checkpoint.pt."""
    run_dir = Path(run_dir)
    steps = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = folders.CHECKPOINT_STEP.match(p.name)
            if m and p.is_file():
                steps.append((int(m.group(1)), p))
    if steps:
        return [p for _, p in sorted(steps, reverse=True)]
    latest = run_dir / FILENAME
    return [latest] if latest.is_file() else []


def latest(run_dir: str | Path) -> Path | None:
    """The newest checkpoint file (not checked to load), or None."""
    found = candidates(run_dir)
    return found[0] if found else None


class _WriteRecorder:
    """A file wrapper that remembers the OSError of a failed write: torch.save turns it into a
    RuntimeError without the errno ("unexpected pos ..."), and the user needs "No space left"."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _write_atomic(path: Path, state: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".checkpoint-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            out = _WriteRecorder(f)
            try:
                torch.save({"format": FORMAT, **state}, out)
            except RuntimeError:
                if out.error is not None:
                    raise out.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _point_latest_at(target: Path) -> None:
    """checkpoint.pt -> target, replaced atomically (symlink; hard link or copy without symlinks)."""
    link = target.parent / FILENAME
    tmp = target.parent / f".{FILENAME}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target.name, tmp)
    except OSError:
        try:
            os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
    os.replace(tmp, link)


def save(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` atomically to exactly `path` (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, state)


def save_step(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoint-<step>.pt, point checkpoint.pt at it, keep the newest `keep` step files.

    Raises CheckpointWriteError when the file cannot be written (ENOSPC, EFBIG, EACCES, ...): the
    temporary file is removed and every earlier checkpoint is left as it was.
    """
    run_dir = Path(run_dir)
    path = step_file(run_dir, step)
    previous = latest(run_dir)
    try:
        _write_atomic(path, {**state, "step": step})
        _point_latest_at(path)
    except OSError as e:
        kept = f"the previous checkpoint {previous} is intact" if previous and previous != path else "no earlier checkpoint exists"
        raise CheckpointWriteError(f"could not write checkpoint {path} ({e.strerror or e}); {kept}") from e
    for old in candidates(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's state (ValueError for another format). mmap=True maps the tensors instead
    of reading them: a cheap check that the file is whole, for a launcher."""
    state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    fmt = state.get("format") if isinstance(state, dict) else type(state).__name__
    if fmt == 1:
        return _from_format_1(state)
    if fmt != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {fmt!r}")
    return state


def _from_format_1(state: dict[str, Any]) -> dict[str, Any]:
    """Format 1 kept the loop's bookkeeping under "loop" and the probes' and batch controller's
    state under "measure"; format 2 has one key per component."""
    loop, measure = state["loop"], state.get("measure") or {}
    gns = measure.get("gns")
    return {
        "format": FORMAT, "step": state.get("step", loop["step"]), "model": state["model"],
        "optimizer": state["optimizer"], "scaler": state["scaler"], "rng": state["rng"],
        "progress": {k: loop[k] for k in ("step", "examples", "train_time_s", "wall_s")},
        "evaluator": {"last": loop["last_eval"], "last_step": loop["last_eval_step"],
                      "steps_to_target": loop["steps_to_target"], "examples_to_target": loop["examples_to_target"],
                      "pending": loop.get("eval_pending", False)},
        # each rank's loss sum since the last row where kept, else rank 0's (the value in "loop")
        "metrics": {"loss_sum": state.get("interval_loss") or [loop["interval_loss"]], "count": loop["interval_count"]},
        "probes": {"gns": {"estimator": gns, "steps": 0} if gns else None},
        "batch": measure.get("controller"),
    }


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def select(run_dir: str | Path, map_location: str | torch.device = "cpu",
           mmap: bool = False) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]]:
    """(path, state, [(bad path, why), ...]) of the newest checkpoint that loads.

    Changes nothing on disk. Raises NoCheckpointError (naming each file and why) when none loads.
    """
    bad: list[tuple[Path, str]] = []
    found = candidates(run_dir)
    for path in found:
        try:
            return path, load(path, map_location, mmap), bad
        except Exception as e:  # truncated zip, unpickling garbage, another format: try the previous one
            bad.append((path, _why(e)))
    if not found:
        raise NoCheckpointError(f"no checkpoint in {str(run_dir)!r}")
    raise NoCheckpointError(f"no checkpoint in {str(run_dir)!r} loads: "
                            + "; ".join(f"{p.name}: {why}" for p, why in bad))


def set_aside(bad: list[tuple[Path, str]], used: Path) -> None:
    """Warn once about the checkpoints that did not load and rename them `*.corrupt`, out of the
    rotation (kept for inspection); checkpoint.pt then points at the one used."""
    if not bad:
        return
    names = ", ".join(f"{p.name} ({why})" for p, why in bad)
    log.warning("checkpoint: %s did not load; resuming from %s, the newest one that does", names, used.name)
    for p, _ in bad:
        if p.name != FILENAME:
            os.replace(p, p.with_name(p.name + ".corrupt"))
    if used.name != FILENAME:
        _point_latest_at(used)
