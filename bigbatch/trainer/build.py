"""The parts of a run that depend on the device and the world: the model on its device (SyncBN,
channels_last), DDP with bigbatch's comm hooks, and the AMP settings. Shared by the training loop
and `bigbatch scaling`."""

from __future__ import annotations

import torch
from torch import nn

from bigbatch.config import Config
from bigbatch.distributed.env import DistEnv
from bigbatch.distributed.hooks import install_comm_hook
from bigbatch.errors import ConfigError
from bigbatch.trainer.data import DataBundle
from bigbatch.trainer.models import build_model


def amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a grad scaler). fp16 without a GPU was refused before launch
    (`TrainConfig.check`)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return None, False
    if amp == "fp16":
        return torch.float16, True
    return torch.bfloat16, False


def prepare_model(cfg: Config, bundle: DataBundle, env: DistEnv) -> nn.Module:
    if cfg.model.name == "gpt" and not (bundle.in_memory and not bundle.train.x.is_floating_point()):
        raise ConfigError("model.name", f"gpt needs token ids (integer inputs, e.g. data.name = 'pysrc'); "
                          f"data.name = {cfg.data.name!r} does not give them")
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and world size
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes)
    if cfg.model.sync_bn and env.world_size > 1:
        if env.device.type != "cuda":
            raise ConfigError("model.sync_bn", "torch's SyncBatchNorm needs GPU inputs; use per-device BatchNorm on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(env.device)
    image = len(bundle.input_shape) == 3
    if image and (cfg.model.channels_last == "on" or (cfg.model.channels_last == "auto" and env.device.type == "cuda")):
        model = model.to(memory_format=torch.channels_last)
    return model


def wrap_ddp(model: nn.Module, cfg: Config, env: DistEnv) -> nn.Module:
    if not env.initialized:
        return model
    ddp = nn.parallel.DistributedDataParallel(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        bucket_cap_mb=cfg.dist.bucket_cap_mb,
        gradient_as_bucket_view=True,
    )
    if cfg.dist.allreduce != "builtin":  # ring / 2D-torus / hierarchical inside DDP
        install_comm_hook(ddp, cfg.dist, env)
    return ddp
