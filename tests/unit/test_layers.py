"""The layers point one way: import-linter's contracts (pyproject.toml) hold, an upward import
breaks them naming the line, every module imports on its own, and no function-local import of
bigbatch hides a cycle (the few that remain defer torch or Ray in command-line entry points)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))

# (module file, imported module): deferred so that `--help` and bad-input errors do not wait for torch
DEFERRED = {
    ("bigbatch/trainer/main.py", "bigbatch.trainer.data"),
    ("bigbatch/trainer/main.py", "bigbatch.trainer"),  # trainer.stop: torch
    ("bigbatch/trainer/main.py", "bigbatch.trainer.recipe"),
    ("bigbatch/trainer/main.py", "bigbatch.trainer.rundir"),
    ("bigbatch/trainer/main.py", "bigbatch.trainer.loop"),
    ("bigbatch/trainer/main.py", "bigbatch.distributed.env"),
    ("bigbatch/trainer/main.py", "bigbatch.distributed"),
    ("bigbatch/distributed/bench.py", "bigbatch.distributed"),
    ("bigbatch/distributed/bench.py", "bigbatch.distributed.allreduce"),
    ("bigbatch/distributed/bench.py", "bigbatch.distributed.env"),
    ("bigbatch/study/sweep.py", "bigbatch.study.trial"),
    ("bigbatch/study/sweep.py", "bigbatch.study.at_target"),
    ("bigbatch/trainer/main.py", "bigbatch.trainer.checkpoint"),
    ("bigbatch/trainer/main.py", "bigbatch.trainer.preflight"),
    ("bigbatch/study/spec.py", "bigbatch.trainer.preflight"),
    ("bigbatch/launch/slurm.py", "bigbatch.trainer.preflight"),
    ("bigbatch/launch/jobspec.py", "bigbatch.trainer.data"),  # LOADERS: torch
    ("bigbatch/launch/slurm.py", "bigbatch.study"),
    ("bigbatch/launch/slurm.py", "bigbatch.study.spec"),
    ("bigbatch/launch/slurm.py", "bigbatch.study.sweep"),
    ("bigbatch/launch/slurm.py", "bigbatch.study.records"),
    ("bigbatch/launch/slurm.py", "bigbatch.study.report"),
    ("bigbatch/launch/slurm.py", "bigbatch.study.at_target"),
    ("bigbatch/launch/slurm.py", "bigbatch.study.trial"),
}


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_import_contracts_hold():
    p = lint(ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout


def test_an_upward_import_breaks_the_contract_naming_the_line(tmp_path):
    shutil.copytree(ROOT / "bigbatch", tmp_path / "bigbatch", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    noise = tmp_path / "bigbatch" / "measure" / "noise.py"
    noise.write_text(noise.read_text() + "\nfrom bigbatch.trainer import loop  # upward\n")
    p = lint(tmp_path)
    assert p.returncode != 0
    assert "BROKEN" in p.stdout and "bigbatch.measure.noise -> bigbatch.trainer.loop" in p.stdout


def test_every_module_imports_on_its_own():
    modules = sorted(".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                     for f in (ROOT / "bigbatch").rglob("*.py") if f.name != "__main__.py")
    # each module from a clean slate of bigbatch modules (torch stays loaded: it is not ours)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n"
        "    for k in [k for k in sys.modules if k == 'bigbatch' or k.startswith('bigbatch.')]:\n"
        "        del sys.modules[k]\n"
        "    importlib.import_module(m)\n"
        "print('ok', len(" + repr(modules) + "))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(modules) > 40


def test_no_function_local_bigbatch_import_hides_a_cycle():
    local = set()
    for f in sorted((ROOT / "bigbatch").rglob("*.py")):
        tree = ast.parse(f.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bigbatch"):
                    local.add((str(f.relative_to(ROOT)), node.module))
                elif isinstance(node, ast.Import):
                    local.update((str(f.relative_to(ROOT)), a.name) for a in node.names if a.name.startswith("bigbatch"))
    assert local <= DEFERRED, sorted(local - DEFERRED)
