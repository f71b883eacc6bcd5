"""`ecanfnet` command line: parses arguments and calls the library (heavy imports stay lazy)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import warnings
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from . import __version__
from .choices import BACKENDS, DECODE_MODES, FLOAT_PRECISIONS, RUN_PRECISIONS
from .console import json_line, printable
from .errors import BackendError, EmbedError, WeightsError

if TYPE_CHECKING:
    from .inference import ImageResult

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
BACKEND_CHOICES = ("auto", *BACKENDS)
PRECISION_CHOICES = RUN_PRECISIONS
# Fewer images than this: `auto` uses eager torch, whose setup is instant; ONNX Runtime's session
# set-up (and first-time export) costs more than it saves on a handful of images.
AUTO_ORT_MIN_IMAGES = 16
EXPORT_MAX_REL_ERROR = 1e-4


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
    _add_device_option(p)
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="image decoding threads (default: number of CPUs, at most 8)")
    p.add_argument("--max-pixels", type=_positive_int, default=None, metavar="N",
                   help="refuse images with more pixels than this (default 89,478,485)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    _add_decode_option(p)
    _add_backend_options(p)
    p.set_defaults(func=run_predict)

    b = sub.add_parser("bench", help="model-only throughput of each backend and precision",
                       description="Time forward passes on random input (no image decoding) for each "
                                   "backend and precision; median of --repeats runs after --warmup.")
    b.add_argument("--weights", metavar="SRC", default=None,
                   help="weights to time (default: randomly initialised; speed does not depend on the values)")
    b.add_argument("--batch-size", type=_positive_int, default=1, metavar="N")
    b.add_argument("--image-size", type=_image_side, default=288, metavar="S")
    b.add_argument("--backend", nargs="+", choices=BACKEND_CHOICES[1:], default=None,
                   help="backends to time (default: all that run here)")
    b.add_argument("--precision", nargs="+", choices=PRECISION_CHOICES, default=None,
                   help="precisions to time (default: those the hardware runs natively); int8 times a model "
                        "quantized on random input (speed only) unless --weights is an INT8 folder")
    b.add_argument("--repeats", type=_positive_int, default=10, metavar="R")
    b.add_argument("--warmup", type=int, default=2, metavar="W")
    _add_device_option(b)
    b.add_argument("--format", choices=("table", "json"), default="table")
    b.set_defaults(func=run_bench)

    e = sub.add_parser("export", help="export the folded network to ONNX or TorchScript",
                       description="Write the inference form of the network (weight standardization folded) "
                                   "and check the written file against the torch output.")
    e.add_argument("kind", choices=("onnx", "torchscript"))
    e.add_argument("output", metavar="OUT", help="file to write (replaced atomically)")
    e.add_argument("--weights", metavar="SRC", default=None, help="weights source (default: hf-hub:timm/eca_nfnet_l0)")
    e.add_argument("--image-size", type=_image_side, default=None, metavar="S",
                   help="size of the check input (default: the checkpoint's test size); the ONNX file "
                        "accepts any batch and size")
    e.set_defaults(func=run_export)

    t = sub.add_parser("train", help="fine-tune (or train from scratch) on an image folder",
                       description="Train on DATA/CLASS_NAME/IMAGE files with the model card's recipe: "
                                   "SGD Nesterov, cosine decay with warm-up, AGC 0.015, label smoothing, "
                                   "RandAugment, dropout and stochastic depth. OUT becomes a hub-layout "
                                   "folder (best weights + labels), with metrics.csv and training/last.pt.")
    t.add_argument("--data", required=True, metavar="DIR", help="training images, one subfolder per class")
    t.add_argument("--output", required=True, metavar="OUT",
                   help="folder for the trained model and logs; one that already holds a model or training "
                        "state is refused unless --resume or --overwrite")
    val = t.add_mutually_exclusive_group()
    val.add_argument("--val", metavar="DIR", help="validation images (same class folders)")
    val.add_argument("--val-split", type=_float_in(0.0, 1.0, lo_open=True, hi_open=True), default=0.1, metavar="F",
                     help="hold out this fraction of --data for validation (default 0.1)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--weights", metavar="SRC", help="starting weights (default: hf-hub:timm/eca_nfnet_l0)")
    src.add_argument("--from-scratch", action="store_true", help="random initialisation instead")
    t.add_argument("--epochs", type=_positive_int, default=None,
                   help="default 10 when fine-tuning, 60 with --from-scratch; more when that is under 300 optimizer steps")
    t.add_argument("--batch-size", type=_positive_int, default=32)
    t.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (default 0.1 x global batch / 256; 8x that with --from-scratch)")
    t.add_argument("--weight-decay", type=_non_negative_float, default=2e-5, help="not applied to gains and biases")
    t.add_argument("--warmup-epochs", type=_non_negative_float, default=1.0)
    t.add_argument("--label-smoothing", type=_fraction_below_one, default=0.1)
    t.add_argument("--agc", type=_non_negative_float, default=0.015, metavar="CLIP", help="AGC factor; 0 disables it")
    t.add_argument("--drop-rate", type=_fraction_below_one, default=0.2, help="dropout before the classifier")
    t.add_argument("--drop-path-rate", type=_fraction_below_one, default=0.1, help="stochastic depth, last block")
    t.add_argument("--image-size", type=_image_side, default=None, metavar="S",
                   help="training and validation size (default: the starting checkpoint's, 224 for L0's weights)")
    t.add_argument("--no-randaugment", action="store_true")
    t.add_argument("--crop-scale", type=_float_in(0.0, 1.0, lo_open=True), nargs=2, default=None, metavar=("MIN", "MAX"),
                   help="RandomResizedCrop area range (default 0.35 1.0; ImageNet's from-scratch range is 0.08 1.0)")
    t.add_argument("--hflip", type=_probability, default=0.5, metavar="P",
                   help="horizontal flip probability (default 0.5; 0 for text, digits and other mirror-sensitive images)")
    t.add_argument("--freeze-backbone", action="store_true", help="train the classifier only (linear probe)")
    t.add_argument("--accum-steps", type=_positive_int, default=1, metavar="N",
                   help="gradient accumulation: one optimizer step every N batches")
    t.add_argument("--precision", choices=FLOAT_PRECISIONS, default="fp32",
                   help="bf16: autocast mixed precision; fp16: autocast with a gradient scaler (CUDA; emulated on CPU), "
                        "AGC applied to the unscaled gradients")
    t.add_argument("--ema-decay", type=_fraction_below_one, default=0.0, metavar="D",
                   help="keep an EMA of the weights (e.g. 0.9998); it is what gets validated and saved")
    t.add_argument("--mixup", type=_non_negative_float, default=0.0, metavar="ALPHA", help="MixUp alpha (0: off)")
    t.add_argument("--cutmix", type=_non_negative_float, default=0.0, metavar="ALPHA", help="CutMix alpha (0: off)")
    t.add_argument("--workers", type=_non_negative_int, default=2,
                   help="data loading processes (default 2; 0 loads in the training process)")
    t.add_argument("--seed", type=_seed, default=0)
    t.add_argument("--deterministic", action="store_true", help="deterministic kernels (exact reruns on CPU)")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue OUT from its last finished epoch (refused, naming them, if settings that decide "
                            "the result differ from the run's; --epochs may grow)")
    t.add_argument("--resume-with-changes", action="store_true",
                   help="with --resume: accept settings that differ from the run's, applied from the next epoch")
    again.add_argument("--overwrite", action="store_true",
                   help="replace the model and training state already in OUT (a new run from epoch 0)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=run_train)

    v = sub.add_parser("evaluate", help="top-1, top-5 and loss of a checkpoint on an image folder",
                       description="Evaluate on DATA/CLASS/IMAGE files. Class folders are matched to the "
                                   "checkpoint's classes by label name, by WordNet id (n01440764) for "
                                   "ImageNet checkpoints, or by index (0, 1, ...).")
    v.add_argument("--data", required=True, metavar="DIR")
    v.add_argument("--weights", metavar="SRC", default=None, help="default: hf-hub:timm/eca_nfnet_l0")
    v.add_argument("--batch-size", type=_positive_int, default=32)
    v.add_argument("--workers", type=_non_negative_int, default=2, help="data loading processes (default 2)")
    v.add_argument("--per-class-csv", metavar="FILE", default=None,
                   help="also write per-class accuracy (class, index, images, top1, top5) to this CSV file")
    v.add_argument("--format", choices=("table", "json"), default="table")
    _add_device_option(v)
    v.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    _add_decode_option(v, fast_switch=False)
    v.set_defaults(func=run_evaluate)

    m = sub.add_parser("embed", help="pooled 2304-d embeddings of images, for retrieval and deduplication",
                       description="Write OUT.npy (float32, one row per readable image), OUT.paths.txt (the "
                                   "paths, one per line, same order) and OUT.json (model, weights fingerprint, "
                                   "preprocessing, unreadable files). Work is done in shards kept in OUT.parts/: "
                                   "rerun the same command to resume. Under `torchrun --nproc-per-node N -m "
                                   "ecanfnet embed ...` each rank embeds its share of the shards.")
    m.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob")
    m.add_argument("--output", required=True, metavar="OUT.npy", help="embedding matrix to write")
    m.add_argument("--weights", metavar="SRC", default=None, help="default: hf-hub:timm/eca_nfnet_l0")
    m.add_argument("--normalize", action="store_true", help="L2-normalise each vector (cosine = dot product)")
    m.add_argument("--batch-size", type=_positive_int, default=32, metavar="N")
    m.add_argument("--shard-size", type=_positive_int, default=4096, metavar="N",
                   help="images per resumable shard (default 4096)")
    m.add_argument("--workers", type=_positive_int, default=None, metavar="N", help="image decoding threads")
    m.add_argument("--no-progress", action="store_true")
    _add_decode_option(m)
    _add_device_option(m, "auto (default: under torchrun the rank's own GPU, else CUDA if available), cpu, cuda:1, ...")
    _add_backend_options(m)
    m.set_defaults(func=run_embed)

    _add_quantize_parser(sub)

    q = sub.add_parser("search", help="nearest images by cosine similarity in an embedding file",
                       description="Embed the query images with the index's own weights and list the k most "
                                   "similar indexed images. Exact (numpy) search below 100,000 vectors; above, "
                                   "an HNSW index from faiss when installed (pip install 'ecanfnet[search]').")
    q.add_argument("index", metavar="INDEX", help="OUT.npy written by `ecanfnet embed`")
    q.add_argument("--query", required=True, nargs="+", metavar="IMAGE", help="query image(s)")
    q.add_argument("-k", type=_positive_int, default=10, help="neighbours per query (default 10)")
    q.add_argument("--weights", metavar="SRC", default=None,
                   help="weights to embed the queries (default: those recorded in the index)")
    q.add_argument("--engine", choices=("auto", "exact", "faiss"), default="auto")
    q.add_argument("--format", choices=("table", "json"), default="table")
    _add_device_option(q)
    q.set_defaults(func=run_search)

    s = sub.add_parser("serve", help="HTTP API and web page for classification and embeddings",
                       description="Serve POST /v1/classify, POST /v1/embed, GET /v1/model, /healthz, /metrics "
                                   "and a web page at /, with requests batched dynamically. Needs the serve "
                                   "extra: pip install 'ecanfnet[serve]'.")
    s.add_argument("--weights", metavar="SRC", default=None, help="default: hf-hub:timm/eca_nfnet_l0")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    s.add_argument("--port", type=_port_number, default=8000, help="TCP port, 1-65535 (default 8000)")
    s.add_argument("--max-batch", type=_positive_int, default=16, metavar="N", help="images per batch (default 16)")
    s.add_argument("--max-wait-ms", type=_non_negative_float, default=10.0, metavar="MS",
                   help="how long a batch waits to fill up (default 10)")
    s.add_argument("--max-queue", type=_positive_int, default=64, metavar="N",
                   help="images waiting for a batch before requests get 503 (default 64)")
    s.add_argument("--max-upload-bytes", type=_positive_int, default=20 * 1024 * 1024, metavar="N",
                   help="larger bodies get 413 (default 20 MiB)")
    s.add_argument("--max-pixels", type=_positive_int, default=40_000_000, metavar="N",
                   help="larger images get 413, checked before decoding (default 40,000,000)")
    s.add_argument("--timeout-s", type=_positive_float, default=30.0, metavar="S",
                   help="per request once its body is in (decoding and queueing included), then 504 (default 30)")
    s.add_argument("--body-timeout-s", type=_positive_float, default=10.0, metavar="S",
                   help="to receive a request's whole body, before it is admitted; then 408 (default 10)")
    s.add_argument("--header-timeout-s", type=_positive_float, default=10.0, metavar="S",
                   help="to receive a request's headers; then the connection is closed (default 10)")
    s.add_argument("--keep-alive-s", type=_positive_int, default=5, metavar="S",
                   help="idle keep-alive connections are closed after this (default 5)")
    s.add_argument("--max-connections", type=_positive_int, default=256, metavar="N",
                   help="a request arriving while more than N connections are open, or N requests are already "
                        "being handled, gets 503 + Retry-After: 1 and its connection is closed; connections are "
                        "accepted, not refused (default 256)")
    s.add_argument("--max-header-bytes", type=_positive_int, default=16 * 1024, metavar="N",
                   help="a request whose line and headers are still incomplete after N bytes gets 400 "
                        "(default 16 KiB)")
    s.add_argument("--decode-workers", type=_positive_int, default=None, metavar="N",
                   help="image decoding threads (default: one per CPU, at most 8); at most 2N decodes are queued "
                        "or running, and a decode that cannot start within half of --timeout-s gets 503")
    _add_decode_option(s)
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help="require this key (printable ASCII; Authorization: Bearer KEY or X-API-Key: KEY) on /v1/*; "
                        "default: $ECANFNET_API_KEY, else none")
    s.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="bound to loopback, the server answers only Host: localhost, 127.x.x.x or [::1] "
                        "(against DNS rebinding); also answer this name (e.g. behind a proxy; repeatable)")
    _add_device_option(s)
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    _add_backend_options(s)
    s.set_defaults(func=run_serve)
    return parser



def _add_quantize_parser(sub) -> None:
    from .quantize import DEFAULT_HOLDOUT, DEFAULT_MIN_AGREEMENT, DEFAULT_SAMPLES

    q = sub.add_parser("quantize", help="INT8 post-training quantization (OpenVINO + NNCF) with an accuracy report",
                       description="Quantize a checkpoint to INT8 on your own images and write a folder that "
                                   "predict, evaluate, embed, search, serve and bench take as --weights. Images held "
                                   "out from calibration measure the agreement with fp32; a model below "
                                   "--min-agreement is not written unless --force.")
    q.add_argument("--weights", metavar="SRC", default=None, help="the fp32 checkpoint (default: hf-hub:timm/eca_nfnet_l0)")
    q.add_argument("--calibration", metavar="DIR", required=True,
                   help="folder of images like those the model will see (searched recursively)")
    q.add_argument("--output", metavar="OUT", required=True, help="the INT8 model folder to write")
    q.add_argument("--samples", type=_positive_int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"calibration images (default {DEFAULT_SAMPLES})")
    q.add_argument("--holdout", type=_positive_int, default=DEFAULT_HOLDOUT, metavar="N",
                   help=f"images held out from calibration to measure agreement with fp32 (default {DEFAULT_HOLDOUT}; "
                        "a quarter of a smaller folder)")
    q.add_argument("--val", metavar="DIR", default=None,
                   help="labelled folder (one subfolder per class): report top-1 of fp32 and INT8")
    q.add_argument("--max-drop", type=_non_negative_float, default=None, metavar="POINTS",
                   help="with --val: NNCF's accuracy-controlled quantization, keeping the top-1 drop within "
                        "POINTS (e.g. 1.0); a larger drop is refused")
    q.add_argument("--min-agreement", type=_probability, default=DEFAULT_MIN_AGREEMENT, metavar="F",
                   help=f"refuse a model whose top-1 agrees with fp32 on fewer than this share of held-out images "
                        f"(default {DEFAULT_MIN_AGREEMENT})")
    q.add_argument("--force", action="store_true", help="write the model even when it fails the accuracy guard")
    q.add_argument("--seed", type=_seed, default=0, help="which images calibrate and which are held out (default 0)")
    q.add_argument("--workers", type=_positive_int, default=None, metavar="N", help="image decoding threads")
    q.add_argument("--format", choices=("table", "json"), default="table", help="the report as text or one JSON object")
    q.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    q.set_defaults(func=run_quantize)


def _add_backend_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="auto (default: the fastest exact backend installed, on CPU openvino, else "
                        "onnxruntime, when there are many images; else torch), torch, compile, onnxruntime, openvino")
    p.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                   help="default: the weights' own, fp32 (exact), or int8 for an INT8 folder from `ecanfnet quantize`; "
                        "bf16 (CUDA, or CPUs with native bf16), fp16 (CUDA)")


def _add_decode_option(p: argparse.ArgumentParser, fast_switch: bool = True) -> None:
    p.add_argument("--decode", choices=DECODE_MODES, default="exact",
                   help="exact (default: the same pixels as timm) or fast: JPEGs decoded at 1/2, 1/4 or 1/8 scale "
                        "in libjpeg, never below twice the resized size (faster on large photos, not bit-equal)")
    if fast_switch:
        p.add_argument("--fast", action="store_true",
                       help="the fastest path, not exact: --decode fast, the fastest backend, and the quickest "
                            "precision (int8 for an INT8 folder from `ecanfnet quantize`, else bf16 where the "
                            "hardware has it natively, else fp32); an explicit --precision still wins")


def _add_device_option(p: argparse.ArgumentParser,
                       help: str = "auto (default: CUDA if available), cpu, cuda, cuda:1, mps") -> None:
    p.add_argument("--device", type=_device_name, default="auto", help=help)


def _device_name(text: str) -> str:
    """argparse type of --device: 'auto' or a device torch can name (whether it exists is checked by _device)."""
    if text == "auto":
        return text
    import torch

    try:
        kind = torch.device(text).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return text


def _int_in(lo: int, hi: int | None = None, what: str | None = None) -> Callable[[str], int]:
    """argparse type factory: a whole number lo..hi (no upper bound when hi is None), written in ASCII digits.

    what: the rule in the error "must be <what>, got TEXT" (default "an integer from LO to HI" / ">= LO").
    """
    what = what or (f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}")

    def parse(text: str) -> int:
        # Digits only: int() would also take "+8", " 8", "1_0" and non-ASCII digits.
        try:
            value = int(text) if text.isascii() and text.isdigit() else None
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            value = None
        if value is None or value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


_positive_int = _int_in(1, what="a positive integer")
_non_negative_int = _int_in(0)                         # e.g. --workers, where 0 means in-process
_seed = _int_in(0, 2 ** 32 - 1, "an integer in [0, 2**32)")  # epoch seeds are derived from it by multiplication
_port_number = _int_in(1, 65535, "a TCP port between 1 and 65535")


def _image_side(text: str) -> int:
    """argparse type of --image-size: a side a checkpoint may record (metadata.MIN_IMAGE_SIDE..MAX_IMAGE_SIDE)."""
    from .metadata import MAX_IMAGE_SIDE, MIN_IMAGE_SIDE  # here, not at the top: metadata imports torch

    return _int_in(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE)(text)


def _float_in(lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
              hi_open: bool = False) -> Callable[[str], float]:
    """argparse type factory: a finite float in [lo, hi], each end excluded when lo_open / hi_open (nan refused)."""
    if math.isinf(hi):
        interval = f"{'>' if lo_open else '>='} {lo:g}" if math.isfinite(lo) else "finite"
    else:
        interval = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not (math.isfinite(value) and inside):
            raise argparse.ArgumentTypeError(f"must be a number {interval}, got {text}")
        return value
    return parse


_probability = _float_in(0.0, 1.0)                       # [0, 1]
_fraction_below_one = _float_in(0.0, 1.0, hi_open=True)  # [0, 1): smoothing, dropout, EMA decay
_non_negative_float = _float_in(0.0)                     # >= 0, finite
_positive_float = _float_in(0.0, lo_open=True)           # > 0, finite


def run_predict(args: argparse.Namespace) -> int:
    """Classify every image named on the command line; exit 1 if any failed."""
    from .inference import Classifier, find_images
    from .progress import progress
    from .transforms import MAX_IMAGE_PIXELS

    device = _device(args.device)
    paths, problems = find_images(args.paths)
    model = _load_model(args.weights)
    classifier = Classifier(model, _device_for(args.device, model, device), _backend_for(args.backend, len(paths), args.weights),
                            args.precision, batch_size=args.batch_size)
    del model  # the classifier keeps it where it runs it; otherwise the runtime holds the weights

    emit = _print_json if args.format == "json" else _print_table
    failed = 0
    bar = progress(len(paths), "predict", enabled=not args.no_progress and len(paths) >= 2)
    for result in problems:
        emit(result, bar.write)
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


def _load_model(weights: str | None):
    """The model of --weights (default: the published checkpoint); an INT8 folder from `ecanfnet quantize` too."""
    from .weights import create_model

    return create_model(pretrained=weights if weights is not None else True, int8_ok=True)


def _device_for(name: str, model, device):
    """device (from _device(name), checked before the model loads), except that 'auto' is the CPU for an INT8
    model (it runs on OpenVINO's CPU plugin)."""
    import torch

    from .backends import is_int8_model

    return torch.device("cpu") if name == "auto" and is_int8_model(model) else device


def _backend_for(backend: str, n_images: int, weights: str | None) -> str:
    """'auto' means eager torch for a handful of images (ONNX Runtime's set-up would cost more than it saves),
    except for an INT8 folder, which runs on OpenVINO only."""
    from .quantize import is_int8_folder

    if backend != "auto" or n_images >= AUTO_ORT_MIN_IMAGES or (weights is not None and is_int8_folder(weights)):
        return backend
    return "torch"


def _device(name: str):
    """The torch.device for --device NAME; BackendError (one line) when this machine has no such device."""
    import torch

    from .inference import default_device
    if name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BackendError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise BackendError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if (device.index or 0) >= count:
            raise BackendError(f"--device {name}: there is no such CUDA device here "
                               f"({count} found: cuda:0{f'..cuda:{count - 1}' if count > 1 else ''})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise BackendError(f"--device {name}: Apple MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise BackendError(f"--device {name}: not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def run_bench(args: argparse.Namespace) -> int:
    """Time each backend/precision; one line (table row or JSON object) per configuration."""
    from .bench import available_configs, run_all
    from .weights import create_model

    device = _device(args.device)
    if args.weights is None:
        print("ecanfnet: note: no --weights given, timing randomly initialised weights "
              "(throughput does not depend on the values)", file=sys.stderr)
    model = create_model(pretrained=args.weights if args.weights is not None else False, int8_ok=True)
    configs = available_configs(device, model)
    if args.backend:
        configs = [(b, p) for b in args.backend for p in (args.precision or [configs[0][1]])]
    elif args.precision:
        configs = [(b, p) for b, p in configs if p in args.precision]
    failed = 0
    if args.format == "table":
        print(f"{'backend':12s} {'precision':9s} {'batch':>5s} {'size':>5s} {'images/s':>9s} {'ms/batch p50':>13s} {'peak RSS MB':>12s}")
    for row in run_all(model, configs, batch_size=args.batch_size, image_size=args.image_size,
                       repeats=args.repeats, warmup=args.warmup, device=device):
        failed += "error" in row
        if args.format == "json":
            print(json.dumps(row), flush=True)
        elif "error" in row:
            print(f"{row['backend']:12s} {row['precision']:9s} unavailable: {printable(row['error'])}", flush=True)
        else:
            note = f"  ({row['note']})" if "note" in row else ""
            print(f"{row['backend']:12s} {row['precision']:9s} {row['batch_size']:5d} {row['image_size']:5d} "
                  f"{row['images_per_s']:9.2f} {row['ms_per_batch_p50']:13.1f} {row['peak_rss_mb']:12.1f}{note}",
                  flush=True)
    return EXIT_FAILED if failed == len(configs) else EXIT_OK


def run_quantize(args: argparse.Namespace) -> int:
    """Quantize to INT8, print the report; exit 1 (nothing written) when the accuracy guard refuses the model."""
    from .quantize import QuantizeError, QuantizeRefused, quantize_folder

    try:
        report = quantize_folder(args.weights if args.weights is not None else True, args.calibration, args.output,
                                 samples=args.samples, holdout=args.holdout, val=args.val, max_drop=args.max_drop,
                                 min_agreement=args.min_agreement, force=args.force, seed=args.seed,
                                 workers=args.workers, progress=not args.no_progress)
    except QuantizeRefused as exc:
        _print_quantize_report(exc.report, args.format)
        _error(str(exc))
        return EXIT_FAILED
    except QuantizeError as exc:
        _error(str(exc))
        return EXIT_FAILED
    _print_quantize_report(report, args.format)
    if args.format == "table":
        print(printable(f"wrote {args.output} (use it as --weights {args.output})"))
    return EXIT_OK


def _print_quantize_report(report: dict, form: str) -> None:
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


def run_export(args: argparse.Namespace) -> int:
    """Export the folded network and verify the written file reproduces the torch logits."""
    from .backends import export_onnx, export_torchscript
    from .fileio import check_output_file
    from .transforms import eval_settings
    from .weights import create_model

    check_output_file(args.output)  # before the model loads and the export runs
    model = create_model(pretrained=args.weights if args.weights is not None else True)
    size = (args.image_size,) * 2 if args.image_size else eval_settings(model.pretrained_cfg)["image_size"]
    try:
        if args.kind == "onnx":
            error = export_onnx(model, args.output, image_size=size)
        else:
            error = export_torchscript(model, args.output, image_size=size)
    except ImportError as exc:
        _error(f"{exc.name or exc} is needed for this export: pip install 'ecanfnet[onnx]'")
        return EXIT_FAILED
    ok = error is not None and error <= EXPORT_MAX_REL_ERROR
    print(f"wrote {printable(args.output)}; max relative logit error vs torch at {size[0]}x{size[1]}: {error:.2e} "
          f"({'ok' if ok else 'TOO LARGE'}, limit {EXPORT_MAX_REL_ERROR:.0e})")
    return EXIT_OK if ok else EXIT_FAILED


def run_train(args: argparse.Namespace) -> int:
    """Train and report where the model went."""
    from .distributed import launch_rank
    from .training.data import DEFAULT_CROP_SCALE
    from .training.loop import TrainConfig, TrainingError, train

    if args.crop_scale and args.crop_scale[0] > args.crop_scale[1]:
        _error(f"argument --crop-scale: MIN must not exceed MAX, got {args.crop_scale[0]:g} {args.crop_scale[1]:g}")
        return EXIT_USAGE
    cfg = TrainConfig(
        data=args.data, output=args.output, val=args.val, val_split=args.val_split, weights=args.weights,
        from_scratch=args.from_scratch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
        agc_clip=args.agc, drop_rate=args.drop_rate, drop_path_rate=args.drop_path_rate,
        image_size=args.image_size, randaugment=not args.no_randaugment, freeze_backbone=args.freeze_backbone,
        crop_scale=tuple(args.crop_scale or DEFAULT_CROP_SCALE), hflip=args.hflip,
        accum_steps=args.accum_steps, precision=args.precision, ema_decay=args.ema_decay, mixup=args.mixup,
        cutmix=args.cutmix, workers=args.workers, seed=args.seed, deterministic=args.deterministic, resume=args.resume,
        resume_with_changes=args.resume_with_changes,
        overwrite=args.overwrite, progress=not args.no_progress)
    try:
        out = train(cfg)
    except (TrainingError, FileNotFoundError, ValueError) as exc:
        _error(str(exc))
        return EXIT_FAILED
    if launch_rank() == 0:  # under torchrun every rank returns here; one line is enough
        print(printable(f"trained model in {out} (predict with: ecanfnet predict --weights {out} IMAGES)"))
    return EXIT_OK


def run_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint on a labelled folder; print the summary, and the per-class CSV when asked."""
    from .backends import is_int8_model, make_runner
    from .fileio import check_output_file
    from .training.evaluate import evaluate_folder, write_per_class_csv

    device = _device(args.device)
    if args.per_class_csv is not None:
        check_output_file(args.per_class_csv)
    model = _load_model(args.weights)
    forward = make_runner(model, "auto" if is_int8_model(model) else "torch", None, _device_for(args.device, model, device))
    try:
        report = evaluate_folder(model, args.data, args.batch_size, args.workers, forward=forward,
                                 progress=not args.no_progress,
                                 decode=args.decode)
    except (FileNotFoundError, ValueError) as exc:
        _error(str(exc))
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


def run_embed(args: argparse.Namespace) -> int:
    """Embed every image named; exit 1 if any input could not be read."""
    from .embed import EmbedOutput, embed_files
    from .inference import find_images

    EmbedOutput(args.output).check_writable()  # before listing files and loading the model
    device = None if args.device == "auto" else _device(args.device)  # auto: the torchrun rank's own device
    paths, problems = find_images(args.paths)
    for problem in problems:
        print(f"ecanfnet: {printable(problem.error)}", file=sys.stderr)
    if not paths:
        _error("no images to embed")
        return EXIT_FAILED
    summary = embed_files(paths, args.output, weights=args.weights if args.weights is not None else True,
                          normalize=args.normalize, batch_size=args.batch_size, shard_size=args.shard_size,
                          backend=_backend_for(args.backend, len(paths), args.weights), precision=args.precision, workers=args.workers,
                          progress=not args.no_progress, device=device, decode=args.decode)
    if summary.rank == 0:  # the other ranks leave the merge to rank 0
        print(f"wrote {summary.count} x {summary.dim} vectors to {printable(summary.output)} "
              f"({len(summary.errors)} unreadable files skipped, listed in the .json)")
    failed = len(problems) + len(summary.errors)
    return EXIT_FAILED if failed else EXIT_OK


def run_search(args: argparse.Namespace) -> int:
    """Print the nearest indexed images to each query image."""
    from .search import EmbeddingIndex, embed_queries

    device = _device(args.device)
    index = EmbeddingIndex.load(args.index)
    vectors, queries, errors = embed_queries(index, args.query, args.weights, device=device)
    for err in errors:
        _error(err["error"])
    for query, hits in zip(queries, index.search(vectors, args.k, args.engine)):
        if args.format == "json":
            print(json_line({"query": query, "neighbours": [vars(h) for h in hits]}))
        else:
            print(printable(query))
            for rank, hit in enumerate(hits, 1):
                print(f"    {rank}. {hit.score:.4f}  {printable(hit.path)}")
    return EXIT_FAILED if errors else EXIT_OK


def run_serve(args: argparse.Namespace) -> int:
    """Load the model once and serve it until interrupted (SIGINT/SIGTERM finish in-flight requests first)."""
    import os

    try:
        import uvicorn

        from .serving.app import API_KEY_ENV, ServeSettings, create_app, host_allowed
        from .serving.protocol import header_timeout_protocol
    except ImportError as exc:
        _error(f"serving needs {exc.name}: pip install 'ecanfnet[serve]'")
        return EXIT_FAILED
    from .serving.engine import InferenceEngine

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not all("!" <= c <= "~" for c in api_key):
        # Clients send headers as latin-1 or UTF-8 bytes at will: only printable ASCII compares reliably.
        _error(f"the API key (--api-key or ${API_KEY_ENV}) must be printable ASCII without spaces, "
               "as HTTP headers carry it")
        return EXIT_USAGE
    loopback = host_allowed(args.host)
    device = _device(args.device)  # a bad --device fails before the port is taken
    if not loopback and api_key is None:
        warnings.warn(f"serving on {args.host} without an API key: anyone who can reach this port can use it",
                      stacklevel=1)
    try:
        sock = _listen_socket(args.host, args.port)  # before loading the model: a busy port fails at once
    except OSError as exc:
        _error(f"cannot listen on {args.host} port {args.port}: {exc.strerror or exc}")
        return EXIT_FAILED
    with sock:
        model = _load_model(args.weights)
        engine = InferenceEngine(model, args.backend, args.precision, _device_for(args.device, model, device))
        del model  # the engine keeps what it runs
        settings = ServeSettings(
            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
            max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels, timeout_s=args.timeout_s,
            body_timeout_s=args.body_timeout_s, api_key=api_key, decode_workers=args.decode_workers or 0,
            decode=args.decode,
            allowed_hosts=tuple(h.lower() for h in args.allow_host) if loopback else None)
        print(f"ecanfnet: serving {engine.name} ({engine.backend}, {engine.precision}) on "
              f"http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
        config = uvicorn.Config(create_app(engine, settings), log_level=args.log_level,
                                timeout_graceful_shutdown=int(args.timeout_s) + 5,
                                timeout_keep_alive=args.keep_alive_s, limit_concurrency=args.max_connections,
                                h11_max_incomplete_event_size=args.max_header_bytes,
                                http=header_timeout_protocol(args.header_timeout_s))
        server = uvicorn.Server(config)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        except SystemExit:  # uvicorn's own start-up failure (exit 3), already logged
            return EXIT_FAILED
    return EXIT_OK if server.started else EXIT_FAILED


def _listen_socket(host: str, port: int):
    """A TCP socket bound to host:port (IPv6 when host has a colon, as uvicorn does); OSError when it cannot be."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = socket.getaddrinfo(host.strip("[]"), port, family, socket.SOCK_STREAM)[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _print_json(result: ImageResult, write: Callable[..., None]) -> None:
    write(json_line(result.to_dict()), file=sys.stdout)
    sys.stdout.flush()


def _print_table(result: ImageResult, write: Callable[..., None]) -> None:
    lines = [printable(result.path)]
    if result.error is not None:
        lines.append(f"    error: {printable(result.error)}")
    for rank, p in enumerate(result.predictions or [], 1):
        lines.append(f"    {rank}. {100 * p.score:6.2f}%  {printable(p.label)}  [{p.index}]")
    write("\n".join(lines), file=sys.stdout)
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ecanfnet` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "fast", False):
        args.decode, args.precision = "fast", args.precision or "fastest"
    from PIL import Image

    # load_image enforces its own pixel limit with a per-file error; PIL's warning would only repeat it.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    warnings.formatwarning = lambda msg, category, *a, **k: f"ecanfnet: warning: {printable(msg)}\n"
    with _console_log():
        try:
            return args.func(args)
        except (WeightsError, BackendError, EmbedError) as exc:
            _error(str(exc))
            return EXIT_FAILED
        except KeyboardInterrupt:
            print("ecanfnet: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            return EXIT_OK
        except OSError as exc:  # writing an output (disk full, read-only, a folder in the way, ...)
            _error(_os_error_text(exc))
            return EXIT_FAILED


class _ConsoleFormatter(logging.Formatter):
    """`ecanfnet: MESSAGE`, or `ecanfnet: warning: MESSAGE` from WARNING up; control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return printable(f"ecanfnet: {level}{record.getMessage()}")  # messages carry file names


class _StderrHandler(logging.StreamHandler):
    """Log lines on sys.stderr as it is at each record (tests and redirect_stderr replace it), above a live bar."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_ConsoleFormatter())

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the current sys.stderr is used instead
        pass

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
        if tqdm is None:  # no progress bar can be on screen
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr)  # clears the bars, writes, redraws them
        except Exception:  # noqa: BLE001 - logging's own policy for a failing handler
            self.handleError(record)


@contextlib.contextmanager
def _console_log() -> Iterator[None]:
    """While main() runs: the library's "ecanfnet" log records (INFO and up) as lines on stderr, by one handler."""
    logger = logging.getLogger("ecanfnet")
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):  # main() called from within main()
        yield
        return
    handler, level = _StderrHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _error(message: str) -> None:
    """Print the one-line `ecanfnet: error: ...` for a failure (control characters escaped)."""
    print(f"ecanfnet: error: {printable(message)}", file=sys.stderr)


def _os_error_text(exc: OSError) -> str:
    """'PATH: reason' for an OSError, without the [Errno N] prefix."""
    if exc.filename is None:
        return exc.strerror or str(exc)
    also = f" -> {exc.filename2}" if exc.filename2 is not None else ""
    return f"{exc.filename}{also}: {exc.strerror or exc}"


if __name__ == "__main__":
    sys.exit(main())
