"""INT8: `ecanfnet quantize` writes a folder that every running command loads; its report; the guard; hostile folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ecanfnet.testing import photo_arrays, random_crop
from helpers import one_error_line, read_json_lines
from PIL import Image

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from ecanfnet.cli import main  # noqa: E402
from ecanfnet.errors import WeightsError  # noqa: E402
from ecanfnet.quantize import QuantizeRefused, load_int8_folder, quantize_folder  # noqa: E402
from ecanfnet.factory import create_model  # noqa: E402

pytestmark = pytest.mark.slow  # processes, servers or training runs: `pytest -m "not slow"` skips them


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory) -> Path:
    """16 JPEG crops of the real photos and one corrupt file."""
    folder = tmp_path_factory.mktemp("calibration")
    rng = np.random.default_rng(0)
    photos = list(photo_arrays().values())
    for i in range(16):
        Image.fromarray(random_crop(photos[i % len(photos)], rng, 0.7)).save(folder / f"crop{i:02d}.jpg", quality=90)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return folder


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, timm_hub_folder, calibration_dir):
    """`ecanfnet quantize` of the randomised timm checkpoint: (folder, report, stderr)."""
    out = tmp_path_factory.mktemp("int8") / "model-int8"
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["quantize", "--weights", str(timm_hub_folder), "--calibration", str(calibration_dir),
                     "--output", str(out), "--format", "json", "--no-progress"])
    assert code == 0, stderr.getvalue()
    return out, json.loads(stdout.getvalue()), stderr.getvalue()


def test_quantize_reports_agreement_and_names_the_corrupt_image(int8_run):
    out, report, err = int8_run
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "head.safetensors", "quantization.json",
                                                     "trunk.bin", "trunk.xml"]
    assert json.loads((out / "quantization.json").read_text()) == report
    # 16 readable images: a quarter held out, the rest calibrate; the corrupt one skipped and named
    assert report["held_out"]["images"] == 4 and report["calibration"]["images"] == 12
    assert [Path(s["path"]).name for s in report["calibration"]["skipped"]] == ["broken.jpg"]
    assert "broken.jpg" in err
    held = report["held_out"]
    assert 0.0 <= held["top5_agreement"] <= 1.0 and held["top1_agreement"] >= 0.9  # the default guard passed
    assert 0 < held["logit_mean_abs_error"] <= held["logit_max_abs_error"]
    assert report["accepted"] and not report["forced"]


def test_int8_logits_follow_the_fp32_network(int8_run, timm_l0, photo_dir):
    """The INT8 model, loaded from disk, against timm's fp32 model on the real photos."""
    from ecanfnet.transforms import eval_transform, load_image

    model = load_int8_folder(int8_run[0])
    transform = eval_transform(model.pretrained_cfg)
    x = torch.stack([transform(load_image(p)) for p in sorted(photo_dir.iterdir())])
    with torch.no_grad():
        want = timm_l0(x)
        got = model(x)
    # Every weight N(0, 1) makes a network far harder to quantize than a trained one (measured here: cosine
    # 0.974..0.999, top-1 5 of 6, max error 23 % of the largest logit); a wrong trunk or head gives cosine ~0.
    assert got.shape == want.shape == (6, 1000)
    assert float((got - want).abs().max() / want.abs().max()) < 0.5
    assert (got.argmax(1) == want.argmax(1)).sum() >= 4
    assert torch.cosine_similarity(got, want).min() > 0.95


