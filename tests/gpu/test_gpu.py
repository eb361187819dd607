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


def test_step_timer_on_cuda_adds_no_host_sync_and_its_parts_tile_the_step():
    from bigbatch.trainer.steptime import StepTimer

    dev = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    timer = StepTimer(dev, list(model.parameters()))
    x = torch.randn(512, 1024, device=dev)

    def step():
        timer.start()
        xb = x * 1.0  # stands in for the host-to-device copy
        timer.data_ready(True)
        model(xb).sum().backward()
        timer.backward_done()
        opt.step()
        opt.zero_grad(set_to_none=True)
        timer.lap("compute")
        timer.stop()

    step()  # warm-up; finds the parameter whose gradient comes last
    timer.read()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call in the steps raises
    try:
        for _ in range(5):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    t = timer.read()  # the one sync, at the log step
    parts = t["time/data(s)"] + t["time/compute(s)"] + t["time/comm_exposed(s)"]
    assert t["time/step(s)"] > 0 and 0.9 * t["time/step(s)"] <= parts <= t["time/step(s)"] * (1 + 1e-6)
    assert t["time/compute(s)"] > t["time/data(s)"] >= 0 and t["time/comm_exposed(s)"] >= 0


def test_one_rank_nccl_run_logs_the_breakdown_and_flops(tmp_path):
    out = tmp_path / "run"
    args = sum((["--set", s] for s in SETS + ["train.amp='bf16'", "dist.backend='nccl'", "train.peak_tflops=989"]), [])
    p = bigbatch("train", "configs/mnist1d-mlp.toml", "--nproc", "1", "--out", str(out), *args)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    keys = ("time/data(s)", "time/compute(s)", "time/comm_exposed(s)")
    for r in rows[1:]:
        assert 0.9 * r["time/step(s)"] <= sum(r[k] for k in keys) <= r["time/step(s)"] * (1 + 1e-6)
        assert r["flops_per_example"] > 0 and 0 < r["mfu"] < 1
