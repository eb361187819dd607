"""benchmarks/gpu_check.sh --cpu-smoke: the prepared GPU script runs every step tiny on the CPU
and its one JSON summary says every check passed, with everything under one output folder.

Not marked gpu: it runs in CI on the CPU, so the script cannot rot before a GPU runs it.
"""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CHECKS = {"pytest_gpu", "allreduce_1rank", "throughput", "throughput_compile", "fp16_scaler", "dali", "optimizer_step",
          "input_pipeline"}


def test_cpu_smoke_runs_every_check_and_prints_one_json_summary(tmp_path):
    out = tmp_path / "check"
    p = subprocess.run([str(SCRIPT), "--cpu-smoke", "--out", str(out), "--budget", "900"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=1000)
    summary = json.loads(p.stdout)  # stdout is exactly the summary; progress goes to stderr
    failed = {k: v for k, v in summary["checks"].items() if not v["ok"]}
    assert p.returncode == 0 and summary["ok"], (failed, p.stderr[-2000:])
    assert summary["mode"] == "cpu-smoke" and set(summary["checks"]) == CHECKS
    assert summary == json.loads((out / "summary.json").read_text())
    c = summary["checks"]
    assert c["pytest_gpu"]["tests"] >= 3  # tests/gpu and the DALI sharding test, skipped without CUDA
    assert set(c["allreduce_1rank"]["algos"]) == {"builtin", "ring", "torus2d", "hierarchical"}
    thr = c["throughput"]
    assert thr["backend_1rank"] == "gloo" and thr["ddp_1rank_images_per_s"] > 0
    assert thr["flops_per_example"] > 0 and 0 < thr["mfu_bigbatch"] < 1
    assert {"time/data(s)", "time/compute(s)", "time/comm_exposed(s)", "time/step(s)", "mfu"} <= set(thr["bigbatch_last_log"])
    assert c["throughput_compile"]["compile"] and c["throughput_compile"]["compile_backend"] == "eager"
    assert c["fp16_scaler"]["last_loss"] < c["fp16_scaler"]["first_loss"]
    assert set(c["optimizer_step"]["ratios"]) == {"lars/sgd_foreach", "larc/sgd_foreach", "lamb/adamw_foreach"}
    assert all(v > 0 for v in c["optimizer_step"]["ratios"].values())
    assert {"torch/bare@1"} <= set(c["input_pipeline"]["ratios"]) and c["input_pipeline"]["images_per_s"]["bare@1"] > 0
    # everything under the one folder: logs, results, the run folders
    for f in ("steps.tsv", "pytest-gpu.xml", "allreduce.jsonl", "throughput.json", "throughput-compile.json",
              "throughput/bigbatch/metrics.jsonl", "throughput/ddp-1rank/run/metrics.jsonl", "fp16-run/summary.json",
              "optimizer_step.json", "input_pipeline.json"):
        assert (out / f).is_file(), f
    assert sorted(x.name for x in tmp_path.iterdir()) == ["check"]


def test_bad_argument_is_one_line_exit_2_and_creates_nothing(tmp_path):
    p = subprocess.run([str(SCRIPT), "--budget", "soon", "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--budget" in p.stderr
    assert not (tmp_path / "o").exists()
