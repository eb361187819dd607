"""Checkpoints you can fall back on: the newest `keep` are kept, one that does not load is named
and skipped, none that loads changes nothing; the files are real torch checkpoints."""

import os

import pytest
import torch

from bigbatch.trainer import checkpoint as ckpt


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((1000,), float(step))}, "loop": {"step": step}}


def _snapshot(folder):
    return {p.name: (p.is_symlink() and os.readlink(p), p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.iterdir())}


def test_the_newest_keep_checkpoints_are_kept_and_checkpoint_pt_is_the_newest(tmp_path):
    for step in (10, 20, 30, 40):
        ckpt.save_step(tmp_path, step, _state(step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000030.pt", "checkpoint-00000040.pt", "checkpoint.pt"]
    assert ckpt.load(tmp_path / "checkpoint.pt")["loop"]["step"] == 40
    assert [p.name for p in ckpt.candidates(tmp_path)] == ["checkpoint-00000040.pt", "checkpoint-00000030.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "format"])
def test_a_checkpoint_that_does_not_load_is_named_and_the_previous_one_is_used(tmp_path, damage, caplog):
    for step in (10, 20):
        ckpt.save_step(tmp_path, step, _state(step), keep=3)
    newest = ckpt.step_file(tmp_path, 20)
    if damage == "truncate":  # a node lost mid-copy
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "garbage":
        newest.write_bytes(os.urandom(4096))
    else:
        torch.save({"format": 99, **_state(20)}, newest)
    before = _snapshot(tmp_path)
    path, state, bad = ckpt.select(tmp_path)
    assert _snapshot(tmp_path) == before  # choosing changes nothing
    assert path == ckpt.step_file(tmp_path, 10) and state["loop"]["step"] == 10
    assert [p for p, _ in bad] == [newest]
    with caplog.at_level("WARNING", logger="bigbatch"):
        ckpt.set_aside(bad, path)
    assert len(caplog.records) == 1 and "checkpoint-00000020.pt" in caplog.text and "checkpoint-00000010.pt" in caplog.text
    assert (tmp_path / "checkpoint-00000020.pt.corrupt").exists()
    assert ckpt.load(tmp_path / "checkpoint.pt")["loop"]["step"] == 10
    # the next save rotates among good files only
    ckpt.save_step(tmp_path, 20, _state(20), keep=3)
    assert [p.name for p in ckpt.candidates(tmp_path)] == ["checkpoint-00000020.pt", "checkpoint-00000010.pt"]


def test_when_no_checkpoint_loads_the_error_names_each_and_nothing_changes(tmp_path):
    for step in (10, 20):
        ckpt.save_step(tmp_path, step, _state(step))
        ckpt.step_file(tmp_path, step).write_bytes(b"PK\x03\x04 not a checkpoint")
    before = _snapshot(tmp_path)
    with pytest.raises(ckpt.NoCheckpointError, match="checkpoint-00000020.pt: .*checkpoint-00000010.pt: "):
        ckpt.select(tmp_path)
    assert _snapshot(tmp_path) == before


def test_a_run_folder_from_before_keep_with_a_plain_checkpoint_pt_still_resumes(tmp_path):
    ckpt.save(tmp_path / "checkpoint.pt", _state(7))
    path, state, bad = ckpt.select(tmp_path)
    assert path.name == "checkpoint.pt" and state["loop"]["step"] == 7 and not bad


def test_a_folder_that_cannot_be_written_raises_a_write_error_not_a_torch_error(tmp_path):
    gone = tmp_path / "unmounted"  # mkstemp fails there as on EACCES / EROFS
    with pytest.raises(ckpt.CheckpointWriteError, match="could not write checkpoint .*checkpoint-00000020.pt"):
        ckpt.save_step(gone, 20, _state(20))
