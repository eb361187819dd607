"""Tail index alpha of stochastic gradient noise (Simsekli, Sagun, Gurbuzbalaban 2019).

Gradient noise (minibatch gradient minus the full gradient) is heavy-tailed, not Gaussian: it is
closer to a symmetric alpha-stable law with alpha < 2 (alpha = 2 is the Gaussian). The estimator
is Mohammadi et al. 2014's, as Simsekli et al. use it: for an alpha-stable vector X, a sum of K1
independent copies has the law of K1^(1/alpha) X, so the norms of the sums grow by K1^(1/alpha).
"""

from __future__ import annotations

import math

import torch


def _default_k1(n: int) -> int:
    """The divisor of n closest to sqrt(n) (from below), at least 2."""
    k = int(math.isqrt(n))
    while k > 2 and n % k:
        k -= 1
    return max(k, 2)


def tail_index(noise: torch.Tensor, k1: int | None = None) -> float:
    """alpha-hat from N noise vectors (the rows of `noise`).

    N = K1 * K2 (trailing rows that do not fill a group are dropped); Y_j = sum of K1 consecutive
    rows X_i; 1/alpha = (mean_j log|Y_j| - mean_i log|X_i|) / log K1. Not clipped to (0, 2]: a
    value above 2 says the noise is lighter-tailed than the estimator can resolve.
    """
    x = noise.detach().reshape(noise.shape[0], -1).double()
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"need at least 4 noise vectors, got {n}")
    k1 = _default_k1(n) if k1 is None else int(k1)
    if not 2 <= k1 <= n // 2:
        raise ValueError(f"k1 must be in [2, N/2] = [2, {n // 2}], got {k1}")
    k2 = n // k1
    x = x[: k1 * k2]
    y = x.reshape(k2, k1, -1).sum(1)
    log_x = torch.linalg.vector_norm(x, dim=1).log().mean()
    log_y = torch.linalg.vector_norm(y, dim=1).log().mean()
    inv_alpha = float(log_y - log_x) / math.log(k1)
    return 1.0 / inv_alpha if inv_alpha > 0 else math.inf


def noise_from_gradients(grads: torch.Tensor) -> torch.Tensor:
    """Rows of minibatch gradients -> rows of noise against their mean (the large-batch reference)."""
    return grads - grads.mean(0, keepdim=True)



def probe_tail_index(samples: torch.Tensor, k1: int | None = None) -> float:
    """alpha-hat from N raw minibatch-gradient samples (the rows of `samples`, shape (N, d)),
    centred without the small-N bias.

    The noise is a sample minus the full gradient, which is unknown. Centring on the samples' own
    mean makes the N noise vectors sum to zero, which shrinks the group sums Y_j and biases the
    estimate: for Gaussian noise 1/alpha-hat = 1/2 + log((1 - K1/N)/(1 - 1/N)) / (2 log K1), i.e.
    2.12 instead of 2 at N = 64, K1 = 8; for alpha < 1 the sample mean is as large as a sample
    and the centred estimate cannot go below about 1. Instead the mean is removed exactly by
    differencing independent pairs: X_{2i} - X_{2i+1} = noise_{2i} - noise_{2i+1} has mean zero
    whatever the full gradient, the N/2 differences are independent and identically distributed,
    and for an alpha-stable law the difference is the same law scaled by 2^(1/alpha), to which the
    estimator is blind. So the estimate is unbiased by construction, at the price of N/2 vectors.
    This is what the online tail probe (measure.tail_every) reports as noise/alpha.
    """
    x = samples.detach().reshape(samples.shape[0], -1).double()
    pairs = x.shape[0] // 2
    if pairs < 4:
        raise ValueError(f"need at least 8 samples (4 independent differences), got {x.shape[0]}")
    return tail_index(x[0:2 * pairs:2] - x[1:2 * pairs:2], k1)
