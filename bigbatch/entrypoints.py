"""Models and datasets named by entry point: `"torchvision:NAME"` and `"package.module:function"`.

`model.name = "torchvision:NAME"` is any torchvision classification model
(`torchvision.models.get_model(NAME, weights=None, num_classes=...)`); `"package.module:function"`
(for `model.name` and `data.name`) is a function in a module found the usual way: on PYTHONPATH
(the folder holding package/) or in an installed package. Every rank of a multi-process run
imports it, so on a cluster the module must be on the PYTHONPATH of the job (or installed in its
environment), not only on the submit host.

This module only imports and checks (before any work starts: the [model] and [data] sections'
`check(world)` call `resolve` and `check_call`); calling the functions and checking what they return is the trainer's job
(`bigbatch.trainer.models`, `bigbatch.trainer.data`). Errors name the config field.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from bigbatch.errors import ConfigError

TORCHVISION = "torchvision:"


def is_entry_point(name: str) -> bool:
    """'package.module:function' (a user's model or dataset), not 'torchvision:NAME'."""
    return ":" in name and not name.startswith(TORCHVISION)


def resolve(name: str, key: str) -> Callable[..., Any]:
    """The function named "package.module:function" (ConfigError naming `key` when the module does
    not import, has no such attribute, or the attribute is not callable)."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(key, f"cannot import module {module_name!r} ({e}); put the folder holding it on "
                               "PYTHONPATH or install its package") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(key, f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(key, f"{name!r} is a {type(fn).__name__}, not a function")
    return fn


def check_call(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], name: str, key: str) -> None:
    """ConfigError naming `key` (the kwargs table) when fn cannot take these arguments."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: the call itself will tell
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(key, f"{name!r} cannot be called this way: {e}") from None


def torchvision_models() -> list[str]:
    """The names torchvision.models.get_model builds as classification models (not detection etc.)."""
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def check_torchvision(name: str, key: str = "model.name") -> str:
    """NAME of "torchvision:NAME", checked against torchvision's classification models."""
    model = name[len(TORCHVISION):]
    known = torchvision_models()
    if model not in known:
        close = [m for m in known if m.startswith(model[:4])] or known[:8]
        raise ConfigError(key, f"torchvision has no classification model {model!r}; e.g. {', '.join(close[:8])}")
    return model
