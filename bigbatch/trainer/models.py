"""Models: an MLP, a small 1D CNN for MNIST-1D, torchvision ResNets (weights=None), any torchvision
classification model ("torchvision:NAME"), a tiny GPT for token sequences ("gpt",
`bigbatch.trainer.gpt`) and a user's own ("package.module:function").

`zero_init_residual` zero-initialises the last BatchNorm gamma of every residual block, so each
block starts as the identity (Goyal et al. 2017, section 5.1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bigbatch import entrypoints
from bigbatch.config import ModelConfig
from bigbatch.entrypoints import is_entry_point
from bigbatch.errors import ConfigError
from bigbatch.trainer.gpt import build_gpt


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN1D(nn.Module):
    """Three strided 1D conv layers with BatchNorm, then a linear head (MNIST-1D: 40 -> 10).

    A signal of length L enters as one channel; BatchNorm makes large learning rates usable,
    which large-batch training needs.
    """

    def __init__(self, length: int, num_classes: int, channels: int = 32):
        super().__init__()
        c = channels

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv1d(cin, cout, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(cout), nn.ReLU())

        self.features = nn.Sequential(block(1, c), block(c, c), block(c, c))
        out_len = length
        for _ in range(3):
            out_len = math.floor((out_len + 2 * 2 - 5) / 2) + 1
        self.head = nn.Linear(c * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")


def build_resnet(name: str, num_classes: int, zero_init_residual: bool, small_input: bool) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)
    if small_input:  # 32x32 inputs: a 3x3 stem without max-pool keeps the spatial resolution
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def build_entry_point_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """"torchvision:NAME" -> get_model(NAME, weights=None, num_classes=..., **kwargs);
    "package.module:function" -> function(input_shape, num_classes, **kwargs), which must return
    an nn.Module. zero_init_residual applies to whatever torchvision residual blocks it has."""
    if cfg.small_input:
        raise ConfigError("model.small_input", "only for the built-in resnets (a 3x3 stem for 32x32 images)")
    if cfg.name.startswith(entrypoints.TORCHVISION):
        import torchvision

        name = entrypoints.check_torchvision(cfg.name)
        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **cfg.kwargs)
        except TypeError as e:
            raise ConfigError("model.kwargs", f"torchvision's {name} does not take {cfg.kwargs}: {e}") from None
    else:
        fn = entrypoints.resolve(cfg.name, "model.name")
        entrypoints.check_call(fn, (input_shape, num_classes), cfg.kwargs, cfg.name, "model.kwargs")
        model = fn(tuple(input_shape), num_classes, **cfg.kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError("model.name", f"{cfg.name!r} returned a {type(model).__name__}, expected a torch.nn.Module")
    if cfg.zero_init_residual:
        last_bn = residual_last_bn(model)
        if not last_bn:
            raise ConfigError("model.zero_init_residual", f"{cfg.name} has no torchvision residual blocks to zero-init")
        for bn in last_bn:
            nn.init.zeros_(bn.weight)
    return model


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model named by cfg for inputs of `input_shape` (without the batch dimension)."""
    if cfg.name.startswith(entrypoints.TORCHVISION) or is_entry_point(cfg.name):
        return build_entry_point_model(cfg, input_shape, num_classes)
    if cfg.zero_init_residual and cfg.name not in RESNETS:
        raise ConfigError("model.zero_init_residual", f"{cfg.name} has no residual blocks; only resnets do")
    if cfg.name == "mlp":
        return MLP(math.prod(input_shape), num_classes, cfg.hidden, cfg.depth)
    if cfg.name == "cnn1d":
        if len(input_shape) != 1:
            raise ConfigError("model.name", f"cnn1d needs 1D inputs (mnist1d, digits, synthetic); got input shape {input_shape}")
        return CNN1D(input_shape[0], num_classes, cfg.channels)
    if cfg.name in RESNETS:
        if len(input_shape) != 3:
            raise ConfigError("model.name", f"{cfg.name} needs images (imagefolder, cifar10); got input shape {input_shape}")
        return build_resnet(cfg.name, num_classes, cfg.zero_init_residual, cfg.small_input)
    if cfg.name == "gpt":
        return build_gpt(input_shape, num_classes, cfg.kwargs)
    raise ConfigError("model.name", f"unknown model {cfg.name!r}")


def residual_last_bn(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The last BatchNorm of every torchvision residual block (the ones zero-init touches)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    out = []
    for m in model.modules():
        if isinstance(m, Bottleneck):
            out.append(m.bn3)
        elif isinstance(m, BasicBlock):
            out.append(m.bn2)
    return out
