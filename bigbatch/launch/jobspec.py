"""What a SLURM job asks for (`JobSpec`: nodes, GPUs, CPUs, memory, time, partition, any other
sbatch option, ...), checked so that every value written into an `#SBATCH` line is safe, and the
filling of the sbatch templates (package data: bigbatch/launch/templates/). Values that reach the shell part of a script are quoted with `shlex.quote` (`assign`,
`bash_array`); values that reach `#SBATCH` lines (which sbatch reads without a shell) must match
a strict pattern. Bad input is a `UsageError` naming the option.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from bigbatch.errors import UsageError

# The templates ship inside the package (a non-editable install has them); BIGBATCH_SLURM_TEMPLATES
# points at a folder of your own versions instead.
TEMPLATE_DIR = Path(os.environ.get("BIGBATCH_SLURM_TEMPLATES", Path(__file__).resolve().parent / "templates"))

# Patterns for values written into #SBATCH lines. sbatch parses those lines itself (no shell),
# so a value must not be able to end the option or start another one.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PARTITION = re.compile(r"[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*")
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+@=,-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
JOB_ID = re.compile(r"\d+(_\d+)?")
# --mem: a SLURM size (0 = all of each node's memory)
_MEM = re.compile(r"\d+[KMGT]?")
# --sbatch-opt: an option name, and a value of the characters SLURM's own expressions use
# (constraints "a100&ib", "[rack1|rack2]", licenses "fs:2", dependencies "afterok:1?afterok:2")
# but no space, quote, '#', '$' or newline: the line is read by sbatch, which has no quoting
_OPT_NAME = re.compile(r"[a-z][a-z0-9-]*")
_OPT_VALUE = re.compile(r"[A-Za-z0-9_.,:=@%+/&|!*()\[\]<>~^?-]+")
# what bigbatch writes itself: given through its own options, never twice
MANAGED = {"job-name": "--job-name", "nodes": "--nodes", "ntasks-per-node": "--procs-per-node",
           "ntasks": "--procs-per-node", "cpus-per-task": "--cpus-per-task", "gpus-per-node": "--gpus-per-node",
           "mem": "--mem", "partition": "--partition", "account": "--account", "time": "--time",
           "array": "bigbatch slurm array", "output": "--log-dir", "error": "--log-dir", "open-mode": "--log-dir",
           "signal": "--signal", "requeue": "--max-requeues", "no-requeue": "--max-requeues",
           "dependency": "bigbatch slurm array", "wrap": "(a job script)"}
# SLURM --time: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
_TIME = re.compile(r"(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)")
SIGNALS = ("USR2", "TERM")


def time_limit_seconds(text: str) -> int:
    """Seconds of a SLURM --time value; UsageError naming --time when malformed."""
    m = _TIME.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        raise UsageError("--time", f"expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS; got {text!r}")
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "d" in g:
        parts = [("hours", g["dh"], 24), ("minutes", g.get("dm", 0), 60), ("seconds", g.get("ds", 0), 60)]
        total = g["d"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)
    elif "c" in g:  # H:M:S
        parts = [("minutes", g["b"], 60), ("seconds", g["c"], 60)]
        total = g["a"] * 3600 + g["b"] * 60 + g["c"]
    elif "b" in g:  # M:S
        parts = [("seconds", g["b"], 60)]
        total = g["a"] * 60 + g["b"]
    else:
        parts, total = [], g["a"] * 60
    for unit, value, limit in parts:
        if value >= limit:
            raise UsageError("--time", f"{unit} must be < {limit} in {text!r}")
    if total <= 0:
        raise UsageError("--time", f"must be a positive time limit, got {text!r}")
    return total


def match_pattern(pattern: re.Pattern, value: str, key: str, expected: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise UsageError(key, f"expected {expected}; got {value!r}")
    return value


@dataclass
class JobSpec:
    """What the allocation looks like: everything that becomes an #SBATCH line or a job setting."""

    job_name: str
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: int | None = None
    """Training processes per node (torchrun --nproc-per-node): default gpus_per_node, or 1 on CPU."""
    cpus_per_task: int | None = None
    """CPUs of the one task per node: default procs_per_node x cpus_per_proc."""
    cpus_per_proc: int = 1
    """CPUs one training process uses: 1 + its DataLoader workers (or DALI threads), from the config."""
    mem: str | None = None
    """--mem per node (a SLURM size); GPU jobs default to 0, all of each node's memory."""
    sbatch_opts: list[tuple[str, str | None]] = field(default_factory=list)
    """Any other sbatch option: (name, value or None for a flag), e.g. ("qos", "high"), ("exclusive", None)."""
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    signal: str = "USR2"
    signal_time: int = 90
    """Seconds before the time limit at which SLURM sends `signal` to the batch script."""
    max_requeues: int = 20
    log_dir: str = "slurm-logs"
    python: str = "python3"
    env: list[tuple[str, str]] = field(default_factory=list)
    container_image: str | None = None
    """pyxis/enroot: run the training steps in this image (srun --container-image)."""
    container_mounts: str | None = None
    """pyxis: SRC:DST[,SRC:DST...] mounted into the container (data, run folders)."""

    def __post_init__(self) -> None:
        match_pattern(_NAME, self.job_name, "--job-name", "letters, digits, '.', '_' or '-' (at most 128, not starting with a symbol)")
        for key, v, low in (("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 0),
                            ("--signal-time", self.signal_time, 1), ("--max-requeues", self.max_requeues, 0)):
            if not isinstance(v, int) or v < low:
                raise UsageError(key, f"must be an integer >= {low}, got {v!r}")
        if self.procs_per_node is None:
            self.procs_per_node = self.gpus_per_node or 1
        if self.procs_per_node < 1:
            raise UsageError("--procs-per-node", f"must be >= 1, got {self.procs_per_node}")
        if self.gpus_per_node and self.procs_per_node > self.gpus_per_node:
            raise UsageError("--procs-per-node", f"{self.procs_per_node} processes would share {self.gpus_per_node} GPUs; "
                                                 "use at most one process per GPU")
        if self.cpus_per_task is None:  # srun no longer passes --cpus-per-task on by itself (Slurm 22.05)
            self.cpus_per_task = self.procs_per_node * max(1, self.cpus_per_proc)
        if self.cpus_per_task < 1:
            raise UsageError("--cpus-per-task", f"must be >= 1, got {self.cpus_per_task}")
        if self.mem is None and self.gpus_per_node:
            self.mem = "0"
        if self.mem is not None:
            match_pattern(_MEM, self.mem, "--mem", "a size such as 64G, 500000M or 0 (all of each node's memory)")
        for name, value in self.sbatch_opts:
            match_pattern(_OPT_NAME, name, "--sbatch-opt", "NAME[=VALUE] with NAME an sbatch long option such as qos")
            if name in MANAGED:
                raise UsageError("--sbatch-opt", f"{name!r} is set by bigbatch; use {MANAGED[name]}")
            if value is not None:
                match_pattern(_OPT_VALUE, value, "--sbatch-opt",
                              f"a value for --{name} without spaces, quotes, '#', '$' or newlines")
        if self.partition is not None:
            match_pattern(_PARTITION, self.partition, "--partition", "a partition name (letters, digits, '.', '_', '-'; comma-separated)")
        if self.account is not None:
            match_pattern(_NAME, self.account, "--account", "an account name (letters, digits, '.', '_', '-')")
        if self.signal not in SIGNALS:
            raise UsageError("--signal", f"expected one of {', '.join(SIGNALS)}; got {self.signal!r}")
        if self.time is not None and time_limit_seconds(self.time) <= self.signal_time:
            raise UsageError("--time", f"{self.time!r} is not longer than --signal-time {self.signal_time} s: "
                                       "the job would be signalled as it starts")
        match_pattern(_SAFE_PATH, self.log_dir, "--log-dir",
               "a path of letters, digits and ./_-+@=, (it goes into an #SBATCH line, which has no quoting)")
        if not self.python:
            raise UsageError("--python", "must not be empty")
        for name, _ in self.env:
            match_pattern(_ENV_NAME, name, "--env", "NAME=VALUE with NAME a shell variable name")

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def _site_lines(self) -> list[str]:
        """Partition, account, time limit and the pass-through options: the job's and its collector's."""
        lines = [f"--partition={self.partition}"] if self.partition else []
        lines += [f"--account={self.account}"] if self.account else []
        lines += [f"--time={self.time}"] if self.time else []
        return lines + [f"--{name}" + (f"={value}" if value is not None else "") for name, value in self.sbatch_opts]

    def header(self, array: str | None = None) -> str:
        """The #SBATCH lines (values validated in __post_init__)."""
        lines = [f"--job-name={self.job_name}", f"--nodes={self.nodes}", "--ntasks-per-node=1",
                 f"--cpus-per-task={self.cpus_per_task}"]
        if self.gpus_per_node:
            lines.append(f"--gpus-per-node={self.gpus_per_node}")
        lines += [f"--mem={self.mem}"] if self.mem is not None else []
        lines += self._site_lines()
        if array:
            lines += [f"--array={array}", f"--output={self.log_dir}/%x-%A_%a.out"]
        else:
            lines.append(f"--output={self.log_dir}/%x-%j.out")
        lines += ["--open-mode=append", f"--signal=B:{self.signal}@{self.signal_time}", "--requeue"]
        return "\n".join(f"#SBATCH {line}" for line in lines)

    def collector_header(self, dependency: str) -> str:
        """#SBATCH lines of an array's collector job: one task, the job's time, partition, account and
        site options, after `dependency`."""
        lines = [f"--job-name={self.job_name}-collect", "--nodes=1", "--ntasks=1", "--cpus-per-task=1",
                 *self._site_lines(), f"--dependency={dependency}", f"--output={self.log_dir}/%x-%j.out"]
        return "\n".join(f"#SBATCH {line}" for line in lines)

    def srun_args(self) -> str:
        """Extra srun options of the training step (pyxis container), as a bash array."""
        args = []
        if self.container_image:
            args += [shlex.quote(f"--container-image={self.container_image}"), '--container-workdir="$SLURM_SUBMIT_DIR"']
        if self.container_mounts:
            args.append(shlex.quote(f"--container-mounts={self.container_mounts}"))
        return "SRUN_ARGS=(" + " ".join(args) + ")"

    def user_env(self) -> str:
        return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in self.env)


