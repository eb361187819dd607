"""The sections of the training config: one dataclass per TOML table ([data], [model], [batch],
[optim], [schedule], [train], [target], [checkpoint], [track], [dist], [measure]).

Each section owns its validation and names the field it refuses (`ConfigError("batch.global_batch",
...)`): its values alone in ``__post_init__`` (when it is built), and what depends on the world it
is about to run on (world size, ranks per node, files on this machine) in ``check(world)``, which
the pre-launch check calls for every section (`Config.validate`). A docstring under each field
says what it means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Union

from pathlib import Path

from bigbatch import entrypoints, topology
from bigbatch.entrypoints import is_entry_point
from bigbatch.errors import ConfigError


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(key, message)


@dataclass(frozen=True)
class World:
    """What a config is about to run on, for the checks that depend on it."""

    size: int = 1
    """Ranks in all (processes x nodes)."""
    local_size: int = 1
    """Ranks per node."""
    check_paths: bool = True
    """Check files and imports here (False where they live on another machine: a SLURM cluster)."""


class Section:
    def check(self, world: World) -> None:
        """ConfigError for a value that cannot work on `world` (nothing by default)."""


def derive_batch(global_batch: int, world_size: int, accum_steps: int | None, key: str = "batch.global_batch") -> tuple[int, int]:
    """(per_device_batch, accum_steps) from the global batch and the world size.

    global_batch = per_device_batch x accum_steps x world_size, exactly; anything else is an
    error before any work starts.
    """
    accum = accum_steps or 1
    if global_batch % (world_size * accum) != 0:
        raise ConfigError(key, f"global batch {global_batch} is not divisible by world size {world_size} x accum_steps {accum}")
    return global_batch // (world_size * accum), accum


DATASETS = ("mnist1d", "digits", "synthetic", "fake_images", "imagefolder", "cifar10", "pysrc")
MODELS = ("mlp", "cnn1d", "resnet18", "resnet34", "resnet50", "resnet101", "gpt")
PYSRC_KWARGS = {"context": 1, "max_bytes": 0}  # data.kwargs of pysrc -> smallest value
GPT_KWARGS = {"layers": 1, "width": 1, "heads": 1, "context": 1}  # model.kwargs of gpt -> smallest value
GPT_DEFAULTS = {"layers": 4, "width": 128, "heads": 4}  # context: the data's window


def _check_builtin_kwargs(kwargs: dict, allowed: dict[str, int], key: str, owner: str) -> None:
    """Built-in kwargs (pysrc's, gpt's): known names, integers >= their smallest value."""
    unknown = sorted(set(kwargs) - set(allowed))
    _check(not unknown, key, f"{owner} takes {', '.join(allowed)}; unknown: {', '.join(unknown)}")
    for k, v in kwargs.items():
        _check(isinstance(v, int) and not isinstance(v, bool) and v >= allowed[k], f"{key}.{k}",
               f"must be an integer >= {allowed[k]}, got {v!r}")


def _check_name(name: str, builtin: tuple[str, ...], key: str, form: str) -> None:
    """A built-in name or an entry point of the right form; importing it is `bigbatch.entrypoints`' job."""
    if name in builtin:
        return
    module, sep, attr = name.partition(":")
    ok = bool(sep) and bool(attr) and all(part.isidentifier() for part in module.split(".")) and attr.isidentifier()
    if key == "data.name" and module == "torchvision":
        ok = False
    _check(ok, key, f"expected one of {', '.join(builtin)} or {form}; got {name!r}")


