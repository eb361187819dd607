"""The sweep config: which training runs a study makes, checked before any of them starts.

A sweep TOML names a base training config (a file, or an inline [base] table), the global batch
sizes, a learning-rate grid given as multipliers of the base config's scaled lr (so the grid
moves with the batch: peak lr = multiplier x scaled_lr(base_lr, B), Goyal et al. 2017; Shallue
et al. 2018 re-tune the lr at every batch size), seeds, the target, and a budget per trial:

    name = "mnist1d-cnn"
    base = "mnist1d-cnn.toml"            # relative to this file
    overrides = ["data.num_samples=20000"]
    batch_sizes = [8, 16, 32, 64, 128, 256, 512, 1024]
    lr_multipliers = [0.5, 1.0, 2.0]
    seeds = [0]

    [target]
    test_acc = 0.9

    [trial]
    max_steps = 20000                    # step budget of every trial
    max_examples = 2_000_000             # and an examples budget: the tighter one wins
    eval_every_examples = 8192           # evaluation interval, the same in examples for every batch
    gap_epochs = 2.0                     # the train/test gap is also read at this epoch budget
    workers_per_trial = 1                # > 1: DDP inside the trial (Ray Train TorchTrainer)

Strict through `bigbatch.config`'s own typed loader (`build_section`, `coerce`): an unknown key,
a wrong type or an empty grid raises ConfigError naming the field, with the training config's words. Every trial's training config is built and validated here, so a bad override
or a batch that does not split over the workers fails before Ray starts.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigbatch import config as config_mod
from bigbatch.config import Config
from bigbatch.errors import ConfigError
from bigbatch.study import adaptive
from bigbatch.study import axes as axes_mod
from bigbatch.trainer.data import train_size_hint


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TargetSpec:
    test_acc: float | None = None
    """Steps to target count up to the first evaluation with test accuracy >= this."""
    test_loss: float | None = None
    """Or: the first evaluation with test loss <= this."""
    train_acc: float | None = None
    """Or (alone): the first evaluation with training accuracy >= this, e.g. 1.0 in a width sweep
    (steps to fit the training set; with trial.stop_at_target = false training goes on)."""

    def __post_init__(self) -> None:
        _check(self.test_acc is not None or self.test_loss is not None or self.train_acc is not None, "target",
               "no target defined: set target.test_acc (a fraction in (0, 1]) or target.test_loss (or target.train_acc)")
        if self.train_acc is not None:
            _check(self.test_acc is None and self.test_loss is None, "target.train_acc",
                   "a training-accuracy target stands alone: remove target.test_acc / target.test_loss")
            _check(_is_number(self.train_acc) and 0 < self.train_acc <= 1, "target.train_acc",
                   f"expected a fraction in (0, 1], got {self.train_acc!r}")
        if self.test_acc is not None:
            _check(_is_number(self.test_acc) and 0 < self.test_acc <= 1, "target.test_acc",
                   f"expected a fraction in (0, 1], got {self.test_acc!r}")
        if self.test_loss is not None:
            _check(_is_number(self.test_loss) and self.test_loss > 0, "target.test_loss",
                   f"expected a positive number, got {self.test_loss!r}")


@dataclass
class TrialSpec:
    max_steps: int | None = None
    """Step budget of every trial (a trial that has not reached the target by then ends as not_reached)."""
    max_examples: int | None = None
    """Examples budget of every trial; with max_steps, the tighter of the two wins at each batch."""
    eval_every_examples: int | None = None
    """Evaluate every this many examples (rounded to whole steps, at least 1): the same resolution
    of steps-to-target in examples at every batch. None = the base config's train.eval_every."""
    gap_epochs: float | None = None
    """Also record the train/test gap at the last evaluation within this many epochs (a fixed
    epoch budget for every batch size, Keskar et al. 2016). None = only at the end of each trial."""
    stop_at_target: bool = True
    """End each trial at the target (train.stop_at_target)."""
    workers_per_trial: int = 1
    """Processes per trial; > 1 runs DDP inside the trial with Ray Train's TorchTrainer (gloo on CPU)."""
    cpus_per_worker: float = 1.0
    """CPUs Ray reserves per worker (and so how many trials run at once)."""
    gpus_per_worker: float = 0.0
    """GPUs Ray reserves per worker (fractions share a GPU)."""
    torch_threads: int = 1
    """torch intra-op threads in each worker (1 keeps parallel trials from oversubscribing the CPU)."""
    max_concurrent: int = 0
    """Trials running at once; 0 = as many as the cluster's resources allow."""
    b_simple_samples: int = 4096
    """When a trial stops at the target, B_simple and B_noise there are measured on the trained
    loss (BatchNorm in train mode, as `bigbatch measure`) from about this many training examples
    at the final (target) weights: K = b_simple_samples / b micro-batch gradients (32 <= K <= 256)
    of the trial's micro-batch b; 0 = off (then the online estimate of measure.gns, when logged,
    is used). Not in a sweep with axes (the trials it would pick pool the axis values)."""
    test_outputs: bool = False
    """Keep each trial's softmax outputs on the whole test set and its parameter count
    (RUN/test_outputs.npz, read by the width report's ensemble of seeds, `bigbatch.study.width`)."""

    def __post_init__(self) -> None:
        for key in ("max_steps", "max_examples", "eval_every_examples"):
            v = getattr(self, key)
            if v is not None:
                _check(_is_int(v) and v >= 1, f"trial.{key}", f"expected a positive integer, got {v!r}")
        _check(self.max_steps is not None or self.max_examples is not None, "trial.max_steps",
               "no budget per trial: set trial.max_steps and/or trial.max_examples")
        if self.gap_epochs is not None:
            _check(_is_number(self.gap_epochs) and self.gap_epochs > 0, "trial.gap_epochs",
                   f"expected a positive number of epochs, got {self.gap_epochs!r}")
        _check(_is_int(self.workers_per_trial) and self.workers_per_trial >= 1, "trial.workers_per_trial",
               f"expected a positive integer, got {self.workers_per_trial!r}")
        _check(_is_number(self.cpus_per_worker) and self.cpus_per_worker > 0, "trial.cpus_per_worker",
               f"expected a positive number, got {self.cpus_per_worker!r}")
        _check(_is_number(self.gpus_per_worker) and self.gpus_per_worker >= 0, "trial.gpus_per_worker",
               f"expected a number >= 0, got {self.gpus_per_worker!r}")
        _check(_is_int(self.torch_threads) and self.torch_threads >= 1, "trial.torch_threads",
               f"expected a positive integer, got {self.torch_threads!r}")
        _check(_is_int(self.max_concurrent) and self.max_concurrent >= 0, "trial.max_concurrent",
               f"expected an integer >= 0, got {self.max_concurrent!r}")
        _check(_is_int(self.b_simple_samples) and (self.b_simple_samples == 0 or self.b_simple_samples >= 2),
               "trial.b_simple_samples", f"expected 0 (off) or an integer >= 2, got {self.b_simple_samples!r}")
        _check(isinstance(self.stop_at_target, bool), "trial.stop_at_target", "expected true or false")
        _check(isinstance(self.test_outputs, bool), "trial.test_outputs", "expected true or false")

    def steps_for(self, batch: int) -> int:
        """The step budget at `batch`: the tighter of max_steps and max_examples / batch."""
        budgets = []
        if self.max_steps is not None:
            budgets.append(self.max_steps)
        if self.max_examples is not None:
            budgets.append(max(1, math.ceil(self.max_examples / batch)))
        return min(budgets)

    def eval_every_for(self, batch: int, default: int) -> int:
        if self.eval_every_examples is None:
            return default
        return max(1, round(self.eval_every_examples / batch))


