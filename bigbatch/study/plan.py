"""`bigbatch plan`: global batch, GPU count and time to target from one short run.

The statistical side, S(B) = S_min + E_min / B through the run's own (B0, S0), comes from one of:
- --method branching (default): the critical batch along training, measured by short branches at
  k x B0 from the run's checkpoints (Merrill et al. 2025) and integrated over training
  (`bigbatch.study.branch_runs`, `bigbatch.study.branching`); it also predicts batch ramps and
  writes one as batch.phases (--write-ramp, `bigbatch.study.plan_ramp`);
- --method noise: McCandlish et al. 2018's one-run answer, the gradient noise scale measured near
  the target as B_crit;
- --method both: both, printed side by side (the table uses branching).
 Timed steps of the same model at 2-3 per-device batch sizes give
the compute time per step, the alpha-beta model the all-reduce per world size; together they give
time to target over global batch x world size, and the fastest choice overall and at >= 80 %
scaling efficiency. The arithmetic is `bigbatch.study.plan_model`; this module measures its inputs.

    bigbatch plan CONFIG [--set K=V]... [--bench BENCH.jsonl | --alpha-us A --beta-gbps B]
                  [--gpus 1,8,64,512,4096] [--algo ring,torus2d,hierarchical] [--scaling SCALING.json]
                  [--base-lr-search 0.5,1,2] [--json FILE] [--plot FILE] [--out RUN_DIR]
    bigbatch plan --from RUN_DIR ...      (an existing run that reached its target, with step checkpoints
                                           for branching, measure.gns rows for noise)

The short run is an lr search at B0 (`--base-lr-search`, default x0.5, x1, x2 of the config's
lr), each run to the target, the fastest kept (`bigbatch.study.plan_base`): S(B0) = S0 anchors the
prediction, and the sweep it is compared with takes every batch at its best lr. S0 is the crossing
interpolated between the evaluations around the target, as the sweep reads its trials.

What the short run changes in CONFIG, and why:
- train.stop_at_target = true (it is a run *to* the target);
- train.eval_fine = 0.03 when the config has none (the study's): S0 resolved to ~3 % near the target;
- branching: checkpoint.every = train.eval_every, every checkpoint kept (the branch points);
- noise / both: measure.gns = true, and in one process batch.accum_steps = 2 when unset: the two-batch noise-scale
  estimator needs a small batch (the micro-batch) beside the big one. BatchNorm then normalises over
  B0/2 examples (ghost batches), as in `bigbatch study`; measure.gns_every = 1: this run is the
  measurement, so every step feeds the EMA (train's default of 4 trades that for speed);
- train.eval_every = every 4,096 examples (or the config's, if more often), so S0 is known to a
  few percent; train.log_every a quarter of that, so the noise-scale window near the target has points;
- data.train_eval_samples <= 1,000: the target is on the test set, train accuracy only reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from bigbatch import config as config_mod
from bigbatch import folders
from bigbatch.distributed.alphabeta import fit_alpha_beta
from bigbatch.distributed.env import resolve_backend, spawn_local, torch_threads
from bigbatch.errors import UsageError
from bigbatch.study import branch_runs as bx
from bigbatch.study import plan_base as base
from bigbatch.study import plan_model as pm
from bigbatch.study import plan_noise as pn
from bigbatch.study import plan_ramp, records
from bigbatch.study.plan_output import describe, format_table, plot_plan
from bigbatch.study.scaling import measure_step_times, read_bench, short_ring_bench
from bigbatch.trainer import preflight
from bigbatch.trainer.rundir import default_run_dir

DEFAULT_GPUS = "1,8,64,512,4096"
TIMED_STEPS, TIMED_WARMUP = 20, 5


# --- inputs -------------------------------------------------------------------------------------


def parse_int_list(text: str, field: str, low: int = 1) -> list[int]:
    try:
        values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise UsageError(field, f"expected a comma list of integers such as 1,8,64, got {text!r}") from None
    if not values or values[0] < low:
        raise UsageError(field, f"values must be integers >= {low}, got {text!r}")
    return values


def parse_algos(text: str) -> list[str]:
    algos = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in algos if a not in pm.ALGORITHMS]
    if bad or not algos:
        raise UsageError("--algo", f"unknown all-reduce algorithm {bad[0] if bad else text!r}; "
                         f"expected a comma list of {', '.join(pm.ALGORITHMS)}")
    return algos


def comm_source(args) -> dict | None:
    """alpha/beta from --bench or --alpha-us/--beta-gbps (None: measure here)."""
    given = (args.alpha_us is not None, args.beta_gbps is not None)
    if args.bench and any(given):
        raise UsageError("--bench", "give either --bench or --alpha-us/--beta-gbps, not both")
    if any(given) and not all(given):
        raise UsageError("--alpha-us" if not given[0] else "--beta-gbps", "--alpha-us and --beta-gbps go together")
    if args.bench:
        fit = fit_alpha_beta(read_bench(args.bench))
        return {"alpha_s": fit["alpha_s"], "beta_bytes_per_s": fit["beta_bytes_per_s"],
                "source": f"fit to {fit['points']} ring rows of {args.bench} (median error {100 * fit['median_rel_err']:.0f} %)"}
    if all(given):
        if args.alpha_us < 0 or args.beta_gbps <= 0:
            raise UsageError("--beta-gbps" if args.beta_gbps <= 0 else "--alpha-us", "must be positive")
        return {"alpha_s": args.alpha_us * 1e-6, "beta_bytes_per_s": args.beta_gbps * 1e9, "source": "given"}
    return None


def read_scaling(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError("--scaling", f"file {path!r} not found")
    try:
        data = json.loads(p.read_text())
        rows = [r for r in data["efficiency"] if r["world_size"] > 1]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UsageError("--scaling", f"{path!r} is not a scaling.json of `bigbatch scaling`") from None
    if not rows:
        raise UsageError("--scaling", f"{path!r} measured no world size > 1: no overlap to read")
    return max(rows, key=lambda r: r["world_size"])


# --- measurements -------------------------------------------------------------------------------


def _timed_batches(cfg, per_device_batches: list[int]) -> list[dict]:
    return [measure_step_times(cfg, b, TIMED_STEPS, TIMED_WARMUP) for b in per_device_batches]


def time_compute(cfg, per_device_batches: list[int]) -> tuple[pm.ComputeModel, list[dict]]:
    """Timed optimizer steps at each per-device batch on one spawned rank, as a rank of a
    data-parallel job runs them (`bigbatch scaling`'s measurement: DDP, one torch thread on the
    CPU), warm-up excluded. The fit uses the steps under DDP's no_sync: compute and DDP's own
    per-step work, without the gradient all-reduce, which the alpha-beta model adds per world size."""
    timed = spawn_local(1, _timed_batches, cfg, per_device_batches, backend=cfg.dist.backend, timeout_s=cfg.dist.timeout_s)
    model = pm.ComputeModel.fit([t["per_device_batch"] for t in timed], [t["compute_s"] for t in timed])
    return model, timed


def local_alpha_beta(cfg) -> dict:
    """alpha and beta fitted to a short ring bench on 2 local ranks (when the user gave none)."""
    fit = fit_alpha_beta(short_ring_bench(2, resolve_backend(cfg.dist.backend)))
    return {"alpha_s": fit["alpha_s"], "beta_bytes_per_s": fit["beta_bytes_per_s"],
            "source": f"measured here: ring bench on 2 local ranks (median fit error {100 * fit['median_rel_err']:.0f} %); "
                      "this machine's links, not a cluster's"}


# --- the command ------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="training config (TOML) with a [target]; omit with --from")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--from", dest="from_run", default=None, metavar="RUN_DIR",
                        help="plan from an existing run folder (measure.gns rows, reached its target) instead of a new run")
    parser.add_argument("--bench", default=None, help="`bigbatch bench allreduce --json` rows to fit alpha and beta (ring)")
    parser.add_argument("--alpha-us", type=float, default=None, help="latency per all-reduce step (us), with --beta-gbps")
    parser.add_argument("--beta-gbps", type=float, default=None, help="link bandwidth (GB/s), with --alpha-us")
    parser.add_argument("--intra-alpha-us", type=float, default=None, help="hierarchical: inside a node (default --alpha-us)")
    parser.add_argument("--intra-beta-gbps", type=float, default=None, help="hierarchical: inside a node (default --beta-gbps)")
    parser.add_argument("--local-size", type=int, default=8, help="GPUs per node for the hierarchical all-reduce (default 8)")
    parser.add_argument("--gpus", default=DEFAULT_GPUS, help=f"world sizes to plan for (default {DEFAULT_GPUS})")
    parser.add_argument("--batches", default=None, help="global batches to plan for (default powers of 2 from 8 past 64 B_crit)")
    parser.add_argument("--algo", default=",".join(pm.ALGORITHMS),
                        help="all-reduce algorithms to consider; each row uses the fastest (default all three)")
    parser.add_argument("--scaling", default=None,
                        help="scaling.json of `bigbatch scaling` on this config: the overlap of all-reduce and backward "
                             "(default: none assumed)")
    parser.add_argument("--noise-from", default=None, metavar="MEASURE_JSON",
                        help="`bigbatch measure RUN_DIR --json` of the run at its target: B_crit from it (--noise) "
                             "instead of the online B_simple (use with --from RUN_DIR)")
    parser.add_argument("--noise", choices=("b_noise", "b_simple"), default="b_noise",
                        help="with --noise-from: which noise scale is B_crit (default b_noise, McCandlish et al.'s)")
    parser.add_argument("--time-batches", default=None, help="per-device batches to time (default B0/4, B0, 4 B0)")
    parser.add_argument("--eval-every", type=int, default=None, help="short run: steps between evaluations (default every 4,096 examples)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="CPU only: torch threads of the short run (default 1, as the study's trials: two OpenMP "
                             "threads on a shared 2-core machine were 20-30x slower per step here)")
    parser.add_argument("--base-lr-search", default=None, metavar="FACTORS",
                        help=f"lr factors of the short run, each run to the target, the fastest kept (default "
                             f"{base.DEFAULT_LR_FACTORS}, extended by 2x beyond an edge; 1 = the config's lr only)")
    parser.add_argument("--out", default=None, help="run folder of the short run (default runs/plan-<name>-<time>; "
                                                    "with an lr search one sub-folder lr-x<factor> per lr)")
    plan_ramp.add_arguments(parser)
    parser.add_argument("--json", default=None, help="write the plan as JSON to this file")
    parser.add_argument("--plot", default=None, help="write a plot of time to target vs GPUs per batch (PNG)")


def validate(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the user can get wrong, before any run, folder or process."""
    if args.from_run and (args.config or args.set):
        raise UsageError("--from", "takes the run's own config.toml; give no CONFIG or --set with it")
    if not args.from_run and not args.config:
        raise UsageError("config", "a training config is required (or --from RUN_DIR)")
    out: dict[str, Any] = {"algos": parse_algos(args.algo), "worlds": parse_int_list(args.gpus, "--gpus"),
                           "batches": parse_int_list(args.batches, "--batches") if args.batches else None,
                           "comm": comm_source(args),
                           "scaling": read_scaling(args.scaling) if args.scaling else None,
                           "measured_noise": pn.read_measured_noise(args.noise_from, args.noise) if args.noise_from else None}
    for name in ("intra_alpha_us", "intra_beta_gbps"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise UsageError("--" + name.replace("_", "-"), f"must be > 0, got {v}")
    if args.local_size < 1:
        raise UsageError("--local-size", f"must be >= 1, got {args.local_size}")
    if args.torch_threads < 1:
        raise UsageError("--torch-threads", f"must be >= 1, got {args.torch_threads}")
    if args.eval_every is not None and args.eval_every < 1:
        raise UsageError("--eval-every", f"must be >= 1, got {args.eval_every}")
    plan_ramp.validate(args)
    noise, branching = args.method in ("noise", "both"), args.method in ("branching", "both")
    if args.from_run and args.base_lr_search is not None:
        raise UsageError("--base-lr-search", "searches the lr of a new short run; --from takes the given run as it is")
    out["lr_factors"] = base.parse_factors(args.base_lr_search or base.DEFAULT_LR_FACTORS)
    if args.from_run:
        out["run"] = base.read_run(args.from_run, noise)
        if branching:
            bx.base_checkpoints(args.from_run)
        cfg = out["run"]["cfg"]
    else:
        cfg = config_mod.load(args.config, args.set)
        if cfg.target.test_acc is None and cfg.target.test_loss is None:
            raise UsageError("target", f"{args.config} has no [target] (test_acc or test_loss): the plan needs a target to run to")
        if cfg.batch.adaptive != "none" or cfg.batch.phases:
            raise UsageError("batch.adaptive", "the short run needs one fixed batch (no adaptive batch or phases)")
        out["run_cfg"] = base.short_run_config(cfg, args.eval_every, noise, branching)
        preflight.check(out["run_cfg"], 1)
        if args.out and Path(args.out).exists():
            raise UsageError("--out", f"{args.out!r} exists; the short run needs a new folder")
    out["cfg"] = cfg
    b0 = cfg.batch.global_batch
    out["time_batches"] = (parse_int_list(args.time_batches, "--time-batches") if args.time_batches
                           else sorted({max(1, b0 // 4), b0, 4 * b0}))
    if len(out["time_batches"]) < 2:
        raise UsageError("--time-batches", "need 2 or more per-device batch sizes")
    return out


def main(args: argparse.Namespace) -> int:
    v = validate(args)
    cfg = v["cfg"]
    notes: list[str] = []
    use_noise, use_branching = args.method in ("noise", "both"), args.method in ("branching", "both")

    # 1. the short run (or the given one): S0 at B0, its checkpoints and/or the noise scale along the way
    if "run" in v:
        run = v["run"]
    else:
        run_cfg = v["run_cfg"]
        run_dir = Path(args.out) if args.out else default_run_dir(dataclasses.replace(run_cfg, name=f"plan-{cfg.name}"))
        run = base.search(run_cfg, run_dir, v["lr_factors"], args.torch_threads)
        if not run["reached"]:
            last = run["lr_search"][-1]
            factors = ", x".join(f"{r['factor']:g}" for r in run["lr_search"])
            print(f"bigbatch plan: no short run reached the target (lr x{factors}; "
                  f"the last stopped {last['status']} after {last['steps']} steps at test_acc {last['test_acc']}); "
                  "give it more (train.epochs) or an easier target", file=sys.stderr)
            return 1
        cfg = base.with_lr_factor(cfg, run["lr_factor"])  # the branches, the table and a written ramp at B0's best lr
        if run_cfg.batch.accum_steps != cfg.batch.accum_steps:
            notes.append(f"short run used batch.accum_steps = {run_cfg.batch.accum_steps} for the noise scale: "
                         f"micro-batches of {run_cfg.batch.global_batch // run_cfg.batch.accum_steps} (BatchNorm, where the "
                         "model has it, normalised over these ghost batches)")
    s0, b0 = run["steps"], run["batch"]
    noise = pn.noise_estimate(run["history"], s0) if use_noise else None
    # McCandlish et al. 2018: B_crit ~ B_noise; the online B_simple is its Hessian-free proxy
    measured = v["measured_noise"]
    b_crit_noise = (measured["value"] if measured else noise["value"]) if use_noise else None
    branches = None
    if use_branching:
        with torch_threads(args.torch_threads, cpu_only=True):
            branches = bx.measure(run["cfg"], run["run_dir"], s0, points=args.points, window_steps=args.window_steps,
                                  eval_examples=args.eval_examples, base_s=run["wall_s"], base_examples=run["examples"])
        tradeoff, b_crit = plan_ramp.tradeoff(branches), branches["b_crit"]
        b_crit_source = "branching: B_crit(t) from branches at k x B0, integrated over training (Merrill et al. 2025)"
    else:
        b_crit = b_crit_noise
        b_crit_source = (f"{measured['key']} from {measured['file']} (bigbatch measure at the run's checkpoint)" if measured
                         else "online B_simple near the target") + " (McCandlish et al. 2018: B_crit ~ B_noise)"
        tradeoff = pm.Tradeoff.from_run(s0, b0, b_crit)

    # 2. compute per step at 2-3 per-device batch sizes
    print(f"timing steps at per-device batches {v['time_batches']} ...", file=sys.stderr, flush=True)
    compute, timed = time_compute(cfg, v["time_batches"])
    grad_bytes = timed[0]["grad_bytes"]

    # 3. communication: alpha-beta from --bench / given, else a short ring bench here
    comm_in = v["comm"] or local_alpha_beta(cfg)
    comm = pm.CommModel(grad_bytes, comm_in["alpha_s"], comm_in["beta_bytes_per_s"], args.local_size,
                        args.intra_alpha_us * 1e-6 if args.intra_alpha_us else None,
                        args.intra_beta_gbps * 1e9 if args.intra_beta_gbps else None)
    if v["scaling"] is not None:
        sc = v["scaling"]
        overlap = pm.overlap_from_scaling(sc["comm_s"], sc["world_size"], comm)
        overlap_source = f"measured: {args.scaling} at {sc['world_size']} ranks (exposed {1e3 * sc['comm_s']:.2f} ms)"
    else:
        overlap, overlap_source = 0.0, "assumed none (no --scaling given): the whole all-reduce is added to each step"

    # 4. the table and the answer; with branching, the ramps and the GPU count per ramp stage
    batches = v["batches"] or pm.default_batches(b0, b_crit, max(v["worlds"]))
    rows = pm.plan_rows(tradeoff, compute, comm, batches, v["worlds"], v["algos"], overlap)
    ramps = None
    if branches is not None:
        ramps = plan_ramp.ramps(branches, args, cfg.batch.accum_steps or 1)
        ramps["gpus"] = plan_ramp.gpus_per_stage(ramps[args.ramp], lambda b: pm.plan_rows(
            tradeoff, compute, comm, [b], v["worlds"], v["algos"], overlap))
    plan = {
        "config_name": cfg.name, "run_dir": run["run_dir"], "b0": b0, "s0": s0, "method": args.method,
        "base_lr": cfg.optim.base_lr, "base_lr_search": run["lr_search"],
        "target": {k: val for k, val in (("test_acc", cfg.target.test_acc), ("test_loss", cfg.target.test_loss)) if val is not None},
        "noise_scale_at_target": b_crit_noise, "noise_scale": noise, "noise_scale_measured": measured,
        "branching": bx.json_ready(branches) if branches else None, "ramps": ramps,
        "b_crit": b_crit, "b_crit_source": b_crit_source,
        "s_min": tradeoff.s_min, "e_min": tradeoff.e_min,
        "compute": {"overhead_s": compute.overhead_s, "per_example_s": compute.per_example_s,
                    "timed": [{"per_device_batch": t["per_device_batch"], "step_s": t["compute_s"]} for t in timed],
                    "timed_steps": TIMED_STEPS, "warmup_steps": TIMED_WARMUP},
        "comm": {"grad_bytes": grad_bytes, "alpha_s": comm.alpha_s, "beta_bytes_per_s": comm.beta_bytes_per_s,
                 "local_size": comm.local_size, "algos": v["algos"], "source": comm_in["source"]},
        "overlap": overlap, "overlap_source": overlap_source,
        "rows": rows,
        "best": pm.choose_best(rows),
        "best_efficient": pm.choose_best(rows, pm.BEST_EFFICIENCY),
        "notes": notes,
    }
    T = records.tokens_per_example(folders.RunFolder(run["run_dir"]).read_summary())
    if T:  # a sequence task: batches are in sequences of T tokens
        interval = (branches or {}).get("interval") or {}
        plan["tokens_per_example"] = T
        plan["in_tokens"] = {"b0": b0 * T, "b_crit": b_crit * T, "e_min": tradeoff.e_min * T,
                             **{f"{k}_interval": [v * T for v in interval[k]] for k in ("b_crit", "e_min") if interval.get(k)}}
    print(f"{cfg.name}: {s0:.1f} steps to target at batch {b0} (interpolated between evaluations)")
    if base.search_line(run):
        print(base.search_line(run))
    if noise:
        print(pn.noise_line(noise, measured, b_crit_noise, s0, b0, branches))
    if branches:
        print("\n".join(bx.report_lines(branches, pn.noise_history(folders.RunFolder(run["run_dir"]).read_metrics())
                                         if use_noise else None)))
    print(f"B_crit ~ {b_crit:.0f} ({args.method})   S_min = {tradeoff.s_min:.1f} steps   E_min = {tradeoff.e_min:.3g} examples")
    if T:
        tok = plan["in_tokens"]
        print(f"in tokens (x {T} per sequence): B0 = {tok['b0']:.0f}   B_crit ~ {tok['b_crit']:.0f}"
              + (" [{:.0f}, {:.0f}]".format(*tok["b_crit_interval"]) if "b_crit_interval" in tok else "")
              + f"   E_min = {tok['e_min']:.3g} tokens")
    print(f"compute: {1e3 * compute.overhead_s:.2f} ms + {1e6 * compute.per_example_s:.1f} us/example per step; "
          f"all-reduce of {grad_bytes / 2 ** 20:.2f} MiB: alpha {1e6 * comm.alpha_s:.1f} us, beta {comm.beta_bytes_per_s / 1e9:.3g} GB/s "
          f"({comm_in['source']}); overlap {overlap:.2f} ({overlap_source})")
    for note in notes:
        print(f"note: {note}")
    print(format_table(rows, v["worlds"]))
    print(f"best:           {describe(plan['best'])}")
    print(f"best_efficient: {describe(plan['best_efficient'])}")
    if ramps:
        print("\n".join(plan_ramp.ramp_lines(ramps, branches)))
        print(f"{args.ramp} ramp per stage: " + ", ".join(f"batch {g['global_batch']} on {g['world_size']} GPU(s)"
                                                      for g in ramps["gpus"]))
        if args.write_ramp:
            phases = plan_ramp.write_ramp(cfg, branches, ramps[args.ramp], args.write_ramp, args.ramp_world)
            print(f"wrote {args.write_ramp}: batch.phases = {phases} (the {args.ramp} ramp)", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(plan, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        plot_plan(rows, plan, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