@dataclass
class DataConfig(Section):
    name: str = "mnist1d"
    """Dataset: mnist1d, digits, synthetic, fake_images, imagefolder, cifar10, or your own as
    "package.module:function" (called with data.kwargs, returns (train, test): map-style datasets
    of (x, y) or (x, y) tensor pairs). mnist1d/digits/synthetic are generated locally; fake_images
    are random images for throughput benchmarks (like torchvision's FakeData); imagefolder and
    cifar10 read `root`. pysrc: the standard library's .py sources, byte-level (vocabulary 256),
    windows of data.kwargs.context tokens with next-byte targets (bigbatch.trainer.corpus)."""
    kwargs: dict = field(default_factory=dict)
    """"module:function" datasets: keyword arguments passed to the function (a TOML table).
    pysrc: context (tokens per window, default 64) and max_bytes (corpus cap, default 4000000; 0 = all)."""
    root: str | None = None
    """imagefolder: folder with train/ and val/ (ImageNet layout). cifar10: folder holding
    cifar-10-batches-py/ (or its files). mnist1d: cache folder (default ~/.cache/bigbatch)."""
    num_samples: int = 10000
    """mnist1d/synthetic/fake_images: total examples generated (train + test)."""
    test_fraction: float = 0.2
    """mnist1d/digits/synthetic: fraction held out as the test set; pysrc: the share of files (by a
    hash of their path) and of max_bytes held out for validation."""
    seed: int = 0
    """Seed of the generated dataset (independent of train.seed)."""
    num_features: int = 32
    """synthetic: input dimension."""
    num_classes: int = 10
    """synthetic: number of classes."""
    label_noise: float = 0.0
    """synthetic: fraction of labels replaced by random ones; mnist1d: of the training labels only
    (the test set stays clean), as in the double-descent experiments (Belkin et al. 2019)."""
    image_size: int = 224
    """imagefolder: crop size; fake_images: image side."""
    augment: bool = True
    """imagefolder/cifar10: random crop + flip on the training set."""
    num_workers: int = 4
    """imagefolder: DataLoader worker processes per rank."""
    backend: Literal["torch", "dali"] = "torch"
    """imagefolder training batches: torchvision (default) or NVIDIA DALI (`pip install 'bigbatch[dali]'`;
    decodes on the CPU without a GPU, nvJPEG with one; same data order as torch)."""
    train_eval_samples: int = 10000
    """Training examples (a fixed subset) evaluated for train_loss/train_acc; 0 = all."""
    train_samples: int = 0
    """Train on the first N training examples only (0 = all); the test set is unchanged. The study's
    gap phase uses it to train to a training-accuracy criterion within a CPU budget."""
    eval_subset: int = 0
    """Evaluations during training use only the first N test examples and N training-evaluation
    examples (0 = all): cheap frequent evaluations near a target. The run's last evaluation uses
    the full sets, so summary.json holds full-set numbers."""

    def __post_init__(self) -> None:
        _check_name(self.name, DATASETS, "data.name", "package.module:function")
        if self.name == "pysrc":
            _check_builtin_kwargs(self.kwargs, PYSRC_KWARGS, "data.kwargs", "pysrc")
        else:
            _check(not self.kwargs or is_entry_point(self.name), "data.kwargs",
                   'only for data.name = "package.module:function" or "pysrc"')
        _check(self.num_samples >= 10, "data.num_samples", f"must be >= 10, got {self.num_samples}")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        _check(self.num_features >= 1, "data.num_features", "must be >= 1")
        _check(self.num_classes >= 2, "data.num_classes", "must be >= 2")
        _check(0.0 <= self.label_noise <= 1.0, "data.label_noise", "must be in [0, 1]")
        _check(self.image_size >= 8, "data.image_size", "must be >= 8")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.train_eval_samples >= 0, "data.train_eval_samples", "must be >= 0")
        _check(self.train_samples >= 0, "data.train_samples", "must be >= 0")
        _check(self.eval_subset >= 0, "data.eval_subset", "must be >= 0")
        if self.name in ("imagefolder", "cifar10"):
            _check(self.root is not None, "data.root", f"required for data.name = {self.name!r} (a local folder)")
        if self.backend == "dali":
            _check(self.name == "imagefolder", "data.backend", "dali reads ImageNet-style folders: needs data.name = 'imagefolder'")

    @property
    def in_memory(self) -> bool:
        """Whether the built-in dataset is tensors in memory (probes draw their own examples from
        those); image folders stream through a DataLoader. A "module:function" dataset is known
        only once built (`bigbatch.trainer.probes.validate_data`)."""
        return self.name != "imagefolder"

    def check(self, world: World) -> None:
        if not world.check_paths:
            return
        if self.root is not None and self.name in ("imagefolder", "cifar10"):
            _check(Path(self.root).expanduser().is_dir(), "data.root", f"folder {self.root!r} does not exist")
        if is_entry_point(self.name):  # it must import here (PYTHONPATH or an installed package)
            fn = entrypoints.resolve(self.name, "data.name")
            entrypoints.check_call(fn, (), self.kwargs, self.name, "data.kwargs")


