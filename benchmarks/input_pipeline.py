"""Claim: bigbatch's image input runs at a bare torchvision loop's rate, and DALI (CPU operators)
at least at the torch backend's rate with the same number of worker threads.

Evidence: a generated JPEG folder (ImageNet layout, `--images` photos-like JPEGs of 300-500 x
240-400 px, quality 90, ~ImageNet's ~110 KB per file scaled to the size) read at 224 px with the
training transforms (RandomResizedCrop(224), horizontal flip, to float, ImageNet mean/std):

- `bare`:  torchvision `ImageFolder` + `DataLoader(shuffle=True, num_workers=T)`, the reference loop;
- `torch`: bigbatch's torch backend (`data.load_imagefolder` + `FolderBatches`: a DataLoader with T
  worker processes whose batch sampler follows the example stream);
- `dali`:  bigbatch's DALI backend on the CPU (`DaliBatches`: T decoding threads, libjpeg-turbo,
  decoding only the crop window; its parallel feed in one worker process); `dali_serial_feed`
  (not run by default) is the same with the feed in the training thread, as before issue 29;

at T = 1 and 2 worker threads. With `--device cuda` every batch goes to the GPU (the DataLoaders
pin memory) and a fourth backend, `dali_gpu`, decodes with nvJPEG ("mixed") and augments on the GPU.
Without DALI installed the DALI backends are left out (the JSON says so). Each measurement builds the loader, drops `--warmup` batches (worker
start-up, pipeline build, first reads) and times the next `--batches`; images/s = images / time.
A repeat measures every (backend, T) once, in an order that rotates between repeats; the ratios
are taken within a repeat and their median (with min..max) over `--repeats` repeats is reported.
The folder is read once before timing, so every backend reads from the page cache.

    python benchmarks/input_pipeline.py [--threads 1,2] [--repeats 5] [--batch 32] [--backends bare,torch,dali]
                                        [--device cpu|cuda] [--json FILE]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from _report import emit, spread

SIZE = 224
CLASSES = 4


def make_folder(root: Path, images: int, seed: int = 0) -> Path:
    """root/{train,val}/c{k}/*.jpg: smooth random colour fields with grain, sizes that vary."""
    from PIL import Image

    if (root / "train").is_dir():
        return root
    rng = np.random.default_rng(seed)
    for split, n in (("train", images), ("val", CLASSES)):
        for i in range(n):
            d = root / split / f"c{i % CLASSES}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = int(rng.integers(300, 501)), int(rng.integers(240, 401))
            coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
            pixels = np.asarray(coarse, dtype=np.float32) + rng.normal(0, 12, (h, w, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


def train_transform():
    from torchvision import transforms

    from bigbatch.trainer.data import IMAGENET_MEAN, IMAGENET_STD

    return transforms.Compose([transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def bare(root: Path, threads: int, batch: int, device: torch.device) -> Iterator:
    """The reference: what a user writes with torchvision alone."""
    from torchvision.datasets import ImageFolder

    data = ImageFolder(str(root / "train"), transform=train_transform())
    while True:
        for x, y in torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, num_workers=threads,
                                                drop_last=True, pin_memory=device.type == "cuda"):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def ours_torch(root: Path, threads: int, batch: int, device: torch.device) -> Iterator:
    from bigbatch import config
    from bigbatch.trainer.data import FolderBatches, load_imagefolder
    from bigbatch.trainer.stream import ExampleStream

    cfg = config.load(None, ["data.name='imagefolder'", f"data.root='{root}'", f"data.image_size={SIZE}"])
    train = load_imagefolder(cfg.data).train
    folder = FolderBatches(train, threads, pin_memory=device.type == "cuda")
    folder.restart(ExampleStream(len(train), 0), lambda s: batch, 0, 0, 1, lambda s: 1)
    while True:
        yield folder.next(device)


def ours_dali(root: Path, threads: int, batch: int, device: torch.device, decode_on_gpu: bool = False,
              feed_workers: int = 1) -> Iterator:
    """CPU operators (libjpeg-turbo), the batch then copied to `device`; or nvJPEG + GPU operators."""
    from torchvision.datasets import ImageFolder

    from bigbatch.trainer.dali import DaliBatches
    from bigbatch.trainer.stream import ExampleStream

    samples = ImageFolder(str(root / "train")).samples
    dali = DaliBatches(samples, SIZE, True, seed=0, device=device if decode_on_gpu else torch.device("cpu"),
                       num_threads=threads, feed_workers=feed_workers)
    dali.restart(ExampleStream(len(samples), 0), lambda s: batch, 0, 0, 1, lambda s: 1)
    while True:
        yield dali.next(device)


BACKENDS: dict[str, Callable[..., Iterator]] = {
    "bare": bare, "torch": ours_torch, "dali": ours_dali, "dali_gpu": partial(ours_dali, decode_on_gpu=True),
    "dali_serial_feed": partial(ours_dali, feed_workers=0)}  # the feed in the training thread (before issue 29)


def images_per_s(backend: str, root: Path, threads: int, batch: int, warmup: int, batches: int,
                 device: torch.device) -> float:
    it = BACKENDS[backend](root, threads, batch, device)
    for _ in range(warmup):
        x, _y = next(it)
    assert tuple(x.shape) == (batch, 3, SIZE, SIZE) and x.dtype == torch.float32, x.shape
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    _sync(device)
    seconds = time.perf_counter() - t0
    it.close()  # the loader and its workers go before the next measurement
    return batches * batch / seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="folder to generate into / reuse (default: a temporary one)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--threads", default="1,2", help="worker threads (processes for torch), comma list")
    p.add_argument("--backends", default="bare,torch,dali", help=f"some of {', '.join(BACKENDS)}")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3, help="batches dropped per measurement")
    p.add_argument("--batches", type=int, default=8, help="batches timed per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="where the batches go: cpu, or cuda (adds dali_gpu)")
    p.add_argument("--json", default=None, help="also write the JSON object to this file")
    args = p.parse_args()
    torch.set_num_threads(1)  # the main process only receives batches; the workers decode
    device = torch.device(args.device)
    threads = [int(t) for t in args.threads.split(",")]
    backends = args.backends.split(",")
    if unknown := [b for b in backends if b not in BACKENDS]:
        p.error(f"--backends: unknown {', '.join(unknown)}; expected some of {', '.join(BACKENDS)}")
    if device.type == "cuda" and "dali" in backends and "dali_gpu" not in backends:
        backends.append("dali_gpu")
    left_out = {}
    if not _has_dali():
        left_out = {b: "nvidia.dali does not import" for b in backends if b.startswith("dali")}
    if device.type != "cuda" and "dali_gpu" in backends:
        left_out["dali_gpu"] = "needs --device cuda"
    backends = [b for b in backends if b not in left_out]
    with tempfile.TemporaryDirectory() as tmp:
        root = make_folder(Path(args.root or tmp), args.images)
        files = sorted((root / "train").rglob("*.jpg"))
        mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1024
        for f in files:  # into the page cache
            f.read_bytes()
        runs = [(b, t) for t in threads for b in backends]
        rates: dict[tuple[str, int], list[float]] = {r: [] for r in runs}
        for rep in range(args.repeats):
            for b, t in runs[rep % len(runs):] + runs[:rep % len(runs)]:
                rates[(b, t)].append(images_per_s(b, root, t, args.batch, args.warmup, args.batches, device))
    ratios = {}
    for t in threads:
        for ours, base in (("torch", "bare"), ("dali", "bare"), ("dali", "torch"), ("dali_gpu", "torch"),
                           ("dali", "dali_serial_feed")):
            if ours in backends and base in backends:
                ratios[f"{ours}/{base}@{t}"] = spread([a / b for a, b in zip(rates[(ours, t)], rates[(base, t)])])
    emit({
        "benchmark": "input_pipeline", "device": str(device), "left_out": left_out, "image_size": SIZE, "images": len(files), "mean_file_kb": round(mean_kb, 1),
        "batch": args.batch, "warmup_batches": args.warmup, "timed_batches": args.batches, "repeats": args.repeats,
        "images_per_s": {f"{b}@{t}": spread(v) for (b, t), v in rates.items()},
        "ratios": ratios,
        "targets": {"torch/bare": ">= 0.9", "dali/bare": ">= 0.9", "dali/torch": ">= 1.0"},
    }, device, args.json)


if __name__ == "__main__":
    main()
