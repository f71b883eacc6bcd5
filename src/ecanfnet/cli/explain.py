"""`ecanfnet explain`: each image's crop with a class-activation heatmap over it (Grad-CAM or EigenCAM), as PNGs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..choices import EXPLAIN_METHODS
from ..console import json_line, printable
from ._console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error
from ._options import (
    WEIGHTS_SOURCES_HELP, add_command, add_device_option, add_format_option, add_progress_option,
    add_weights_option, positive_int)
from ._runtime import load_model, torch_device

if TYPE_CHECKING:
    from ..explain import Explainer, Explanation

EXAMPLES = (
    ("where the model found the evidence for its top class: maps/cat.png", "ecanfnet explain cat.jpg --output maps"),
    ("where a fine-tuned model sees class 'tulip' in every photo of a folder, one JSON object per image",
     "ecanfnet explain photos/ --output maps --weights runs/flowers --class tulip --format json"),
    ("the gradient-free map (EigenCAM: what the final feature map responds to most, whatever the class)",
     "ecanfnet explain photos/ --output maps --method eigencam"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the explain parser."""
    p = add_command(subparsers, "explain", help="class-activation heatmaps over images (Grad-CAM, EigenCAM)",
                    description="For each image, write the crop the model saw (the checkpoint's eval resize and "
                                "centre crop) with a class-activation heatmap over it, as DIR/NAME.png: where the "
                                "model found the evidence for each image's top class or for --class. Needs the "
                                "explain extra: pip install 'ecanfnet[explain]'.", examples=EXAMPLES)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="folder for the overlays, created if missing: NAME.png after each image's name (NAME-2.png "
                        "and so on where names repeat); files of those names are replaced")
    p.add_argument("--class", dest="target", default=None, metavar="K",
                   help="the class to explain, by index or label (default: each image's top class)")
    p.add_argument("--method", choices=EXPLAIN_METHODS, default="gradcam",
                   help="gradcam (default: class-specific, from the gradient of the class's score) or eigencam "
                        "(gradient-free, the same map whatever the class)")
    add_weights_option(p, WEIGHTS_SOURCES_HELP)
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="images per pass (default 8)")
    add_format_option(p, "table (default) or json: one JSON object per image per line")
    add_device_option(p)
    p.add_argument("--max-pixels", type=positive_int, default=None, metavar="N",
                   help="refuse images with more pixels than this (default 89,478,485)")
    add_progress_option(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Explain every image named on the command line; exit 1 if any failed."""
    from ..explain import ClassError, Explainer, grad_cam_missing
    from ..fileio import check_output_dir
    from ..files import find_images

    missing = grad_cam_missing()
    if missing:
        error(missing)
        return EXIT_FAILED
    device = torch_device(args.device)
    output = check_output_dir(args.output)
    paths, problems = find_images(args.paths)
    model = load_model(args.weights)
    try:
        explainer = Explainer(model.to(device))
        target = explainer.class_index(args.target)
    except ClassError as exc:
        error(f"--class: {exc}")
        return EXIT_USAGE
    except (TypeError, ValueError) as exc:  # an INT8 model, or one without a classifier
        error(str(exc))
        return EXIT_FAILED
    output.mkdir(parents=True, exist_ok=True)
    emit = _print_json if args.format == "json" else _print_table
    failed = len(problems)
    for problem in problems:
        emit({"path": problem.path, "error": problem.error})
    failed += _explain_all(explainer, paths, output, target, args, emit)
    if failed:
        print(f"ecanfnet: {failed} of {len(paths) + len(problems)} inputs failed", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _explain_all(explainer: Explainer, paths: list[str], output: Path, target: int | None,
                 args: argparse.Namespace, emit: Callable[..., None]) -> int:
    """Explain paths in batches (decoded ahead in threads), write each overlay, emit a line each; the failures."""
    import torch

    from ..files import decoded_batches
    from ..progress import progress
    from ..transforms import MAX_IMAGE_PIXELS

    names = output_names(paths)
    failed = 0
    bar = progress(len(paths), "explain", enabled=not args.no_progress and len(paths) >= 2)
    with bar:
        for items in decoded_batches(paths, explainer.transform, args.batch_size,
                                     max_pixels=args.max_pixels or MAX_IMAGE_PIXELS):
            good = [(path, tensor) for path, tensor, _ in items if tensor is not None]
            maps = iter(explainer.explain_batch(torch.stack([t for _, t in good]), target, args.method)
                        if good else [])
            for path, tensor, problem in items:
                record = ({"path": path, "error": problem} if tensor is None
                          else _write(next(maps), path, output / names[path]))
                emit(record, bar.write)
                failed += "error" in record
                bar.update(1)
    return failed


def output_names(paths: list[str]) -> dict[str, str]:
    """Each path's overlay file name: its stem + .png, then -2, -3, ... where stems repeat (ignoring case)."""
    taken: set[str] = set()
    names: dict[str, str] = {}
    for path in paths:
        stem = Path(path).stem or "image"
        name, n = f"{stem}.png", 1
        while name.casefold() in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name.casefold())
        names[path] = name
    return names


def _write(explanation: Explanation, path: str, target: Path) -> dict[str, Any]:
    """Write the overlay atomically; the image's record (its error when the file cannot be written)."""
    from ..fileio import write_atomically

    try:
        write_atomically(target, lambda tmp: explanation.overlay().save(tmp, format="PNG"))
    except OSError as exc:
        return {"path": path, "error": f"{target}: cannot write ({exc.strerror or exc})"}
    return {"path": path, "output": str(target), **explanation.to_dict()}


def _print_json(record: dict[str, Any], write: Callable[..., None] = print) -> None:
    """One JSON object for the image."""
    write(json_line(record), file=sys.stdout)
    sys.stdout.flush()


def _print_table(record: dict[str, Any], write: Callable[..., None] = print) -> None:
    """One line: the path, then the class, its probability and the file written, or the error."""
    if "error" in record:
        path, problem = record["path"], record["error"]
        line = f"{path}: error: {problem.removeprefix(f'{path}: ')}"  # library errors name the file already
    else:
        line = (f"{record['path']}: {record['label']} [{record['index']}] {100 * record['probability']:.2f}% "
                f"-> {record['output']}")
    write(printable(line), file=sys.stdout)
    sys.stdout.flush()
