"""The config is strict: every typo or wrong type is an error naming the field."""

import tomllib

import pytest

from bigbatch import config
from bigbatch.config import ConfigError
from bigbatch.config import derive_batch


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
    ("checkpoint.keep=0", "checkpoint.keep"),
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
        cfg.validate(8)
    assert e.value.field == "batch.phases[1]"


@pytest.mark.parametrize("sets, fits, field", [
    (["dist.allreduce='torus2d'", "dist.torus_rows=3", "batch.global_batch=48"], 6, "dist.torus_rows"),  # 3 x 2 tiles 6 ranks, not 8
    (["dist.allreduce='hierarchical'", "dist.local_size=3", "batch.global_batch=48"], 6, "dist.local_size"),
    (["batch.global_batch=12"], 6, "batch.global_batch"),
    (["measure.gns=true", "batch.adaptive='gns'", "batch.min=4", "batch.global_batch=16"], 2, "batch.min"),
])
def test_each_section_checks_itself_for_the_world(sets, fits, field):
    cfg = config.load(None, sets)
    cfg.validate(fits)
    with pytest.raises(ConfigError) as e:
        cfg.validate(8)
    assert e.value.field == field


def test_checks_across_sections_name_the_field():
    with pytest.raises(ConfigError) as e:
        config.load(None, ["measure.gns=true"]).validate(1)  # one process, one micro-batch: one batch size
    assert e.value.field == "measure.gns"
    config.load(None, ["measure.gns=true"]).validate(2)
    with pytest.raises(ConfigError) as e:
        config.load(None, ["batch.adaptive='gns'"]).validate(2)
    assert e.value.field == "batch.adaptive"
    with pytest.raises(ConfigError) as e:
        config.load(None, ["data.name='imagefolder'", "data.root='/'", "measure.tail_every=10"]).validate(1)
    assert e.value.field == "measure.tail_every"


def test_set_takes_nested_keys_into_tables():
    cfg = config.load(None, ["model.name='mylab.zoo:make'", "model.kwargs.width=512", "model.kwargs.act.name=gelu",
                             "data.name='mylab.zoo:data'", "data.kwargs.n=1000"])
    assert cfg.model.kwargs == {"width": 512, "act": {"name": "gelu"}} and cfg.data.kwargs == {"n": 1000}
    again = config.load(None, ["model.name='mylab.zoo:make'", "model.kwargs={width = 3, depth = 2}",
                               "model.kwargs.width=512"])  # a key into a table set earlier
    assert again.model.kwargs == {"width": 512, "depth": 2}


@pytest.mark.parametrize("override, field", [
    ("model.hidden.width=3", "model.hidden"),  # not a table
    ("model.nosuch.width=3", "model.nosuch"),  # not a key of [model]
    ("nosuch.kwargs.width=3", "nosuch"),  # not a section
    ("model.kwargs.=3", "--set"),  # an empty key
])
def test_nested_set_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        config.load(None, ["model.name='mylab.zoo:make'", override])
    assert e.value.field == field


def test_nested_set_into_a_key_that_holds_a_value_is_refused():
    with pytest.raises(ConfigError) as e:
        config.load(None, ["model.name='mylab.zoo:make'", "model.kwargs.width=3", "model.kwargs.width.deep=1"])
    assert e.value.field == "model.kwargs.width"


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\nname = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
