"""What the timing benchmarks (optimizer_step.py, input_pipeline.py) share: a ratio's spread over
repeats, and one JSON object with the machine it came from, printed and optionally written."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

import torch


def spread(xs: list[float]) -> dict:
    """Median, min, max and every value (rounded) of per-repeat numbers."""
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4),
            "per_repeat": [round(x, 4) for x in xs]}


def emit(result: dict, device: torch.device, json_path: str | None) -> None:
    """Print `result` with the machine's description; also write it to `json_path` if given."""
    result = {**result, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "cpu": platform.processor() or platform.machine(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        Path(json_path).write_text(text + "\n")
