"""`data.name = "pysrc"`: a byte-level language-modelling corpus that ships with every Python, the
standard library's own `.py` sources (`sysconfig.get_paths()["stdlib"]`; site-packages left out).

- Bytes are the tokens (vocabulary 256): no tokenizer to build, and any file reads the same way.
- The split is by file, deterministically: a file is in the validation set when the first 8 bytes
  of sha256("split:" + its path relative to the stdlib folder) as a fraction of 2^64 fall below
  `data.test_fraction`. No window straddles the two sets, and the split does not depend on the
  cap, the seed or the machine.
- `data.kwargs.max_bytes` caps the corpus (default 4,000,000; 0 = every file, 31.5 MB on CPython
  3.11): files are taken in the order of sha256("order:" + path), a fixed shuffle of the library,
  until each split holds its share (test_fraction of the cap for validation); each split is then cut
  to exactly its share. Tests use a few tens of kB.
- Examples are non-overlapping windows of `data.kwargs.context` tokens (default 64): x = bytes
  [i T, (i + 1) T), y = the next byte at each position, bytes [i T + 1, (i + 1) T + 1). The global
  batch counts windows (sequences); tokens = sequences x T.

The two splits' bytes are built once and cached (`$BIGBATCH_CACHE`, default ~/.cache/bigbatch) as
`pysrc-<python version>-<key>.npz`, the key a hash of the Python version, the stdlib path, the
cap and the fraction: two Pythons never share a cache, whose bytes differ. Windows are cut from the
cached bytes at load time, so the context is not part of the key.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sysconfig
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bigbatch.config import DataConfig
from bigbatch.errors import ConfigError

VOCAB = 256
DEFAULT_CONTEXT = 64
DEFAULT_MAX_BYTES = 4_000_000
FORMAT = 1  # bump when the corpus construction changes: old caches are then not read


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _fraction(tag: str, rel: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{tag}:{rel}".encode()).digest()[:8], "big") / 2.0 ** 64


def source_files(root: Path) -> list[tuple[str, Path]]:
    """(relative path, path) of the library's .py files, site-packages excluded, in the fixed
    shuffled order."""
    files = [(f.relative_to(root).as_posix(), f) for f in root.rglob("*.py")
             if f.is_file() and not {"site-packages", "dist-packages"} & set(f.relative_to(root).parts)]
    return sorted(files, key=lambda rf: (_fraction("order", rf[0]), rf[0]))


def build_splits(root: Path, val_fraction: float, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(train bytes, validation bytes) as uint8 arrays: files concatenated in the shuffled order,
    each split cut to its share of `max_bytes` (0 = no cap)."""
    quota = {"val": round(max_bytes * val_fraction), "train": max_bytes - round(max_bytes * val_fraction)} if max_bytes else None
    parts: dict[str, list[bytes]] = {"train": [], "val": []}
    size = {"train": 0, "val": 0}
    for rel, path in source_files(root):
        split = "val" if _fraction("split", rel) < val_fraction else "train"
        if quota is not None:
            if all(size[s] >= quota[s] for s in size):
                break
            if size[split] >= quota[split]:
                continue
        data = path.read_bytes()
        parts[split].append(data)
        size[split] += len(data)
    out = []
    for split in ("train", "val"):
        b = b"".join(parts[split])
        if quota is not None:
            b = b[:quota[split]]
        out.append(np.frombuffer(b, dtype=np.uint8).copy())
    return out[0], out[1]


def options(cfg: DataConfig) -> tuple[int, int]:
    """(context, max_bytes) from data.kwargs, with their defaults (checked by DataConfig)."""
    return int(cfg.kwargs.get("context", DEFAULT_CONTEXT)), int(cfg.kwargs.get("max_bytes", DEFAULT_MAX_BYTES))


def cached_splits(cfg: DataConfig, cache: Path, save: Callable[..., None]) -> tuple[np.ndarray, np.ndarray]:
    """The two splits' bytes from the cache, or built and written with `save(path, **arrays)`."""
    _, max_bytes = options(cfg)
    root = stdlib_root()
    key_src = {"python": platform.python_version(), "implementation": platform.python_implementation(),
               "stdlib": str(root), "max_bytes": max_bytes, "val_fraction": cfg.test_fraction, "format": FORMAT}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"pysrc-{platform.python_version()}-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            return z["train"], z["val"]
    train, val = build_splits(root, cfg.test_fraction, max_bytes)
    save(path, train=train, val=val)
    return train, val


def windows(tokens: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: x (N, T) and its next-token targets y (N, T), int64."""
    n = (len(tokens) - 1) // context
    t = torch.from_numpy(tokens.astype(np.int64))
    x = t[: n * context].view(n, context)
    y = t[1: n * context + 1].view(n, context)
    return x.clone(), y.clone()


def load_windows(cfg: DataConfig, cache: Path, save: Callable[..., None]) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((x_train, y_train), (x_val, y_val)); ConfigError when a split has no whole window."""
    context, max_bytes = options(cfg)
    train, val = cached_splits(cfg, cache, save)
    for name, tokens in (("training", train), ("validation", val)):
        if len(tokens) < context + 1:
            raise ConfigError("data.kwargs.max_bytes", f"pysrc's {name} split has {len(tokens)} bytes, fewer than one "
                              f"window of context {context} + 1: raise max_bytes ({max_bytes}) or data.test_fraction")
    return windows(train, context), windows(val, context)
