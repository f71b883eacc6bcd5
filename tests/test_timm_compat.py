"""timm's create_model options and its files, against timm: in_chans, global_pool, checkpoint_path, training checkpoints."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import save_file

from hostile import timm_training_checkpoint
from ecanfnet import build_model, create_model, prepare_for_inference, save_pretrained
from ecanfnet.testing import randomize_, timm_model


def assert_close_to_scale(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x scale {scale:.3g}"


def inputs(channels: int, seed: int = 11) -> torch.Tensor:
    return torch.randn(2, channels, 64, 80, generator=torch.Generator().manual_seed(seed))


def timm_from_file(path, **kwargs) -> torch.nn.Module:
    """timm's create_model with pretrained weights read from a local file (its own loader and adaptations)."""
    import timm

    overlay = {"file": str(path)}
    return timm.create_model("eca_nfnet_l0", pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


@pytest.fixture(scope="module")
def l0_file(tmp_path_factory, timm_l0):
    """The randomised timm L0 (every tensor random) as a bare .safetensors state dict."""
    path = tmp_path_factory.mktemp("l0") / "l0.safetensors"
    save_file({k: v.contiguous() for k, v in timm_l0.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("in_chans", [1, 2, 5])
def test_in_chans_adapts_the_pretrained_stem_like_timm(l0_file, in_chans):
    ref = timm_from_file(l0_file, in_chans=in_chans)
    ours = create_model(pretrained=l0_file, in_chans=in_chans).eval()
    assert ours.stem.conv1.weight.shape == (16, in_chans, 3, 3)
    assert torch.equal(ours.stem.conv1.weight, ref.stem.conv1.weight)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ours.state_dict().items())
    x = inputs(in_chans)
    with torch.no_grad():
        assert_close_to_scale(ours(x), ref(x))
    assert ours.pretrained_cfg["input_size"] == [in_chans, 224, 224]
    mean = (0.485 + 0.456 + 0.406) / 3  # timm's resolution of 3 values for another channel count: their average
    assert ours.pretrained_cfg["mean"] == [mean] * in_chans


def test_grayscale_model_round_trips_through_timms_hub_format(tmp_path):
    """timm's own save_for_hf of an in_chans=1 model loads here with its metadata, and ours loads in timm."""
    import timm
    from timm.models import save_for_hf

    ref = timm_model("eca_nfnet_l0", seed=5, in_chans=1, num_classes=3)
    save_for_hf(ref, str(tmp_path / "timm"), safe_serialization=True)
    timm_config = json.loads((tmp_path / "timm" / "config.json").read_text())
    ours = create_model(pretrained=tmp_path / "timm").eval()  # in_chans from the weights
    assert ours.stem.conv1.in_channels == 1 and ours.num_classes == 3
    for key in ("input_size", "test_input_size", "mean", "std"):
        assert ours.pretrained_cfg[key] == timm_config["pretrained_cfg"][key], key
    x = inputs(1)
    with torch.no_grad():
        assert_close_to_scale(ours(x), ref(x))
    back = timm.create_model(f"local-dir:{save_pretrained(ours, tmp_path / 'ours')}", pretrained=True).eval()
    with torch.no_grad():
        assert_close_to_scale(back(x), ref(x))


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax"])
def test_global_pool_matches_timm(pool):
    ref = timm_model("eca_nfnet_l0", seed=7, global_pool=pool, num_classes=7)
    ours = build_model("eca_nfnet_l0", num_classes=7, global_pool=pool).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    assert (ours.num_features, ours.head_hidden_size) == (ref.num_features, ref.head_hidden_size)
    x = inputs(3)
    with torch.no_grad():
        feats = ref.forward_features(x)
        assert_close_to_scale(ours.forward_head(feats, pre_logits=True), ref.forward_head(feats, pre_logits=True))
        assert_close_to_scale(ours(x), ref(x))
        assert_close_to_scale(prepare_for_inference(ours, channels_last=False)(x), ref(x))


def test_catavgmax_model_saves_for_timm_and_back(tmp_path):
    import timm

    ours = randomize_(build_model("eca_nfnet_l0", num_classes=3, global_pool="catavgmax"), seed=9).eval()
    folder = save_pretrained(ours, tmp_path)
    assert json.loads((folder / "config.json").read_text())["model_args"] == {"in_chans": 3, "global_pool": "catavgmax"}
    ref = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    back = create_model(pretrained=folder).eval()
    assert back.global_pool == "catavgmax" and ref.head_hidden_size == back.head_hidden_size == 4608
    x = inputs(3)
    with torch.no_grad():
        assert_close_to_scale(ref(x), ours(x))
        assert torch.equal(back(x), ours(x))


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory, timm_l0):
    """model_best.pth.tar as timm's CheckpointSaver writes it, with model EMA (the EMA weights: other random values)."""
    from timm.utils import CheckpointSaver, ModelEmaV3

    folder = tmp_path_factory.mktemp("timm_train")
    ema = ModelEmaV3(timm_l0)
    randomize_(ema.module, seed=3)
    optimizer = torch.optim.SGD(timm_l0.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    args = argparse.Namespace(model="eca_nfnet_l0", lr=0.1, epochs=3, scale=(0.08, 1.0), model_kwargs={},
                              device="cpu", mean=None, model_ema=True, clip_mode="agc")
    saver = CheckpointSaver(timm_l0, optimizer, args=args, model_ema=ema, checkpoint_dir=str(folder),
                            recovery_dir=str(folder))
    saver.save_checkpoint(epoch=2, metric=81.25)
    return folder / "model_best.pth.tar", ema.module


def test_timm_training_checkpoint_loads_the_weights_timm_does(training_checkpoint):
    path, ema_model = training_checkpoint
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, weights_only=True)  # what timm wrote
    assert isinstance(raw["args"], argparse.Namespace) and {"state_dict", "state_dict_ema", "optimizer"} <= set(raw)
    ours = create_model(pretrained=path)
    ref = timm_from_file(path)  # timm's loader: the EMA weights when the checkpoint has them
    expect = ema_model.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]) and torch.equal(v, expect[k]), k
    import timm

    by_path = timm.create_model("eca_nfnet_l0", checkpoint_path=str(path)).state_dict()
    ours_by_path = create_model(checkpoint_path=path).state_dict()
    assert all(torch.equal(v, by_path[k]) for k, v in ours_by_path.items())


def test_training_checkpoint_without_ema_gives_its_state_dict(tmp_path, timm_l0):
    sd = {"_orig_mod.module." + k: v for k, v in timm_l0.state_dict().items()}  # torch.compile over DDP
    path = timm_training_checkpoint(tmp_path / "checkpoint-2.pth.tar", sd)
    ours = create_model(pretrained=path, num_classes=1000)
    assert all(torch.equal(v, timm_l0.state_dict()[k]) for k, v in ours.state_dict().items())
