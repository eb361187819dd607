"""The large-minibatch recipe: Goyal et al.'s linear scaling and gradual warmup, the decays,
Mikami et al.'s batch-size phases, and the errors a bad recipe gets."""

from __future__ import annotations

import math

import pytest

from bigbatch import config
from bigbatch.errors import ConfigError
from bigbatch.trainer.recipe import Schedule, batch_phases, lr_at, scaled_lr

IMAGENET_TRAIN = 1_281_167


# --- scaled_lr -----------------------------------------------------------------------------------


def test_linear_rule_gives_goyals_lr_at_8k():
    assert scaled_lr(0.1, 8192) == pytest.approx(3.2)  # Goyal et al. 2017: 0.1 * 8192 / 256
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)
    assert scaled_lr(0.05, 4096, base_batch=128) == pytest.approx(1.6)


def test_sqrt_and_none_rules():
    assert scaled_lr(0.1, 8192, rule="sqrt") == pytest.approx(0.1 * math.sqrt(32))
    assert scaled_lr(0.1, 64, rule="sqrt") == pytest.approx(0.05)
    assert scaled_lr(0.1, 8192, rule="none") == 0.1


def test_unknown_rule_names_the_field():
    with pytest.raises(ConfigError, match="optim.scaling"):
        scaled_lr(0.1, 512, rule="cubic")


# --- lr_at: warmup ---------------------------------------------------------------------------------


def test_gradual_warmup_from_the_base_lr_to_the_peak():
    kw = dict(peak_lr=3.2, total_steps=1000, warmup_steps=100, warmup_start_lr=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)  # start: the small-batch lr
    assert lr_at(50, **kw) == pytest.approx(0.1 + 3.1 * 0.5)  # inside: linear
    assert lr_at(25, **kw) == pytest.approx(0.1 + 3.1 * 0.25)
    assert lr_at(99, **kw) < 3.2
    assert lr_at(100, **kw) == pytest.approx(3.2)  # end: the peak


def test_warmup_from_zero_and_no_warmup():
    assert lr_at(0, peak_lr=2.0, total_steps=100, warmup_steps=10, warmup_start_lr=0.0) == 0.0
    assert lr_at(5, peak_lr=2.0, total_steps=100, warmup_steps=10, warmup_start_lr=0.0) == pytest.approx(1.0)
    assert lr_at(0, peak_lr=2.0, total_steps=100) == 2.0


def test_constant_warmup_holds_the_small_batch_lr_then_jumps_to_the_peak():
    """Goyal et al. 2017, 2.2: "a low constant learning rate for the first 5 epochs" (then k * eta)."""
    kw = dict(peak_lr=3.2, total_steps=1000, warmup_steps=100, warmup_start_lr=0.1, warmup_shape="constant")
    assert [lr_at(k, **kw) for k in (0, 50, 99)] == pytest.approx([0.1] * 3)
    assert lr_at(100, **kw) == pytest.approx(3.2)
    cfg = _cfg(batch={"global_batch": 8192}, optim={"base_lr": 0.1, "base_batch": 256},
               schedule={"warmup_epochs": 5, "warmup_shape": "constant"}, train={"epochs": 90})
    s = Schedule(cfg, IMAGENET_TRAIN)
    assert s.lr_at(s.warmup_steps - 1) == pytest.approx(0.1) and s.lr_at(s.warmup_steps) == pytest.approx(3.2)
    assert "constant warmup 782 steps from 0.1" in s.describe()
    with pytest.raises(ConfigError) as e:
        _cfg(schedule={"warmup_shape": "step"})
    assert e.value.field == "schedule.warmup_shape"


# --- lr_at: decays ---------------------------------------------------------------------------------


def test_step_decay_divides_at_each_milestone():
    kw = dict(peak_lr=3.2, total_steps=90, warmup_steps=5, decay="step", milestones=[30, 60, 80], factor=0.1)
    assert lr_at(29, **kw) == pytest.approx(3.2)
    assert lr_at(30, **kw) == pytest.approx(0.32)
    assert lr_at(60, **kw) == pytest.approx(0.032)
    assert lr_at(89, **kw) == pytest.approx(0.0032)


