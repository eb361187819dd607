"""Tail index: 2 for Gaussian noise, alpha for symmetric alpha-stable noise (Simsekli et al. 2019)."""

import math

import pytest
import torch

from bigbatch.measure.tails import noise_from_gradients, tail_index


def symmetric_stable(alpha: float, shape, gen: torch.Generator) -> torch.Tensor:
    """Chambers-Mallows-Stuck sampler for standard symmetric alpha-stable variables (beta = 0)."""
    v = (torch.rand(shape, generator=gen, dtype=torch.float64) - 0.5) * math.pi
    w = -torch.log(torch.rand(shape, generator=gen, dtype=torch.float64))
    return torch.sin(alpha * v) / torch.cos(v) ** (1 / alpha) * (torch.cos(v - alpha * v) / w) ** ((1 - alpha) / alpha)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_noise_has_tail_index_two(seed):
    gen = torch.Generator().manual_seed(seed)
    assert tail_index(torch.randn(2048, 100, generator=gen, dtype=torch.float64)) == pytest.approx(2.0, abs=0.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stable_noise_has_its_alpha(seed):
    gen = torch.Generator().manual_seed(seed)
    noise = symmetric_stable(1.5, (2048, 100), gen)
    assert tail_index(noise) == pytest.approx(1.5, abs=0.15)


def test_heavier_tails_give_smaller_alpha_and_k1_is_checked():
    gen = torch.Generator().manual_seed(3)
    a12 = tail_index(symmetric_stable(1.2, (1024, 50), gen), k1=32)
    a18 = tail_index(symmetric_stable(1.8, (1024, 50), gen), k1=32)
    assert a12 < a18
    with pytest.raises(ValueError):
        tail_index(torch.randn(16, 3), k1=9)


def test_noise_is_measured_against_the_mean_gradient():
    grads = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(noise_from_gradients(grads), torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
