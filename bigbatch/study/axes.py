"""Sweep axes over any training-config key, beside batch x lr x seeds.

A sweep config's [axes] table lists values of training-config keys; every trial point gets one
value of each, so a width sweep at a fixed batch is one command:

    [axes]
    "model.hidden" = [4, 8, 16, 32]      # or, as TOML dotted keys: model.hidden = [...]
    "model.kwargs.width" = [64, 128]     # a key inside a table field such as model.kwargs

The grid is the product batch x axis values x lr x seeds (`SweepSpec.points`); each point carries
its values as point["axes"] = {"model.hidden": 16}, and so does its trial record. Values are
scalars (integers, numbers, strings, true/false): each is set in the trial's config as
`bigbatch train --set KEY=VALUE` would, and every value is built into a trial config and checked
before Ray starts (`bigbatch.study.spec.from_dict`). Keys the sweep itself sets per trial (the
batch, the lr, the seed, the budget, the target) are not axes: they have their own fields.

No torch and no Ray.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

from bigbatch.config.loader import SECTIONS
from bigbatch.errors import ConfigError

# keys every trial's config has set by the sweep (spec.trial_config): the sweep's own fields
OWNED = {
    "batch.global_batch": "batch_sizes", "batch.phases": "batch_sizes", "optim.base_lr": "lr_multipliers",
    "train.seed": "seeds", "train.steps": "[trial] max_steps / max_examples", "train.epochs": "[trial] max_steps / max_examples",
    "train.stop_at_target": "[trial] stop_at_target", "train.eval_every": "[trial] eval_every_examples",
    "train.log_every": "[trial] eval_every_examples", "track.group": "name", "track.progress": "(off in every trial)",
}
OWNED_SECTIONS = {"target": "[target]"}


def flatten(raw: Any) -> dict[str, list]:
    """The [axes] table as {"section.key": [values]}: quoted dotted keys and TOML's nested
    dotted-key tables read the same (a table is walked until its value is a list)."""
    if not isinstance(raw, dict):
        raise ConfigError("axes", 'expected a table of config keys to value lists, e.g. [axes] "model.hidden" = [8, 16]')
    out: dict[str, list] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            if not node and prefix:
                raise ConfigError(f"axes.{prefix}", "an empty table: expected a list of values")
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
            return
        if prefix in out:
            raise ConfigError(f"axes.{prefix}", "given twice")
        out[prefix] = node

    walk("", raw)
    return out


def check(axes: dict[str, list]) -> dict[str, list]:
    """Each key names a training-config field outside the sweep's own, each value list is
    non-empty, scalar and without repeats. Raises ConfigError naming `axes.KEY` (or `[i]`)."""
    for key, values in axes.items():
        where = f"axes.{key}"
        path = key.split(".")
        if len(path) < 2 or not all(path):
            raise ConfigError(where, "expected section.key (a training-config key such as model.hidden)")
        if path[0] not in SECTIONS:
            raise ConfigError(where, f"unknown section {path[0]!r}; expected one of {', '.join(SECTIONS)}")
        owner = OWNED.get(f"{path[0]}.{path[1]}") or OWNED_SECTIONS.get(path[0])
        if owner:
            raise ConfigError(where, f"set by the sweep itself in every trial (use {owner}), not an axis")
        if not isinstance(values, list) or not values:
            raise ConfigError(where, f"expected a non-empty list of values, got {values!r}")
        for i, v in enumerate(values):
            if not isinstance(v, (bool, int, str)) and not (isinstance(v, float) and math.isfinite(v)):
                raise ConfigError(f"{where}[{i}]", f"expected an integer, a finite number, a string or true/false, got {v!r}")
        if len({json.dumps(v) for v in values}) != len(values):
            raise ConfigError(where, f"repeated value in {values}")
        names = [name_suffix({key: v}) for v in values]
        if len(set(names)) != len(names):  # two values, one trial name and run folder ("16" and 16, "a b" and "a_b")
            raise ConfigError(where, f"values {values} give the same trial name twice ({sorted(names)})")
    return axes


def combinations(axes: dict[str, list]) -> list[dict[str, Any]]:
    """Every combination of axis values, in the order given ([{}] for a sweep without axes)."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def overrides(values: dict[str, Any]) -> list[str]:
    """The `section.key=value` overrides (TOML values) that set one combination in a config."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def name_suffix(values: dict[str, Any]) -> str:
    """The part of a trial's name (and run folder) that tells its axis values: -model.hidden16."""
    parts = []
    for k, v in values.items():
        text = json.dumps(v) if not isinstance(v, str) else v
        parts.append("-" + k + re.sub(r"[^A-Za-z0-9._+-]", "_", text))
    return "".join(parts)


def label(values: dict[str, Any]) -> str:
    """A combination for tables and plots: `model.hidden=16, optim.momentum=0.9`."""
    return ", ".join(f"{k}={v}" for k, v in values.items())
