"""Rendered sbatch scripts: golden files for the multi-node GPU, CPU-only, array and Ray-sweep
variants; CPUs, memory and any other sbatch option reach the script; the config travels inside
it as submitted; no config value, path, override, variable, job name or sbatch option can run
shell commands; bad input is one line and exit code 2. (Submitting to a real cluster: tests/slurm.)

Regenerate the golden files after an intended template change:
    BIGBATCH_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_slurm_render.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bigbatch.cli import main
from bigbatch.errors import UsageError
from bigbatch.launch import jobspec, slurm

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "slurm" / "golden"
MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")

SWEEP = """name = "tiny"
base = "{base}"
overrides = ["data.name='digits'"]
batch_sizes = [32, 64]
lr_multipliers = [1.0, 2.0]
[target]
test_acc = 0.5
[trial]
max_steps = 40
"""

VARIANTS = {
    "train-gpu-multinode": ["render", MLP, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                            "--account", "proj-1", "--time", "2-00:00:00", "--set", "batch.global_batch=4096",
                            "--set", "optim.name=lars", "--env", "NCCL_SOCKET_IFNAME=ib0", "--out", "/scratch/runs/r1",
                            "--container-image", "nvcr.io#nvidia/pytorch:24.10-py3",
                            "--container-mounts", "/scratch:/scratch,/data:/data", "--python", "python",
                            "--sbatch-opt", "qos=high", "--sbatch-opt", "constraint=a100&ib", "--sbatch-opt", "exclusive"],
    "train-cpu": ["render", MLP, "--gpus-per-node", "0", "--procs-per-node", "4", "--time", "30", "--job-name", "cpu-job",
                  "--signal", "TERM", "--signal-time", "120", "--log-dir", "/scratch/logs"],
    "array": ["array", "{sweep}", "--out", "/scratch/sweeps/tiny", "--max-parallel", "2", "--print"],
    "sweep-ray": ["submit-sweep", "{sweep}", "--nodes", "2", "--cpus-per-task", "16", "--gpus-per-node", "4",
                  "--out", "/scratch/sweeps/ray", "--print"],
}


@pytest.fixture
def sweep_file(tmp_path):
    p = tmp_path / "sweep.toml"
    p.write_text(SWEEP.format(base=MLP))
    return p


def _render(capsys, argv) -> str:
    assert main(["slurm", *argv]) == 0
    return capsys.readouterr().out


def _normalise(text: str, sweep: Path) -> str:
    return text.replace(str(sweep), "<SWEEP>").replace(str(ROOT), "<REPO>")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_script_matches_golden_file(capsys, sweep_file, variant):
    argv = [a.replace("{sweep}", str(sweep_file)) for a in VARIANTS[variant]]
    raw = _render(capsys, argv)
    assert subprocess.run(["bash", "-n"], input=raw, text=True).returncode == 0  # valid bash
    text = _normalise(raw, sweep_file)
    golden = GOLDEN / f"{variant}.sbatch"
    if os.environ.get("BIGBATCH_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), f"{variant}: rendered script differs from {golden} (see the module docstring)"


def test_gpu_and_cpu_variants_ask_for_what_they_run(capsys):
    gpu = _render(capsys, ["render", MLP, "--nodes", "2", "--gpus-per-node", "4"])
    assert "#SBATCH --gpus-per-node=4" in gpu and "NPROC_PER_NODE=4" in gpu
    assert "#SBATCH --cpus-per-task=4\n" in gpu and "#SBATCH --mem=0\n" in gpu  # in-memory data: a CPU per rank
    assert 'srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 "${SRUN_CPUS[@]}"' in gpu
    cpu = _render(capsys, ["render", MLP, "--gpus-per-node", "0", "--procs-per-node", "3", "--set", "batch.global_batch=129"])
    assert "--gpus-per-node" not in cpu and "#SBATCH --cpus-per-task=3" in cpu and "NPROC_PER_NODE=3" in cpu
    assert "#SBATCH --signal=B:USR2@90" in gpu and "#SBATCH --requeue" in gpu and "%j.out" in gpu
    assert 'scontrol requeue "$SLURM_JOB_ID"' in gpu and "--auto-resume" in gpu
    assert 'trap "on_stop_signal TERM" TERM' in gpu  # SIGTERM (preemption, scancel --full) as well as USR2


def test_gpu_jobs_ask_for_cpus_per_dataloader_worker_and_memory(capsys):
    """8 ranks reading an image folder with 6 workers each: 8 x (1 + 6) CPUs; explicit values win."""
    image = ["--set", "data.name='imagefolder'", "--set", "data.root='/data/imagenet'", "--set", "data.num_workers=6",
             "--set", "batch.global_batch=256"]
    out = _render(capsys, ["render", MLP, "--gpus-per-node", "8", *image])
    assert "#SBATCH --cpus-per-task=56\n" in out and "#SBATCH --mem=0\n" in out
    out = _render(capsys, ["render", MLP, "--gpus-per-node", "8", "--cpus-per-task", "96", "--mem", "500G", *image])
    assert "#SBATCH --cpus-per-task=96\n" in out and "#SBATCH --mem=500G\n" in out
    cpu = _render(capsys, ["render", MLP, "--procs-per-node", "2"])
    assert "#SBATCH --cpus-per-task=2\n" in cpu and "--mem" not in cpu.split("#\n")[0]


def test_sbatch_opts_reach_the_script_and_the_collector(tmp_path):
    """--sbatch-opt lines, time limit, partition, --env and the container reach the array's collector job too."""
    job = slurm.JobSpec(job_name="tiny", time="1:00:00", partition="gpu", account="p1", env=[("A", "x y")],
                        sbatch_opts=[("qos", "high"), ("exclusive", None)], container_image="img.sqsh")
    script = slurm.render_collector(job, "afterany:12", str(tmp_path / "sw"))
    for line in ("#SBATCH --time=1:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=p1", "#SBATCH --qos=high",
                 "#SBATCH --exclusive", "#SBATCH --dependency=afterany:12", "#SBATCH --ntasks=1", "export A='x y'"):
        assert line + "\n" in script, line
    assert 'srun --ntasks=1 "${SRUN_ARGS[@]}" "$PYTHON" "-m" "bigbatch" "slurm" "collect" "$SWEEP_DIR"' in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_the_job_trains_the_config_as_submitted(tmp_path, capsys):
    """The resolved config (with --set) is inside the script: the job writes it to the run folder
    and trains it, so editing the file after submitting changes nothing (tests/slurm runs it)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(Path(MLP).read_text())
    script = _render(capsys, ["render", str(cfg), "--set", "batch.global_batch=64", "--out", str(tmp_path / "run")])
    cfg.write_text(Path(MLP).read_text().replace("global_batch = 128", "global_batch = 96"))
    work = tmp_path / "work"
    work.mkdir()
    code = script[:script.index("\n# Preemption and time limits")] + '\nprintf "%s" "$CONFIG"'
    written = _eval_in_bash(code, work, {"SLURM_JOB_ID": "7"})
    from bigbatch import config as config_mod

    assert written == str(tmp_path / "run" / "submitted-config.toml")
    assert config_mod.load(written).batch.global_batch == 64
    assert '"$CONFIG" --out "$RUN_DIR" --auto-resume' in script and str(cfg) not in script


# --- injection ------------------------------------------------------------------------------

EVIL = ["$(touch PWNED)", "`touch PWNED`", "x'; touch PWNED; echo '", 'x"; touch PWNED; "', "a\nb", "${HOME}", "*"]


def _settings(script: str) -> str:
    start = script.index("# --- job settings")
    return script[start:script.index("# --- end of job settings")]


def _eval_in_bash(code: str, cwd: Path, env: dict[str, str]) -> str:
    """Run code in bash with a PATH that holds only head, sed and awk (no SLURM tools)."""
    tools = cwd.parent / "tools"
    if not tools.exists():
        tools.mkdir()
        for name in ("head", "sed", "awk", "mkdir", "cat"):
            (tools / name).symlink_to(shutil.which(name))
    out = subprocess.run(["/bin/bash", "-c", code], cwd=cwd, env={"PATH": str(tools), **env},
                         capture_output=True, text=True, check=True, timeout=30)
    return out.stdout


def test_no_value_can_inject_shell(tmp_path, capsys):
    """Config path, run folder, overrides and --env values reach bash as literal strings."""
    evil_dir = tmp_path / "dir $(touch PWNED) `touch PWNED` 'q' \"d\""
    evil_dir.mkdir()
    cfg = evil_dir / "c;touch PWNED.toml"
    cfg.write_text(Path(MLP).read_text())
    overrides = [f"track.project={e}" for e in EVIL] + ["track.tags=['$(touch PWNED)']"]
    argv = ["render", str(cfg), "--out", str(evil_dir / "run $(touch PWNED)"), "--nodes", "2"]
    argv += [a for o in overrides for a in ("--set", o)]
    argv += ["--env", "EVIL_A=$(touch PWNED)", "--env", "EVIL_B=x'\n touch PWNED"]
    argv += ["--container-image", "img;$(touch PWNED)", "--container-mounts", "/a:/b `touch PWNED`"]
    script = _render(capsys, argv)
    work = tmp_path / "work"
    work.mkdir()
    # Everything the script does before it launches (settings, exports, the config's copy).
    prefix = script[:script.index("\n# Preemption and time limits")]
    code = prefix + '\nprintf "%s\\0" "$CONFIG" "$RUN_DIR" "$EVIL_A" "$EVIL_B" "${SRUN_ARGS[@]}" "${TRAIN_ARGS[@]}"'
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_SUBMIT_DIR": str(work)}
    values = _eval_in_bash(code, work, env).split("\0")[:-1]
    run_dir = evil_dir / "run $(touch PWNED)"
    assert values[:4] == [str(run_dir / "submitted-config.toml"), str(run_dir), "$(touch PWNED)", "x'\n touch PWNED"]
    assert values[4:] == ["--container-image=img;$(touch PWNED)", "--container-workdir=" + str(work),
                          "--container-mounts=/a:/b `touch PWNED`"]
    from bigbatch import config as config_mod  # the overrides arrive verbatim, in the config's copy

    written = config_mod.load(run_dir / "submitted-config.toml")
    assert written == config_mod.load(cfg, overrides) and written.track.project == EVIL[-1]
    assert not list(work.iterdir()) and not (evil_dir / "PWNED").exists() and not (tmp_path / "PWNED").exists()
    for line in script.splitlines():  # #SBATCH lines hold validated words only
        if line.startswith("#SBATCH"):
            assert re.fullmatch(r"#SBATCH --[a-z-]+(=[A-Za-z0-9._,/@%:+=&|!*()\[\]<>~^?-]+)?", line), line


@pytest.mark.parametrize("argv, field", [
    (["--job-name", "x\n#SBATCH --wrap=touch PWNED"], "--job-name"),
    (["--job-name", "a;b"], "--job-name"),
    (["--job-name=-x"], "--job-name"),
    (["--partition", "gpu --wrap=id"], "--partition"),
    (["--account", "a b"], "--account"),
    (["--log-dir", "logs $(id)"], "--log-dir"),
    (["--env", "A B=1"], "--env"),
    (["--env", "NOEQUALS"], "--env"),
    (["--set", "name=a;touch PWNED"], "name"),
    (["--sbatch-opt", "qos=high\n#SBATCH --wrap=id"], "--sbatch-opt"),
    (["--sbatch-opt", "comment=a b"], "--sbatch-opt"),
    (["--sbatch-opt", "comment=$(id)"], "--sbatch-opt"),
    (["--sbatch-opt", "qos high"], "--sbatch-opt"),
    (["--sbatch-opt", "time=10"], "--sbatch-opt"),  # bigbatch's own option says so
    (["--sbatch-opt=--wrap=id"], "--sbatch-opt"),
    (["--mem", "lots"], "--mem"),
])
def test_unsafe_sbatch_words_are_refused(capsys, argv, field):
    rc = main(["slurm", "render", MLP, *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and f"error: {field}:" in err, err


def test_array_task_picks_its_trial_config_literally(tmp_path, sweep_file):
    """The array script maps SLURM_ARRAY_TASK_ID to trial-<i>.toml and runs/<trial name>."""
    out = tmp_path / "sweep $(touch PWNED)"
    n, names = slurm.prepare_array(str(sweep_file), str(out))
    assert n == 4 and names == ["b32-lr1-s0", "b32-lr2-s0", "b64-lr1-s0", "b64-lr2-s0"]
    job = slurm.JobSpec(job_name="tiny")
    script = slurm.render_array(str(out), n, job, None)
    assert "#SBATCH --array=0-3\n" in script
    code = _settings(script) + '\nprintf "%s\\0" "$CONFIG" "$RUN_DIR"'
    work = tmp_path / "work"
    work.mkdir()
    config, run_dir = _eval_in_bash(code, work, {"SLURM_ARRAY_TASK_ID": "2"}).split("\0")[:2]
    assert config == str(out / "slurm" / "trial-2.toml") and run_dir == str(out / "runs" / "b64-lr1-s0")
    from bigbatch import config as config_mod

    cfg = config_mod.load(config)
    assert cfg.batch.global_batch == 64 and cfg.train.steps == 40 and cfg.data.name == "digits"
    assert not (tmp_path / "PWNED").exists()


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, expect", [
    (["--nodes", "0"], "--nodes: must be an integer >= 1, got 0"),
    (["--nodes", "-2"], "--nodes: must be an integer >= 1"),
    (["--time", "1:2:3:4"], "--time: expected minutes"),
    (["--time", "ten"], "--time: expected minutes"),
    (["--time", "10:75"], "--time: seconds must be < 60"),
    (["--time", "1-25"], "--time: hours must be < 24"),
    (["--time", "0"], "--time: must be a positive time limit"),
    (["--time", "1"], "--time: '1' is not longer than --signal-time 90"),
    (["--gpus-per-node", "2", "--procs-per-node", "4"], "--procs-per-node"),
    (["--procs-per-node", "3"], "batch.global_batch: global batch 128 is not divisible by world size 3"),
    (["--set", "checkpoint.stop_within_s=45"], "checkpoint.stop_within_s: 45 s leaves no time"),
    (["--set", "checkpoint.stop_within_s=20", "--signal-time", "15"], "checkpoint.stop_within_s: 20 s"),
])
def test_bad_job_options_are_one_line_exit_2(capsys, argv, expect):
    rc = main(["slurm", "render", MLP, *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and expect in err, err


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("5:30", 330), ("1:00:00", 3600), ("2-0", 172800),
                                           ("1-2:03", 93780), ("1-02:03:04", 93784)])
def test_time_limit_formats(text, seconds):
    assert jobspec.time_limit_seconds(text) == seconds


def test_time_limit_rejects_garbage():
    with pytest.raises(UsageError, match="--time"):
        jobspec.time_limit_seconds("1:2:3:4")


def test_sbatch_missing_is_exit_2(tmp_path):
    """Without sbatch on PATH: one line naming sbatch and how to get it, exit 2, nothing written."""
    env = {k: v for k, v in os.environ.items() if k != "PATH"}
    env["PATH"] = str(Path(sys.executable).parent)  # the venv's bin: python, no SLURM tools
    for argv in (["submit", MLP], ["status"], ["cancel", "12"]):
        proc = subprocess.run([sys.executable, "-m", "bigbatch", "slurm", *argv], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and "\n" not in err, err
        assert "not found on PATH" in err and "slurm" in err, err
    assert not (tmp_path / "slurm-logs").exists()


def test_sweep_jobs_refuse_what_they_cannot_run(capsys, sweep_file):
    """Array tasks must split every trial's batch; the Ray job runs on the nodes, not in a container."""
    for argv, expect in (
        (["array", str(sweep_file), "--out", "/tmp/x", "--procs-per-node", "3", "--print"],
         "batch.global_batch: global batch 32 is not divisible by world size 3"),
        (["array", str(sweep_file), "--out", "/tmp/x", "--nodes", "2", "--print"], "--nodes:"),
        (["submit-sweep", str(sweep_file), "--container-image", "img", "--print"], "--container-image:"),
    ):
        rc = main(["slurm", *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and expect in err, err


def test_slurm_commands_start_without_torch():
    """`bigbatch slurm cancel --signal USR2` must reach a job while it still trains: the launch
    module imports the sweep (and with it torch) only for the sweep subcommands."""
    import subprocess
    import sys

    code = "import sys, bigbatch.launch.slurm; print('torch' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"
