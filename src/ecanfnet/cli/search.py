"""`ecanfnet search`: the indexed images nearest to query images by cosine similarity."""

from __future__ import annotations

import argparse

from ..choices import SEARCH_ENGINES
from ..console import json_line, printable
from ._console import EXIT_FAILED, EXIT_OK, error
from ._options import add_command, add_device_option, add_format_option, add_weights_option, positive_int
from ._runtime import torch_device

EXAMPLES = (
    ("the 10 photos most like this one, in an index written by `ecanfnet embed`",
     "ecanfnet search photos.npy --query holiday/beach.jpg"),
    ("near-duplicates of two images, 3 each, as JSON lines",
     "ecanfnet search photos.npy --query a.jpg b.jpg -k 3 --format json"),
    ("a large index with faiss's HNSW search (pip install 'ecanfnet[search]')",
     "ecanfnet search shop.npy --query query.jpg --engine faiss"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the search parser."""
    q = add_command(subparsers, "search", help="nearest images by cosine similarity in an embedding file",
                    description="Embed the query images with the index's own weights and list the k most "
                                "similar indexed images. Exact (numpy) search below 100,000 vectors; above, "
                                "an HNSW index from faiss when installed (pip install 'ecanfnet[search]').",
                    examples=EXAMPLES)
    q.add_argument("index", metavar="INDEX", help="OUT.npy written by `ecanfnet embed`")
    q.add_argument("--query", required=True, nargs="+", metavar="IMAGE", help="query image(s)")
    q.add_argument("-k", type=positive_int, default=10, help="neighbours per query (default 10)")
    add_weights_option(q, "weights to embed the queries (default: those recorded in the index)")
    q.add_argument("--engine", choices=SEARCH_ENGINES, default="auto",
                   help="exact (matrix product), faiss (approximate; the search extra) or auto (default)")
    add_format_option(q)
    add_device_option(q)
    q.set_defaults(func=run)
    return q


def run(args: argparse.Namespace) -> int:
    """Print the nearest indexed images to each query image."""
    from ..search import EmbeddingIndex, embed_queries

    device = torch_device(args.device)
    index = EmbeddingIndex.load(args.index)
    vectors, queries, errors = embed_queries(index, args.query, args.weights, device=device)
    for err in errors:
        error(err["error"])
    for query, hits in zip(queries, index.search(vectors, args.k, args.engine)):
        if args.format == "json":
            print(json_line({"query": query, "neighbours": [vars(h) for h in hits]}))
        else:
            print(printable(query))
            for rank, hit in enumerate(hits, 1):
                print(f"    {rank}. {hit.score:.4f}  {printable(hit.path)}")
    return EXIT_FAILED if errors else EXIT_OK
