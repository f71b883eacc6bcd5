"""Hostile checkpoints: config.json metadata, non-finite tensors and raw pickles are refused in one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hostile import (CHECKPOINT_REFUSAL_PEAK_MB, CHECKPOINT_REFUSAL_WALL_S, HOSTILE_CONFIG_FILE_IDS, HOSTILE_CONFIGS,
                     hostile_config_file, hostile_pickles, mutated_config, run_measured, write_hub_folder,
                     write_non_finite_weights)
from ecanfnet import WeightsError, create_model, resolve_weights, save_pretrained
from ecanfnet.metadata import MAX_IMAGE_SIDE, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_config(timm_hub_folder) -> dict:
    return json.loads((timm_hub_folder / "config.json").read_text())


@pytest.fixture(scope="module")
def weights(timm_hub_folder) -> Path:
    return timm_hub_folder / "model.safetensors"


@pytest.fixture(scope="module")
def nan_weights_folder(tmp_path_factory, timm_hub_folder, base_config) -> Path:
    """The timm checkpoint with one tensor, stages.2.3.conv2.weight, all NaN (written once)."""
    folder = tmp_path_factory.mktemp("nan_weights")
    write_non_finite_weights(folder / "model.safetensors", load_file(timm_hub_folder / "model.safetensors"),
                             "stages.2.3.conv2.weight")
    (folder / "config.json").write_text(json.dumps(base_config))
    return folder


def assert_one_line_naming(exc: BaseException, *words: str) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    for word in words:
        assert word in msg, msg
    assert "weights_only=False" not in msg and "Traceback" not in msg
    return msg


@pytest.mark.parametrize("name, field, patch", HOSTILE_CONFIGS, ids=[c[0] for c in HOSTILE_CONFIGS])
def test_hostile_config_is_refused_naming_the_field(tmp_path, base_config, weights, name, field, patch):
    folder = write_hub_folder(tmp_path / name, weights, mutated_config(base_config, patch))
    with pytest.raises(WeightsError) as info:
        create_model(pretrained=folder)
    assert_one_line_naming(info.value, f"config.json: {field} ")


@pytest.mark.parametrize("name", HOSTILE_CONFIG_FILE_IDS)
def test_broken_config_file_is_refused(tmp_path, weights, name):
    reason, data = hostile_config_file(name)
    folder = write_hub_folder(tmp_path / name, weights, data)
    with pytest.raises(WeightsError) as info:
        create_model(pretrained=folder)
    assert_one_line_naming(info.value, "config.json: ", reason)


def test_size_limit_is_stated(tmp_path, base_config, weights):
    folder = write_hub_folder(tmp_path, weights, mutated_config(base_config, {"pretrained_cfg.input_size": [3, 4096, 224]}))
    with pytest.raises(WeightsError, match=f"H and W integers from 16 to {MAX_IMAGE_SIDE}, got \\[3, 4096, 224\\]"):
        create_model(pretrained=folder)


def test_everything_timm_writes_is_accepted(tmp_path, timm_l0):
    """save_for_hf with label names and descriptions, plus timm's other layouts and optional fields."""
    from timm.models import save_for_hf

    names = [f"n{i:08d}" for i in range(1000)]
    descriptions = {n: f"class {i}" for i, n in enumerate(names)}
    save_for_hf(timm_l0, str(tmp_path), safe_serialization=True,
                model_config={"label_names": names, "label_descriptions": descriptions},
                data_config={"input_size": (3, 192, 256), "crop_pct": 0.95})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["label_names"] == names and "model_args" in config
    assert "test_input_size" not in config["pretrained_cfg"]  # timm: evaluate at input_size
    cfg = create_model(pretrained=tmp_path).pretrained_cfg
    assert cfg["label_names"] == names and cfg["label_descriptions"] == descriptions
    assert cfg["tag"] == "ra2_in1k"
    assert cfg["input_size"] == cfg["test_input_size"] == [3, 192, 256]
    assert cfg["crop_pct"] == cfg["test_crop_pct"] == 0.95


