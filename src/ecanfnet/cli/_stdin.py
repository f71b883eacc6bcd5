"""A lone `-` among PATH arguments: the paths come from stdin, one per line (`find ... | ecanfnet predict -`)."""

from __future__ import annotations

import os
from typing import BinaryIO, TextIO

STDIN = "-"
MAX_PATH_BYTES = 4096  # Linux's PATH_MAX: a longer line is not a path (a binary file piped in, say)


def with_stdin_paths(args: list[str], stdin: TextIO | BinaryIO) -> list[str]:
    """args with "-" replaced by the paths read from stdin (read_path_lines); ValueError when "-" is given twice."""
    if STDIN not in args:
        return args
    if args.count(STDIN) > 1:
        raise ValueError("'-' (read the paths from stdin) is given more than once")
    i = args.index(STDIN)
    return args[:i] + read_path_lines(getattr(stdin, "buffer", stdin)) + args[i + 1:]


def read_path_lines(stream: BinaryIO, max_bytes: int = MAX_PATH_BYTES) -> list[str]:
    """The paths in stream, one per line ("\\n" or "\\r\\n"; blank lines skipped), decoded as command-line
    arguments are (undecodable bytes kept). ValueError naming the line for one over max_bytes or with a NUL
    byte, and when there is no path at all."""
    paths = []
    number = 0
    while True:
        line = stream.readline(max_bytes + 3)  # room for the line end, and one byte more to tell a long line
        if not line:
            break
        number += 1
        body = line[:-1] if line.endswith(b"\n") else line
        body = body[:-1] if body.endswith(b"\r") else body
        if len(body) > max_bytes:
            raise ValueError(f"stdin line {number}: longer than {max_bytes} bytes, so not a path; "
                             "expected one path per line")
        if b"\0" in body:
            raise ValueError(f"stdin line {number}: contains a NUL byte, so not a path; expected one path per line "
                             "(use find -print, not -print0)")
        if body.strip():
            paths.append(os.fsdecode(body))
    if not paths:
        raise ValueError("'-' given but stdin holds no paths (expected one per line)")
    return paths
