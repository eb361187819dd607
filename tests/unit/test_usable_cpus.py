"""Threads and worker pools are sized by the cores this process may use (a SLURM allocation,
a cpuset, taskset), not by the machine's core count."""

import os
import subprocess
import sys

import pytest

from bigbatch.distributed.env import usable_cpus


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_a_process_pinned_to_one_core_sees_one_core():
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from bigbatch.distributed.env import usable_cpus; print(usable_cpus(), os.cpu_count())")
    pinned, machine = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              check=True).stdout.split())
    assert pinned == 1 and machine >= 1
    assert usable_cpus() == len(os.sched_getaffinity(0))

