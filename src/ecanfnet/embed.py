"""Embedding image collections: pooled 2304-d pre-logit vectors, sharded, resumable, merged atomically.

``embed_files(paths, "emb.npy")`` writes three files side by side:
  - ``emb.npy``        float32 (N, D) matrix, row i for path i (``np.load(..., mmap_mode="r")``);
  - ``emb.paths.txt``  the N image paths, one per line, UTF-8;
  - ``emb.json``       the manifest: model, weights fingerprint, preprocessing, normalisation, the
                       shard plan and every file that could not be read (with the reason).
Work happens in shards of ``shard_size`` files kept under ``emb.parts/`` until the merge (shards.py): a run
that is stopped picks up where it left off, skipping finished shards (a damaged one, e.g. truncated
by a full disk, is embedded again). Files beside OUT.npy are only ever replaced when they are this
tool's own earlier output (recognised by the manifest's structure and version). Under torchrun, rank r
embeds shards r, r + world, ...; rank 0 merges once all have finished (OUT on a shared
filesystem when the ranks are on several machines).
Under torchrun the caller passes each process's DistContext (distributed.distributed_context).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .backends import make_runner
from .distributed import DistContext, context_or_own
from .errors import EmbedError
from .factory import create_model
from .fileio import write_atomically, write_json_atomically, write_text_atomically
from .files import decoded_batches
from .model import ECANFNet, embedding_view
from .shards import (
    ShardedOutput, check_all_shards, is_error_list, manifest_shape_problem, model_settings, plan_key, preprocessing_of,
    read_json_or_error, remove_parts, run_shards)
from .transforms import MAX_IMAGE_PIXELS, eval_transform
from .weights import WeightsSource

log = logging.getLogger("ecanfnet")

MANIFEST_VERSION = 1


@dataclass
class EmbedOutput(ShardedOutput):
    """Where one embedding run writes: OUT.npy and its siblings; a shard: its vectors (.npy), then a record (.json)."""

    vectors: Path
    tool = "ecanfnet embed"
    suffix = ".npy"
    shard_suffixes = (".npy", ".json")
    action = "embedding"
    error = EmbedError

    def __post_init__(self) -> None:
        self.vectors = Path(self.vectors)
        self.check_suffix()

    @property
    def target(self) -> Path:
        return self.vectors

    @property
    def example_name(self) -> str:
        return "embeddings.npy"

    @property
    def paths(self) -> Path:
        return self.sibling(".paths.txt")

    def side_files(self) -> tuple[Path, ...]:
        return (self.manifest, self.paths)

    def guarded(self) -> tuple[Path, ...]:
        return (self.paths,)

    def manifest_problem(self, data: Any) -> str | None:
        return manifest_problem_of(data)

    def shard_problem(self, i: int, plan: dict[str, Any]) -> str | None:
        """Why shard i's files (record .json + vectors .npy) are not a complete result of its part of the plan."""
        record_file, vectors_file = self.shard_file(i, ".json"), self.shard_file(i, ".npy")
        record = read_json_or_error(record_file)
        if isinstance(record, Exception):
            return f"{record_file}: unreadable ({record})"
        if not (isinstance(record, dict) and isinstance(record.get("paths"), list)
                and all(isinstance(p, str) for p in record["paths"]) and is_error_list(record.get("errors"))):
            return f"{record_file}: not a shard record"
        done = record["paths"] + [e["path"] for e in record["errors"]]
        if Counter(done) != Counter(plan["shards"][i]):
            return f"{record_file}: lists other files than shard {i} of the plan"
        try:
            load_vectors(vectors_file, plan["dim"], rows=len(record["paths"]))
        except EmbedError as exc:
            return str(exc)
        return None


def manifest_problem_of(data: Any) -> str | None:
    """Why data is not a manifest written by this version of `ecanfnet embed` (None when it is one)."""
    expected = {"count": int, "dim": int, "vectors": str, "paths": str, "errors": list}
    expected_plan = {"dim": int, "normalize": bool, "weights_fingerprint": str, "files_sha256": str,
                     "architecture": str}
    problem = manifest_shape_problem(data, MANIFEST_VERSION, expected, expected_plan)
    if problem is not None:
        return problem
    plan = data["plan"]
    if not isinstance(plan.get("weights"), (str, type(None))):
        return "'plan.weights' is not a string"
    if data["count"] < 0 or data["dim"] < 1 or data["dim"] != plan["dim"]:
        return f"'count' {data['count']} / 'dim' {data['dim']} are not valid"
    if not is_error_list(data["errors"]):
        return "'errors' is not a list of {path, error} objects"
    return None


