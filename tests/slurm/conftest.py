"""The local SLURM cluster (tests/slurm/cluster.sh): started once per session if it is not
running, stopped afterwards if this session started it. Every test here is marked `slurm`.

Where SLURM is not installed, or this is not root (the cluster runs its daemons as root), the
tests skip with a one-line reason. CI installs the packages and runs as root, so they run there:
    apt-get install -y --no-install-recommends slurm-wlm munge
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CLUSTER = HERE / "cluster.sh"
CLUSTER_DIR = os.environ.get("BIGBATCH_SLURM_DIR", "/tmp/bigbatch-slurm-cluster")
SLURM_CONF = f"{CLUSTER_DIR}/slurm.conf"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(pytest.mark.slurm)


def _running(env: dict[str, str]) -> bool:
    if not Path(SLURM_CONF).is_file():
        return False
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """os.environ plus SLURM_CONF of the running local cluster."""
    missing = [t for t in ("sbatch", "slurmctld", "slurmd", "munged") if shutil.which(t) is None
               and not Path("/usr/sbin", t).exists()]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): "
                    "apt-get install -y --no-install-recommends slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root (tests/slurm/cluster.sh): run as root")
    env = dict(os.environ, SLURM_CONF=SLURM_CONF, BIGBATCH_SLURM_DIR=CLUSTER_DIR)
    started = not _running(env)
    if started:
        proc = subprocess.run(["bash", str(CLUSTER), "up"], env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"tests/slurm/cluster.sh up failed:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    yield env
    if started:
        subprocess.run(["bash", str(CLUSTER), "down"], env=env, capture_output=True, text=True, timeout=120)