@pytest.mark.parametrize("decay", ["cosine", "poly"])
def test_cosine_and_poly_run_from_the_peak_to_the_end_lr(decay):
    kw = dict(peak_lr=2.0, total_steps=110, warmup_steps=10, decay=decay, end_lr=1e-4, power=2.0)
    assert lr_at(10, **kw) == pytest.approx(2.0)  # right after warmup: the peak
    assert lr_at(110, **kw) == pytest.approx(1e-4)  # the last step: end_lr
    assert lr_at(500, **kw) == pytest.approx(1e-4)  # and it stays there
    mid = lr_at(60, **kw)  # halfway: cosine (1 + cos(pi/2))/2 = 1/2, poly (1 - 1/2)^2 = 1/4
    assert mid == pytest.approx(1e-4 + (2.0 - 1e-4) * (0.5 if decay == "cosine" else 0.25))


def test_poly_power_one_is_linear_and_constant_stays_at_the_peak():
    assert lr_at(30, peak_lr=1.0, total_steps=40, decay="poly", power=1.0) == pytest.approx(0.25)
    assert lr_at(39, peak_lr=1.0, total_steps=40, warmup_steps=4, decay="constant") == 1.0


# --- batch phases and the Schedule ----------------------------------------------------------------


def _cfg(**sections) -> config.Config:
    return config.from_dict(sections)


def test_goyal_8k_schedule_on_imagenet():
    cfg = _cfg(batch={"global_batch": 8192}, optim={"base_lr": 0.1, "base_batch": 256},
               schedule={"name": "step", "warmup_epochs": 5, "milestones": [30, 60, 80]}, train={"epochs": 90})
    s = Schedule(cfg, IMAGENET_TRAIN)
    assert s.peak_lr() == pytest.approx(3.2)
    assert s.warmup_steps == round(5 * IMAGENET_TRAIN / 8192)  # 782
    assert s.total_steps == math.ceil(90 * IMAGENET_TRAIN / 8192)
    assert s.milestones == tuple(math.ceil(e * IMAGENET_TRAIN / 8192) for e in (30, 60, 80))
    assert s.lr_at(0) == pytest.approx(0.1)  # Goyal's gradual warmup starts at the unscaled lr
    assert s.lr_at(s.warmup_steps) == pytest.approx(3.2)
    assert s.lr_at(s.milestones[0]) == pytest.approx(0.32)
    assert s.lr_at(s.total_steps - 1) == pytest.approx(0.0032)


def test_batch_phases_become_steps_on_the_example_stream():
    # 1000 examples; batch 100 for epochs [0, 2), then 250 from epoch 2, then 500 from epoch 2.5
    phases = batch_phases([[0, 100], [2, 250], [2.5, 500]], default_batch=100, num_train=1000)
    assert [(p.start_step, p.start_examples, p.global_batch) for p in phases] == [(0, 0, 100), (20, 2000, 250), (22, 2500, 500)]
    # a phase boundary inside a batch: the new batch starts at the first step at or after it
    phases = batch_phases([[0, 300], [1, 600]], default_batch=300, num_train=1000)
    assert [(p.start_step, p.start_examples) for p in phases] == [(0, 0), (4, 1200)]


def test_lr_follows_the_batch_through_the_phases_unless_told_not_to():
    sections = dict(batch={"global_batch": 100, "phases": [[0, 100], [2, 400]]},
                    optim={"base_lr": 0.1, "base_batch": 100}, schedule={"name": "constant"}, train={"epochs": 4})
    s = Schedule(_cfg(**sections), 1000)
    assert [s.batch_at(k) for k in (0, 19, 20, 24)] == [100, 100, 400, 400]
    assert s.lr_at(19) == pytest.approx(0.1) and s.lr_at(20) == pytest.approx(0.4)
    assert s.total_steps == 20 + 5 and s.examples_at(s.total_steps) == 4000
    sections["batch"]["lr_follows_batch"] = False
    s = Schedule(_cfg(**sections), 1000)
    assert s.lr_at(20) == pytest.approx(0.1)  # Smith et al.: grow the batch instead of the lr


