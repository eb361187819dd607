"""Model FLOPs per training example and model FLOPs utilisation (MFU).

FLOPs are counted once per run with `torch.utils.flop_counter.FlopCounterMode` over one forward
and one backward pass of a copy of the model on the meta device: shapes only, no arithmetic, no
memory, and the real model (its weights, BatchNorm statistics, gradients and the RNG) is never
touched, so counting cannot change the loss curve.

Convention: one multiply-add is 2 FLOPs (FlopCounterMode's convention, and the one MFU uses); only
matrix multiplies and convolutions are counted (elementwise ops, norms and the loss are a few %
at most for CNNs and transformers). Backward costs about 2x forward (gradient w.r.t. the input and
w.r.t. the weights), so a training step is ~3x forward; the first layer has no input gradient,
which the count sees (ResNet-18 at 224 px: 2.93x). torchvision lists ResNet-18 at 1.81 "GFLOPS"
and ResNet-50 at 4.09: those are multiply-adds (GMACs) of one forward pass, i.e. 3.63 and 8.18
GFLOPs forward in this convention.

MFU = achieved model FLOP/s / peak FLOP/s of the devices (the PaLM paper's definition, Chowdhery et
al. 2022): flops_per_example x examples/s / (peak per device x world size). It leaves out recomputation and
probe work (GNS, sharpness) on purpose: it measures useful model arithmetic.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger("bigbatch")

# Peak dense bf16 (= fp16) tensor-core throughput per device, TFLOP/s, from NVIDIA's datasheets
# (REFERENCES.md, "Peak dense bf16 tensor throughput"): H100 SXM5 989, H200 SXM 989 (the same
# compute die). The "with sparsity" figures (1,979) are twice these and are not what dense training
# reaches. Other cards (H100 PCIe/NVL, A100, ...): set train.peak_tflops.
PEAK_BF16_DENSE_TFLOPS = {"H100 SXM": 989.0, "H200": 989.0}


def peak_tflops_for(device_name: str, amp_dtype: torch.dtype | None) -> float | None:
    """Peak dense TFLOP/s for `device_name` (torch.cuda.get_device_name()) under bf16/fp16 autocast,
    or None when the card is not in the table or the run is fp32 (TF32 has a different peak)."""
    if amp_dtype not in (torch.bfloat16, torch.float16):
        return None
    name = device_name.upper()
    if "H200" in name and "GH200" not in name:
        return PEAK_BF16_DENSE_TFLOPS["H200"]
    # SXM5 boards report e.g. "NVIDIA H100 80GB HBM3"; PCIe and NVL boards have lower clocks
    if "H100" in name and "PCIE" not in name and "NVL" not in name:
        return PEAK_BF16_DENSE_TFLOPS["H100 SXM"]
    return None


def resolve_peak_tflops(configured: float | None, device: torch.device, amp_dtype: torch.dtype | None) -> float | None:
    """train.peak_tflops when set, else the table's entry for this GPU, else None (no mfu logged)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    return peak_tflops_for(torch.cuda.get_device_name(device), amp_dtype)


def _meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters and buffers live on the meta device (no data copied)."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def count_train_flops(model: nn.Module, input_shape: tuple[int, ...], batch: int = 2) -> tuple[int, int]:
    """(forward FLOPs, forward + backward FLOPs) of one example, counted on a meta copy of `model`
    with inputs of `input_shape` (without the batch dimension)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = _meta_copy(model)
    meta.train()  # BatchNorm in train mode, as in training
    x = torch.empty((batch, *input_shape), device="meta")
    with torch.random.fork_rng(devices=[]):  # dropout on meta draws nothing, but keep the RNG out of it anyway
        with FlopCounterMode(display=False) as forward:
            meta(x)
        with FlopCounterMode(display=False) as train:
            out = meta(x)
            out.float().sum().backward()
    return forward.get_total_flops() // batch, train.get_total_flops() // batch


def train_flops_per_example(model: nn.Module, input_shape: tuple[int, ...]) -> int | None:
    """Forward + backward FLOPs of one training example, or None (with a warning) when the model
    cannot run on the meta device (data-dependent shapes, custom kernels)."""
    try:
        return count_train_flops(model, input_shape)[1]
    except Exception as e:  # a user model may do anything; MFU is then simply not logged
        log.warning("flops_per_example: the model does not run on the meta device (%s: %s); mfu is not logged",
                    type(e).__name__, e)
        return None


def mfu(flops_per_example: float, examples_per_s: float, peak_tflops: float, world_size: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all `world_size` devices."""
    return flops_per_example * examples_per_s / (peak_tflops * 1e12 * world_size)
