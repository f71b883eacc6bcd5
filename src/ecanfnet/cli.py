"""`ecanfnet` command line: parses arguments and calls the library (heavy imports stay lazy)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

from . import __version__

if TYPE_CHECKING:
    from .inference import ImageResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="ecanfnet", description="ECA-NFNet-L0 image classifier.")
    parser.add_argument("--version", action="version", version=f"ecanfnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="classify images into the checkpoint's classes",
                       description="Classify image files, folders (searched recursively) and globs.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob")
    p.add_argument("--weights", metavar="SRC", default=None,
                   help="hf-hub:OWNER/REPO, a hub-layout folder, a .safetensors or a .pth/.bin file "
                        "(default: hf-hub:timm/eca_nfnet_l0)")
    p.add_argument("--top-k", type=_positive_int, default=5, metavar="K", help="classes per image (default 5)")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N", help="images per forward pass (default 16)")
    p.add_argument("--format", choices=("table", "json"), default="table",
                   help="table (default) or json: one JSON object per image per line")
    p.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="image decoding threads (default: number of CPUs, at most 8)")
    p.add_argument("--max-pixels", type=_positive_int, default=None, metavar="N",
                   help="refuse images with more pixels than this (default 89,478,485)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_predict)
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def run_predict(args: argparse.Namespace) -> int:
    """Classify every image named on the command line; exit 1 if any failed."""
    from tqdm import tqdm

    from .inference import Classifier, find_images
    from .transforms import MAX_IMAGE_PIXELS
    from .weights import WeightsError

    paths, problems = find_images(args.paths)
    try:
        classifier = Classifier.from_pretrained(args.weights, None if args.device == "auto" else args.device)
    except WeightsError as exc:
        print(f"ecanfnet: error: {exc}", file=sys.stderr)
        return EXIT_FAILED

    emit = _print_json if args.format == "json" else _print_table
    failed = 0
    for result in problems:
        emit(result, tqdm.write)
        failed += 1
    bar = tqdm(total=len(paths), unit="img", file=sys.stderr, dynamic_ncols=True,
               disable=args.no_progress or len(paths) < 2)
    with bar:
        for result in classifier.predict_files(paths, args.top_k, args.batch_size, args.workers,
                                               args.max_pixels or MAX_IMAGE_PIXELS):
            emit(result, bar.write)
            failed += not result.ok
            bar.update(1)
    if failed:
        print(f"ecanfnet: {failed} of {len(paths) + len(problems)} inputs failed", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _print_json(result: ImageResult, write: Callable[..., None]) -> None:
    write(json.dumps(result.to_dict(), ensure_ascii=False), file=sys.stdout)
    sys.stdout.flush()


def _print_table(result: ImageResult, write: Callable[..., None]) -> None:
    lines = [result.path]
    if result.error is not None:
        lines.append(f"    error: {result.error}")
    for rank, p in enumerate(result.predictions or [], 1):
        lines.append(f"    {rank}. {100 * p.score:6.2f}%  {p.label}  [{p.index}]")
    write("\n".join(lines), file=sys.stdout)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ecanfnet` console script."""
    args = build_parser().parse_args(argv)
    from PIL import Image

    # load_image enforces its own pixel limit with a per-file error; PIL's warning would only repeat it.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    warnings.formatwarning = lambda msg, category, *a, **k: f"ecanfnet: warning: {msg}\n"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ecanfnet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
