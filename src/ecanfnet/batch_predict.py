"""Classifying a collection into one JSON-lines file: sharded, resumable, shared among torchrun ranks.

``predict_to_file(paths, "preds.jsonl")`` writes two files side by side:
  - ``preds.jsonl``          one JSON object per line and per input, in input order: exactly what
                             ``ecanfnet predict --format json`` prints for it (ImageResult.to_dict()),
                             a file that could not be read as its {"path", "error"} row;
  - ``preds.manifest.json``  the manifest: model, weights fingerprint, every setting that decides the
                             rows, the row and failure counts and the size of preds.jsonl.
Work happens in shards of ``shard_size`` files under ``preds.parts/`` (see shards.py, shared with
embed): a stopped run resumes from its finished shards and ends with the same file an uninterrupted
run writes; a rerun with other settings is refused; a finished one has nothing to do. A preds.jsonl
that this tool did not write is never replaced. Under torchrun rank r classifies shards r, r + world,
...; rank 0 merges (OUT on a shared filesystem when the ranks are on several machines).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .backends import is_int8_model
from .console import json_line
from .distributed import DistContext, context_or_own
from .factory import create_model
from .fileio import write_atomically, write_json_atomically, write_text_atomically
from .inference import Classifier, check_min_score
from .model import ECANFNet
from .shards import (
    ShardedOutput, check_all_shards, is_error_list, manifest_shape_problem, model_settings, plan_key,
    preprocessing_of, remove_parts, run_shards)
from .transforms import MAX_IMAGE_PIXELS
from .weights import WeightsSource

MANIFEST_VERSION = 1
DEFAULT_SHARD_SIZE = 1024


@dataclass
class PredictOutput(ShardedOutput):
    """Where one `predict --output` run writes: OUT.jsonl and OUT.manifest.json; a shard is a .jsonl of rows."""

    rows: Path
    tool = "ecanfnet predict"
    suffix = ".jsonl"
    manifest_suffix = ".manifest.json"
    shard_suffixes = (".jsonl",)
    action = "classifying"

    def __post_init__(self) -> None:
        self.rows = Path(self.rows)
        self.check_suffix()

    @property
    def target(self) -> Path:
        return self.rows

    @property
    def example_name(self) -> str:
        return "predictions.jsonl"

    def guarded(self) -> tuple[Path, ...]:
        return (self.rows,)

    def manifest_problem(self, data: Any) -> str | None:
        fields = {"rows": int, "failed": int, "bytes": int, "output": str}
        plan_fields = {"task": str, "weights_fingerprint": str, "files_sha256": str, "top_k": int}
        problem = manifest_shape_problem(data, MANIFEST_VERSION, fields, plan_fields)
        if problem is not None:
            return problem
        if data["plan"]["task"] != "predict":
            return f"'plan.task' is {data['plan']['task']!r}, not 'predict'"
        if not 0 <= data["failed"] <= data["rows"] or data["bytes"] < 0:
            return f"'rows' {data['rows']} / 'failed' {data['failed']} / 'bytes' {data['bytes']} are not valid"
        return None

    def intact(self, manifest: dict[str, Any]) -> bool:
        return self.rows.stat().st_size == manifest["bytes"]

    def shard_problem(self, i: int, plan: dict[str, Any]) -> str | None:
        """Why shard i's .jsonl is not the rows of exactly shard i's files, in order (None when it is)."""
        rows = _read_rows(self.shard_file(i, ".jsonl"))
        if isinstance(rows, str):
            return rows
        if [row["path"] for row in rows] != plan["shards"][i]:
            return f"{self.shard_file(i, '.jsonl')}: holds the rows of other files than shard {i} of the plan"
        return None


def _read_rows(path: Path) -> list[dict[str, Any]] | str:
    """The JSON objects of a shard's lines, each with a "path"; or why the file is not that."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return f"{path}: unreadable ({exc})"
    if text and not text.endswith("\n"):
        return f"{path}: damaged or truncated (no newline at the end)"
    rows = []
    for number, line in enumerate(text.split("\n")[:-1], 1):
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as exc:
            return f"{path}: line {number} is not JSON ({exc})"
        if not (isinstance(row, dict) and isinstance(row.get("path"), str)):
            return f"{path}: line {number} is not a result row with a path"
        rows.append(row)
    return rows


@dataclass
class PredictSummary:
    """What a run did: rows written (one per input), how many carry an error, shards done now / found done."""

    output: Path
    rows: int = 0
    failed: int = 0
    shards_classified: int = 0
    shards_reused: int = 0
    rank: int = 0


@dataclass(frozen=True)
class _RowMaker:
    """How a run turns files into rows: the classifier and predict_files' options."""

    classifier: Classifier
    top_k: int = 5
    batch_size: int = 16
    workers: int | None = None
    max_pixels: int = MAX_IMAGE_PIXELS
    decode: str = "exact"
    min_score: float | None = None

    def __call__(self, paths: list[str], advance: Callable[[int], Any]) -> str:
        """The JSON lines of paths, in order, one per path."""
        lines = []
        for result in self.classifier.predict_files(paths, self.top_k, self.batch_size, self.workers,
                                                    self.max_pixels, self.decode, min_score=self.min_score):
            lines.append(json_line(result.to_dict()) + "\n")
            advance(1)
        return "".join(lines)


