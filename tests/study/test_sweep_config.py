"""Bad sweep input gets a clear error naming the field and exit 2, before any work (no Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch import cli
from bigbatch.distributed.env import free_port
from bigbatch.errors import ConfigError
from bigbatch.study import spec as spec_mod
from bigbatch.study.study import default_sweep

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
name = "s"
batch_sizes = [16, 64]
lr_multipliers = [0.5, 1.0]
[base.data]
name = "digits"
[base.model]
name = "mlp"
[target]
test_acc = 0.8
[trial]
max_steps = 100
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "sweep.toml"
    p.write_text(text)
    return p


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    rc = cli.main(["sweep", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("edit,field,words", [
    (("batch_sizes = [16, 64]", "batch_sizes = []"), "batch_sizes", "empty"),
    (("batch_sizes = [16, 64]", "batch_sizes = [16, 0]"), "batch_sizes[1]", "positive integer"),
    (("batch_sizes = [16, 64]", "batch_sizes = [16, 32.5]"), "batch_sizes[1]", "positive integer"),
    (("batch_sizes = [16, 64]", 'batch_sizes = ["64"]'), "batch_sizes[0]", "positive integer"),
    (("[target]\ntest_acc = 0.8", ""), "target", "no target"),
    (("test_acc = 0.8", "test_acc = 80"), "target.test_acc", "fraction"),
    (("lr_multipliers = [0.5, 1.0]", "lr_multipliers = [0.5, -1.0]"), "lr_multipliers[1]", "positive"),
    (("max_steps = 100", "max_stepz = 100"), "trial.max_stepz", "unknown key"),
    (("[trial]\nmax_steps = 100", "[trial]\nworkers_per_trial = 2"), "trial.max_steps", "budget"),
    (('name = "mlp"', 'name = "transformer"'), "model.name", "expected one of"),
])
def test_bad_sweep_config_exits_2_naming_the_field(tmp_path, capsys, edit, field, words):
    path = write(tmp_path, GOOD.replace(*edit))
    rc, err = run_cli(capsys, str(path), "--out", str(tmp_path / "out"))
    assert rc == 2
    assert f"error: {field}: " in err and words in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing created before the error


def test_batch_that_does_not_split_over_the_trial_workers_is_refused():
    import tomllib

    raw = tomllib.loads(GOOD.replace("batch_sizes = [16, 64]", "batch_sizes = [16, 63]")
                        .replace("max_steps = 100", "max_steps = 100\nworkers_per_trial = 2"))
    with pytest.raises(ConfigError) as e:
        spec_mod.from_dict(raw)
    assert e.value.field == "batch.global_batch" and "63" in e.value.message


def test_grid_and_trial_configs_follow_the_spec():
    import tomllib

    spec = spec_mod.from_dict(tomllib.loads(GOOD.replace("max_steps = 100", "max_steps = 100\nmax_examples = 3200\neval_every_examples = 256")))
    points = spec.points()
    assert [(p["batch"], p["lr_multiplier"]) for p in points] == [(16, 0.5), (16, 1.0), (64, 0.5), (64, 1.0)]
    cfg = spec.trial_config({"batch": 64, "lr_multiplier": 0.5, "seed": 3})
    assert cfg.batch.global_batch == 64 and cfg.train.seed == 3
    assert cfg.optim.base_lr == pytest.approx(0.1 * 0.5)  # the multiplier scales the base lr; the rule scales it with B
    assert cfg.train.steps == 50  # min(max_steps 100, 3200 examples / 64)
    assert cfg.train.eval_every == 4  # 256 examples / 64
    assert cfg.train.stop_at_target and cfg.target.test_acc == 0.8
    assert cfg.track.group == "s"


def test_target_may_come_from_the_base_config():
    import tomllib

    raw = tomllib.loads(GOOD.replace("[target]\ntest_acc = 0.8", "[base.target]\ntest_loss = 0.5"))
    assert spec_mod.from_dict(raw).target.test_loss == 0.5


def test_shipped_sweep_configs_and_the_study_default_load(tmp_path):
    spec_mod.from_dict(default_sweep())
    spec_mod.load(ROOT / "configs" / "sweep-mnist1d.toml")
    for name in ("sweep-cifar10-resnet18.toml", "sweep-imagenet-resnet50.toml"):
        # They need the user's data folder: a missing one is named, a present one loads.
        with pytest.raises(ConfigError, match="does not exist"):
            spec_mod.load(ROOT / "configs" / name)
        from bigbatch.study.sweep import load_spec_dict

        spec = spec_mod.from_dict(load_spec_dict(str(ROOT / "configs" / name), [f"data.root='{tmp_path}'"]))
        assert spec.trial.workers_per_trial > 1


def test_ray_address_that_does_not_answer_exits_2(tmp_path):
    # A real process, as a user runs it; the timeout only keeps a hang from stalling the suite.
    port = free_port()  # bound and released: nothing listens there
    proc = subprocess.run([sys.executable, "-m", "bigbatch", "sweep", str(ROOT / "configs" / "sweep-mnist1d.toml"),
                           "--out", str(tmp_path / "out"), "--ray-address", f"127.0.0.1:{port}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"--ray-address: no Ray cluster answers at 127.0.0.1:{port}" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_ray_address_must_be_host_port(capsys, tmp_path):
    rc, err = run_cli(capsys, str(write(tmp_path, GOOD)), "--ray-address", "nonsense")
    assert rc == 2 and "--ray-address: expected HOST:PORT" in err


def test_resume_needs_out(capsys, tmp_path):
    rc, err = run_cli(capsys, str(write(tmp_path, GOOD)), "--resume")
    assert rc == 2 and "--resume: needs --out" in err
