"""Shared fixtures: timm reference models with every tensor randomised, real photos, hub folders, the in-process CLI."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from ecanfnet.cli import main
from ecanfnet.testing import photo_arrays, timm_model


# ONNX exports and OpenVINO models cached by the backends go to a throw-away folder, not the user's
# cache, removed when the test session ends (each run would otherwise leave ~150 MB behind).
os.environ["ECANFNET_CACHE"] = tempfile.mkdtemp(prefix="ecanfnet-test-cache-")
atexit.register(shutil.rmtree, os.environ["ECANFNET_CACHE"], ignore_errors=True)


@pytest.fixture(scope="session")
def timm_l0() -> torch.nn.Module:
    return timm_model("eca_nfnet_l0", seed=0)


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


@pytest.fixture
def run_cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """run_cli(*args) -> (exit code, stdout, stderr) of main(args)."""
    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err
    return run
