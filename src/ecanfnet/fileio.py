"""Writing files so that a crash never leaves a half-written one behind.

Permissions: a written file gets what a plain ``open(path, "w")`` would give it: a new file
0o666 less the process umask (0644 under the usual 022), a replaced file keeps its mode. The
temp file mkstemp makes is always 0600, so the mode is set explicitly before the rename.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence


def _umask_from_proc() -> int | None:
    """The umask now, from /proc/self/status (Linux 4.7+), or None where that is not available."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return None


def _umask_by_setting_it() -> int:
    # os.umask can only read the mask by replacing it, which races threads creating files at that
    # moment: done once, at import, and only where /proc cannot tell.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_by_setting_it() if _umask_from_proc() is None else None


def _umask_of_process() -> int:
    """The current umask (from /proc), else the one at import."""
    mask = _umask_from_proc()
    if mask is None:
        mask = _UMASK_AT_IMPORT if _UMASK_AT_IMPORT is not None else _umask_by_setting_it()
    return mask


def new_file_mode(target: Path) -> int:
    """Mode for a file written at target: the existing file's, else 0o666 less the umask (as open(..., "w"))."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode) & 0o777  # never carry set-id bits to a new file
    except OSError:
        return 0o666 & ~_umask_of_process()


def new_dir_mode() -> int:
    """Mode for a new folder: 0o777 less the umask (as os.mkdir; tempfile.mkdtemp would give 0o700)."""
    return 0o777 & ~_umask_of_process()


def write_atomically(target: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call write(temp_path) for a temp file beside target, then rename it over target (mode: see new_file_mode).

    An OSError about the temp file (cannot be created, disk full) is raised naming target instead.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(target)) from exc
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode(target))  # after write(): some writers replace the file rather than reuse it
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.filename in (tmp, os.fsencode(tmp)):
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def check_output_file(target: str | os.PathLike) -> Path:
    """Fail early (OSError naming target) when a file cannot be written at target: a folder there, a file
    where a parent folder should be, or a parent folder that refuses new files."""
    target = Path(target)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder; give a file name", str(target))
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{parent} is not a folder", str(target))
    _probe_new_file(parent, target)
    return target


def check_output_dir(target: str | os.PathLike) -> Path:
    """Fail early (OSError naming target) when files cannot be written into a folder at target: a file there
    or where a parent folder should be, or a nearest existing folder that refuses new files."""
    target = Path(target)
    existing = _nearest_existing(target)
    if not existing.is_dir():
        where = "" if existing == target else f"{existing}, a parent of it, "
        raise NotADirectoryError(errno.ENOTDIR, f"{where}is an existing file, not a folder", str(target))
    _probe_new_file(existing, target)
    return target


def _nearest_existing(path: Path) -> Path:
    """path itself if it exists, else its nearest existing parent (what creating path would write into)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_new_file(folder: Path, target: Path) -> None:
    """Create and remove a file in folder; OSError naming target when that fails."""
    try:  # a real probe: permission bits say nothing to root, and /proc or a read-only mount refuse anyway
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ecanfnet-probe-")
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create files in {folder} ({exc.strerror})", str(target)) from None
    os.close(fd)
    os.unlink(probe)


def write_csv_atomically(target: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
                         fieldnames: Sequence[str]) -> Path:
    """Write rows as CSV with a header line, atomically (see write_atomically)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fieldnames))
            writer.writeheader()
            writer.writerows(rows)
    return write_atomically(target, write)


def write_text_atomically(target: str | os.PathLike, text: str, *, errors: str = "strict") -> Path:
    """Write text as UTF-8, atomically; errors="surrogateescape" keeps undecodable path bytes as they were."""
    return write_atomically(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors=errors))


def write_json_atomically(target: str | os.PathLike, data: Any) -> Path:
    """Write data as indented UTF-8 JSON, atomically (undecodable path bytes kept via surrogateescape)."""
    return write_text_atomically(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n", errors="surrogateescape")


def move_folder_into_place(staging: Path, folder: Path, *, replaceable: Callable[[Path], str | None] = lambda _: None) -> None:
    """Rename the complete staging folder to folder; an earlier folder there is set aside first, removed after.

    replaceable(folder) gives the reason an existing folder must not be replaced (None: it may be), checked
    at the last moment, so a folder that appeared meanwhile is not lost either.
    """
    import shutil

    if not os.path.lexists(folder):
        os.rename(staging, folder)
        return
    reason = replaceable(folder)
    if reason is not None:
        raise FileExistsError(errno.EEXIST, reason, str(folder))
    old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
    os.rename(folder, old / "previous")
    try:
        os.rename(staging, folder)
    except OSError:
        os.rename(old / "previous", folder)  # put the earlier one back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
