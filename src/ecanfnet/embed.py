"""Embedding image collections: pooled 2304-d pre-logit vectors, sharded, resumable, merged atomically.

``embed_files(paths, "emb.npy")`` writes three files side by side:
  - ``emb.npy``        float32 (N, D) matrix, row i for path i (``np.load(..., mmap_mode="r")``);
  - ``emb.paths.txt``  the N image paths, one per line, UTF-8;
  - ``emb.json``       the manifest: model, weights fingerprint, preprocessing, normalisation, the
                       shard plan and every file that could not be read (with the reason).
Work happens in shards of ``shard_size`` files kept under ``emb.parts/`` until the merge: a run
that is stopped picks up where it left off, skipping finished shards (a damaged one, e.g. truncated
by a full disk, is embedded again). Files beside OUT.npy are only ever replaced when they are this
tool's own earlier output (recognised by the manifest's structure and version). Under torchrun, rank r
embeds shards r, r + world, ...; rank 0 merges once all have finished (OUT on a shared
filesystem when the ranks are on several machines).
Under torchrun the caller passes each process's DistContext (distributed.distributed_context).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .backends import make_runner
from .console import printable
from .distributed import DistContext, barrier, context_or_own, say
from .errors import EmbedError
from .factory import create_model
from .fileio import check_output_file, write_atomically, write_json_atomically, write_text_atomically
from .files import decoded_batches
from .model import ECANFNet, embedding_view
from .transforms import MAX_IMAGE_PIXELS, eval_transform
from .weights import WeightsSource, weights_fingerprint

log = logging.getLogger("ecanfnet")

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

    def check_writable(self) -> None:
        """Refuse (EmbedError/OSError naming the file) an output that would replace what this tool did not write."""
        for path in (self.vectors, self.manifest, self.paths):
            if path.is_dir():
                raise EmbedError(f"{path}: is a folder; --output must name a .npy file, beside which "
                                 f"{self.manifest.name} and {self.paths.name} are written")
        check_output_file(self.vectors)
        if self.manifest.exists():
            problem = manifest_problem_of(read_json_or_error(self.manifest))
            if problem is not None:
                raise EmbedError(f"{self.manifest}: exists and is not an `ecanfnet embed` manifest ({problem}); "
                                 f"not replacing it: move it away or choose another --output")
        elif self.paths.exists() and not (self.parts / "plan.json").is_file():  # (a merge stopped before its manifest)
            raise EmbedError(f"{self.paths}: exists without the `ecanfnet embed` manifest {self.manifest.name} "
                             f"beside it; not replacing it: move it away or choose another --output")
        if self.parts.exists() and not (self.parts.is_dir() and _is_our_parts_folder(self.parts)):
            raise EmbedError(f"{self.parts}: exists and is not an unfinished `ecanfnet embed` run (no plan.json); "
                             f"not writing into it: move it away or choose another --output")


def read_json_or_error(path: Path) -> Any:
    """The JSON in path, or the Exception that stopped reading it (for the *_problem* checks to report)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return exc


def _is_our_parts_folder(parts: Path) -> bool:
    return (parts / "plan.json").is_file() or not any(parts.iterdir())


def manifest_problem_of(data: Any) -> str | None:
    """Why data is not a manifest written by this version of `ecanfnet embed` (None when it is one)."""
    if isinstance(data, Exception):
        return f"unreadable: {data}"
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    plan = data.get("plan")
    if not isinstance(plan, dict):
        return "no 'plan' object"
    if plan.get("version") != MANIFEST_VERSION:
        return f"'plan.version' is {plan.get('version')!r}, expected {MANIFEST_VERSION}"
    expected = {"count": int, "dim": int, "vectors": str, "paths": str, "errors": list}
    expected_plan = {"dim": int, "normalize": bool, "weights_fingerprint": str, "files_sha256": str,
                     "architecture": str}
    for where, obj, fields in (("", data, expected), ("plan.", plan, expected_plan)):
        for key, kind in fields.items():
            if not isinstance(obj.get(key), kind) or (kind is int and isinstance(obj.get(key), bool)):
                return f"'{where}{key}' is missing or not {'an' if kind is int else 'a'} {kind.__name__}"
    if not isinstance(plan.get("weights"), (str, type(None))):
        return "'plan.weights' is not a string"
    if data["count"] < 0 or data["dim"] < 1 or data["dim"] != plan["dim"]:
        return f"'count' {data['count']} / 'dim' {data['dim']} are not valid"
    if not _is_error_list(data["errors"]):
        return "'errors' is not a list of {path, error} objects"
    return None


