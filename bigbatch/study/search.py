"""The adaptive study under Ray Tune: a searcher that asks `adaptive.TrialQueue`, and racing.

Racing: a finished trial that reached the target leaves its steps in SWEEP/race/; a running
trial at the same batch but another lr stops once its steps exceed `search.race` x the fewest
steps there (a file read per logged row, so it works on any cluster with a shared folder) and is
recorded as `slower`, its steps a lower bound. Trials at the best lr itself are never raced, so
seed-to-seed scatter cannot take the majority away from the best lr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from bigbatch.study import adaptive

RACE_DIR = "race"


class Slower(Exception):
    """The trial used clearly more steps than its batch's best finished trial: stopped by racing."""

    def __init__(self, step: int, best: float) -> None:
        super().__init__(f"stopped at step {step}: more than the race limit over the best {best:g} steps")
        self.step, self.best = step, best

    def __reduce__(self):  # picklable from a worker process: rebuilt from (step, best)
        return type(self), (self.step, self.best)


def record_finish(out_dir: Path, point: dict[str, Any], steps_to_target: float) -> None:
    """Leave a finished trial's steps where the racing trials of its batch read them."""
    race = Path(out_dir) / RACE_DIR
    race.mkdir(exist_ok=True)
    path = race / f"{adaptive.point_name(point)}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"batch": point["batch"], "lr_multiplier": point["lr_multiplier"], "steps": steps_to_target}))
    os.replace(tmp, path)


def best_finished(out_dir: Path, batch: int, exclude_multiplier: float) -> float | None:
    """The fewest steps to target among finished trials at `batch` with another lr multiplier."""
    best = None
    for path in (Path(out_dir) / RACE_DIR).glob(f"b{batch}-*.json"):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if r["batch"] == batch and r["lr_multiplier"] != exclude_multiplier:
            best = r["steps"] if best is None else min(best, r["steps"])
    return best


def racer(out_dir: Path, point: dict[str, Any], factor: float) -> Callable[[dict[str, Any]], None] | None:
    """A metrics-row callback that raises Slower once the trial is clearly behind (None: no racing)."""
    if not factor or point.get("phase") == "gap":
        return None

    def check(row: dict[str, Any]) -> None:
        step = row.get("step")
        if step is None:
            return
        best = best_finished(out_dir, point["batch"], point["lr_multiplier"])
        if best is not None and step > factor * best:
            raise Slower(int(step), best)

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
