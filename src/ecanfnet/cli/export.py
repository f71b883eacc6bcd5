"""`ecanfnet export`: the folded network as ONNX or TorchScript, checked against torch after writing."""

from __future__ import annotations

import argparse

from ..console import printable
from ._console import EXIT_FAILED, EXIT_OK, error
from ._options import add_command, add_weights_option, image_side
from ._runtime import weights_or_published

EXPORT_MAX_REL_ERROR = 1e-4
EXAMPLES = (
    ("the published checkpoint as ONNX (any batch and image size)", "ecanfnet export onnx eca_nfnet_l0.onnx"),
    ("your fine-tuned model as TorchScript, checked at 320x320",
     "ecanfnet export torchscript flowers.pt --weights runs/flowers --image-size 320"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the export parser."""
    e = add_command(subparsers, "export", help="export the folded network to ONNX or TorchScript",
                    description="Write the inference form of the network (weight standardization folded) "
                                "and check the written file against the torch output.", examples=EXAMPLES)
    e.add_argument("kind", choices=("onnx", "torchscript"), help="the format to write")
    e.add_argument("output", metavar="OUT", help="file to write (replaced atomically)")
    add_weights_option(e, "weights source (default: hf-hub:timm/eca_nfnet_l0)")
    e.add_argument("--image-size", type=image_side, default=None, metavar="S",
                   help="size of the check input (default: the checkpoint's test size); the ONNX file "
                        "accepts any batch and size")
    e.set_defaults(func=run)
    return e


def run(args: argparse.Namespace) -> int:
    """Export the folded network and verify the written file reproduces the torch logits."""
    from ..backends import export_onnx, export_torchscript
    from ..factory import create_model
    from ..fileio import check_output_file

    check_output_file(args.output)  # before the model loads and the export runs
    model = create_model(pretrained=weights_or_published(args.weights))
    size = ((args.image_size,) * 2 if args.image_size
            else model.pretrained_cfg.eval_settings()["image_size"])
    export = export_onnx if args.kind == "onnx" else export_torchscript
    try:
        rel_error = export(model, args.output, image_size=size)
    except ImportError as exc:
        error(f"{exc.name or exc} is needed for this export: pip install 'ecanfnet[onnx]'")
        return EXIT_FAILED
    ok = rel_error is not None and rel_error <= EXPORT_MAX_REL_ERROR
    print(f"wrote {printable(args.output)}; max relative logit error vs torch at {size[0]}x{size[1]}: "
          f"{rel_error:.2e} ({'ok' if ok else 'TOO LARGE'}, limit {EXPORT_MAX_REL_ERROR:.0e})")
    return EXIT_OK if ok else EXIT_FAILED
