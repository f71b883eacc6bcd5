"""Every weights source, strict loading, head replacement, save_pretrained <-> timm, unsafe pickles."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

from ecanfnet.testing import timm_model
from ecanfnet import WeightsError, create_model, resolve_weights, save_pretrained

X = torch.randn(2, 3, 96, 112, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def ref_logits(timm_l0):
    with torch.no_grad():
        return timm_l0(X)


def logits_of(model):
    with torch.no_grad():
        return model.eval()(X)


def assert_same_logits(model, ref):
    out = logits_of(model)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_timm_written_hub_folder_loads_with_metadata(timm_hub_folder, ref_logits):
    model = create_model(pretrained=timm_hub_folder)
    assert model.name == "eca_nfnet_l0"
    assert model.pretrained_cfg["test_input_size"] in ([3, 288, 288], (3, 288, 288))
    assert_same_logits(model, ref_logits)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


def test_half_precision_checkpoint_loads_as_float32(tmp_path, timm_l0):
    save_file({k: v.half().contiguous() for k, v in timm_l0.state_dict().items()}, tmp_path / "half.safetensors")
    model = create_model(pretrained=tmp_path / "half.safetensors")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_folder_with_pytorch_model_bin(tmp_path, timm_l0, ref_logits):
    torch.save(timm_l0.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "eca_nfnet_l0", "num_classes": 1000}))
    assert_same_logits(create_model(pretrained=tmp_path), ref_logits)


def test_bare_safetensors_and_pth_files(tmp_path, timm_l0, ref_logits):
    sd = timm_l0.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "w.pth")
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "train.pth.tar.pth")
    for name in ("w.safetensors", "w.pth", "train.pth.tar.pth"):
        assert_same_logits(create_model(pretrained=str(tmp_path / name)), ref_logits)


def test_architecture_is_inferred_without_a_config(tmp_path):
    ref = timm_model("eca_nfnet_l1", seed=1)
    save_file(ref.state_dict(), tmp_path / "l1.safetensors")
    model = create_model(pretrained=tmp_path / "l1.safetensors")
    assert model.name == "eca_nfnet_l1"


def test_other_head_size_keeps_backbone_and_tells_the_user(timm_hub_folder, timm_l0):
    with pytest.warns(UserWarning, match="1000 classes, the model 10; loaded the backbone only"):
        model = create_model(pretrained=timm_hub_folder, num_classes=10).eval()
    x = X[:1]
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True),
                              timm_l0.forward_head(timm_l0.forward_features(x), pre_logits=True), rtol=1e-4, atol=1e-4)
        assert model(x).shape == (1, 10)
    assert "label_names" not in model.pretrained_cfg
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.head.fc.weight.std() > 0 and model.head.fc.bias.eq(0).all()


def test_checkpoint_of_another_architecture_names_the_keys(tmp_path):
    ref = timm_model("eca_nfnet_l1", seed=2)
    save_file(ref.state_dict(), tmp_path / "l1.safetensors")
    with pytest.raises(WeightsError, match="checkpoint is eca_nfnet_l1, not the requested eca_nfnet_l0"):
        create_model("eca_nfnet_l0", pretrained=tmp_path / "l1.safetensors")
    import timm
    resnet = timm.create_model("resnet18").state_dict()
    save_file({k: v.contiguous() for k, v in resnet.items()}, tmp_path / "resnet.safetensors")
    with pytest.raises(WeightsError) as info:
        create_model("eca_nfnet_l0", pretrained=tmp_path / "resnet.safetensors")
    msg = str(info.value)
    assert "does not fit eca_nfnet_l0" in msg
    assert "missing keys (183)" in msg and "final_conv.weight" in msg and "... and 175 more" in msg
    assert "unexpected keys (122)" in msg and "bn1.running_mean" in msg


def test_shape_mismatch_is_listed(tmp_path, timm_l0):
    sd = dict(timm_l0.state_dict())
    sd["final_conv.weight"] = torch.zeros(2304, 1536, 3, 3)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=r"shape mismatches .*final_conv.weight \(2304, 1536, 3, 3\) vs \(2304, 1536, 1, 1\)"):
        create_model(pretrained=tmp_path / "bad.safetensors")


def test_code_running_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"stem.conv1.weight": Exploit()}, path)
    with pytest.raises(WeightsError, match=r"evil.pth: refused to load.*\(posix.system\)"):
        resolve_weights(path)
    assert not marker.exists()


@pytest.mark.parametrize("content, reason", [(b"", "empty"), (b"\x00garbage" * 10, "not a readable")])
def test_broken_weight_files_are_named(tmp_path, content, reason):
    for name in ("w.pth", "w.safetensors"):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError, match=f"{name}: .*{reason}"):
            resolve_weights(tmp_path / name)


def test_missing_source_says_what_is_accepted(tmp_path):
    with pytest.raises(WeightsError, match="no such file or folder .*hf-hub:timm/eca_nfnet_l0"):
        resolve_weights(tmp_path / "nope")


def test_save_pretrained_loads_in_timm_and_back_with_labels(tmp_path, timm_hub_folder):
    import timm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = create_model(pretrained=timm_hub_folder, num_classes=3).eval()
    labels = ["cat", "coffee", "rocket"]
    out = save_pretrained(ours, tmp_path / "export", label_names=labels)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    ref = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert ref.pretrained_cfg["label_names"] == labels
    with torch.no_grad():
        assert torch.allclose(ref(X), ours(X), rtol=1e-5, atol=1e-5)
    back = create_model(pretrained=out)
    assert back.num_classes == 3 and back.pretrained_cfg["label_names"] == labels
    assert torch.equal(logits_of(back), logits_of(ours))


def test_save_pretrained_rejects_wrong_label_count(tmp_path):
    with pytest.raises(ValueError, match="label_names has 2 entries but the model has 1000 classes"):
        save_pretrained(create_model(), tmp_path, label_names=["a", "b"])
    assert not (tmp_path / "model.safetensors").exists()


def test_timm_training_checkpoint_is_read_with_its_namespace_allowed_for_that_load_only(tmp_path, timm_l0):
    import argparse

    from hostile import timm_training_checkpoint

    path = timm_training_checkpoint(tmp_path / "model_best.pth.tar", timm_l0.state_dict())
    before = set(torch.serialization.get_safe_globals())  # a set in torch: its list's order is arbitrary
    assert_same_logits(create_model(pretrained=path, num_classes=1000), logits_of(timm_l0))
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(path, weights_only=True)  # outside our loader, torch's own allowlist is untouched
    torch.serialization.add_safe_globals([argparse.Namespace])  # a caller's own allowance survives our load
    try:
        resolve_weights(path)
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(list(before))


@pytest.mark.parametrize("where", ["args", "metric"])
def test_code_in_a_training_checkpoints_namespace_is_refused_without_running(tmp_path, where):
    from hostile import _RunsCode, timm_training_checkpoint

    marker = tmp_path / "pwned"
    payload = {"args": {"opt": [{"x": _RunsCode(f"touch {marker}")}]}} if where == "args" else \
        {"metric": _RunsCode(f"touch {marker}")}
    path = timm_training_checkpoint(tmp_path / "checkpoint-1.pth.tar", {"w": torch.ones(2)}, **payload)
    with pytest.raises(WeightsError) as info:
        resolve_weights(path)
    msg = str(info.value)
    assert "\n" not in msg and "checkpoint-1.pth.tar: refused to load" in msg and "(posix.system)" in msg, msg
    assert not marker.exists()


def test_checkpoint_path_loads_after_building_and_is_strict(tmp_path, timm_hub_folder, timm_l0, ref_logits):
    path = tmp_path / "w.pth"
    torch.save(timm_l0.state_dict(), path)
    model = create_model(checkpoint_path=path)
    assert_same_logits(model, ref_logits)
    assert model.pretrained_cfg == create_model().pretrained_cfg  # metadata as built, not the file's
    with pytest.raises(WeightsError, match=r"shape mismatches .*head.fc.weight \(1000, 2304\) vs \(10, 2304\)"):
        create_model(checkpoint_path=path, num_classes=10)
    with pytest.raises(WeightsError, match=r"stem.conv1.weight \(16, 3, 3, 3\) vs \(16, 1, 3, 3\)"):
        create_model(checkpoint_path=path, in_chans=1)
    tuned = create_model(num_classes=4)
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, tmp_path / "tuned.safetensors")
    with pytest.warns(UserWarning, match="loaded the backbone only"):
        model = create_model(pretrained=timm_hub_folder, num_classes=4, checkpoint_path=tmp_path / "tuned.safetensors")
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in model.state_dict().items())
    assert model.pretrained_cfg["num_classes"] == 4


def test_in_chans_and_global_pool_default_to_the_checkpoints(tmp_path):
    gray = create_model(num_classes=2, in_chans=1, global_pool="max")
    back = create_model(pretrained=save_pretrained(gray, tmp_path))
    assert back.stem.conv1.in_channels == 1 and back.global_pool == "max" and back.pretrained_cfg.in_chans == 1
    rgb = create_model(pretrained=tmp_path, in_chans=3)  # adapted back: the gray kernel repeated, divided by 3
    assert torch.allclose(rgb.stem.conv1.weight, gray.stem.conv1.weight.repeat(1, 3, 1, 1) / 3)
    assert rgb.pretrained_cfg["input_size"] == [3, 224, 224] and rgb.pretrained_cfg["mean"] == gray.pretrained_cfg["mean"] * 3


def test_an_unreachable_hub_endpoint_is_named_unless_a_proxy_carries_the_traffic(monkeypatch):
    from ecanfnet.testing import free_port
    from ecanfnet.weights import endpoint_problem

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    closed = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    assert endpoint_problem(closed, timeout=2.0)  # e.g. "Connection refused"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert endpoint_problem(closed, timeout=2.0) is None  # huggingface_hub goes through the proxy: not ours to judge
