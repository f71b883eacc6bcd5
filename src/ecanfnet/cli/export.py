"""`ecanfnet export`: the folded network as ONNX, TorchScript or a Triton model repository, checked against torch after writing."""

from __future__ import annotations

import argparse

from ..console import printable
from ._console import EXIT_FAILED, EXIT_OK, EXIT_USAGE, error
from ._options import add_command, add_weights_option, image_side, int_in, positive_int
from ._runtime import weights_or_published

EXPORT_MAX_REL_ERROR = 1e-4
KINDS = ("onnx", "torchscript", "triton")
INSTANCE_KINDS = ("auto", "cpu", "gpu")  # exports.TRITON_KINDS, here so that --help imports no torch
TRITON_OPTIONS = ("model_name", "max_batch_size", "instances", "instance_kind")
EXAMPLES = (
    ("the published checkpoint as ONNX (any batch and image size), labels and preprocessing in its metadata",
     "ecanfnet export onnx eca_nfnet_l0.onnx"),
    ("a Triton model repository entry models/flowers/ taking uint8 RGB crops (N, 288, 288, 3)",
     "ecanfnet export triton models --weights runs/flowers --model-name flowers --uint8-input"),
    ("your fine-tuned model as TorchScript, checked at 320x320",
     "ecanfnet export torchscript flowers.pt --weights runs/flowers --image-size 320"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the export parser."""
    e = add_command(subparsers, "export", help="export the folded network to ONNX, TorchScript or Triton",
                    description="Write the inference form of the network (weight standardization folded), with "
                                "its labels and preprocessing as metadata, and check the written file against "
                                "the torch output.", examples=EXAMPLES)
    e.add_argument("kind", choices=KINDS, help="the format to write; triton: a model repository folder")
    e.add_argument("output", metavar="OUT", help="file to write (replaced atomically); for triton, the model "
                                                 "repository folder (OUT/NAME is written whole, then moved into place)")
    add_weights_option(e, "weights source (default: hf-hub:timm/eca_nfnet_l0)")
    e.add_argument("--image-size", type=image_side, default=None, metavar="S",
                   help="size of the check input (default: the checkpoint's test size); the ONNX and TorchScript "
                        "files accept any batch and size, a Triton model takes S x S")
    e.add_argument("--uint8-input", action="store_true",
                   help="the graph takes uint8 RGB images (N, H, W, 3), already resized and cropped as the "
                        "metadata's preprocessing says, and normalises them itself (default: float32 "
                        "(N, 3, H, W), normalised by the caller)")
    t = e.add_argument_group("triton options")
    t.add_argument("--model-name", type=_model_name, default=None, metavar="NAME",
                   help="Triton model name and folder (default: the architecture, e.g. eca_nfnet_l0)")
    t.add_argument("--max-batch-size", type=int_in(0, 2**20), default=None, metavar="N",
                   help="largest batch Triton forms, with dynamic batching (default 8; 0: no batching)")
    t.add_argument("--instances", type=positive_int, default=None, metavar="N",
                   help="model instances Triton runs (default 1)")
    t.add_argument("--instance-kind", choices=INSTANCE_KINDS, default=None,
                   help="where the instances run (default auto: GPU when Triton has one)")
    e.set_defaults(func=run)
    return e


def _model_name(text: str) -> str:
    """argparse type of --model-name: a Triton model name (exports.check_triton_name)."""
    from ..exports import check_triton_name

    try:
        return check_triton_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Export the folded network and verify the written file reproduces the torch logits."""
    from ..factory import create_model

    given = [f"--{name.replace('_', '-')}" for name in TRITON_OPTIONS if getattr(args, name) is not None]
    if args.kind != "triton" and given:
        error(f"{', '.join(given)}: only for `ecanfnet export triton`")
        return EXIT_USAGE
    _check_output(args)  # before the model loads and the export runs
    model = create_model(pretrained=weights_or_published(args.weights))
    size = ((args.image_size,) * 2 if args.image_size
            else model.pretrained_cfg.eval_settings()["image_size"])
    try:
        rel_error, written = _export(args, model, size)
    except ImportError as exc:
        error(f"{exc.name or exc} is needed for this export: pip install 'ecanfnet[onnx]'")
        return EXIT_FAILED
    ok = rel_error is not None and rel_error <= EXPORT_MAX_REL_ERROR
    print(f"wrote {printable(written)}; max relative logit error vs torch at {size[0]}x{size[1]}: "
          f"{rel_error:.2e} ({'ok' if ok else 'TOO LARGE'}, limit {EXPORT_MAX_REL_ERROR:.0e})")
    return EXIT_OK if ok else EXIT_FAILED


def _check_output(args: argparse.Namespace) -> None:
    """OSError naming OUT (or OUT/NAME) when it cannot be written, or is a folder `export triton` did not write."""
    from ..fileio import check_output_dir, check_output_file

    if args.kind != "triton":
        check_output_file(args.output)
    elif args.model_name is None:  # the default name is the checkpoint's architecture, known once it loads
        check_output_dir(args.output)
    else:
        from ..exports import check_triton_output

        check_triton_output(args.output, args.model_name)


def _export(args: argparse.Namespace, model, size: tuple[int, int]) -> tuple[float | None, str]:
    """Write the export args ask for; (its checked relative error, what was written)."""
    from ..exports import export_onnx, export_torchscript, export_triton

    if args.kind == "onnx":
        return export_onnx(model, args.output, image_size=size, uint8_input=args.uint8_input), args.output
    if args.kind == "torchscript":
        return export_torchscript(model, args.output, image_size=size, uint8_input=args.uint8_input), args.output
    name = args.model_name or model.name
    rel_error = export_triton(model, args.output, model_name=name, image_size=size, uint8_input=args.uint8_input,
                              max_batch_size=8 if args.max_batch_size is None else args.max_batch_size,
                              instances=args.instances or 1, kind=args.instance_kind or "auto")
    return rel_error, f"{args.output}/{name} (config.pbtxt, 1/model.onnx, labels.txt)"
