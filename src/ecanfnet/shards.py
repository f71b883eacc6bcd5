"""Resumable work over a list of files: split in shards, shared among torchrun ranks, merged once by rank 0.

A run that writes OUT keeps its work in OUT.parts/ until the merge:
  - ``plan.json``: everything that decides the result (settings, a hash of the file listing, each shard's
    files); a rerun with another plan is refused instead of mixing two runs' results;
  - ``shard-00000<suffix>`` ...: each shard's result, every file written atomically, the last of a shard's
    suffixes last, so its presence marks a finished shard (checked, and redone when damaged).
A stopped run picks up where it left off. Rank r does shards r, r + world, ...; once every rank is done,
rank 0 merges them into OUT and its siblings and removes OUT.parts. Files beside OUT are only ever
replaced when they are this tool's own output (recognised by the manifest beside them).

The payload is the subclass's: embed.EmbedOutput (.npy vectors) and batch_predict.PredictOutput
(JSON lines) are the two kinds of run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

from .console import printable
from .distributed import DistContext, barrier, say
from .errors import ShardError
from .fileio import check_output_file, write_json_atomically
from .weights import weights_fingerprint

PREPROCESSING_KEYS = ("test_input_size", "input_size", "test_crop_pct", "crop_pct", "interpolation", "mean", "std")

T = TypeVar("T")


class ShardedOutput:
    """OUT, the files written beside it (its manifest first) and OUT.parts/; a subclass says what a shard holds."""

    tool: ClassVar[str] = ""                        # named in refusals: "ecanfnet embed"
    suffix: ClassVar[str] = ""                      # OUT's suffix: ".npy"
    manifest_suffix: ClassVar[str] = ".json"        # replaces suffix in the manifest's name
    shard_suffixes: ClassVar[tuple[str, ...]] = ()  # one shard's files, in the order they are written
    action: ClassVar[str] = ""                      # "embedding": "...; embedding shard 3 again"
    error: ClassVar[type[ShardError]] = ShardError

    @property
    def target(self) -> Path:
        """OUT itself."""
        raise NotImplementedError

    def check_suffix(self) -> None:
        """Refuse an OUT whose name does not end in the suffix its siblings are named from."""
        if self.target.suffix != self.suffix:
            raise self.error(f"{self.target}: the output must be a {self.suffix} file name "
                             f"(e.g. {self.example_name})")

    @property
    def example_name(self) -> str:
        return "output" + self.suffix

    def sibling(self, suffix: str) -> Path:
        """OUT with its suffix replaced by suffix (".json", ".parts", ...)."""
        return self.target.with_name(self.target.name[: -len(self.suffix)] + suffix)

    @property
    def manifest(self) -> Path:
        return self.sibling(self.manifest_suffix)

    @property
    def parts(self) -> Path:
        return self.sibling(".parts")

    def side_files(self) -> tuple[Path, ...]:
        """The files written beside OUT, its manifest first."""
        return (self.manifest,)

    def guarded(self) -> tuple[Path, ...]:
        """Files (OUT or beside it) replaced only when this tool's manifest is beside them or a merge was stopped."""
        return ()

    def manifest_problem(self, data: Any) -> str | None:
        """Why data is not a manifest this tool wrote (None when it is one)."""
        raise NotImplementedError

    def shard_problem(self, i: int, plan: dict[str, Any]) -> str | None:
        """Why shard i's files are not a complete result of its part of the plan (None when they are)."""
        raise NotImplementedError

    def intact(self, manifest: dict[str, Any]) -> bool:
        """Whether the outputs a valid manifest describes are whole (beyond existing)."""
        return True

    def shard_file(self, i: int, suffix: str) -> Path:
        return self.parts / f"shard-{i:05d}{suffix}"

    def make_plan(self, paths: list[str], shard_size: int, settings: dict[str, Any]) -> dict[str, Any]:
        """settings (all that decides the result) + the listing's hash + the shards; a resumed run must match."""
        if shard_size < 1:
            raise self.error(f"shard_size must be at least 1, got {shard_size}")
        listing = hashlib.sha256("\n".join(paths).encode("utf-8", "surrogateescape")).hexdigest()
        return {**settings, "files_sha256": listing, "shard_size": shard_size,
                "shards": [paths[i:i + shard_size] for i in range(0, len(paths), shard_size)]}

    def check_writable(self) -> None:
        """Refuse (self.error/OSError naming the file) an output that would replace what this tool did not write."""
        side = self.side_files()
        for path in (self.target, *side):
            if path.is_dir():
                names = " and ".join(p.name for p in side)
                raise self.error(f"{path}: is a folder; --output must name a {self.suffix} file, beside which "
                                 f"{names} {'is' if len(side) == 1 else 'are'} written")
        check_output_file(self.target)
        if self.manifest.exists():
            problem = self.manifest_problem(read_json_or_error(self.manifest))
            if problem is not None:
                raise self.error(f"{self.manifest}: exists and is not an `{self.tool}` manifest ({problem}); "
                                 f"not replacing it: move it away or choose another --output")
        elif not (self.parts / "plan.json").is_file():  # with it, a merge stopped before writing its manifest
            for path in self.guarded():
                if path.exists():
                    raise self.error(f"{path}: exists without the `{self.tool}` manifest {self.manifest.name} "
                                     f"beside it; not replacing it: move it away or choose another --output")
        if self.parts.exists() and not (self.parts.is_dir() and _is_our_parts_folder(self.parts)):
            raise self.error(f"{self.parts}: exists and is not an unfinished `{self.tool}` run (no plan.json); "
                             f"not writing into it: move it away or choose another --output")

    def finished_manifest(self, plan: dict[str, Any], rank: int = 0) -> dict[str, Any] | None:
        """The manifest of an earlier run with this same plan whose outputs are all there and whole, else None."""
        if not all(p.is_file() for p in (self.target, *self.side_files())):
            return None
        manifest = read_json_or_error(self.manifest)
        if self.manifest_problem(manifest) is not None or manifest.get("plan") != plan_key(plan):
            return None
        if not self.intact(manifest):
            return None
        say(f"{printable(self.target)} is complete for these files and settings; nothing to do", rank)
        return manifest


