"""Metrics sinks: metrics.jsonl always, W&B on rank 0, a reporter callback (Ray Tune), a progress bar.

The logging rank is decided once (`make_tracker`): rank 0 gets a real `Tracker`, every other rank
a `NullTracker` that does nothing, so the loop never asks "am I rank 0?".

W&B is initialised on rank 0 only and after the process group exists (initialising it on every
rank or during rendezvous gives one empty run per rank, or a hang). Without an API key it runs in
offline mode; `wandb sync RUN_DIR/wandb/offline-run-*` uploads later. No key is ever written to
the run folder.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from bigbatch import folders

FLUSH_S = 1.0  # metrics.jsonl reaches the disk at least this often (and at every checkpoint and at close)


def _plain(v: Any) -> Any:
    if type(v) is int or type(v) is str or v is None:  # most of a row; no attribute lookups
        return v
    if hasattr(v, "item"):  # a tensor or numpy scalar
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf: a diverged loss is logged as null
    return v


def wandb_mode() -> str:
    """WANDB_MODE if set; online when an API key is configured; otherwise offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        if netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


class NullTracker:
    """What every rank but 0 gets."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def progress(self, step: int, text: str = "") -> None:
        pass

    def flush(self) -> None:
        pass

    def rewind(self, step: int) -> None:
        """Drop the rows after `step` (a resumed run logs them again)."""

    def close(self, exit_code: int = 0) -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        # a run that failed with an exception keeps every row it logged
        if kind is not None:
            self.flush()


class Tracker(NullTracker):
    def __init__(self, run_dir: Path, cfg_dict: dict[str, Any], track_cfg, total_steps: int, start_step: int = 0,
                 reporter: Callable[[dict[str, Any]], None] | None = None, run_name: str | None = None):
        self.run_dir = Path(run_dir)
        # buffered, flushed every FLUSH_S: a write per row is a system call on the training loop's path;
        # rows are encoded when flushed, all together: one json.dumps on the loop's path, between
        # training steps, costs ~10x what it costs in a run of them (38 vs ~4 us for a row in the MLP loop)
        self._path = folders.RunFolder(self.run_dir).metrics
        self._jsonl = self._path.open("a")
        self._rows: list[dict[str, Any]] = []
        self._flushed = -math.inf  # the first row goes to disk at once: a run that started shows it
        self._reporter = reporter
        self._wandb = None
        if track_cfg.wandb:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb = wandb.init(
                project=track_cfg.project, entity=track_cfg.entity, group=track_cfg.group, tags=list(track_cfg.tags),
                name=run_name or self.run_dir.name, config=cfg_dict, dir=str(self.run_dir), mode=wandb_mode(),
                resume="allow", id=_wandb_id(self.run_dir),
            )
        self._bar = None
        show = track_cfg.progress == "on" or (track_cfg.progress == "auto" and sys.stderr.isatty())
        if show:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=True)
            self._bar_step = start_step

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _plain(v) for k, v in row.items()}
        self._rows.append(row)
        if time.monotonic() - self._flushed >= FLUSH_S:
            self.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}, step=row["step"])
        if self._reporter is not None:
            self._reporter(row)

    def progress(self, step: int, text: str = "") -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar_step)
            self._bar_step = step
            if text:
                self._bar.set_postfix_str(text, refresh=False)

    def flush(self) -> None:
        if self._rows:
            self._jsonl.write("".join([json.dumps(r) + "\n" for r in self._rows]))
            self._rows.clear()
        self._jsonl.flush()
        self._flushed = time.monotonic()

    def rewind(self, step: int) -> None:
        self.flush()
        self._jsonl.close()
        truncate_after(self._path, step)
        self._jsonl = self._path.open("a")

    def close(self, exit_code: int = 0) -> None:
        self.flush()
        self._jsonl.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish(exit_code=exit_code)
            self._wandb = None


def _wandb_id(run_dir: Path) -> str:
    """A W&B run id stored in the run folder, so a resumed run continues the same W&B run."""
    path = folders.RunFolder(run_dir).wandb_id
    if path.exists():
        return path.read_text().strip()
    import uuid

    rid = uuid.uuid4().hex[:12]
    path.write_text(rid)
    return rid


def make_tracker(is_main: bool, *args, **kwargs) -> NullTracker:
    return Tracker(*args, **kwargs) if is_main else NullTracker()


def truncate_after(path: Path, step: int) -> None:
    """Drop metrics rows after `step` (a resumed run re-logs them), atomically."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a kill mid-write
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(l + "\n" for l in keep))
    os.replace(tmp, path)
