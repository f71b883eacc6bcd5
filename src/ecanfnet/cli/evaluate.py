"""`ecanfnet evaluate`: top-1, top-5 and loss of a checkpoint on a labelled image folder."""

from __future__ import annotations

import argparse
import sys

from ..console import json_line, printable
from ._console import EXIT_FAILED, EXIT_OK, error
from ._options import (
    add_command, add_decode_option, add_device_option, add_format_option, add_progress_option, add_weights_option,
    non_negative_int, positive_int)
from ._runtime import device_for, load_model, torch_device

EXAMPLES = (
    ("the published checkpoint on an ImageNet-style validation folder (n01440764/..., ...)",
     "ecanfnet evaluate --data imagenet/val"),
    ("your fine-tuned model, with per-class accuracy in a CSV file",
     "ecanfnet evaluate --data flowers-test/ --weights runs/flowers --per-class-csv per_class.csv"),
    ("an INT8 folder from `ecanfnet quantize`, the summary as one JSON object",
     "ecanfnet evaluate --data flowers-test/ --weights flowers-int8 --format json"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the evaluate parser."""
    v = add_command(subparsers, "evaluate", help="top-1, top-5 and loss of a checkpoint on an image folder",
                    description="Evaluate on DATA/CLASS/IMAGE files. Class folders are matched to the "
                                "checkpoint's classes by label name, by WordNet id (n01440764) for "
                                "ImageNet checkpoints, or by index (0, 1, ...).", examples=EXAMPLES)
    v.add_argument("--data", required=True, metavar="DIR", help="labelled image folder: one subfolder per class")
    add_weights_option(v)
    v.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    v.add_argument("--workers", type=non_negative_int, default=2, help="data loading processes (default 2)")
    v.add_argument("--per-class-csv", metavar="FILE", default=None,
                   help="also write per-class accuracy (class, index, images, top1, top5) to this CSV file")
    add_format_option(v)
    add_device_option(v)
    add_progress_option(v, "no progress on stderr")
    add_decode_option(v, fast_switch=False)
    v.set_defaults(func=run)
    return v


def run(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a labelled folder; print the summary, and the per-class CSV when asked."""
    from ..backends import is_int8_model, make_runner
    from ..evaluate import evaluate_folder, write_per_class_csv
    from ..fileio import check_output_file

    device = torch_device(args.device)
    if args.per_class_csv is not None:
        check_output_file(args.per_class_csv)
    model = load_model(args.weights)
    forward = make_runner(model, "auto" if is_int8_model(model) else "torch", None,
                          device_for(args.device, model, device))
    try:
        report = evaluate_folder(model, args.data, args.batch_size, args.workers, forward=forward,
                                 progress=not args.no_progress, decode=args.decode)
    except (FileNotFoundError, ValueError) as exc:
        error(str(exc))
        return EXIT_FAILED
    for reason in report.skipped:
        print(f"ecanfnet: skipped unreadable image: {printable(reason)}", file=sys.stderr)
    summary = report.summary()
    if args.per_class_csv is not None:
        summary["per_class_csv"] = str(write_per_class_csv(report, args.per_class_csv))
    if args.format == "json":
        print(json_line(summary))
    else:
        where = f"; per class: {printable(summary['per_class_csv'])}" if args.per_class_csv is not None else ""
        print(f"images {summary['images']}  top-1 {100 * report.top1:.2f}%  top-5 {100 * report.top5:.2f}%  "
              f"loss {report.loss:.4f}  (skipped {len(report.skipped)}{where})")
    return EXIT_OK if report.images else EXIT_FAILED
