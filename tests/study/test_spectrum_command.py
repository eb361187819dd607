"""`bigbatch spectrum RUN_DIR` end to end on a tiny BatchNorm CNN run, against the dense Hessian.

--over-training: the same on a run that kept three checkpoints, each against its own dense Hessian.

The run: the MNIST-1D CNN config on a small synthetic task (4 classes, 236 parameters), trained
40 steps at batch 64 with label smoothing 0.1. The reference below rebuilds the training loss by
hand (no code shared with the command beyond the run's own files): the same seeded draw of
examples, BatchNorm in train mode normalising each micro-batch of 64 by its own statistics,
label smoothing 0.1, the mean over micro-batches; its dense Hessian by
torch.autograd.functional.hessian. The command's top eigenvalues and trace must be this matrix's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _helpers import one_line_error
from bigbatch import cli, config
from bigbatch.trainer import checkpoint as ckpt
from bigbatch.trainer.data import build_data
from bigbatch.trainer.loop import run
from bigbatch.trainer.models import build_model

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mnist1d-cnn.toml"
TRAIN = ["data.name=synthetic", "data.num_samples=1200", "data.num_features=16", "data.num_classes=4",
         "model.channels=4", "batch.global_batch=64", "train.steps=40", "train.eval_every=0", "track.progress=off",
         "train.label_smoothing=0.1", "train.amp=off"]
EXAMPLES, B = 256, 64


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("spectrum") / "run"
    run(config.load(CONFIG, TRAIN), path)
    return path


def dense_training_hessian(run_dir: Path, seed: int = 0, checkpoint: str = "checkpoint.pt") -> torch.Tensor:
    cfg = config.load(run_dir / "config.toml")
    bundle = build_data(cfg.data)
    model = build_model(cfg.model, bundle.input_shape, bundle.num_classes).double()
    model.load_state_dict(ckpt.load(run_dir / checkpoint)["model"])
    model.train()
    idx = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(seed))[:EXAMPLES]
    x, y = bundle.train.x[idx].double(), bundle.train.y[idx]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def loss_of(flat):
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        losses = [F.cross_entropy(torch.func.functional_call(model, {**params, **buffers}, (x[j:j + B],)), y[j:j + B],
                                  label_smoothing=0.1) for j in range(0, EXAMPLES, B)]
        return sum(losses) / len(losses)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    h = torch.autograd.functional.hessian(loss_of, flat, vectorize=True)
    return (h + h.T) / 2


def test_the_command_measures_the_training_loss_hessian(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["spectrum", str(run_dir), "--examples", str(EXAMPLES), "--slq-steps", "20", "--trace-probes", "16",
                   "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "outliers" in capsys.readouterr().out
    res = json.loads((out / "spectrum.json").read_text())
    assert (out / "spectrum.png").stat().st_size > 10_000
    assert res["k"] == 4 + 3 and res["micro_batch"] == B and res["examples"] == EXAMPLES
    assert res["bn_mode"] == "train" and res["label_smoothing"] == 0.1
    eigs = torch.linalg.eigvalsh(dense_training_hessian(run_dir)).flip(0)
    assert res["num_params"] == len(eigs)
    # Lanczos stopped on residuals <= 1 % of each value: a value is within its residual of an eigenvalue
    for got, want, resid in zip(res["top_eigenvalues"], eigs[:res["k"]].tolist(), res["top_residuals"]):
        assert got == pytest.approx(want, abs=max(resid, 1e-3 * abs(want)))
    true_trace = float(eigs.sum())
    assert abs(res["trace"] - true_trace) <= 4 * res["trace_se"] + 1e-3 * abs(true_trace)
    assert 0.0 <= res["grad_fraction_top_k"] <= 1.0 and res["grad_fraction_by_k"] == sorted(res["grad_fraction_by_k"])
    assert res["outliers"] == len([v for v in res["top_eigenvalues"] if res["bulk_edge"] is not None and v > res["bulk_edge"]])
    assert len(res["slq"]["nodes"]) == 3 and len(res["density"]["lambda"]) == len(res["density"]["phi"])


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("spectrum") / "kept"
    run(config.load(CONFIG, TRAIN + ["train.steps=45", "train.log_every=5", "checkpoint.every=15", "checkpoint.keep=100"]), path)
    return path


def test_over_training_measures_every_kept_checkpoint(kept_run, tmp_path, capsys):
    out = tmp_path / "over"
    argv = ["spectrum", str(kept_run), "--examples", str(EXAMPLES), "--k", "5", "--out", str(out)]
    assert cli.main(argv + ["--over-training"]) == 0, capsys.readouterr().err
    res = json.loads((out / "over_training.json").read_text())
    assert (out / "over_training.png").stat().st_size > 10_000 and "top-4" in capsys.readouterr().out
    points = res["checkpoints"]
    assert [p["step"] for p in points] == [15, 30, 45] and res["k"] == 5 and res["micro_batch"] == B
    for p in points:  # each checkpoint's top-5 are its own dense Hessian's
        eigs = torch.linalg.eigvalsh(dense_training_hessian(kept_run, checkpoint=f"checkpoint-{p['step']:08d}.pt")).flip(0)
        for got, want, resid in zip(p["top_eigenvalues"], eigs[:5].tolist(), p["top_residuals"]):
            assert got == pytest.approx(want, abs=max(resid, 1e-3 * abs(want)))
        by_k = p["grad_fraction_by_k"]
        assert by_k == sorted(by_k) and 0 <= by_k[0] and by_k[-1] == p["grad_fraction_top_k"] <= 1
        assert p["grad_fraction_classes"] == by_k[3] and p["train_loss_logged"] is not None
    # the last point is `bigbatch spectrum` at the final checkpoint: the same operator and draw
    assert cli.main(argv + ["--out", str(tmp_path / "final"), "--slq-steps", "2", "--trace-probes", "2"]) == 0
    final = json.loads((tmp_path / "final" / "spectrum.json").read_text())
    assert points[-1]["top_eigenvalues"] == final["top_eigenvalues"]
    assert points[-1]["grad_fraction_top_k"] == final["grad_fraction_top_k"]


def test_over_training_needs_two_kept_checkpoints(run_dir, capsys):
    one_line_error(capsys, ["spectrum", str(run_dir), "--over-training"], "RUN_DIR")


@pytest.mark.parametrize("argv,field", [
    (["spectrum", "/nonexistent/run"], "RUN_DIR"),
    (["spectrum", "{run}", "--k", "0"], "--k"),
    (["spectrum", "{run}", "--k", "100000"], "--k"),
    (["spectrum", "{run}", "--trace-probes", "1"], "--trace-probes"),
    (["spectrum", "{run}", "--examples", "10"], "--examples"),
])
def test_bad_input_is_one_line_naming_the_field(run_dir, capsys, argv, field):
    one_line_error(capsys, [a.format(run=run_dir) for a in argv], field)


def test_a_folder_without_a_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "config.toml").write_text('name = "x"\n')
    one_line_error(capsys, ["spectrum", str(tmp_path)], "checkpoint")
