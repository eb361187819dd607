"""`bigbatch plan`'s branching side: its options, what it prints, and the batch ramp it writes.

The measurement is `bigbatch.study.branch_runs`; this module turns it into the plan's S(B)
(`tradeoff`), two ramps (sqrt, the steps-minimising one, and proportional, B = c B_crit(t)) with
their predicted steps, examples and gain against the constant batch at the same examples, the
GPU count the hardware model picks per ramp stage, and `--write-ramp FILE`: the user's config with
the chosen ramp as `batch.phases` (the lr follows the batch by optim.scaling, as batch.phases
does), ready for `bigbatch train FILE [--nproc N]`.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from bigbatch import config as config_mod
from bigbatch.errors import UsageError
from bigbatch.study import branch_runs as bx
from bigbatch.study import branching as br
from bigbatch.study import plan_model as pm

METHODS = ("branching", "noise", "both")
DEFAULT_MULTIPLE = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=METHODS, default="branching",
                        help="the statistical side: branching (B_crit along training by branches from the base run's "
                             "checkpoints; default), noise (the noise scale near the target, McCandlish et al.), or both "
                             "(printed side by side; the table uses branching)")
    parser.add_argument("--points", type=int, default=bx.DEFAULT_POINTS,
                        help=f"branching: checkpoints branched from, spread over the run (default {bx.DEFAULT_POINTS})")
    parser.add_argument("--window-steps", type=int, default=None,
                        help="branching: a branch window in steps at B0, a power of 2 (default: the largest within a segment, >= "
                             f"{bx.MIN_WINDOW_STEPS})")
    parser.add_argument("--eval-examples", type=int, default=bx.DEFAULT_EVAL_EXAMPLES,
                        help=f"branching: test examples the loss decrease is measured on (default {bx.DEFAULT_EVAL_EXAMPLES})")
    parser.add_argument("--ramp", choices=br.RAMP_KINDS, default="sqrt",
                        help="the ramp --write-ramp writes (default sqrt: fewest steps at its examples)")
    parser.add_argument("--ramp-examples", type=float, default=None,
                        help="examples the ramp spends to the target (default 2 E_min, those of the constant global B_crit)")
    parser.add_argument("--ramp-world", type=int, default=1,
                        help="world size the ramp will run on: its batches are multiples of it x accum_steps x --ramp-multiple")
    parser.add_argument("--ramp-multiple", type=int, default=DEFAULT_MULTIPLE,
                        help=f"per-device micro-batch granularity of the ramp's batches (default {DEFAULT_MULTIPLE})")
    parser.add_argument("--write-ramp", default=None, metavar="FILE",
                        help="write the config with the ramp as batch.phases (branching only)")


def validate(args: argparse.Namespace) -> None:
    """The branching options, before any run or folder."""
    for name in ("points", "eval_examples", "ramp_world", "ramp_multiple"):
        if getattr(args, name) < 1:
            raise UsageError("--" + name.replace("_", "-"), f"must be >= 1, got {getattr(args, name)}")
    w = args.window_steps
    if w is not None and (w < bx.MIN_WINDOW_STEPS or w & (w - 1)):
        raise UsageError("--window-steps", f"must be a power of 2 >= {bx.MIN_WINDOW_STEPS} (every k x B0 branch then "
                                           f"sees the same examples), got {w}")
    if args.ramp_examples is not None and args.ramp_examples <= 0:
        raise UsageError("--ramp-examples", f"must be > 0, got {args.ramp_examples}")
    if args.write_ramp:
        if args.method == "noise":
            raise UsageError("--write-ramp", "the ramp comes from the branching measurement; use --method branching or both")
        if Path(args.write_ramp).exists():
            raise UsageError("--write-ramp", f"{args.write_ramp!r} exists; give a new file")
        if not Path(args.write_ramp).resolve().parent.is_dir():
            raise UsageError("--write-ramp", f"folder of {args.write_ramp!r} does not exist")


def tradeoff(m: dict[str, Any]) -> pm.Tradeoff:
    """The integrated S(B) = S_min + E_min / B as the plan's trade-off curve."""
    return pm.Tradeoff(s_min=m["s_min"], b_crit=m["b_crit"])


def ramps(m: dict[str, Any], args: argparse.Namespace, accum: int) -> dict[str, Any]:
    """Both ramps at the ramp's examples, batches multiples of world x accum x multiple."""
    unit = args.ramp_world * accum * args.ramp_multiple
    examples = args.ramp_examples or 2 * m["e_min"]
    if examples <= m["e_min"]:
        raise UsageError("--ramp-examples", f"{examples:.4g} is not above E_min = {m['e_min']:.4g}: no batch reaches the "
                                            "target with so few examples")
    return {"unit": unit, **{kind: bx.ramp(m, kind, examples, unit) for kind in br.RAMP_KINDS}}


def gpus_per_stage(ramp: dict[str, Any], rows_of) -> list[dict]:
    """Per ramp stage (batch), the world size of the fastest step at >= 80 % scaling efficiency
    (the fastest overall when none reaches it): `rows_of(batch)` gives the plan's rows at a batch."""
    out = []
    for b in dict.fromkeys(ramp["batches"]):
        rows = rows_of(b)
        best = pm.choose_best(rows, pm.BEST_EFFICIENCY) or pm.choose_best(rows)
        if best:
            out.append({"global_batch": b, "world_size": best["world_size"], "step_s": best["step_s"],
                        "efficiency": best["efficiency"]})
    return out


def ramp_lines(r: dict[str, Any], m: dict[str, Any]) -> list[str]:
    lines = []
    for kind in br.RAMP_KINDS:
        x = r[kind]
        lines.append(f"ramp {kind:<12} batches {x['batches']}: {x['steps']:.0f} steps, {x['examples']:.3g} examples; "
                     f"the constant batch {x['constant_batch']:.0f} at the same examples {x['constant_steps']:.0f} steps "
                     f"(predicted gain {100 * x['gain']:.1f} %); base batch {m['b0']}: {m['s0']:.0f} steps")
    return lines


def write_ramp(cfg, m: dict[str, Any], ramp: dict[str, Any], path: str, world: int) -> list[list]:
    """The user's config with the ramp as batch.phases (its first batch as batch.global_batch)."""
    phases = br.ramp_phases(m["segments"], ramp["batches"], m["num_train"], world, cfg.batch.accum_steps)
    out = dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch, global_batch=phases[0][1], phases=phases,
                                                             adaptive="none", lr_follows_batch=True))
    config_mod.save(out, path)
    return phases
