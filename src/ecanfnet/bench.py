"""Model-only throughput of each backend and precision (what `ecanfnet bench` reports)."""

from __future__ import annotations

import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from .backends import (BACKENDS, cpu_has_native_bf16, installed, is_int8_model, make_runner, onnxruntime_available,
                       openvino_available)
from .errors import BackendError, WeightsError
from .model import ECANFNet


def available_configs(device: torch.device, model: torch.nn.Module | None = None) -> list[tuple[str, str]]:
    """Every (backend, precision) pair that runs natively here (for an INT8 model: openvino int8 only)."""
    if model is not None and is_int8_model(model):
        return [("openvino", "int8")]
    configs = [("torch", "fp32"), ("compile", "fp32")]
    if device.type == "cpu" and onnxruntime_available():
        configs.append(("onnxruntime", "fp32"))
    if device.type == "cpu" and openvino_available():
        configs.append(("openvino", "fp32"))
    if device.type == "cuda" or cpu_has_native_bf16():
        configs += [("torch", "bf16"), ("compile", "bf16")]
    if device.type == "cpu" and openvino_available() and cpu_has_native_bf16():
        configs.append(("openvino", "bf16"))
    if device.type == "cpu" and openvino_available() and installed("nncf"):
        configs.append(("openvino", "int8"))
    if device.type == "cuda":
        configs += [("torch", "fp16"), ("compile", "fp16")]
    return configs


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(reset_worked: bool) -> float:
    if reset_worked:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / scale / 2**20


def benchmark(model: ECANFNet, backend: str, precision: str, *, batch_size: int = 1, image_size: int = 288,
              repeats: int = 10, warmup: int = 2, device: torch.device | None = None) -> dict[str, Any]:
    """Median time of `repeats` forward passes after `warmup` ones, and the peak memory while doing it."""
    device = device or torch.device("cpu")
    note = None
    if precision == "int8" and not is_int8_model(model):
        from .quantize import quantize_on_random_input

        model, note = quantize_on_random_input(model, image_size), "int8 calibrated on random input: speed only"
    reset = _reset_peak_rss()
    runner = make_runner(model, backend, precision, device, compile_batch=batch_size)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    for _ in range(warmup):
        runner(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    p50 = statistics.median(times)
    row = {"backend": runner.backend, "precision": runner.precision, "batch_size": batch_size,
           "image_size": image_size, "images_per_s": batch_size / p50, "ms_per_batch_p50": 1000 * p50,
           "peak_rss_mb": round(_peak_rss_mb(reset), 1)}
    return row | ({"note": note} if note else {})


def run_all(model: ECANFNet, configs: list[tuple[str, str]], **kwargs: Any) -> Iterator[dict[str, Any]]:
    """benchmark() for each (backend, precision); a config that cannot run yields {'error': ...} instead."""
    for backend, precision in configs:
        if backend not in BACKENDS:
            yield {"backend": backend, "precision": precision, "error": f"unknown backend {backend!r}"}
            continue
        try:
            yield benchmark(model, backend, precision, **kwargs)
        except (BackendError, ImportError, RuntimeError, WeightsError) as exc:
            yield {"backend": backend, "precision": precision, "error": str(exc).splitlines()[0]}
