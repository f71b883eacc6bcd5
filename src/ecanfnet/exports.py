"""Files written for other runtimes: self-describing ONNX (optionally taking uint8 pixels), TorchScript, a Triton model repository.

Every export carries the metadata a consumer needs besides the graph (export_metadata: labels, the
preprocessing, architecture, classes, weights fingerprint, ecanfnet version, the input's layout and
range): in ONNX's metadata_props, in TorchScript's extra file ``ecanfnet.json``, and (backends.py) in
OpenVINO IR's rt_info under ``ecanfnet``. With uint8_input the graph takes uint8 RGB images
(N, H, W, 3) already resized and cropped, and normalises them itself as EvalTransform.to_tensor does.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .fileio import check_output_dir, move_folder_into_place, new_dir_mode, write_atomically, write_text_atomically
from .folded import prepare_for_inference
from .transforms import height_width

ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"
TORCHSCRIPT_METADATA_FILE = "ecanfnet.json"
TRITON_MARKER = "# written by `ecanfnet export triton`; replaced as a whole by the next such export"
TRITON_LABELS_FILE = "labels.txt"
TRITON_KINDS = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}
TRITON_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_LINE_BREAKS = re.compile(r"[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]")


def export_metadata(model: nn.Module, *, uint8_input: bool = False, image_size: Sequence[int] | None = None,
                    fingerprint: str | None = None) -> dict[str, str]:
    """What an exported file says about itself, every value a string (JSON for labels and preprocessing).

    image_size: the (height, width) the file is fixed to, recorded as the preprocessing's size (default:
    the checkpoint's test size). fingerprint: weights_fingerprint(model), when the caller has it.
    """
    from . import __version__
    from .weights import weights_fingerprint

    cfg = model.pretrained_cfg
    settings = cfg.eval_settings()
    preprocessing = {"image_size": list(image_size or settings["image_size"]), "crop_pct": settings["crop_pct"],
                     "crop_mode": settings["crop_mode"], "interpolation": settings["interpolation"],
                     "mean": list(settings["mean"]), "std": list(settings["std"])}
    return {
        "ecanfnet_version": __version__,
        "architecture": model.name,
        "num_classes": str(cfg.num_classes),
        "labels": json.dumps(cfg.readable_labels(), ensure_ascii=False),
        "preprocessing": json.dumps(preprocessing),
        "weights_fingerprint": fingerprint or weights_fingerprint(model),
        "input_layout": "NHWC" if uint8_input else "NCHW",
        "input_dtype": "uint8" if uint8_input else "float32",
        "input_range": "0..255 RGB, normalised in the graph" if uint8_input else "RGB as (pixel / 255 - mean) / std",
        "output": OUTPUT_NAME if cfg.num_classes else "embedding",
    }


class Uint8Input(nn.Module):
    """A network taking uint8 RGB images (N, H, W, 3) already resized and cropped; it normalises them itself."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        # float32 as EvalTransform holds them; the same operations in the same order (x / 255, - mean, / std)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 255
        return self.net((x - self.mean) / self.std)


def export_network(model: nn.Module, image_size: int | Sequence[int], *,
                   uint8_input: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """The folded fp32 CPU network an export writes (taking uint8 pixels with uint8_input) and a fixed example batch."""
    folded = prepare_for_inference(model, "fp32", channels_last=False, device="cpu")
    height, width = height_width(image_size)
    generator = torch.Generator().manual_seed(0)
    if not uint8_input:
        return folded, torch.randn(2, 3, height, width, generator=generator)
    settings = model.pretrained_cfg.eval_settings()
    example = torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8, generator=generator)
    return Uint8Input(folded, settings["mean"], settings["std"]).eval(), example


