"""Image files in, decoded batches out: path expansion, then threaded decoding and preprocessing in order.

Used by predict, embed, quantize and search. Expanding folders and glob patterns never follows directory symlinks.

A tree may hold `ln -s . loop` links: following them repeats every file (one link) or never ends
(several). Walks here descend only into real directories, as `find` does; a symlink to a file is
listed once, under the first path (in sorted order) that reaches it.
"""

from __future__ import annotations

import glob
import os
import stat
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image

from .errors import ImageLoadError
from .transforms import MAX_IMAGE_PIXELS, image_loader, is_image_file


def walk_image_files(root: str | os.PathLike) -> list[str]:
    """Image files (by extension) below root, sorted, each real file once; directory symlinks are not entered."""
    found, stack = [], [os.fspath(root)]
    while stack:
        subdirs, files = _scan(stack.pop(), hidden=True)
        found += [f for f in files if is_image_file(Path(f))]
        stack += subdirs
    return unique_files(sorted(found), set(), regular_only=True)


def expand_pattern(pattern: str) -> list[str]:
    """glob.glob(pattern, recursive=True), sorted, except that `**` does not descend into directory symlinks."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        return sorted(glob.glob(pattern))  # without **, each component matches one level: no loops
    i = parts.index("**")
    prefix, rest = os.sep.join(parts[:i]) or (os.sep if i else ""), os.sep.join(parts[i + 1:])
    bases = sorted(glob.glob(prefix)) if glob.has_magic(prefix) else [prefix]
    hits: dict[str, None] = {}
    for base in bases:
        if base and not os.path.isdir(base):
            continue
        if not rest and base:
            hits[os.path.join(base, "")] = None  # glob lists the folder itself for a trailing **
        for folder in _walk_dirs(base):
            if rest:
                hits.update(dict.fromkeys(expand_pattern(os.path.join(glob.escape(folder), rest))))
            else:
                subdirs, files = _scan(folder, hidden=False)
                hits.update(dict.fromkeys(subdirs + files))
    return sorted(hits)


def _walk_dirs(top: str) -> Iterator[str]:
    """top and every real directory below it not starting with a dot (as glob's `**`); "" is the current folder."""
    stack = [top]
    while stack:
        folder = stack.pop()
        yield folder
        stack += _scan(folder, hidden=False)[0]


def _scan(folder: str, hidden: bool) -> tuple[list[str], list[str]]:
    """(real subdirectories, other entries) of folder, sorted; a symlink to a directory is in neither list."""
    subdirs, others = [], []
    try:
        with os.scandir(folder or os.curdir) as it:
            entries = [e for e in it if hidden or not e.name.startswith(".")]
    except OSError:
        return [], []  # an unreadable folder holds nothing we can use
    for entry in sorted(entries, key=lambda e: e.name):
        path = os.path.join(folder, entry.name)
        if entry.is_dir(follow_symlinks=False):
            subdirs.append(path)
        elif not entry.is_dir():  # follows the link: skips symlinks to directories
            others.append(path)
    return subdirs, others


def unique_files(paths: Iterable[str], seen: set[tuple[int, int]], regular_only: bool = False) -> list[str]:
    """paths in order, less those reaching a file already listed or in seen (by device and inode); updates seen.

    A symlink or hard link to a listed file is dropped. Paths that cannot be stat'ed and non-regular files are
    kept (each gets its own error later) unless regular_only, which drops them (dangling links, FIFOs, devices).
    """
    kept = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            if not regular_only:
                kept.append(path)
            continue
        if regular_only and not stat.S_ISREG(info.st_mode):
            continue
        if (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            kept.append(path)
    return kept


@dataclass(frozen=True)
class InputProblem:
    """A command-line input that named no image: the argument and why."""

    path: str
    error: str


def find_images(args: Iterable[str]) -> tuple[list[str], list[InputProblem]]:
    """Expand files, folders (recursively, image extensions only) and globs into image paths.

    Directory symlinks inside folders and under `**` are not followed (see files.py), and a file
    reached twice (the same path, a symlink or hard link to it) is listed once. Returns the paths in a
    stable order and an error result for each argument that matched nothing.
    """
    found: dict[str, None] = {}
    seen: set[tuple[int, int]] = set()
    problems: list[InputProblem] = []
    for arg in args:
        path = Path(arg)
        if path.is_dir():
            matches = walk_image_files(path)
            if not matches:
                problems.append(InputProblem(arg, f"{arg}: no image files in this folder"))
        elif path.exists():
            matches = [arg]  # named explicitly: kept whatever it is, so an odd file gets its own error
        elif glob.has_magic(arg):
            matches = [m for hit in expand_pattern(arg)
                       for m in (walk_image_files(hit) if os.path.isdir(hit) else [hit])]
            if not matches:
                problems.append(InputProblem(arg, f"{arg}: no file matches this pattern"))
        else:
            problems.append(InputProblem(arg, f"{arg}: no such file or folder"))
            matches = []
        found.update(dict.fromkeys(unique_files(matches, seen)))
    return list(found), problems


def _prefetch(items: list[str], fn: Callable[[str], Any], workers: int, window: int) -> Iterator[tuple[str, Future]]:
    """Run fn over items in a thread pool, at most `window` ahead of the consumer, yielding in order."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ecanfnet-decode") as pool:
        pending: deque[tuple[str, Future]] = deque()
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= window:
                break
        while pending:
            item, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt)))
            yield item, fut


DecodedItem = tuple[str, "torch.Tensor | None", "str | None"]  # (path, preprocessed image or None, error or None)


def decoded_batches(paths: list[str], transform: Callable[[Image.Image], torch.Tensor], batch_size: int,
                    workers: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS,
                    decode: str = "exact") -> Iterator[list[DecodedItem]]:
    """Load and preprocess files ahead in worker threads; yield them in order, batch_size readable ones at a time.

    decode="fast" decodes JPEGs at a reduced DCT scale, never below the transform's min_decode_size
    (see load_image). An unreadable file stays in its batch with its error instead of a tensor, so no
    path is lost.
    """
    workers = workers or min(8, os.cpu_count() or 1)
    load = image_loader(transform, max_pixels, decode)
    run = lambda p: transform(load(p))  # noqa: E731
    waiting: list[DecodedItem] = []
    ready = 0  # decoded images in `waiting`
    for path, fut in _prefetch(paths, run, workers, window=max(2 * batch_size, 2 * workers)):
        try:
            waiting.append((path, fut.result(), None))
            ready += 1
        except ImageLoadError as exc:
            waiting.append((path, None, str(exc)))
        except Exception as exc:  # noqa: BLE001 - one odd file must not stop the batch
            waiting.append((path, None, f"{path}: {type(exc).__name__}: {exc}"))
        if ready >= batch_size:
            yield waiting
            waiting, ready = [], 0
    if waiting:
        yield waiting
