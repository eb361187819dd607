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
