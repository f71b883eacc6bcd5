"""Multi-scale features (parity with timm's features_only), the FPN detection backbone and the segmentation model."""

from __future__ import annotations

import re

import pytest
import torch

import ecanfnet


def timm_features_model(full_timm):
    """timm's features_only L0 holding the same (randomised) weights as full_timm."""
    import timm

    feats = timm.create_model("eca_nfnet_l0", features_only=True).eval()
    sd = {re.sub(r"^(stem|stages)\.", r"\1_", k): v for k, v in full_timm.state_dict().items() if not k.startswith("head.")}
    feats.load_state_dict(sd)
    return feats


@pytest.mark.parametrize("size", [(224, 224), (193, 257)])
def test_five_maps_equal_timm_features_only(timm_l0, timm_hub_folder, size):
    ours = ecanfnet.create_model(pretrained=timm_hub_folder, features_only=True).eval()
    ref = timm_features_model(timm_l0)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert len(got) == 5
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, i
        rel = ((g - w).abs().max() / w.abs().max()).item()
        assert rel < 1e-5, (i, rel)
    info = [(f["num_chs"], f["reduction"], f["module"]) for f in ours.feature_info]
    assert info == [(f["num_chs"], f["reduction"], f["module"]) for f in ref.feature_info.get_dicts()]
    assert info == [(64, 2, "stem.conv3"), (256, 4, "stages.0"), (512, 8, "stages.1"),
                    (1536, 16, "stages.2"), (2304, 32, "final_conv")]
    for (c, r, _), m in zip(info, got):
        assert m.shape[1] == c and m.shape[2] == -(-size[0] // r)


def test_out_indices_subset_and_state_dict_is_the_trunk(timm_hub_folder):
    full = ecanfnet.create_model(pretrained=timm_hub_folder).eval()
    sub = ecanfnet.create_model(pretrained=timm_hub_folder, features_only=True, out_indices=(1, 3)).eval()
    assert sub.out_channels == [256, 1536]
    assert set(sub.state_dict()) == {k for k in full.state_dict() if not k.startswith("head.")}
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        a, b = sub(x)
        want = full.stages[:3](full.stem(x))
    torch.testing.assert_close(b, want, rtol=0, atol=0)
    assert a.shape == (1, 256, 24, 24)
    with pytest.raises(ValueError, match="out_indices"):
        ecanfnet.create_model(features_only=True, out_indices=(5,))


def shapes_batch(n: int, size: int, seed: int):
    """Images of coloured rectangles on a grey background, with their boxes, labels and masks (1 = red, 2 = blue)."""
    g = torch.Generator().manual_seed(seed)
    images, targets, masks = [], [], []
    for _ in range(n):
        img = torch.full((3, size, size), 0.5)
        mask = torch.zeros(size, size, dtype=torch.long)
        boxes, labels = [], []
        for label, colour in ((1, (0.9, 0.1, 0.1)), (2, (0.1, 0.2, 0.9))):
            w, h = (int(v) for v in torch.randint(size // 5, size // 2, (2,), generator=g))
            x0, y0 = (int(v) for v in torch.randint(0, size - max(w, h), (2,), generator=g))
            img[:, y0:y0 + h, x0:x0 + w] = torch.tensor(colour)[:, None, None]
            mask[y0:y0 + h, x0:x0 + w] = label
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(label)
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
        masks.append(mask)
    return images, targets, torch.stack(masks)


@pytest.mark.slow
def test_faster_rcnn_with_fpn_backbone_trains(timm_hub_folder):
    from torchvision.models.detection import FasterRCNN

    torch.manual_seed(0)
    backbone = ecanfnet.create_fpn_backbone(pretrained=timm_hub_folder, frozen_stem=True)
    assert backbone.out_channels == 256
    model = FasterRCNN(backbone, num_classes=3, min_size=128, max_size=128).train()
    images, targets, _ = shapes_batch(2, 128, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in backbone.body.stem.parameters())
    opt = torch.optim.SGD(params, lr=0.005, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        assert backbone.body.stages[0][0].conv1.weight.grad is not None
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model(images[:1])
    assert set(out[0]) == {"boxes", "labels", "scores"}


def test_segmentation_model_trains_and_keeps_input_size():
    torch.manual_seed(0)
    model = ecanfnet.create_segmentation_model(num_classes=3).train()
    images, _, masks = shapes_batch(2, 64, seed=1)
    x = torch.stack(images)
    assert model(x).shape == (2, 3, 64, 64)
    assert model(torch.randn(1, 3, 50, 70)).shape == (1, 3, 50, 70)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses
    with pytest.raises(ValueError, match="num_classes"):
        ecanfnet.create_segmentation_model(0)


@pytest.mark.parametrize("indices", [None, 2, [0, 3], [-1, 1]])
@pytest.mark.parametrize("stop_early", [False, True])
def test_forward_intermediates_equal_timms(timm_l0, indices, stop_early):
    """ECANFNet.forward_intermediates against timm's NFNet.forward_intermediates, same randomised weights."""
    ours = ecanfnet.build_model().eval()
    ours.load_state_dict(timm_l0.state_dict())
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got_x, got = ours.forward_intermediates(x, indices, stop_early=stop_early)
        want_x, want = timm_l0.forward_intermediates(x, indices, stop_early=stop_early)
        only = ours.forward_intermediates(x, indices, intermediates_only=True)
    assert len(got) == len(want) == len(only) and got_x.shape == want_x.shape
    torch.testing.assert_close(got_x, want_x, rtol=1e-4, atol=1e-4)
    for a, b, c in zip(got, want, only):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c, a, rtol=0, atol=0)
    info = [(f["num_chs"], f["reduction"], f["module"]) for f in ours.feature_info]
    assert info == [(f["num_chs"], f["reduction"], f["module"]) for f in timm_l0.feature_info]


def test_forward_intermediates_refuses_indices_out_of_range():
    model = ecanfnet.build_model().eval()
    for bad in (0, 6, [5], [-6], []):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(torch.zeros(1, 3, 64, 64), bad)
