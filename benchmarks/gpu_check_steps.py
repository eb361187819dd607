"""The Python parts of benchmarks/gpu_check.sh: a generated JPEG folder, and the JSON summary.

    python benchmarks/gpu_check_steps.py jpegs DIR                 ImageNet layout, 2 classes, train + val
    python benchmarks/gpu_check_steps.py summary OUT --mode gpu|cpu-smoke --budget S --elapsed S

`summary` reads what the steps left under OUT (steps.tsv, logs/, the JSON files, the run folders),
decides pass / fail / skip per check, prints one JSON object and writes OUT/summary.json. It does
not import torch, so it takes no time. Exit 0 when no check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

RATIO_TARGET = 0.98  # bigbatch / bare loop (issue 18)
RESNET50_TARGET = 3000.0  # img/s, bf16, one H100/H200 (public H100 SXM figures: 2,616-2,791)


def make_jpegs(root: Path, per_class: int = 48, size: int = 80) -> None:
    """root/{train,val}/{a,b}/*.jpg: two classes DALI's reader labels 0 and 1, sizes that vary."""
    from PIL import Image

    for split, n in (("train", per_class), ("val", per_class // 4)):
        for c, cls in enumerate(("a", "b")):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (size + i % 7 * 3, size), color=(200 * c, 4 * i % 256, 120)).save(d / f"{i}.jpg")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = 6) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def _losses(run_dir: Path) -> list[float | None]:
    return [r["loss"] for r in _jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _finite(xs: list[float | None]) -> bool:
    return bool(xs) and all(x is not None and math.isfinite(x) for x in xs)


def check_pytest(out: Path, rc: str, mode: str) -> dict[str, Any]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    try:
        suite = ET.parse(out / "pytest-gpu.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in counts}
    except (OSError, ET.ParseError, AttributeError):
        pass
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ok = rc == "0" and (passed > 0 or mode == "cpu-smoke")  # on CPU every GPU test skips itself
    return {"ok": ok, "passed": passed, **counts}


def check_allreduce(out: Path, rc: str) -> dict[str, Any]:
    rows = _jsonl(out / "allreduce.jsonl")
    largest = max(rows, key=lambda r: r["bytes"]) if rows else {}
    return {"ok": rc == "0" and bool(rows) and all(r["correct"] for r in rows),
            "algos": sorted({r["algo"] for r in rows}), "rows": len(rows),
            "largest_bytes": largest.get("bytes"), "largest_time_us": largest.get("time_us")}


def check_throughput(out: Path, name: str, rc: str, expect_backend: str | None) -> dict[str, Any]:
    r = _json(out / f"{name}.json") or {}
    keys = ("device", "model", "batch", "image_size", "amp", "compile", "compile_backend", "bare_images_per_s",
            "bigbatch_images_per_s", "ratio_bigbatch_vs_bare", "ddp_1rank_images_per_s", "backend_1rank",
            "ratio_ddp_1rank_vs_bare", "flops_per_example", "peak_tflops", "mfu_bare", "mfu_bigbatch", "bigbatch_last_log")
    res = {k: r.get(k) for k in keys if k in r}
    ok = rc == "0" and bool(r.get("bare_images_per_s")) and bool(r.get("bigbatch_images_per_s"))
    ok = ok and bool(r.get("flops_per_example"))
    if expect_backend is not None:  # the one-rank DDP run went through the expected backend
        ok = ok and r.get("backend_1rank") == expect_backend and bool(r.get("ddp_1rank_images_per_s"))
    last = r.get("bigbatch_last_log") or {}
    ok = ok and all(k in last for k in ("time/data(s)", "time/compute(s)", "time/comm_exposed(s)", "time/step(s)"))
    return {"ok": ok, **res}


def check_fp16(out: Path, rc: str, mode: str) -> dict[str, Any]:
    run = out / "fp16-run"
    losses = _losses(run)
    summary = _json(run / "summary.json") or {}
    log = (run / "train.log").read_text() if (run / "train.log").exists() else ""
    amp = "fp16" if "amp torch.float16" in log else "bf16" if "amp torch.bfloat16" in log else None
    falls = _finite(losses) and losses[-1] < losses[0]
    ok = rc == "0" and summary.get("status") == "completed" and falls and amp == ("fp16" if mode == "gpu" else "bf16")
    return {"ok": ok, "amp": amp, "steps": summary.get("steps"), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "test_acc": summary.get("test_acc")}


def check_dali(out: Path, rcs: dict[str, str], mode: str) -> dict[str, Any]:
    if rcs.get("dali") == "not-installed":
        return {"ok": True, "skipped": "nvidia.dali does not import: " + _tail(out / "logs" / "dali-import.log", 1)}
    if rcs.get("dali_folder") != "0":
        return {"ok": False, "error": "generating the JPEG folder failed: " + _tail(out / "logs" / "dali_folder.log")}
    losses = _losses(out / "dali-run")
    trained = {"ok": rcs.get("dali") == "0" and _finite(losses), "steps": len(losses),
               "last_loss": losses[-1] if losses else None}
    if mode == "cpu-smoke" and rcs.get("dali") == "2":  # no GPU to decode on: a one-line refusal before any work
        log = _tail(out / "logs" / "dali.log", 3)
        return {"ok": "error: data.backend:" in log and "\n" not in log, "refused_without_gpu": log}
    return trained


def check_benchmark(out: Path, name: str, rc: str) -> dict[str, Any]:
    """optimizer_step / input_pipeline: ran and wrote its JSON; the ratios go to the summary."""
    r = _json(out / f"{name}.json") or {}
    res: dict[str, Any] = {"ok": rc == "0" and bool(r.get("ratios")),
                           "ratios": {k: v.get("median") for k, v in (r.get("ratios") or {}).items()}}
    if name == "optimizer_step":
        res.update(step_ms=r.get("step_ms_median"), met=r.get("met"))
    else:
        res.update(images_per_s={k: v.get("median") for k, v in (r.get("images_per_s") or {}).items()},
                   left_out=r.get("left_out"))
    return res


def summarize(out: Path, mode: str, budget: int, elapsed: int) -> dict[str, Any]:
    rcs, seconds = {}, {}
    for line in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []:
        name, rc, secs = line.split("\t")
        rcs[name], seconds[name] = rc, int(secs)
    backend = "nccl" if mode == "gpu" else "gloo"
    checks = {
        "pytest_gpu": check_pytest(out, rcs.get("pytest_gpu", "missing"), mode),
        "allreduce_1rank": check_allreduce(out, rcs.get("allreduce_1rank", "missing")),
        "throughput": check_throughput(out, "throughput", rcs.get("throughput", "missing"), backend),
        "throughput_compile": check_throughput(out, "throughput-compile", rcs.get("throughput_compile", "missing"), None),
        "fp16_scaler": check_fp16(out, rcs.get("fp16_scaler", "missing"), mode),
        "dali": check_dali(out, rcs, mode),
        "optimizer_step": check_benchmark(out, "optimizer_step", rcs.get("optimizer_step", "missing")),
        "input_pipeline": check_benchmark(out, "input_pipeline", rcs.get("input_pipeline", "missing")),
    }
    for name, c in checks.items():
        c["seconds"] = seconds.get(name)
        c["exit"] = rcs.get(name)
        if not c["ok"] and (log := out / "logs" / f"{name}.log").exists():
            c["log_tail"] = _tail(log)
    thr, comp = checks["throughput"], checks["throughput_compile"]
    targets = {}
    if mode == "gpu":
        best = max((c.get("bigbatch_images_per_s") or 0.0) for c in (thr, comp))
        targets = {
            f"ratio_bigbatch_vs_bare>={RATIO_TARGET}": {"eager": thr.get("ratio_bigbatch_vs_bare"),
                                                        "compile": comp.get("ratio_bigbatch_vs_bare")},
            f"resnet50_bf16_img_per_s>={RESNET50_TARGET:.0f}": best >= RESNET50_TARGET,
            "best_bigbatch_img_per_s": best,
            "optimizer_step<=1.5x_foreach": checks["optimizer_step"]["ratios"],
            "input_pipeline(torch,dali>=0.9x_bare;dali>=1.0x_torch)": checks["input_pipeline"]["ratios"],
        }
    raw = _json(out / "throughput.json") or {}
    try:
        torch_version = raw.get("torch") or metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    return {
        "benchmark": "gpu_check", "mode": mode, "ok": all(c["ok"] for c in checks.values()),
        "device": thr.get("device"), "torch": torch_version, "cuda": raw.get("cuda"), "python": platform.python_version(),
        "elapsed_s": elapsed, "budget_s": budget, "out": str(out), "checks": checks, "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    j = sub.add_parser("jpegs")
    j.add_argument("dir")
    s = sub.add_parser("summary")
    s.add_argument("out")
    s.add_argument("--mode", choices=("gpu", "cpu-smoke"), required=True)
    s.add_argument("--budget", type=int, required=True)
    s.add_argument("--elapsed", type=int, required=True)
    args = p.parse_args(argv)
    if args.cmd == "jpegs":
        make_jpegs(Path(args.dir))
        return 0
    out = Path(args.out)
    result = summarize(out, args.mode, args.budget, args.elapsed)
    text = json.dumps(result, indent=1)
    (out / "summary.json").write_text(text + "\n")
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
