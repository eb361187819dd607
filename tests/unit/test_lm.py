"""The built-in language-model task: the tiny GPT (`model.name = "gpt"`) and the standard-library
corpus (`data.name = "pysrc"`), and their one-line errors for bad kwargs."""

from __future__ import annotations

import platform

import pytest
import torch

from _helpers import ROOT, one_line_error
from bigbatch import config
from bigbatch.trainer import corpus
from bigbatch.trainer.data import build_data
from bigbatch.trainer.models import build_model

MLP = str(ROOT / "configs" / "mnist1d-mlp.toml")
TINY = ["data.name='pysrc'", "data.kwargs={context=32, max_bytes=40000}", "data.test_fraction=0.1",
        "model.name='gpt'", "model.kwargs={layers=2, width=32, heads=2}"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGBATCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_pysrc_windows_are_the_next_bytes_of_stdlib_files_split_by_file(cache):
    cfg = config.load(MLP, TINY)
    b = build_data(cfg.data)
    assert b.num_classes == 256 and b.input_shape == (32,) and b.target_shape == (32,)
    # the cap is exact: 36,000 training and 4,000 validation bytes, in whole windows of 32 + 1
    assert (len(b.train), len(b.test)) == ((36000 - 1) // 32, (4000 - 1) // 32)
    for d in (b.train, b.test):
        assert d.x.dtype == d.y.dtype == torch.int64
        assert torch.equal(d.x[:, 1:], d.y[:, :-1]) and torch.equal(d.x[1:, 0], d.y[:-1, -1])  # y = x shifted by one
    text = bytes(b.train.x[:50].flatten().tolist()).decode("utf-8", "replace")
    assert "def " in text or "import " in text  # Python source
    # cached once, keyed by the Python version: a second build reads the same bytes
    files = list(cache.glob("pysrc-*.npz"))
    assert len(files) == 1 and files[0].name.startswith(f"pysrc-{platform.python_version()}-")
    again = build_data(cfg.data)
    assert torch.equal(again.train.x, b.train.x) and torch.equal(again.test.y, b.test.y)


def test_the_split_is_by_file_and_does_not_depend_on_the_cap(tmp_path):
    root = tmp_path / "lib"
    for i in range(40):
        (root / f"pkg{i % 4}").mkdir(parents=True, exist_ok=True)
        (root / f"pkg{i % 4}" / f"m{i}.py").write_bytes(bytes([65 + i % 26]) * (100 + i))
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third.py").write_bytes(b"!" * 500)  # not the standard library
    files = corpus.source_files(root)
    assert len(files) == 40
    val_files = {rel for rel, _ in files if corpus._fraction("split", rel) < 0.25}
    assert 0 < len(val_files) < 40
    train, val = corpus.build_splits(root, 0.25, 0)
    assert len(train) + len(val) == sum(100 + i for i in range(40)) and b"!" not in train.tobytes() + val.tobytes()
    by_file = {rel: p.read_bytes() for rel, p in files}
    assert len(val) == sum(len(by_file[r]) for r in val_files)
    # a cap keeps each split's share and the same files on the same side
    small_train, small_val = corpus.build_splits(root, 0.25, 1000)
    assert (len(small_train), len(small_val)) == (750, 250)
    assert set(small_val.tobytes()) <= set(val.tobytes()) and set(small_train.tobytes()) <= set(train.tobytes())


def test_gpt_is_causal_tied_and_a_few_hundred_thousand_parameters():
    model = build_model(config.load(MLP, ["model.name='gpt'"]).model, (64,), 256)
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 3_000_000  # 0.83 M, the embedding counted once
    assert model.head.weight is model.tok.weight
    torch.manual_seed(0)
    x = torch.randint(0, 256, (2, 64))
    out = model(x)
    assert out.shape == (2, 64, 256)
    y = x.clone()
    y[:, 40:] = (y[:, 40:] + 1) % 256  # change the future: the past's logits do not move
    out2 = model(y)
    assert torch.equal(out[:, :40], out2[:, :40]) and not torch.allclose(out[:, 40:], out2[:, 40:])


def test_gpt_context_and_data_must_fit(cache):
    cfg = config.load(MLP, TINY + ["model.kwargs={layers=1, width=32, heads=2, context=16}"])
    with pytest.raises(config.ConfigError, match="model.kwargs.context: 16 is shorter than the data's windows"):
        build_model(cfg.model, (32,), 256)
    with pytest.raises(config.ConfigError, match="gpt needs token sequences"):
        build_model(cfg.model, (3, 8, 8), 10)


@pytest.mark.parametrize("sets, expect", [
    (["data.kwargs={context=32, maxbytes=10}"], "data.kwargs: pysrc takes context, max_bytes; unknown: maxbytes"),
    (["data.kwargs={context=0}"], "data.kwargs.context: must be an integer >= 1, got 0"),
    (["data.kwargs={max_bytes='a lot'}"], "data.kwargs.max_bytes: must be an integer >= 0"),
    (["data.kwargs={context=64, max_bytes=500}"], "data.kwargs.max_bytes: pysrc's validation split has 50 bytes"),
    (["model.kwargs={width=30, heads=4}"], "model.kwargs.heads: must divide width 30, got 4"),
    (["model.kwargs={layer=2}"], "model.kwargs: gpt takes layers, width, heads, context; unknown: layer"),
    (["data.name='mnist1d'", "data.kwargs={}"], "model.name: gpt needs token ids"),
])
def test_bad_lm_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, cache, sets, expect):
    monkeypatch.chdir(tmp_path)
    one_line_error(capsys, ["train", MLP, *[a for s in TINY + sets for a in ("--set", s)]], expect)
    assert not (tmp_path / "runs").exists()


def test_the_lm_presets_load_and_every_sweep_trial_validates():
    from bigbatch.study.spec import load

    cfg = config.load(ROOT / "configs" / "pysrc-gpt.toml")
    cfg.validate(2)
    assert (cfg.model.name, cfg.data.name, cfg.optim.name, cfg.target.test_loss) == ("gpt", "pysrc", "adamw", 1.65)
    spec = load(ROOT / "configs" / "sweep-pysrc-gpt.toml")  # builds and validates every trial's config
    trial = spec.trial_config(spec.points()[0])
    assert spec.target.test_loss == 2.2 and trial.optim.beta2_scaling == "tokens" and trial.optim.timescale == 5.0


def test_example_losses_average_a_sequences_kept_tokens_and_match_eval_sums():
    """The planner's per-example test loss (study.branch_runs) on (N, T, V) logits: one value per
    sequence, the mean over its kept tokens; summed over kept tokens it is eval_sums' loss."""
    from bigbatch.trainer.objective import eval_sums, example_losses

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    targets = torch.randint(0, 7, (3, 5), generator=g)
    targets[1, 2:] = -100
    per = example_losses(logits, targets)
    kept = (targets != -100).sum(1).double()
    assert per.shape == (3,) and per.dtype == torch.float64
    assert torch.allclose((per * kept).sum(), eval_sums(logits, targets)[0])
    first = torch.nn.functional.cross_entropy(logits[0], targets[0]).double()
    assert torch.allclose(per[0], first)
    flat = example_losses(logits[:, 0], targets[:, 0])  # classification: one label per example
    assert torch.allclose(flat, torch.nn.functional.cross_entropy(logits[:, 0], targets[:, 0], reduction="none").double())


def test_measure_on_a_gpt_checkpoint_reports_noise_scales_in_tokens_too(tmp_path, monkeypatch, capsys, cache):
    """`bigbatch measure` on a sequence model: HVPs through attention (math kernel), and B_simple /
    B_noise printed again x T (T = 32 tokens per window) with T in the JSON."""
    import json

    from bigbatch.cli import main

    monkeypatch.chdir(tmp_path)
    sets = TINY + ["optim.name='adamw'", "optim.base_lr=0.003", "batch.global_batch=16", "train.steps=6",
                   "train.eval_every=0", "data.train_eval_samples=16", "data.eval_subset=16"]
    assert main(["train", MLP, "--out", "run", *[a for s in sets for a in ("--set", s)]]) == 0
    capsys.readouterr()
    assert main(["measure", "run", "--samples", "8", "--hessian-examples", "32", "--json", "m.json"]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["tokens_per_example"] == 32 and m["sharpness_top"] > 0
    line = next(l for l in out.splitlines() if "in tokens (x 32" in l)
    assert f"b_simple {m['b_simple'] * 32:.4g}" in line
