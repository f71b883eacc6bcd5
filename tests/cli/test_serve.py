"""`ecanfnet serve` refuses to start, in one line, without the serve extra (the server itself: tests/serving)."""

from __future__ import annotations

import sys

import pytest


@pytest.mark.parametrize("missing", ["uvicorn", "fastapi"])
def test_without_the_serve_extra_it_says_what_to_install(run_cli, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ModuleNotFoundError naming it
    for loaded in ("ecanfnet.serving.app", "ecanfnet.serving.protocol"):
        monkeypatch.delitem(sys.modules, loaded, raising=False)
    assert run_cli("serve", "--weights", "/nonexistent") == (
        1, "", f"ecanfnet: error: serving needs {missing}: pip install 'ecanfnet[serve]'\n")
