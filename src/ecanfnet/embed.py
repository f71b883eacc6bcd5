"""Embedding image collections: pooled 2304-d pre-logit vectors, sharded, resumable, merged atomically.

``embed_files(paths, "emb.npy")`` writes three files side by side:
  - ``emb.npy``        float32 (N, D) matrix, row i for path i (``np.load(..., mmap_mode="r")``);
  - ``emb.paths.txt``  the N image paths, one per line, UTF-8;
  - ``emb.json``       the manifest: model, weights fingerprint, preprocessing, normalisation, the
                       shard plan and every file that could not be read (with the reason).
Work happens in shards of ``shard_size`` files kept under ``emb.parts/`` until the merge: a run
that is stopped picks up where it left off, skipping finished shards. Under torchrun, rank r
embeds shards r, r + world, ...; rank 0 merges once all have finished (OUT on a shared
filesystem when the ranks are on several machines).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .backends import make_runner, weights_fingerprint
from .distributed import barrier, distributed_setup, say
from .errors import EmbedError
from .fileio import write_atomically, write_json_atomically
from .inference import decoded_batches
from .model import ECANFNet
from .transforms import MAX_IMAGE_PIXELS, eval_transform
from .weights import WeightsSource, create_model

MANIFEST_VERSION = 1


@dataclass
class EmbedOutput:
    """Where one embedding run writes: OUT.npy and its siblings."""

    vectors: Path

    def __post_init__(self) -> None:
        self.vectors = Path(self.vectors)
        if self.vectors.suffix != ".npy":
            raise EmbedError(f"{self.vectors}: the output must be a .npy file name (e.g. embeddings.npy)")

    def sibling(self, suffix: str) -> Path:
        """OUT with .npy replaced by suffix (".paths.txt", ".json", ".parts")."""
        return self.vectors.with_name(self.vectors.name[: -len(".npy")] + suffix)

    @property
    def paths(self) -> Path:
        return self.sibling(".paths.txt")

    @property
    def manifest(self) -> Path:
        return self.sibling(".json")

    @property
    def parts(self) -> Path:
        return self.sibling(".parts")


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


def embedding_model(model: ECANFNet) -> ECANFNet:
    """The model with its classifier removed, so that it outputs the pooled pre-logit vector."""
    model.reset_classifier(0)
    return model.eval()


def embed_files(paths: list[str], output: str | Path, weights: WeightsSource | bool = True,
                model: ECANFNet | None = None, normalize: bool = False, batch_size: int = 32,
                shard_size: int = 4096, backend: str = "auto", precision: str = "fp32",
                workers: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS, progress: bool = True) -> EmbedSummary:
    """Embed every readable image in paths into OUT.npy (+ .paths.txt, .json); resumable, torchrun-aware.

    weights: any weights source (True: the published checkpoint); ignored when model is given.
    The model passed in loses its classifier (see embedding_model).
    """
    out = EmbedOutput(Path(output))
    rank, world, device = distributed_setup()
    net = embedding_model(model if model is not None else create_model(pretrained=weights))
    plan = _plan(paths, net, normalize, shard_size, weights if model is None else None)
    if _already_done(out, plan):
        say(f"{out.vectors} is complete for these files and weights; nothing to do", rank)
        manifest = json.loads(out.manifest.read_text(encoding="utf-8"))
        return EmbedSummary(out.vectors, manifest["count"], manifest["dim"], manifest["errors"], rank=rank)

    if rank == 0:
        _start_or_check_parts(out, plan)
    barrier()
    if rank != 0:
        _start_or_check_parts(out, plan)

    runner = make_runner(net, backend, precision, device)
    transform = eval_transform(net.pretrained_cfg)
    mine = list(range(rank, len(plan["shards"]), world))
    todo = [i for i in mine if not _shard_done(out, i)]
    if len(todo) < len(mine):
        say(f"resuming {out.parts}: {len(mine) - len(todo)} of {len(mine)} shards already done", rank)
    bar = _progress_bar(sum(len(plan["shards"][i]) for i in todo), progress and rank == 0)
    for i in todo:
        _embed_shard(out, i, plan["shards"][i], runner, transform, net.num_features, normalize,
                     batch_size, workers, max_pixels, bar)
    bar.close()
    barrier()

    summary = EmbedSummary(out.vectors, 0, net.num_features, shards_embedded=len(todo),
                           shards_reused=len(mine) - len(todo), rank=rank)
    if rank == 0:
        summary.count, summary.errors = _merge(out, plan)
    barrier()
    return summary


def _plan(paths: list[str], net: ECANFNet, normalize: bool, shard_size: int, weights: Any) -> dict[str, Any]:
    """Everything that decides the result; a resumed run must have the same plan."""
    if shard_size < 1:
        raise EmbedError(f"shard_size must be at least 1, got {shard_size}")
    listing = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()
    return {
        "version": MANIFEST_VERSION,
        "architecture": net.name,
        "weights": _recorded_source(weights),
        "weights_fingerprint": weights_fingerprint(net),
        "dim": net.num_features,
        "normalize": normalize,
        "pretrained_cfg": {k: net.pretrained_cfg.get(k) for k in
                           ("test_input_size", "input_size", "test_crop_pct", "crop_pct", "interpolation", "mean", "std")},
        "files_sha256": listing,
        "shard_size": shard_size,
        "shards": [paths[i:i + shard_size] for i in range(0, len(paths), shard_size)],
    }


def _recorded_source(weights: Any) -> str | None:
    """How search finds the weights again: "published", an absolute local path, or the hub source as given."""
    if weights is True:
        return "published"
    if isinstance(weights, (str, Path)):
        return str(Path(weights).resolve()) if Path(weights).exists() else str(weights)
    return None


def _plan_key(plan: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in plan.items() if k != "shards"}


def _already_done(out: EmbedOutput, plan: dict[str, Any]) -> bool:
    if not (out.manifest.is_file() and out.vectors.is_file() and out.paths.is_file()):
        return False
    try:
        manifest = json.loads(out.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("plan") == _plan_key(plan)


def _start_or_check_parts(out: EmbedOutput, plan: dict[str, Any]) -> None:
    """Create OUT.parts/plan.json, or check that the leftovers there belong to this same run."""
    plan_file = out.parts / "plan.json"
    if plan_file.is_file():
        try:
            earlier = json.loads(plan_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise EmbedError(f"{plan_file}: unreadable ({exc}); delete {out.parts} to start over") from exc
        if _plan_key(earlier) != _plan_key(plan):
            changed = sorted(k for k in _plan_key(plan) if earlier.get(k) != plan.get(k))
            raise EmbedError(f"{out.parts} holds an unfinished run with other settings ({', '.join(changed)} differ); "
                             f"resume it with the same files and options, or delete {out.parts} to start over")
        return
    out.parts.mkdir(parents=True, exist_ok=True)
    write_json_atomically(plan_file, plan)


def _shard_file(out: EmbedOutput, i: int, suffix: str) -> Path:
    return out.parts / f"shard-{i:05d}{suffix}"


def _shard_done(out: EmbedOutput, i: int) -> bool:
    # The .json is written after the .npy, so its presence means both are complete.
    return _shard_file(out, i, ".json").is_file()


def _embed_shard(out: EmbedOutput, i: int, paths: list[str], runner, transform, dim: int, normalize: bool,
                 batch_size: int, workers: int | None, max_pixels: int, bar) -> None:
    matrix, good, errors = embed_paths(paths, runner, transform, dim, normalize, batch_size, workers, max_pixels,
                                       on_batch=bar.update)
    for err in errors:
        bar.write(f"ecanfnet: skipped {err['error']}", file=sys.stderr)
    write_atomically(_shard_file(out, i, ".npy"), lambda tmp: _save_npy(tmp, matrix))
    write_json_atomically(_shard_file(out, i, ".json"), {"paths": good, "errors": errors})


def embed_paths(paths: list[str], runner: Callable[[torch.Tensor], torch.Tensor], transform: Callable,
                dim: int, normalize: bool = False, batch_size: int = 32, workers: int | None = None,
                max_pixels: int = MAX_IMAGE_PIXELS, on_batch: Callable[[int], Any] | None = None,
                ) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
    """Embed files with a runner: (float32 matrix of the readable ones, their paths, {path, error} of the rest)."""
    errors = [{"path": p, "error": f"{p!r}: the path contains a newline, which OUT.paths.txt cannot hold"}
              for p in paths if "\n" in p]
    vectors: list[np.ndarray] = []
    good: list[str] = []
    for items in decoded_batches([p for p in paths if "\n" not in p], transform, batch_size, workers, max_pixels):
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
    records = [json.loads(_shard_file(out, i, ".json").read_text(encoding="utf-8")) for i in range(n)]
    count = sum(len(r["paths"]) for r in records)
    errors = [e for r in records for e in r["errors"]]

    def write_vectors(tmp: str) -> None:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, plan["dim"]))
        row = 0
        for i in range(n):
            part = np.load(_shard_file(out, i, ".npy"), mmap_mode="r")
            merged[row:row + len(part)] = part
            row += len(part)
        merged.flush()
        del merged

    write_atomically(out.vectors, write_vectors)
    lines = "".join(p + "\n" for r in records for p in r["paths"])
    write_atomically(out.paths, lambda tmp: Path(tmp).write_text(lines, encoding="utf-8", errors="surrogateescape"))
    write_json_atomically(out.manifest, {"plan": _plan_key(plan), "count": count, "dim": plan["dim"],
                                         "vectors": out.vectors.name, "paths": out.paths.name, "errors": errors})
    shutil.rmtree(out.parts, ignore_errors=True)
    return count, errors


def _save_npy(tmp: str, matrix: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, matrix)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc="embed", disable=not enabled, file=sys.stderr, dynamic_ncols=True)

