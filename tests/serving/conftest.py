"""A real `ecanfnet serve` process on a loopback port, for the API, fuzz and browser tests."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running server: its process, base URL and an HTTP client."""

    def __init__(self, weights: Path, *extra: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "ecanfnet", "serve", "--weights", str(weights), "--port", str(self.port),
               "--log-level", "warning", *extra]
        full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})}
        self.log = open(Path(os.environ.get("ECANFNET_CACHE", "/tmp")) / f"serve-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
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


@pytest.fixture(scope="package")
def server(timm_hub_folder):
    """The default configuration (backend auto: OpenVINO on this CPU where installed), batches of up to 8."""
    srv = Server(timm_hub_folder, "--max-batch", "8", "--max-wait-ms", "20")
    yield srv
    srv.stop()


# A label that would run script if a page inserted it as HTML.
HTML_LABEL = '<img src=x onerror="document.title=1">'


@pytest.fixture(scope="package")
def three_class_folder(tmp_path_factory) -> Path:
    """A randomly initialised 3-class checkpoint at 64 px, one of whose labels is HTML."""
    from hostile import small_model_folder

    return small_model_folder(tmp_path_factory.mktemp("three_class"), 3, [HTML_LABEL, "dog", "fish"], size=64)


# The `hardened` server's --max-connections: above the 46 connections of the slow-client test.
HARDENED_MAX_CONNECTIONS = 64


@pytest.fixture(scope="package")
def hardened(three_class_folder):
    """A 3-class server with short timeouts, one decode thread and HARDENED_MAX_CONNECTIONS, for the flood,
    slow-client and connection-limit tests."""
    srv = Server(three_class_folder, "--backend", "torch", "--max-batch", "2", "--max-queue", "30",
                 "--max-wait-ms", "5", "--timeout-s", "3", "--body-timeout-s", "2", "--header-timeout-s", "2",
                 "--decode-workers", "1", "--max-connections", str(HARDENED_MAX_CONNECTIONS))
    yield srv
    srv.stop()


def jpeg_bytes(array, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", quality=quality)
    return buf.getvalue()
