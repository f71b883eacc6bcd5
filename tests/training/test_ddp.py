"""Two-process DistributedDataParallel training on CPU (gloo), launched with torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ecanfnet import create_model
from test_train import make_image_folder

ROOT = Path(__file__).resolve().parents[2]


def torchrun_train(data: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m ecanfnet train` on a tiny folder for 2 epochs; stderr captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ecanfnet", "train", "--data", str(data), "--output", str(out), "--from-scratch",
           "--epochs", "2", "--batch-size", "3", "--image-size", "64", "--workers", "0", "--no-progress",
           "--val-split", "0.25", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_torchrun_two_processes_stay_in_sync_and_write_a_loadable_model(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    out = tmp_path / "out"
    # gloo on CPU even where GPUs exist (tests/training/test_cuda.py covers NCCL)
    proc = torchrun_train(data, out, env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert "epoch 1: 2 ranks in sync" in proc.stderr and "epoch 2: 2 ranks in sync" in proc.stderr
    assert proc.stderr.count("epoch 2/2: train loss") == 1  # rank 0 alone reports
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    assert create_model(pretrained=out).pretrained_cfg["label_names"] == ["astronaut", "coffee", "rocket"]
