"""Datasets, and the batches read from them.

Datasets (no downloads, ever):
- mnist1d: generated locally with `mnist1d.data.make_dataset` (Greydanus 2020), cached as .npz
  keyed by its parameters;
- digits: scikit-learn's 8x8 digits (ships with scikit-learn);
- synthetic: Gaussian inputs labelled by a fixed random teacher network;
- fake_images: random images and labels (throughput benchmarks only);
- imagefolder: torchvision ImageFolder, ImageNet layout (root/train/<class>/*, root/val/<class>/*);
- cifar10: the standard python pickles (cifar-10-batches-py) in a local folder;
- pysrc: the standard library's .py sources as bytes, windows with next-byte targets
  (`bigbatch.trainer.corpus`), cached like mnist1d.

Small datasets are held as tensors ("in memory": a batch is one index operation). Image folders go
through a DataLoader fed by the same stream.

Data order: `bigbatch.trainer.stream` (one seeded stream of examples, sharded over ranks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bigbatch.config import DataConfig
from bigbatch.errors import ConfigError
from bigbatch.trainer import corpus
from bigbatch.trainer.stream import ExampleStream, eval_shard, shard
from bigbatch.trainer.userdata import InMemory, load_entry_point

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class TensorData:
    """Examples held in memory: x[i], y[i]; `augment(x)` runs per batch on the batch's device."""

    x: torch.Tensor
    y: torch.Tensor
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class DataBundle:
    train: TensorData | torch.utils.data.Dataset
    test: TensorData | torch.utils.data.Dataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train, TensorData)

    @property
    def target_shape(self) -> tuple[int, ...]:
        """One example's target: () for a class label, (T,) for a sequence of T targets."""
        y = self.train.y[0] if isinstance(self.train, TensorData) else torch.as_tensor(self.train[0][1])
        return tuple(y.shape)


# --- datasets ------------------------------------------------------------------------------


def cache_dir(cfg: DataConfig) -> Path:
    if cfg.name == "mnist1d" and cfg.root:
        return Path(cfg.root).expanduser()
    return Path(os.environ.get("BIGBATCH_CACHE", Path.home() / ".cache" / "bigbatch"))


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = max(int(round(len(y) * test_fraction)), 1)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


def _tensor_bundle(name, xtr, ytr, xte, yte, num_classes) -> DataBundle:
    tr = TensorData(torch.as_tensor(xtr, dtype=torch.float32), torch.as_tensor(ytr, dtype=torch.long))
    te = TensorData(torch.as_tensor(xte, dtype=torch.float32), torch.as_tensor(yte, dtype=torch.long))
    return DataBundle(tr, te, num_classes, tuple(tr.x.shape[1:]), name)


def load_mnist1d(cfg: DataConfig) -> DataBundle:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = cfg.num_samples
    args.train_split = 1.0 - cfg.test_fraction
    args.seed = cfg.seed
    key_src = {k: v for k, v in vars(args).items() if k != "url"}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir(cfg) / f"mnist1d-{cfg.num_samples}-{key}.npz"
    if path.exists():
        with np.load(path) as z:
            xtr, ytr, xte, yte = z["x"], z["y"], z["x_test"], z["y_test"]
    else:
        state = np.random.get_state()  # make_dataset reseeds numpy's global RNG
        d = make_dataset(args)
        np.random.set_state(state)
        xtr, ytr = d["x"].astype(np.float32), d["y"].astype(np.int64)
        xte, yte = d["x_test"].astype(np.float32), d["y_test"].astype(np.int64)
        _atomic_save_npz(path, x=xtr, y=ytr, x_test=xte, y_test=yte)
    if cfg.label_noise > 0:  # training labels only: the test error is read against the clean labels
        ytr = _noisy_labels(ytr, cfg.label_noise, 10, cfg.seed)
    return _tensor_bundle("mnist1d", xtr, ytr, xte, yte, 10)


