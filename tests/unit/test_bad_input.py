"""Bad input: a one-line error naming the file or field, exit code 2, no run folder left behind."""

import pytest

from _helpers import bigbatch, one_line_error as _one_line_error

MLP = "configs/mnist1d-mlp.toml"


@pytest.mark.parametrize("setup, argv, expect", [
    (None, ["train", "nope.toml"], "nope.toml: config file not found"),
    ("[dataa]\nname = 'mnist1d'\n", ["train", "{cfg}"], "dataa: unknown section"),
    ("[data]\nnmae = 'mnist1d'\n", ["train", "{cfg}"], "data.nmae: unknown key in [data]"),
    ("[batch]\nglobal_batch = '128'\n", ["train", "{cfg}"], "batch.global_batch: expected an integer"),
    (None, ["train", MLP, "--set", "batch.global_batch=abc"], "batch.global_batch: expected an integer"),
    (None, ["train", MLP, "--nproc", "3"], "batch.global_batch: global batch 128 is not divisible by world size 3"),
    (None, ["train", MLP, "--set", "schedule.warmup_epochs=50", "--dry-run"], "schedule.warmup_epochs: warmup"),
    (None, ["train", "--resume", "nowhere"], "--resume"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, setup, argv, expect):
    import pathlib

    repo = pathlib.Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.toml"
    if setup is not None:
        cfg.write_text(setup)
    argv = [a.replace("{cfg}", str(cfg)) if a != MLP else str(repo / MLP) for a in argv]
    _one_line_error(capsys, argv, expect)
    assert not (tmp_path / "runs").exists()


def test_missing_data_root_fails_before_any_run_folder_exists(tmp_path):
    """In a real subprocess: no traceback, exit 2, nothing written."""
    p = bigbatch("train", str((__import__("pathlib").Path(__file__).resolve().parents[2] / "configs" / "imagenet-resnet50.toml")),
                 "--set", f"data.root='{tmp_path / 'no-such-imagenet'}'", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr
    assert "data.root" in p.stderr and "does not exist" in p.stderr
    assert list(tmp_path.iterdir()) == []


# Everything is validated for the world about to be started, before a folder or a process exists.
WORLD_MISTAKES = [
    (["--set", "dist.allreduce=torus2d", "--set", "dist.torus_rows=3"], "dist.torus_rows: 3 rows do not tile 2 ranks"),
    (["--set", "dist.allreduce=hierarchical", "--set", "dist.local_size=3"], "dist.local_size: local size 3 does not divide"),
    (["--set", "batch.adaptive=gns"], "batch.adaptive:"),
    (["--set", "batch.phases=[[0, 128], [1, 129]]"], "batch.phases[1]: global batch 129 is not divisible by world size 2"),
    (["--set", "schedule.warmup_steps=100000"], "schedule.warmup_steps:"),
]


@pytest.mark.parametrize("sets, expect", WORLD_MISTAKES)
def test_train_nproc_validates_for_its_world_before_launching(tmp_path, monkeypatch, capsys, sets, expect):
    import pathlib

    monkeypatch.chdir(tmp_path)
    mlp = str(pathlib.Path(__file__).resolve().parents[2] / MLP)
    _one_line_error(capsys, ["train", mlp, "--nproc", "2", *sets], expect)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sets, expect", WORLD_MISTAKES[:2] + WORLD_MISTAKES[3:4])
def test_slurm_render_validates_for_nodes_x_processes(tmp_path, monkeypatch, capsys, sets, expect):
    import pathlib

    monkeypatch.chdir(tmp_path)
    mlp = str(pathlib.Path(__file__).resolve().parents[2] / MLP)
    _one_line_error(capsys, ["slurm", "render", mlp, "--nodes", "1", "--gpus-per-node", "2", *sets], expect)
    assert list(tmp_path.iterdir()) == []


def test_sweep_validates_every_trial_for_its_workers(tmp_path, monkeypatch, capsys):
    import pathlib

    mlp = pathlib.Path(__file__).resolve().parents[2] / MLP
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f'name = "s"\nbase = "{mlp}"\noverrides = ["dist.allreduce=\'torus2d\'", "dist.torus_rows=3"]\n'
                     "batch_sizes = [64]\nlr_multipliers = [1.0]\n[target]\ntest_acc = 0.5\n"
                     "[trial]\nmax_steps = 10\nworkers_per_trial = 2\n")
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, ["sweep", str(sweep)], "dist.torus_rows: 3 rows do not tile 2 ranks")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.toml"]


def test_usage_errors_survive_pickling_across_processes():
    """A worker process (Ray, a process pool) raises them; the parent gets the same field and text."""
    import pickle

    from bigbatch.errors import ConfigError, UsageError

    for cls in (UsageError, ConfigError):
        e = pickle.loads(pickle.dumps(cls("batch.global_batch", "must be divisible by 3")))
        assert type(e) is cls and e.field == "batch.global_batch" and str(e) == "batch.global_batch: must be divisible by 3"
