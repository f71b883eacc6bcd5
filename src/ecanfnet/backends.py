"""Inference backends over the folded network: eager torch, torch.compile, ONNX Runtime, OpenVINO.

ONNX Runtime and OpenVINO run files converted once per set of weights and kept in the conversion cache
(cache.py: bounded, safe across processes). Exports for other runtimes are in exports.py.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import numpy as np
import torch

from .cache import cache_dir, entry_lock, evict, max_bytes, touch
from .choices import BACKENDS, OPENVINO_PRECISIONS  # noqa: F401 (BACKENDS: re-exported)
from .errors import BackendError
from .exports import ONNX_OPSET, export_metadata, export_onnx
from .fileio import write_atomically
from .folded import PRECISIONS, FoldedECANFNet, prepare_for_inference
from .model import ECANFNet
from .weights import weights_fingerprint

if TYPE_CHECKING:
    import openvino

FASTEST = "fastest"  # a precision request: the quickest this model runs at here (fastest_precision)

logger = logging.getLogger("ecanfnet")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def installed(module: str) -> bool:
    """Whether an optional package is installed (found, not imported: some take seconds to import)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def onnxruntime_available() -> bool:
    """Whether the optional onnxruntime extra is installed."""
    return installed("onnxruntime")


def openvino_available() -> bool:
    """Whether the optional openvino extra is installed."""
    return installed("openvino")


def is_int8_model(model: torch.nn.Module) -> bool:
    """Whether model is an INT8 model (quantize.QuantizedECANFNet: its network runs on OpenVINO at int8)."""
    return hasattr(model, "openvino_trunk")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> the fastest exact (fp32) backend here.

    On CPU: openvino when installed, else onnxruntime when installed, else torch (the order measured
    with `ecanfnet bench` at batch 1 and 8, 288x288: docs/benchmarks.md). Elsewhere: torch. 'auto'
    only ever names a backend; the precision stays what the caller asked (fp32 by default), so it
    never switches to an inexact path such as bf16.
    """
    if backend == "auto":
        if device.type != "cpu":
            return "torch"
        if openvino_available():
            return "openvino"
        return "onnxruntime" if onnxruntime_available() else "torch"
    if backend not in BACKENDS:
        raise BackendError(f"backend must be auto or one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def check_combination(precision: str, backend: str, device: torch.device) -> None:
    """Refuse combinations that cannot run; warn for bf16 on a CPU that only emulates it."""
    if precision not in PRECISIONS:
        raise BackendError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise BackendError("fp16 needs a CUDA device; on CPU use bf16 (where supported) or fp32")
    if backend == "onnxruntime":
        if not onnxruntime_available():
            raise BackendError("the onnxruntime backend needs the onnx extra: pip install 'ecanfnet[onnx]'")
        if precision != "fp32":
            raise BackendError(f"the onnxruntime backend runs fp32 only (asked for {precision}); use --backend torch")
        if device.type != "cpu":
            raise BackendError(f"the onnxruntime backend runs on the CPU (asked for {device}); use --backend torch")
    if backend == "openvino":
        if not openvino_available():
            raise BackendError("the openvino backend needs the openvino extra: pip install 'ecanfnet[openvino]'")
        if device.type != "cpu":
            raise BackendError(f"the openvino backend runs on the CPU (asked for {device}); use --backend torch")
        if precision not in OPENVINO_PRECISIONS:
            raise BackendError(f"the openvino backend runs fp32 or bf16 (asked for {precision}); use --backend torch")
        if precision == "bf16" and not cpu_has_native_bf16():
            raise BackendError("the openvino backend runs bf16 only on CPUs with native bf16 (avx512_bf16/amx); "
                               "use --precision fp32")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("this CPU has no native bf16 (avx512_bf16/amx); bf16 is emulated and much slower "
                      "than fp32 here", stacklevel=3)


class Runner:
    """A callable batch -> float32 logits on the CPU, for one backend and precision."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], backend: str, precision: str,
                 device: torch.device) -> None:
        self.fn, self.backend, self.precision, self.device = fn, backend, precision, device

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.fn(batch)

    def __repr__(self) -> str:
        return f"Runner(backend={self.backend!r}, precision={self.precision!r}, device={str(self.device)!r})"


