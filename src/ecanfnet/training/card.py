"""What a training run tells its model card (publish.RunSummary): the starting weights, the data, the resolved
recipe and the metrics so far. The card itself is written by publish.write_model_card."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..metadata import PretrainedCfg
from ..publish import RunSummary
from .config import TrainConfig

PRECISION_TEXT = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with a gradient scaler"}


@dataclass(frozen=True)
class RunFacts:
    """What stays fixed over a resolved run: its settings, processes, classes and images per class."""

    cfg: TrainConfig
    world: int
    architecture: str
    classes: tuple[str, ...]
    train_images: tuple[int, ...]
    val_images: tuple[int, ...]
    preprocessing: str

    @classmethod
    def of(cls, cfg: TrainConfig, *, world: int, architecture: str, pretrained_cfg: PretrainedCfg,
           classes: Sequence[str], train_samples: Sequence[tuple[str, int]],
           val_samples: Sequence[tuple[str, int]]) -> RunFacts:
        """The facts of a resolved cfg, from its samples ((path, class index) pairs) and the model's metadata."""
        return cls(cfg, world, architecture, tuple(classes), _per_class(train_samples, len(classes)),
                   _per_class(val_samples, len(classes)), preprocessing_text(pretrained_cfg))

    def summary(self, history: Sequence[dict[str, Any]]) -> RunSummary:
        """The card's view of the run after the epochs in history."""
        cfg = self.cfg
        return RunSummary(
            name=_folder_name(cfg.output), base_weights=base_weights(cfg), classes=self.classes,
            train_images=self.train_images, val_images=self.val_images, validation=validation_text(cfg),
            image_size=int(cfg.image_size), preprocessing=self.preprocessing, recipe=recipe_rows(cfg, self.world),
            history=tuple(dict(row) for row in history), epochs=int(cfg.epochs), architecture=self.architecture)


def base_weights(cfg: TrainConfig) -> str | None:
    """The source a run starts from (the published checkpoint by default); None from scratch."""
    if cfg.from_scratch:
        return None
    return os.fspath(cfg.weights) if cfg.weights is not None else "hf-hub:timm/eca_nfnet_l0"


def validation_text(cfg: TrainConfig) -> str:
    """Where the validation images came from, without local paths beyond a folder's name."""
    if cfg.val:
        return f"the separate folder {_folder_name(cfg.val)}"
    return f"a random {cfg.val_split:.0%} of the images, held out from training (seed {cfg.seed})"


def preprocessing_text(pretrained_cfg: PretrainedCfg) -> str:
    """The test-time preprocessing in words: resize, crop, interpolation, normalisation."""
    settings = pretrained_cfg.eval_settings()
    height, width = settings["image_size"]
    mean = ", ".join(f"{v:g}" for v in settings["mean"])
    std = ", ".join(f"{v:g}" for v in settings["std"])
    if settings["crop_mode"] == "center":
        resize = (f"the shorter side resized to {math.floor(height / settings['crop_pct'])} "
                  f"({settings['interpolation']}) and the central {height}x{width} kept")
    else:
        resize = f"resized to {height}x{width} ({settings['interpolation']}, crop mode {settings['crop_mode']})"
    return f"{resize}, scaled to [0, 1] and normalised with mean ({mean}) and standard deviation ({std})"


def recipe_rows(cfg: TrainConfig, world: int) -> tuple[tuple[str, str], ...]:
    """(setting, value) rows of the resolved settings that decide the result."""
    global_batch = cfg.batch_size * cfg.accum_steps * world
    mixing = [f"MixUp alpha {cfg.mixup:g}"] * bool(cfg.mixup) + [f"CutMix alpha {cfg.cutmix:g}"] * bool(cfg.cutmix)
    augment = ", ".join([f"RandomResizedCrop keeping {cfg.crop_scale[0]:.0%}-{cfg.crop_scale[1]:.0%} of the area",
                         f"horizontal flip {cfg.hflip:g}", *(["RandAugment(2, 9)"] * cfg.randaugment), *mixing])
    return (
        ("epochs", str(cfg.epochs)),
        ("batch", f"{global_batch} images per optimizer step ({cfg.batch_size} per process x {cfg.accum_steps} "
                  f"accumulation x {world} process{'es' * (world != 1)})"),
        ("optimizer", f"SGD, Nesterov momentum {cfg.momentum:g}, weight decay {cfg.weight_decay:g} (not on gains "
                      "and biases)"),
        ("learning rate", f"peak {cfg.lr:g}, linear warm-up over {cfg.warmup_epochs:g} epochs, then cosine decay "
                          "to 0"),
        ("label smoothing", f"{cfg.label_smoothing:g}"),
        ("gradient clipping", f"adaptive (AGC) {cfg.agc_clip:g}, unit-wise, not on the classifier"
         if cfg.agc_clip > 0 else "none"),
        ("augmentation", augment),
        ("regularisation", f"dropout {cfg.drop_rate:g} before the classifier, stochastic depth {cfg.drop_path_rate:g}"),
        ("trained layers", "the classifier only (backbone frozen)" if cfg.freeze_backbone else "all"),
        ("precision", PRECISION_TEXT.get(cfg.precision, cfg.precision)),
        ("weight EMA", f"decay {cfg.ema_decay:g}; the average is what was validated and saved"
         if cfg.ema_decay else "none"),
        ("image size", f"{cfg.image_size}x{cfg.image_size}"),
        ("seed", f"{cfg.seed}{', deterministic kernels' if cfg.deterministic else ''}"),
    )


def _per_class(samples: Sequence[tuple[str, int]], num_classes: int) -> tuple[int, ...]:
    counts = [0] * num_classes
    for _, label in samples:
        counts[label] += 1
    return tuple(counts)


def _folder_name(path: str | os.PathLike) -> str:
    """A folder's own name (never the path to it: a card is published)."""
    return Path(os.path.abspath(path)).name or os.fspath(path)
