"""NVIDIA DALI loader for ImageNet-style folders (`data.backend = "dali"`): JPEG decoding on the GPU.

Optional: `nvidia.dali` is imported in one place (`require_dali`, which the training loop calls
before any work when this backend is selected); without it, or without a GPU, the error names
data.backend and says what to do. NVIDIA's PyTorch
containers (docker/Dockerfile) ship it.

The pipeline per rank (the usual ImageNet recipe, Goyal et al. 2017 / NVIDIA DeepLearningExamples):
    fn.readers.file(shard_id=rank, num_shards=world_size, pad_last_batch=True, random_shuffle=train)
    -> fn.decoders.image(device="mixed")                 nvJPEG: host parses, GPU decodes
    -> train: fn.random_resized_crop(scale 0.08..1, ratio 3/4..4/3) + random horizontal flip
       eval:  resize the shorter side to size*256/224, then a center crop
    -> fn.crop_mirror_normalize(mean/std of ImageNet, float, CHW)

Every shard yields the same number of batches: `pad_last_batch` pads each shard to the size of
the largest one by repeating its last sample, so no rank runs out of batches before the others
and DDP never waits on a missing all-reduce. Training drops the last partial batch (every step
has the full per-device batch); evaluation keeps it and the padding is removed (each image counts
once per shard).

Data order: DALI shuffles with its own seeded buffer (per rank, seed + rank), not with
bigbatch's example stream, so a resumed run sees a different order than an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bigbatch.errors import ConfigError, UsageError

INSTALL = "pip install --extra-index-url https://pypi.nvidia.com nvidia-dali-cuda120"
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def require_dali():
    """(nvidia.dali, nvidia.dali.plugin.pytorch): the one import of DALI. UsageError naming
    data.backend when it does not import or when there is no CUDA device to decode on."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch as dali_torch
    except ImportError as e:
        raise UsageError("data.backend", f"'dali' needs NVIDIA DALI, which does not import here ({e}): install it with "
                                         f"`{INSTALL}` (CUDA 12; an NVIDIA PyTorch container has it), "
                                         "or set data.backend = 'torch'") from None
    import torch

    if not torch.cuda.is_available():
        raise UsageError("data.backend", "'dali' decodes JPEGs on the GPU and no CUDA device is available; "
                                         "use data.backend = 'torch' on CPU")
    return dali, dali_torch


@dataclass
class DaliLoader:
    """Batches of (images float32 [B, 3, S, S] on the GPU, labels int64 [B] on the GPU), one epoch per
    iteration; `len()` is the number of batches per epoch, the same on every rank."""

    iterator: Any
    batches_per_epoch: int
    train: bool

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for out in self.iterator:
            data = out[0]
            yield data["data"], data["label"].squeeze(-1).long()


def _split_dir(root: str | Path, train: bool) -> Path:
    d = Path(root).expanduser() / ("train" if train else "val")
    if not d.is_dir():
        raise ConfigError("data.root", f"expected ImageNet layout: {str(d)!r} does not exist")
    return d


def build_dali_loader(root: str | Path, image_size: int, per_device_batch: int, rank: int, world_size: int,
                      seed: int, train: bool, *, num_threads: int = 4, device_id: int | None = None) -> DaliLoader:
    """The DALI loader of this rank's shard of root/train (train=True) or root/val.

    device_id defaults to the current CUDA device (the rank's local GPU, set by distributed.env).
    """
    dali, dali_torch = require_dali()
    import torch

    if per_device_batch < 1 or not (0 <= rank < world_size):
        raise UsageError("data.backend", f"bad shard: per_device_batch {per_device_batch}, rank {rank}, world {world_size}")
    split = _split_dir(root, train)
    device_id = torch.cuda.current_device() if device_id is None else device_id
    fn, types = dali.fn, dali.types

    @dali.pipeline_def(batch_size=per_device_batch, num_threads=num_threads, device_id=device_id,
                       seed=seed * 1000 + rank, prefetch_queue_depth=2)
    def pipeline():
        jpegs, labels = fn.readers.file(file_root=str(split), shard_id=rank, num_shards=world_size,
                                        random_shuffle=train, pad_last_batch=True, name="Reader")
        images = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB)
        if train:
            images = fn.random_resized_crop(images, size=[image_size, image_size], random_area=[0.08, 1.0],
                                            random_aspect_ratio=[3 / 4, 4 / 3])
            geometry = {"mirror": fn.random.coin_flip(probability=0.5)}
        else:
            images = fn.resize(images, resize_shorter=int(image_size * 256 / 224))
            geometry = {"crop": (image_size, image_size)}
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=list(IMAGENET_MEAN_255), std=list(IMAGENET_STD_255), **geometry)
        return images, labels.gpu()

    pipe = pipeline()
    pipe.build()
    policy = dali_torch.LastBatchPolicy.DROP if train else dali_torch.LastBatchPolicy.PARTIAL
    iterator = dali_torch.DALIGenericIterator([pipe], ["data", "label"], reader_name="Reader",
                                              last_batch_policy=policy, auto_reset=True)
    # reader_name + pad_last_batch: the iterator sizes every shard as the largest one, so len() is
    # the same on every rank.
    return DaliLoader(iterator, len(iterator), train)
