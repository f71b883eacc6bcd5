"""Training runs on a tiny real-photo ImageFolder: loss falls, output loads in ecanfnet and timm,
kill-and-resume is bitwise exact, bad files are skipped, a non-finite loss stops the run."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ecanfnet import create_model
from ecanfnet.testing import photo_arrays
from ecanfnet.training.agc import adaptive_clip_grad_
from ecanfnet.training.data import DEFAULT_CROP_SCALE
from ecanfnet.training.loop import TrainingError, train
from ecanfnet.training.state import state_file, training_dir
from helpers import CLASSES, make_image_folder, tiny_config, untimed_metrics

pytestmark = pytest.mark.slow  # processes, servers or training runs: `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


def test_tiny_run_learns_and_its_output_loads_in_ecanfnet_and_timm(tmp_path, folder, timm_hub_folder):
    import timm

    # from scratch (the NF init: every residual branch starts at zero) with the recipe's defaults
    out = train(tiny_config(folder, tmp_path / "out", timm_hub_folder, epochs=5, from_scratch=True, lr=0.05))
    rows = (training_dir(out) / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,val_loss,val_top1,val_top5,") and len(rows) == 6
    losses = [float(r.split(",")[1]) for r in rows[1:]]
    assert losses[-1] < losses[0], losses
    assert (training_dir(out) / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ours = create_model(pretrained=out).eval()
    assert ours.pretrained_cfg["label_names"] == list(CLASSES)
    ref = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours(x), ref(x), rtol=1e-4, atol=1e-4)


def test_output_records_the_validation_preprocessing_so_evaluate_reproduces_it(tmp_path, folder, timm_hub_folder):
    from ecanfnet.evaluate import evaluate_folder

    val = make_image_folder(tmp_path / "val", per_class=3, size=72)
    out = train(tiny_config(folder, tmp_path / "out", timm_hub_folder, epochs=2, from_scratch=True, lr=0.05,
                            image_size=48, val=str(val)))
    model = create_model(pretrained=out).eval()
    assert model.pretrained_cfg["test_input_size"][-1] == model.pretrained_cfg["input_size"][-1] == 48
    rows = [r.split(",") for r in (training_dir(out) / "metrics.csv").read_text().splitlines()[1:]]
    best = max(rows, key=lambda r: float(r[3]))  # the first epoch with the highest top-1 is the one saved
    with torch.no_grad():
        report = evaluate_folder(model, val, batch_size=4)
    assert report.images == 9
    assert report.loss == pytest.approx(float(best[2]), rel=1e-4)
    assert report.top1 == pytest.approx(float(best[3]))
    # fine-tuning from that output defaults to the size it was trained at
    again = train(tiny_config(folder, tmp_path / "again", out, epochs=1, image_size=None))
    assert create_model(pretrained=again).pretrained_cfg["input_size"] == [3, 48, 48]


def test_killed_run_resumes_to_bitwise_the_same_weights(tmp_path, folder, timm_hub_folder):
    straight = train(tiny_config(folder, tmp_path / "straight", timm_hub_folder))
    killed = tmp_path / "killed"
    code = ("import sys; from ecanfnet.training.loop import train, TrainConfig; "
            f"train(TrainConfig(**{tiny_config(folder, killed, timm_hub_folder).__dict__!r}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not state_file(killed).exists():  # wait for the end of epoch 1, then kill during epoch 2
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = train(tiny_config(folder, killed, timm_hub_folder, resume=True))
    a = torch.load(state_file(straight), weights_only=True)["model"]
    b = torch.load(state_file(resumed), weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert untimed_metrics(straight) == untimed_metrics(resumed)


def test_resume_with_changed_settings_is_refused_naming_them(tmp_path, folder, timm_hub_folder):
    """The training state records the run's resolved settings; a resume that changes any is refused, each named,
    and leaves the state as it was. Run-control options (workers, progress) and epochs (train longer) may change."""
    out = train(tiny_config(folder, tmp_path / "out", timm_hub_folder, epochs=1))
    saved = state_file(out).read_bytes()
    with pytest.raises(TrainingError) as refused:
        train(tiny_config(folder, out, timm_hub_folder, epochs=2, lr=0.03, hflip=0.0, resume=True))
    message = str(refused.value)
    for change in ("lr: was 0.02, now 0.03", "hflip: was 0.5, now 0.0"):
        assert change in message, message
    assert "seed" not in message and "epochs" not in message and state_file(out).read_bytes() == saved
    state = torch.load(state_file(out), weights_only=True)
    assert state["settings"]["processes"] == 1 and state["settings"]["crop_scale"] == list(DEFAULT_CROP_SCALE)
    train(tiny_config(folder, out, timm_hub_folder, epochs=1, workers=1, resume=True))  # nothing left to do: fine



def test_train_without_a_context_is_one_process_on_cfg_device_and_logs_its_resolved_settings_once(
        tmp_path, folder, timm_hub_folder, monkeypatch, caplog):
    """context=None outside torchrun: no process group, cfg.device. A context passed in is the caller's: the run
    uses it and leaves the caller's group in place; the weights are bitwise those of the lone run."""
    import dataclasses
    import logging

    import torch.distributed as dist

    from ecanfnet.distributed import DistContext
    from ecanfnet.training import loop

    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):  # not under torchrun
        monkeypatch.delenv(name, raising=False)
    seen = []

    def recording_epoch(state, *args, **kwargs):
        seen.append((dist.is_initialized(), state.context))
        return real_epoch(state, *args, **kwargs)

    real_epoch = loop._train_epoch
    monkeypatch.setattr(loop, "_train_epoch", recording_epoch)
    caplog.set_level(logging.INFO, "ecanfnet")
    cfg = tiny_config(folder, tmp_path / "alone", timm_hub_folder, epochs=2, lr=None, device="cpu")
    train(cfg)
    assert seen == [(False, DistContext(device=torch.device("cpu")))] * 2
    resolved = [r.getMessage() for r in caplog.records if "optimizer steps" in r.getMessage()]
    assert resolved == ["training 2 epochs of 3 optimizer steps (global batch 6), peak learning rate 0.00234375, "
                        "image size 64"], resolved
    assert cfg.lr is None  # the caller's config is never changed

    seen.clear()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        grouped = train(dataclasses.replace(cfg, output=str(tmp_path / "grouped")),
                        context=DistContext(device=torch.device("cpu")))
        assert dist.is_initialized() and [s[0] for s in seen] == [True, True]
    finally:
        dist.destroy_process_group()
    a, b = load_file(tmp_path / "alone" / "model.safetensors"), load_file(grouped / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

def test_corrupt_training_image_is_reported_and_skipped(tmp_path, folder, timm_hub_folder, capsys, caplog):
    import shutil

    broken = tmp_path / "data_with_broken"
    shutil.copytree(folder, broken)
    (broken / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = train(tiny_config(broken, tmp_path / "out", timm_hub_folder, epochs=1, val_split=0.01))
    skipped = [r for r in caplog.records if "broken.jpg" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].name == "ecanfnet" and skipped[0].levelname == "WARNING"
    assert skipped[0].getMessage().startswith("skipped unreadable image: ")
    assert capsys.readouterr().err == ""  # the library logs; only the CLI prints
    assert (out / "model.safetensors").exists()


def test_library_skips_unreadable_images_through_logging_only(tmp_path, capsys, caplog):
    from torch.utils.data import DataLoader

    from ecanfnet import build_model
    from ecanfnet.training.data import ImageFolderDataset, collate_skipping_bad
    from ecanfnet.evaluate import evaluate_loader

    model = build_model(num_classes=2)
    good, bad = tmp_path / "good.png", tmp_path / "bad\x1b[2J.jpg"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(good)
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    dataset = ImageFolderDataset([(str(good), 0), (str(bad), 1), (str(bad), 1)],
                                 lambda img: torch.zeros(3, 32, 32))
    metrics = evaluate_loader(model, DataLoader(dataset, 3, collate_fn=collate_skipping_bad), set())
    assert metrics["val_top1"] in (0.0, 1.0)  # the one readable image was scored
    records = [r for r in caplog.records if r.name == "ecanfnet"]
    assert [r.levelname for r in records] == ["WARNING"]  # once per file, however often it comes up
    assert records[0].getMessage().startswith("skipped unreadable image: ") and str(bad) in records[0].getMessage()
    assert capsys.readouterr() == ("", "")  # nothing printed: no handler of the application's, no print


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, folder, timm_hub_folder):
    out = tmp_path / "out"
    train(tiny_config(folder, out, timm_hub_folder, epochs=1))
    good = load_file(out / "model.safetensors")
    with pytest.raises(TrainingError, match=r"non-finite loss .* at epoch 2, step \d+"):
        train(tiny_config(folder, out, timm_hub_folder, epochs=2, resume=True, resume_with_changes=True, lr=1e30,
                          agc_clip=0.0))
    kept = load_file(out / "model.safetensors")
    assert all(torch.equal(good[k], kept[k]) for k in good)


def test_train_command_writes_a_model_that_predict_uses(tmp_path, folder, capsys):
    from helpers import read_json_lines
    from ecanfnet.cli import main

    out = tmp_path / "cli_out"
    code = main(["train", "--data", str(folder), "--output", str(out), "--from-scratch", "--epochs", "1",
                 "--batch-size", "6", "--image-size", "64", "--workers", "0", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert f"trained model in {out}" in capsys.readouterr().out
    code = main(["predict", "--weights", str(out), "--format", "json", str(folder / "coffee" / "0.jpg")])
    (row,) = read_json_lines(capsys.readouterr().out)
    assert code == 0 and {p["label"] for p in row["predictions"]} == set(CLASSES)


def test_train_command_names_a_missing_folder(tmp_path, capsys):
    from ecanfnet.cli import main

    assert main(["train", "--data", str(tmp_path / "nope"), "--output", str(tmp_path / "o"), "--from-scratch"]) == 1
    assert "nope: no such folder" in capsys.readouterr().err


def test_accumulation_bf16_ema_and_mixing_run_resume_and_export(tmp_path, folder, timm_hub_folder):
    options = dict(epochs=2, accum_steps=2, precision="bf16", ema_decay=0.9, mixup=0.8, cutmix=1.0,
                   freeze_backbone=False)
    straight = train(tiny_config(folder, tmp_path / "straight", timm_hub_folder, **options))
    first = tmp_path / "resumed"
    train(tiny_config(folder, first, timm_hub_folder, **{**options, "epochs": 1}))
    resumed = train(tiny_config(folder, first, timm_hub_folder, **options, resume=True))
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(state_file(straight), weights_only=True)
    assert state["ema"] and not torch.equal(state["ema"]["module.head.fc.weight"], state["model"]["head.fc.weight"])
    assert create_model(pretrained=straight).num_classes == 3


def test_freeze_backbone_trains_only_the_classifier(tmp_path, folder, timm_hub_folder):
    out = train(tiny_config(folder, tmp_path / "probe", timm_hub_folder, epochs=1, freeze_backbone=True,
                            drop_path_rate=0.0))
    trained = load_file(out / "model.safetensors")
    start = load_file(timm_hub_folder / "model.safetensors")
    assert all(torch.equal(trained[k], start[k]) for k in start if not k.startswith("head."))
    assert trained["head.fc.weight"].shape == (3, 2304)


def test_fp16_scales_gradients_and_unscales_them_before_agc(tmp_path, folder, timm_hub_folder, monkeypatch):
    from ecanfnet.training import loop

    seen: dict[str, list[float]] = {}

    def recording_agc(params, clip, eps=1e-3):
        seen.setdefault(precision, []).append(max(p.grad.abs().max().item() for p in params if p.grad is not None))
        return adaptive_clip_grad_(params, clip, eps)

    monkeypatch.setattr(loop, "adaptive_clip_grad_", recording_agc)
    outs = {}
    for precision in ("fp32", "fp16"):
        device_warning = pytest.warns(UserWarning, match="fp16 training on CPU") if precision == "fp16" \
            and not torch.cuda.is_available() else contextlib.nullcontext()
        with device_warning:
            outs[precision] = train(tiny_config(folder, tmp_path / precision, timm_hub_folder, epochs=1,
                                                precision=precision))
    state = torch.load(state_file(tmp_path / "fp16"), weights_only=True)
    assert state["scaler"]["scale"] >= 2.0 ** 10  # the scaler was on ...
    # ... yet AGC saw gradients of the fp32 size (the same first batch), not ones thousands of times larger
    assert seen["fp16"][0] == pytest.approx(seen["fp32"][0], rel=0.05), seen
    assert all(math.isfinite(g) for g in seen["fp32"])
    trained = load_file(outs["fp16"] / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in trained.values())


def test_default_epochs_give_small_folders_enough_steps():
    from ecanfnet.training.config import default_epochs

    assert default_epochs(from_scratch=False, steps_per_epoch=51) == 10   # the card's fine-tuning length
    assert default_epochs(from_scratch=True, steps_per_epoch=51) == 60
    assert default_epochs(from_scratch=False, steps_per_epoch=3) == 100   # 20 images x 5 classes: 300 steps
    assert default_epochs(from_scratch=False, steps_per_epoch=7) == 43    # ceil(300 / 7)
    assert default_epochs(from_scratch=True, steps_per_epoch=3) == 100


def test_crop_scale_and_flip_probability_are_honoured():
    from ecanfnet.training.data import train_transform

    photo = Image.fromarray(photo_arrays()["chelsea"]).resize((96, 96))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    keep = train_transform(64, mean, std, randaugment=False, crop_scale=(1.0, 1.0), hflip=0.0)
    mirror = train_transform(64, mean, std, randaugment=False, crop_scale=(1.0, 1.0), hflip=1.0)
    for _ in range(5):  # whole image every time, never / always mirrored
        a, b = keep(photo), mirror(photo)
        torch.testing.assert_close(b, a.flip(-1))
        assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="crop scale"):
        train_transform(64, mean, std, crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="hflip"):
        train_transform(64, mean, std, hflip=1.5)