def export_onnx(model: nn.Module, out: str | os.PathLike, image_size: int | Sequence[int] = 288,
                check: bool = True, *, uint8_input: bool = False, fixed_size: bool = False,
                metadata: Mapping[str, str] | None = None) -> float | None:
    """Write the folded fp32 network as self-describing ONNX; with check, return the max relative logit error in ORT.

    Batch is dynamic; height and width too unless fixed_size (then image_size). uint8_input: the graph
    takes uint8 (N, H, W, 3) RGB. metadata: the metadata_props (default: export_metadata(model)).
    """
    net, example = export_network(model, image_size, uint8_input=uint8_input)
    if metadata is None:
        metadata = export_metadata(model, uint8_input=uint8_input, image_size=height_width(image_size) if fixed_size else None)
    spatial = {} if fixed_size else ({1: "height", 2: "width"} if uint8_input else {2: "height", 3: "width"})
    axes = {INPUT_NAME: {0: "batch", **spatial}, OUTPUT_NAME: {0: "batch"}}
    write_atomically(out, lambda tmp: _write_onnx(net, example, tmp, axes, metadata))
    if not check:
        return None
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {INPUT_NAME: example.numpy()})
    return max_error(net, example, torch.from_numpy(got))


def _write_onnx(net: nn.Module, example: torch.Tensor, path: str, axes: dict, metadata: Mapping[str, str]) -> None:
    """torch.onnx.export net to path, then add metadata as the model's metadata_props."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warnings about Python-side shape arithmetic
        torch.onnx.export(net, (example,), path, dynamo=False, opset_version=ONNX_OPSET, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes)
    proto = onnx.load(path)
    onnx.helper.set_model_props(proto, dict(metadata))
    onnx.save(proto, path)


def read_onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of an ONNX file (weights not loaded)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def export_torchscript(model: nn.Module, out: str | os.PathLike, image_size: int | Sequence[int] = 288, *,
                       uint8_input: bool = False) -> float:
    """Write the folded network as traced TorchScript (metadata in its extra file ecanfnet.json); return the
    reloaded file's max relative logit error."""
    net, example = export_network(model, image_size, uint8_input=uint8_input)
    extra = {TORCHSCRIPT_METADATA_FILE: json.dumps(export_metadata(model, uint8_input=uint8_input))}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; it still works
        write_atomically(out, lambda tmp: torch.jit.save(traced, tmp, _extra_files=extra))
        loaded = torch.jit.load(str(out), map_location="cpu")
    with torch.no_grad():
        return max_error(net, example, loaded(example))


def max_error(net: nn.Module, example: torch.Tensor, got: torch.Tensor) -> float:
    """Largest logit difference from net(example), relative to the largest logit magnitude."""
    with torch.no_grad():
        want = net(example)
    return float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------- Triton model repository


def check_triton_name(name: str) -> str:
    """A Triton model name: letters, digits, _ . - (not first: . -), at most 128 characters; ValueError otherwise."""
    if not isinstance(name, str) or not TRITON_NAME.fullmatch(name):
        raise ValueError(f"model name must be letters, digits, '_', '.' or '-' (starting with a letter, digit "
                         f"or '_'), at most 128 characters, got {name!r}")
    return name


def check_triton_output(repository: str | os.PathLike, name: str) -> Path:
    """The model folder repository/name; OSError naming it when it cannot be written or is not one of ours."""
    folder = Path(repository) / check_triton_name(name)
    check_output_dir(repository)
    if os.path.lexists(folder) and not _written_by_us(folder):
        raise FileExistsError(errno.EEXIST, "exists and was not written by `ecanfnet export triton`; not replacing "
                                            "it: choose another --model-name or repository", str(folder))
    return folder