def _noisy_labels(y: np.ndarray, fraction: float, num_classes: int, seed: int) -> np.ndarray:
    """Each label replaced, with probability `fraction`, by a uniformly random class (the same
    class one time in num_classes, so about fraction x (1 - 1/num_classes) of them change); the
    same flips for a given data seed, whatever the training seed."""
    g = torch.Generator().manual_seed(seed)
    flip = torch.rand(len(y), generator=g) < fraction
    out = torch.as_tensor(y).clone()
    out[flip] = torch.randint(0, num_classes, (int(flip.sum()),), generator=g)
    return out.numpy()


def load_digits(cfg: DataConfig) -> DataBundle:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.data / 16.0).astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    xtr, ytr, xte, yte = _split(x, d.target.astype(np.int64), cfg.test_fraction, cfg.seed)
    return _tensor_bundle("digits", xtr, ytr, xte, yte, 10)


def load_synthetic(cfg: DataConfig) -> DataBundle:
    """Inputs x ~ N(0, I); labels = argmax of a fixed random two-layer teacher network."""
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.num_samples, cfg.num_features, generator=g)
    w1 = torch.randn(cfg.num_features, 64, generator=g) / cfg.num_features ** 0.5
    w2 = torch.randn(64, cfg.num_classes, generator=g) / 8.0
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    if cfg.label_noise > 0:
        flip = torch.rand(cfg.num_samples, generator=g) < cfg.label_noise
        y[flip] = torch.randint(0, cfg.num_classes, (int(flip.sum()),), generator=g)
    xtr, ytr, xte, yte = _split(x.numpy(), y.numpy(), cfg.test_fraction, cfg.seed)
    return _tensor_bundle("synthetic", xtr, ytr, xte, yte, cfg.num_classes)


def load_fake_images(cfg: DataConfig) -> DataBundle:
    """Random uint8 images with random labels, held in memory: for throughput, not accuracy."""
    g = torch.Generator().manual_seed(cfg.seed)
    n_test = max(int(round(cfg.num_samples * cfg.test_fraction)), 1)
    shape = (3, cfg.image_size, cfg.image_size)

    def make(n: int) -> TensorData:
        x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        y = torch.randint(0, cfg.num_classes, (n,), generator=g)
        return TensorData(x, y, normalize=_normalizer(IMAGENET_MEAN, IMAGENET_STD))

    return DataBundle(make(cfg.num_samples - n_test), make(n_test), cfg.num_classes, shape, "fake_images")


def _cifar_folder(root: Path) -> Path:
    for cand in (root / "cifar-10-batches-py", root):
        if (cand / "data_batch_1").is_file() and (cand / "test_batch").is_file():
            return cand
    raise ConfigError("data.root", f"no CIFAR-10 python batches (data_batch_1..5, test_batch) under {str(root)!r}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(d[b"labels"], dtype=np.int64)


def random_crop_flip(x: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Per-example random crop (zero padding) and horizontal flip of a batch of NCHW images."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None])[:, None, None, :]
    out = padded[torch.arange(n, device=x.device)[:, None, None, None], torch.arange(x.shape[1], device=x.device)[None, :, None, None], rows, cols]
    flip = torch.rand(n, device=x.device) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _normalizer(mean, std) -> Callable[[torch.Tensor], torch.Tensor]:
    def normalize(x: torch.Tensor) -> torch.Tensor:
        m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
        return (x.float() / 255.0 - m) / s

    return normalize


def load_cifar10(cfg: DataConfig) -> DataBundle:
    folder = _cifar_folder(Path(cfg.root).expanduser())
    parts = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6) if (folder / f"data_batch_{i}").is_file()]
    xtr = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    ytr = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    xte_np, yte_np = _read_cifar_batch(folder / "test_batch")
    norm = _normalizer(CIFAR_MEAN, CIFAR_STD)
    train = TensorData(xtr, ytr, augment=random_crop_flip if cfg.augment else None, normalize=norm)
    test = TensorData(torch.from_numpy(xte_np), torch.from_numpy(yte_np), normalize=norm)
    return DataBundle(train, test, 10, (3, 32, 32), "cifar10")


