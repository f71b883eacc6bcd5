"""`ecanfnet predict`: top-k classes of image files, folders and globs, as a table or JSON lines."""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from typing import TYPE_CHECKING, Callable

from ..console import json_line, printable
from ._console import EXIT_FAILED, EXIT_OK, error
from ._options import (
    WEIGHTS_SOURCES_HELP, add_backend_options, add_command, add_decode_option, add_device_option,
    add_format_option, add_progress_option, add_tta_option, add_weights_option, float_in, positive_int)
from ._runtime import backend_for, device_for, load_model, torch_device, weights_or_published
from ._stdin import STDIN, with_stdin_paths

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
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="image file, folder or glob; a lone - reads paths from stdin, one per line")
    add_weights_option(p, WEIGHTS_SOURCES_HELP)
    p.add_argument("--top-k", type=positive_int, default=5, metavar="K", help="classes per image (default 5)")
    p.add_argument("--min-score", type=float_in(), default=None, metavar="S",
                   help="open-set threshold: an image whose open-set score (cosine similarity to the closest "
                        "class, -1..1) is below S gets the label `unknown`; its predictions are still listed")
    add_tta_option(p)
    p.add_argument("--batch-size", type=positive_int, default=16, metavar="N",
                   help="images per forward pass (default 16)")
    add_format_option(p, "table (default) or json: one JSON object per image per line")
    p.add_argument("--output", default=None, metavar="OUT.jsonl",
                   help="write the JSON objects to this file instead, in resumable shards (rerun the same command "
                        "to resume); under torchrun each rank classifies its share")
    p.add_argument("--shard-size", type=positive_int, default=None, metavar="N",
                   help="images per resumable shard with --output (default 1024)")
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
    """Classify every image named on the command line (or on stdin, for -); exit 1 if any failed."""
    from ..files import find_images
    from ..inference import Classifier, ImageResult
    from ..progress import progress
    from ..transforms import MAX_IMAGE_PIXELS

    refusal = _input_refusal(args)
    if refusal is not None:
        error(refusal)
        return EXIT_FAILED
    try:
        args.paths = with_stdin_paths(args.paths, sys.stdin)
    except ValueError as exc:
        error(str(exc))
        return EXIT_FAILED
    if args.output is not None:
        return _run_to_file(args)
    device = torch_device(args.device)
    paths, problems = find_images(args.paths)
    model = load_model(args.weights)
    classifier = Classifier(model, device_for(args.device, model, device),
                            backend_for(args.backend, len(paths), args.weights), args.precision,
                            batch_size=args.batch_size, tta=args.tta)
    del model  # the classifier keeps it where it runs it; otherwise the runtime holds the weights

    emit = _print_json if args.format == "json" else partial(_print_table, min_score=args.min_score)
    failed = 0
    bar = progress(len(paths), "predict", enabled=not args.no_progress and len(paths) >= 2)
    for problem in problems:
        emit(ImageResult(problem.path, error=problem.error), bar.write)
        failed += 1
    with bar:
        for result in classifier.predict_files(paths, args.top_k, args.batch_size, args.workers,
                                               args.max_pixels or MAX_IMAGE_PIXELS, args.decode,
                                               min_score=args.min_score):
            emit(result, bar.write)
            failed += not result.ok
            bar.update(1)
    if failed:
        print(f"ecanfnet: {failed} of {len(paths) + len(problems)} inputs failed", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _input_refusal(args: argparse.Namespace) -> str | None:
    """Why these options cannot go together (under torchrun: --output is needed and stdin cannot be shared)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.output is None and args.shard_size is not None:
        return "--shard-size applies to --output only"
    if world > 1 and args.output is None:
        return (f"launched by torchrun with {world} processes: give --output FILE.jsonl (each rank then classifies "
                "its share of the shards and rank 0 merges them); without it every rank would print every row")
    if world > 1 and STDIN in args.paths:
        return ("under torchrun the paths cannot come from stdin ('-'), which the ranks would share: give files, "
                "folders or globs")
    return None


def _run_to_file(args: argparse.Namespace) -> int:
    """--output: one JSON line per input into a file, in resumable shards; under torchrun each rank does its share."""
    from ..batch_predict import DEFAULT_SHARD_SIZE, PredictOutput, predict_to_file
    from ..distributed import distributed_context
    from ..files import find_images
    from ..inference import ImageResult
    from ..transforms import MAX_IMAGE_PIXELS

    PredictOutput(args.output).check_writable()  # before listing files and loading the model
    device = None if args.device == "auto" else torch_device(args.device)  # auto: the torchrun rank's own device
    paths, problems = find_images(args.paths)
    with distributed_context(device) as context:
        summary = predict_to_file(
            paths, args.output, weights=weights_or_published(args.weights), top_k=args.top_k,
            batch_size=args.batch_size, shard_size=args.shard_size or DEFAULT_SHARD_SIZE, workers=args.workers,
            max_pixels=args.max_pixels or MAX_IMAGE_PIXELS, decode=args.decode,
            backend=backend_for(args.backend, len(paths), args.weights), precision=args.precision, tta=args.tta,
            min_score=args.min_score,
            unmatched=[ImageResult(p.path, error=p.error).to_dict() for p in problems],
            progress=not args.no_progress, context=context)
    if summary.rank == 0:  # the other ranks leave the merge to rank 0
        print(f"wrote {summary.rows} rows to {printable(summary.output)}")
        if summary.failed:
            print(f"ecanfnet: {summary.failed} of {summary.rows} inputs failed (their rows carry the error)",
                  file=sys.stderr)
    return EXIT_FAILED if problems or summary.failed else EXIT_OK


def _print_json(result: ImageResult, write: Callable[..., None]) -> None:
    """One JSON object for the image."""
    write(json_line(result.to_dict()), file=sys.stdout)
    sys.stdout.flush()


def _print_table(result: ImageResult, write: Callable[..., None], *, min_score: float | None = None) -> None:
    """The path, then its error, or its answer and one line per class: rank, score, label and index."""
    lines = [printable(result.path)]
    if result.error is not None:
        lines.append(f"    error: {printable(result.error)}")
    elif min_score is not None and result.open_set_score < min_score:  # the label is "unknown"
        lines.append(f"    label: unknown (open-set score {result.open_set_score:.3f} < {min_score:g})")
    else:
        lines.append(f"    label: {printable(result.label)}  (open-set score {result.open_set_score:.3f})")
    for rank, p in enumerate(result.predictions or [], 1):
        lines.append(f"    {rank}. {100 * p.score:6.2f}%  {printable(p.label)}  [{p.index}]")
    write("\n".join(lines), file=sys.stdout)
    sys.stdout.flush()
