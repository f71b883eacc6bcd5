"""`ecanfnet embed`: pooled 2304-d embeddings of a collection of images; sharded, resumable, torchrun-aware."""

from __future__ import annotations

import argparse
import sys

from ..console import printable
from ._console import EXIT_FAILED, EXIT_OK, error
from ._options import (
    add_backend_options, add_command, add_decode_option, add_device_option, add_progress_option, add_weights_option,
    positive_int)
from ._runtime import backend_for, torch_device, weights_or_published

EXAMPLES = (
    ("L2-normalised vectors of a photo collection (rerun the same command to resume)",
     "ecanfnet embed photos/ --output photos.npy --normalize"),
    ("the same on 4 GPUs, each rank embedding its share of the shards",
     "torchrun --nproc-per-node 4 -m ecanfnet embed photos/ --output photos.npy --normalize"),
    ("your fine-tuned model on a glob, fast JPEG decoding",
     "ecanfnet embed 'shop/**/*.jpg' --output shop.npy --weights runs/products --decode fast"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the embed parser."""
    m = add_command(subparsers, "embed", help="pooled 2304-d embeddings of images, for retrieval and deduplication",
                    description="Write OUT.npy (float32, one row per readable image), OUT.paths.txt (the "
                                "paths, one per line, same order) and OUT.json (model, weights fingerprint, "
                                "preprocessing, unreadable files). Work is done in shards kept in OUT.parts/: "
                                "rerun the same command to resume. Under `torchrun --nproc-per-node N -m "
                                "ecanfnet embed ...` each rank embeds its share of the shards.", examples=EXAMPLES)
    m.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder or glob")
    m.add_argument("--output", required=True, metavar="OUT.npy", help="embedding matrix to write")
    add_weights_option(m)
    m.add_argument("--normalize", action="store_true", help="L2-normalise each vector (cosine = dot product)")
    m.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="images per forward pass (default 32)")
    m.add_argument("--shard-size", type=positive_int, default=4096, metavar="N",
                   help="images per resumable shard (default 4096)")
    m.add_argument("--workers", type=positive_int, default=None, metavar="N", help="image decoding threads")
    add_progress_option(m)
    add_decode_option(m)
    add_device_option(m, "auto (default: under torchrun the rank's own GPU, else CUDA if available), cpu, cuda:1, ...")
    add_backend_options(m)
    m.set_defaults(func=run)
    return m


def run(args: argparse.Namespace) -> int:
    """Embed every image named; exit 1 if any input could not be read."""
    from ..distributed import distributed_context
    from ..embed import EmbedOutput, embed_files
    from ..files import find_images

    EmbedOutput(args.output).check_writable()  # before listing files and loading the model
    device = None if args.device == "auto" else torch_device(args.device)  # auto: the torchrun rank's own device
    paths, problems = find_images(args.paths)
    for problem in problems:
        print(f"ecanfnet: {printable(problem.error)}", file=sys.stderr)
    if not paths:
        error("no images to embed")
        return EXIT_FAILED
    with distributed_context(device) as context:  # under torchrun: this rank's share of the files
        summary = embed_files(paths, args.output, weights=weights_or_published(args.weights), normalize=args.normalize,
                              batch_size=args.batch_size, shard_size=args.shard_size,
                              backend=backend_for(args.backend, len(paths), args.weights), precision=args.precision,
                              workers=args.workers, progress=not args.no_progress, decode=args.decode, context=context)
    if summary.rank == 0:  # the other ranks leave the merge to rank 0
        print(f"wrote {summary.count} x {summary.dim} vectors to {printable(summary.output)} "
              f"({len(summary.errors)} unreadable files skipped, listed in the .json)")
    return EXIT_FAILED if problems or summary.errors else EXIT_OK
