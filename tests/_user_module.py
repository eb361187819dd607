"""The source of a user's own model and dataset module, as a researcher would write it.

Tests write it into a temporary folder (as `mylab/zoo.py`) and put that folder on PYTHONPATH;
bigbatch finds `mylab.zoo:make_model` / `mylab.zoo:make_data` from there.
"""

from __future__ import annotations

from pathlib import Path

SOURCE = '''
import math

import torch
from torch import nn


class Pairs(torch.utils.data.Dataset):
    """A map-style dataset: goes through a DataLoader fed by bigbatch's example stream."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def make_data(n=768, features=12, classes=3, seed=0, map_style=False):
    """Gaussian inputs labelled by a random linear teacher; 3/4 train, 1/4 test."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    cut = 3 * n // 4
    train, test = (x[:cut], y[:cut]), (x[cut:], y[cut:])
    return (Pairs(*train), Pairs(*test)) if map_style else (train, test)


def make_model(input_shape, num_classes, width=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Tanh(),
                         nn.Linear(width, num_classes))


def not_a_model(input_shape, num_classes):
    return "a string"


def not_data():
    return 42


NOT_CALLABLE = 3
'''


def write(folder: Path) -> Path:
    """Write the package mylab/zoo.py under `folder`; returns `folder` (the PYTHONPATH entry)."""
    pkg = folder / "mylab"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "zoo.py").write_text(SOURCE)
    return folder
