"""Self-describing exports: metadata in ONNX, TorchScript and OpenVINO IR; the uint8-input graph; a consumer of the file alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import read_json_lines
from ecanfnet import __version__, backends, exports
from ecanfnet.cli import main
from ecanfnet.factory import create_model
from ecanfnet.model import ECANFNet, NFNetConfig
from ecanfnet.testing import randomize_
from ecanfnet.transforms import eval_transform
from ecanfnet.weights import weights_fingerprint

TINY = NFNetConfig(depths=(1, 1, 1, 1), channels=(32, 32, 64, 64), stem_channels=16, group_size=8)
LABELS = ["tabby cat", 'a "quoted" <label> & more', "naïve ☃", "dog", "owl"]


def tiny_model(seed: int = 0) -> ECANFNet:
    """A randomised ECA-NFNet far smaller than L0, with its own labels and a non-default preprocessing."""
    model = randomize_(ECANFNet(TINY, 5, name="eca_nfnet_l0"), seed).eval()
    model.pretrained_cfg = model.pretrained_cfg.replace(
        label_names=tuple(LABELS), test_input_size=(3, 64, 64), test_crop_pct=0.875, interpolation="bilinear",
        mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    return model


def expected_metadata(model, *, uint8: bool) -> dict[str, object]:
    settings = model.pretrained_cfg.eval_settings()
    return {
        "ecanfnet_version": __version__, "architecture": model.name, "num_classes": str(model.num_classes),
        "labels": model.pretrained_cfg.readable_labels(), "weights_fingerprint": weights_fingerprint(model),
        "preprocessing": {**settings, "image_size": list(settings["image_size"]), "mean": list(settings["mean"]),
                          "std": list(settings["std"])},
        "input_layout": "NHWC" if uint8 else "NCHW", "input_dtype": "uint8" if uint8 else "float32",
        "output": "logits",
    }


def decoded(metadata: dict[str, str]) -> dict[str, object]:
    out = {k: json.loads(v) if k in ("labels", "preprocessing") else v for k, v in metadata.items()}
    out.pop("input_range")
    return out


@pytest.mark.parametrize("uint8", [False, True])
def test_onnx_metadata_describes_the_model(tmp_path, uint8):
    model = tiny_model()
    error = exports.export_onnx(model, tmp_path / "m.onnx", 64, uint8_input=uint8)
    assert error <= 1e-5
    assert decoded(exports.read_onnx_metadata(tmp_path / "m.onnx")) == expected_metadata(model, uint8=uint8)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_carries_the_metadata_in_an_extra_file(tmp_path):
    model = tiny_model()
    assert exports.export_torchscript(model, tmp_path / "m.pt", 64, uint8_input=True) <= 1e-5
    extra = {exports.TORCHSCRIPT_METADATA_FILE: ""}
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert decoded(json.loads(extra[exports.TORCHSCRIPT_METADATA_FILE])) == expected_metadata(model, uint8=True)


def test_the_cached_onnx_file_and_openvino_ir_carry_the_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("ECANFNET_CACHE", str(tmp_path))
    model, want = tiny_model(), expected_metadata(tiny_model(), uint8=False)
    assert decoded(exports.read_onnx_metadata(backends.cached_onnx_export(model))) == want
    backends.cached_openvino_model(model)
    ir = backends.openvino_core().read_model(str(backends.openvino_cache_path(model)))  # as written to disk
    info = {key: ir.get_rt_info(["ecanfnet", key]).astype(str) for key in exports.export_metadata(model)}
    assert decoded(info) == want
    relabelled = tiny_model()
    relabelled.pretrained_cfg = relabelled.pretrained_cfg.replace(label_names=("a", "b", "c", "d", "e"))
    assert backends.cached_onnx_export(relabelled) != backends.cached_onnx_export(model)  # same weights, other labels


def test_uint8_input_agrees_with_float_input_on_the_same_crops(tmp_path, photo_dir):
    import onnxruntime as ort

    model = tiny_model()
    exports.export_onnx(model, tmp_path / "f.onnx", 64, check=False)
    exports.export_onnx(model, tmp_path / "u.onnx", 64, check=False, uint8_input=True)
    transform = eval_transform(model.pretrained_cfg)
    crops = [transform.resize_and_crop(Image.open(p).convert("RGB")) for p in sorted(photo_dir.iterdir())]
    floats = torch.stack([transform.to_tensor(c) for c in crops]).numpy()
    pixels = np.stack([np.asarray(c, dtype=np.uint8) for c in crops])  # (N, H, W, 3)
    (want,) = ort.InferenceSession(str(tmp_path / "f.onnx")).run(None, {"images": floats})
    (got,) = ort.InferenceSession(str(tmp_path / "u.onnx")).run(None, {"images": pixels})
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(floats)).numpy()
    assert np.abs(got - torch_logits).max() <= 1e-5 * np.abs(torch_logits).max()


def consume(onnx_file: Path, image_file: Path, k: int = 5) -> list[str]:
    """A reference consumer: reads only the .onnx file (graph and metadata) and uses only onnxruntime and PIL.

    The documented rule (docs/inference.md, export): resize the shorter side to floor(size / crop_pct)
    with the named PIL filter (the longer to int(that * long / short)), then crop size x size at
    round((resized - size) / 2); uint8 NHWC as is, or float32 NCHW as (pixel / 255 - mean) / std.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    pre, labels = json.loads(meta["preprocessing"]), json.loads(meta["labels"])
    (height, width), scale = pre["image_size"], math.floor(pre["image_size"][0] / pre["crop_pct"])
    assert pre["crop_mode"] == "center" and height == width
    img = Image.open(image_file).convert("RGB")
    short, long = sorted(img.size)
    size = (scale, int(scale * long / short)) if img.width <= img.height else (int(scale * long / short), scale)
    img = img.resize(size, Image.Resampling[pre["interpolation"].upper()])
    left, top = round((img.width - width) / 2), round((img.height - height) / 2)
    x = np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.uint8)[None]
    if meta["input_layout"] == "NCHW":
        mean, std = (np.array(pre[k], dtype=np.float32).reshape(1, 3, 1, 1) for k in ("mean", "std"))
        x = (x.transpose(0, 3, 1, 2).astype(np.float32) / 255 - mean) / std
    (logits,) = session.run(None, {session.get_inputs()[0].name: x})
    return [labels[i] for i in np.argsort(-logits[0], kind="stable")[:k]]


