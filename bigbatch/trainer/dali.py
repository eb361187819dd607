"""NVIDIA DALI decoding for ImageNet-style folders (`data.backend = "dali"`), fed by bigbatch's
example stream.

Optional: `nvidia.dali` is imported in one place (`require_dali`, which the training loop calls
before any work when this backend is selected); without it the error names data.backend and says
how to install it (`pip install 'bigbatch[dali]'` = nvidia-dali-cuda130; nvidia-dali-cuda120 on
CUDA 12 clusters; NVIDIA's PyTorch containers ship it).

Which images, in which order: not DALI's file reader (it shuffles with its own seeded buffer per
rank, so the order would depend on the world size and a resumed run would differ). The example
stream picks each step's global batch, this rank takes its slice (`data.shard`), and a Python
source (`fn.external_source`) hands DALI the encoded bytes of exactly those files. The random
crop and flip of every example are drawn in Python too, from a generator seeded by (train.seed,
the example's position in the stream), and passed to DALI as per-sample arguments. So the
images of a step, and their augmentation, are the same for any world size, any accumulation, and
after a resume (`restart` at the checkpointed position), as with the torch backend.

The source is parallel (DALI's parallel external source): `MicroBatchFeed` is a pure function of
the micro-batch number (the stream is a function of the position), so DALI's Python worker
processes read the files, parse the JPEG headers and draw the crops of several micro-batches at
once, ahead of the pipeline, and the training process only receives them through shared memory.
Fed serially from the training thread (the first version), reading the files set the rate of a
GPU pipeline and took that thread's time from the training step.

The pipeline per rank (the usual ImageNet recipe, Goyal et al. 2017 / NVIDIA DeepLearningExamples):
    external_source -> (jpeg bytes, label, crop window, flip)
    train: fn.decoders.image_slice(crop window)         decode only the RandomResizedCrop window
           (scale 0.08..1, aspect ratio 3/4..4/3, torchvision's sampling), fn.resize to size x size
    no augment: fn.decoders.image, resize the shorter side to size*256/224, then a center crop
    -> fn.crop_mirror_normalize(mean/std of ImageNet, float, CHW, mirror=flip)
Decoding runs on the CPU without a GPU (device_id=None: a CPU-only pipeline, libjpeg-turbo) and
"mixed" (nvJPEG: host parses, GPU decodes; resize and normalize on the GPU) with one.

Evaluation still reads the folder through torchvision (data.eval_batches); only training batches
come from DALI.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable

import numpy as np
from PIL import Image

from bigbatch.errors import UsageError
from bigbatch.trainer.stream import ExampleStream, shard

INSTALL = "pip install 'bigbatch[dali]'"
INSTALL_NOTE = "nvidia-dali-cuda130; on a CUDA 12 cluster pip install nvidia-dali-cuda120"
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def require_dali():
    """(nvidia.dali, nvidia.dali.plugin.pytorch): the one import of DALI; UsageError naming
    data.backend when it does not import."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.plugin.pytorch as dali_torch
    except ImportError as e:
        raise UsageError("data.backend", f"'dali' needs NVIDIA DALI, which does not import here ({e}): install it with "
                                         f"`{INSTALL}` ({INSTALL_NOTE}; an NVIDIA PyTorch container has it), "
                                         "or set data.backend = 'torch'") from None
    return dali, dali_torch