@pytest.mark.parametrize("patch, expect", [
    ({"architecture": "eca_nfnet_l0.ra2_in1k"}, {}),
    ({"pretrained_cfg.input_size": [3, 256, 320], "pretrained_cfg.test_input_size": [3, 320, 384]},
     {"input_size": [3, 256, 320], "test_input_size": [3, 320, 384]}),
    ({"pretrained_cfg.crop_mode": "squash", "pretrained_cfg.interpolation": "bilinear"},
     {"crop_mode": "squash", "interpolation": "bilinear"}),
    ({"pretrained_cfg.crop_mode": "border"}, {"crop_mode": "border"}),
    # timm leaves test_* out (or null) when testing like training: the model default (288) must not come back.
    ({"pretrained_cfg.input_size": [3, 64, 64], "pretrained_cfg.test_input_size": None,
      "pretrained_cfg.crop_pct": 0.875, "pretrained_cfg.test_crop_pct": None},
     {"test_input_size": [3, 64, 64], "test_crop_pct": 0.875}),
    ({"label_names": {str(i): f"c{i}" for i in range(0, 1000, 2)}}, {"label_names": [
        f"c{i}" if i % 2 == 0 else str(i) for i in range(1000)]}),
    # timm: one value stands for every channel; its "fast" pooling names are the same pooling
    ({"pretrained_cfg.mean": [0.5], "pretrained_cfg.std": [0.25]}, {"mean": [0.5] * 3, "std": [0.25] * 3}),
    ({"global_pool": "fast", "model_args": {"global_pool": "fastavg", "in_chans": 3}}, {}),
    ({"pretrained_cfg.pool_size": None, "pretrained_cfg.notes": ["x"], "pretrained_cfg.evil": {"a": [1] * 10},
      "extra_top_level": [[[]]], "model_args": {"in_chans": 3}}, {}),
])
def test_valid_variants_load_with_only_checked_values(tmp_path, base_config, weights, patch, expect):
    folder = write_hub_folder(tmp_path, weights, mutated_config(base_config, patch))
    cfg = create_model(pretrained=folder).pretrained_cfg
    for key, value in expect.items():
        assert cfg[key] == value
    assert "evil" not in cfg and "notes" not in cfg and "pool_size" in cfg
    known = {"input_size", "test_input_size", "interpolation", "crop_pct", "test_crop_pct", "crop_mode", "mean",
             "std", "num_classes", "pool_size", "first_conv", "classifier", "license", "tag", "fixed_input_size",
             "label_names", "label_descriptions", "min_input_size", "hf_hub_id", "url"}
    assert set(cfg) <= known