@pytest.mark.slow
@pytest.mark.parametrize("uint8", [False, True])
def test_a_consumer_of_the_onnx_file_alone_reproduces_predict(tmp_path, capsys, timm_hub_folder, photo_dir, uint8):
    code = main(["predict", "--weights", str(timm_hub_folder), "--format", "json", str(photo_dir)])
    rows = read_json_lines(capsys.readouterr().out)
    assert code == 0 and len(rows) >= 3
    model = create_model(pretrained=str(timm_hub_folder))
    exports.export_onnx(model, tmp_path / "m.onnx", check=False, uint8_input=uint8)
    for row in rows:
        assert consume(tmp_path / "m.onnx", Path(row["path"])) == [p["label"] for p in row["predictions"]], row["path"]


@pytest.mark.slow
def test_an_int8_folders_trunk_carries_the_metadata(tmp_path):
    from ecanfnet.quantize import quantize_trunk, write_int8_folder

    model, rng = tiny_model(), np.random.default_rng(0)
    calibration = [rng.standard_normal((1, 3, 64, 64), dtype=np.float32) for _ in range(4)]
    trunk = quantize_trunk(model, calibration, lambda x: x)
    write_int8_folder(tmp_path / "int8", trunk, model, {"source": "tiny"})
    ir = backends.openvino_core().read_model(str(tmp_path / "int8" / "trunk.xml"))
    info = decoded({key: ir.get_rt_info(["ecanfnet", key]).astype(str) for key in exports.export_metadata(model)})
    assert info["preprocessing"] == expected_metadata(model, uint8=False)["preprocessing"]
    assert (info["architecture"], info["output"], info["num_classes"]) == ("eca_nfnet_l0", "embedding", "0")
