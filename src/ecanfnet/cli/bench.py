"""`ecanfnet bench`: model-only throughput and peak memory of each backend and precision."""

from __future__ import annotations

import argparse
import json
import sys

from ..choices import BACKENDS, RUN_PRECISIONS
from ..console import printable
from ._console import EXIT_FAILED, EXIT_OK
from ._options import add_command, add_device_option, add_format_option, add_weights_option, image_side, positive_int
from ._runtime import torch_device

EXAMPLES = (
    ("every backend and precision that runs here, batch 1 at 288x288", "ecanfnet bench"),
    ("ONNX Runtime against OpenVINO at batch 8, fp32 only",
     "ecanfnet bench --backend onnxruntime openvino --precision fp32 --batch-size 8"),
    ("an INT8 folder from `ecanfnet quantize`, as JSON lines",
     "ecanfnet bench --weights l0-int8 --precision int8 --format json"),
)
_HEADER = (f"{'backend':12s} {'precision':9s} {'batch':>5s} {'size':>5s} {'images/s':>9s} {'ms/batch p50':>13s} "
           f"{'peak RSS MB':>12s}")


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the bench parser."""
    b = add_command(subparsers, "bench", help="model-only throughput of each backend and precision",
                    description="Time forward passes on random input (no image decoding) for each "
                                "backend and precision; median of --repeats runs after --warmup.",
                    examples=EXAMPLES)
    add_weights_option(b, "weights to time (default: randomly initialised; speed does not depend on the values)")
    b.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="images per forward pass (default 1)")
    b.add_argument("--image-size", type=image_side, default=288, metavar="S",
                   help="side of the square random input (default 288, the test size)")
    b.add_argument("--backend", nargs="+", choices=BACKENDS, default=None,
                   help="backends to time (default: all that run here)")
    b.add_argument("--precision", nargs="+", choices=RUN_PRECISIONS, default=None,
                   help="precisions to time (default: those the hardware runs natively); int8 times a model "
                        "quantized on random input (speed only) unless --weights is an INT8 folder")
    b.add_argument("--repeats", type=positive_int, default=10, metavar="R",
                   help="timed forward passes; the median is reported (default 10)")
    b.add_argument("--warmup", type=int, default=2, metavar="W", help="untimed passes first (default 2)")
    add_device_option(b)
    add_format_option(b)
    b.set_defaults(func=run)
    return b


def run(args: argparse.Namespace) -> int:
    """Time each backend/precision; one line (table row or JSON object) per configuration."""
    from ..bench import available_configs, run_all
    from ..factory import create_model

    device = torch_device(args.device)
    if args.weights is None:
        print("ecanfnet: note: no --weights given, timing randomly initialised weights "
              "(throughput does not depend on the values)", file=sys.stderr)
    model = create_model(pretrained=args.weights if args.weights is not None else False, int8_ok=True)
    configs = _chosen_configs(args, available_configs(device, model))
    failed = 0
    if args.format == "table":
        print(_HEADER)
    for row in run_all(model, configs, batch_size=args.batch_size, image_size=args.image_size,
                       repeats=args.repeats, warmup=args.warmup, device=device):
        failed += "error" in row
        _print_row(row, args.format)
    return EXIT_FAILED if failed == len(configs) else EXIT_OK


def _chosen_configs(args: argparse.Namespace, available: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (backend, precision) pairs to time: those asked for, else those that run here."""
    if args.backend:
        return [(b, p) for b in args.backend for p in (args.precision or [available[0][1]])]
    if args.precision:
        return [(b, p) for b, p in available if p in args.precision]
    return available


def _print_row(row: dict, form: str) -> None:
    """One configuration's result: a JSON object, a table row, or why it is unavailable."""
    if form == "json":
        print(json.dumps(row), flush=True)
    elif "error" in row:
        print(f"{row['backend']:12s} {row['precision']:9s} unavailable: {printable(row['error'])}", flush=True)
    else:
        note = f"  ({row['note']})" if "note" in row else ""
        print(f"{row['backend']:12s} {row['precision']:9s} {row['batch_size']:5d} {row['image_size']:5d} "
              f"{row['images_per_s']:9.2f} {row['ms_per_batch_p50']:13.1f} {row['peak_rss_mb']:12.1f}{note}",
              flush=True)