def _is_error_list(value: Any) -> bool:
    """Whether value is a list of {"path": str, "error": str} objects (the unreadable files a run reports)."""
    return isinstance(value, list) and all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("error"), str) for e in value)


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
        plan = _plan(paths, net, normalize, shard_size, weights if model is None else None)
        if decode != "exact":  # recorded only when not the default, so earlier exact runs still resume
            plan["decode"] = decode
        manifest = _finished_manifest(out, plan)
        if manifest is not None:
            say(f"{printable(out.vectors)} is complete for these files and weights; nothing to do", ctx.rank)
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
    rank, world = ctx.rank, ctx.world
    if rank == 0:
        _start_or_check_parts(out, plan)
    barrier()
    if rank != 0:
        _start_or_check_parts(out, plan)
    mine = list(range(rank, len(plan["shards"]), world))
    todo = [i for i in mine if not _shard_done(out, i, plan, rank)]
    if len(todo) < len(mine):
        say(f"resuming {printable(out.parts)}: {len(mine) - len(todo)} of {len(mine)} shards already done", rank)
    bar = _progress(sum(len(plan["shards"][i]) for i in todo), progress and rank == 0)
    for i in todo:
        _embed_shard(out, i, plan["shards"][i], embedder, bar)
    bar.close()
    barrier()
    summary = EmbedSummary(out.vectors, 0, embedder.dim, shards_embedded=len(todo),
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
        "dim": net.head_hidden_size,
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


def _finished_manifest(out: EmbedOutput, plan: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier run with this same plan whose outputs are all there, else None."""
    if not (out.manifest.is_file() and out.vectors.is_file() and out.paths.is_file()):
        return None
    manifest = read_json_or_error(out.manifest)
    if manifest_problem_of(manifest) is not None or manifest.get("plan") != _plan_key(plan):
        return None
    return manifest


def _start_or_check_parts(out: EmbedOutput, plan: dict[str, Any]) -> None:
    """Create OUT.parts/plan.json, or check that the leftovers there belong to this same run."""
    plan_file = out.parts / "plan.json"
    if plan_file.is_file():
        earlier = read_json_or_error(plan_file)
        if not isinstance(earlier, dict):
            reason = earlier if isinstance(earlier, Exception) else "not a JSON object"
            raise EmbedError(f"{plan_file}: unreadable ({reason}); delete {out.parts} to start over")
        if _plan_key(earlier) != _plan_key(plan):
            changed = sorted(k for k in _plan_key(plan) if earlier.get(k) != plan.get(k))
            raise EmbedError(f"{out.parts} holds an unfinished run with other settings ({', '.join(changed)} differ); "
                             f"resume it with the same files and options, or delete {out.parts} to start over")
        return
    out.parts.mkdir(parents=True, exist_ok=True)
    write_json_atomically(plan_file, plan)


def _shard_file(out: EmbedOutput, i: int, suffix: str) -> Path:
    return out.parts / f"shard-{i:05d}{suffix}"


def _shard_done(out: EmbedOutput, i: int, plan: dict[str, Any], rank: int) -> bool:
    """Whether shard i is finished and intact; a damaged one is deleted (with a note) so that it is embedded again."""
    # The .json is written after the .npy, so without it the shard was never finished.
    if not _shard_file(out, i, ".json").is_file():
        return False
    problem = _shard_problem(out, i, plan)
    if problem is None:
        return True
    say(f"{printable(problem)}; embedding shard {i} again", rank)
    _shard_file(out, i, ".json").unlink(missing_ok=True)
    _shard_file(out, i, ".npy").unlink(missing_ok=True)
    return False


def _shard_problem(out: EmbedOutput, i: int, plan: dict[str, Any]) -> str | None:
    """Why shard i's files (record .json + vectors .npy) are not a complete result of its part of the plan."""
    record_file, vectors_file = _shard_file(out, i, ".json"), _shard_file(out, i, ".npy")
    record = read_json_or_error(record_file)
    if isinstance(record, Exception):
        return f"{record_file}: unreadable ({record})"
    if not (isinstance(record, dict) and isinstance(record.get("paths"), list)
            and all(isinstance(p, str) for p in record["paths"]) and _is_error_list(record.get("errors"))):
        return f"{record_file}: not a shard record"
    done = record["paths"] + [e["path"] for e in record["errors"]]
    if Counter(done) != Counter(plan["shards"][i]):
        return f"{record_file}: lists other files than shard {i} of the plan"
    try:
        load_vectors(vectors_file, plan["dim"], rows=len(record["paths"]))
    except EmbedError as exc:
        return str(exc)
    return None


def _embed_shard(out: EmbedOutput, i: int, paths: list[str], embedder: _Embedder, bar) -> None:
    """Embed shard i's files into its .npy, then write its record (.json), each atomically."""
    matrix, good, errors = embedder(paths, on_batch=bar.update)
    for err in errors:
        log.info("skipped %s", err["error"])
    write_atomically(_shard_file(out, i, ".npy"), lambda tmp: _save_npy(tmp, matrix))
    write_json_atomically(_shard_file(out, i, ".json"), {"paths": good, "errors": errors})


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
    for i in range(n):  # another rank's shard may have been damaged since it was written
        problem = _shard_problem(out, i, plan)
        if problem is not None:
            raise EmbedError(f"{problem}; run the same command again to embed that shard again")
    records = [json.loads(_shard_file(out, i, ".json").read_text(encoding="utf-8")) for i in range(n)]
    count = sum(len(r["paths"]) for r in records)
    errors = [e for r in records for e in r["errors"]]

    def write_vectors(tmp: str) -> None:
        merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, plan["dim"]))
        row = 0
        for i in range(n):
            part = np.load(_shard_file(out, i, ".npy"), mmap_mode="r", allow_pickle=False)
            merged[row:row + len(part)] = part
            row += len(part)
        merged.flush()
        del merged

    write_atomically(out.vectors, write_vectors)
    lines = "".join(p + "\n" for r in records for p in r["paths"])
    write_text_atomically(out.paths, lines, errors="surrogateescape")
    write_json_atomically(out.manifest, {"plan": _plan_key(plan), "count": count, "dim": plan["dim"],
                                         "vectors": out.vectors.name, "paths": out.paths.name, "errors": errors})
    _remove_parts(out)
    return count, errors


def _remove_parts(out: EmbedOutput) -> None:
    """Delete this tool's files in OUT.parts (shards, plan, temp files of killed runs), then the folder if empty."""
    for pattern in ("shard-*.npy", "shard-*.json", "plan.json", ".shard-*.tmp", ".plan.json.*.tmp"):
        for path in out.parts.glob(pattern):
            path.unlink(missing_ok=True)
    try:
        out.parts.rmdir()
    except OSError:
        pass  # something else is in there: not ours to delete


def _save_npy(tmp: str, matrix: np.ndarray) -> None:
    with open(tmp, "wb") as f:
        np.save(f, matrix)


def _progress(total: int, enabled: bool):
    from .progress import progress

    return progress(total, "embed", enabled=enabled)

