"""Options several commands share, the argparse types that check values, and the help layout (no heavy imports)."""

from __future__ import annotations

import argparse
import math
from typing import Callable, Sequence

from ..choices import BACKENDS, DECODE_MODES, RUN_PRECISIONS

BACKEND_CHOICES = ("auto", *BACKENDS)
OUTPUT_FORMATS = ("table", "json")
PUBLISHED_WEIGHTS = "hf-hub:timm/eca_nfnet_l0"
WEIGHTS_HELP = f"default: {PUBLISHED_WEIGHTS}"
WEIGHTS_SOURCES_HELP = ("hf-hub:OWNER/REPO, a hub-layout folder, a .safetensors or a .pth/.bin file "
                        f"(default: {PUBLISHED_WEIGHTS})")
DEVICE_HELP = "auto (default: CUDA if available), cpu, cuda, cuda:1, mps"


class HelpFormatter(argparse.HelpFormatter):
    """argparse's layout, except that text with line breaks (a command's examples) is printed as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" not in text:  # a description: wrapped to the terminal as usual
            return super()._fill_text(text, width, indent)
        return "".join(indent + line for line in text.splitlines(keepends=True))


def examples_epilog(examples: Sequence[tuple[str, str]]) -> str:
    """The `examples:` block that ends a command's --help: each command line under a `# what it does` line."""
    blocks = [f"  # {what}\n  {command}" for what, command in examples]
    return "examples:\n" + "\n\n".join(blocks)


def add_command(subparsers: argparse._SubParsersAction, name: str, *, help: str, description: str,
                examples: Sequence[tuple[str, str]]) -> argparse.ArgumentParser:
    """The parser of subcommand `name`, its --help ending in the examples."""
    return subparsers.add_parser(name, help=help, description=description, epilog=examples_epilog(examples),
                                 formatter_class=HelpFormatter)


# --- argparse types: a value in range, or an ArgumentTypeError saying "must be <rule>, got TEXT" ---------

def int_in(lo: int, hi: int | None = None, what: str | None = None) -> Callable[[str], int]:
    """argparse type factory: a whole number lo..hi (no upper bound when hi is None), written in ASCII digits.

    what: the rule in the error "must be <what>, got TEXT" (default "an integer from LO to HI" / ">= LO").
    """
    what = what or (f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}")

    def parse(text: str) -> int:
        # Digits only: int() would also take "+8", " 8", "1_0" and non-ASCII digits.
        try:
            value = int(text) if text.isascii() and text.isdigit() else None
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


positive_int = int_in(1, what="a positive integer")
non_negative_int = int_in(0)                          # e.g. --workers, where 0 means in-process
seed = int_in(0, 2 ** 32 - 1, "an integer in [0, 2**32)")  # epoch seeds are derived from it by multiplication
port_number = int_in(1, 65535, "a TCP port between 1 and 65535")


def image_side(text: str) -> int:
    """argparse type of --image-size: a side a checkpoint may record (metadata.MIN_IMAGE_SIDE..MAX_IMAGE_SIDE)."""
    from .. import metadata  # read at each call, not copied: the bounds are the checkpoint validator's

    return int_in(metadata.MIN_IMAGE_SIDE, metadata.MAX_IMAGE_SIDE)(text)


def float_in(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
             hi_open: bool = False) -> Callable[[str], float]:
    """argparse type factory: a finite float in [lo, hi], each end excluded when lo_open / hi_open (nan refused)."""
    if math.isinf(hi):
        what = f"a number {'>' if lo_open else '>='} {lo:g}" if math.isfinite(lo) else "a finite number"
    else:
        what = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


probability = float_in(0.0, 1.0)                       # [0, 1]
fraction_below_one = float_in(0.0, 1.0, hi_open=True)  # [0, 1): smoothing, dropout, EMA decay
non_negative_float = float_in(0.0)                     # >= 0, finite
positive_float = float_in(0.0, lo_open=True)           # > 0, finite


def device_name(text: str) -> str:
    """argparse type of --device: 'auto' or a device torch can name (whether it exists is checked later)."""
    if text == "auto":
        return text
    import torch

    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return text


# --- options shared by several commands ------------------------------------------------------------------

def add_weights_option(parser: argparse._ActionsContainer, help: str = WEIGHTS_HELP) -> None:
    """--weights SRC (default None: the published checkpoint, unless help says otherwise)."""
    parser.add_argument("--weights", metavar="SRC", default=None, help=help)


def add_device_option(parser: argparse.ArgumentParser, help: str = DEVICE_HELP) -> None:
    """--device NAME, checked to be a device name while parsing."""
    parser.add_argument("--device", type=device_name, default="auto", help=help)


def add_format_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """--format table (default) or json."""
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table", help=help)


def add_progress_option(parser: argparse.ArgumentParser, help: str = "no progress bar on stderr") -> None:
    """--no-progress: no progress bars on stderr."""
    parser.add_argument("--no-progress", action="store_true", help=help)


def add_tta_option(parser: argparse.ArgumentParser) -> None:
    """--tta: flip test-time augmentation (the runner wrapped in backends.with_flip_tta)."""
    parser.add_argument("--tta", action="store_true",
                        help="flip test-time augmentation: the mean logits of each image and its mirror image "
                             "(twice the compute)")


def add_backend_options(parser: argparse.ArgumentParser) -> None:
    """--backend and --precision of the inference commands."""
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                        help="auto (default: the fastest exact backend installed, on CPU openvino, else "
                             "onnxruntime, when there are many images; else torch), torch, compile, onnxruntime, "
                             "openvino")
    parser.add_argument("--precision", choices=RUN_PRECISIONS, default=None,
                        help="default: the weights' own, fp32 (exact), or int8 for an INT8 folder from "
                             "`ecanfnet quantize`; bf16 (CUDA, or CPUs with native bf16), fp16 (CUDA)")


def add_decode_option(parser: argparse.ArgumentParser, *, fast_switch: bool = True) -> None:
    """--decode, and unless fast_switch is False the --fast switch (see apply_fast_switch)."""
    parser.add_argument("--decode", choices=DECODE_MODES, default="exact",
                        help="exact (default: the same pixels as timm) or fast: JPEGs decoded at 1/2, 1/4 or 1/8 "
                             "scale in libjpeg, never below twice the resized size (faster on large photos, not "
                             "bit-equal)")
    if fast_switch:
        parser.add_argument("--fast", action="store_true",
                            help="the fastest path, not exact: --decode fast, the fastest backend, and the quickest "
                                 "precision (int8 for an INT8 folder from `ecanfnet quantize`, else bf16 where the "
                                 "hardware has it natively, else fp32); an explicit --precision still wins")


def apply_fast_switch(args: argparse.Namespace) -> None:
    """--fast: decode fast and, unless --precision was given, the library's "fastest" precision."""
    if getattr(args, "fast", False):
        args.decode, args.precision = "fast", args.precision or "fastest"