def load_vectors(path: Path, dim: int, rows: int | None = None, unreadable: str = "damaged or truncated",
                 ) -> np.ndarray:
    """The memory-mapped float32 (rows, dim) matrix in path (any row count when rows is None); never unpickles.

    Anything else raises EmbedError naming path: "PATH: <unreadable> (why)" when it is not a readable .npy,
    "PATH: holds DTYPE SHAPE, expected float32 (ROWS, DIM)" when it holds another array.
    """
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise EmbedError(f"{path}: {unreadable} ({exc})") from None
    if not (isinstance(vectors, np.ndarray) and vectors.dtype == np.float32 and vectors.ndim == 2
            and vectors.shape[1] == dim and rows in (None, vectors.shape[0])):
        raise EmbedError(f"{path}: holds {getattr(vectors, 'dtype', 'no')} {getattr(vectors, 'shape', 'array')}, "
                         f"expected float32 ({'N' if rows is None else rows}, {dim})")
    return vectors


@dataclass
class EmbedSummary:
    """What a run did: vectors written, files skipped as unreadable, shards done now / found done."""

    output: Path
    count: int
    dim: int
    errors: list[dict[str, str]] = field(default_factory=list)
    shards_embedded: int = 0
    shards_reused: int = 0
    rank: int = 0


def embed_files(paths: list[str], output: str | Path, *, weights: WeightsSource | bool = True,
                model: ECANFNet | None = None, normalize: bool = False, batch_size: int = 32,
                shard_size: int = 4096, backend: str = "auto", precision: str | None = None,
                workers: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS, progress: bool = True,
                device: str | torch.device | None = None, decode: str = "exact",
                context: DistContext | None = None) -> EmbedSummary:
    """Embed every readable image in paths into OUT.npy (+ .paths.txt, .json); resumable, multi-process aware.

    weights: any weights source (True: the published checkpoint; an INT8 folder too); ignored when model is given.
    precision: None, the model's own (fp32; int8 for an INT8 model).
    A model passed in is left whole: its trunk is run without the classifier (model.embedding_view).
    device: where the model runs (default: the context's device; without a context CUDA when available, else CPU).
    decode: "exact" or "fast" (JPEGs decoded at a reduced DCT scale, see load_image); part of the resume plan.
    context: this process's place among several that share the work (distributed.distributed_context); rank r
    embeds shards r, r + world, ..., rank 0 merges. None: a lone process.
    Refuses (EmbedError) to replace an OUT.json or OUT.paths.txt this tool did not write.
    """
    out = EmbedOutput(Path(output))
    out.check_writable()
    with context_or_own(context, device) as ctx:
        net = embedding_view(model if model is not None else create_model(pretrained=weights, int8_ok=True))
        plan = _plan(out, paths, net, normalize, shard_size, weights if model is None else None)
        if decode != "exact":  # recorded only when not the default, so earlier exact runs still resume
            plan["decode"] = decode
        manifest = out.finished_manifest(plan, ctx.rank)
        if manifest is not None:
            return EmbedSummary(out.vectors, manifest["count"], manifest["dim"], manifest["errors"], rank=ctx.rank)
        runner = make_runner(net, backend, precision, ctx.device, compile_batch=batch_size)
        embedder = _Embedder(runner, eval_transform(net.pretrained_cfg), net.head_hidden_size, normalize=normalize,
                             batch_size=batch_size, workers=workers, max_pixels=max_pixels, decode=decode)
        return _embed_and_merge(out, plan, embedder, ctx, progress=progress)


@dataclass(frozen=True)
class _Embedder:
    """How a run turns files into vectors: the model runner and preprocessing, with embed_paths' options."""

    runner: Callable[[torch.Tensor], torch.Tensor]
    transform: Callable
    dim: int
    normalize: bool = False
    batch_size: int = 32
    workers: int | None = None
    max_pixels: int = MAX_IMAGE_PIXELS
    decode: str = "exact"

    def __call__(self, paths: list[str], on_batch: Callable[[int], Any] | None = None,
                 ) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
        return embed_paths(paths, self.runner, self.transform, self.dim, normalize=self.normalize,
                           batch_size=self.batch_size, workers=self.workers, max_pixels=self.max_pixels,
                           on_batch=on_batch, decode=self.decode)


