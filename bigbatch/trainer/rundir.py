"""The run folder as a training run writes it: every write into it, decided once for the logging
rank (the file names and readers are `bigbatch.folders`').

`open_run_dir(path, is_main)` returns a `RunDir` on the logging rank and a `NullRunDir` (same
path, writes nothing) on every other rank, as tracking does with its do-nothing sink, so the
loop has no rank branches for files.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from bigbatch import config as config_mod
from bigbatch import folders
from bigbatch.trainer import checkpoint as ckpt

log = logging.getLogger("bigbatch")


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

    def __init__(self, path: str | Path, keep: int = 2):
        self.path = Path(path)
        self.files = folders.RunFolder(path)
        self.keep = keep

    def create(self, cfg: config_mod.Config) -> None:
        pass

    def start_logging(self) -> None:
        _setup_logging(None, logging.WARNING)

    def set_aside(self, bad: list, used: Path) -> None:
        pass

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> str | None:
        """None, or why the checkpoint could not be written (the logging rank writes it)."""
        return None

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass

    def log_traceback(self, text: str) -> None:
        """A failure's traceback into train.log (not on stderr); every rank appends its own."""
        with contextlib.suppress(OSError), self.files.log.open("a") as f:
            f.write(text)


class RunDir(NullRunDir):
    """The logging rank's run folder."""

    def create(self, cfg: config_mod.Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        config_mod.save(cfg, self.files.config)

    def start_logging(self) -> None:
        _setup_logging(self.files.log, logging.INFO)

    def set_aside(self, bad: list, used: Path) -> None:
        ckpt.set_aside(bad, used)

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> str | None:
        try:
            ckpt.save_step(self.path, step, state, keep=self.keep)
        except ckpt.CheckpointWriteError as e:
            return str(e)
        return None

    def log_traceback(self, text: str) -> None:
        log.error("%s", text, extra={"file_only": True})

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.files.write_summary(summary)


def open_run_dir(path: str | Path, is_main: bool, keep: int = 2) -> NullRunDir:
    return RunDir(path, keep) if is_main else NullRunDir(path, keep)


class _QuietFileHandler(logging.FileHandler):
    """train.log; on a full disk a failed log write must not dump a traceback on stderr."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _setup_logging(log_file: Path | None, level: int) -> None:
    """stderr gets one line per message; records logged with extra={"file_only": True}
    (tracebacks) go to train.log only."""
    log.handlers.clear()
    log.propagate = False
    log.setLevel(level)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(fmt)
    h.addFilter(lambda record: not getattr(record, "file_only", False))
    log.addHandler(h)
    if log_file is not None:
        fh = _QuietFileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)
