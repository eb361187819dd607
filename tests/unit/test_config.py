"""The config is strict: every typo or wrong type is an error naming the field."""

import tomllib

import pytest

from bigbatch import config
from bigbatch.config import ConfigError
from bigbatch.trainer import batching
from bigbatch.trainer.batching import derive_batch


def test_defaults_round_trip_through_toml():
    cfg = config.load(None, ["batch.phases=[[0, 128], [2.5, 512]]", "optim.name=lars", "schedule.warmup_start=0"])
    again = config.from_dict(tomllib.loads(config.dumps(cfg)))
    assert again == cfg
    assert cfg.optim.name == "lars" and cfg.schedule.warmup_start == 0.0
    assert cfg.batch.phases == [[0, 128], [2.5, 512]]


def test_overrides_are_typed():
    cfg = config.load("configs/mnist1d-mlp.toml", ["batch.global_batch=256", "optim.base_lr=1", "track.wandb=true",
                                                   "train.steps=7", "name=x"])
    assert cfg.batch.global_batch == 256 and isinstance(cfg.optim.base_lr, float) and cfg.track.wandb is True
    assert cfg.name == "x"
    assert cfg.train.steps == 7 and cfg.train.epochs is None  # --set train.steps replaces the file's epochs


@pytest.mark.parametrize("override, field", [
    ("data.nmae=3", "data.nmae"),
    ("foo.bar=1", "foo"),
    ("batch.global_batch=abc", "batch.global_batch"),
    ("batch.global_batch=0", "batch.global_batch"),
    ("optim.base_lr=-0.1", "optim.base_lr"),
    ("optim.name=adam9", "optim.name"),
    ("schedule.name=linear", "schedule.name"),
    ("schedule.warmup_start=soon", "schedule.warmup_start"),
    ("measure.sharpness_mode='test'", "measure.sharpness_mode"),
    ("measure.tail_samples=4", "measure.tail_samples"),
    ("batch.phases=[[0, 128], [0, 256]]", "batch.phases[1]"),
    ("batch.phases=[[1, 128]]", "batch.phases[0]"),
    ("train.amp=fp8", "train.amp"),
    ("track.wandb=1", "track.wandb"),
    ("dist.backend=mpi", "dist.backend"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        config.load(None, [override])
    assert e.value.field == field


def test_steps_and_epochs_are_exclusive():
    with pytest.raises(ConfigError, match="train.steps"):
        config.from_dict({"train": {"steps": 10, "epochs": 1}})


def test_global_batch_divides_world_and_accumulation():
    assert derive_batch(4096, 4, None) == (1024, 1)
    assert derive_batch(4096, 4, 4) == (256, 4)
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        derive_batch(128, 3, None)
    cfg = config.load(None, ["batch.global_batch=128", "batch.phases=[[0,128],[1,100]]"])
    with pytest.raises(ConfigError) as e:
        batching.validate(cfg, 8)
    assert e.value.field == "batch.phases[1]"


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nname = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
