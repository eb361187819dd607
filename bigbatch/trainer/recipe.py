"""The large-minibatch recipe as pure functions: lr scaling, warmup, decay, batch-size phases.

- Linear scaling rule and gradual warmup: Goyal et al. 2017 ("lr = 0.1 * B / 256", warmup from
  the small-batch lr over 5 epochs, then /10 at epochs 30, 60, 80). Their "constant warmup"
  (section 2.2: the small-batch lr for 5 epochs, then the scaled lr at once) is warmup_shape="constant".
- Square-root scaling: Krizhevsky 2014; Hoffer et al. 2017.
- Polynomial decay (power 2) after warmup: the LARS/MLPerf schedule (You et al. 2017).
- Batch-size control: Mikami et al. 2018 (34k -> 68k); Smith et al. 2018 ("don't decay the
  learning rate, increase the batch size").
- AdamW's settings that are coupled to the batch (`adamw_settings`): beta2 with a half-life fixed
  in tokens (Marek et al. 2025), weight decay from a fixed AdamW timescale (Bergsma et al. 2025).

Training consumes one continuous stream of examples: the concatenation of per-epoch
permutations. A step at global batch B takes the next B examples, so `epoch = examples / N`
exactly, and a batch may straddle an epoch boundary. Phases and milestones given in epochs
become step numbers through that stream.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from bigbatch.errors import ConfigError

RULES = ("linear", "sqrt", "none")
DECAYS = ("constant", "step", "cosine", "poly")
WARMUP_SHAPES = ("gradual", "constant")


def scaled_lr(base_lr: float, global_batch: int, base_batch: int = 256, rule: str = "linear") -> float:
    """Peak learning rate for `global_batch` from `base_lr` quoted at `base_batch`."""
    if rule == "linear":
        return base_lr * global_batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch / base_batch)
    if rule == "none":
        return base_lr
    raise ConfigError("optim.scaling", f"expected one of {', '.join(RULES)}; got {rule!r}")


def beta2_for_batch(beta2_ref: float, global_batch: int, ref_batch: int) -> float:
    """beta2 at `global_batch` with the same half-life in tokens as `beta2_ref` at `ref_batch`
    (Marek et al. 2025): the EMA of squared gradients halves its weight after ln 2 / -ln beta2
    steps, i.e. B x T x ln 2 / -ln beta2 tokens; holding that fixed gives
    beta2(B) = beta2_ref ** (B / B_ref). T cancels, so the ratio is in sequences or tokens alike."""
    return beta2_ref ** (global_batch / ref_batch)


def timescale_weight_decay(global_batch: int, lr: float, timescale: float, dataset: int) -> float:
    """AdamW weight decay that keeps the timescale tau = B / (lr x wd x D) fixed (Bergsma et al.
    2025, "Power Lines"): AdamW's weights are an EMA of updates with time constant 1 / (lr x wd)
    steps, i.e. B / (lr x wd) examples, tau as a fraction of the D examples of the dataset (an
    epoch). So wd = B / (lr x tau x D): at a fixed lr, wd grows linearly with the batch."""
    return global_batch / (lr * timescale * dataset)


def lr_at(
    step: int,
    *,
    peak_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start_lr: float = 0.0,
    warmup_shape: str = "gradual",
    decay: str = "constant",
    milestones: tuple[int, ...] | list[int] = (),
    factor: float = 0.1,
    power: float = 2.0,
    end_lr: float = 0.0,
) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warmup, then decay.

    Warmup: lr goes linearly from `warmup_start_lr` at step 0 to `peak_lr` at `warmup_steps`
    ("gradual"), or stays at `warmup_start_lr` until `warmup_steps` ("constant", Goyal et al. 2017 section 2.2).
    Decay (from the end of warmup to `total_steps`):
      constant  peak_lr
      step      peak_lr * factor ** (number of milestones <= step)       (milestones in steps)
      cosine    end_lr + (peak_lr - end_lr) * (1 + cos(pi t)) / 2          t in [0, 1]
      poly      end_lr + (peak_lr - end_lr) * (1 - t) ** power
    """
    if warmup_steps > 0 and step < warmup_steps:
        if warmup_shape == "constant":
            return warmup_start_lr
        if warmup_shape != "gradual":
            raise ConfigError("schedule.warmup_shape", f"expected one of {', '.join(WARMUP_SHAPES)}; got {warmup_shape!r}")
        return warmup_start_lr + (peak_lr - warmup_start_lr) * step / warmup_steps
    if decay == "constant":
        return peak_lr
    if decay == "step":
        return peak_lr * factor ** sum(1 for m in milestones if step >= m)
    span = max(total_steps - warmup_steps, 1)
    t = min(max(step - warmup_steps, 0) / span, 1.0)
    if decay == "cosine":
        return end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
    if decay == "poly":
        return end_lr + (peak_lr - end_lr) * (1.0 - t) ** power
    raise ConfigError("schedule.name", f"expected one of {', '.join(DECAYS)}; got {decay!r}")


