"""The run folder: its file names and every write into it, decided once for the logging rank.

    config.toml     the resolved config (written before training starts)
    metrics.jsonl   one JSON object per logged step (`bigbatch.track`; truncated to the checkpoint on resume)
    train.log       the run's log, with the traceback of a failure
    checkpoint.pt   the latest checkpoint (`bigbatch.trainer.checkpoint`: temp file + rename)
    summary.json    the final summary (temp file + rename)

`open_run_dir(path, is_main)` returns a `RunDir` on the logging rank and a `NullRunDir` (same
path, writes nothing) on every other rank, as tracking does with its do-nothing sink, so the
loop has no rank branches for files.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from bigbatch import config as config_mod
from bigbatch.track import JSONL, truncate_after
from bigbatch.trainer import checkpoint as ckpt

log = logging.getLogger("bigbatch")

CONFIG = "config.toml"
SUMMARY = "summary.json"
LOG = "train.log"
METRICS = JSONL
CHECKPOINT = ckpt.FILENAME


def default_run_dir(cfg: config_mod.Config) -> Path:
    """runs/<name>-<time> (with -2, -3, ... when taken)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{cfg.name}-{stamp}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    return path


class NullRunDir:
    """The run folder as a rank that does not log sees it: its paths, and writes that do nothing."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    def create(self, cfg: config_mod.Config) -> None:
        pass

    def start_logging(self) -> None:
        _setup_logging(None, logging.WARNING)

    def truncate_metrics(self, step: int) -> None:
        pass

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        pass

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass


class RunDir(NullRunDir):
    """The logging rank's run folder."""

    def create(self, cfg: config_mod.Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, self.path / CONFIG)

    def start_logging(self) -> None:
        _setup_logging(self.path / LOG, logging.INFO)

    def truncate_metrics(self, step: int) -> None:
        """Drop metrics rows after `step` (a resumed run logs them again)."""
        truncate_after(self.metrics, step)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        ckpt.save(self.checkpoint, state)

    def write_summary(self, summary: dict[str, Any]) -> None:
        tmp = self.path / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.path / SUMMARY)


def open_run_dir(path: str | Path, is_main: bool) -> NullRunDir:
    return RunDir(path) if is_main else NullRunDir(path)


def _setup_logging(log_file: Path | None, level: int) -> None:
    log.handlers.clear()
    log.propagate = False
    log.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    log.addHandler(h)
    if log_file is not None:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)
