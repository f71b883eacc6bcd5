"""`ecanfnet predict` end to end: timm parity on real photos, hub cache, bad files, output, exit codes."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import card_timm_transform, huge_png_header, lay_out_hub_cache, read_json_lines

ROOT = Path(__file__).resolve().parents[2]


def timm_top5(model, path: Path) -> list[int]:
    x = card_timm_transform()(Image.open(path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return model(x).softmax(-1)[0].topk(5).indices.tolist()


def run_subprocess(*args: str, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "ecanfnet", *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_predict_json_gives_timm_top5_on_real_photos(run_cli, timm_l0, timm_hub_folder, photo_dir):
    code, out, err = run_cli("predict", "--weights", str(timm_hub_folder), "--format", "json",
                             "--batch-size", "4", str(photo_dir))
    assert code == 0, err
    rows = read_json_lines(out)
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in photo_dir.iterdir())
    from ecanfnet import imagenet_labels
    labels = imagenet_labels()
    tops = []
    for row in rows:
        preds = row["predictions"]
        assert [p["index"] for p in preds] == timm_top5(timm_l0, Path(row["path"])), row["path"]
        scores = [p["score"] for p in preds]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
        assert all(p["label"] == labels[p["index"]] for p in preds)
        tops.append(preds[0]["index"])
    assert labels[281] == "tabby, tabby cat"


@pytest.mark.slow
def test_hf_hub_source_resolves_from_an_offline_cache(tmp_path, timm_l0, timm_hub_folder, photo_dir):
    lay_out_hub_cache(tmp_path / "hf", "timm/eca_nfnet_l0",
                      {n: timm_hub_folder / n for n in ("config.json", "model.safetensors")})
    photo = photo_dir / "chelsea.png" if (photo_dir / "chelsea.png").exists() else photo_dir / "chelsea.jpg"
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    for weights in ([], ["--weights", "hf_hub:timm/eca_nfnet_l0"], ["--weights", "hf-hub:timm/eca_nfnet_l0"]):
        proc = run_subprocess("predict", *weights, "--format", "json", str(photo), env=env)
        assert proc.returncode == 0, proc.stderr
        (row,) = read_json_lines(proc.stdout)
        assert [p["index"] for p in row["predictions"]] == timm_top5(timm_l0, photo)


@pytest.mark.slow
def test_hub_cache_with_only_pytorch_model_bin(tmp_path, timm_l0, photo_dir):
    torch.save(timm_l0.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "eca_nfnet_l0", "num_classes": 1000}))
    lay_out_hub_cache(tmp_path / "hf", "someone/nfnet", {n: tmp_path / n for n in ("config.json", "pytorch_model.bin")})
    code = ("import json,sys; from ecanfnet import resolve_weights; c = resolve_weights('hf-hub:someone/nfnet'); "
            "print(json.dumps([len(c.state_dict), c.architecture]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [185, "eca_nfnet_l0"]


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline-flag", "unreachable-endpoint"])
def test_no_network_without_cache_explains_how_to_get_weights(tmp_path, photo_dir, env):
    env = {**env, "HF_HOME": str(tmp_path / "empty_hf")}
    proc = run_subprocess("predict", str(photo_dir), env=env, timeout=60)  # no retry loop: fails at once
    assert proc.returncode == 1
    assert "cannot get timm/eca_nfnet_l0" in proc.stderr and "not in the cache" in proc.stderr
    assert "--weights PATH" in proc.stderr and "hf download timm/eca_nfnet_l0" in proc.stderr
    assert proc.stdout == ""


def make_bad_inputs(folder: Path, photo: np.ndarray) -> dict[str, str | None]:
    """Write the issue's awkward files; value is the expected error fragment, None if it must predict."""
    folder.mkdir()
    (folder / "a_empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=90)
    (folder / "b_truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    (folder / "c_text.jpg").write_text("not really a picture\n")
    Image.fromarray(photo[:1, :1]).save(folder / "d_one_pixel.png")
    (folder / "e_huge_header.png").write_bytes(huge_png_header(200_000, 200_000))
    Image.fromarray((photo[..., 0].astype(np.uint16) * 257)).save(folder / "f_sixteen_bit.png")
    Image.fromarray(photo).convert("CMYK").save(folder / "g_cmyk.jpg")
    pal = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE)
    pal.save(folder / "h_palette_transparent.png", transparency=0)
    Image.fromarray(photo).save(folder / "i_good.jpg")
    return {"a_empty.jpg": "empty file", "b_truncated.jpg": "truncated or corrupt",
            "c_text.jpg": "not an image", "d_one_pixel.png": None,
            "e_huge_header.png": "bomb", "f_sixteen_bit.png": None, "g_cmyk.jpg": None,
            "h_palette_transparent.png": None, "i_good.jpg": None}


def test_bad_inputs_are_reported_per_file_and_the_batch_goes_on(run_cli, tmp_path, timm_hub_folder):
    from skimage import data

    expected = make_bad_inputs(tmp_path / "mixed", data.chelsea())
    code, out, err = run_cli("predict", "--weights", str(timm_hub_folder), "--format", "json",
                             "--batch-size", "2", str(tmp_path / "mixed"))
    assert code == 1
    rows = {Path(r["path"]).name: r for r in read_json_lines(out)}
    assert sorted(rows) == sorted(expected)
    for name, fragment in expected.items():
        if fragment is None:
            assert len(rows[name]["predictions"]) == 5, rows[name]
        else:
            assert name in rows[name]["error"] and fragment in rows[name]["error"], rows[name]
    assert "4 of 9 inputs failed" in err


def test_all_good_exits_zero_and_table_is_readable(run_cli, timm_hub_folder, photo_dir):
    code, out, err = run_cli("predict", "--weights", str(timm_hub_folder), "--top-k", "3",
                             str(photo_dir / "*.png"))
    assert code == 0, err
    blocks = out.strip().split("\n")
    pngs = sorted(photo_dir.glob("*.png"))
    assert blocks[0] == str(pngs[0])
    assert blocks[1].lstrip().startswith("label: ") and "(open-set score " in blocks[1]
    assert blocks[2].lstrip().startswith("1.") and "%" in blocks[2] and "[" in blocks[2]
    assert len(blocks) == 5 * len(pngs)


def test_missing_paths_fail_with_exit_1(run_cli, timm_hub_folder, tmp_path):
    code, out, err = run_cli("predict", "--weights", str(timm_hub_folder), "--format", "json",
                             str(tmp_path / "absent.jpg"), str(tmp_path / "*.nothing"))
    assert code == 1
    errors = [r["error"] for r in read_json_lines(out)]
    assert "absent.jpg: no such file or folder" in errors[0] and "no file matches" in errors[1]


def test_progress_bar_on_stderr_for_many_images(run_cli, tmp_path, timm_hub_folder, photo_dir):
    many = tmp_path / "many"
    many.mkdir()
    src = next(photo_dir.glob("*.jpg"))
    for i in range(12):
        shutil.copy(src, many / f"copy_{i:02d}.jpg")
    code, out, err = run_cli("predict", "--weights", str(timm_hub_folder), "--format", "json",
                             "--batch-size", "5", str(many))
    assert code == 0
    assert len(read_json_lines(out)) == 12
    assert "12/12" in err and "img" in err


def test_checkpoint_label_names_are_used(run_cli, tmp_path, timm_hub_folder, photo_dir):
    import warnings

    from ecanfnet import create_model, save_pretrained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = create_model(pretrained=timm_hub_folder, num_classes=3)
    save_pretrained(model, tmp_path / "three", label_names=["cat", "cup", "rocket"])
    code, out, _ = run_cli("predict", "--weights", str(tmp_path / "three"), "--format", "json",
                           str(next(photo_dir.glob("*.jpg"))))
    assert code == 0
    (row,) = read_json_lines(out)
    assert sorted(p["label"] for p in row["predictions"]) == ["cat", "cup", "rocket"]


def test_predict_progress_off_a_terminal_is_a_few_plain_lines(run_cli, tmp_path):
    from hostile import small_model_folder, write_pngs

    model = small_model_folder(tmp_path / "model")
    write_pngs(tmp_path / "imgs", 30)
    code, out, err = run_cli("predict", "--weights", str(model), "--format", "json", "--batch-size", "4",
                             "--backend", "torch", str(tmp_path / "imgs"))
    assert code == 0, err
    assert len(read_json_lines(out)) == 30
    assert "\r" not in err and 1 <= len(err.splitlines()) <= 15, err
    assert err.splitlines()[-1].startswith("predict: 30/30 img (100%)")


def test_labels_and_file_names_cannot_drive_the_terminal(run_cli, raw_control, tmp_path):
    from hostile import TERMINAL_ATTACK_LABELS, TERMINAL_ATTACK_NAME, small_model_folder, write_pngs

    model = small_model_folder(tmp_path / "model", label_names=TERMINAL_ATTACK_LABELS)
    (good,) = write_pngs(tmp_path / "imgs", 1, names=[TERMINAL_ATTACK_NAME])
    bad = tmp_path / "imgs" / "bad\x1b]0;x\x07.png"
    bad.write_bytes(b"not a png")
    code, out, err = run_cli("predict", "--weights", str(model), "--top-k", "3", str(good), str(bad))
    assert code == 1
    assert not any(raw_control(c) for c in out + err), repr(out + err)
    headers = [line for line in out.splitlines() if not line.startswith("    ")]
    assert headers == [str(good).replace("\x1b", "\\x1b").replace("\n", "\\x0a").replace("\u202e", "\\u202e"),
                       str(bad).replace("\x1b", "\\x1b").replace("\x07", "\\x07")]
    assert "\\x1b]0;pwned\\x07" in out and "\\x1b[2J" in out and "a\\x9b31mb\\x7f\\u202e" in out

    code, out, err = run_cli("predict", "--weights", str(model), "--top-k", "3", "--format", "json", str(good))
    assert code == 0 and not any(raw_control(c) for c in out)
    (row,) = read_json_lines(out)
    assert row["path"] == str(good) and sorted(p["label"] for p in row["predictions"]) == sorted(TERMINAL_ATTACK_LABELS)


def test_fast_switch_means_fast_decode_and_the_quickest_precision(run_cli, tmp_path, monkeypatch, photo_dir):
    """--fast reaches the library as decode="fast" and precision "fastest"; an explicit --precision wins."""
    import ecanfnet.inference as inference
    from hostile import small_model_folder

    folder = small_model_folder(tmp_path / "small", 3, size=64)
    seen = []
    real_runner, real_batches = inference.make_runner, inference.decoded_batches
    monkeypatch.setattr(inference, "make_runner", lambda *a, **k: seen.append(("precision", a[2])) or real_runner(*a, **k))
    monkeypatch.setattr(inference, "decoded_batches",
                        lambda *a, **k: seen.append(("decode", a[5])) or real_batches(*a, **k))
    for extra, want in (([], [("precision", None), ("decode", "exact")]),
                        (["--fast"], [("precision", "fastest"), ("decode", "fast")]),
                        (["--fast", "--precision", "fp32"], [("precision", "fp32"), ("decode", "fast")])):
        seen.clear()
        code, out, err = run_cli("predict", "--weights", str(folder), "--no-progress", *extra, str(photo_dir))
        assert code == 0 and seen == want, (extra, seen, err)
        assert len(read_json_lines(run_cli("predict", "--weights", str(folder), "--format", "json",
                                           "--no-progress", *extra, str(photo_dir))[1])) == 6
