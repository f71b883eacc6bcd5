"""`export triton`: a model repository whose config.pbtxt parses with Triton's schema and matches the ONNX graph."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ecanfnet import exports
from ecanfnet.cli import main
from ecanfnet.model import ECANFNet, NFNetConfig
from ecanfnet.testing import randomize_

TINY = NFNetConfig(depths=(1, 1, 1, 1), channels=(32, 32, 64, 64), stem_channels=16, group_size=8)
X = torch.randn(3, 3, 288, 288, generator=torch.Generator().manual_seed(5))


def tiny_model(seed: int = 0) -> ECANFNet:
    """A randomised ECA-NFNet far smaller than L0 (5 classes, test size 64)."""
    model = randomize_(ECANFNet(TINY, 5, name="eca_nfnet_l0"), seed).eval()
    model.pretrained_cfg = model.pretrained_cfg.replace(test_input_size=(3, 64, 64),
                                                        label_names=("cat", "dog\nwith a line break", "c", "d", "e"))
    return model


def parse_config(folder: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((folder / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def check_matches_onnx_graph(config, onnx_file: Path) -> None:
    """Names, element types and dims of config equal the ONNX graph's (the batch dim left out when batching)."""
    import onnx
    from tritonclient.grpc import model_config_pb2

    graph = onnx.load(str(onnx_file)).graph
    types = {onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32, onnx.TensorProto.UINT8: model_config_pb2.TYPE_UINT8}
    for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
        assert [d.name for d in declared] == [a.name for a in actual]
        for d, a in zip(declared, actual):
            shape = a.type.tensor_type.shape.dim
            assert types[a.type.tensor_type.elem_type] == d.data_type
            assert shape[0].dim_param  # the batch: dynamic
            want = [x.dim_value for x in shape[1:]] if config.max_batch_size else [-1, *(x.dim_value for x in shape[1:])]
            assert list(d.dims) == want


def run_onnx(onnx_file: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    (out,) = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    return out


@pytest.mark.parametrize("uint8, batch", [(False, 8), (True, 4), (False, 0)])
def test_repository_config_parses_and_matches_the_onnx_graph(tmp_path, uint8, batch):
    from tritonclient.grpc import model_config_pb2

    model = tiny_model()
    error = exports.export_triton(model, tmp_path / "repo", model_name="tiny", max_batch_size=batch,
                                  uint8_input=uint8, instances=2, kind="cpu")
    folder = tmp_path / "repo" / "tiny"
    assert error <= 1e-5
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["1", "1/model.onnx", "config.pbtxt",
                                                                             "labels.txt"]
    config = parse_config(folder)
    assert (config.name, config.platform, config.backend, config.max_batch_size) == (
        "tiny", "onnxruntime_onnx", "onnxruntime", batch)
    assert config.HasField("dynamic_batching") == (batch > 0)
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    check_matches_onnx_graph(config, folder / "1" / "model.onnx")
    assert config.output[0].label_filename == "labels.txt"
    labels = (folder / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert labels == ["cat", "dog with a line break", "c", "d", "e"]  # one label a line, whatever the label holds
    assert [int(d) for d in config.input[0].dims[-3:]] == ([64, 64, 3] if uint8 else [3, 64, 64])
    meta = exports.read_onnx_metadata(folder / "1" / "model.onnx")
    assert '"image_size": [64, 64]' in meta["preprocessing"] and meta["input_layout"] == ("NHWC" if uint8 else "NCHW")
    assert not [p for p in (tmp_path / "repo").iterdir() if p.name != "tiny"]  # no staging folders left


def test_the_model_onnx_gives_the_torch_logits(tmp_path):
    model = tiny_model()
    exports.export_triton(model, tmp_path, max_batch_size=2, image_size=(96, 96))
    x = torch.randn(5, 3, 96, 96, generator=torch.Generator().manual_seed(1))  # more than max_batch_size: any batch
    with torch.no_grad():
        want = model(x).numpy()
    got = run_onnx(tmp_path / "eca_nfnet_l0" / "1" / "model.onnx", x.numpy())
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_an_earlier_export_is_replaced_and_a_foreign_folder_is_not(tmp_path):
    exports.export_triton(tiny_model(0), tmp_path, model_name="m")
    first = (tmp_path / "m" / "1" / "model.onnx").read_bytes()
    exports.export_triton(tiny_model(1), tmp_path, model_name="m", max_batch_size=3)
    assert (tmp_path / "m" / "1" / "model.onnx").read_bytes() != first and parse_config(tmp_path / "m").max_batch_size == 3
    (tmp_path / "theirs" / "1").mkdir(parents=True)
    (tmp_path / "theirs" / "config.pbtxt").write_text('name: "theirs"\n')
    (tmp_path / "afile").write_text("x")
    for name in ("theirs", "afile"):
        with pytest.raises(FileExistsError, match="not written by `ecanfnet export triton`") as info:
            exports.export_triton(tiny_model(), tmp_path, model_name=name)
        assert info.value.filename == str(tmp_path / name)
    assert (tmp_path / "theirs" / "config.pbtxt").read_text() == 'name: "theirs"\n' and (tmp_path / "afile").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "m", "theirs"]


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "x" * 129, "tab\there", "-x"])
def test_model_names_triton_cannot_hold_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="model name must be"):
        exports.export_triton(tiny_model(), tmp_path, model_name=name)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_triton_command_writes_a_repository_of_the_checkpoint(tmp_path, capsys, timm_hub_folder, timm_l0):
    code = main(["export", "triton", str(tmp_path), "--weights", str(timm_hub_folder), "--max-batch-size", "4",
                 "--instance-kind", "gpu"])
    out = capsys.readouterr().out
    assert code == 0 and "(ok," in out and "eca_nfnet_l0" in out, out
    folder = tmp_path / "eca_nfnet_l0"
    config = parse_config(folder)
    check_matches_onnx_graph(config, folder / "1" / "model.onnx")
    assert list(config.input[0].dims) == [3, 288, 288] and list(config.output[0].dims) == [1000]
    with torch.no_grad():
        want = timm_l0(X).numpy()
    got = run_onnx(folder / "1" / "model.onnx", X.numpy())
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert len((folder / "labels.txt").read_text(encoding="utf-8").splitlines()) == 1000
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
