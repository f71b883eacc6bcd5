"""`ecanfnet evaluate`: accuracy, per-class precision/recall/F1, confusion, calibration and the worst-classified
images of a checkpoint on a labelled image folder."""

from __future__ import annotations

import argparse
import sys

from ..console import json_line, printable
from ._console import EXIT_FAILED, EXIT_OK, error
from ._options import (
    add_command, add_decode_option, add_device_option, add_format_option, add_progress_option, add_tta_option,
    add_weights_option, non_negative_int, positive_int)
from ._runtime import device_for, load_model, torch_device

EXAMPLES = (
    ("the published checkpoint on an ImageNet-style validation folder (n01440764/..., ...)",
     "ecanfnet evaluate --data imagenet/val"),
    ("your fine-tuned model: per-class table, confusion matrix and reliability diagram, with flip TTA",
     "ecanfnet evaluate --data flowers-test/ --weights runs/flowers --per-class-csv per_class.csv "
     "--confusion-png confusion.png --reliability-png reliability.png --tta"),
    ("an INT8 folder from `ecanfnet quantize`, everything as one JSON object",
     "ecanfnet evaluate --data flowers-test/ --weights flowers-int8 --format json"),
)
# the output files: flag -> attribute of args
OUTPUTS = {"--per-class-csv": "per_class_csv", "--confusion-csv": "confusion_csv",
           "--confusion-png": "confusion_png", "--reliability-png": "reliability_png"}
TEXT_TABLE_UP_TO = 50  # classes; more: the per-class table only in --per-class-csv / --format json


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the evaluate parser."""
    v = add_command(subparsers, "evaluate", help="accuracy, per-class scores, confusion and calibration of a "
                                                 "checkpoint on an image folder",
                    description="Evaluate on DATA/CLASS/IMAGE files. Class folders are matched to the "
                                "checkpoint's classes by label name, by WordNet id (n01440764) for "
                                "ImageNet checkpoints, or by index (0, 1, ...). Reports top-1, top-5, loss, "
                                "per-class precision/recall/F1, macro and weighted averages, the expected "
                                "calibration error (15 equal-width bins of the top-1 probability), the most "
                                "frequent confusions and the images with the lowest probability of their "
                                "true class.", examples=EXAMPLES)
    v.add_argument("--data", required=True, metavar="DIR", help="labelled image folder: one subfolder per class")
    add_weights_option(v)
    v.add_argument("--batch-size", type=positive_int, default=32, help="images per forward pass (default 32)")
    v.add_argument("--workers", type=non_negative_int, default=2, help="data loading processes (default 2)")
    v.add_argument("--per-class-csv", metavar="FILE", default=None,
                   help="also write the per-class table (class, index, images, top1, top5, precision, recall, "
                        "f1, support) to this CSV file")
    v.add_argument("--confusion-csv", metavar="FILE", default=None,
                   help="also write the confusion matrix (rows: true class, columns: predicted class, then "
                        "'(other)' for predictions of checkpoint classes no folder names) to this CSV file")
    v.add_argument("--confusion-png", metavar="FILE", default=None,
                   help="also draw the confusion matrix to this PNG (over 50 classes: the 50 most confused); "
                        "needs matplotlib")
    v.add_argument("--reliability-png", metavar="FILE", default=None,
                   help="also draw the reliability diagram (accuracy against confidence per bin) to this PNG; "
                        "needs matplotlib")
    v.add_argument("--worst", type=non_negative_int, default=10, metavar="N",
                   help="list the N images with the lowest probability of their true class (default 10; 0: none)")
    add_tta_option(v)
    add_format_option(v, help="table (default): readable text; json: one object with every number")
    add_device_option(v)
    add_progress_option(v, "no progress on stderr")
    add_decode_option(v, fast_switch=False)
    v.set_defaults(func=run)
    return v


def _check_outputs(args: argparse.Namespace) -> str | None:
    """Fail before the evaluation: an output file that cannot be written (OSError), two outputs at one path,
    or a PNG without matplotlib (the returned message; None when all is well)."""
    from ..evaluate_plots import require_matplotlib
    from ..fileio import check_output_file

    given = {flag: getattr(args, attr) for flag, attr in OUTPUTS.items() if getattr(args, attr) is not None}
    seen: dict[str, str] = {}
    for flag, path in given.items():
        key = str(check_output_file(path).resolve())
        if key in seen:
            return f"{seen[key]} and {flag} name the same file {path}"
        seen[key] = flag
    try:
        for flag in ("--confusion-png", "--reliability-png"):
            if flag in given:
                require_matplotlib(flag)
    except ImportError as exc:
        return str(exc)
    return None


def _write_outputs(args: argparse.Namespace, report) -> dict[str, str]:
    """Write the files asked for; {attribute: path written}."""
    from ..evaluate import write_confusion_csv, write_per_class_csv
    from ..evaluate_plots import plot_confusion, plot_reliability

    writers = {"per_class_csv": lambda p: write_per_class_csv(report, p),
               "confusion_csv": lambda p: write_confusion_csv(report, p),
               "confusion_png": lambda p: plot_confusion(report.confusion, p),
               "reliability_png": lambda p: plot_reliability(report.calibration, p)}
    return {attr: str(writers[attr](getattr(args, attr)))
            for attr in OUTPUTS.values() if getattr(args, attr) is not None}


def run(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a labelled folder; print the report, and write the files asked for."""
    from ..backends import is_int8_model, make_runner, with_flip_tta
    from ..evaluate import evaluate_folder

    device = torch_device(args.device)
    problem = _check_outputs(args)
    if problem is not None:
        error(problem)
        return EXIT_FAILED
    model = load_model(args.weights)
    forward = make_runner(model, "auto" if is_int8_model(model) else "torch", None,
                          device_for(args.device, model, device))
    if args.tta:
        forward = with_flip_tta(forward)
    try:
        report = evaluate_folder(model, args.data, args.batch_size, args.workers, forward=forward,
                                 progress=not args.no_progress, decode=args.decode, worst=args.worst)
    except (FileNotFoundError, ValueError) as exc:
        error(str(exc))
        return EXIT_FAILED
    for reason in report.skipped:
        print(f"ecanfnet: skipped unreadable image: {printable(reason)}", file=sys.stderr)
    written = _write_outputs(args, report) if report.images else {}
    if args.format == "json":
        print(json_line({**report.to_dict(), "tta": args.tta, **written}))
    else:
        print("\n".join(_text(report, written, tta=args.tta)))
    return EXIT_OK if report.images else EXIT_FAILED


