"""metrics.jsonl is written in blocks (flushed every FLUSH_S, at flush() and at close), yet
every row logged is on disk whenever someone outside the loop reads the file: after a
checkpoint's flush, at close, and when a reporter stops the run by raising (Ray Tune's
diverged and raced trials read the rows while the stopped run's tracker is still open)."""

import json

import pytest

from bigbatch.config.sections import TrackConfig
from bigbatch.folders import METRICS as JSONL
from bigbatch.track import Tracker


def on_disk(run_dir):
    return [json.loads(line) for line in (run_dir / JSONL).read_text().splitlines()]


class Stop(Exception):
    pass


def test_a_reporter_that_stops_the_run_finds_every_row_on_disk(tmp_path):
    def reporter(row):
        if row["loss"] is None:  # a non-finite loss is logged as null
            raise Stop(row["step"])

    tracker = Tracker(tmp_path, {}, TrackConfig(progress="off"), total_steps=10, reporter=reporter)
    with pytest.raises(Stop), tracker:  # how the training loop holds it
        tracker.log({"step": 1, "loss": 2.5})
        tracker.log({"step": 2, "loss": 1.5})
        tracker.log({"step": 3, "loss": float("nan")})
    assert on_disk(tmp_path) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 1.5}, {"step": 3, "loss": None}]


def test_flush_and_close_put_every_row_on_disk(tmp_path):
    tracker = Tracker(tmp_path, {}, TrackConfig(progress="off"), total_steps=10)
    for step in range(1, 4):
        tracker.log({"step": step, "loss": 1.0 / step})
    tracker.flush()
    assert [r["step"] for r in on_disk(tmp_path)] == [1, 2, 3]
    tracker.log({"step": 4, "loss": 0.25})
    tracker.close()
    assert [r["step"] for r in on_disk(tmp_path)] == [1, 2, 3, 4]


def test_a_run_stopped_by_an_exception_keeps_every_row_it_logged(tmp_path):
    tracker = Tracker(tmp_path, {}, TrackConfig(progress="off"), total_steps=10)
    with pytest.raises(Stop), tracker:  # how the training loop holds it
        tracker.log({"step": 1, "loss": 2.0})
        raise Stop
    assert on_disk(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_rows_reach_the_disk_every_flush_interval_without_a_flush_call(tmp_path, monkeypatch):
    import bigbatch.track as track

    tracker = Tracker(tmp_path, {}, TrackConfig(progress="off"), total_steps=10)
    tracker.log({"step": 1, "loss": 2.0})
    assert on_disk(tmp_path) == [{"step": 1, "loss": 2.0}]  # the first row at once: training has started
    tracker.log({"step": 2, "loss": 1.0})
    assert len(on_disk(tmp_path)) == 1  # inside the interval: held (encoded at the next flush)
    monkeypatch.setattr(track, "FLUSH_S", 0.0)
    tracker.log({"step": 3, "loss": float("inf")})
    assert [r["loss"] for r in on_disk(tmp_path)] == [2.0, 1.0, None]
    tracker.close()
