"""Typed configuration: dataclass sections loaded from TOML, overridden with ``section.key=value``.

Strict by design (unlike exec'd or YAML configs that accept any typo): an unknown section or
key, or a value of the wrong type, raises `ConfigError` naming the field. Each section owns its
validation (`bigbatch.config.sections`); `Config.validate(world_size)` runs every section's check
for the world to be started, then the few checks that span sections.

The global batch is the quantity the user sets. Per-device batch and accumulation steps are
derived from it and the world size (`bigbatch.trainer.batching`), never the other way round.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import tomli_w

from bigbatch.config.sections import (BatchConfig, CheckpointConfig, DataConfig, DistConfig, MeasureConfig, ModelConfig,
                                      OptimConfig, ScheduleConfig, Section, TargetConfig, TrackConfig, TrainConfig, World,
                                      _check)
from bigbatch.errors import ConfigError


@dataclass
class Config:
    name: str = "run"
    """Run name: the run folder is runs/<name>-<time> unless --out is given."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    measure: MeasureConfig = field(default_factory=MeasureConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), "name",
               f"expected letters, digits, '-', '_' or '.', got {self.name!r}")
        if self.train.steps is None and self.train.epochs is None:
            self.train.epochs = 1.0
        _check(not (self.train.steps is not None and self.train.epochs is not None), "train.steps",
               "set either train.steps or train.epochs, not both")
        for key, on in (("optim.beta2_scaling", self.optim.beta2_scaling != "none"),
                        ("optim.timescale", self.optim.timescale is not None)):  # bigbatch.trainer.recipe.adamw_settings
            _check(not on or not (self.batch.phases or self.batch.adaptive != "none"), key,
                   "set once per run from its global batch: not with batch.phases or batch.adaptive")

    def sections(self) -> list[Section]:
        return [getattr(self, name) for name in SECTIONS]

    def validate(self, world_size: int = 1, check_paths: bool = True, local_world_size: int | None = None) -> None:
        """ConfigError for anything that cannot work on `world_size` ranks (`local_world_size` per
        node, default all on one node): every section's own `check(world)`, then the checks that
        span sections. check_paths=False skips files and imports (--dry-run, a SLURM script whose
        files live on the cluster). The schedule against the training length is checked where the
        dataset size is known (`bigbatch.trainer.preflight`)."""
        world = World(world_size, local_world_size or world_size, check_paths)
        for section in self.sections():
            section.check(world)
        m, b = self.measure, self.batch
        if m.gns and world_size == 1 and (b.accum_steps or 1) == 1:
            # One gradient per step gives one batch size: the two-batch estimator is undefined
            # (AdaptDL issue 98). Micro-batches or ranks supply the small batch.
            raise ConfigError("measure.gns", "needs two batch sizes per step: in one process set batch.accum_steps >= 2 "
                              "(the micro-batches are the small batches), or train on >= 2 ranks")
        if b.adaptive == "gns":
            _check(m.gns, "batch.adaptive", '"gns" steers the batch by the noise scale: set measure.gns = true')
        # the probes draw their own examples and the adaptive batch re-slices the example stream:
        # both need tensors in memory (image folders stream through a DataLoader)
        in_memory = "an in-memory dataset (mnist1d, digits, synthetic, cifar10), not imagefolder"
        for key, on in (("measure.tail_every", m.tail_every), ("measure.sharpness", m.sharpness),
                        ("batch.adaptive", b.adaptive != "none")):
            _check(not on or self.data.in_memory, key, f"needs {in_memory}")


# --- loading, overrides, writing -------------------------------------------------------------

SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "name"}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {k: hints[k] for k in SECTIONS}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, key, f"expected one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(key, " or ".join(dict.fromkeys(errors)))
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if tp is list or origin is list:
        _check(isinstance(value, list), key, f"expected a list, got {value!r}")
        return value
    if tp is dict or origin is dict:
        _check(isinstance(value, dict), key, f"expected a table, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this file, not bad input


def build_section(cls: type, values: Any, section: str):
    """One typed section (a dataclass) from a TOML table: an unknown key or a value of the wrong
    type raises ConfigError naming `section.key`. Also the sweep spec's loader (`bigbatch.study.spec`)."""
    _check(isinstance(values, dict), section, f"expected a [{section}] table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{section}.{k}"
        _check(k in known, key, f"unknown key in [{section}]; expected one of {', '.join(sorted(known))}")
        kwargs[k] = coerce(v, hints[k], key)
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> Config:
    """Build a validated Config from nested dicts (as read from TOML)."""
    classes = _section_classes()
    kwargs: dict[str, Any] = {}
    for sec, values in raw.items():
        if sec == "name":
            kwargs["name"] = coerce(values, str, "name")
            continue
        _check(sec in classes, sec, f"unknown section; expected one of name, {', '.join(classes)}")
        kwargs[sec] = build_section(classes[sec], values, sec)
    return Config(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'section.key=value' (or 'section.table.key=value' for a table such as model.kwargs) ->
    (['section', 'key'], typed value). TOML syntax for the value; a bare word that is not TOML
    (e.g. lars) is taken as a string."""
    if "=" not in text:
        raise ConfigError("--set", f"expected section.key=value, got {text!r}")
    key, _, value = text.partition("=")
    path = key.strip().split(".")
    _check(all(path), "--set", f"expected section.key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return path, parsed


_EXCLUSIVE = {"steps": "epochs", "epochs": "steps"}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`raw` (nested dicts as read from TOML) with each 'section.key=value' set; deeper keys
    ('model.kwargs.width=512') go into a table-valued field, created when absent. Values are
    checked later, when the sections are built (`from_dict`)."""
    raw = copy.deepcopy(raw)
    classes = _section_classes()
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1:
            _check(path[0] == "name", path[0], "expected section.key (or name)")
            raw["name"] = value
            continue
        section, key, *inner = path
        table = raw.setdefault(section, {})
        _check(isinstance(table, dict), section, f"expected a [{section}] table")
        if inner and section in classes:
            hints = typing.get_type_hints(classes[section])
            if key in hints and not _is_table(hints[key]):
                raise ConfigError(f"{section}.{key}", f"is not a table, so --set {'.'.join(path)} has nowhere to go "
                                                      "(nested keys are for tables such as model.kwargs)")
        for i, part in enumerate([key, *inner][:-1]):
            table = table.setdefault(part, {})
            _check(isinstance(table, dict), ".".join(path[:i + 2]), f"is not a table (--set {'.'.join(path)})")
        table[path[-1]] = value
        if section == "train" and key in _EXCLUSIVE and not inner:  # --set train.steps replaces the file's epochs
            table.pop(_EXCLUSIVE[key], None)
    return raw


def _is_table(tp: Any) -> bool:
    return tp is dict or typing.get_origin(tp) is dict


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(str(path), "config file not found")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML ({e})") from None


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a TOML config (or the defaults when path is None) and apply --set overrides."""
    raw = read_toml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, list(overrides)))


def to_dict(cfg: Config) -> dict[str, Any]:
    """Nested dict without None values (TOML has no null; absent = default None)."""

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        # None and empty tables (model.kwargs = {}) are the defaults: left out
        return {k: (strip(v) if isinstance(v, dict) else v) for k, v in d.items() if v is not None and v != {}}

    return strip(dataclasses.asdict(cfg))


def dumps(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dumps(cfg))
