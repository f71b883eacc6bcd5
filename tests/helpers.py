"""Helpers of the tests (not fixtures: those are in conftest.py; hostile inputs are in hostile.py)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from ecanfnet.testing import photo_arrays, random_crop
from ecanfnet.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def lay_out_hub_cache(hf_home: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Build the huggingface_hub cache structure for repo_id under hf_home, as a download would leave it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name, src in files.items():
        (snapshot / name).write_bytes(src.read_bytes())
    return snapshot


def one_error_line(err: str) -> str:
    """The stderr of a refused command: exactly one `ecanfnet: error:` line and no traceback; that line."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and err == lines[0] + "\n" and lines[0].startswith("ecanfnet: error: "), err
    return lines[0]


def read_json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def card_timm_transform():
    from timm.data.transforms_factory import transforms_imagenet_eval

    return transforms_imagenet_eval(img_size=288, interpolation="bicubic", crop_pct=1.0,
                                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG signature + IHDR claiming the given size (valid CRC) + IEND, with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


CLASSES = ("astronaut", "coffee", "rocket")


def make_image_folder(root: Path, per_class: int = 6, size: int = 80) -> Path:
    """Crops of three real photos, one class each."""
    photos = photo_arrays()
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            crop = Image.fromarray(random_crop(photos[name], rng, 2 / 3)).resize((size, size))
            crop.save(root / name / f"{i}.jpg", quality=90)
    return root


def tiny_config(data: Path, out: Path, weights: Path, **overrides) -> TrainConfig:
    settings = dict(data=str(data), output=str(out), weights=str(weights), epochs=3, batch_size=6,
                    image_size=64, lr=0.02, val_split=0.2, warmup_epochs=0.5, progress=False,
                    deterministic=True, seed=1)
    settings.update(overrides)
    return TrainConfig(**settings)


def untimed_metrics(out: Path) -> list[dict[str, str]]:
    """OUT.training/metrics.csv's rows without the timing columns, which differ between otherwise equal runs."""
    import csv

    from ecanfnet.training.state import training_dir
    from ecanfnet.training.telemetry import TIMING_COLUMNS

    with (training_dir(out) / "metrics.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


# gloo on CPU even where GPUs exist (tests/training/test_cuda.py covers NCCL)
CPU_ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def torchrun_command(data: Path, out: Path, *extra: str, max_restarts: int = 0) -> list[str]:
    """`torchrun --nproc-per-node 2 -m ecanfnet train` on a tiny folder for 2 epochs (extra options override)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(max_restarts), "-m", "ecanfnet", "train", "--data", str(data), "--output", str(out),
            "--from-scratch", "--epochs", "2", "--batch-size", "3", "--image-size", "48", "--workers", "0",
            "--no-progress", "--val-split", "0.25", *extra]


def torchrun_env(env: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}


def torchrun_train(data: Path, out: Path, *extra: str,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run torchrun_command to the end; stderr captured."""
    proc = subprocess.run(torchrun_command(data, out, *extra), env=torchrun_env(env), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# A label that would run script if a page inserted it as HTML.
HTML_LABEL = '<img src=x onerror="document.title=1">'


# The `hardened` server's --max-connections: above the 46 connections of the slow-client test.
HARDENED_MAX_CONNECTIONS = 64


def jpeg_bytes(array, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