@pytest.mark.parametrize("schedule", [
    {"name": "cosine", "warmup_epochs": 1},
    {"name": "poly", "warmup_epochs": 0.5, "warmup_shape": "constant", "end_lr": 0.001},
    {"name": "step", "milestones": [1, 3]},
])
def test_the_batch_plans_table_is_the_schedule_exactly(schedule):
    # the loop reads (batch, per-device, accum, lr) from precomputed blocks: every value must be
    # the schedule's, across block edges and batch phases, on 1 and 4 ranks with accumulation
    from bigbatch.trainer.batching import BatchSchedule

    cfg = _cfg(batch={"global_batch": 100, "phases": [[0, 100], [2, 400]], "accum_steps": 5},
               optim={"base_lr": 0.1, "base_batch": 100}, schedule=schedule, train={"epochs": 40})
    s = Schedule(cfg, 10_000)
    assert s.total_steps > 2 * BatchSchedule.BLOCK
    for world in (1, 4):
        plan = BatchSchedule(cfg.batch, s, world)
        want = [(s.batch_at(k), s.batch_at(k) // (5 * world), 5, s.lr_at(k)) for k in range(s.total_steps)]
        assert [plan.at(k) for k in range(s.total_steps)] == want
        assert plan.at(7) == want[7] and plan.at(s.total_steps - 1) == want[-1]  # backwards (a resume), the last step


def test_the_batch_plans_table_follows_the_gns_controller():
    # batch.adaptive: a batch the controller doubles (or a restored one) applies from the next step on
    from bigbatch.trainer.batching import BatchSchedule
    from bigbatch.trainer.loop import Progress

    cfg = _cfg(batch={"global_batch": 64, "adaptive": "gns", "adapt_every": 10, "max": 1024},
               optim={"base_lr": 0.1, "base_batch": 64}, schedule={"name": "cosine", "warmup_steps": 20},
               train={"steps": 2000}, measure={"gns": True})
    s = Schedule(cfg, 10_000)
    plan = BatchSchedule(cfg.batch, s, 2)
    seen, p = [], Progress()

    class Noise:  # what the probes would measure: a huge noise scale, then a small one
        def b_simple(self) -> float:
            return 1e9 if p.step <= 400 else 1.0

    for k in range(1200):
        batch, per_device, accum, lr = plan.at(k)
        assert (per_device, accum, lr) == (batch // 2, 1, s.lr_at(k, batch))
        seen.append(batch)
        p.step, p.examples = p.step + 1, p.examples + batch
        plan.after_step(p, Noise())
    assert seen[0] == 64 and seen[9] == 64 and seen[10] == 128 and seen[-1] == 1024
    restored = BatchSchedule(cfg.batch, s, 2)
    restored.at(1200)  # a block filled before the restore must not survive it
    restored.load_state_dict(plan.state_dict())
    assert restored.at(1200) == (1024, 512, 1, s.lr_at(1200, 1024))


def test_describe_is_one_line_with_the_derived_numbers():
    cfg = _cfg(batch={"global_batch": 1024, "phases": [[0, 1024], [1, 2048]]}, optim={"base_lr": 0.2, "base_batch": 256},
               schedule={"name": "poly", "warmup_epochs": 1}, train={"epochs": 2})
    line = Schedule(cfg, 10240).describe()
    assert "\n" not in line
    for text in ("base 0.2 per 256", "linear", "peak 0.8", "global batch 1024", "warmup 10 steps", "15 steps", "2048 @ lr 1.6"):
        assert text in line, line


# --- bad recipes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sections, field", [
    ({"optim": {"base_lr": -0.1}}, "optim.base_lr"),
    ({"optim": {"base_lr": 0.0}}, "optim.base_lr"),
    ({"optim": {"name": "adamax"}}, "optim.name"),
    ({"schedule": {"name": "exponential"}}, "schedule.name"),
    ({"batch": {"phases": [[0, 128], [3, 256], [2, 512]]}}, "batch.phases[2]"),
    ({"batch": {"phases": [[1, 128]]}}, "batch.phases[0]"),
    ({"schedule": {"warmup_start": "zero"}}, "schedule.warmup_start"),
])
def test_bad_recipe_config_names_the_field(sections, field):
    with pytest.raises(ConfigError) as e:
        config.from_dict(sections)
    assert e.value.field == field


@pytest.mark.parametrize("override, message", [
    ("optim.base_lr=-0.1", "optim.base_lr: must be a positive number"),
    ("schedule.warmup_epochs=7", "schedule.warmup_epochs: warmup"),
    ("batch.phases=[[0, 128], [4, 256], [2, 512]]", "batch.phases[2]: phases out of order"),
    ("optim.name='adam'", "optim.name: expected one of"),
    ("schedule.name='linear'", "schedule.name: expected one of"),
])
def test_bad_recipe_on_the_command_line_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch, override, message):
    from pathlib import Path

    from bigbatch.cli import main

    monkeypatch.chdir(tmp_path)
    path = Path(__file__).resolve().parents[2] / "configs" / "mnist1d-cnn.toml"
    assert main(["train", str(path), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written, no data generated


@pytest.mark.parametrize("schedule, field", [
    ({"warmup_epochs": 6}, "schedule.warmup_epochs"),
    ({"warmup_steps": 50}, "schedule.warmup_steps"),
])
def test_warmup_longer_than_training_is_an_error(schedule, field):
    cfg = _cfg(batch={"global_batch": 100}, schedule=schedule, train={"epochs": 4})
    with pytest.raises(ConfigError, match="longer than training") as e:
        Schedule(cfg, 1000)
    assert e.value.field == field


def test_gradual_warmup_below_the_base_batch_never_ramps_down():
    cfg = _cfg(batch={"global_batch": 64}, optim={"base_lr": 0.1, "base_batch": 256},
               schedule={"warmup_steps": 10}, train={"steps": 100})
    s = Schedule(cfg, 10000)
    assert s.peak_lr() == pytest.approx(0.025)
    assert [s.lr_at(k) for k in (0, 5, 10)] == pytest.approx([0.025] * 3)


# --- the published recipes as configs ------------------------------------------------------------


@pytest.mark.parametrize("name, peak, warmup_epochs, batches", [
    ("imagenet-resnet50-goyal-8k", 3.2, 5, [8192]),
    ("imagenet-resnet50-lars-32k", 31.2, 25, [32768]),
    ("imagenet-resnet50-mikami", 31.2, 25, [34816, 69632]),
])
def test_imagenet_recipes_dry_run_without_the_data(capsys, tmp_path, name, peak, warmup_epochs, batches):
    """`bigbatch train CONFIG --dry-run` prints the derived schedule; data.root is a placeholder."""
    import json
    from pathlib import Path

    from bigbatch.cli import main

    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.toml"
    missing = tmp_path / "no-imagenet-here"  # the data folder is never needed
    assert main(["train", str(path), "--dry-run", "--set", f"data.root='{missing}'"]) == 0
    out = capsys.readouterr().out
    s = json.loads(out[out.index("{"):])
    assert s["peak_lr"] == pytest.approx(peak)
    assert s["warmup_steps"] == round(warmup_epochs * IMAGENET_TRAIN / batches[0])
    assert [p["global_batch"] for p in s["batch_phases"]] == batches
    assert s["epochs"] == pytest.approx(90, abs=0.01)


# --- the schedule in a real run: metrics.jsonl, and resuming after a batch change -----------------


def _phase_run_config() -> config.Config:
    # 1600 training examples: batch 100 for epoch 0 (16 steps), then 400 (4 steps an epoch)
    return _cfg(
        data={"name": "synthetic", "num_samples": 2000, "num_features": 16, "seed": 3},
        model={"name": "mlp", "hidden": 32, "depth": 1},
        batch={"global_batch": 100, "phases": [[0, 100], [1, 400]]},
        optim={"name": "lars", "base_lr": 1.0, "base_batch": 100, "weight_decay": 1e-4},
        schedule={"name": "poly", "warmup_epochs": 0.5, "warmup_start": 0.0, "end_lr": 0.01},
        train={"epochs": 3, "log_every": 1, "eval_every": 0, "seed": 5, "amp": "off"},
        track={"progress": "off"},
    )


def _loss_rows(run_dir) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """One uninterrupted LARS run through a batch phase change (shared by the checks below)."""
    from bigbatch.trainer.loop import run

    out = tmp_path_factory.mktemp("straight")
    summary = run(_phase_run_config(), out)
    return summary, _loss_rows(out)


def test_metrics_follow_the_schedule_and_a_run_resumes_after_the_batch_change(tmp_path, straight_run):
    """Done when 3: the lr and global batch in metrics.jsonl are the schedule's, and a run
    preempted (SIGTERM) after the batch phase change resumes to the same losses as one that was not."""
    from _helpers import preempt_at
    from bigbatch.trainer.loop import run

    cfg = _phase_run_config()
    schedule = Schedule(cfg, 1600)
    assert schedule.total_steps == 16 + 8 and schedule.phases[1].start_step == 16

    straight, ref = straight_run
    assert straight["status"] == "completed" and straight["steps"] == 24 and straight["examples"] == 1600 + 3200
    assert [r["step"] for r in ref] == list(range(1, 25))
    for r in ref:  # the row of step k reports the lr and batch that step k-1 (0-based) trained with
        assert r["global_batch"] == schedule.batch_at(r["step"] - 1)
        assert r["lr"] == pytest.approx(schedule.lr_at(r["step"] - 1))
    assert [r["global_batch"] for r in ref] == [100] * 16 + [400] * 8
    # poly after an 8-step warmup over 16 steps; the linear rule takes the peak from 1.0 to 4.0 at step 16
    assert ref[15]["lr"] == pytest.approx(0.01 + (1.0 - 0.01) * (1 - 7 / 16) ** 2)
    assert ref[16]["lr"] == pytest.approx(0.01 + (4.0 - 0.01) * (1 - 8 / 16) ** 2)

    first = run(cfg, tmp_path / "resumed", reporter=preempt_at(19))
    assert first["status"] == "preempted" and first["steps"] == 19
    second = run(cfg, tmp_path / "resumed", resume=True)
    assert second["status"] == "completed" and second["steps"] == 24
    got = _loss_rows(tmp_path / "resumed")
    assert [r["step"] for r in got] == list(range(1, 25))  # no duplicated or missing rows
    for a, b in zip(ref, got):
        assert (a["global_batch"], a["lr"]) == (b["global_batch"], pytest.approx(b["lr"]))
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
    assert second["test_acc"] == pytest.approx(straight["test_acc"])


def test_a_run_stopped_at_its_last_step_resumes_to_completed_without_another_step(tmp_path, straight_run):
    """A stop signal at the schedule's last step: the resumed run takes no step (it took one more,
    25 of 24, before the fix) and ends completed with the uninterrupted run's rows."""
    from _helpers import preempt_at
    from bigbatch.trainer.loop import run

    straight, ref = straight_run
    cfg = _phase_run_config()
    first = run(cfg, tmp_path / "cut", reporter=preempt_at(straight["steps"]))
    assert first["status"] == "preempted" and first["steps"] == straight["steps"]
    second = run(cfg, tmp_path / "cut", resume=True)
    assert second["status"] == "completed" and second["steps"] == straight["steps"]
    got = _loss_rows(tmp_path / "cut")
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    assert second["test_acc"] == pytest.approx(straight["test_acc"])


def test_two_gloo_ranks_follow_the_same_phases_and_losses(tmp_path, straight_run):
    """`bigbatch train --nproc 2` (real torchrun, gloo): per-device batch 50 then 200, LARS on the
    all-reduced gradient, so the same lr, batch and (up to summation order) loss at every step."""
    from _helpers import bigbatch

    path = tmp_path / "phases.toml"
    config.save(_phase_run_config(), path)
    p = bigbatch("train", str(path), "--nproc", "2", "--out", str(tmp_path / "two"), cwd=tmp_path,
                 env={"OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    _, ref = straight_run
    got = _loss_rows(tmp_path / "two")
    assert [(r["step"], r["global_batch"]) for r in got] == [(r["step"], r["global_batch"]) for r in ref]
    for a, b in zip(ref, got):
        assert b["lr"] == pytest.approx(a["lr"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), a["step"]
    assert "2 rank(s) x 50 per device" in (tmp_path / "two" / "train.log").read_text()


def test_large_batch_config_reaches_94_percent_in_the_baselines_epochs(tmp_path, capsys):
    """Done when 4: `bigbatch train configs/mnist1d-cnn-large-batch.toml` at global batch >= 4096
    reaches >= 94 % test accuracy in the epoch budget of configs/mnist1d-cnn.toml."""
    import json
    from pathlib import Path

    from bigbatch.cli import main

    configs = Path(__file__).resolve().parents[2] / "configs"
    large = config.load(configs / "mnist1d-cnn-large-batch.toml")
    small = config.load(configs / "mnist1d-cnn.toml")
    assert large.batch.global_batch >= 4096 and not large.batch.phases
    assert large.train.epochs == small.train.epochs and large.model == small.model and large.data == small.data
    out = tmp_path / "run"
    assert main(["train", str(configs / "mnist1d-cnn-large-batch.toml"), "--out", str(out),
                 "--set", "train.eval_every=0", "--set", "track.progress='off'"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_batch"] >= 4096
    assert summary["epochs"] <= small.train.epochs + 4096 / 40000  # at most one batch past the budget
    assert summary["test_acc"] >= 0.94, summary
