"""Training on CUDA: fp16 with the gradient scaler, bf16, and NCCL across GPUs. Skipped without a GPU
(this project's CI machine has none; run `pytest tests/training/test_cuda.py` where one is lent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ecanfnet import create_model
from ecanfnet.training.loop import train
from ecanfnet.training.state import state_file, training_dir
from helpers import CLASSES, make_image_folder, tiny_config, torchrun_train

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"), pytest.mark.slow]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_cuda_learns_and_loads(tmp_path, folder, timm_hub_folder, precision):
    out = train(tiny_config(folder, tmp_path / "out", timm_hub_folder, epochs=4, from_scratch=True, lr=0.05,
                            precision=precision, deterministic=False))
    losses = [float(r.split(",")[1]) for r in (training_dir(out) / "metrics.csv").read_text().splitlines()[1:]]
    assert losses[-1] < losses[0], losses
    scaler = torch.load(state_file(out), weights_only=True)["scaler"]
    assert (scaler.get("scale", 0) >= 1.0) == (precision == "fp16"), scaler
    assert all(torch.isfinite(t).all() for t in load_file(out / "model.safetensors").values())
    assert create_model(pretrained=out).pretrained_cfg["label_names"] == list(CLASSES)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL across processes needs two GPUs")
def test_torchrun_nccl_on_two_gpus_stays_in_sync(tmp_path, folder):
    out = tmp_path / "out"
    proc = torchrun_train(folder, out, "--precision", "bf16")
    assert "epoch 2: 2 ranks in sync" in proc.stderr
    assert create_model(pretrained=out).pretrained_cfg["label_names"] == list(CLASSES)