def _written_by_us(folder: Path) -> bool:
    """Whether folder is empty or a model folder an earlier `export triton` wrote (config.pbtxt's first line)."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        if not any(folder.iterdir()):
            return True
        config = folder / "config.pbtxt"
        if not stat.S_ISREG(config.lstat().st_mode):  # a FIFO would block the read, a link lead elsewhere
            return False
        with open(config, encoding="utf-8") as f:
            return f.readline(len(TRITON_MARKER) + 2).rstrip("\n") == TRITON_MARKER
    except (OSError, UnicodeDecodeError):
        return False


def triton_config(name: str, *, image_size: Sequence[int], num_classes: int, max_batch_size: int = 8,
                  uint8_input: bool = False, instances: int = 1, kind: str = "auto") -> str:
    """config.pbtxt of the ONNX model export_triton writes (dims without the batch when max_batch_size > 0)."""
    height, width = image_size
    dims, out_dims = ([height, width, 3] if uint8_input else [3, height, width]), [num_classes]
    if max_batch_size == 0:  # no batching by Triton: the batch is an ordinary (variable) dimension
        dims, out_dims = [-1, *dims], [-1, *out_dims]
    fmt = [f"    format: {'FORMAT_NHWC' if uint8_input else 'FORMAT_NCHW'}"] if max_batch_size else []
    lines = [
        TRITON_MARKER, f'name: "{check_triton_name(name)}"', 'platform: "onnxruntime_onnx"', 'backend: "onnxruntime"',
        f"max_batch_size: {max_batch_size}",
        "input [", "  {", f'    name: "{INPUT_NAME}"', f"    data_type: {'TYPE_UINT8' if uint8_input else 'TYPE_FP32'}",
        *fmt, f"    dims: [ {', '.join(map(str, dims))} ]", "  }", "]",
        "output [", "  {", f'    name: "{OUTPUT_NAME}"', "    data_type: TYPE_FP32",
        f"    dims: [ {', '.join(map(str, out_dims))} ]", f'    label_filename: "{TRITON_LABELS_FILE}"', "  }", "]",
        *(["dynamic_batching { }"] if max_batch_size else []),
        "instance_group [", "  {", f"    count: {instances}", f"    kind: {TRITON_KINDS[kind]}", "  }", "]",
    ]
    return "\n".join(lines) + "\n"


def export_triton(model: nn.Module, repository: str | os.PathLike, *, model_name: str | None = None,
                  max_batch_size: int = 8, uint8_input: bool = False, image_size: Sequence[int] | None = None,
                  instances: int = 1, kind: str = "auto") -> float:
    """Write repository/NAME (config.pbtxt, 1/model.onnx, labels.txt) complete, then move it into place.

    The ONNX file is fixed to image_size (default: the checkpoint's test size), batch dynamic. Returns its
    checked max relative logit error. Refuses (FileExistsError) to replace a folder it did not write.
    """
    if max_batch_size < 0 or instances < 1 or kind not in TRITON_KINDS:
        raise ValueError(f"need max_batch_size >= 0, instances >= 1 and kind in {', '.join(TRITON_KINDS)}; got "
                         f"{max_batch_size}, {instances}, {kind!r}")
    folder = check_triton_output(repository, model.name if model_name is None else model_name)
    size = height_width(image_size or model.pretrained_cfg.eval_settings()["image_size"])
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.triton-"))
    try:
        rel_error = export_onnx(model, staging / "1" / "model.onnx", size, uint8_input=uint8_input, fixed_size=True)
        labels = "".join(_LINE_BREAKS.sub(" ", label) + "\n" for label in model.pretrained_cfg.readable_labels())
        write_text_atomically(staging / TRITON_LABELS_FILE, labels)
        config = triton_config(folder.name, image_size=size, num_classes=model.pretrained_cfg.num_classes,
                               max_batch_size=max_batch_size, uint8_input=uint8_input, instances=instances, kind=kind)
        write_text_atomically(staging / "config.pbtxt", config)
        for path in (staging / "1", staging):
            os.chmod(path, new_dir_mode())
        move_folder_into_place(staging, folder, replaceable=lambda f: None if _written_by_us(f) else (
            "appeared while exporting and was not written by `ecanfnet export triton`; not replacing it"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return rel_error
