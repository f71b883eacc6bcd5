"""The folded inference form and every backend against the unfolded model and timm; exports; bench."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch

from helpers import read_json_lines
from ecanfnet import build_model
from ecanfnet import backends
from ecanfnet.backends import (BackendError, cached_onnx_export, cpu_has_native_bf16, make_runner,
                               onnxruntime_available, openvino_available, resolve_backend)
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


needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino not installed")


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", pytest.param("compile", marks=pytest.mark.slow), "openvino"])
def test_fp32_backends_equal_timm(trio, backend):
    if backend == "onnxruntime" and not onnxruntime_available():
        pytest.skip("onnxruntime not installed")
    if backend == "openvino" and not openvino_available():
        pytest.skip("openvino not installed")
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
    return cpu_has_native_bf16()


@needs_openvino
def test_openvino_f32_is_exact_at_other_sizes(trio):
    """One runner, dynamic batch and size: a square size after the non-square X; f32 despite a bf16-capable CPU."""
    ref, ours, want = trio
    runner = make_runner(ours, "openvino", "fp32")
    y = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        want_y = ref(y)
    assert rel_err(runner(y), want_y) <= 1e-5
    assert rel_err(runner(X), want) <= 1e-5


@needs_openvino
def test_openvino_static_batch_pads_and_falls_back_exactly(trio, monkeypatch):
    """compile_batch=3: compiled once for (3, 3, 160, 136); batches of 1..3 padded to it (rows kept apart),
    a batch of 5 and another image size run on the dynamic model; every row equals timm's."""
    ref, ours, _ = trio
    compiled = []
    real = backends._compile_checked
    monkeypatch.setattr(backends, "_compile_checked",
                        lambda model, want: compiled.append(str(model.inputs[0].get_partial_shape()))
                        or real(model, want))
    runner = make_runner(ours, "openvino", "fp32", compile_batch=3)
    assert compiled == []  # compiled at the first call, for its image size
    x = torch.randn(5, 3, 160, 136, generator=torch.Generator().manual_seed(13))
    y = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        want_x, want_y = ref(x), ref(y)
    for rows in (slice(0, 3), slice(3, 4), slice(0, 5), slice(1, 3)):
        assert rel_err(runner(x[rows]), want_x[rows]) <= 1e-5
    assert rel_err(runner(y), want_y) <= 1e-5
    assert compiled == ["[3,3,160,136]", "[?,3,?,?]"]  # one static model, one dynamic, each compiled once


@needs_openvino
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (avx512_bf16/amx)")
def test_openvino_bf16_agrees_with_fp32(trio):
    _, ours, want = trio
    runner = make_runner(ours, "openvino", "bf16")
    got = runner(X)
    assert got.dtype == torch.float32 and runner.precision == "bf16"
    err = rel_err(got, want)
    assert 1e-5 < err < 0.1  # really bf16 (f32 would be within 1e-5), yet close
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@needs_openvino
def test_openvino_bf16_is_refused_without_native_bf16(trio, monkeypatch):
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(BackendError, match="only on CPUs with native bf16"):
        make_runner(trio[1], "openvino", "bf16", device="cpu")


def test_auto_picks_an_exact_backend(trio, monkeypatch):
    _, ours, want = trio
    runner = make_runner(ours, "auto")
    assert runner.precision == "fp32" and runner.backend in ("openvino", "onnxruntime", "torch")
    assert rel_err(runner(X), want) <= 1e-5
    cpu = torch.device("cpu")
    installed = {"openvino": True, "onnxruntime": True}
    monkeypatch.setattr(backends, "openvino_available", lambda: installed["openvino"])
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: installed["onnxruntime"])
    assert resolve_backend("auto", cpu) == "openvino"
    installed["openvino"] = False
    assert resolve_backend("auto", cpu) == "onnxruntime"
    installed["onnxruntime"] = False
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("auto", torch.device("cuda")) == "torch"


