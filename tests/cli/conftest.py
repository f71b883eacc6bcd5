"""Running `ecanfnet` in-process for the CLI tests, and the check that its output cannot drive a terminal."""

from __future__ import annotations

from typing import Callable

import pytest

from ecanfnet.cli import main


@pytest.fixture
def run_cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """run_cli(*args) -> (exit code, stdout, stderr) of main(args)."""
    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def raw_control() -> Callable[[str], bool]:
    """raw_control(c): whether c is a character that output must show escaped (C0/C1 controls, bidi, surrogates)."""
    def check(c: str) -> bool:
        return (ord(c) < 0x20 and c != "\n" or 0x7f <= ord(c) <= 0x9f or c in "\u202e\u2028"
                or 0xd800 <= ord(c) <= 0xdfff)
    return check
