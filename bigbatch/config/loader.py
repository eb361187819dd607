"""Typed configuration: dataclass sections loaded from TOML, overridden with ``section.key=value``.

Strict by design (unlike exec'd or YAML configs that accept any typo): an unknown section or
key, or a value of the wrong type, raises `ConfigError` naming the field. Each section owns its
validation in ``__post_init__``; checks that span sections (warmup vs training length, batch vs
world size) live in `Config.validate`.

The global batch is the quantity the user sets. Per-device batch and accumulation steps are
derived from it and the world size (`bigbatch.trainer.batching`), never the other way round.
"""

from __future__ import annotations

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
                                      OptimConfig, ScheduleConfig, TargetConfig, TrackConfig, TrainConfig, _check)
from bigbatch.entrypoints import check_config as check_entry_points
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

    def validate(self, world_size: int = 1, check_paths: bool = True) -> None:
        """Checks that span sections, need the world size or touch the file system (skipped
        with check_paths=False, e.g. for --dry-run or rendering a job script). Raises ConfigError.
        Whether the batch divides over the ranks is `bigbatch.trainer.batching.validate`."""
        if check_paths and self.data.root is not None and self.data.name in ("imagefolder", "cifar10"):
            _check(Path(self.data.root).expanduser().is_dir(), "data.root", f"folder {self.data.root!r} does not exist")
        if check_paths:  # user entry points must import here (PYTHONPATH or an installed package)
            check_entry_points(self)
        if self.train.compile and self.train.compile_backend != "inductor":
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            _check(self.train.compile_backend in known, "train.compile_backend",
                   f"unknown torch.compile backend {self.train.compile_backend!r}; expected inductor, eager, aot_eager, "
                   "cudagraphs or another name from torch._dynamo.list_backends(exclude_tags=())")
        if self.train.amp == "fp16":
            import torch

            _check(torch.cuda.is_available(), "train.amp", "fp16 needs a GPU; use bf16 on CPU")


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
    """'section.key=value' -> (['section', 'key'], typed value). TOML syntax for the value;
    a bare word that is not TOML (e.g. lars) is taken as a string."""
    if "=" not in text:
        raise ConfigError("--set", f"expected section.key=value, got {text!r}")
    key, _, value = text.partition("=")
    key = key.strip()
    path = key.split(".")
    _check(all(path) and 1 <= len(path) <= 2, "--set", f"expected section.key=value, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return path, parsed


_EXCLUSIVE = {"steps": "epochs", "epochs": "steps"}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1:
            _check(path[0] == "name", path[0], "expected section.key (or name)")
            raw["name"] = value
        else:
            raw.setdefault(path[0], {})
            _check(isinstance(raw[path[0]], dict), path[0], f"expected a [{path[0]}] table")
            raw[path[0]][path[1]] = value
            if path[0] == "train" and path[1] in _EXCLUSIVE:  # --set train.steps replaces the file's epochs
                raw["train"].pop(_EXCLUSIVE[path[1]], None)
    return raw


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