def make_runner(model: ECANFNet, backend: str = "auto", precision: str | None = None,
                device: str | torch.device | None = None, compile_batch: int | None = None) -> Runner:
    """Fold the model and wrap it in the requested backend (see BACKENDS; 'auto' picks the fastest fp32).

    compile_batch: the batch size the runner will mostly see; compile pads to it, OpenVINO compiles for it
    (smaller batches padded, larger ones on a dynamic-shape model).

    precision None: the model's own (fp32; int8 for an INT8 model, see quantize.py); "fastest": see
    fastest_precision.
    """
    int8 = is_int8_model(model)
    device = torch.device(device) if device is not None else torch.device("cpu") if int8 else next(model.parameters()).device
    if int8:
        return _int8_runner(model, backend, "int8" if precision in (None, FASTEST) else precision, device, compile_batch)
    precision = precision or "fp32"
    if precision == "int8":
        raise BackendError("int8 runs an INT8 model folder: make one with `ecanfnet quantize --weights SRC "
                           "--calibration IMAGES --output OUT`, then pass --weights OUT")
    backend = resolve_backend(backend, device)
    if precision == FASTEST:
        precision = fastest_precision(backend, device)
    check_combination(precision, backend, device)
    if backend == "onnxruntime":
        return Runner(_onnxruntime_fn(model), backend, precision, device)
    if backend == "openvino":
        fn = _openvino_fn(cached_openvino_model(model), OPENVINO_PRECISIONS[precision], compile_batch)
        return Runner(fn, backend, precision, device)
    folded = prepare_for_inference(model, precision, channels_last=True, device=device)
    if backend == "compile":
        fn = _torch_fn(_compile(folded), device, PRECISIONS[precision], pad_to=compile_batch)
    else:
        fn = _torch_fn(folded, device, PRECISIONS[precision])
    return Runner(fn, backend, precision, device)


def with_flip_tta(runner: Runner) -> Runner:
    """The runner with flip test-time augmentation: the mean of its logits for each image and its mirror image."""
    def run(batch: torch.Tensor) -> torch.Tensor:
        return (runner(batch) + runner(batch.flip(-1))) / 2

    return Runner(run, runner.backend, runner.precision, runner.device)


def fastest_precision(backend: str, device: torch.device) -> str:
    """The quickest precision a float model runs at on this backend and device (an INT8 model: int8 always).

    bf16 where it is computed natively (CUDA; CPUs with avx512_bf16 or AMX, on the torch, compile and
    openvino backends), else fp32. Not exact: bf16 logits differ from fp32's in the second or third digit.
    """
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu" and backend in ("torch", "compile", "openvino") and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def _int8_runner(model, backend: str, precision: str, device: torch.device, static_batch: int | None) -> Runner:
    """An INT8 model's runner: its OpenVINO model (INT8 trunk, fp32 classifier) compiled for the CPU."""
    if backend not in ("auto", "openvino"):
        raise BackendError(f"an INT8 model runs on the openvino backend (asked for {backend})")
    if precision != "int8":
        raise BackendError(f"an INT8 model runs at int8 (asked for {precision}); for {precision} pass the "
                           "checkpoint it was quantized from")
    if device.type != "cpu":
        raise BackendError(f"an INT8 model runs on the CPU (asked for {device}); use --device cpu")
    if not openvino_available():
        raise BackendError("INT8 models need the openvino extra: pip install 'ecanfnet[openvino]'")
    # f32: the layers NNCF left in float stay exact (bf16 measured no faster, docs/benchmarks.md#int8).
    return Runner(_openvino_fn(model.openvino_model(), "f32", static_batch), "openvino", "int8", device)


