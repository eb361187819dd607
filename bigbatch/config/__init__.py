"""Typed configuration: dataclass sections loaded from TOML, overridden with ``section.key=value``.

    sections.py   one dataclass per section, each validating its own fields (`__post_init__`) and
                  what depends on the world it will run on (`check(world)`)
    loader.py     `Config` (the sections together, checks across them), the strict loader
                  (`coerce`, `build_section`, `from_dict`, `load`), overrides, writing TOML

Everything is importable from `bigbatch.config`.
"""

from bigbatch.config.loader import (SECTIONS, Config, apply_overrides, build_section, coerce, dumps, from_dict, load,
                                    parse_override, read_toml, save, to_dict)
from bigbatch.config.sections import (BatchConfig, CheckpointConfig, DataConfig, DistConfig, MeasureConfig, ModelConfig,
                                      OptimConfig, ScheduleConfig, Section, TargetConfig, TrackConfig, TrainConfig, World,
                                      derive_batch)
from bigbatch.errors import ConfigError

__all__ = [
    "SECTIONS", "BatchConfig", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "DistConfig", "MeasureConfig",
    "ModelConfig", "OptimConfig", "ScheduleConfig", "Section", "TargetConfig", "TrackConfig", "TrainConfig", "World",
    "apply_overrides", "build_section", "coerce", "derive_batch", "dumps", "from_dict", "load", "parse_override",
    "read_toml", "save", "to_dict",
]
