"""Helpers shared by the tests and the benchmarks (they need the test extra: timm, scikit-image, scikit-learn, httpx).

- the oracle: timm's model with every tensor randomised (a fresh timm model has zero-initialised residual
  gains, which would hide every bug in the residual branches);
- real photos shipped with scikit-image and scikit-learn, crops of them, and the PSNR of two network inputs;
- ServeProcess: `ecanfnet serve` running as its own process on a free loopback port.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SRC = Path(__file__).resolve().parents[1]  # the folder holding the ecanfnet package, for child processes


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """A running server: its process, base URL and an HTTP client."""

    def __init__(self, weights: Path, *extra: str, env: dict | None = None) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ecanfnet", "serve", "--weights", str(weights), "--port", str(self.port),
               "--log-level", "warning", *extra]
        full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
        self.log = tempfile.TemporaryFile("w+")  # the server's output, for error messages
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:  # not listening yet
                time.sleep(0.2)
        raise RuntimeError(f"server did not come up:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def gauge(self, name: str) -> float:
        """The current value of a Prometheus gauge from /metrics."""
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(f"no gauge {name} in /metrics")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