@dataclass
class SearchSpec:
    """The adaptive schedule (`bigbatch.study.adaptive`); off = the full grid batch x lr x seed."""

    adaptive: bool = False
    """Seed 0 on the lr grid first, then: one more multiplier beyond an edge that is best, and all
    `seeds` at each batch's best lr and its neighbours (the lrs that decide the answer)."""
    neighbours: int = 1
    """Grid neighbours on each side of the best lr that also get every seed (if they reached)."""
    extend: int = 2
    """Multipliers that may be added beyond the grid's edge, per batch."""
    race: float = 1.5
    """Stop a trial as `slower` once its steps exceed this multiple of the steps of its batch's
    best finished trial at another lr (0 = off); its steps then are a lower bound."""
    close: float = 1.25
    """A neighbour of the best lr gets every seed only if its steps so far are within this factor
    of the best's (a clearly slower lr does not decide the answer)."""
    add_batches: int = 2
    """Batch sizes the study may add beyond `batch_sizes` (`adaptive.batch_extension`): twice the
    largest while the fitted B_crit or its interval's upper end lies above it, half the smallest
    while that one is not in perfect scaling (B > B_crit / 4); 0 = the configured range only."""

    def __post_init__(self) -> None:
        _check(isinstance(self.adaptive, bool), "search.adaptive", "expected true or false")
        _check(_is_int(self.neighbours) and self.neighbours >= 0, "search.neighbours",
               f"expected an integer >= 0, got {self.neighbours!r}")
        _check(_is_int(self.extend) and self.extend >= 0, "search.extend", f"expected an integer >= 0, got {self.extend!r}")
        _check(_is_number(self.race) and (self.race == 0 or self.race > 1), "search.race",
               f"expected 0 (off) or a factor > 1, got {self.race!r}")
        _check(_is_number(self.close) and self.close >= 1, "search.close", f"expected a factor >= 1, got {self.close!r}")
        _check(_is_int(self.add_batches) and 0 <= self.add_batches <= 8, "search.add_batches",
               f"expected an integer from 0 to 8, got {self.add_batches!r}")


