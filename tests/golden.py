"""Golden losses: short runs whose per-step loss and lr are committed in tests/assets/golden/.

A change that is not about computation (a refactor, a move, a rename) must reproduce these files
exactly on CPU: same data order, same initial weights, same float operations. Each case runs with
one torch thread per process, so the sums are taken in the same order every time.

    python tests/golden.py OUT_DIR      # run every case, write OUT_DIR/<case>.jsonl
    python tests/golden.py --write      # regenerate tests/assets/golden/ (only for a change ABOUT computation)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "assets" / "golden"
MLP, CNN = str(ROOT / "configs/mnist1d-mlp.toml"), str(ROOT / "configs/mnist1d-cnn.toml")
SMALL = ["data.num_samples=4000", "data.train_eval_samples=1000", "train.log_every=1", "train.eval_every=0",
         "train.amp='off'", "track.progress='off'"]

# case -> (config file, overrides, world size)
CASES: dict[str, tuple[str, list[str], int]] = {
    "mlp-1proc": (MLP, SMALL + ["train.steps=40"], 1),
    "mlp-2ranks": (MLP, SMALL + ["train.steps=40"], 2),
    "mlp-accum4": (MLP, SMALL + ["train.steps=40", "batch.accum_steps=4"], 1),
    "cnn1d-60": (CNN, SMALL + ["train.steps=60"], 1),
    # 25 steps at 128 (one epoch of 3200 examples), then 256; lr follows the batch
    "lars-phases": (MLP, SMALL + ["optim.name='lars'", "batch.phases=[[0, 128], [1, 256]]", "train.epochs=2"], 1),
    # the GNS-driven batch: B_simple from the 4 micro-batches, a decision every 5 steps
    "mlp-gns-adaptive": (MLP, SMALL + ["train.steps=40", "batch.accum_steps=4", "measure.gns=true",
                                       "batch.adaptive='gns'", "batch.adapt_every=5"], 1),
}
KEYS = ("step", "lr", "global_batch", "loss", "test_loss", "test_acc")


def _train(path: str, overrides: list[str], out: str) -> None:
    import torch

    from bigbatch import config
    from bigbatch.trainer.loop import run

    torch.set_num_threads(1)
    run(config.load(path, overrides), out)


def rows(run_dir: Path) -> list[dict]:
    """The golden fields of a run's metrics.jsonl rows."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append({k: r[k] for k in KEYS if k in r})
    return out


def run_case(name: str, work: Path) -> list[dict]:
    from bigbatch.distributed.env import spawn_local

    path, overrides, world = CASES[name]
    run_dir = work / name
    if world == 1:
        _train(path, overrides, str(run_dir))
    else:
        spawn_local(world, _train, path, overrides, str(run_dir), backend="gloo")
    return rows(run_dir)


def write(rows_: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))


def read(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def main(argv: list[str]) -> int:
    import tempfile

    regen = argv[:1] == ["--write"]
    dest = GOLDEN if regen else Path(argv[0])
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        for name in CASES:
            write(run_case(name, Path(work)), dest / f"{name}.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
