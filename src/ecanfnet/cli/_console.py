"""What the CLI writes besides results: exit codes, `ecanfnet: error: ...` lines, log records and warnings."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from typing import Iterator

from ..console import printable

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def error(message: str) -> None:
    """Print the one-line `ecanfnet: error: ...` for a failure (control characters escaped)."""
    print(f"ecanfnet: error: {printable(message)}", file=sys.stderr)


def os_error_text(exc: OSError) -> str:
    """'PATH: reason' for an OSError, without the [Errno N] prefix."""
    if exc.filename is None:
        return exc.strerror or str(exc)
    also = f" -> {exc.filename2}" if exc.filename2 is not None else ""
    return f"{exc.filename}{also}: {exc.strerror or exc}"


def warnings_as_lines() -> None:
    """Show warnings as `ecanfnet: warning: MESSAGE` lines, without PIL's decompression-bomb warning."""
    from PIL import Image

    # load_image enforces its own pixel limit with a per-file error; PIL's warning would only repeat it.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    warnings.formatwarning = lambda msg, category, *a, **k: f"ecanfnet: warning: {printable(msg)}\n"


class _ConsoleFormatter(logging.Formatter):
    """`ecanfnet: MESSAGE`, or `ecanfnet: warning: MESSAGE` from WARNING up; control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return printable(f"ecanfnet: {level}{record.getMessage()}")  # messages carry file names


class _StderrHandler(logging.StreamHandler):
    """Log lines on sys.stderr as it is at each record (tests and redirect_stderr replace it), above a live bar."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(_ConsoleFormatter())

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ sets it; the current sys.stderr is used instead
        pass

    def emit(self, record: logging.LogRecord) -> None:
        tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
        if tqdm is None:  # no progress bar can be on screen
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr)  # clears the bars, writes, redraws them
        except Exception:  # noqa: BLE001 - logging's own policy for a failing handler
            self.handleError(record)


@contextlib.contextmanager
def console_log() -> Iterator[None]:
    """While main() runs: the library's "ecanfnet" log records (INFO and up) as lines on stderr, by one handler."""
    logger = logging.getLogger("ecanfnet")
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):  # main() called from within main()
        yield
        return
    handler, level = _StderrHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