@dataclass
class GapSpec:
    """The gap phase (Keskar et al. 2016): best lr per batch, trained to a training criterion."""

    batch_sizes: list = field(default_factory=list)
    """Batch sizes of the gap phase (each must be in batch_sizes; empty = no gap phase)."""
    seeds: list = field(default_factory=lambda: [0, 1])
    train_acc: float = 0.99
    """The training criterion: train until training accuracy (on the whole training subset) >= this."""
    train_samples: int = 5000
    """Train on the first N training examples (0 = all), so the criterion is within reach."""
    max_epochs: float = 60.0
    """Budget cap: a seed that has not met the criterion by then is recorded as not_reached."""
    eval_every_epochs: float = 1.0
    """Evaluation interval (finer near the criterion: train.eval_fine)."""
    sharpness_samples: int = 1024
    """Training examples for the top Hessian eigenvalue at the end (train-mode BatchNorm)."""
    spectrum_k: int | None = None
    """Top Hessian eigenvalues recorded per gap trial on the same loss, with the number of outliers
    and the gradient's share of their eigenspace (Sagun et al.; Gur-Ari et al. 2018). Default
    (unset): classes + 3, at most 32 (a vocabulary of 256 would cost hundreds of HVPs per trial);
    0 = only the top one (the sharpness)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.batch_sizes, list) and all(_is_int(b) and b >= 1 for b in self.batch_sizes),
               "gap.batch_sizes", f"expected a list of positive integers, got {self.batch_sizes!r}")
        _check(isinstance(self.seeds, list) and len(self.seeds) > 0 and all(_is_int(s) and s >= 0 for s in self.seeds),
               "gap.seeds", f"expected a non-empty list of integers >= 0, got {self.seeds!r}")
        _check(_is_number(self.train_acc) and 0 < self.train_acc <= 1, "gap.train_acc",
               f"expected a fraction in (0, 1], got {self.train_acc!r}")
        _check(_is_int(self.train_samples) and self.train_samples >= 0, "gap.train_samples",
               f"expected an integer >= 0, got {self.train_samples!r}")
        for key in ("max_epochs", "eval_every_epochs"):
            v = getattr(self, key)
            _check(_is_number(v) and v > 0, f"gap.{key}", f"expected a positive number, got {v!r}")
        _check(_is_int(self.sharpness_samples) and self.sharpness_samples >= 0, "gap.sharpness_samples",
               f"expected an integer >= 0, got {self.sharpness_samples!r}")
        _check(self.spectrum_k is None or (_is_int(self.spectrum_k) and self.spectrum_k >= 0), "gap.spectrum_k",
               f"expected an integer >= 0 (0 = off), got {self.spectrum_k!r}")


@dataclass
class SweepSpec:
    name: str
    """Sweep name: the W&B group of its trials and the default output folder."""
    base: dict
    """The base training config as a dict (from the `base` file or the inline [base] table)."""
    batch_sizes: list
    """Global batch sizes (positive integers; powers of 2 by convention)."""
    lr_multipliers: list = field(default_factory=lambda: [1.0])
    """Peak lr = multiplier x the base config's scaled lr at each batch (optim.base_lr, base_batch, scaling)."""
    seeds: list = field(default_factory=lambda: [0])
    overrides: list = field(default_factory=list)
    """`section.key=value` applied to the base config (as `bigbatch train --set`)."""
    axes: dict = field(default_factory=dict)
    """Further axes over training-config keys, {"model.hidden": [8, 16, ...]} (`bigbatch.study.axes`):
    every batch x lr x seed point runs at every combination of their values."""
    wandb: bool = False
    """Log every trial to W&B (offline without an API key), grouped under the sweep's name."""
    target: TargetSpec = field(default_factory=TargetSpec)
    trial: TrialSpec = field(default_factory=TrialSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    gap: GapSpec = field(default_factory=GapSpec)

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name),
               "name", f"expected letters, digits, '-', '_' or '.', got {self.name!r}")
        _check(isinstance(self.batch_sizes, list) and len(self.batch_sizes) > 0, "batch_sizes",
               "empty: list at least one global batch size, e.g. batch_sizes = [32, 64, 128]")
        for i, b in enumerate(self.batch_sizes):
            _check(_is_int(b) and b >= 1, f"batch_sizes[{i}]", f"expected a positive integer, got {b!r}")
        _check(len(set(self.batch_sizes)) == len(self.batch_sizes), "batch_sizes", f"repeated batch size in {self.batch_sizes}")
        self.batch_sizes = sorted(self.batch_sizes)
        _check(isinstance(self.lr_multipliers, list) and len(self.lr_multipliers) > 0, "lr_multipliers",
               "empty: list at least one multiplier of the scaled lr, e.g. [0.5, 1.0, 2.0]")
        for i, m in enumerate(self.lr_multipliers):
            _check(_is_number(m) and m > 0, f"lr_multipliers[{i}]", f"expected a positive number, got {m!r}")
        self.lr_multipliers = [float(m) for m in self.lr_multipliers]
        _check(len(set(self.lr_multipliers)) == len(self.lr_multipliers), "lr_multipliers", "repeated multiplier")
        _check(isinstance(self.seeds, list) and len(self.seeds) > 0, "seeds", "empty: list at least one seed")
        for i, s in enumerate(self.seeds):
            _check(_is_int(s) and s >= 0, f"seeds[{i}]", f"expected an integer >= 0, got {s!r}")
        _check(isinstance(self.overrides, list) and all(isinstance(o, str) for o in self.overrides), "overrides",
               'expected a list of "section.key=value" strings')
        _check(isinstance(self.wandb, bool), "wandb", "expected true or false")
        for i, b in enumerate(self.gap.batch_sizes):
            _check(b in self.batch_sizes, f"gap.batch_sizes[{i}]", f"{b} is not one of batch_sizes {self.batch_sizes}")
        self.axes = axes_mod.check(axes_mod.flatten(self.axes))
        if self.axes:  # the adaptive queue and the gap phase choose per batch x lr: over pooled axes they would mix
            _check(not self.search.adaptive, "axes", "a sweep with axes runs the full grid: set search.adaptive = false")
            _check(not self.gap.batch_sizes, "axes", "a sweep with axes has no gap phase: remove gap.batch_sizes")

    def points(self) -> list[dict[str, Any]]:
        """The grid, longest trials (smallest batch) first so parallel slots stay busy."""
        if not self.axes:
            return [{"batch": b, "lr_multiplier": m, "seed": s}
                    for b in self.batch_sizes for m in self.lr_multipliers for s in self.seeds]
        return [{"batch": b, "lr_multiplier": m, "seed": s, "axes": values} for b in self.batch_sizes
                for values in axes_mod.combinations(self.axes) for m in self.lr_multipliers for s in self.seeds]

    def trial_name(self, point: dict[str, Any]) -> str:
        return adaptive.point_name(point)

    def trial_config(self, point: dict[str, Any]) -> Config:
        """The training config of one grid point (validated; raises ConfigError naming the field)."""
        raw = config_mod.apply_overrides(self.base, self.overrides + axes_mod.overrides(point.get("axes") or {}))
        base_cfg = config_mod.from_dict(raw)  # errors in the base itself name its field
        batch = point["batch"]
        raw = config_mod.to_dict(base_cfg)
        raw["name"] = f"{self.name}-{self.trial_name(point)}"
        raw["batch"]["global_batch"] = batch
        raw["batch"]["phases"] = []
        raw["optim"]["base_lr"] = base_cfg.optim.base_lr * point["lr_multiplier"]
        train = raw["train"]
        train.pop("epochs", None)
        train["steps"] = self.trial.steps_for(batch)
        train["seed"] = point["seed"]
        train["stop_at_target"] = self.trial.stop_at_target
        train["eval_every"] = self.trial.eval_every_for(batch, base_cfg.train.eval_every or train["steps"])
        train["log_every"] = train["eval_every"]
        raw["target"] = {k: v for k, v in dataclasses.asdict(self.target).items() if v is not None}
        if point.get("phase") == "gap":  # train to the training criterion on the gap subset, full evaluations
            g = self.gap
            raw["data"]["train_samples"] = g.train_samples
            raw["data"]["eval_subset"] = 0
            n_train = train_size_hint(dataclasses.replace(base_cfg.data, train_samples=g.train_samples), exact=True)
            _check(n_train is not None, "gap.train_samples", "the training set's size is not known before loading: set it")
            if g.train_samples:
                raw["data"]["train_eval_samples"] = g.train_samples
            train["steps"] = max(1, math.ceil(g.max_epochs * n_train / batch))
            train["eval_every"] = max(1, round(g.eval_every_epochs * n_train / batch))
            train["log_every"] = train["eval_every"]
            train["stop_at_target"] = True
            raw["target"] = {"train_acc": g.train_acc}
        raw["track"]["wandb"] = self.wandb or base_cfg.track.wandb
        raw["track"]["group"] = self.name
        raw["track"]["progress"] = "off"
        cfg = config_mod.from_dict(raw)
        import bigbatch.trainer.preflight as preflight  # deferred: torch, only when a trial is built

        try:  # everything a trial checks when it starts, for its world (one node)
            preflight.check(cfg, self.trial.workers_per_trial, self.trial.workers_per_trial)
        except ConfigError as e:
            raise ConfigError(e.field, f"{e.message} (batch_sizes entry {batch}, trial.workers_per_trial "
                                       f"{self.trial.workers_per_trial})") from None
        return cfg


