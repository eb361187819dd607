"""DALI backend, run for real on the CPU: selected without DALI it is a clear one-line error
naming data.backend and the install command; with DALI the images of a step (and their random
crops and flips) are the example stream's, the same whether one rank or two decode them, and the
crop sampler follows torchvision's RandomResizedCrop rules. (Training on 1 vs 2 ranks and
resume: tests/dist/test_dali_train.py; GPU decode: marked gpu.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _images import jpeg_folder
from bigbatch.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")

# Makes `import nvidia.dali` fail the way it does where DALI is not installed, also on machines
# that have it, then runs the CLI.
NO_DALI = "import sys; sys.modules['nvidia.dali'] = None; from bigbatch.cli import main; sys.exit(main(sys.argv[1:]))"


def test_missing_dali_is_a_clear_error(monkeypatch):
    from bigbatch.trainer import dali

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(UsageError) as e:
        dali.require_dali()
    assert e.value.field == "data.backend"
    assert "pip install 'bigbatch[dali]'" in e.value.message and "nvidia-dali-cuda120" in e.value.message
    assert "data.backend = 'torch'" in e.value.message


def test_train_with_dali_missing_exits_2_before_any_work(tmp_path):
    root = tmp_path / "imagenet"
    (root / "train" / "a").mkdir(parents=True)
    (root / "val" / "a").mkdir(parents=True)
    out = tmp_path / "run"
    argv = ["train", MLP, "--set", "data.name='imagefolder'", "--set", f"data.root='{root}'",
            "--set", "data.backend='dali'", "--set", "model.name='resnet18'", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", NO_DALI, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert "\n" not in err and "error: data.backend:" in err and "bigbatch[dali]" in err, err
    assert not out.exists()


def test_crop_window_lies_inside_the_image_with_torchvision_area_and_ratio():
    from bigbatch.trainer.dali import crop_window

    rng = np.random.default_rng(0)
    for width, height in [(40, 36), (500, 375), (64, 640), (17, 9)]:
        for _ in range(200):
            x, y, w, h = crop_window(rng, width, height)
            assert 0 <= x and 0 <= y and 0 < w and 0 < h and x + w <= width and y + h <= height
    # 2 x 1000: no crop of >= 8 % of the area fits with a ratio in 3/4..4/3: the center crop of ratio 3/4
    assert crop_window(np.random.default_rng(1), 2, 1000) == (0, (1000 - 3) // 2, 2, 3)


def _batches(root: Path, world: int, micro: int, steps: int, augment: bool, position: int = 0):
    """The images of `steps` steps of global batch world x micro, decoded by DALI on the CPU, per rank."""
    import torch
    from torchvision.datasets import ImageFolder

    from bigbatch.trainer.dali import DaliBatches
    from bigbatch.trainer.stream import ExampleStream

    samples = ImageFolder(str(root / "train")).samples
    per_rank = []
    for rank in range(world):
        b = DaliBatches(samples, 16, augment, seed=3, device=torch.device("cpu"), num_threads=1)
        stream = ExampleStream(len(samples), 3, position)
        b.restart(stream, lambda s: world * micro, 0, rank, world, lambda s: 1)
        per_rank.append([b.next(torch.device("cpu")) for _ in range(steps)])
    return [(torch.cat([r[s][0] for r in per_rank]), torch.cat([r[s][1] for r in per_rank])) for s in range(steps)]


@pytest.mark.parametrize("augment", [True, False])
def test_a_step_decodes_the_same_images_on_one_rank_and_on_two(tmp_path, augment):
    pytest.importorskip("nvidia.dali")
    import torch

    root = jpeg_folder(tmp_path / "imgs", {"a": 7, "b": 6})  # 13 images: steps straddle epochs
    one = _batches(root, world=1, micro=6, steps=4, augment=augment)
    two = _batches(root, world=2, micro=3, steps=4, augment=augment)
    for (x1, y1), (x2, y2) in zip(one, two):
        assert x1.shape == (6, 3, 16, 16) and x1.dtype == torch.float32 and y1.dtype == torch.int64
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert x1.abs().max() < 5 and x1.std() > 0.1  # mean/std normalised, not 0..255, not blank
    # resuming at a position gives what the uninterrupted stream gave there
    later = _batches(root, world=2, micro=3, steps=2, augment=augment, position=12)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(later, one[2:]))
    if augment:  # crops and flips differ between examples and epochs
        assert not torch.equal(one[0][0], one[3][0])


@pytest.mark.gpu
def test_dali_decodes_on_the_gpu_like_on_the_cpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("nvidia.dali")
    from torchvision.datasets import ImageFolder

    from bigbatch.trainer.dali import DaliBatches
    from bigbatch.trainer.stream import ExampleStream

    root = jpeg_folder(tmp_path / "imgs", {"a": 6, "b": 5})
    samples = ImageFolder(str(root / "train")).samples
    out = {}
    for dev in ("cpu", "cuda"):
        b = DaliBatches(samples, 32, True, seed=0, device=torch.device(dev, 0) if dev == "cuda" else torch.device(dev))
        b.restart(ExampleStream(len(samples), 0), lambda s: 4, 0, 0, 1, lambda s: 1)
        out[dev] = b.next(torch.device(dev))
    assert out["cuda"][0].is_cuda and out["cuda"][0].shape == (4, 3, 32, 32)
    assert torch.equal(out["cuda"][1].cpu(), out["cpu"][1])
    # nvJPEG and libjpeg-turbo differ by rounding in a few pixels
    assert (out["cuda"][0].cpu() - out["cpu"][0]).abs().mean() < 0.05


def test_the_feed_is_a_pure_function_of_the_micro_batch_number(tmp_path):
    """What lets DALI's worker processes compute micro-batches out of order: feed(k) is the k-th
    micro-batch of this rank in the stream (step k // accum, part k % accum), whenever it is asked."""
    from torchvision.datasets import ImageFolder

    from bigbatch.trainer.dali import MicroBatchFeed
    from bigbatch.trainer.stream import ExampleStream, shard

    root = jpeg_folder(tmp_path / "imgs", {"a": 5, "b": 4})  # 9 images: steps straddle epochs
    samples = ImageFolder(str(root / "train")).samples
    batch, world, rank, accum = 8, 2, 1, 2
    feed = MicroBatchFeed(samples, True, 3, ExampleStream(len(samples), 3, position=5), batch, rank, world, accum)
    stream = ExampleStream(len(samples), 3, position=5)
    want = [m for _ in range(6) for m in shard(stream.take(batch), rank, world, accum)]
    backwards = {k: feed(k) for k in reversed(range(len(want)))}
    for k, indices in enumerate(want):
        jpegs, labels, anchors, shapes, flips = backwards[k]
        assert [j.tobytes() for j in jpegs] == [np.fromfile(samples[i][0], dtype=np.uint8).tobytes() for i in indices.tolist()]
        assert [int(y[0]) for y in labels] == [samples[i][1] for i in indices.tolist()]
        again = feed(k)  # the same crops and flips however often and in whatever order it is asked
        assert all(np.array_equal(a, b) for a, b in zip(anchors + shapes + flips, again[2] + again[3] + again[4]))
    assert [len(m) for m in want] == [2] * 12


@pytest.mark.parametrize("augment", [True, False])
def test_parallel_feed_workers_keep_the_stream_order(tmp_path, augment):
    """Two feed processes, four micro-batches in flight each, with accumulation: the same images,
    crops and flips as feeding from the training thread."""
    pytest.importorskip("nvidia.dali")
    import torch
    from torchvision.datasets import ImageFolder

    from bigbatch.trainer.dali import DaliBatches
    from bigbatch.trainer.stream import ExampleStream

    root = jpeg_folder(tmp_path / "imgs", {"a": 6, "b": 5})
    samples = ImageFolder(str(root / "train")).samples
    out = {}
    for workers in (0, 2):
        b = DaliBatches(samples, 16, augment, seed=3, device=torch.device("cpu"), num_threads=1, feed_workers=workers,
                        feed_depth=4)
        b.restart(ExampleStream(len(samples), 3, 7), lambda s: 8, 0, 1, 2, lambda s: 2)  # rank 1 of 2, 2 micro-batches
        out[workers] = [b.next(torch.device("cpu")) for _ in range(9)]
    for (x0, y0), (x2, y2) in zip(out[0], out[2]):
        assert x0.shape == (2, 3, 16, 16) and torch.equal(x0, x2) and torch.equal(y0, y2)
