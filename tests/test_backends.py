"""The folded inference form and every backend against the unfolded model and timm; exports; bench."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from conftest import read_json_lines
from ecanfnet import build_model
from ecanfnet.backends import BackendError, cached_onnx_export, make_runner, onnxruntime_available
from ecanfnet.cli import main
from ecanfnet.folded import prepare_for_inference

X = torch.randn(2, 3, 160, 136, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def trio(timm_l0):
    """timm reference, our model with the same randomised weights, and the timm logits on X."""
    ours = build_model().eval()
    ours.load_state_dict(timm_l0.state_dict())
    with torch.no_grad():
        return timm_l0, ours, timm_l0(X)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_fp32_equals_unfolded_and_timm(trio, channels_last):
    ref, ours, want = trio
    folded = prepare_for_inference(ours, "fp32", channels_last=channels_last)
    x = X.to(memory_format=torch.channels_last) if channels_last else X
    with torch.no_grad():
        got, unfolded = folded(x), ours(X)
        assert rel_err(got, unfolded) <= 1e-5
        assert rel_err(got, want) <= 1e-5
        assert rel_err(folded.forward_head(folded.forward_features(x), pre_logits=True),
                        ref.forward_head(ref.forward_features(X), pre_logits=True)) <= 1e-5


def test_folded_model_refuses_training(trio):
    folded = prepare_for_inference(trio[1])
    assert not any(p.requires_grad for p in folded.parameters())
    with pytest.raises(RuntimeError, match="cannot be trained"):
        folded.train()
    folded.eval()  # still allowed


def test_folding_leaves_the_source_model_untouched(trio):
    _, ours, want = trio
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    prepare_for_inference(ours, "fp32")
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "compile"])
def test_fp32_backends_equal_timm(trio, backend):
    if backend == "onnxruntime" and not onnxruntime_available():
        pytest.skip("onnxruntime not installed")
    _, ours, want = trio
    runner = make_runner(ours, backend, "fp32", compile_batch=X.shape[0])
    assert runner.backend == backend
    assert rel_err(runner(X), want) <= 1e-5
    assert rel_err(runner(X[:1]), want[:1]) <= 1e-5  # a short batch (padded for compile)


def test_bf16_agrees_with_fp32(trio):
    _, ours, want = trio
    with pytest.warns(UserWarning, match="no native bf16") if not _native_bf16() else contextlib.nullcontext():
        runner = make_runner(ours, "torch", "bf16")
    got = runner(X)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 0.1
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def _native_bf16() -> bool:
    from ecanfnet.backends import cpu_has_native_bf16
    return cpu_has_native_bf16()


@pytest.mark.parametrize("backend, precision, message", [
    ("torch", "fp16", "fp16 needs a CUDA device"),
    ("onnxruntime", "bf16", "runs fp32 only"),
    ("tensorrt", "fp32", "backend must be auto or one of"),
])
def test_impossible_combinations_are_clear_errors(trio, backend, precision, message):
    with pytest.raises(BackendError, match=message):
        make_runner(trio[1], backend, precision, device="cpu")


def test_onnx_export_is_cached_per_weights(trio):
    _, ours, _ = trio
    first = cached_onnx_export(ours)
    stamp = first.stat().st_mtime_ns
    assert cached_onnx_export(ours) == first and first.stat().st_mtime_ns == stamp
    other = build_model().eval()
    assert cached_onnx_export(other) != first


def test_exported_onnx_and_torchscript_reproduce_timm_logits(tmp_path, capsys, timm_hub_folder, trio):
    import onnxruntime as ort

    _, _, want = trio
    for kind, name in (("onnx", "m.onnx"), ("torchscript", "m.pt")):
        code = main(["export", kind, str(tmp_path / name), "--weights", str(timm_hub_folder), "--image-size", "96"])
        out = capsys.readouterr().out
        assert code == 0 and "(ok," in out, out
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"images": X.numpy()})
    assert rel_err(torch.from_numpy(onnx_logits), want) <= 1e-5
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        assert rel_err(scripted(X), want) <= 1e-5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt"]  # no temp files left


def test_predict_onnxruntime_gives_the_same_top5_as_torch(capsys, timm_hub_folder, photo_dir):
    tops = {}
    for backend in ("torch", "onnxruntime"):
        code = main(["predict", "--weights", str(timm_hub_folder), "--backend", backend, "--format", "json",
                     str(photo_dir)])
        rows = read_json_lines(capsys.readouterr().out)
        assert code == 0 and len(rows) == len(list(photo_dir.iterdir()))
        tops[backend] = [[p["index"] for p in r["predictions"]] for r in rows]
    assert tops["torch"] == tops["onnxruntime"]


def test_bench_json_lines_are_well_formed(capsys):
    code = main(["bench", "--backend", "torch", "onnxruntime", "--image-size", "64", "--batch-size", "2",
                 "--repeats", "2", "--warmup", "1", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0
    rows = read_json_lines(out)
    assert [(r["backend"], r["precision"]) for r in rows] == [("torch", "fp32"), ("onnxruntime", "fp32")]
    for row in rows:
        assert set(row) == {"backend", "precision", "batch_size", "image_size", "images_per_s",
                            "ms_per_batch_p50", "peak_rss_mb"}
        assert row["batch_size"] == 2 and row["image_size"] == 64
        assert row["images_per_s"] > 0 and row["ms_per_batch_p50"] > 0 and row["peak_rss_mb"] > 0
        assert np.isclose(row["images_per_s"], 2000 / row["ms_per_batch_p50"])
    assert "randomly initialised" in err


def test_onnxruntime_on_a_gpu_device_is_refused(trio):
    with pytest.raises(BackendError, match="runs on the CPU"):
        make_runner(trio[1], "onnxruntime", "fp32", device="cuda")