SECTIONS = {"target": TargetSpec, "trial": TrialSpec, "search": SearchSpec, "gap": GapSpec}
TOP_KEYS = {f.name for f in dataclasses.fields(SweepSpec)} - set(SECTIONS)


def from_dict(raw: dict[str, Any], base_dir: Path | None = None, validate_trials: bool = True) -> SweepSpec:
    """Build a SweepSpec from a parsed TOML dict; `base` paths are relative to `base_dir`.

    validate_trials: build every trial's training config to check it (the driver does, before
    anything runs; a trial, handed the already checked dict, skips it)."""
    raw = dict(raw)
    for k in raw:
        _check(k in TOP_KEYS | set(SECTIONS), k, f"unknown key; expected one of {', '.join(sorted(TOP_KEYS | set(SECTIONS)))}")
    _check("name" in raw, "name", "missing: the sweep's name")
    _check("batch_sizes" in raw, "batch_sizes", "missing: list the global batch sizes, e.g. batch_sizes = [32, 64, 128]")
    _check("base" in raw, "base", "missing: a base training config (a TOML path or an inline [base] table)")
    base = raw.pop("base")
    if isinstance(base, str):
        path = Path(base).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        _check(path.is_file(), "base", f"training config {str(path)!r} not found")
        base = config_mod.read_toml(path)
    _check(isinstance(base, dict), "base", "expected a TOML path or an inline [base] table")
    if "target" not in raw and isinstance(base.get("target"), dict):
        raw["target"] = base["target"]  # the base config's target, when the sweep names none
    # the training config's typed loader: the same errors for unknown keys and wrong types
    kwargs: dict[str, Any] = {sec: config_mod.build_section(cls, raw.pop(sec, {}), sec) for sec, cls in SECTIONS.items()}
    hints = typing.get_type_hints(SweepSpec)
    top = {k: config_mod.coerce(v, hints[k], k) for k, v in raw.items()}
    spec = SweepSpec(base=base, **top, **kwargs)
    if not validate_trials:
        return spec
    combos = axes_mod.combinations(spec.axes)
    # every combination of axis values at every batch (an axis can break a batch's split): the error names it
    for values, b in itertools.product(combos if spec.axes else [], spec.batch_sizes):
        try:
            spec.trial_config({"batch": b, "lr_multiplier": spec.lr_multipliers[0], "seed": spec.seeds[0], "axes": values})
        except ConfigError as e:
            where = "axes"
            if len(values) == 1:  # one axis: name its entry
                (key, v), = values.items()
                where = f"axes.{key}[{spec.axes[key].index(v)}]"
            raise ConfigError(where, f"{axes_mod.label(values)}: {e.field}: {e.message}") from None
    first = {"axes": combos[0]} if spec.axes else {}
    for b in spec.batch_sizes:  # every batch's trial config, validated before anything runs (the lr and
        for m in spec.lr_multipliers:  # seed change no check, so one seed per multiplier)
            spec.trial_config({"batch": b, "lr_multiplier": m, "seed": spec.seeds[0], **first})
    for b in spec.gap.batch_sizes:
        spec.trial_config({"batch": b, "lr_multiplier": 1.0, "seed": spec.gap.seeds[0], "phase": "gap"})
    return spec


def load(path: str | Path) -> SweepSpec:
    p = Path(path)
    return from_dict(config_mod.read_toml(p), p.parent)