def load_imagefolder(cfg: DataConfig) -> DataBundle:
    from torchvision import datasets, transforms

    root = Path(cfg.root).expanduser()
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ConfigError("data.root", f"expected ImageNet layout: {str(root / split)!r} does not exist")
    size = cfg.image_size
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = (
        transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize])
        if cfg.augment
        else transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size), transforms.ToTensor(), normalize])
    )
    test_tf = transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size), transforms.ToTensor(), normalize])
    train = datasets.ImageFolder(str(root / "train"), transform=train_tf)
    test = datasets.ImageFolder(str(root / "val"), transform=test_tf)
    if len(train) == 0:
        raise ConfigError("data.root", f"no images under {str(root / 'train')!r}")
    return DataBundle(train, test, len(train.classes), (3, size, size), "imagefolder")


def load_pysrc(cfg: DataConfig) -> DataBundle:
    (xtr, ytr), (xte, yte) = corpus.load_windows(cfg, cache_dir(cfg), _atomic_save_npz)
    return DataBundle(TensorData(xtr, ytr), TensorData(xte, yte), corpus.VOCAB, (xtr.shape[1],), "pysrc")


LOADERS = {
    "mnist1d": load_mnist1d,
    "digits": load_digits,
    "synthetic": load_synthetic,
    "fake_images": load_fake_images,
    "cifar10": load_cifar10,
    "imagefolder": load_imagefolder,
    "pysrc": load_pysrc,
}


KNOWN_TRAIN_SIZES = {"digits": 1797, "imagefolder": 1_281_167, "cifar10": 50_000}  # imagefolder: ImageNet-1k


def train_size_hint(cfg: DataConfig, exact: bool = False) -> int | None:
    """Training-set size without loading data: exact for generated sets; for image folders and
    CIFAR-10 the standard size (ImageNet-1k, CIFAR-10), or None when `exact` is asked for.
    For checks before any work and for --dry-run."""
    if cfg.name in ("mnist1d", "synthetic", "fake_images", "digits"):
        n = KNOWN_TRAIN_SIZES.get(cfg.name, cfg.num_samples)
        n -= max(int(round(n * cfg.test_fraction)), 1)
    elif cfg.name not in KNOWN_TRAIN_SIZES:  # "module:function": only calling it tells
        return None
    elif exact:
        return None
    else:
        n = KNOWN_TRAIN_SIZES[cfg.name]
    return min(n, cfg.train_samples) if cfg.train_samples else n


def load_user_data(cfg: DataConfig) -> DataBundle:
    """data.name = "package.module:function" (see trainer/userdata.py): (x, y) tensors are held in
    memory, map-style datasets go through a DataLoader, both fed by the example stream."""
    train, test, num_classes, input_shape = load_entry_point(cfg)
    train, test = (TensorData(s.x, s.y) if isinstance(s, InMemory) else s for s in (train, test))
    return DataBundle(train, test, num_classes, input_shape, cfg.name)


def build_data(cfg: DataConfig) -> DataBundle:
    if cfg.name not in LOADERS:  # "package.module:function" (config checked the form)
        bundle = load_user_data(cfg)
    else:
        bundle = LOADERS[cfg.name](cfg)
    if cfg.train_samples and cfg.train_samples < len(bundle.train):  # the first N: the same subset for every seed
        t = bundle.train
        bundle.train = (TensorData(t.x[:cfg.train_samples], t.y[:cfg.train_samples], t.augment, t.normalize)
                        if isinstance(t, TensorData) else torch.utils.data.Subset(t, range(cfg.train_samples)))
    return bundle


# --- batches -------------------------------------------------------------------------------