def read_json_or_error(path: Path) -> Any:
    """The JSON in path, or the Exception that stopped reading it (for the *_problem* checks to report)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        return exc


def is_error_list(value: Any) -> bool:
    """Whether value is a list of {"path": str, "error": str} objects (the unreadable files a run reports)."""
    return isinstance(value, list) and all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("error"), str) for e in value)


def manifest_shape_problem(data: Any, version: int, fields: dict[str, type],
                           plan_fields: dict[str, type]) -> str | None:
    """Why data (JSON, or the Exception reading it) is not a manifest object of this version with these fields
    (name: type; int excludes bool) and a 'plan' object with plan_fields; None when it is one."""
    if isinstance(data, Exception):
        return f"unreadable: {data}"
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, not an object"
    plan = data.get("plan")
    if not isinstance(plan, dict):
        return "no 'plan' object"
    if plan.get("version") != version:
        return f"'plan.version' is {plan.get('version')!r}, expected {version}"
    for where, obj, expected in (("", data, fields), ("plan.", plan, plan_fields)):
        for key, kind in expected.items():
            value = obj.get(key)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                return f"'{where}{key}' is missing or not {'an' if kind is int else 'a'} {kind.__name__}"
    return None


def _is_our_parts_folder(parts: Path) -> bool:
    return (parts / "plan.json").is_file() or not any(parts.iterdir())


def model_settings(net: Any, weights: Any) -> dict[str, Any]:
    """What identifies the model in a plan: architecture, where the weights came from, their fingerprint."""
    return {"architecture": net.name, "weights": _recorded_source(weights),
            "weights_fingerprint": weights_fingerprint(net)}


def preprocessing_of(net: Any) -> dict[str, Any]:
    """The checkpoint's preprocessing settings, as a plan records them."""
    return {k: net.pretrained_cfg.get(k) for k in PREPROCESSING_KEYS}


def _recorded_source(weights: Any) -> str | None:
    """How the weights are found again: "published", an absolute local path, or the hub source as given."""
    if weights is True:
        return "published"
    if isinstance(weights, (str, Path)):
        return str(Path(weights).resolve()) if Path(weights).exists() else str(weights)
    return None