def crop_window(rng: np.random.Generator, width: int, height: int, scale=SCALE, ratio=RATIO) -> tuple[int, int, int, int]:
    """(x, y, w, h) of a RandomResizedCrop window: torchvision's sampling (10 tries of area and
    log-uniform aspect ratio, then a center crop of the clamped ratio), with numpy's generator."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class MicroBatchFeed:
    """This rank's micro-batch number k of a pipeline -> DALI's inputs for it, as a pure function.

    Picklable and stateless but for a cache (the current epoch's permutation), so DALI can run it
    in its worker processes, several micro-batches at once: micro-batch k is accumulation part
    k mod `accum` of step k // `accum` after `start_position`, at a constant global `batch`
    (a pipeline has one batch size; `DaliBatches.restart` builds a new one when it changes).
    """

    def __init__(self, samples: list[tuple[str, int]], augment: bool, seed: int, stream: ExampleStream,
                 batch: int, rank: int, world: int, accum: int):
        self.samples, self.augment, self.seed = samples, augment, seed
        self.num_examples, self.stream_seed, self.start_position = stream.n, stream.seed, stream.position
        self.batch, self.rank, self.world, self.accum = batch, rank, world, accum
        self._stream: ExampleStream | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stream": None}  # each worker draws its own permutations

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:
        """`info`: DALI's BatchInfo (or the iteration number): the inputs of micro-batch info.iteration."""
        step, part = divmod(getattr(info, "iteration", info), self.accum)
        if self._stream is None:
            self._stream = ExampleStream(self.num_examples, self.stream_seed)
        start = self._stream.position = self.start_position + step * self.batch
        micros = shard(self._stream.take(self.batch), self.rank, self.world, self.accum)
        # stream position of this micro-batch's first example
        first = start + self.rank * (self.batch // self.world) + sum(len(m) for m in micros[:part])
        return self.inputs(micros[part].tolist(), first)

    def inputs(self, indices: list[int], first_position: int) -> tuple[list[np.ndarray], ...]:
        jpegs, labels, anchors, shapes, flips = [], [], [], [], []
        for k, i in enumerate(indices):
            path, label = self.samples[i]
            data = np.fromfile(path, dtype=np.uint8)
            jpegs.append(data)
            labels.append(np.array([label], dtype=np.int64))
            if self.augment:  # the example's own generator: independent of rank, batch and resume
                rng = np.random.default_rng((self.seed, first_position + k))
                width, height = Image.open(io.BytesIO(data)).size  # header only
                x, y, w, h = crop_window(rng, width, height)
                anchors.append(np.array([x, y], dtype=np.float32))
                shapes.append(np.array([w, h], dtype=np.float32))
                flips.append(np.array(rng.random() < 0.5, dtype=np.int32))
        return (jpegs, labels, anchors, shapes, flips) if self.augment else (jpegs, labels)


class DaliBatches:
    """Training micro-batches of an image folder decoded by DALI, in the example stream's order.

    The same interface as `data.FolderBatches`: `restart(...)` (at the start, after a resume or a
    batch-size change) builds the pipeline for this rank's micro-batch size at the stream's
    position; `next(device)` returns (images float32 [B, 3, S, S], labels int64 [B]) on `device`.
    `samples` is the folder's [(path, class), ...] (torchvision ImageFolder's `.samples`, so the
    indices mean the same files as with the torch backend). `num_threads` DALI threads decode;
    `feed_workers` processes read the files ahead, `feed_depth` micro-batches each; 0 feed
    workers feed from this thread.
    """

    def __init__(self, samples: list[tuple[str, int]], image_size: int, augment: bool, seed: int, device,
                 num_threads: int = 4, feed_workers: int = 1, feed_depth: int = 2):
        self.dali, self.dali_torch = require_dali()
        self.samples, self.size, self.augment, self.seed = samples, image_size, augment, seed
        self.device, self.num_threads = device, max(num_threads, 1)
        self.feed_workers, self.feed_depth = feed_workers, max(feed_depth, 1)
        self._pipe = None

    def _build(self, feed: MicroBatchFeed, batch_size: int):
        dali = self.dali
        fn, types = dali.fn, dali.types
        on_gpu = self.device.type == "cuda"
        size, augment = self.size, self.augment
        source: dict[str, Any] = {"source": feed, "batch": True, "batch_info": True}
        if self.feed_workers > 0:  # micro-batches computed ahead, over all workers
            source.update(parallel=True, prefetch_queue_depth=self.feed_depth * self.feed_workers)
        # fork (instant: the workers inherit the imports) unless CUDA is initialised, where only a
        # fresh interpreter is safe (it imports torch for the stream: seconds, once per pipeline)
        start_method = "spawn" if on_gpu or dali.backend.IsDriverInitialized() else "fork"

        @dali.pipeline_def(batch_size=batch_size, num_threads=self.num_threads,
                           device_id=self.device.index if on_gpu else None, prefetch_queue_depth=2,
                           py_num_workers=self.feed_workers, py_start_method=start_method)
        def pipeline():
            decoder = "mixed" if on_gpu else "cpu"
            norm = {"dtype": types.FLOAT, "output_layout": "CHW", "mean": list(IMAGENET_MEAN_255), "std": list(IMAGENET_STD_255)}
            if augment:
                jpegs, labels, anchor, shape, flip = fn.external_source(
                    **source, num_outputs=5, dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32])
                images = fn.decoders.image_slice(jpegs, anchor, shape, axis_names="WH", normalized_anchor=False,
                                                 normalized_shape=False, device=decoder, output_type=types.RGB)
                images = fn.resize(images, size=[size, size])
                images = fn.crop_mirror_normalize(images, mirror=flip, **norm)
            else:
                jpegs, labels = fn.external_source(**source, num_outputs=2, dtype=[types.UINT8, types.INT64])
                images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
                images = fn.resize(images, resize_shorter=int(size * 256 / 224))
                images = fn.crop_mirror_normalize(images, crop=(size, size), **norm)
            return images, labels

        pipe = pipeline()
        pipe.build()
        return pipe

    def restart(self, stream, batch_fn: Callable[[int], int], start_step: int, rank: int, world: int,
                accum: Callable[[int], int]) -> None:
        """A pipeline at the stream's position for the global batch and accumulation of `start_step`,
        which it keeps (the caller restarts when they change)."""
        batch, parts = batch_fn(start_step), accum(start_step)
        self._pipe = None  # the old pipeline (its prefetched batches, its feed workers) goes
        feed = MicroBatchFeed(self.samples, self.augment, self.seed, stream, batch, rank, world, parts)
        self._pipe = self._build(feed, batch // world // parts)

    def next(self, device) -> tuple[Any, Any]:
        import torch

        assert self._pipe is not None, "restart() first"
        images, labels = self._pipe.run()
        y = torch.from_numpy(np.array(labels.as_tensor())).reshape(-1).to(device, non_blocking=True)
        dense = images.as_tensor()
        if self.device.type == "cuda":
            x = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
            self.dali_torch.feed_ndarray(dense, x, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            x = torch.from_numpy(np.array(dense))
        return x.to(device, non_blocking=True), y
