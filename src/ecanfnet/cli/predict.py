"""`ecanfnet predict`: top-k classes of image files, folders and globs, as a table or JSON lines."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Callable

from ..console import json_line, printable
from ._console import EXIT_FAILED, EXIT_OK
from ._options import (
    WEIGHTS_SOURCES_HELP, add_backend_options, add_command, add_decode_option, add_device_option,
    add_format_option, add_progress_option, add_weights_option, positive_int)
from ._runtime import backend_for, device_for, load_model, torch_device

if TYPE_CHECKING:
    from ..inference import ImageResult

EXAMPLES = (
    ("the five most likely ImageNet classes of one photo", "ecanfnet predict cat.jpg"),
    ("a folder (searched recursively) and a glob, top 3, one JSON object per image",
     "ecanfnet predict photos/ 'holiday/**/*.jpg' --top-k 3 --format json > predictions.jsonl"),
    ("your fine-tuned model on the fastest path (fast decode, fastest backend and precision)",
     "ecanfnet predict --weights runs/flowers --fast photos/"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the predict parser."""
    p = add_command(subparsers, "predict", help="classify images into the checkpoint's classes",
                    description="Classify image files, folders (searched recursively) and globs.", examples=EXAMPLES)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob")
    add_weights_option(p, WEIGHTS_SOURCES_HELP)
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K", help="classes per image (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="images per forward pass (default 16)")
    add_format_option(p, "table (default) or json: one JSON object per image per line")
    add_device_option(p)
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="image decoding threads (default: number of CPUs, at most 8)")
    p.add_argument("--max-pixels", type=positive_int, default=None, metavar="N",
                   help="refuse images with more pixels than this (default 89,478,485)")
    add_progress_option(p, "no progress bar on stderr")
    add_decode_option(p)
    add_backend_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Classify every image named on the command line; exit 1 if any failed."""
    from ..files import find_images
    from ..inference import Classifier, ImageResult
    from ..progress import progress
    from ..transforms import MAX_IMAGE_PIXELS

    device = torch_device(args.device)
    paths, problems = find_images(args.paths)
    model = load_model(args.weights)
    classifier = Classifier(model, device_for(args.device, model, device),
                            backend_for(args.backend, len(paths), args.weights), args.precision,
                            batch_size=args.batch_size)
    del model  # the classifier keeps it where it runs it; otherwise the runtime holds the weights

    emit = _print_json if args.format == "json" else _print_table
    failed = 0
    bar = progress(len(paths), "predict", enabled=not args.no_progress and len(paths) >= 2)
    for problem in problems:
        emit(ImageResult(problem.path, error=problem.error), bar.write)
        failed += 1
    with bar:
        for result in classifier.predict_files(paths, args.top_k, args.batch_size, args.workers,
                                               args.max_pixels or MAX_IMAGE_PIXELS, args.decode):
            emit(result, bar.write)
            failed += not result.ok
            bar.update(1)
    if failed:
        print(f"ecanfnet: {failed} of {len(paths) + len(problems)} inputs failed", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _print_json(result: ImageResult, write: Callable[..., None]) -> None:
    """One JSON object for the image."""
    write(json_line(result.to_dict()), file=sys.stdout)
    sys.stdout.flush()


def _print_table(result: ImageResult, write: Callable[..., None]) -> None:
    """The path, then its error or one line per class: rank, score, label and index."""
    lines = [printable(result.path)]
    if result.error is not None:
        lines.append(f"    error: {printable(result.error)}")
    for rank, p in enumerate(result.predictions or [], 1):
        lines.append(f"    {rank}. {100 * p.score:6.2f}%  {printable(p.label)}  [{p.index}]")
    write("\n".join(lines), file=sys.stdout)
    sys.stdout.flush()
