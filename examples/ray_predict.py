"""Classify a folder of images with Ray Data and write the predictions as Parquet.

    python examples/ray_predict.py photos/ --output predictions/ [--weights SRC] [--concurrency 2]

Reads every image file below the folder with ray.data.read_binary_files (the bytes are decoded by
ecanfnet as `ecanfnet predict` decodes files, so the results are the same), classifies them in
--concurrency actors that each load the model once (ecanfnet.integrations.ray.ImageClassifier) and
writes one row per file (path, label, open_set_score, top_labels, top_indices, top_scores, error) to
Parquet files in --output. On a cluster, pass --address auto (or set RAY_ADDRESS) and a folder every
node can read (a shared file system, or s3://...); without it a local Ray instance is started.
The actors must leave a CPU free for reading and writing files: on 2 CPUs, 2 actors of 0.5 CPU each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ecanfnet.transforms import IMAGE_EXTENSIONS


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="folder (or file, or s3:// prefix) of images, searched recursively")
    parser.add_argument("--output", required=True, help="folder the Parquet files are written to")
    parser.add_argument("--weights", default=None, help="weights source (default: the published checkpoint)")
    parser.add_argument("--concurrency", type=int, default=2, help="model actors (default 2)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model call (default 32)")
    parser.add_argument("--cpus-per-actor", type=float, default=1, help="CPUs each actor reserves (default 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=0, help="GPUs each actor reserves (default 0)")
    parser.add_argument("--backend", default="auto", help="torch, compile, onnxruntime, openvino or auto")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--address", default=None, help="a running Ray cluster (e.g. auto); default: start one here")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    args = parser.parse_args(argv)
    for name in ("concurrency", "batch_size", "top_k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.cpus_per_actor > 0 or not args.gpus_per_actor >= 0:
        parser.error("--cpus-per-actor must be above 0 and --gpus-per-actor at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import ray
    except ImportError:
        print("this example needs Ray Data: pip install 'ecanfnet[ray]'", file=sys.stderr)
        return 2
    from ecanfnet.integrations.ray import ImageClassifier

    started_here = not ray.is_initialized()
    if started_here:  # a caller (e.g. a test) may have started Ray already
        ray.init(address=args.address, num_cpus=None if args.address else args.num_cpus, include_dashboard=False)
    try:
        if args.address is None and not _leaves_a_cpu(ray.cluster_resources().get("CPU", 0), args):
            return 2
        start = time.perf_counter()
        files = ray.data.read_binary_files(args.input, include_paths=True,
                                           file_extensions=sorted(e[1:] for e in IMAGE_EXTENSIONS))
        predictions = files.map_batches(
            ImageClassifier, batch_size=args.batch_size,
            fn_constructor_kwargs=dict(weights=_absolute(args.weights), backend=args.backend, top_k=args.top_k,
                                       batch_size=args.batch_size),
            compute=ray.data.ActorPoolStrategy(size=args.concurrency),
            num_cpus=args.cpus_per_actor, num_gpus=args.gpus_per_actor)
        predictions.write_parquet(args.output)
        seconds = time.perf_counter() - start
    finally:
        if started_here:
            ray.shutdown()
    print(f"wrote the predictions to {args.output} in {seconds:.1f} s")
    return 0


def _absolute(weights: str | None) -> str | None:
    """A local weights path made absolute (the actors may run in another folder); other sources as given."""
    return str(Path(weights).resolve()) if weights is not None and Path(weights).exists() else weights


def _leaves_a_cpu(cpus: float, args: argparse.Namespace) -> bool:
    """Whether the actors leave a CPU for the read and write tasks (else Ray Data waits for one forever)."""
    if args.concurrency * args.cpus_per_actor <= cpus - 1:
        return True
    print(f"--concurrency {args.concurrency} x --cpus-per-actor {args.cpus_per_actor:g} leaves none of this "
          f"Ray instance's {cpus:g} CPUs for reading and writing files: lower one of them", file=sys.stderr)
    return False


if __name__ == "__main__":
    sys.exit(main())
