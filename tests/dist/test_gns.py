"""Online gradient noise scale agrees with the exact per-example value (McCandlish et al. 2018).

A fixed linear-regression problem at fixed weights (so the true B_simple does not move): the
online two-batch estimate, once its EMA has settled, is within 15 % of `per_sample_b_simple`
- in one process, with the micro-batches of gradient accumulation as the small batches, under a
  loss scale that must be divided out;
- on 2 gloo ranks under DDP, with each rank's micro-batch as the small batch (per-parameter gradient hooks).
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bigbatch.distributed.env import DistEnv, free_port
from bigbatch.measure.noise import per_sample_b_simple
from bigbatch.measure.gns import GradientNoiseScale

N, D, GLOBAL, STEPS = 4096, 16, 256, 600
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mnist1d-mlp.toml"


def regression_problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen) * torch.linspace(2.0, 0.2, D)
    y = x @ torch.randn(D, generator=gen) + 0.5 * torch.randn(N, generator=gen)
    torch.manual_seed(1)
    model = torch.nn.Linear(D, 1)  # fixed weights away from the optimum: G != 0
    return x, y, model


def mse(out, t):
    return torch.nn.functional.mse_loss(out.squeeze(-1), t)


def trainer_gns(ddp_model, accum, every=1):
    """The estimator as `bigbatch train`'s probe drives it: the loop's step numbers and batch sizes,
    sync="read" (every step measured by default: the references are per step)."""
    return GradientNoiseScale(ddp_model, accum_steps=accum, decay=0.99, every=every, sync="read")


def online_estimate(model, ddp_model, env, x, y, per_device, accum, scale=1.0):
    """Run STEPS measured steps (no optimizer: the weights stay fixed) and return B_simple."""
    gns = trainer_gns(ddp_model, accum)  # hooks on the parameters DDP shares
    gen = torch.Generator().manual_seed(2)
    for step in range(STEPS):
        batch = torch.randperm(N, generator=gen)[:GLOBAL]
        mine = batch[env.rank * per_device * accum:(env.rank + 1) * per_device * accum]
        gns.begin_step(step)
        for i, idx in enumerate(mine.chunk(accum)):
            loss = mse(ddp_model(x[idx]), y[idx]) / accum
            (loss * scale).backward()
        assert gns.record(per_device, GLOBAL, accum, scale=scale)
        model.zero_grad(set_to_none=True)
    return gns.estimator.b_simple


def test_one_process_accumulation_matches_per_sample_reference():
    x, y, model = regression_problem()
    want = per_sample_b_simple(model, mse, x, y)
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), None, False)
    got = online_estimate(model, model, env, x, y, per_device=32, accum=GLOBAL // 32, scale=1024.0)
    assert got == pytest.approx(want, rel=0.15)


def test_gns_every_measures_every_kth_step_exactly_as_those_steps_alone():
    """measure.gns_every = 4: only steps 0, 4, 8, ... are measured (the hooks stay registered and
    return at once on the others), and the EMAs are those of the measured steps' batches alone."""
    x, y, model = regression_problem()
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), None, False)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randperm(N, generator=gen)[:GLOBAL] for _ in range(40)]

    def run(every, steps):
        gns = trainer_gns(model, 8, every)
        measured = []
        for step, batch in steps:
            gns.begin_step(step)
            for idx in batch.chunk(8):
                (mse(model(x[idx]), y[idx]) / 8).backward()
            measured.append(gns.record(32, GLOBAL, 8))
            model.zero_grad(set_to_none=True)
        return gns, measured

    sparse, measured = run(4, enumerate(batches))
    dense, _ = run(1, enumerate(batches[::4]))
    assert measured == [s % 4 == 0 for s in range(40)]
    assert sparse.estimator.state_dict() == dense.estimator.state_dict()


def _ddp_worker(rank, world, port, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        env = DistEnv(rank, world, rank, world, torch.device("cpu"), "gloo", True)
        x, y, model = regression_problem()
        ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
        got = online_estimate(model, ddp, env, x, y, per_device=GLOBAL // world, accum=1)
        if rank == 0:
            torch.save({"b_simple": got, "reference": per_sample_b_simple(model, mse, x, y)}, out)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def test_two_rank_ddp_matches_per_sample_reference(tmp_path):
    out = tmp_path / "result.pt"
    mp.spawn(_ddp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    res = torch.load(out)
    assert res["b_simple"] == pytest.approx(res["reference"], rel=0.15)


def test_one_process_without_accumulation_is_refused_naming_the_field():
    from bigbatch import config
    from bigbatch.errors import ConfigError

    def gns_cfg(extra=()):
        return config.load(None, ["measure.gns=true", *extra])

    with pytest.raises(ConfigError) as e:
        gns_cfg().validate(1)
    assert e.value.field == "measure.gns"
    gns_cfg(["batch.accum_steps=2"]).validate(1)
    gns_cfg().validate(2)


def test_bigbatch_train_refuses_gns_without_two_batch_sizes_before_any_work(tmp_path, capsys):
    from bigbatch import cli

    out = tmp_path / "run"
    code = cli.main(["train", str(CONFIG), "--set", "measure.gns=true", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "measure.gns" in err[0] and "accum_steps" in err[0]
    assert not out.exists()
    assert cli.main(["train", str(CONFIG), "--set", "batch.adaptive=gns", "--out", str(out)]) == 2
    assert "batch.adaptive" in capsys.readouterr().err and not out.exists()
