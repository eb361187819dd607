"""Fixtures of the study tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray per test module for its in-process sweeps (each start costs seconds of CPU);
    W&B offline in its workers."""
    import ray

    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    del os.environ["WANDB_MODE"]
