"""AdamW's settings coupled to the batch (issue 31, Done when 2): beta2 with a half-life fixed in
tokens (Marek et al. 2025) and weight decay from a fixed AdamW timescale (Bergsma et al. 2025),
equal to their formulas on hand-computed cases, in the optimizer a run builds and in every trial
of a sweep."""

from __future__ import annotations

import math

import pytest

from _helpers import ROOT
from bigbatch import config
from bigbatch.study.spec import from_dict
from bigbatch.trainer.optim import build_optimizer
from bigbatch.trainer.recipe import Schedule, beta2_for_batch, timescale_weight_decay

MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")
# synthetic data: 10,000 examples, 20 % held out -> D = 8,000 training examples
ADAMW = ["data.name='synthetic'", "optim.name='adamw'", "optim.base_lr=0.001", "optim.base_batch=128",
         "optim.scaling='sqrt'", "optim.betas=[0.9, 0.999]", "optim.beta2_scaling='tokens'", "optim.timescale=100.0",
         "schedule.name='constant'", "train.steps=10"]


def test_beta2_keeps_its_half_life_in_tokens():
    # 0.999 ** 4 = 0.998001 ** 2 = 0.996005996001: four times the batch, the same tokens per half-life
    assert beta2_for_batch(0.999, 512, 128) == pytest.approx(0.996005996001, abs=1e-12)
    assert beta2_for_batch(0.99, 64, 128) == pytest.approx(math.sqrt(0.99), abs=1e-12)  # 0.994987...
    assert beta2_for_batch(0.95, 256, 256) == 0.95
    for b in (16, 128, 1024):  # half-life in steps x batch = ln 2 / -ln beta2 x B: the same at every B
        half_life_examples = math.log(2) / -math.log(beta2_for_batch(0.98, b, 128)) * b
        assert half_life_examples == pytest.approx(math.log(2) / -math.log(0.98) * 128, rel=1e-12)


def test_weight_decay_keeps_the_adamw_timescale():
    # wd = B / (lr tau D): 256 / (1e-3 x 0.5 x 100,000) = 256 / 50 = 5.12
    assert timescale_weight_decay(256, 1e-3, 0.5, 100_000) == pytest.approx(5.12, rel=1e-12)
    # 512 / (2e-3 x 100 x 8,000) = 512 / 1,600 = 0.32
    assert timescale_weight_decay(512, 2e-3, 100.0, 8000) == pytest.approx(0.32, rel=1e-12)
    lr, wd = 3e-4, timescale_weight_decay(64, 3e-4, 2.0, 40_000)
    assert 64 / (lr * wd * 40_000) == pytest.approx(2.0, rel=1e-12)  # tau recovered


def test_a_run_builds_adamw_with_the_rules_values():
    cfg = config.load(MLP, ADAMW + ["batch.global_batch=512"])
    sched = Schedule(cfg, 8000)
    assert sched.peak_lr() == pytest.approx(0.002)  # sqrt rule: 1e-3 x sqrt(512 / 128)
    betas, wd = sched.adamw_settings()
    assert betas == pytest.approx([0.9, 0.996005996001], abs=1e-12) and wd == pytest.approx(0.32, rel=1e-12)
    from torch import nn

    opt = build_optimizer(sched.optim_config(), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), sched.lr_at(0))
    decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert len(decayed) == 1 and decayed[0]["weight_decay"] == pytest.approx(0.32, rel=1e-12)
    assert all(g["betas"] == pytest.approx((0.9, 0.996005996001), abs=1e-12) for g in opt.param_groups)
    assert "beta2 0.996006 (tokens), weight decay 0.32 (timescale 100 epochs)" in sched.describe()
    # off: the configured values, untouched
    plain = Schedule(config.load(MLP, ADAMW[:-4] + ["schedule.name='constant'", "optim.weight_decay=0.05"]), 8000)
    assert plain.adamw_settings() == ([0.9, 0.999], 0.05)


def test_every_sweep_trial_uses_the_rules_at_its_batch_and_lr():
    spec = from_dict({"name": "t", "base": MLP, "overrides": ADAMW, "batch_sizes": [32, 512], "lr_multipliers": [1.0, 2.0],
                      "seeds": [0], "target": {"test_loss": 0.5}, "trial": {"max_steps": 100}})
    for point in spec.points():
        b, m = point["batch"], point["lr_multiplier"]
        betas, wd = Schedule(spec.trial_config(point), 8000).adamw_settings()
        lr = m * 1e-3 * math.sqrt(b / 128)
        assert betas[1] == pytest.approx(0.999 ** (b / 128), abs=1e-12)
        assert wd == pytest.approx(b / (lr * 100.0 * 8000), rel=1e-12)
    # B = 32 at 1x: lr 5e-4, beta2 0.999 ** 0.25 = 0.99974991..., wd = 32 / (5e-4 x 100 x 8,000) = 0.08
    betas, wd = Schedule(spec.trial_config({"batch": 32, "lr_multiplier": 1.0, "seed": 0}), 8000).adamw_settings()
    assert wd == pytest.approx(0.08, rel=1e-12) and betas[1] == pytest.approx(0.9997499, abs=1e-7)


@pytest.mark.parametrize("sets, expect", [
    (["optim.name='sgd'"], "optim.beta2_scaling: an AdamW setting: needs optim.name = 'adamw', got 'sgd'"),
    (["optim.beta2_scaling='none'", "optim.timescale=0"], "optim.timescale: must be a positive number of epochs"),
    (["batch.phases=[[0, 128], [1, 256]]"], "optim.beta2_scaling: set once per run from its global batch"),
])
def test_rule_mistakes_name_their_field(sets, expect):
    with pytest.raises(config.ConfigError) as e:
        config.load(MLP, ADAMW + sets)
    assert expect in str(e.value)


def test_a_planner_branch_keeps_beta2s_token_half_life_against_the_configs_base_batch():
    """A branch at k x B0 gets its lr as given (its own base), but beta2 stays the tokens rule's
    value at its batch against the config's base batch: 0.99 at 32 -> 0.99 ** 4 at 128, not 0.99."""
    from bigbatch.study.branch_runs import branch_config

    cfg = config.load(ROOT / "configs" / "pysrc-gpt.toml",
                      ["optim.beta2_scaling=tokens", "optim.timescale=5.0", "optim.base_batch=32"])
    branch = branch_config(cfg, 128, 1e-3, 10)
    assert branch.optim.betas == pytest.approx([0.9, 0.99 ** 4])
    betas, wd = Schedule(branch, 28_000).adamw_settings()
    assert betas == pytest.approx([0.9, 0.99 ** 4])
    assert wd == pytest.approx(128 / (1e-3 * 5.0 * 28_000))  # the timescale rule at the branch's batch and lr