def _embed_and_merge(out: EmbedOutput, plan: dict[str, Any], embedder: _Embedder, ctx: DistContext, *,
                     progress: bool) -> EmbedSummary:
    """This rank's unfinished shards (r, r + world, ...), then, once every rank is done, rank 0's merge."""
    done, reused, merged = run_shards(
        out, plan, ctx, lambda i, files, advance: _embed_shard(out, i, files, embedder, advance),
        lambda: _merge(out, plan), progress=progress, desc="embed")
    summary = EmbedSummary(out.vectors, 0, embedder.dim, shards_embedded=done, shards_reused=reused, rank=ctx.rank)
    if merged is not None:
        summary.count, summary.errors = merged
    return summary


def _plan(out: EmbedOutput, paths: list[str], net: ECANFNet, normalize: bool, shard_size: int,
          weights: Any) -> dict[str, Any]:
    """Everything that decides the result; a resumed run must have the same plan."""
    return out.make_plan(paths, shard_size, {
        "version": MANIFEST_VERSION,
        **model_settings(net, weights),
        "dim": net.head_hidden_size,
        "normalize": normalize,
        "pretrained_cfg": preprocessing_of(net),
    })


def _embed_shard(out: EmbedOutput, i: int, paths: list[str], embedder: _Embedder,
                 advance: Callable[[int], Any]) -> None:
    """Embed shard i's files into its .npy, then write its record (.json), each atomically."""
    matrix, good, errors = embedder(paths, on_batch=advance)
    for err in errors:
        log.info("skipped %s", err["error"])
    write_atomically(out.shard_file(i, ".npy"), lambda tmp: _save_npy(tmp, matrix))
    write_json_atomically(out.shard_file(i, ".json"), {"paths": good, "errors": errors})


def embed_paths(paths: list[str], runner: Callable[[torch.Tensor], torch.Tensor], transform: Callable,
                dim: int, *, normalize: bool = False, batch_size: int = 32, workers: int | None = None,
                max_pixels: int = MAX_IMAGE_PIXELS, on_batch: Callable[[int], Any] | None = None,
                decode: str = "exact") -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """Embed files with a runner: (float32 matrix of the readable ones, their paths, {path, error} of the rest)."""
    errors = [{"path": p, "error": f"{p!r}: the path contains a newline, which OUT.paths.txt cannot hold"}
              for p in paths if "\n" in p]
    vectors: list[np.ndarray] = []
    good: list[str] = []
    for items in decoded_batches([p for p in paths if "\n" not in p], transform, batch_size, workers, max_pixels,
                                 decode):
        tensors = [t for _, t, _ in items if t is not None]
        if tensors:
            vectors.append(_finish(runner(torch.stack(tensors)), normalize))
        for path, tensor, error in items:
            if tensor is None:
                errors.append({"path": path, "error": error or "unreadable"})
            else:
                good.append(path)
        if on_batch is not None:
            on_batch(len(items))
    matrix = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32)
    return matrix, good, errors


def _finish(vectors: torch.Tensor, normalize: bool) -> np.ndarray:
    """float32 numpy rows, L2-normalised when asked."""
    vectors = vectors.float()
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, dim=1)
    return vectors.numpy()


def _merge(out: EmbedOutput, plan: dict[str, Any]) -> tuple[int, list[dict[str, str]]]:
    """Concatenate the shards into OUT.npy + OUT.paths.txt + OUT.json (each atomically), then drop OUT.parts."""
    n = len(plan["shards"])
    check_all_shards(out, plan)
    records = [json.loads(out.shard_file(i, ".json").read_text(encoding="utf-8")) for i in range(n)]
    count = sum(len(r["paths"]) for r in records)
    errors = [e for r in records for e in r["errors"]]

    def write_vectors(tmp: str) -> None:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, plan["dim"]))
        row = 0
        for i in range(n):
            part = np.load(out.shard_file(i, ".npy"), mmap_mode="r", allow_pickle=False)
            merged[row:row + len(part)] = part
            row += len(part)
        merged.flush()
        del merged

    write_atomically(out.vectors, write_vectors)
    lines = "".join(p + "\n" for r in records for p in r["paths"])
    write_text_atomically(out.paths, lines, errors="surrogateescape")
    write_json_atomically(out.manifest, {"plan": plan_key(plan), "count": count, "dim": plan["dim"],
                                         "vectors": out.vectors.name, "paths": out.paths.name, "errors": errors})
    remove_parts(out)
    return count, errors


def _save_npy(tmp: str, matrix: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, matrix)