def test_predict_evaluate_embed_and_bench_take_the_int8_folder(run_cli, int8_run, photo_dir, tmp_path):
    out = str(int8_run[0])
    code, stdout, err = run_cli("predict", "--weights", out, "--format", "json", "--no-progress", str(photo_dir))
    rows = read_json_lines(stdout)
    assert code == 0 and len(rows) == 6 and all(len(r["predictions"]) == 5 for r in rows), err

    labelled = tmp_path / "val"
    for row in rows:  # each photo filed under the class INT8 predicts for it: top-1 must then be 100 %
        (labelled / str(row["predictions"][0]["index"])).mkdir(parents=True, exist_ok=True)
        shutil.copy(row["path"], labelled / str(row["predictions"][0]["index"]))
    code, stdout, err = run_cli("evaluate", "--weights", out, "--data", str(labelled), "--format", "json",
                                "--no-progress")
    assert code == 0 and json.loads(stdout)["top1"] == 1.0 and json.loads(stdout)["images"] == 6, err

    code, _, err = run_cli("embed", "--weights", out, str(photo_dir), "--output", str(tmp_path / "e.npy"),
                           "--no-progress")
    vectors = np.load(tmp_path / "e.npy")
    assert code == 0 and vectors.shape == (6, 2304) and np.isfinite(vectors).all(), err
    code, stdout, err = run_cli("search", str(tmp_path / "e.npy"), "--query", str(next(photo_dir.iterdir())),
                                "-k", "1", "--format", "json")
    assert code == 0 and read_json_lines(stdout)[0]["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-4), err

    code, stdout, err = run_cli("bench", "--weights", out, "--repeats", "1", "--warmup", "0", "--format", "json")
    (row,) = read_json_lines(stdout)
    assert code == 0 and (row["backend"], row["precision"]) == ("openvino", "int8") and "note" not in row, err


def test_serve_takes_the_int8_folder(int8_run, photo_dir):
    from ecanfnet.testing import ServeProcess

    server = ServeProcess(int8_run[0])
    try:
        info = server.client.get("/v1/model").json()
        assert (info["backend"], info["precision"]) == ("openvino", "int8")
        body = server.client.post("/v1/classify", content=(photo_dir / "astronaut.jpg").read_bytes()).json()
        assert len(body["predictions"]) == 5
        emb = server.client.post("/v1/embed", content=(photo_dir / "astronaut.jpg").read_bytes()).json()
        assert len(emb["embedding"]) == 2304
    finally:
        server.stop()


def test_bench_int8_on_a_float_checkpoint_says_speed_only(run_cli, tmp_path):
    from hostile import small_model_folder

    folder = small_model_folder(tmp_path / "small", 3, size=64)
    code, stdout, err = run_cli("bench", "--weights", str(folder), "--precision", "int8", "--image-size", "64",
                                "--repeats", "1", "--warmup", "0")
    assert code == 0, err
    assert "openvino" in stdout and "int8" in stdout and "calibrated on random input: speed only" in stdout


def test_empty_or_missing_calibration_folder_is_one_line(run_cli, tmp_path, timm_hub_folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    for folder, says in ((tmp_path / "empty", "no image files"), (tmp_path / "nowhere", "no such folder")):
        code, _, err = run_cli("quantize", "--weights", str(timm_hub_folder), "--calibration", str(folder),
                               "--output", str(tmp_path / "out"))
        assert code == 1 and says in one_error_line(err) and str(folder) in err
        assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_an_int8_model_is_not_replaced(run_cli, tmp_path, timm_hub_folder, calibration_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    code, _, err = run_cli("quantize", "--weights", str(timm_hub_folder), "--calibration",
                           str(calibration_dir), "--output", str(mine))
    assert code == 1 and "not replacing it" in one_error_line(err)
    assert (mine / "thesis.txt").read_text() == "precious" and len(list(mine.iterdir())) == 1


def test_the_guard_refuses_and_writes_nothing_unless_forced(tmp_path, calibration_dir, monkeypatch):
    from hostile import small_model_folder

    import ecanfnet.quantize as q

    folder = small_model_folder(tmp_path / "small", 3, size=64)
    real = q.compare_logits
    monkeypatch.setattr(q, "compare_logits", lambda a, b: real(a, b) | {"top1_agreement": 0.5})
    with pytest.raises(QuantizeRefused) as refused:
        quantize_folder(folder, calibration_dir, tmp_path / "out", min_agreement=0.9)
    assert "50.0%" in str(refused.value) and refused.value.report["accepted"] is False
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    report = quantize_folder(folder, calibration_dir, tmp_path / "out", min_agreement=0.9, force=True)
    assert report["forced"] and load_int8_folder(tmp_path / "out").num_classes == 3
    # an earlier INT8 folder is replaced whole
    quantize_folder(folder, calibration_dir, tmp_path / "out", min_agreement=0.0, seed=1)
    assert json.loads((tmp_path / "out" / "quantization.json").read_text())["calibration"]["seed"] == 1


def test_val_reports_top1_of_both_and_max_drop_uses_accuracy_control(tmp_path, calibration_dir):
    from hostile import small_model_folder

    folder = small_model_folder(tmp_path / "small", 3, ["cat", "dog", "fish"], size=64)
    val = tmp_path / "val"
    for i, path in enumerate(sorted(calibration_dir.glob("*.jpg"))[:9]):
        (val / ["cat", "dog", "fish"][i % 3]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, val / ["cat", "dog", "fish"][i % 3])
    report = quantize_folder(folder, calibration_dir, tmp_path / "out", val=val, max_drop=100.0, min_agreement=0.0)
    assert report["method"] == "accuracy-control"
    v = report["validation"]
    assert v["images"] == 8 and 0 <= v["top1_fp32"] <= 1 and 0 <= v["top1_int8"] <= 1  # broken.jpg is skipped
    assert v["drop_points"] == pytest.approx(100 * (v["top1_fp32"] - v["top1_int8"]), abs=0.01)


def test_training_exporting_and_dense_refuse_an_int8_folder(int8_run):
    for kwargs in ({}, {"features_only": True}, {"num_classes": 5, "int8_ok": True}):
        with pytest.raises(WeightsError, match="INT8"):
            create_model(pretrained=int8_run[0], **kwargs)


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _reseal(folder: Path) -> None:
    from ecanfnet.backends import ir_sha256

    config = json.loads((folder / "config.json").read_text())
    config["quantization"]["trunk_sha256"] = ir_sha256(folder / "trunk.xml")
    (folder / "config.json").write_text(json.dumps(config))


def _tiny_ir(folder: Path, width: int) -> None:
    """A valid OpenVINO IR whose output is (B, width): a model, but not an ecanfnet trunk of that width."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter(ov.PartialShape([-1, 3, -1, -1]), ov.Type.f32)
    pooled = ops.reduce_mean(x, ops.constant(np.array([2, 3])), keep_dims=False)
    out = ops.tile(pooled, ops.constant(np.array([1, width // 3])))
    ov.save_model(ov.Model([out], [x]), str(folder / "trunk.xml"))


HOSTILE = {
    "damaged trunk.bin": (lambda f: f.joinpath("trunk.bin").write_bytes(f.joinpath("trunk.bin").read_bytes()[:-100]),
                          "checksum"),
    "trunk.bin missing": (lambda f: f.joinpath("trunk.bin").unlink(), "trunk.bin"),
    "garbage xml, resealed": (lambda f: (f.joinpath("trunk.xml").write_text("<net><layers><layer"), _reseal(f)),
                              "OpenVINO cannot read"),
    "another network, resealed": (lambda f: (_tiny_ir(f, 9), _reseal(f)), "features (B, 2304)"),
    "no quantization section": (lambda f: _edit_config(f, lambda c: c.pop("quantization")), "quantization.format"),
    "checksum not hex": (lambda f: _edit_config(f, lambda c: c["quantization"].update(trunk_sha256="../" * 21 + "x")),
                         "64 lowercase hex"),
    "num_features huge": (lambda f: _edit_config(f, lambda c: c.update(num_features=10 ** 12)), "num_features"),
    "input size absurd": (lambda f: _edit_config(f, lambda c: c["pretrained_cfg"].update(test_input_size=[3, 10 ** 6, 10 ** 6])),
                          "test_input_size"),
    "head of another width": (lambda f: _edit_config(f, lambda c: c.update(num_classes=7)), "head.fc.weight (7, 2304)"),
    "head with an extra tensor": (lambda f: _rewrite_head(f), "head.fc.weight"),
}


def _edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def _rewrite_head(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "head.safetensors")
    save_file({**state, "stages.0.0.conv1.weight": torch.zeros(2, 2)}, str(folder / "head.safetensors"))


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_int8_folder_is_one_clear_line(run_cli, tmp_path, int8_run, photo_dir, case):
    damage, says = HOSTILE[case]
    folder = _copy(int8_run[0], tmp_path / "int8")
    damage(folder)
    code, _, err = run_cli("predict", "--weights", str(folder), str(photo_dir / "astronaut.jpg"))
    line = one_error_line(err)
    assert code == 1 and says in line, line


SIGNAL_AFTER_QUANTIZE = """
import subprocess, sys, time
from ecanfnet.cli import main
weights, calibration, out, data = sys.argv[1:5]
assert main(["quantize", "--weights", weights, "--calibration", calibration, "--output", out, "--min-agreement", "0",
             "--no-progress", "--samples", "4", "--holdout", "2"]) == 0
assert main(["evaluate", "--weights", weights, "--data", data, "--workers", "2", "--no-progress"]) == 0
subprocess.run([sys.executable, "-c", "pass"], check=True)  # its SIGCHLD reaches the DataLoader's Python handler
time.sleep(1)
print("alive")
"""


def test_signals_after_quantizing_in_process_do_not_crash(tmp_path, calibration_dir):
    """OpenVINO Cores destroyed out of order used to leave a freed signal stack installed: the next signal with a
    Python handler killed the process with SIGSEGV (exit 139). One Core per process (backends.openvino_core)."""
    import os
    import subprocess
    import sys

    from hostile import small_model_folder

    folder = small_model_folder(tmp_path / "small", 3, ["cat", "dog", "fish"], size=64)
    for i, path in enumerate(sorted(calibration_dir.glob("crop0*.jpg"))[:6]):
        (tmp_path / "data" / ["cat", "dog", "fish"][i % 3]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "data" / ["cat", "dog", "fish"][i % 3])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-c", SIGNAL_AFTER_QUANTIZE, str(folder), str(calibration_dir),
                           str(tmp_path / "int8"), str(tmp_path / "data")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("alive"), done.stderr[-2000:]
