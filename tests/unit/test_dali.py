"""DALI backend: selected without DALI it is a clear one-line error naming data.backend and the
install command; with DALI and a GPU (marked gpu) the pipeline shards an uneven folder so every
rank gets the same number of batches, of the right shape, normalised, covering every image."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")

# Makes `import nvidia.dali` fail the way it does where DALI is not installed, also on machines
# that have it, then runs the CLI.
NO_DALI = "import sys; sys.modules['nvidia.dali'] = None; from bigbatch.cli import main; sys.exit(main(sys.argv[1:]))"


def _image_folder(root: Path, counts: dict[str, int], size: int = 40) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for c, (cls, n) in enumerate(counts.items()):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (size + 3 * i, size), color=(40 * c, 5 * i, 200)).save(d / f"{i}.jpg")
    return root


def test_missing_dali_is_a_clear_error(monkeypatch, tmp_path):
    from bigbatch.trainer import dali

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(UsageError) as e:
        dali.build_dali_loader(tmp_path, 32, 4, 0, 1, 0, True)
    assert e.value.field == "data.backend"
    assert "pip install --extra-index-url https://pypi.nvidia.com nvidia-dali-cuda120" in e.value.message
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
    assert "\n" not in err and "error: data.backend:" in err and "nvidia-dali-cuda120" in err, err
    assert not out.exists()


@pytest.mark.gpu
def test_dali_pipeline_shards_evenly_on_gpu(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("nvidia.dali")
    from bigbatch.trainer.dali import build_dali_loader

    root = _image_folder(tmp_path / "imgs", {"a": 6, "b": 5})  # 11 images: uneven over 2 ranks
    world, batch, size = 2, 2, 32
    train = [build_dali_loader(root, size, batch, r, world, seed=0, train=True) for r in range(world)]
    assert len(train[0]) == len(train[1]) >= 1  # no rank runs out of batches before another
    for loader in train:
        n = 0
        for x, y in loader:
            n += 1
            assert x.shape == (batch, 3, size, size) and x.dtype == torch.float32 and x.is_cuda
            assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
            assert x.abs().max() < 5  # mean/std normalised, not 0..255
        assert n == len(loader)
    val = [build_dali_loader(root, size, batch, r, world, seed=0, train=False) for r in range(world)]
    assert len(val[0]) == len(val[1])
    seen = sum(len(y) for loader in val for _, y in loader)
    assert seen == 11  # evaluation: padding removed, every image once