def assign(name: str, value: str | int) -> str:
    return f"{name}={shlex.quote(str(value))}"


def bash_array(name: str, items: list[str]) -> str:
    return f"{name}=(" + " ".join(shlex.quote(i) for i in items) + ")"


def fill(template: str, values: dict[str, str]) -> str:
    """Replace {{key}} placeholders; every placeholder must be given and every value used."""
    path = TEMPLATE_DIR / template
    if not path.is_file():
        raise UsageError("BIGBATCH_SLURM_TEMPLATES", f"sbatch template {str(path)!r} not found (unset it to use the "
                                                     "templates installed with bigbatch, or point it at a folder with your own)")
    text = path.read_text()
    used = set(re.findall(r"\{\{(\w+)\}\}", text))
    if used != set(values):
        raise RuntimeError(f"template {template}: placeholders {sorted(used)} != values {sorted(values)}")  # a bug here
    for k, v in values.items():
        text = text.replace("{{" + k + "}}", v)
    return text.replace("\n\n\n", "\n\n")


HEREDOC_END = "BIGBATCH_CONFIG_END"


def heredoc(path_expr: str, text: str) -> str:
    """Shell lines that write `text` verbatim to the file at `path_expr` (a quoted here-document:
    nothing in it is expanded)."""
    if any(line.strip() == HEREDOC_END for line in text.splitlines()):
        raise UsageError("config", f"a line of the config is {HEREDOC_END!r}, which ends the job script's copy of it")
    return f"cat > {path_expr} <<'{HEREDOC_END}'\n{text.rstrip()}\n{HEREDOC_END}"


