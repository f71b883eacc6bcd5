"""Expanding folders and glob patterns into image files without following directory symlinks.

A tree may hold `ln -s . loop` links: following them repeats every file (one link) or never ends
(several). Walks here descend only into real directories, as `find` does; a symlink to a file is
listed once, under the first path (in sorted order) that reaches it.
"""

from __future__ import annotations

import glob
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator

from .transforms import is_image_file


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