@pytest.mark.slow
@needs_openvino
def test_openvino_ir_is_cached_and_a_damaged_one_rebuilt(trio, tmp_path, monkeypatch, caplog):
    _, ours, want = trio
    monkeypatch.setenv("ECANFNET_CACHE", str(tmp_path))
    conversions, converted = [], backends.convert_openvino(ours)  # converted once, counted on every call
    monkeypatch.setattr(backends, "convert_openvino", lambda model, **kw: conversions.append(1) or converted)
    make_runner(ours, "openvino", "fp32")
    xml = backends.openvino_cache_path(ours)
    files = [xml, xml.with_suffix(".bin"), xml.with_suffix(".sha256")]
    stamps = [f.stat().st_ino for f in files]  # a rewrite renames a new file into place: a new inode
    entry = sorted([f.name for f in files] + [xml.with_suffix(".lock").name])  # + the cross-process lock file
    assert conversions == [1] and sorted(p.name for p in xml.parent.iterdir()) == entry
    assert all(f.stat().st_mode & 0o777 == 0o666 & ~_umask() for f in files)
    assert rel_err(make_runner(ours, "openvino", "fp32")(X), want) <= 1e-5
    assert conversions == [1] and [f.stat().st_ino for f in files] == stamps  # reused, not rewritten
    with open(files[1], "r+b") as f:  # a damaged weights file: the checksum no longer matches
        f.truncate(files[1].stat().st_size // 2)
    with caplog.at_level("WARNING", logger="ecanfnet"):
        assert rel_err(make_runner(ours, "openvino", "fp32")(X), want) <= 1e-5
    assert conversions == [1, 1] and "does not match its checksum" in caplog.text
    xml.write_text("<net>damaged")  # unreadable, even with a checksum that matches
    files[2].write_text(backends.ir_sha256(xml) + "\n")
    caplog.clear()
    with caplog.at_level("WARNING", logger="ecanfnet"):
        assert rel_err(make_runner(ours, "openvino", "fp32")(X), want) <= 1e-5
    assert conversions == [1, 1, 1] and "cannot be read" in caplog.text
    files[2].write_bytes(b"\xff\xfe\x00 not a digest")  # a seal that is not even text
    assert rel_err(make_runner(ours, "openvino", "fp32")(X), want) <= 1e-5
    assert conversions == [1, 1, 1, 1]
    assert sorted(p.name for p in xml.parent.iterdir()) == entry  # no temp files left


@pytest.mark.slow
@needs_openvino
def test_openvino_runs_uncached_where_the_cache_cannot_be_written(trio, tmp_path, monkeypatch, caplog):
    _, ours, want = trio
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("ECANFNET_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("WARNING", logger="ecanfnet"):
        runner = make_runner(ours, "openvino", "fp32")
    assert rel_err(runner(X), want) <= 1e-5
    assert "cannot cache the OpenVINO model" in caplog.text and "cannot be read" not in caplog.text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("backend, precision, message", [
    ("torch", "fp16", "fp16 needs a CUDA device"),
    ("onnxruntime", "bf16", "runs fp32 only"),
    ("tensorrt", "fp32", "backend must be auto or one of"),
    ("openvino", "fp16", "fp16 needs a CUDA device"),  # the device is the reason, whichever CPU backend auto picked
    ("onnxruntime", "fp16", "fp16 needs a CUDA device"),
])
def test_impossible_combinations_are_clear_errors(trio, backend, precision, message):
    if backend == "openvino" and not openvino_available():
        pytest.skip("openvino not installed")
    with pytest.raises(BackendError, match=message):
        make_runner(trio[1], backend, precision, device="cpu")


def test_onnx_export_is_cached_per_weights(trio):
    _, ours, _ = trio
    first = cached_onnx_export(ours)
    inode = first.stat().st_ino
    assert cached_onnx_export(ours) == first and first.stat().st_ino == inode  # reused, not rewritten
    other = build_model().eval()
    assert cached_onnx_export(other) != first


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
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


@pytest.mark.slow
def test_bench_json_lines_are_well_formed(capsys):
    code = main(["bench", "--backend", "torch", "onnxruntime", "openvino", "--image-size", "64", "--batch-size", "2",
                 "--repeats", "2", "--warmup", "1", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0
    rows = read_json_lines(out)
    assert [(r["backend"], r["precision"]) for r in rows] == [("torch", "fp32"), ("onnxruntime", "fp32"),
                                                              ("openvino", "fp32")]
    for row in rows:
        assert set(row) == {"backend", "precision", "batch_size", "image_size", "images_per_s",
                            "ms_per_batch_p50", "peak_rss_mb"}
        assert row["batch_size"] == 2 and row["image_size"] == 64
        assert row["images_per_s"] > 0 and row["ms_per_batch_p50"] > 0 and row["peak_rss_mb"] > 0
        assert np.isclose(row["images_per_s"], 2000 / row["ms_per_batch_p50"])
    assert "randomly initialised" in err


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_cpu_only_backends_on_a_gpu_device_are_refused(trio, backend):
    if not (onnxruntime_available() if backend == "onnxruntime" else openvino_available()):
        pytest.skip(f"{backend} not installed")
    with pytest.raises(BackendError, match="runs on the CPU"):
        make_runner(trio[1], backend, "fp32", device="cuda")


@pytest.mark.parametrize("native_bf16", [True, False])
def test_fastest_precision_is_bf16_only_where_native(monkeypatch, native_bf16):
    monkeypatch.setattr(backends, "cpu_has_native_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    for backend in ("torch", "compile", "openvino"):
        assert backends.fastest_precision(backend, cpu) == ("bf16" if native_bf16 else "fp32")
    assert backends.fastest_precision("onnxruntime", cpu) == "fp32"  # it runs fp32 only
    assert backends.fastest_precision("torch", torch.device("cuda")) == "bf16"
    ours = build_model("eca_nfnet_l0", 3).eval()
    assert make_runner(ours, "torch", "fastest").precision == ("bf16" if native_bf16 else "fp32")