def abs_path(path: str | os.PathLike) -> str:
    return str(Path(path).expanduser().resolve())


def cpus_per_proc(data_cfg) -> int:
    """CPUs one training process keeps busy: itself, plus its DataLoader workers (image folders and
    "module:function" datasets read through a DataLoader) or DALI threads; in-memory data adds none."""
    from bigbatch.trainer.data import LOADERS  # deferred: torch (`bigbatch slurm cancel` must start fast)

    through_loader = data_cfg.backend == "dali" or data_cfg.name == "imagefolder" or data_cfg.name not in LOADERS
    return 1 + (data_cfg.num_workers if through_loader else 0)


def render_collector(job: JobSpec, dependency: str, out: str) -> str:
    """The array's collector job: `bigbatch slurm collect SWEEP_DIR` with the array's time limit,
    partition, account, site options, --env and container (through srun, as the trials ran)."""
    collect = ["$PYTHON", "-m", "bigbatch", "slurm", "collect", "$SWEEP_DIR"]
    run = " ".join(f'"{w}"' for w in collect)
    if job.container_image:
        run = 'srun --ntasks=1 "${SRUN_ARGS[@]}" ' + run
    lines = ["#!/bin/bash", job.collector_header(dependency), "",
             assign("SWEEP_DIR", abs_path(out)), assign("PYTHON", job.python), job.srun_args(), job.user_env(),
             run, ""]
    return "\n".join(line for line in lines if line is not None)
