"""FLOPs per example against hand and published counts; MFU and the peak table.

Convention (FlopCounterMode, and MFU's): a multiply-add is 2 FLOPs.
"""

import pytest
import torch
from torch import nn

from bigbatch.trainer import flops


def test_linear_layer_counts_by_hand():
    # forward 2*in*out per example; backward computes only the weight gradient (2*in*out): the input
    # needs no gradient. The bias add is not a matmul and is not counted.
    fwd, train = flops.count_train_flops(nn.Linear(40, 10), (40,))
    assert fwd == 2 * 40 * 10
    assert train == 2 * (2 * 40 * 10)


def test_mlp_backward_is_twice_forward_except_first_layer_input_gradient():
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 10))
    fwd, train = flops.count_train_flops(model, (40,))
    assert fwd == 2 * (40 * 256 + 256 * 10)
    # layer 2: forward + input grad + weight grad; layer 1: forward + weight grad
    assert train == 3 * 2 * 256 * 10 + 2 * 2 * 40 * 256


def test_resnet18_matches_torchvision_published_count():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None)
    fwd, train = flops.count_train_flops(model, (3, 224, 224))
    # torchvision's model table: ResNet-18 1.81 "GFLOPS" at 224 px, which are multiply-adds of one
    # forward pass (1.814 G); 2 FLOPs per multiply-add here.
    assert fwd / 2 == pytest.approx(1.814e9, rel=0.01)
    assert 2.85 < train / fwd < 3.0  # backward ~2x forward, minus the stem's input gradient


def test_counting_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert flops.train_flops_per_example(model, (8,)) == 2 * (8 * 8 + 8 * 2) + 2 * 8 * 2 * 2 + 2 * 8 * 8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_a_model_that_cannot_run_on_meta_gives_none():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x[: int(x.sum().item()) % 3 + 1])  # .item() on a meta tensor fails

    assert flops.train_flops_per_example(DataDependent(), (4,)) is None


def test_peak_table_and_mfu():
    bf16, fp16 = torch.bfloat16, torch.float16
    assert flops.peak_tflops_for("NVIDIA H100 80GB HBM3", bf16) == 989.0  # SXM5
    assert flops.peak_tflops_for("NVIDIA H200", fp16) == 989.0
    assert flops.peak_tflops_for("NVIDIA H100 PCIe", bf16) is None  # lower clocks: not in the table
    assert flops.peak_tflops_for("NVIDIA GH200 480GB", bf16) is None
    assert flops.peak_tflops_for("NVIDIA H100 80GB HBM3", None) is None  # fp32: another peak
    assert flops.resolve_peak_tflops(312.0, torch.device("cpu"), None) == 312.0
    assert flops.resolve_peak_tflops(None, torch.device("cpu"), bf16) is None
    # ResNet-50 (3 x 8.18 GFLOPs per example) at 3,000 img/s on one H100: ~7.4 % MFU
    assert flops.mfu(3 * 8.18e9, 3000.0, 989.0, 1) == pytest.approx(0.0744, rel=0.01)
    assert flops.mfu(1e9, 1000.0, 1.0, 2) == pytest.approx(0.5)
