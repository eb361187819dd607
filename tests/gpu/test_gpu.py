"""GPU paths: NCCL with one rank, bf16/fp16 autocast with the grad scaler, channels_last.

Skipped on machines without CUDA (CI has none); run them on a GPU node with `pytest -m gpu`.
"""

import pytest
import torch

from _helpers import bigbatch, read_jsonl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SETS = ["data.name='fake_images'", "data.image_size=64", "data.num_samples=512", "data.num_classes=10",
        "model.name='resnet18'", "batch.global_batch=64", "train.steps=20", "train.log_every=5",
        "train.eval_every=0", "data.train_eval_samples=64", "track.progress='off'"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_nccl_one_rank_with_amp_trains(tmp_path, amp):
    out = tmp_path / "run"
    args = sum((["--set", s] for s in SETS + [f"train.amp='{amp}'", "dist.backend='nccl'"]), [])
    p = bigbatch("train", "configs/mnist1d-mlp.toml", "--nproc", "1", "--out", str(out), *args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "backend nccl" in (out / "train.log").read_text()
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert all(l is not None for l in losses) and len(losses) == 4