def _torch_fn(module: Callable, device: torch.device, dtype: torch.dtype,
              pad_to: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(batch: torch.Tensor) -> torch.Tensor:
        n = batch.shape[0]
        if pad_to and n < pad_to:  # one fixed shape: a compiled graph is not rebuilt for a short last batch
            batch = torch.cat([batch, batch.new_zeros((pad_to - n, *batch.shape[1:]))])
        x = batch.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        with torch.inference_mode():
            return module(x)[:n].float().cpu()
    return run


def _compile(folded: FoldedECANFNet) -> Callable:
    # freezing lets inductor treat the folded weights as constants (prepacked convolution weights).
    return torch.compile(folded, options={"freezing": True}, dynamic=False)


def _onnxruntime_fn(model: ECANFNet) -> Callable[[torch.Tensor], torch.Tensor]:
    session = _onnxruntime_session(model)

    def run(batch: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run(None, {"images": batch.float().contiguous().numpy()})
        return torch.from_numpy(logits)
    return run


def _onnxruntime_session(model: ECANFNet):
    """An ONNX Runtime session of the cached export (one exported into a temp folder where the cache cannot be written)."""
    try:
        with _onnx_entry(model) as path:
            return _ort_session(path)
    except OSError as exc:  # a read-only or full cache: run uncached rather than fail
        logger.warning("cannot cache the ONNX export in %s (%s); exporting on every run", cache_dir() / "onnx",
                       exc.strerror or exc)
    with tempfile.TemporaryDirectory(prefix="ecanfnet-onnx-") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model, path, check=False)
        return _ort_session(path)


def _ort_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.inter_op_num_threads = 1
    # Flushing denormals to zero measured ~20% faster here with bit-identical logits; it can only
    # change values below 1.2e-38, which never reach the logits' precision.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    # Idle ORT threads sleep instead of spinning, leaving the cores to image decoding and the server:
    # serve load test 0.78x -> 0.88x of model-only throughput, model-only speed unchanged within noise.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def openvino_threads() -> int:
    """Threads OpenVINO may use: torch's setting (torch.set_num_threads), at most the CPUs this process may run on."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus))


@functools.lru_cache(maxsize=None)
def openvino_core() -> "openvino.Core":
    """The one OpenVINO Core of this process, kept until exit.

    Each Core that compiles loads its own CPU plugin, which installs a signal stack on the calling thread
    and, when that Core is destroyed, reinstates the one it found; Cores destroyed out of order leave a
    freed stack installed, and the next signal with a Python handler (SIGCHLD, SIGINT) then kills the
    process with SIGSEGV. One Core for everything, never destroyed, keeps that from happening.
    """
    import openvino as ov

    core = ov.Core()
    core.get_property("CPU", "FULL_DEVICE_NAME")  # loads the CPU plugin now, before any other Core's
    return core


def _openvino_config(want: str) -> dict[str, object]:
    """compile_model settings: precision hint `want` always set, one LATENCY stream on openvino_threads()."""
    # The precision hint is always set: without it OpenVINO runs f32 models in bf16 on CPUs that have
    # it (avx512_bf16/amx), which is not exact. LATENCY: one stream using every thread for each call;
    # a THROUGHPUT hint (one stream per core, the batch split across them) measured within noise at
    # batch 8 and half the speed at batch 1 on 2 cores (docs/benchmarks.md), so one setting serves all sizes.
    return {"INFERENCE_PRECISION_HINT": want, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": openvino_threads()}


def _openvino_fn(ov_model: "openvino.Model", want: str,
                 static_batch: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """batch -> first output of ov_model compiled for the CPU at precision `want` (read back and checked).

    static_batch: compile, at the first call, for exactly (static_batch, C, H, W) of that call's image size,
    padding smaller batches (6-8 % faster than dynamic shapes at batch 1 and 8: docs/benchmarks.md); a larger
    batch or another image size runs on the dynamic-shape model, compiled when first needed. Without it,
    only the dynamic-shape model, compiled now. One compiled model holds its own copy of the weights, so
    a caller that knows its batch size gets one, and one that does not (the server) gets the other.
    """
    static: dict[tuple[int, ...], "openvino.InferRequest"] = {}  # at most one: (static_batch, C, H, W)
    dynamic: list["openvino.InferRequest"] = []
    if static_batch is None:
        dynamic.append(_compile_checked(ov_model, want).create_infer_request())
    lock = threading.Lock()  # infer requests reuse their output buffers: one call at a time

    def request_for(shape: tuple[int, ...]) -> tuple["openvino.InferRequest", int | None]:
        wanted = (static_batch, *shape[1:])
        if static_batch is not None and shape[0] <= static_batch and (not static or wanted in static):
            if not static:
                model = ov_model.clone()
                model.reshape({0: list(wanted)})
                static[wanted] = _compile_checked(model, want).create_infer_request()
            return static[wanted], static_batch
        if not dynamic:
            dynamic.append(_compile_checked(ov_model, want).create_infer_request())
        return dynamic[0], None

    def run(batch: torch.Tensor) -> torch.Tensor:
        array, n = batch.float().contiguous().numpy(), batch.shape[0]
        with lock:
            request, padded_to = request_for(tuple(array.shape))
            if padded_to is not None and n < padded_to:
                array = np.concatenate([array, np.zeros((padded_to - n, *array.shape[1:]), np.float32)])
            request.infer({0: array}, share_inputs=True)
            return torch.from_numpy(request.get_output_tensor(0).data[:n].copy())
    return run


def _compile_checked(ov_model: "openvino.Model", want: str) -> "openvino.CompiledModel":
    """ov_model compiled for the CPU at inference precision `want`, which is read back (BackendError if not it)."""
    compiled = openvino_core().compile_model(ov_model, "CPU", _openvino_config(want))
    got = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    if got != want:
        raise BackendError(f"OpenVINO compiled the model for {got}, not the {want} asked for; "
                           "use --backend onnxruntime")
    return compiled


def _cache_identity(model: ECANFNet) -> tuple[str, dict[str, str]]:
    """The cache-file stem of model (name, weights fingerprint, digest of its export metadata) and that metadata."""
    fingerprint = weights_fingerprint(model)
    metadata = export_metadata(model, fingerprint=fingerprint)
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:8]
    return f"{model.name}-{fingerprint}-{digest}", metadata


def _onnx_path(stem: str) -> Path:
    return cache_dir() / "onnx" / f"{stem}-opset{ONNX_OPSET}.onnx"


def cached_onnx_export(model: ECANFNet) -> Path:
    """The folded network's self-describing ONNX file, exported once per set of weights and metadata into cache_dir().

    The entry's lock is released on return: a cache that is over its bound may evict the file before it is
    opened (the onnxruntime backend opens it under the lock instead).
    """
    with _onnx_entry(model) as path:
        return path


@contextlib.contextmanager
def _onnx_entry(model: ECANFNet) -> Iterator[Path]:
    """The cached ONNX file of model, exported first when missing, locked while the caller reads it; evicts after."""
    limit, (stem, metadata) = max_bytes(), _cache_identity(model)  # a bad $ECANFNET_CACHE_MAX_BYTES fails first
    path = _onnx_path(stem)
    with entry_lock(path):
        if path.is_file():
            touch(path)
        else:
            export_onnx(model, path, check=False, metadata=metadata)
        yield path
    evict(keep=[path], limit=limit)


def openvino_cache_path(model: ECANFNet) -> Path:
    """The .xml of the folded network's OpenVINO IR in cache_dir() (its weights: the .bin beside it)."""
    return _openvino_path(_cache_identity(model)[0])


def _openvino_path(stem: str) -> Path:
    import openvino as ov

    return cache_dir() / "openvino" / f"{stem}-ov{ov.get_version().split('-')[0]}.xml"


def ir_sha256(xml: Path) -> str:
    """SHA-256 over an IR's .xml and .bin (the seal of a cache entry, the checksum of an INT8 folder's trunk)."""
    digest = hashlib.sha256()
    for path in (xml, xml.with_suffix(".bin")):
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def cached_openvino_model(model: ECANFNet) -> openvino.Model:
    """The folded fp32 network as an OpenVINO model, converted once per set of weights into cache_dir().

    The IR is two files (.xml, .bin) sealed by a third (.sha256) written last; a missing or failed
    seal (an interrupted or damaged cache entry) makes it convert and write them again.
    """
    limit, (stem, metadata) = max_bytes(), _cache_identity(model)
    xml = _openvino_path(stem)
    with entry_lock(xml):  # another process converting the same weights finishes first; then its entry is read
        ov_model = _read_or_convert(model, xml, metadata)
    evict(keep=[xml], limit=limit)
    return ov_model


def _read_or_convert(model: ECANFNet, xml: Path, metadata: Mapping[str, str]) -> openvino.Model:
    """The sealed cached IR at xml when intact, else a fresh conversion written there (see cached_openvino_model)."""
    seal = xml.with_suffix(".sha256")
    try:
        if seal.read_text(errors="replace").strip() == ir_sha256(xml):
            ov_model = openvino_core().read_model(str(xml))
            touch(xml)
            return ov_model
        logger.warning("cached OpenVINO model %s does not match its checksum; converting it again", xml)
    except (FileNotFoundError, NotADirectoryError):  # not cached yet
        pass
    except (OSError, RuntimeError, ValueError) as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]  # OpenVINO's reason is its last line
        logger.warning("cached OpenVINO model %s cannot be read (%s); converting it again", xml,
                       lines[-1].strip() if lines else type(exc).__name__)
    ov_model = convert_openvino(model, metadata=metadata)
    try:
        save_openvino(ov_model, xml)
        write_atomically(seal, lambda tmp: Path(tmp).write_text(ir_sha256(xml) + "\n"))
    except OSError as exc:  # a read-only or full cache: run uncached rather than fail
        logger.warning("cannot cache the OpenVINO model in %s (%s); converting on every run", xml.parent,
                       exc.strerror or exc)
        return ov_model
    # Read back rather than keep the converted model: its constants share memory with the folded
    # torch copy, while read_model maps the .bin, so the weights are held once either way.
    return openvino_core().read_model(str(xml))


