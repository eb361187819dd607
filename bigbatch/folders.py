"""The run folder and the sweep folder: every file name in them, and their readers and writers.

Decided once, here, for every module that reads or writes them (the trainer, sweeps, SLURM jobs,
reports, the measurement commands). No torch and no Ray.

    RUN_DIR/                     one training run (`bigbatch train`, a sweep trial, a SLURM job)
      config.toml                the resolved config, written before training starts
      metrics.jsonl              one JSON object per logged step (truncated to the checkpoint on resume)
      summary.json               the final summary (status, steps, losses, steps to target, ...)
      train.log                  the run's log, with the traceback of a failure
      launcher.log               torchrun's own report (`bigbatch train --nproc`)
      checkpoint-<step>.pt       the newest checkpoint.keep checkpoints
      checkpoint.pt              a link to the newest one
      trial.json                 a sweep trial's record
      test_outputs.npz           a sweep trial's softmax outputs on the test set (trial.test_outputs)
      wandb_id.txt               the W&B run id, so a resumed run continues the same W&B run

    SWEEP_DIR/                   one sweep (`bigbatch sweep`, `bigbatch study`, a SLURM sweep)
      sweep.json                 the sweep config as run (self-contained: the base config read in)
      runs/<trial>/              each trial's run folder
      race/                      steps of finished trials that racing trials compare against
      tune/                      Ray Tune's own state (for --resume)
      trials.jsonl               every trial's record, one per line
      critical.json              the critical-batch-size analysis
      report.md, report.html     the report and its plots

JSON files are written whole to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOG = "train.log"
LAUNCHER_LOG = "launcher.log"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_STEP = re.compile(r"^checkpoint-(\d+)\.pt$")
TRIAL_RECORD = "trial.json"
TEST_OUTPUTS = "test_outputs.npz"
WANDB_ID = "wandb_id.txt"

SWEEP_SPEC = "sweep.json"
RUNS = "runs"
RACE = "race"
TUNE = "tune"
TRIALS = "trials.jsonl"
CRITICAL = "critical.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"


def checkpoint_file(run_dir: str | Path, step: int) -> Path:
    """checkpoint-<step>.pt, the step zero-padded to 8 digits."""
    return Path(run_dir) / f"checkpoint-{step:08d}.pt"


def write_json(path: str | Path, obj: Any, indent: int | None = 2, allow_nan: bool = True) -> None:
    """`obj` as JSON at `path`, written whole then renamed (readers never see half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, allow_nan=allow_nan) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a .jsonl file; a torn last line (a kill mid-write) ends it."""
    rows = []
    path = Path(path)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


class RunFolder:
    """The files of one run folder (paths only; nothing is created)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    config = property(lambda self: self.path / CONFIG)
    metrics = property(lambda self: self.path / METRICS)
    summary = property(lambda self: self.path / SUMMARY)
    log = property(lambda self: self.path / LOG)
    launcher_log = property(lambda self: self.path / LAUNCHER_LOG)
    checkpoint = property(lambda self: self.path / CHECKPOINT)
    trial_record = property(lambda self: self.path / TRIAL_RECORD)
    test_outputs = property(lambda self: self.path / TEST_OUTPUTS)
    wandb_id = property(lambda self: self.path / WANDB_ID)

    def is_run(self) -> bool:
        """A run folder: it holds the resolved config."""
        return self.config.is_file()

    def read_summary(self) -> dict[str, Any] | None:
        return read_json(self.summary) if self.summary.is_file() else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary, summary)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics)

    def read_trial_record(self) -> dict[str, Any] | None:
        return read_json(self.trial_record) if self.trial_record.is_file() else None

    def write_trial_record(self, record: dict[str, Any]) -> None:
        write_json(self.trial_record, record, indent=None)


class SweepFolder:
    """The files of one sweep folder (paths only; nothing is created)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    spec = property(lambda self: self.path / SWEEP_SPEC)
    runs = property(lambda self: self.path / RUNS)
    race = property(lambda self: self.path / RACE)
    tune = property(lambda self: self.path / TUNE)
    trials = property(lambda self: self.path / TRIALS)
    critical = property(lambda self: self.path / CRITICAL)
    report_md = property(lambda self: self.path / REPORT_MD)
    report_html = property(lambda self: self.path / REPORT_HTML)

    def run(self, trial: str) -> RunFolder:
        return RunFolder(self.runs / trial)

    def read_spec(self) -> dict[str, Any] | None:
        return read_json(self.spec) if self.spec.is_file() else None

    def write_spec(self, spec: dict[str, Any]) -> None:
        write_json(self.spec, spec)

    def read_trials(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.trials.read_text().splitlines() if line.strip()]

    def write_trials(self, records: list[dict[str, Any]]) -> None:
        tmp = self.trials.with_name(TRIALS + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.trials)

    def read_critical(self) -> dict[str, Any] | None:
        return read_json(self.critical) if self.critical.is_file() else None

    def write_critical(self, analysis: dict[str, Any]) -> None:
        write_json(self.critical, analysis, allow_nan=False)
