"""Writing files so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence


def write_atomically(target: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call write(temp_path) for a temp file beside target, then rename it over target."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_csv_atomically(target: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
                         fieldnames: Sequence[str]) -> Path:
    """Write rows as CSV with a header line, atomically (see write_atomically)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(fieldnames))
            writer.writeheader()
            writer.writerows(rows)
    return write_atomically(target, write)


def write_json_atomically(target: str | os.PathLike, data: Any) -> Path:
    """Write data as indented UTF-8 JSON, atomically (undecodable path bytes kept via surrogateescape)."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    return write_atomically(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", errors="surrogateescape"))
