"""Inference throughput: timm eager, timm in ONNX Runtime and timm in OpenVINO (the anchors) against each ecanfnet backend.

One process, same randomised weights and same input for everyone; the candidates run in
alternation, round after round, so that drifts in machine speed hit all of them alike.
Prints images/s (median of all timed calls) and the ratios to the anchors; "vs timm OV" compares
each row with timm -> OpenVINO in the same precision (f32 for fp32 rows, bf16 for bf16 rows).
The OpenVINO rows need the openvino extra; bf16 rows run where the CPU has native bf16. The INT8 rows
(needs nncf, in the openvino extra) quantize timm's model (the anchor: nncf.quantize with its defaults,
compiled with OpenVINO's default precision) and ours (ecanfnet's quantize_trunk) on the same 16
calibration inputs: crops of the real photos, preprocessed. Their accuracy columns are on photos they
were calibrated on, so they flatter; `ecanfnet quantize` reports agreement on held-out images.

    python benchmarks/inference.py                      # batch 1 and 8 at 288x288
    python benchmarks/inference.py --batch-sizes 1 --rounds 3 --json results.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import importlib.metadata
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch


from ecanfnet.testing import photo_arrays, random_crop, timm_model
from PIL import Image  # noqa: E402

from ecanfnet import build_model, eval_transform  # noqa: E402
from ecanfnet.quantize import int8_model, quantize_trunk  # noqa: E402
from ecanfnet.backends import (cpu_has_native_bf16, installed, make_runner, openvino_available, openvino_core,  # noqa: E402
                               openvino_threads)


def timm_onnxruntime(ref: torch.nn.Module, folder: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """timm's own model exported with torch.onnx (dynamic batch), run in ONNX Runtime with all graph optimisations."""
    import onnxruntime as ort

    path = folder / "timm_eca_nfnet_l0.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ref, (torch.randn(1, 3, 288, 288),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def timm_openvino(ref: torch.nn.Module, precision: str,
                  calibration: list[np.ndarray] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """What a user does: openvino.convert_model on timm's eval model, compile_model with a precision hint.

    precision "int8": nncf.quantize with its defaults on the calibration inputs, compiled without a
    precision hint (OpenVINO's default for the layers left in float: bf16 where the CPU has it).
    """
    import openvino as ov

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        model = ov.convert_model(ref, example_input=torch.randn(1, 3, 288, 288))
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": openvino_threads()}
    if precision == "int8":
        import nncf

        with contextlib.redirect_stdout(io.StringIO()):
            model = nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration))
    else:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = openvino_core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: x.numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())
    return run


def timm_eager(ref: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return ref(x)
    return run


def calibration_inputs(image_size: int, count: int = 16) -> list[np.ndarray]:
    """count preprocessed (1, 3, S, S) inputs: random crops of the real photos (the INT8 rows' calibration)."""
    cfg = dict(build_model().pretrained_cfg, test_input_size=[3, image_size, image_size])
    transform, rng = eval_transform(cfg), np.random.default_rng(0)
    photos = list(photo_arrays().values())
    return [transform(Image.fromarray(random_crop(photos[i % len(photos)], rng, 0.6)))[None].numpy()
            for i in range(count)]


def candidates(batch: int, with_compile: bool, with_bf16: bool, folder: Path,
               calibration: list[np.ndarray] | None = None) -> dict[str, Callable]:
    ref = timm_model("eca_nfnet_l0", seed=0)
    ours = build_model("eca_nfnet_l0").eval()
    ours.load_state_dict(ref.state_dict())
    runs: dict[str, Callable] = {"timm eager fp32": timm_eager(ref), "timm onnxruntime fp32": timm_onnxruntime(ref, folder)}
    with_openvino = openvino_available()
    if with_openvino:
        runs["timm openvino fp32"] = timm_openvino(ref, "f32")
        if with_bf16 and cpu_has_native_bf16():
            runs["timm openvino bf16"] = timm_openvino(ref, "bf16")
    if with_openvino and calibration:
        runs["timm openvino int8"] = timm_openvino(ref, "int8", calibration)
    runs["ecanfnet torch fp32"] = make_runner(ours, "torch", "fp32")
    runs["ecanfnet onnxruntime fp32"] = make_runner(ours, "onnxruntime", "fp32")
    if with_openvino:
        runs["ecanfnet openvino fp32"] = make_runner(ours, "openvino", "fp32", compile_batch=batch)
    if with_compile:
        runs["ecanfnet compile fp32"] = make_runner(ours, "compile", "fp32", compile_batch=batch)
    if with_bf16:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs["ecanfnet torch bf16"] = make_runner(ours, "torch", "bf16")
            if with_compile and cpu_has_native_bf16():
                runs["ecanfnet compile bf16"] = make_runner(ours, "compile", "bf16", compile_batch=batch)
        if with_openvino and cpu_has_native_bf16():
            runs["ecanfnet openvino bf16"] = make_runner(ours, "openvino", "bf16", compile_batch=batch)
    if with_openvino and calibration:
        with contextlib.redirect_stdout(io.StringIO()):
            trunk = quantize_trunk(ours, calibration, lambda x: x)
        runs["ecanfnet openvino int8"] = make_runner(int8_model(ours, trunk), compile_batch=batch)
    return runs


def measure(runs: dict[str, Callable], x: torch.Tensor, rounds: int, iters: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in runs}
    for fn in runs.values():  # warm-up (first calls allocate, compile or autotune)
        fn(x)
        fn(x)
    for _ in range(rounds):
        for name, fn in runs.items():
            for _ in range(iters):
                start = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - start)
    return times


