"""Text for a terminal: names from checkpoints and file trees are data, never terminal commands."""

from __future__ import annotations

import json
import re
from typing import Any

# C0 controls (newline and tab included: they break a table line), DEL, C1 controls (0x9b is an
# 8-bit CSI on some terminals), the line/paragraph separators, bidirectional overrides and
# isolates (which reorder what is shown), and lone surrogates (undecodable bytes of a file name).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: Any) -> str:
    """str(text) with control and reordering characters shown as \\x1b / \\u202e escapes, safe to print."""
    return _UNSAFE.sub(_escape, str(text))


def json_line(data: Any) -> str:
    """json.dumps(data) as one line, non-ASCII kept readable but DEL, C1, bidi controls and surrogates \\u-escaped."""
    # json.dumps escapes C0 already; the rest it leaves raw with ensure_ascii=False. \\uXXXX is
    # valid JSON for each of them and decodes back to the same string (lone surrogates included).
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(data, ensure_ascii=False))
