"""`ecanfnet train`: fine-tune (or train from scratch) on an image folder with the model card's recipe."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from ..choices import FLOAT_PRECISIONS
from ..console import printable
from ..errors import TrainingError
from ._console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error
from ._options import (
    PUBLISHED_WEIGHTS, add_command, add_progress_option, add_weights_option, float_in, fraction_below_one,
    image_side, non_negative_float, non_negative_int, positive_float, positive_int, probability, seed)

if TYPE_CHECKING:
    from ..training.config import TrainConfig

EXAMPLES = (
    ("fine-tune the published checkpoint; 10% of the images are held out for validation",
     "ecanfnet train --data flowers/ --output runs/flowers"),
    ("from scratch, for digits and other images that must not be mirrored",
     "ecanfnet train --data digits/ --output runs/digits --from-scratch --hflip 0"),
    ("on 2 GPUs of this machine; after an interruption, the same command with --resume continues the run",
     "torchrun --nproc-per-node 2 -m ecanfnet train --data flowers/ --output runs/flowers-2gpu"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the train parser."""
    t = add_command(subparsers, "train", help="fine-tune (or train from scratch) on an image folder",
                    description="Train on DATA/CLASS_NAME/IMAGE files with the model card's recipe: "
                                "SGD Nesterov, cosine decay with warm-up, AGC 0.015, label smoothing, "
                                "RandAugment, dropout and stochastic depth. OUT becomes a folder to publish "
                                "(best weights, config.json with the labels, README.md model card); the training "
                                "state, metrics.csv (losses, accuracy, learning rate, time, images/s, AGC clipping), curves.png and "
                                "TensorBoard events go to OUT.training beside it.",
                    examples=EXAMPLES)
    _add_data_options(t)
    _add_recipe_options(t)
    _add_augmentation_options(t)
    _add_run_options(t)
    t.set_defaults(func=run)
    return t


def _add_data_options(t: argparse.ArgumentParser) -> None:
    """Where the images come from and the model goes, and the starting weights."""
    t.add_argument("--data", required=True, metavar="DIR", help="training images, one subfolder per class")
    t.add_argument("--output", required=True, metavar="OUT",
                   help="folder for the trained model and its card (the training state and logs go to "
                        "OUT.training beside it); one that already holds a model or training state is refused "
                        "unless --resume or --overwrite")
    val = t.add_mutually_exclusive_group()
    val.add_argument("--val", metavar="DIR", help="validation images (same class folders)")
    val.add_argument("--val-split", type=float_in(0.0, 1.0, lo_open=True, hi_open=True), default=0.1,
                     metavar="F", help="hold out this fraction of --data for validation (default 0.1)")
    start = t.add_mutually_exclusive_group()
    add_weights_option(start, f"starting weights (default: {PUBLISHED_WEIGHTS})")
    start.add_argument("--from-scratch", action="store_true", help="random initialisation instead")


def _add_recipe_options(t: argparse.ArgumentParser) -> None:
    """Schedule, optimizer and regularisation."""
    t.add_argument("--epochs", type=positive_int, default=None,
                   help="default 10 when fine-tuning, 60 with --from-scratch; more when that is under 300 "
                        "optimizer steps")
    t.add_argument("--batch-size", type=positive_int, default=32, help="images per step on each process (default 32)")
    t.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default 0.1 x global batch / 256; 8x that with --from-scratch)")
    t.add_argument("--weight-decay", type=non_negative_float, default=2e-5, help="not applied to gains and biases")
    t.add_argument("--warmup-epochs", type=non_negative_float, default=1.0,
                   help="linear learning-rate warm-up before the cosine decay (default 1.0)")
    t.add_argument("--label-smoothing", type=fraction_below_one, default=0.1, help="default 0.1")
    t.add_argument("--agc", type=non_negative_float, default=0.015, metavar="CLIP", help="AGC factor; 0 disables it")
    t.add_argument("--drop-rate", type=fraction_below_one, default=0.2, help="dropout before the classifier")
    t.add_argument("--drop-path-rate", type=fraction_below_one, default=0.1, help="stochastic depth, last block")


