"""The adaptive study under Ray Tune: a searcher that asks `adaptive.TrialQueue`, and racing.

Racing: a finished trial that reached the target leaves its steps in SWEEP/race/; a running
trial at the same batch but another lr stops once its steps exceed `search.race` x the fewest
steps there (a file read per logged row, so it works on any cluster with a shared folder) and is
recorded as `slower`, its steps a lower bound. The racer is a stop rule the training loop
consults (`bigbatch.trainer.stopper`): the run ends with status "slower" in its summary. Trials at the best lr itself are never raced, so
seed-to-seed scatter cannot take the majority away from the best lr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from bigbatch import folders
from bigbatch.study import adaptive

def record_finish(out_dir: Path, point: dict[str, Any], steps_to_target: float) -> None:
    """Leave a finished trial's steps where the racing trials of its batch read them."""
    race = folders.SweepFolder(out_dir).race
    race.mkdir(exist_ok=True)
    path = race / f"{adaptive.point_name(point)}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"batch": point["batch"], "lr_multiplier": point["lr_multiplier"], "steps": steps_to_target}))
    os.replace(tmp, path)


def best_finished(out_dir: Path, batch: int, exclude_multiplier: float) -> float | None:
    """The fewest steps to target among finished trials at `batch` with another lr multiplier."""
    best = None
    for path in folders.SweepFolder(out_dir).race.glob(f"b{batch}-*.json"):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if r["batch"] == batch and r["lr_multiplier"] != exclude_multiplier:
            best = r["steps"] if best is None else min(best, r["steps"])
    return best


def racer(out_dir: Path, point: dict[str, Any], factor: float) -> Callable[[dict[str, Any]], dict[str, Any] | None] | None:
    """A stop rule for the training loop: given a metrics row, {"status": "slower", ...} once the
    trial is clearly behind (None: go on; racer None: no racing)."""
    if not factor or point.get("phase") == "gap":
        return None

    def check(row: dict[str, Any]) -> dict[str, Any] | None:
        step = row.get("step")
        if step is None:
            return None
        best = best_finished(out_dir, point["batch"], point["lr_multiplier"])
        if best is not None and step > factor * best:
            return {"status": "slower", "steps_lower_bound": int(step), "raced_against": best}
        return None

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