def _text(report, written: dict[str, str], *, tta: bool) -> list[str]:
    """The readable report: headline, averages, ECE, per-class table, top confusions, worst images, files."""
    where = f"; per class: {printable(written['per_class_csv'])}" if "per_class_csv" in written else ""
    lines = [f"images {report.images}  top-1 {100 * report.top1:.2f}%  top-5 {100 * report.top5:.2f}%  "
             f"loss {report.loss:.4f}  (skipped {len(report.skipped)}{where}){'  [flip TTA]' if tta else ''}"]
    if not report.images:
        return lines
    for kind in ("macro", "weighted"):
        scores = report.averages[kind]
        lines.append(f"{kind:<8}  precision {scores['precision']:.4f}  recall {scores['recall']:.4f}  "
                     f"f1 {scores['f1']:.4f}")
    lines.append(f"ECE {report.calibration.ece:.4f}  ({len(report.calibration.bins)} equal-width bins of the "
                 "top-1 probability)")
    lines += _class_table(report.per_class)
    if report.top_confusions:
        lines.append("top confusions (true -> predicted: images):")
        lines += [f"  {printable(c['true'])} -> {printable(c['predicted'])}: {c['images']}"
                  for c in report.top_confusions]
    if report.worst:
        lines.append(f"worst {len(report.worst)} images (lowest probability of the true class):")
        lines += [f"  p(true) {w['true_probability']:.3g}  {printable(w['true'])} -> predicted "
                  f"{printable(w['predicted'])} ({w['confidence']:.4f})  {printable(w['path'])}"
                  for w in report.worst]
    lines += [f"wrote {printable(path)}" for attr, path in written.items() if attr != "per_class_csv"]
    return lines


def _class_table(rows: list[dict]) -> list[str]:
    """The per-class table as text lines (only a pointer to the CSV / JSON past TEXT_TABLE_UP_TO classes)."""
    if len(rows) > TEXT_TABLE_UP_TO:
        return [f"per class: {len(rows)} classes, in --per-class-csv or --format json"]
    width = max(len("class"), *(len(printable(r["class"])) for r in rows))
    lines = [f"{'class':<{width}}  {'images':>6}  {'top-1':>7}  {'top-5':>7}  precision  recall      f1"]
    lines += [f"{printable(r['class']):<{width}}  {r['images']:>6}  {100 * r['top1']:>6.2f}%  "
              f"{100 * r['top5']:>6.2f}%  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}"
              for r in rows]
    return lines