@dataclass
class ModelConfig(Section):
    name: str = "mlp"
    """Architecture: mlp/cnn1d for vector data (MNIST-1D, digits, synthetic); resnet18/34/50/101 for
    images; "torchvision:NAME" for any torchvision classification model (weights=None); or your own
    as "package.module:function" (called with input_shape, num_classes, **model.kwargs); gpt: a tiny
    decoder-only transformer for token sequences (data.name = "pysrc"; bigbatch.trainer.gpt)."""
    kwargs: dict = field(default_factory=dict)
    """"torchvision:NAME" and "module:function" models: keyword arguments (a TOML table). gpt:
    layers (4), width (128), heads (4, must divide width), context (default: the data's window)."""
    hidden: int = 256
    """mlp: width of each hidden layer."""
    depth: int = 2
    """mlp: number of hidden layers."""
    channels: int = 32
    """cnn1d: channels of each conv layer."""
    zero_init_residual: bool = False
    """Zero-init the last BatchNorm gamma of each residual block (Goyal et al. 2017, section 5.1)."""
    sync_bn: bool = False
    """BatchNorm statistics across ranks (SyncBatchNorm) instead of per device batch (Goyal's choice)."""
    small_input: bool = False
    """resnets: 3x3 stem without max-pool, for 32x32 images (CIFAR)."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """Memory format for image models: auto = channels_last on GPU."""

    def __post_init__(self) -> None:
        _check_name(self.name, MODELS, "model.name", "torchvision:NAME or package.module:function")
        if self.name == "gpt":
            _check_builtin_kwargs(self.kwargs, GPT_KWARGS, "model.kwargs", "gpt")
            width, heads = (self.kwargs.get(k, GPT_DEFAULTS[k]) for k in ("width", "heads"))
            _check(width % heads == 0, "model.kwargs.heads", f"must divide width {width}, got {heads}")
        else:
            _check(not self.kwargs or ":" in self.name, "model.kwargs",
                   'only for model.name = "torchvision:NAME", "package.module:function" or "gpt"')
        _check(self.hidden >= 1, "model.hidden", "must be >= 1")
        _check(self.depth >= 1, "model.depth", "must be >= 1")
        _check(self.channels >= 1, "model.channels", "must be >= 1")

    def check(self, world: World) -> None:
        if not world.check_paths:
            return
        if self.name.startswith(entrypoints.TORCHVISION):
            entrypoints.check_torchvision(self.name)
        elif is_entry_point(self.name):  # it must import here (PYTHONPATH or an installed package)
            fn = entrypoints.resolve(self.name, "model.name")
            entrypoints.check_call(fn, ((1,), 2), self.kwargs, self.name, "model.kwargs")


@dataclass
class BatchConfig(Section):
    global_batch: int = 128
    """Examples per optimizer step, summed over all ranks and accumulation steps."""
    accum_steps: int | None = None
    """Micro-batches per step on each rank. None = 1 (per-device batch = global_batch / world)."""
    phases: list = field(default_factory=list)
    """Batch-size control: [[from_epoch, global_batch], ...], increasing from_epoch
    (Mikami et al. 2018; Smith et al. 2018). The first phase starts at epoch 0."""
    lr_follows_batch: bool = True
    """When the batch changes (phases or adaptive), rescale the lr by optim.scaling."""
    adaptive: Literal["none", "gns"] = "none"
    """gns: grow the batch (powers of 2, batch.min..batch.max) while B_simple > batch."""
    min: int | None = None
    """adaptive: smallest global batch (default global_batch)."""
    max: int | None = None
    """adaptive: largest global batch (default 64 x global_batch)."""
    adapt_every: int = 20
    """adaptive: steps between batch-size decisions."""

    def __post_init__(self) -> None:
        _check(self.global_batch >= 1, "batch.global_batch", f"must be a positive integer, got {self.global_batch}")
        if self.accum_steps is not None:
            _check(self.accum_steps >= 1, "batch.accum_steps", f"must be >= 1, got {self.accum_steps}")
        phases = []
        for i, ph in enumerate(self.phases):
            _check(
                isinstance(ph, (list, tuple)) and len(ph) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ph),
                f"batch.phases[{i}]", f"expected [from_epoch, global_batch], got {ph!r}")
            from_epoch, b = ph
            _check(float(b).is_integer() and b >= 1, f"batch.phases[{i}]", f"global_batch must be a positive integer, got {b!r}")
            _check(from_epoch >= 0, f"batch.phases[{i}]", f"from_epoch must be >= 0, got {from_epoch!r}")
            if i == 0:
                _check(from_epoch == 0, "batch.phases[0]", f"the first phase must start at epoch 0, got {from_epoch!r}")
            else:
                _check(from_epoch > phases[-1][0], f"batch.phases[{i}]", f"phases out of order: epoch {from_epoch} after {phases[-1][0]}")
            phases.append([from_epoch, int(b)])
        self.phases = phases
        if self.adaptive != "none":
            _check(not self.phases, "batch.adaptive", "cannot be combined with batch.phases")
        for k in ("min", "max"):
            v = getattr(self, k)
            if v is not None:
                _check(v >= 1, f"batch.{k}", "must be >= 1")
        if self.adaptive != "none":
            lo, hi = self.adaptive_range()
            _check(lo <= hi, "batch.max", f"must be >= batch.min ({lo}), got {hi}")
        _check(self.adapt_every >= 1, "batch.adapt_every", "must be >= 1")

    def adaptive_range(self) -> tuple[int, int]:
        """(smallest, largest) global batch of batch.adaptive."""
        lo = self.min if self.min is not None else self.global_batch
        hi = self.max if self.max is not None else 64 * self.global_batch
        return lo, hi

    def check(self, world: World) -> None:
        """Every batch the run can take divides over the ranks and micro-batches."""
        derive_batch(self.global_batch, world.size, self.accum_steps, "batch.global_batch")
        for i, (_, b) in enumerate(self.phases):
            derive_batch(b, world.size, self.accum_steps, f"batch.phases[{i}]")
        if self.adaptive != "none":
            lo, _ = self.adaptive_range()
            accum = self.accum_steps or 1
            _check(lo % (world.size * accum) == 0, "batch.min",
                   f"{lo} is not divisible by world size {world.size} x accum_steps {accum}")


@dataclass
class OptimConfig(Section):
    name: Literal["sgd", "lars", "larc", "lamb", "adamw"] = "sgd"
    """sgd (momentum), lars / larc (You et al. 2017), lamb (You et al. 2019), adamw."""
    base_lr: float = 0.1
    """Learning rate at optim.base_batch; the run's peak lr is scaled from it (optim.scaling)."""
    base_batch: int = 256
    """Reference batch of base_lr ("lr 0.1 per 256", Goyal et al. 2017)."""
    scaling: Literal["linear", "sqrt", "none"] = "linear"
    """Peak lr = base_lr x (global_batch / base_batch) [linear] or its square root [sqrt]."""
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    trust_coefficient: float = 0.001
    """LARS/LARC trust coefficient eta."""
    eps: float = 0.0
    """LARS: added to the denominator of the trust ratio (MLPerf 0); LAMB/AdamW: Adam epsilon (use 1e-6..1e-8)."""
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    """LAMB/AdamW betas (beta2 at optim.base_batch when optim.beta2_scaling = "tokens")."""
    beta2_scaling: Literal["none", "tokens"] = "none"
    """adamw: "tokens" keeps beta2's half-life fixed in tokens across batch sizes (Marek et al. 2025):
    beta2(B) = betas[1] ** (B / base_batch)."""
    timescale: float | None = None
    """adamw: weight decay from a fixed AdamW timescale tau, in epochs (Bergsma et al. 2025):
    weight_decay = B / (peak lr x tau x D), D the training-set size in examples; replaces
    optim.weight_decay."""
    exclude_bn_bias: bool = True
    """BatchNorm/LayerNorm parameters and biases: no weight decay, no LARS/LAMB adaptation."""
    impl: Literal["torch", "apex"] = "torch"
    """apex: NVIDIA apex fused LAMB / LARC on GPU (optional dependency)."""

    def __post_init__(self) -> None:
        _check(self.base_lr > 0 and math.isfinite(self.base_lr), "optim.base_lr", f"must be a positive number, got {self.base_lr}")
        _check(self.base_batch >= 1, "optim.base_batch", "must be >= 1")
        _check(0.0 <= self.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.trust_coefficient > 0, "optim.trust_coefficient", "must be > 0")
        _check(self.eps >= 0, "optim.eps", "must be >= 0")
        _check(
            isinstance(self.betas, list) and len(self.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas),
            "optim.betas", f"expected [beta1, beta2] in [0, 1), got {self.betas!r}")
        self.betas = [float(b) for b in self.betas]
        if self.timescale is not None:
            _check(self.timescale > 0 and math.isfinite(self.timescale), "optim.timescale",
                   f"must be a positive number of epochs, got {self.timescale}")
        for key, on in (("optim.beta2_scaling", self.beta2_scaling != "none"), ("optim.timescale", self.timescale is not None)):
            _check(not on or self.name == "adamw", key, f"an AdamW setting: needs optim.name = 'adamw', got {self.name!r}")


