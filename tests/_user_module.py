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


def make_seq_data(n=512, length=12, vocab=8, seed=0):
    """Token sequences: x random tokens, the target at each position (x[t] + x[t-1]) mod vocab
    (x[-1] = 0): per-token targets (N, T), learnable from the current and the previous token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=g)
    prev = torch.cat([torch.zeros(n, 1, dtype=torch.long), x[:, :-1]], 1)
    y = (x + prev) % vocab
    cut = 3 * n // 4
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


class TokenPairs(nn.Module):
    """Logits (N, T, V) from embeddings of each token and of the one before it."""

    def __init__(self, vocab, width):
        super().__init__()
        self.now, self.before = nn.Embedding(vocab, width), nn.Embedding(vocab, width)
        self.out = nn.Sequential(nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, vocab))

    def forward(self, x):
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        return self.out(self.now(x) + self.before(prev))


def make_seq_model(input_shape, num_classes, width=32):
    return TokenPairs(num_classes, width)


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
