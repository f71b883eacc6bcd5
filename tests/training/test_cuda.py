"""Training on CUDA: fp16 with the gradient scaler, bf16, and NCCL across GPUs. Skipped without a GPU
(this project's CI machine has none; run `pytest tests/training/test_cuda.py` where one is lent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ecanfnet import create_model
from ecanfnet.training.loop import STATE_FILE, train
from test_train import CLASSES, make_image_folder, tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda_learns_and_loads(tmp_path, folder, timm_hub_folder, precision):
    out = train(tiny_config(folder, tmp_path / "out", timm_hub_folder, epochs=4, from_scratch=True, lr=0.05,
                            precision=precision, deterministic=False))
    losses = [float(r.split(",")[1]) for r in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert losses[-1] < losses[0], losses
    scaler = torch.load(out / STATE_FILE, weights_only=True)["scaler"]
    assert (scaler.get("scale", 0) >= 1.0) == (precision == "fp16"), scaler
    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())
    assert create_model(pretrained=out).pretrained_cfg["label_names"] == list(CLASSES)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across processes needs two GPUs")
def test_torchrun_nccl_on_two_gpus_stays_in_sync(tmp_path, folder):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ecanfnet", "train", "--data", str(folder), "--output", str(out), "--from-scratch",
           "--epochs", "2", "--batch-size", "3", "--image-size", "64", "--workers", "0", "--no-progress",
           "--val-split", "0.25", "--precision", "bf16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 2: 2 ranks in sync" in proc.stderr
    assert create_model(pretrained=out).pretrained_cfg["label_names"] == list(CLASSES)