def _add_augmentation_options(t: argparse.ArgumentParser) -> None:
    """Input size and augmentation."""
    t.add_argument("--image-size", type=image_side, default=None, metavar="S",
                   help="training and validation size (default: the starting checkpoint's, 224 for L0's weights)")
    t.add_argument("--no-randaugment", action="store_true", help="train without RandAugment (rand-m6-mstd0.5)")
    t.add_argument("--crop-scale", type=float_in(0.0, 1.0, lo_open=True), nargs=2, default=None,
                   metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range (default 0.35 1.0; ImageNet's from-scratch range is 0.08 1.0)")
    t.add_argument("--hflip", type=probability, default=0.5, metavar="P",
                   help="horizontal flip probability (default 0.5; 0 for text, digits and other mirror-sensitive "
                        "images)")
    t.add_argument("--freeze-backbone", action="store_true", help="train the classifier only (linear probe)")


def _add_run_options(t: argparse.ArgumentParser) -> None:
    """Accumulation, precision, EMA, mixing, loading, reproducibility, and what to do with an existing OUT."""
    t.add_argument("--accum-steps", type=positive_int, default=1, metavar="N",
                   help="gradient accumulation: one optimizer step every N batches")
    t.add_argument("--precision", choices=FLOAT_PRECISIONS, default="fp32",
                   help="bf16: autocast mixed precision; fp16: autocast with a gradient scaler (CUDA; emulated on "
                        "CPU), AGC applied to the unscaled gradients")
    t.add_argument("--ema-decay", type=fraction_below_one, default=0.0, metavar="D",
                   help="keep an EMA of the weights (e.g. 0.9998); it is what gets validated and saved")
    t.add_argument("--mixup", type=non_negative_float, default=0.0, metavar="ALPHA", help="MixUp alpha (0: off)")
    t.add_argument("--cutmix", type=non_negative_float, default=0.0, metavar="ALPHA", help="CutMix alpha (0: off)")
    t.add_argument("--workers", type=non_negative_int, default=2,
                   help="data loading processes (default 2; 0 loads in the training process)")
    t.add_argument("--seed", type=seed, default=0, help="seed of the split, initialisation and augmentation (default 0)")
    t.add_argument("--deterministic", action="store_true", help="deterministic kernels (exact reruns on CPU)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue OUT from its last finished epoch (refused, naming them, if settings that "
                            "decide the result differ from the run's; --epochs may grow)")
    t.add_argument("--resume-with-changes", action="store_true",
                   help="with --resume: accept settings that differ from the run's, applied from the next epoch")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the model and training state already in OUT (a new run from epoch 0)")
    add_progress_option(t)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of the parsed options: each field from the option of its name, or as renamed below."""
    from ..training.config import TrainConfig
    from ..training.data import DEFAULT_CROP_SCALE

    options = {**vars(args),  # the fields whose option has another name or sense:
               "agc_clip": args.agc, "randaugment": not args.no_randaugment, "progress": not args.no_progress,
               "crop_scale": tuple(args.crop_scale or DEFAULT_CROP_SCALE)}
    return TrainConfig(**{f.name: options[f.name] for f in dataclasses.fields(TrainConfig) if f.name in options})


def run(args: argparse.Namespace) -> int:
    """Train and report where the model went."""
    from ..distributed import distributed_context
    from ..training.loop import train

    if args.crop_scale and args.crop_scale[0] > args.crop_scale[1]:
        error(f"argument --crop-scale: MIN must not exceed MAX, got {args.crop_scale[0]:g} {args.crop_scale[1]:g}")
        return EXIT_USAGE
    try:
        with distributed_context() as context:  # under torchrun: this rank's place in the group
            out = train(train_config(args), context=context)
    except (TrainingError, FileNotFoundError, ValueError) as exc:
        error(str(exc))
        return EXIT_FAILED
    if context.rank == 0:  # under torchrun every rank returns here; one line is enough
        print(printable(f"trained model in {out} (predict with: ecanfnet predict --weights {out} IMAGES; publish "
                        f"with: ecanfnet push {out} OWNER/REPO)"))
    return EXIT_OK