# The signals that ask a run to stop (bigbatch.trainer.stop). The rank's main process owns them:
# SLURM sends them to every process of a job step, DataLoader workers included, and torch's
# worker handler turns a SIGTERM from anyone but the parent into the worker's death ("DataLoader
# worker killed by signal"), which ended the rank before it could checkpoint.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader worker's `worker_init_fn`: ignore the stop signals (the parent stops the
    workers when the run stops), then unblock them (`stop_signals_blocked` blocked them across
    the fork, so one sent before this point is dropped, not fatal)."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block the stop signals in this thread while DataLoader workers are forked: a forked child
    inherits the mask, so a signal that arrives before its `ignore_stop_signals` is held, not
    acted on (with the fork start method, Linux's default up to Python 3.13). The parent gets a
    signal held meanwhile when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def loader_iter(loader: torch.utils.data.DataLoader):
    """iter(loader), its workers forked with the stop signals blocked."""
    if loader.num_workers == 0:
        return iter(loader)
    with stop_signals_blocked():
        return iter(loader)


def tensor_batch(data: TensorData, idx: torch.Tensor, device: torch.device, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.x.index_select(0, idx), data.y.index_select(0, idx)  # x[idx]'s values, 3.7 vs 10 us
    if x.device != device:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if train and data.augment is not None:
        x = data.augment(x)
    if data.normalize is not None:
        x = data.normalize(x)
    return x, y


class FolderBatches:
    """Micro-batches of a map-style dataset (image folders) through a DataLoader.

    The loader's batch sampler pulls index lists from a copy of the example stream, so loading
    runs ahead in worker processes while the order stays the stream's. `restart` rebuilds it at a
    new position (after a resume or a batch-size change).
    """

    def __init__(self, dataset, num_workers: int, pin_memory: bool):
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._it = None

    def restart(self, stream: ExampleStream, batch_fn: Callable[[int], int], start_step: int, rank: int, world: int, accum: Callable[[int], int]):
        shadow = ExampleStream(stream.n, stream.seed, stream.position)

        def sampler():
            step = start_step
            while True:
                for micro in shard(shadow.take(batch_fn(step)), rank, world, accum(step)):
                    yield micro.tolist()
                step += 1

        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler(), num_workers=self.num_workers, pin_memory=self.pin_memory,
            persistent_workers=False, prefetch_factor=4 if self.num_workers > 0 else None,
            worker_init_fn=ignore_stop_signals if self.num_workers > 0 else None,
        )
        self._it = loader_iter(loader)

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._it is not None, "restart() first"
        x, y = next(self._it)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def eval_batch_counts(n: int, world_size: int, batch_size: int) -> list[int]:
    """Batches of each rank's shard of an n-example evaluation set (as `eval_batches` yields them)."""
    return [-(-len(eval_shard(n, r, world_size)) // batch_size) for r in range(world_size)]


def eval_batches(data, rank: int, world_size: int, batch_size: int, device: torch.device, limit: int = 0, num_workers: int = 0):
    """Yield (x, y) over this rank's shard of an evaluation set (the first `limit` examples if > 0)."""
    n = len(data) if not limit else min(limit, len(data))
    idx = eval_shard(n, rank, world_size)
    if isinstance(data, TensorData):
        for start in range(idx.start, idx.stop, batch_size):
            sel = torch.arange(start, min(start + batch_size, idx.stop))
            yield tensor_batch(data, sel, device, train=False)
    else:
        subset = torch.utils.data.Subset(data, list(idx))
        # forkserver: the rank forks nothing itself. A fork from a rank whose gloo threads run
        # Python now and then deadlocked the child in CPython's after-fork thread cleanup (seen on
        # the 2-node SLURM test: the worker stuck in PyOS_AfterFork_Child, the rank waiting for it,
        # its peer in the next collective). The training loader forks once, before them.
        if num_workers > 0:  # the server imports these once; its workers start with them
            import multiprocessing

            multiprocessing.set_forkserver_preload(["torch", "torchvision.datasets", "bigbatch.trainer.data"])
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers,
                                             worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
                                             multiprocessing_context="forkserver" if num_workers > 0 else None)
        for x, y in loader_iter(loader):
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