def predict_to_file(paths: list[str], output: str | Path, *, weights: WeightsSource | bool = True,
                    model: ECANFNet | None = None, top_k: int = 5, batch_size: int = 16,
                    shard_size: int = DEFAULT_SHARD_SIZE, workers: int | None = None,
                    max_pixels: int = MAX_IMAGE_PIXELS, decode: str = "exact", backend: str = "auto",
                    precision: str | None = None, tta: bool = False, min_score: float | None = None,
                    device: str | torch.device | None = None,
                    unmatched: Sequence[dict[str, str]] = (), context: DistContext | None = None,
                    progress: bool = True) -> PredictSummary:
    """Classify every file in paths into OUT.jsonl (+ OUT.manifest.json); resumable, multi-process aware.

    weights: any weights source (True: the published checkpoint; an INT8 folder too); ignored when model is given.
    tta: flip test-time augmentation. min_score: an image whose open-set score is below it gets the label
    "unknown" (see Classifier.predict_files). unmatched: {"path", "error"} rows for inputs that named no file (the
    CLI's arguments that matched nothing); they come first, as `predict --format json` prints them.
    device: where the model runs (default: the context's device; an INT8 model: the CPU).
    context: this process's place among several that share the work (distributed.distributed_context); rank r
    classifies shards r, r + world, ..., rank 0 merges. None: a lone process.
    Refuses (ShardError) to replace an OUT.jsonl or OUT.manifest.json this tool did not write, or to resume an
    unfinished run made with other settings.
    """
    out = PredictOutput(Path(output))
    out.check_writable()
    min_score = check_min_score(min_score)
    unmatched = [dict(u) for u in unmatched]
    if not is_error_list(unmatched):
        raise TypeError("unmatched must hold {'path': str, 'error': str} objects")
    with context_or_own(context, device) as ctx:
        net = model if model is not None else create_model(pretrained=weights, int8_ok=True)
        classifier = Classifier(net, None if device is None and is_int8_model(net) else ctx.device, backend,
                                precision, batch_size=batch_size, tta=tta)
        settings = {"top_k": top_k, "precision": classifier.runner.precision, "tta": tta, "min_score": min_score,
                    "decode": decode, "max_pixels": max_pixels, "unmatched": unmatched}
        plan = out.make_plan(paths, shard_size, _settings(net, classifier, weights if model is None else None,
                                                          settings))
        del net  # the classifier keeps the model where it runs it
        manifest = out.finished_manifest(plan, ctx.rank)
        if manifest is not None:
            return PredictSummary(out.rows, manifest["rows"], manifest["failed"], rank=ctx.rank)
        rows = _RowMaker(classifier, top_k, batch_size, workers, max_pixels, decode, min_score)
        done, reused, merged = run_shards(
            out, plan, ctx, lambda i, files, advance: write_text_atomically(out.shard_file(i, ".jsonl"),
                                                                            rows(files, advance)),
            lambda: _merge(out, plan), progress=progress, desc="predict")
    summary = PredictSummary(out.rows, shards_classified=done, shards_reused=reused, rank=ctx.rank)
    if merged is not None:
        summary.rows, summary.failed = merged
    return summary


def _settings(net: ECANFNet, classifier: Classifier, weights: Any, options: dict[str, Any]) -> dict[str, Any]:
    """Everything besides the file listing that decides the rows; a resumed run must have the same."""
    labels = hashlib.sha256("\n".join(classifier.labels).encode("utf-8", "surrogateescape")).hexdigest()
    return {"version": MANIFEST_VERSION, "task": "predict", **model_settings(net, weights), "labels_sha256": labels,
            "pretrained_cfg": preprocessing_of(net), **options}


def _merge(out: PredictOutput, plan: dict[str, Any]) -> tuple[int, int]:
    """The unmatched inputs' rows, then every shard's, into OUT.jsonl; then OUT.manifest.json; then drop OUT.parts."""
    check_all_shards(out, plan)
    failed = len(plan["unmatched"])
    for i in range(len(plan["shards"])):
        failed += sum("error" in row for row in _read_rows(out.shard_file(i, ".jsonl")))
    rows = len(plan["unmatched"]) + sum(len(shard) for shard in plan["shards"])

    def write_rows(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write("".join(json_line(row) + "\n" for row in plan["unmatched"]).encode("utf-8"))
            for i in range(len(plan["shards"])):
                f.write(out.shard_file(i, ".jsonl").read_bytes())

    write_atomically(out.rows, write_rows)
    write_json_atomically(out.manifest, {"plan": plan_key(plan), "rows": rows, "failed": failed,
                                         "output": out.rows.name, "bytes": out.rows.stat().st_size})
    remove_parts(out)
    return rows, failed
