"""Progress reporting on stderr: a live tqdm bar on a terminal, a few plain lines in a log.

A redrawn bar is one line per redraw once stderr is a file or a pipe (hundreds of lines for a
few hundred images), so off a terminal `progress` prints one line per tenth of the work instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from .console import printable

PLAIN_STEPS = 10  # off a terminal: a line at every 10 % (and one at the end)


def progress(total: int, desc: str, *, enabled: bool = True, unit: str = "img", leave: bool = True):
    """A progress reporter for `total` units: tqdm on a terminal, else plain lines (see PlainProgress).

    Both offer update(n), write(s, file=None), set_postfix(**kw), close() and use as a context manager;
    write() prints above a live bar, and to stdout when file is None (as tqdm.write does).
    """
    if enabled and _isatty(sys.stderr):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=leave)
    return PlainProgress(total, desc, unit=unit, enabled=enabled)


def _isatty(stream: TextIO | None) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class PlainProgress:
    """Plain progress lines on stderr, one each time another tenth of `total` is done, and one at the end."""

    def __init__(self, total: int, desc: str, *, unit: str = "img", enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.enabled = max(int(total), 0), desc, unit, enabled
        self.n = 0
        self._printed_step = 0
        self._printed_n = 0
        self._postfix = ""
        self._start = time.monotonic()
        self._closed = False

    def update(self, n: int = 1) -> None:
        """Count n more units done; print a line when that crosses the next tenth."""
        self.n += n
        if not self.enabled or not self.total:
            return
        step = min(PLAIN_STEPS, self.n * PLAIN_STEPS // self.total)
        if step > self._printed_step:
            self._printed_step = step
            self._line()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values shown at the end of the following lines (e.g. loss=0.31)."""
        values = {**(ordered_dict or {}), **kwargs}
        self._postfix = ", ".join(f"{k}={_short(v)}" for k, v in values.items())

    @staticmethod
    def write(s: str, file: TextIO | None = None, end: str = "\n", nolock: bool = False) -> None:
        """Print s (to stdout unless file is given), as tqdm.write does."""
        stream = file if file is not None else sys.stdout
        stream.write(s + end)
        stream.flush()

    def close(self) -> None:
        """Print the final line, unless the last line printed already said it all."""
        if self._closed:
            return
        self._closed = True
        if self.enabled and self.n != self._printed_n:
            self._line()

    def _line(self) -> None:
        self._printed_n = self.n
        elapsed = time.monotonic() - self._start
        done = f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed >= 0.1 else ""
        postfix = f", {self._postfix}" if self._postfix else ""
        line = f"{self.desc + ': ' if self.desc else ''}{done}{pct} in {elapsed:.0f}s{rate}{postfix}"
        sys.stderr.write(printable(line) + "\n")  # desc and postfix may hold file or class names
        sys.stderr.flush()

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
