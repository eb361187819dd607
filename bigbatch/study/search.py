"""The adaptive study under Ray Tune: a searcher that asks `adaptive.TrialQueue`, and racing.

Racing: a finished critical trial leaves its outcome in SWEEP/race/; a running trial at the same
batch stops once its steps exceed `search.race` x the censored median of the batch's best lr so
far by the majority rule (`adaptive.race_check`; a file read per logged row, so it works on any
cluster with a shared folder) and is recorded as `slower`, its steps a lower bound. Trials at
that best lr are never raced. The racer is a stop rule the training loop consults
(`bigbatch.trainer.stopper`): the run ends with status "slower" in its summary. A race that
could still change the answer once the batch's trials finished is rerun unraced
(`adaptive.unsettled_races`), so the study's result does not depend on the order trials finish.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from bigbatch import folders
from bigbatch.study import adaptive

def record_finish(out_dir: Path, point: dict[str, Any], record: dict[str, Any]) -> None:
    """Leave a finished critical trial's outcome where the racing trials of its batch read it
    (every outcome: a seed that failed counts against its lr in the majority rule)."""
    race = folders.SweepFolder(out_dir).race
    race.mkdir(exist_ok=True)
    path = race / f"{adaptive.point_name(point)}.json"
    tmp = path.with_suffix(".tmp")
    keep = ("status", "steps_to_target", "steps_lower_bound")
    tmp.write_text(json.dumps({"batch": point["batch"], "lr_multiplier": point["lr_multiplier"], "seed": point["seed"],
                               **{k: record.get(k) for k in keep}}))
    os.replace(tmp, path)


def finished_at(out_dir: Path, batch: int) -> list[dict[str, Any]]:
    """The outcomes of the finished critical trials at `batch` (race/ files)."""
    out = []
    for path in folders.SweepFolder(out_dir).race.glob(f"b{batch}-*.json"):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if r.get("batch") == batch:
            out.append(r)
    return out


def racer(out_dir: Path, point: dict[str, Any], factor: float) -> Callable[[dict[str, Any]], dict[str, Any] | None] | None:
    """A stop rule for the training loop: given a metrics row, {"status": "slower", ...} once the
    trial is clearly behind its batch's best lr so far (`adaptive.race_check`; None: go on;
    racer None: no racing)."""
    if not factor or point.get("phase") == "gap" or point.get("race") is False:
        return None

    def check(row: dict[str, Any]) -> dict[str, Any] | None:
        step = row.get("step")
        if step is None:
            return None
        return adaptive.race_check(finished_at(out_dir, point["batch"]), point, step, factor)

    return check


def queue_searcher(queue: adaptive.TrialQueue, read_record: Callable[[dict[str, Any]], dict[str, Any]]):
    """A Ray Tune Searcher that hands out the queue's points and reports each finished trial back."""
    from ray.tune.search import Searcher

    class QueueSearcher(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.points: dict[str, dict[str, Any]] = {}

        def suggest(self, trial_id: str):
            point = queue.next()
            if point == queue.FINISHED:
                return Searcher.FINISHED
            if point is None:
                return None  # wait for running trials: the queue adapts to them
            self.points[trial_id] = point
            return {"point": point}

        def save(self, checkpoint_path: str) -> None:  # the queue is rebuilt from the run folders on --resume
            pass

        def restore(self, checkpoint_path: str) -> None:
            pass

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            point = self.points.get(trial_id)
            if point is not None:
                queue.finished(point, read_record(point))

    return QueueSearcher()
