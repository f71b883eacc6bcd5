"""`ecanfnet quantize`: INT8 post-training quantization (OpenVINO + NNCF) with an accuracy report and guard."""

from __future__ import annotations

import argparse

from ..console import json_line, printable
from ._console import EXIT_FAILED, EXIT_OK, error
from ._options import (
    PUBLISHED_WEIGHTS, add_command, add_format_option, add_progress_option, add_weights_option, non_negative_float,
    positive_int, probability, seed)
from ._runtime import weights_or_published

EXAMPLES = (
    ("INT8 from the published checkpoint, calibrated on photos like yours",
     "ecanfnet quantize --calibration my_photos/ --output l0-int8"),
    ("your fine-tuned model, keeping the top-1 drop on a labelled folder within 1 point",
     "ecanfnet quantize --weights runs/flowers --calibration flowers/ --val flowers-test/ --max-drop 1.0 "
     "--output flowers-int8"),
    ("then the fastest CPU path", "ecanfnet predict --fast --weights l0-int8 holiday_photos/"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the quantize parser."""
    from ..choices import DEFAULT_HOLDOUT, DEFAULT_MIN_AGREEMENT, DEFAULT_SAMPLES

    q = add_command(subparsers, "quantize",
                    help="INT8 post-training quantization (OpenVINO + NNCF) with an accuracy report",
                    description="Quantize a checkpoint to INT8 on your own images and write a folder that "
                                "predict, evaluate, embed, search, serve and bench take as --weights. Images held "
                                "out from calibration measure the agreement with fp32; a model below "
                                "--min-agreement is not written unless --force.", examples=EXAMPLES)
    add_weights_option(q, f"the fp32 checkpoint (default: {PUBLISHED_WEIGHTS})")
    q.add_argument("--calibration", metavar="DIR", required=True,
                   help="folder of images like those the model will see (searched recursively)")
    q.add_argument("--output", metavar="OUT", required=True, help="the INT8 model folder to write")
    q.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"calibration images (default {DEFAULT_SAMPLES})")
    q.add_argument("--holdout", type=positive_int, default=DEFAULT_HOLDOUT, metavar="N",
                   help=f"images held out from calibration to measure agreement with fp32 (default {DEFAULT_HOLDOUT}; "
                        "a quarter of a smaller folder)")
    q.add_argument("--val", metavar="DIR", default=None,
                   help="labelled folder (one subfolder per class): report top-1 of fp32 and INT8")
    q.add_argument("--max-drop", type=non_negative_float, default=None, metavar="POINTS",
                   help="with --val: NNCF's accuracy-controlled quantization, keeping the top-1 drop within "
                        "POINTS (e.g. 1.0); a larger drop is refused")
    q.add_argument("--min-agreement", type=probability, default=DEFAULT_MIN_AGREEMENT, metavar="F",
                   help=f"refuse a model whose top-1 agrees with fp32 on fewer than this share of held-out images "
                        f"(default {DEFAULT_MIN_AGREEMENT})")
    q.add_argument("--force", action="store_true", help="write the model even when it fails the accuracy guard")
    q.add_argument("--seed", type=seed, default=0, help="which images calibrate and which are held out (default 0)")
    q.add_argument("--workers", type=positive_int, default=None, metavar="N", help="image decoding threads")
    add_format_option(q, "the report as text or one JSON object")
    add_progress_option(q, "no progress bars on stderr")
    q.set_defaults(func=run)
    return q


def run(args: argparse.Namespace) -> int:
    """Quantize to INT8, print the report; exit 1 (nothing written) when the accuracy guard refuses the model."""
    from ..errors import QuantizeError, QuantizeRefused
    from ..quantize import quantize_folder

    try:
        report = quantize_folder(weights_or_published(args.weights), args.calibration, args.output,
                                 samples=args.samples, holdout=args.holdout, val=args.val, max_drop=args.max_drop,
                                 min_agreement=args.min_agreement, force=args.force, seed=args.seed,
                                 workers=args.workers, progress=not args.no_progress)
    except QuantizeRefused as exc:
        _print_report(exc.report, args.format)
        error(str(exc))
        return EXIT_FAILED
    except QuantizeError as exc:
        error(str(exc))
        return EXIT_FAILED
    _print_report(report, args.format)
    if args.format == "table":
        print(printable(f"wrote {args.output} (use it as --weights {args.output})"))
    return EXIT_OK


def _print_report(report: dict, form: str) -> None:
    """The quantization report: one JSON object, or lines on calibration, held-out agreement and validation."""
    if form == "json":
        print(json_line(report))
        return
    held = report["held_out"]
    print(f"calibrated on {report['calibration']['images']} images ({report['method']}), "
          f"{len(report['calibration']['skipped'])} unreadable skipped, {report['seconds']:.0f} s")
    print(f"held out {held['images']} images: top-1 agreement {100 * held['top1_agreement']:.1f}%  "
          f"top-5 agreement {100 * held['top5_agreement']:.1f}%  logit error max {held['logit_max_abs_error']:.3f} "
          f"(relative {held['logit_max_rel_error']:.2e}), mean {held['logit_mean_abs_error']:.4f}")
    val = report.get("validation")
    if val:
        print(f"validation {val['images']} images: top-1 fp32 {100 * val['top1_fp32']:.2f}%  "
              f"int8 {100 * val['top1_int8']:.2f}%  drop {val['drop_points']:.2f} points")
