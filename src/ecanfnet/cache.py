"""The conversion cache: ONNX exports and OpenVINO IR kept per weights, bounded in size, safe across processes.

An entry is the files of one stem in cache_dir()/onnx or cache_dir()/openvino: a ``.onnx``, or an IR's
``.xml`` + ``.bin`` sealed by a ``.sha256``, and the ``.lock`` that processes take (flock) while they
write or read it. Files are written to temp names (starting with ".") and renamed into place, so no
reader sees a half-written one. After each write the least recently used entries (by modification time,
refreshed on every use) are evicted until the cache holds at most max_bytes(); an entry locked by
another process is skipped, and files that vanish meanwhile are ignored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import BackendError

DEFAULT_MAX_BYTES = 2 * 2**30
MAX_BYTES_VARIABLE = "ECANFNET_CACHE_MAX_BYTES"
SUBFOLDERS = ("onnx", "openvino")
# A temp file or folder of a writer older than this is left over from a crash and removed by evict().
STALE_SECONDS = 3600
_SUFFIXES = (".onnx", ".xml", ".bin", ".sha256", ".lock")
_REMOVAL_ORDER = (".sha256", ".xml", ".onnx", ".bin")  # the seal first: a half-removed IR reads as unsealed

logger = logging.getLogger("ecanfnet")


def cache_dir() -> Path:
    """Where ONNX exports and OpenVINO models are kept ($ECANFNET_CACHE, else $XDG_CACHE_HOME/ecanfnet)."""
    root = os.environ.get("ECANFNET_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ecanfnet"
    return Path(root)


def max_bytes() -> int:
    """The cache's size bound: $ECANFNET_CACHE_MAX_BYTES (bytes; 0 keeps only the entry in use), else 2 GiB."""
    text = os.environ.get(MAX_BYTES_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    if not (text.isascii() and text.isdigit()):
        raise BackendError(f"{MAX_BYTES_VARIABLE} must be a whole number of bytes (e.g. 2147483648), got {text!r}")
    return int(text)


@contextlib.contextmanager
def entry_lock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold the entry of path (any of its files) exclusively across processes; yields whether it is held.

    Yields False where the cache cannot be written (the caller goes on unlocked) and, without wait,
    where another process holds it. A lock file evicted while this process waited for it is locked anew.
    """
    import fcntl

    lock = path.with_suffix(".lock")
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a")
        except OSError:
            yield False
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            if _same_file(handle.fileno(), lock):
                yield True
                return


def _same_file(fd: int, path: Path) -> bool:
    """Whether path still names the open file fd (not removed or replaced since it was opened)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def touch(path: Path) -> None:
    """Mark an entry used now (its modification time), so eviction takes it last."""
    with contextlib.suppress(OSError):
        os.utime(path)


@dataclass
class Entry:
    """One cache entry: its folder, stem and files, their total size and when it was last used."""

    folder: Path
    stem: str
    files: list[Path]
    size: int
    used: float


def entries(root: Path | None = None) -> list[Entry]:
    """The cache's entries, least recently used first (files that vanish while listed are left out)."""
    root = cache_dir() if root is None else root
    found: dict[tuple[Path, str], list[tuple[Path, os.stat_result]]] = {}
    for folder in (root / sub for sub in SUBFOLDERS):
        for path in _listing(folder):
            stem, suffix = os.path.splitext(path.name)
            if path.name.startswith(".") or suffix not in _SUFFIXES:
                continue
            with contextlib.suppress(OSError):
                found.setdefault((folder, stem), []).append((path, path.stat()))
    out = []
    for (folder, stem), files in found.items():
        data = [st for p, st in files if p.suffix != ".lock"]
        used = max((st.st_mtime for st in data), default=min(st.st_mtime for _, st in files))
        out.append(Entry(folder, stem, [p for p, _ in files], sum(st.st_size for st in data), used))
    return sorted(out, key=lambda e: e.used)


def _listing(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def evict(*, keep: Iterable[Path] = (), limit: int | None = None, root: Path | None = None) -> list[Entry]:
    """Remove least recently used entries until the cache holds at most limit bytes (default max_bytes()).

    keep: files whose entries stay whatever their size (the one just written or read). Entries another
    process holds are skipped. Leftover temp files of crashed writers go too. Returns the entries removed.
    """
    limit = max_bytes() if limit is None else limit
    root = cache_dir() if root is None else root
    kept = {(p.parent, os.path.splitext(p.name)[0]) for p in map(Path, keep)}
    _remove_stale_temps(root)
    listed = entries(root)
    total, removed = sum(e.size for e in listed), []
    for entry in listed:
        if total <= limit:
            break
        if entry.size and (entry.folder, entry.stem) not in kept and _remove(entry):
            total -= entry.size
            removed.append(entry)
    if removed:
        logger.info("conversion cache %s over %d bytes: removed %d least recently used entr%s", root, limit,
                    len(removed), "y" if len(removed) == 1 else "ies")
    return removed


def _remove(entry: Entry) -> bool:
    """Delete an entry's files under its lock (the seal first, the lock file last); False when it is in use."""
    with entry_lock(entry.folder / (entry.stem + ".lock"), wait=False) as held:
        if not held:
            return False
        for suffix in (*_REMOVAL_ORDER, ".lock"):
            with contextlib.suppress(OSError):
                (entry.folder / (entry.stem + suffix)).unlink()
    return True


def _remove_stale_temps(root: Path) -> None:
    """Remove temp files and folders (names starting with ".") older than STALE_SECONDS: a crashed writer's."""
    cutoff = time.time() - STALE_SECONDS
    for folder in (root / sub for sub in SUBFOLDERS):
        for path in _listing(folder):
            try:
                if not path.name.startswith(".") or path.lstat().st_mtime > cutoff:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()
            except OSError:
                continue
