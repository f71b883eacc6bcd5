"""Shared fixtures: timm reference models with every tensor randomised, real photos, hub folders."""

from __future__ import annotations

import atexit
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


# ONNX exports and OpenVINO models cached by the backends go to a throw-away folder, not the user's
# cache, removed when the test session ends (each run would otherwise leave ~150 MB behind).
os.environ["ECANFNET_CACHE"] = tempfile.mkdtemp(prefix="ecanfnet-test-cache-")
atexit.register(shutil.rmtree, os.environ["ECANFNET_CACHE"], ignore_errors=True)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every tensor with random values, so no branch is silently zero (gains, biases, ECA kernels)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("gain"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)          # U(0.5, 1.5)
            elif name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=g))
    return model


def timm_model(name: str = "eca_nfnet_l0", seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm reference model (the test oracle) with randomised weights, in eval mode."""
    import timm

    return randomize_(timm.create_model(name, **kwargs), seed).eval()


@pytest.fixture(scope="session")
def timm_l0() -> torch.nn.Module:
    return timm_model("eca_nfnet_l0", seed=0)


def photo_arrays() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image and scikit-learn (H, W, 3) uint8."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
              "rocket": data.rocket()}
    china, flower = load_sample_images().images
    photos.update(china=china, flower=flower)
    return photos


def input_psnr(a: torch.Tensor, b: torch.Tensor, std: torch.Tensor) -> float:
    """PSNR in dB of two normalised network inputs on the 0..1 pixel scale (peak 1), the normalisation undone."""
    mse = (((a - b) * std) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def random_crop(arr: np.ndarray, rng: np.random.Generator, keep: float) -> np.ndarray:
    """A crop keeping `keep` of each side of an (H, W, C) photo, at a random offset."""
    h, w = arr.shape[:2]
    ch, cw = int(h * keep), int(w * keep)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return arr[y:y + ch, x:x + cw]


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """The real photos written to disk, alternately as JPEG and PNG."""
    folder = tmp_path_factory.mktemp("photos")
    for i, (name, arr) in enumerate(sorted(photo_arrays().items())):
        ext = "jpg" if i % 2 == 0 else "png"
        Image.fromarray(arr).save(folder / f"{name}.{ext}", quality=95) if ext == "jpg" else \
            Image.fromarray(arr).save(folder / f"{name}.{ext}")
    return folder


@pytest.fixture(scope="session")
def timm_hub_folder(tmp_path_factory, timm_l0) -> Path:
    """A hub-layout folder written by timm itself (save_for_hf) from the randomised timm model."""
    from timm.models import save_for_hf

    folder = tmp_path_factory.mktemp("timm_hub_folder")
    save_for_hf(timm_l0, str(folder), safe_serialization=True)
    return folder


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
