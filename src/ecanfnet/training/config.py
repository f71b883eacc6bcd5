"""The settings of a training run (TrainConfig), the recipe's defaults, their resolution for one run, and the
learning-rate schedule they give.

A TrainConfig is frozen: `resolve` returns a copy with every "None: a default" setting filled in, once,
before the run starts; the training state records those resolved settings (run_settings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import TrainingError
from ..folded import PRECISIONS
from ..weights import WeightsSource
from .data import DEFAULT_CROP_SCALE

AUTOCAST_DTYPES = PRECISIONS  # precision name -> the dtype autocast computes in (fp32: autocast off)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; the defaults are the card's recipe scaled to small datasets."""

    data: str
    output: str
    val: str | None = None
    val_split: float = 0.1
    weights: WeightsSource | None = None       # None: the published checkpoint
    from_scratch: bool = False
    epochs: int | None = None                   # None: default_epochs(from_scratch, steps per epoch)
    batch_size: int = 32
    lr: float | None = None                     # None: default_lr(global batch, from_scratch)
    weight_decay: float = 2e-5                  # not applied to gains and biases
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    agc_clip: float = 0.015                     # 0 disables AGC
    drop_rate: float = 0.2
    drop_path_rate: float = 0.1
    image_size: int | None = None               # None: the checkpoint's input_size (224 for L0's weights)
    randaugment: bool = True
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE  # RandomResizedCrop area range
    hflip: float = 0.5                          # horizontal flip probability
    freeze_backbone: bool = False
    accum_steps: int = 1                        # gradient accumulation: optimizer step every N batches
    precision: str = "fp32"                     # "bf16" (autocast) or "fp16" (autocast + grad scaler; emulated on CPU)
    ema_decay: float = 0.0                      # e.g. 0.9998; 0 disables the weight EMA
    mixup: float = 0.0                          # MixUp alpha; 0 disables
    cutmix: float = 0.0                         # CutMix alpha; 0 disables (both on: one per batch)
    workers: int = 0
    seed: int = 0
    deterministic: bool = False
    resume: bool = False                        # continue OUT's training state (also implied by a torchrun restart)
    resume_with_changes: bool = False           # resume even where settings differ from the run's (refused otherwise)
    overwrite: bool = False                     # replace the model / training state already in OUT
    progress: bool = True
    device: str | None = None                   # without a DistContext: where the lone process trains (None: the GPU
                                                # when CUDA is available, else the CPU); with one: "cuda" is its GPU


# From random init on a small dataset the card's rate moves too slowly under AGC 0.015, and 10 epochs
# are too few: on the digits benchmark 1x/10 epochs reached 61 % val top-1, 8x/10 epochs 82 %,
# 8x/30 epochs 93 %, with crops kept above 35 % of the area 96 % after 30 epochs, 96.7 % after 40 and
# 97.2 % after 60 (docs/benchmarks.md).
FROM_SCRATCH_LR_MULTIPLIER = 8.0
FINE_TUNE_EPOCHS, FROM_SCRATCH_EPOCHS = 10, 60
# A small folder gives few steps per epoch: 20 images in each of 5 classes is 3 batches of 32, so 10 epochs
# would be 30 SGD steps; fine-tuned that way a backbone reached 55 % where 100 epochs reached 89 %
# (docs/benchmarks.md, few-shot digits). So the default epochs always give at least this many steps.
MIN_DEFAULT_STEPS = 300


def default_epochs(from_scratch: bool, steps_per_epoch: int) -> int:
    """10 epochs to fine-tune, 60 from random init, and in both cases at least MIN_DEFAULT_STEPS optimizer steps."""
    base = FROM_SCRATCH_EPOCHS if from_scratch else FINE_TUNE_EPOCHS
    return max(base, math.ceil(MIN_DEFAULT_STEPS / steps_per_epoch))


def default_lr(global_batch: int, from_scratch: bool = False) -> float:
    """Peak learning rate: 0.1 x global batch / 256 (NFNet paper) to fine-tune; 8x that from random init."""
    return 0.1 * global_batch / 256 * (FROM_SCRATCH_LR_MULTIPLIER if from_scratch else 1.0)


def steps_per_epoch(cfg: TrainConfig, train_images: int, world: int) -> int:
    """Optimizer steps in one epoch: a rank's share of the images, in batches, in groups of accum_steps."""
    per_rank = math.ceil(train_images / world)
    return max(1, math.ceil(math.ceil(per_rank / cfg.batch_size) / cfg.accum_steps))


def resolve(cfg: TrainConfig, *, image_size: int, steps: int, world: int) -> TrainConfig:
    """A copy of cfg with epochs, lr and image_size filled in where they are None; refuses an unknown precision.

    image_size: the checkpoint's own; steps: steps_per_epoch; world: the number of processes."""
    if cfg.precision not in AUTOCAST_DTYPES:
        raise TrainingError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {cfg.precision!r}")
    return replace(
        cfg,
        epochs=cfg.epochs if cfg.epochs is not None else default_epochs(cfg.from_scratch, steps),
        lr=cfg.lr if cfg.lr is not None else default_lr(cfg.batch_size * cfg.accum_steps * world, cfg.from_scratch),
        image_size=cfg.image_size if cfg.image_size is not None else image_size)


def describe_resolved(cfg: TrainConfig, steps: int, world: int) -> str:
    """One line with the values resolve decides: epochs, peak learning rate, image size (and what they rest on)."""
    return (f"training {cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} of {steps} optimizer steps (global batch "
            f"{cfg.batch_size * cfg.accum_steps * world}), peak learning rate {cfg.lr:g}, image size {cfg.image_size}")


# TrainConfig fields a resume may change: those that steer the run rather than decide its result, and
# epochs (to train a finished run longer; the learning-rate schedule then stretches to the new length).
RESUMABLE_CHANGES = ("output", "workers", "resume", "resume_with_changes", "overwrite", "progress", "device",
                     "epochs")


def run_settings(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """What decides a resolved run's result (with the number of processes): saved with its training state."""
    settings = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in RESUMABLE_CHANGES}
    settings.update(processes=world)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}  # plain types: weights_only


def changed_settings(saved: Any, now: dict[str, Any]) -> list[str]:
    """'name: was X, now Y' for each setting a resumed run changes (none for a state saved before settings were)."""
    if not isinstance(saved, dict):
        return []
    return [f"{k}: was {saved.get(k)!r}, now {v!r}" for k, v in now.items() if k in saved and saved[k] != v]


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up to peak over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each optimizer step of a resolved run: warm-up, then cosine to 0 after the last epoch."""

    steps_per_epoch: int
    total: int
    warmup: int
    peak: float

    @classmethod
    def of(cls, cfg: TrainConfig, steps: int) -> Schedule:
        """The schedule of a resolved cfg with `steps` optimizer steps per epoch."""
        return cls(steps, cfg.epochs * steps, round(cfg.warmup_epochs * steps), cfg.lr)

    def lr(self, epoch: int, step: int) -> float:
        """The learning rate of optimizer step `step` of epoch `epoch` (both from 0)."""
        return lr_at(epoch * self.steps_per_epoch + step, self.total, self.warmup, self.peak)
