"""The plan's base-run lr search, pieces without training: the interpolated S0 and the rule that
stops a run which can no longer beat the fastest so far."""

import dataclasses

import pytest

from bigbatch import config
from bigbatch.errors import UsageError
from bigbatch.study import plan_base
from pathlib import Path

MLP = Path(__file__).resolve().parents[2] / "configs" / "mnist1d-mlp.toml"


def _cfg(target: str):
    """The MLP config with only this target (its own test_acc target dropped)."""
    cfg = config.load(MLP)
    key, value = target.removeprefix("target.").split("=")
    return dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, **{"test_acc": None, key: float(value)}))


def test_s0_is_the_crossing_between_evaluations_not_the_evaluation_past_it():
    cfg = _cfg("target.test_acc=0.6")
    rows = [{"step": 10, "loss": 2.0}, {"step": 32, "test_acc": 0.5}, {"step": 64, "test_acc": 0.7},
            {"step": 64, "test_acc": 0.71, "eval_set": "full"}]
    assert plan_base.target_crossing(cfg, rows) == pytest.approx(48.0)
    assert plan_base.target_crossing(cfg, rows[:2]) is None
    loss = _cfg("target.test_loss=1.0")
    assert plan_base.target_crossing(loss, [{"step": 8, "test_loss": 1.5}, {"step": 16, "test_loss": 0.5}]) == pytest.approx(12.0)
    both = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, test_loss=1.0))  # the first target met
    assert plan_base.target_crossing(both, [{"step": 8, "test_acc": 0.5, "test_loss": 1.5},
                                            {"step": 16, "test_acc": 0.7, "test_loss": 0.5}]) == pytest.approx(12.0)


def test_a_run_past_the_fastest_crossing_without_the_target_stops_as_slower():
    rule = plan_base.slower_than(_cfg("target.test_acc=0.6"), cap=100.0)
    assert rule({"step": 128, "loss": 1.0}) is None            # a log row: no evaluation to judge
    assert rule({"step": 96, "test_acc": 0.5}) is None         # still before the cap
    assert rule({"step": 128, "test_acc": 0.65}) is None       # reached: its crossing may lie before the cap
    verdict = rule({"step": 128, "test_acc": 0.55})
    assert verdict["status"] == "slower" and verdict["steps_lower_bound"] == 128 and verdict["raced_against"] == 100.0
    both = dataclasses.replace(_cfg("target.test_acc=0.6"), target=config.load(MLP).target)
    both = dataclasses.replace(both, target=dataclasses.replace(both.target, test_acc=0.9, test_loss=1.0))
    assert rule({"step": 128, "test_acc": 0.55, "test_loss": 0.9}) is not None
    assert plan_base.slower_than(both, 100.0)({"step": 128, "test_acc": 0.55, "test_loss": 0.9}) is None  # either target
    loss_rule = plan_base.slower_than(_cfg("target.test_loss=1.0"), cap=10.0)
    assert loss_rule({"step": 16, "test_loss": 0.9}) is None and loss_rule({"step": 16, "test_loss": 1.1})["status"] == "slower"


@pytest.mark.parametrize("text, expect", [("0.5,1,2", [0.5, 1.0, 2.0]), ("2, 1", [1.0, 2.0]), ("1", [1.0])])
def test_lr_factors_parse(text, expect):
    assert plan_base.parse_factors(text) == expect


@pytest.mark.parametrize("text", ["", "a,1", "0,1", "32"])
def test_bad_lr_factors_name_the_option(text):
    with pytest.raises(UsageError, match="--base-lr-search"):
        plan_base.parse_factors(text)