@dataclass
class ScheduleConfig(Section):
    name: Literal["constant", "step", "cosine", "poly"] = "constant"
    """Decay after warmup: constant, step (milestones x factor), cosine (to end_lr), poly (power, to end_lr)."""
    warmup_epochs: float = 0.0
    """Linear warmup length in epochs (Goyal et al.: 5)."""
    warmup_steps: int | None = None
    """Warmup length in steps; overrides warmup_epochs."""
    warmup_start: Union[str, float] = "base"
    """Warmup starts at "base" = the unscaled base lr (Goyal's gradual warmup) or at a number (0 = from zero)."""
    warmup_shape: Literal["gradual", "constant"] = "gradual"
    """gradual: linear ramp from warmup_start to the peak; constant: warmup_start for the whole warmup, then the peak (Goyal et al. 2017, 2.2)."""
    milestones: list = field(default_factory=list)
    """step: epochs at which the lr is multiplied by factor (Goyal et al.: [30, 60, 80])."""
    factor: float = 0.1
    power: float = 2.0
    """poly: exponent (LARS/MLPerf: 2)."""
    end_lr: float = 0.0
    """cosine/poly: lr at the last step (MLPerf LARS: 1e-4)."""

    def __post_init__(self) -> None:
        _check(self.warmup_epochs >= 0, "schedule.warmup_epochs", "must be >= 0")
        if self.warmup_steps is not None:
            _check(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        if isinstance(self.warmup_start, str):
            _check(self.warmup_start == "base", "schedule.warmup_start", f'expected "base" or a number >= 0, got {self.warmup_start!r}')
        else:
            _check(self.warmup_start >= 0, "schedule.warmup_start", f'expected "base" or a number >= 0, got {self.warmup_start!r}')
            self.warmup_start = float(self.warmup_start)
        prev = 0.0
        for i, m in enumerate(self.milestones):
            _check(isinstance(m, (int, float)) and not isinstance(m, bool) and m > prev, f"schedule.milestones[{i}]",
                   f"expected increasing positive epochs, got {self.milestones!r}")
            prev = m
        _check(0 < self.factor <= 1, "schedule.factor", "must be in (0, 1]")
        _check(self.power > 0, "schedule.power", "must be > 0")
        _check(self.end_lr >= 0, "schedule.end_lr", "must be >= 0")


@dataclass
class TrainConfig(Section):
    steps: int | None = None
    """Optimizer steps to train; exactly one of steps / epochs."""
    epochs: float | None = None
    """Epochs to train (may be fractional); exactly one of steps / epochs."""
    seed: int = 0
    """Seeds model init and the data order (which depends only on seed and epoch)."""
    eval_every: int = 100
    """Steps between evaluations (train and test loss/accuracy); 0 = only at the end."""
    log_every: int = 10
    """Steps between metrics.jsonl lines."""
    label_smoothing: float = 0.0
    ignore_index: int = -100
    """Sequence targets equal to this count for nothing in the loss and the token accuracy (padding;
    PyTorch's convention). Classification labels are never negative, so the default ignores none."""
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    """Mixed precision: auto = bf16 on GPU, off on CPU. fp16 uses a grad scaler (GPU only)."""
    compile: bool = False
    """torch.compile the model."""
    compile_backend: str = "inductor"
    """torch.compile backend: inductor (code generation); eager / aot_eager trace without generating
    code (debugging, and the CPU smoke run of benchmarks/gpu_check.sh)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s of one device, for the logged mfu; default: H100 SXM / H200 under bf16 or
    fp16 autocast from a datasheet table (bigbatch.trainer.flops), otherwise no mfu."""
    stop_at_target: bool = False
    """Stop as soon as the target is reached (sweeps)."""
    eval_fine: float = 0.0
    """Near the target (within eval_fine_within of it), also evaluate whenever the step count has
    grown by this fraction since the last evaluation, so the interpolated steps-to-target is
    resolved to it whatever eval_every is (0 = off; the study uses 0.03)."""
    eval_fine_within: float = 0.05
    """"Near the target" for eval_fine: accuracy within this many (fraction) of the target, or a
    loss within this fraction above it, at the last evaluation."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.eval_fine < 1.0, "train.eval_fine", f"must be in [0, 1), got {self.eval_fine}")
        _check(self.eval_fine_within > 0, "train.eval_fine_within", f"must be > 0, got {self.eval_fine_within}")
        if self.steps is not None:
            _check(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        if self.epochs is not None:
            _check(self.epochs > 0, "train.epochs", f"must be > 0, got {self.epochs}")
        _check(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        _check(self.log_every >= 1, "train.log_every", "must be >= 1")
        _check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)")
        if self.peak_tflops is not None:
            _check(self.peak_tflops > 0, "train.peak_tflops", f"must be > 0 TFLOP/s, got {self.peak_tflops}")

    def check(self, world: World) -> None:
        if self.compile and self.compile_backend != "inductor":
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            _check(self.compile_backend in known, "train.compile_backend",
                   f"unknown torch.compile backend {self.compile_backend!r}; expected inductor, eager, aot_eager, "
                   "cudagraphs or another name from torch._dynamo.list_backends(exclude_tags=())")
        if self.amp == "fp16":
            import torch

            _check(torch.cuda.is_available(), "train.amp", "fp16 needs a GPU; use bf16 on CPU")


@dataclass
class TargetConfig(Section):
    test_acc: float | None = None
    """Steps/examples to target are counted at the first evaluation with test_acc >= this."""
    test_loss: float | None = None
    """Alternative target: first evaluation with test_loss <= this."""
    train_acc: float | None = None
    """Alternative target: training accuracy (on the training-evaluation subset) >= this, e.g. the
    study's gap phase, which trains to a training criterion (Keskar et al. 2016)."""

    def __post_init__(self) -> None:
        if self.train_acc is not None:
            _check(0.0 < self.train_acc <= 1.0, "target.train_acc", f"must be a fraction in (0, 1], got {self.train_acc}")
        if self.test_acc is not None:
            _check(0.0 < self.test_acc <= 1.0, "target.test_acc", f"must be a fraction in (0, 1], got {self.test_acc}")
        if self.test_loss is not None:
            _check(self.test_loss > 0, "target.test_loss", "must be > 0")


@dataclass
class CheckpointConfig(Section):
    every: int = 0
    """Steps between checkpoints (0 = only on SIGTERM/SIGUSR2 and at the end)."""
    keep: int = 2
    """Newest checkpoint-<step>.pt files kept; resume falls back to an older one if one does not load."""
    stop_within_s: float = 10.0
    """After SIGTERM/SIGUSR2 the ranks agree to stop (and checkpoint) within about this many seconds
    of training or evaluation (bigbatch.trainer.stop). Keep it plus a checkpoint write below
    torchrun's 30 s grace and SLURM's KillWait / GraceTime."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, "checkpoint.every", "must be >= 0")
        _check(self.keep >= 1, "checkpoint.keep", f"must be >= 1, got {self.keep}")
        _check(self.stop_within_s > 0, "checkpoint.stop_within_s", "must be > 0")


@dataclass
class TrackConfig(Section):
    wandb: bool = False
    """Log to Weights & Biases from rank 0 (offline mode when no API key is configured)."""
    project: str = "bigbatch"
    entity: str | None = None
    group: str | None = None
    """W&B group (sweeps set it to the sweep's name)."""
    tags: list = field(default_factory=list)
    progress: Literal["auto", "on", "off"] = "auto"
    """Progress bar on rank 0: auto = when stderr is a terminal."""


@dataclass
class DistConfig(Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """auto = nccl when CUDA is available, else gloo."""
    allreduce: Literal["builtin", "ring", "torus2d", "hierarchical"] = "builtin"
    """Gradient all-reduce inside DDP: the backend's own, or bigbatch's algorithms."""
    torus_rows: int | None = None
    """torus2d: rows of the rank grid (None = the most square factorisation)."""
    local_size: int | None = None
    """hierarchical: ranks per node (None = LOCAL_WORLD_SIZE)."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size."""
    timeout_s: float = 600.0
    """Process-group timeout."""

    def __post_init__(self) -> None:
        if self.torus_rows is not None:
            _check(self.torus_rows >= 1, "dist.torus_rows", "must be >= 1")
        if self.local_size is not None:
            _check(self.local_size >= 1, "dist.local_size", "must be >= 1")
        _check(self.bucket_cap_mb > 0, "dist.bucket_cap_mb", "must be > 0")
        _check(self.timeout_s > 0, "dist.timeout_s", "must be > 0")

    def check(self, world: World) -> None:
        """The rank grid of the chosen all-reduce tiles the world."""
        if self.allreduce == "torus2d":
            topology.torus_shape(world.size, self.torus_rows, "dist.torus_rows")
        elif self.allreduce == "hierarchical":
            topology.check_local_size(world.size, self.local_size or world.local_size, "dist.local_size")


@dataclass
class MeasureConfig(Section):
    gns: bool = False
    """Online gradient noise scale B_simple (McCandlish et al. 2018)."""
    gns_every: int = 4
    """Steps between GNS measurements (a measured step costs 3-4 % of a 2.2-2.5 ms MLP step: docs/measure.md)."""
    gns_ema: float = 0.95
    """EMA decay of |G|^2 and tr(Sigma)."""
    tail_every: int = 0
    """Steps between tail-index probes (0 = off)."""
    tail_samples: int = 64
    """Minibatch gradients per tail-index probe."""
    sharpness: bool = False
    """Top Hessian eigenvalue at each evaluation, on a fixed training subset."""
    sharpness_samples: int = 1024
    sharpness_iters: int = 20
    sharpness_mode: str = "train"
    """"train": BatchNorm with the statistics of each training micro-batch (the loss that is
    trained; logged as sharpness/top); "eval": running statistics (sharpness/top_eval)."""

    def __post_init__(self) -> None:
        _check(self.gns_every >= 1, "measure.gns_every", "must be >= 1")
        _check(0.0 <= self.gns_ema < 1.0, "measure.gns_ema", "must be in [0, 1)")
        _check(self.tail_every >= 0, "measure.tail_every", "must be >= 0")
        _check(self.tail_samples >= 8, "measure.tail_samples", "must be >= 8 (4 independent differences)")
        _check(self.sharpness_samples >= 1, "measure.sharpness_samples", "must be >= 1")
        _check(self.sharpness_iters >= 1, "measure.sharpness_iters", "must be >= 1")
        _check(self.sharpness_mode in ("train", "eval"), "measure.sharpness_mode",
               f'expected "train" or "eval", got {self.sharpness_mode!r}')
