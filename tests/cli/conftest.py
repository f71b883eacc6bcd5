"""The check that the CLI's output cannot drive a terminal (run_cli is in tests/conftest.py)."""

from __future__ import annotations

from typing import Callable

import pytest


@pytest.fixture
def raw_control() -> Callable[[str], bool]:
    """raw_control(c): whether c is a character that output must show escaped (C0/C1 controls, bidi, surrogates)."""
    def check(c: str) -> bool:
        return (ord(c) < 0x20 and c != "\n" or 0x7f <= ord(c) <= 0x9f or c in "\u202e\u2028"
                or 0xd800 <= ord(c) <= 0xdfff)
    return check