def real_photo_batch(image_size: int) -> torch.Tensor:
    """The real photos shipped with scikit-image / scikit-learn, preprocessed for the model."""
    cfg = dict(build_model().pretrained_cfg, test_input_size=[3, image_size, image_size])
    transform = eval_transform(cfg)
    return torch.stack([transform(Image.fromarray(arr)) for arr in photo_arrays().values()])


def agreement(runs: dict[str, Callable], x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each candidate's logits against timm eager fp32 on x: max relative error, top-1/top-5 agreement."""
    want = runs["timm eager fp32"](x).float()
    out = {}
    for name, fn in runs.items():
        got = fn(x).float()
        top5_w, top5_g = want.topk(5).indices, got.topk(5).indices
        out[name] = {
            "max_rel_err": float((got - want).abs().max() / want.abs().max()),
            "top1_agree": float((top5_w[:, 0] == top5_g[:, 0]).float().mean()),
            "top5_agree": float((top5_w.sort().values == top5_g.sort().values).all(dim=1).float().mean()),
        }
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags: list[str] = []
    try:
        flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split()
                        if f.startswith(("avx512", "amx", "avx_vnni")) or f in ("avx2", "fma")})
    except OSError:
        pass
    versions = f"torch {torch.__version__}"
    for package in ("onnxruntime", "openvino", "nncf", "timm"):
        try:
            versions += f", {package} {importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    return (f"{cpu}, {torch.get_num_threads()} torch threads, native bf16: {cpu_has_native_bf16()}, "
            f"flags: {' '.join(flags) or 'unknown'}; {versions}, Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--image-size", type=int, default=288)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3, help="timed calls per candidate per round")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (about a minute to build)")
    parser.add_argument("--bf16", choices=("auto", "yes", "no"), default="auto",
                        help="auto: only where the CPU has native bf16, and always at batch 1")
    parser.add_argument("--int8", choices=("auto", "no"), default="auto",
                        help="auto: the INT8 rows where nncf and openvino are installed")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    print(f"# machine: {machine()}")
    results = []
    photos = real_photo_batch(args.image_size)
    print(f"# accuracy columns: logits on {len(photos)} real photos vs timm eager fp32")
    with_int8 = args.int8 == "auto" and openvino_available() and installed("nncf")
    calibration = calibration_inputs(args.image_size) if with_int8 else None
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch_sizes:
            with_bf16 = args.bf16 == "yes" or (args.bf16 == "auto" and (cpu_has_native_bf16() or batch == 1))
            runs = candidates(batch, not args.no_compile, with_bf16, Path(tmp), calibration)
            x = torch.randn(batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(batch))
            agree = agreement(runs, photos)
            times = measure(runs, x, args.rounds, args.iters)
            ips = {name: batch / statistics.median(t) for name, t in times.items()}
            eager, ort = ips["timm eager fp32"], ips["timm onnxruntime fp32"]
            print(f"\n## batch {batch}, {args.image_size}x{args.image_size}, {args.rounds} rounds x {args.iters} calls")
            print(f"{'candidate':28s} {'images/s':>9s} {'vs timm eager':>14s} {'vs timm ORT':>12s} {'vs timm OV':>11s} "
                  f"{'max rel err':>12s} {'top-1':>6s} {'top-5':>6s}")
            for name in runs:
                a = agree[name]
                ov_anchor = ips.get(f"timm openvino {name.rsplit(' ', 1)[-1]}")  # same precision
                vs_ov = ips[name] / ov_anchor if ov_anchor else None
                print(f"{name:28s} {ips[name]:9.2f} {ips[name] / eager:13.2f}x {ips[name] / ort:11.2f}x "
                      f"{f'{vs_ov:10.2f}x' if vs_ov else f'{chr(45):>11s}'} "
                      f"{a['max_rel_err']:12.2e} {a['top1_agree']:6.2f} {a['top5_agree']:6.2f}", flush=True)
                results.append({"batch_size": batch, "image_size": args.image_size, "candidate": name,
                                "images_per_s": ips[name], "vs_timm_eager": ips[name] / eager,
                                "vs_timm_onnxruntime": ips[name] / ort, "vs_timm_openvino": vs_ov, **a})
            del runs
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