def test_legacy_flat_timm_config_is_read_and_checked(tmp_path, weights):
    flat = {"architecture": "eca_nfnet_l0", "num_classes": 1000, "input_size": [3, 96, 128], "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    cfg = create_model(pretrained=write_hub_folder(tmp_path / "ok", weights, flat)).pretrained_cfg
    assert cfg["test_input_size"] == [3, 96, 128] and cfg["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(WeightsError, match=r"config.json: input_size must be"):
        create_model(pretrained=write_hub_folder(tmp_path / "bad", weights, {**flat, "input_size": [3, 1e6, 1e6]}))


def test_save_pretrained_output_round_trips(tmp_path):
    model = create_model(pretrained=False, num_classes=3)
    model.pretrained_cfg = model.pretrained_cfg.replace(input_size=(3, 64, 80), test_input_size=(3, 64, 80), crop_mode="squash")
    back = create_model(pretrained=save_pretrained(model, tmp_path, label_names=["cat", "dog", "x\u202ey"]))
    assert back.pretrained_cfg["input_size"] == [3, 64, 80] and back.pretrained_cfg["crop_mode"] == "squash"
    assert back.pretrained_cfg["label_names"] == ["cat", "dog", "x\u202ey"]


def test_validate_config_directly():
    clean = validate_config({"architecture": "eca_nfnet_l1.tag", "num_classes": 2, "label_names": ["a", "b"],
                             "pretrained_cfg": {"crop_pct": 1, "evil": object()}}, "cfg.json", num_classes=2)
    assert clean == {"architecture": "eca_nfnet_l1", "num_classes": 2, "label_names": ["a", "b"],
                     "pretrained_cfg": {"crop_pct": 1.0, "test_crop_pct": 1.0}}
    with pytest.raises(WeightsError, match=r"^cfg.json: label_names has 2 entries but the classifier has 5 classes$"):
        validate_config({"label_names": ["a", "b"]}, "cfg.json", num_classes=5)


def test_non_finite_tensors_are_refused_naming_the_first(tmp_path, nan_weights_folder):
    with pytest.raises(WeightsError) as info:
        create_model(pretrained=nan_weights_folder)
    assert_one_line_naming(info.value, "model.safetensors: tensor 'stages.2.3.conv2.weight' holds NaN or infinite")
    for name, value in (("inf.safetensors", float("inf")), ("neg.pth", float("-inf"))):
        state = {"stem.conv1.weight": torch.zeros(2, 2), "stem.conv2.weight": torch.full((2,), value)}
        save_file(state, tmp_path / name) if name.endswith(".safetensors") else torch.save(state, tmp_path / name)
        with pytest.raises(WeightsError, match=f"{name}: tensor 'stem.conv2.weight' holds NaN or infinite"):
            resolve_weights(tmp_path / name)


def test_exotic_tensor_dtypes_are_refused(tmp_path, timm_l0):
    state = {k: v.contiguous() for k, v in timm_l0.state_dict().items()}
    state["stem.conv1.weight"] = state["stem.conv1.weight"].to(torch.float8_e4m3fn)
    save_file(state, tmp_path / "f8.safetensors")
    with pytest.raises(WeightsError, match=r"tensor 'stem.conv1.weight' is torch.float8_e4m3fn"):
        create_model(pretrained=tmp_path / "f8.safetensors")
    state["stem.conv1.weight"] = torch.ones(16, 3, 3, 3, dtype=torch.int64)
    save_file(state, tmp_path / "int.safetensors")
    with pytest.raises(WeightsError, match=r"not floating-point \(1\): stem.conv1.weight \(torch.int64\)"):
        create_model(pretrained=tmp_path / "int.safetensors")


def test_unexpected_key_names_are_escaped(tmp_path, timm_l0):
    state = {k: v.contiguous() for k, v in timm_l0.state_dict().items()}
    state["evil\x1b[2J\nkey"] = torch.zeros(1)
    save_file(state, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): 'evil\\x1b\[2J\\nkey'") as info:
        create_model(pretrained=tmp_path / "extra.safetensors")
    assert "\x1b" not in str(info.value)


def test_raw_pickles_are_refused_in_one_line_without_running(tmp_path):
    files = hostile_pickles(tmp_path)
    for name, path in files.items():
        with pytest.raises(WeightsError) as info:
            resolve_weights(path)
        msg = assert_one_line_naming(info.value, f"{path.name}: ")
        assert "refused to load" in msg or "not a readable PyTorch checkpoint" in msg, msg
        if "object" in name or "instance" in name:
            assert "hostile._Foreign" in msg or "copy_reg._reconstructor" in msg, msg
        if "runs_code" in name:
            assert "posix.system" in msg, msg
    assert not (tmp_path / "pwned").exists()


# --- the CLI and the server, in fresh processes ------------------------------------------------------


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "cat.jpg"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(path)
    return path


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ecanfnet", *args]


def cli_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}


def assert_cli_refuses(proc, wall_s: float, peak_mb: float, *words: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ecanfnet: error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert proc.stdout == ""
    assert wall_s < CHECKPOINT_REFUSAL_WALL_S and peak_mb < CHECKPOINT_REFUSAL_PEAK_MB, (wall_s, peak_mb)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["test_input_size_huge", "nan_weights", "deep_nesting"])
def test_predict_refuses_hostile_checkpoint_in_one_line_within_bounds(tmp_path, base_config, weights,
                                                                       nan_weights_folder, jpeg, case):
    if case == "nan_weights":
        folder, words = nan_weights_folder, ("stages.2.3.conv2.weight", "NaN")
    elif case == "deep_nesting":
        folder, words = write_hub_folder(tmp_path, weights, hostile_config_file(case)[1]), ("config.json", "nested")
    else:
        patch = next(c[2] for c in HOSTILE_CONFIGS if c[0] == case)
        folder = write_hub_folder(tmp_path, weights, mutated_config(base_config, patch))
        words = ("config.json: pretrained_cfg.test_input_size must be", "100000")
    proc, wall, peak = run_measured(cli("predict", "--weights", str(folder), str(jpeg)), env=cli_env(), timeout=120)
    assert_cli_refuses(proc, wall, peak, *words)


@pytest.mark.slow
def test_serve_refuses_hostile_checkpoint_at_start(tmp_path, base_config, weights):
    pytest.importorskip("uvicorn")
    folder = write_hub_folder(tmp_path, weights, mutated_config(base_config, {"pretrained_cfg.crop_pct": 1e-9}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    proc, wall, peak = run_measured(cli("serve", "--weights", str(folder), "--port", str(port)), env=cli_env(),
                                    timeout=120)
    assert_cli_refuses(proc, wall, peak, "config.json: pretrained_cfg.crop_pct must be")
    assert "serving" not in proc.stderr and time.monotonic() - start < CHECKPOINT_REFUSAL_WALL_S
    with socket.socket() as s:  # nothing was left listening
        assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_raw_pickle_is_refused_by_the_cli_in_one_line(tmp_path, jpeg):
    path = hostile_pickles(tmp_path)["pickle_p5_object"]
    proc = subprocess.run(cli("predict", "--weights", str(path), str(jpeg)), env=cli_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused to load" in lines[0] and "hostile._Foreign" in lines[0], proc.stderr
    assert "weights_only" not in proc.stderr
