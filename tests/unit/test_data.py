"""Data order depends only on the seed and the epoch; every world size sees the same examples."""

import pickle

import numpy as np
import pytest
import torch

from bigbatch import config
from bigbatch.config import ConfigError
from bigbatch.trainer.data import build_data
from bigbatch.trainer.stream import ExampleStream, eval_shard, shard


def test_stream_is_a_concatenation_of_seeded_epoch_permutations():
    s = ExampleStream(10, seed=3)
    got = torch.cat([s.take(4) for _ in range(5)])  # 20 examples = 2 epochs, batches straddle epochs
    e0 = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003 + 0))
    e1 = torch.randperm(10, generator=torch.Generator().manual_seed(3 * 1_000_003 + 1))
    assert torch.equal(got, torch.cat([e0, e1]))
    assert s.position == 20 and s.epoch == 2.0
    resumed = ExampleStream(10, seed=3, position=8)
    assert torch.equal(resumed.take(4), got[8:12])


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (4, 1), (1, 4), (2, 2)])
def test_shards_of_all_ranks_rebuild_the_global_batch(world, accum):
    idx = ExampleStream(1000, seed=0).take(64)
    pieces = [m for r in range(world) for m in shard(idx, r, world, accum)]
    assert len(pieces) == world * accum
    assert torch.equal(torch.cat(pieces), idx)


def test_eval_shards_cover_the_set_once():
    got = [i for r in range(3) for i in eval_shard(10, r, 3)]
    assert got == list(range(10))


def test_mnist1d_is_generated_and_cached(tmp_path):
    cfg = config.load(None, ["data.num_samples=1000", f"data.root='{tmp_path}'"]).data
    a = build_data(cfg)
    files = list(tmp_path.glob("mnist1d-1000-*.npz"))
    assert len(files) == 1
    b = build_data(cfg)  # from the cache
    assert torch.equal(a.train.x, b.train.x) and a.input_shape == (40,) and a.num_classes == 10
    assert len(a.train) == 800 and len(a.test) == 200


def test_digits_and_synthetic():
    d = build_data(config.load(None, ["data.name=digits"]).data)
    assert d.input_shape == (64,) and len(d.train) + len(d.test) == 1797
    s = build_data(config.load(None, ["data.name=synthetic", "data.num_samples=500", "data.num_features=8",
                                      "data.num_classes=3"]).data)
    assert s.input_shape == (8,) and s.num_classes == 3 and set(s.train.y.tolist()) <= {0, 1, 2}


def test_cifar10_reads_the_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 10)]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}, f)
    b = build_data(config.load(None, ["data.name=cifar10", f"data.root='{tmp_path}'"]).data)
    assert len(b.train) == 100 and len(b.test) == 10 and b.input_shape == (3, 32, 32)
    x = b.train.normalize(b.train.augment(b.train.x[:4]))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


def test_imagefolder_tree(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((40, 48, 3), i * 40, dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    b = build_data(config.load(None, ["data.name=imagefolder", f"data.root='{tmp_path}'", "data.image_size=32"]).data)
    assert b.num_classes == 2 and len(b.train) == 6 and b.input_shape == (3, 32, 32)
    assert b.train[0][0].shape == (3, 32, 32)


def test_missing_data_root_is_a_config_error(tmp_path):
    cfg = config.load(None, ["data.name=imagefolder", f"data.root='{tmp_path / 'nope'}'"])
    with pytest.raises(ConfigError) as e:
        cfg.validate(1)
    assert e.value.field == "data.root"


@pytest.mark.parametrize("world, accum", [(1, 1), (2, 1), (3, 1), (2, 2), (1, 3)])
@pytest.mark.parametrize("per_batch", [False, True])
def test_the_sources_fast_path_gives_the_general_paths_batches(world, accum, per_batch):
    # plain tensors take a shortcut (two index_selects); with normalize set they go through
    # tensor_batch: both must give every rank the same examples, epoch boundaries included
    from bigbatch.distributed.env import DistEnv
    from bigbatch.trainer.data import DataBundle, TensorData, tensor_batch
    from bigbatch.trainer.sources import TensorSource

    x, y = torch.randn(20, 3), torch.arange(20) % 7
    norm = (lambda t: t * 2.0) if per_batch else None
    bundle = DataBundle(TensorData(x, y, normalize=norm), TensorData(x, y), 7, (3,), "t")
    for rank in range(world):
        env = DistEnv(rank, world, rank, world, torch.device("cpu"), None, False)
        source, ref = TensorSource(bundle, ExampleStream(20, 4), env), ExampleStream(20, 4)
        assert source._plain is not per_batch
        for step, k in enumerate([2, 2, 4, 1, 6, 2]):  # 34 batch units of a 20-example set: epochs straddled
            b = 2 * k * world * accum
            got = list(source.micro_batches(step, b, accum))
            want = [(*tensor_batch(bundle.train, i, env.device, train=True), len(i))
                    for i in shard(ref.take(b), rank, world, accum)]
            assert len(got) == len(want) == accum
            for (gx, gy, gn), (wx, wy, wn) in zip(got, want):
                assert torch.equal(gx, wx) and torch.equal(gy, wy) and gn == wn
        assert source.stream.position == ref.position
