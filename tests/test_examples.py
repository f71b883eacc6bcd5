"""The examples run end to end (tiny settings: they are measured in full in docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # processes, servers or training runs: `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, reports", [("segment_shapes.py", "held-out mIoU"),
                                             ("detect_shapes.py", "held-out recall@0.5")])
def test_example_runs(script, reports):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--epochs", "1", "--train", "8",
                           "--val", "4", "--size", "64", "--batch-size", "4"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1: train loss" in proc.stdout and reports in proc.stdout
