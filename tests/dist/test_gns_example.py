"""examples/gns_in_your_loop.py, a plain torch DDP loop with `GradientNoiseScale`, on 2 gloo
ranks gives the B_simple that `bigbatch train` (its online probe, which wraps the same estimator
with sync="read") gives on the same model, data, global batch, seed and measurement interval
(every step: GradientNoiseScale's default, so the run sets measure.gns_every = 1): within 1 %
(they see the same batches, so in practice they agree to float precision)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from _helpers import ROOT, bigbatch, read_jsonl

EXAMPLE = ROOT / "examples" / "gns_in_your_loop.py"
STEPS, BATCH = 80, 256


def test_example_loop_b_simple_agrees_with_bigbatch_train_on_2_ranks(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "examples"), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(EXAMPLE), "--steps", str(STEPS), "--global-batch", str(BATCH)],
                       env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    mine = json.loads(p.stdout.strip().splitlines()[-1])
    assert mine["world_size"] == 2 and mine["steps"] == STEPS

    sets = ["model.name='gns_in_your_loop:make_model'", "data.name='gns_in_your_loop:make_data'", "measure.gns=true",
            "measure.gns_every=1", f"batch.global_batch={BATCH}", "optim.base_lr=0.05", "optim.scaling='none'", "optim.weight_decay=0",
            "schedule.name='constant'", f"train.steps={STEPS}", f"train.log_every={STEPS}", "train.eval_every=0",
            "train.amp='off'", "track.progress='off'"]
    out = tmp_path / "run"
    q = bigbatch("train", str(ROOT / "configs" / "mnist1d-mlp.toml"), "--nproc", "2", "--out", str(out),
                 *[a for s in sets for a in ("--set", s)], env={"PYTHONPATH": env["PYTHONPATH"]})
    assert q.returncode == 0, q.stderr[-3000:]
    theirs = [r for r in read_jsonl(out / "metrics.jsonl") if "gns/b_simple" in r][-1]
    assert theirs["step"] == STEPS
    for key in ("b_simple", "grad_sq", "trace_sigma"):
        assert mine[key] > 0 and abs(mine[key] - theirs[f"gns/{key}"]) <= 0.01 * theirs[f"gns/{key}"], \
            (key, mine[key], theirs[f"gns/{key}"])