def convert_openvino(model: ECANFNet, *, metadata: Mapping[str, str] | None = None) -> openvino.Model:
    """The folded fp32 CPU network converted to OpenVINO, with dynamic batch, height and width.

    It carries metadata (default: exports.export_metadata(model)) in its rt_info under "ecanfnet", which
    save_openvino writes into the .xml (read back with model.get_rt_info(["ecanfnet", KEY]).astype(str)).
    """
    import openvino as ov

    folded = prepare_for_inference(model, "fp32", channels_last=False, device="cpu")
    channels = folded.stem[0].in_channels
    example = torch.randn(1, channels, 64, 64, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracing warnings about Python-side shape arithmetic
        ov_model = ov.convert_model(folded, example_input=example, input=[ov.PartialShape([-1, channels, -1, -1])])
    ov_model.inputs[0].get_tensor().set_names({"images"})
    ov_model.outputs[0].get_tensor().set_names({"logits"})
    for key, value in (export_metadata(model) if metadata is None else metadata).items():
        ov_model.set_rt_info(value, ["ecanfnet", key])
    return ov_model


def save_openvino(ov_model: openvino.Model, xml: Path) -> None:
    """Write an OpenVINO model as IR (.xml + .bin, fp32 weights kept as they are), each file atomically."""
    import openvino as ov

    xml.parent.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(dir=xml.parent, prefix=f".{xml.stem}.")
    try:
        staged = Path(folder) / "model.xml"
        # compress_to_fp16 defaults to True: it would round every weight to fp16.
        ov.save_model(ov_model, str(staged), compress_to_fp16=False)
        # The .xml names no weights file: read_model takes the .bin of the same stem, written first.
        for src, dst in ((staged.with_suffix(".bin"), xml.with_suffix(".bin")), (staged, xml)):
            write_atomically(dst, lambda tmp, src=src: os.replace(src, tmp))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