@dataclass(frozen=True)
class Phase:
    """A stretch of training at one global batch."""

    start_step: int
    start_examples: int
    global_batch: int
    from_epoch: float


def batch_phases(phases: list[list[float]] | list[tuple[float, int]], default_batch: int, num_train: int) -> list[Phase]:
    """Phases in epochs -> phases in steps on the example stream.

    Phase i starts at the first step whose first example is at or after epoch from_epoch_i.
    """
    spec = [(float(e), int(b)) for e, b in phases] if phases else [(0.0, default_batch)]
    out: list[Phase] = []
    step, examples = 0, 0
    for i, (from_epoch, batch) in enumerate(spec):
        if i > 0:
            prev = out[-1]
            target = math.ceil(from_epoch * num_train)
            n_steps = max(math.ceil((target - examples) / prev.global_batch), 0)
            step += n_steps
            examples += n_steps * prev.global_batch
        out.append(Phase(step, examples, batch, from_epoch))
    return out


def phase_at(phases: list[Phase], step: int) -> Phase:
    current = phases[0]
    for ph in phases:
        if ph.start_step <= step:
            current = ph
        else:
            break
    return current


def examples_before(phases: list[Phase], step: int) -> int:
    """Examples consumed by steps 0 .. step-1."""
    ph = phase_at(phases, step)
    return ph.start_examples + (step - ph.start_step) * ph.global_batch


def step_at_examples(phases: list[Phase], examples: float) -> int:
    """The first step whose first example is at or after `examples` on the stream."""
    for ph, nxt in zip(phases, phases[1:] + [None]):
        end = nxt.start_examples if nxt is not None else math.inf
        if examples <= end:
            return ph.start_step + max(math.ceil((examples - ph.start_examples) / ph.global_batch), 0)
    raise AssertionError("unreachable")  # the last phase is unbounded


