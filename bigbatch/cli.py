"""`bigbatch <command>`: parse the command line and call one function per command.

Each command lives in the module that owns it and exposes two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    main(args: argparse.Namespace) -> int           # exit code

Modules are imported only when their command runs, so `bigbatch --help` stays fast (importing
torch takes seconds). A `UsageError` anywhere becomes a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bigbatch import __version__
from bigbatch.errors import EXIT_USAGE, UsageError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("bigbatch.trainer.main", "train one run (one process, --nproc N local ranks, or under torchrun/SLURM)"),
    "sweep": ("bigbatch.study.sweep", "Ray Tune sweep over batch size x learning rate; fits the critical batch size"),
    "study": ("bigbatch.study.study", "the main job: a critical-batch-size study of MNIST-1D on this CPU, with a report"),
    "plan": ("bigbatch.study.plan", "one short run -> B_crit, steps and time to target over global batch x GPU count"),
    "report": ("bigbatch.study.report", "plots and report.md/report.html from a sweep folder"),
    "bench": ("bigbatch.distributed.bench", "communication benchmarks (all-reduce algorithms, nccl-tests style)"),
    "scaling": ("bigbatch.study.scaling", "weak-scaling throughput and efficiency per world size, alpha-beta model"),
    "measure": ("bigbatch.study.at_checkpoint",
                "B_simple, B_noise, sharpness and tail index at a run's checkpoint, on the trained loss (train-mode BN)"),
    "interpolate": ("bigbatch.study.landscape", "loss and accuracy on the line between two trained runs"),
    "connect": ("bigbatch.study.connect",
                "a trained Bezier curve between two runs and its loss barrier beside the straight line's"),
    "spectrum": ("bigbatch.study.spectrum",
                 "Hessian top-k, spectral density (SLQ), trace, gradient in the top-k space at a run's checkpoint"),
    "slurm": ("bigbatch.launch.slurm", "render and submit sbatch jobs (training, sweeps, job arrays)"),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bigbatch",
        description="Distributed large-batch training and what batch size does to training.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\n`bigbatch COMMAND --help` shows a command's options.",
    )
    p.add_argument("--version", action="version", version=f"bigbatch {__version__}")
    p.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0] in ("-h", "--help"):
        top.print_help()
        return 0 if argv else EXIT_USAGE
    if argv[0] == "--version":
        top.parse_args(argv)
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"bigbatch: error: unknown command {command!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USAGE
    module_name, help_ = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"bigbatch {command}", description=help_)
    try:
        module = importlib.import_module(module_name)
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.main(args) or 0)
    except UsageError as e:
        print(f"bigbatch {command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"bigbatch {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