def plan_key(plan: dict[str, Any]) -> dict[str, Any]:
    """The plan without its file lists: what a manifest records."""
    return {k: v for k, v in plan.items() if k != "shards"}


def run_shards(out: ShardedOutput, plan: dict[str, Any], ctx: DistContext,
               work: Callable[[int, list[str], Callable[[int], Any]], None], merge: Callable[[], T], *,
               progress: bool, desc: str) -> tuple[int, int, T | None]:
    """This rank's unfinished shards (r, r + world, ...), then, once every rank is done, rank 0's merge.

    work(i, files, advance) writes shard i (advance(n) after each n files); merge() is run by rank 0 alone.
    Returns (shards done now, shards found done, merge()'s result on rank 0, else None).
    """
    rank, world = ctx.rank, ctx.world
    if rank == 0:
        _start_or_check_parts(out, plan)
    barrier()
    if rank != 0:
        _start_or_check_parts(out, plan)
    mine = list(range(rank, len(plan["shards"]), world))
    todo = [i for i in mine if not shard_done(out, i, plan, rank)]
    if len(todo) < len(mine):
        say(f"resuming {printable(out.parts)}: {len(mine) - len(todo)} of {len(mine)} shards already done", rank)
    bar = _progress(sum(len(plan["shards"][i]) for i in todo), desc, progress and rank == 0)
    for i in todo:
        work(i, plan["shards"][i], bar.update)
    bar.close()
    barrier()
    merged = merge() if rank == 0 else None
    barrier()
    return len(todo), len(mine) - len(todo), merged


def _start_or_check_parts(out: ShardedOutput, plan: dict[str, Any]) -> None:
    """Create OUT.parts/plan.json, or check that the leftovers there belong to this same run."""
    plan_file = out.parts / "plan.json"
    if plan_file.is_file():
        earlier = read_json_or_error(plan_file)
        if not isinstance(earlier, dict):
            reason = earlier if isinstance(earlier, Exception) else "not a JSON object"
            raise out.error(f"{plan_file}: unreadable ({reason}); delete {out.parts} to start over")
        if plan_key(earlier) != plan_key(plan):
            now, then = plan_key(plan), plan_key(earlier)
            changed = sorted(k for k in {*now, *then} if now.get(k) != then.get(k))
            raise out.error(f"{out.parts} holds an unfinished run with other settings ({', '.join(changed)} differ); "
                            f"resume it with the same files and options, or delete {out.parts} to start over")
        return
    out.parts.mkdir(parents=True, exist_ok=True)
    write_json_atomically(plan_file, plan)


def shard_done(out: ShardedOutput, i: int, plan: dict[str, Any], rank: int) -> bool:
    """Whether shard i is finished and intact; a damaged one is deleted (noted by rank 0) so that it is done again."""
    if not out.shard_file(i, out.shard_suffixes[-1]).is_file():  # written last: without it, never finished
        return False
    problem = out.shard_problem(i, plan)
    if problem is None:
        return True
    say(f"{printable(problem)}; {out.action} shard {i} again", rank)
    for suffix in reversed(out.shard_suffixes):
        out.shard_file(i, suffix).unlink(missing_ok=True)
    return False


def check_all_shards(out: ShardedOutput, plan: dict[str, Any]) -> None:
    """Before a merge: every shard whole (another rank's may have been damaged since it was written)."""
    for i in range(len(plan["shards"])):
        problem = out.shard_problem(i, plan)
        if problem is not None:
            raise out.error(f"{problem}; run the same command again to redo that shard")


def remove_parts(out: ShardedOutput) -> None:
    """Delete this tool's files in OUT.parts (shards, plan, temp files of killed runs), then the folder if empty."""
    patterns = [f"shard-*{s}" for s in out.shard_suffixes] + ["plan.json", ".shard-*.tmp", ".plan.json.*.tmp"]
    for pattern in patterns:
        for path in out.parts.glob(pattern):
            path.unlink(missing_ok=True)
    try:
        out.parts.rmdir()
    except OSError:
        pass  # something else is in there: not ours to delete


def _progress(total: int, desc: str, enabled: bool):
    from .progress import progress

    return progress(total, desc, enabled=enabled)