class Schedule:
    """Batch and learning rate at every step of one run, derived once from the config.

    Built from the config and the training-set size; every query is a pure function of the step.
    """

    def __init__(self, cfg, num_train: int):
        self.num_train = num_train
        self.optim = cfg.optim
        self.sched = cfg.schedule
        self.follow = cfg.batch.lr_follows_batch
        self.phases = batch_phases(cfg.batch.phases, cfg.batch.global_batch, num_train)
        if cfg.train.steps is not None:
            self.total_steps = int(cfg.train.steps)
        else:
            self.total_steps = max(step_at_examples(self.phases, cfg.train.epochs * num_train), 1)
        first = self.phases[0].global_batch
        if self.sched.warmup_steps is not None:
            self.warmup_steps = int(self.sched.warmup_steps)
        else:
            self.warmup_steps = round(self.sched.warmup_epochs * num_train / first)
        if self.warmup_steps > self.total_steps:
            key = "schedule.warmup_steps" if self.sched.warmup_steps is not None else "schedule.warmup_epochs"
            raise ConfigError(key, f"warmup ({self.warmup_steps} steps) is longer than training ({self.total_steps} steps)")
        self.milestones = tuple(step_at_examples(self.phases, m * num_train) for m in self.sched.milestones)
        ws = self.sched.warmup_start
        # Goyal's gradual warmup ramps up from the small-batch lr; below base_batch the scaled
        # peak is smaller than base_lr, and a "warmup" from base_lr would ramp down.
        self.warmup_start_lr = min(self.optim.base_lr, self.peak_lr()) if ws == "base" else float(ws)

    def batch_at(self, step: int) -> int:
        return phase_at(self.phases, step).global_batch

    def examples_at(self, step: int) -> int:
        return examples_before(self.phases, step)

    def peak_lr(self, global_batch: int | None = None) -> float:
        b = global_batch if (global_batch is not None and self.follow) else self.phases[0].global_batch
        return scaled_lr(self.optim.base_lr, b, self.optim.base_batch, self.optim.scaling)

    def adamw_settings(self) -> tuple[list[float], float]:
        """(betas, weight_decay) of the run at its global batch: optim.betas and optim.weight_decay,
        or the rules' values when optim.beta2_scaling / optim.timescale are set (the config refuses
        them with batch phases or an adaptive batch, so the run has one batch)."""
        o, batch = self.optim, self.phases[0].global_batch
        b1, b2 = o.betas
        if o.beta2_scaling == "tokens":
            b2 = beta2_for_batch(b2, batch, o.base_batch)
        wd = o.weight_decay if o.timescale is None else timescale_weight_decay(batch, self.peak_lr(batch), o.timescale,
                                                                               self.num_train)
        return [b1, b2], wd

    def optim_config(self):
        """optim section with the batch-coupled AdamW settings filled in (what the optimizer is built from)."""
        betas, wd = self.adamw_settings()
        return dataclasses.replace(self.optim, betas=betas, weight_decay=wd)

    def lr_at(self, step: int, global_batch: int | None = None) -> float:
        """lr at `step`; the peak follows `global_batch` (default: the phase's batch)."""
        batch = global_batch if global_batch is not None else self.batch_at(step)
        return lr_at(
            step,
            peak_lr=self.peak_lr(batch),
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            warmup_start_lr=self.warmup_start_lr,
            warmup_shape=self.sched.warmup_shape,
            decay=self.sched.name,
            milestones=self.milestones,
            factor=self.sched.factor,
            power=self.sched.power,
            end_lr=self.sched.end_lr,
        )

    def summary(self) -> dict:
        return {
            "base_lr": self.optim.base_lr,
            "base_batch": self.optim.base_batch,
            "scaling": self.optim.scaling,
            "global_batch": self.phases[0].global_batch,
            "peak_lr": self.peak_lr(self.phases[0].global_batch),
            "betas": self.adamw_settings()[0],
            "weight_decay": self.adamw_settings()[1],
            "warmup_steps": self.warmup_steps,
            "warmup_start_lr": self.warmup_start_lr,
            "warmup_shape": self.sched.warmup_shape,
            "decay": self.sched.name,
            "milestone_steps": list(self.milestones),
            "total_steps": self.total_steps,
            "epochs": self.examples_at(self.total_steps) / self.num_train,
            "batch_phases": [
                {"from_epoch": p.from_epoch, "start_step": p.start_step, "global_batch": p.global_batch,
                 "peak_lr": self.peak_lr(p.global_batch)}
                for p in self.phases
            ],
        }

    def describe(self) -> str:
        s = self.summary()
        line = (
            f"lr: base {s['base_lr']:g} per {s['base_batch']} ({s['scaling']} rule) -> peak {s['peak_lr']:g} "
            f"at global batch {s['global_batch']}; {'constant ' if s['warmup_shape'] == 'constant' else ''}warmup {s['warmup_steps']} steps from {s['warmup_start_lr']:g}; "
            f"{s['decay']} decay; {s['total_steps']} steps ({s['epochs']:.2f} epochs)"
        )
        if self.optim.beta2_scaling != "none" or self.optim.timescale is not None:
            line += (f"; AdamW beta2 {s['betas'][1]:.6g} ({self.optim.beta2_scaling}), weight decay {s['weight_decay']:.4g}"
                     + (f" (timescale {self.optim.timescale:g} epochs)" if self.optim.timescale is not None else ""))
        if len(self.phases) > 1:
            line += "; batch phases " + ", ".join(
                f"epoch {p['from_epoch']:g} (step {p['start_step']}): {p['global_batch']} @ lr {p['peak_lr']:g}"
                for p in s["batch_phases"]
            )
        return line
