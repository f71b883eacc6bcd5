"""The network against timm's eca_nfnet_* on randomised weights, plus its own invariants."""

from __future__ import annotations

import pytest
import torch

from ecanfnet import build_model
from ecanfnet.choices import ARCHITECTURES
from ecanfnet.model import CONFIGS, eca_kernel_size, embedding_view
from ecanfnet.testing import randomize_, timm_model


def ours_from(ref: torch.nn.Module, name: str) -> torch.nn.Module:
    model = build_model(name).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def assert_close_to_scale(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel} x scale {scale:.3g}"


@pytest.fixture(scope="module")
def pair_l0(timm_l0):
    return timm_l0, ours_from(timm_l0, "eca_nfnet_l0")


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("size", [(224, 224), (288, 288), (193, 257)])
def test_l0_logits_features_and_pre_logits_match_timm(pair_l0, size, batch):
    ref, ours = pair_l0
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch * 1000 + size[1]))
    with torch.no_grad():
        ref_feat, our_feat = ref.forward_features(x), ours.forward_features(x)
        assert_close_to_scale(our_feat, ref_feat)
        assert_close_to_scale(ours.forward_head(our_feat, pre_logits=True), ref.forward_head(ref_feat, pre_logits=True))
        logits = ours(x)
        assert_close_to_scale(logits, ref(x))
    # the comparison is meaningful: inputs give different, non-degenerate logits
    assert logits.std().item() > 0
    if batch > 1:
        assert not torch.allclose(logits[0], logits[1])


def test_l0_input_gradients_match_timm(pair_l0):
    ref, ours = pair_l0
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(7))
    grads = []
    for model in (ref, ours):
        xi = x.clone().requires_grad_(True)
        model(xi).logsumexp(dim=-1).sum().backward()
        grads.append(xi.grad)
        model.zero_grad(set_to_none=True)
    assert grads[0].abs().max() > 0
    assert_close_to_scale(grads[1], grads[0])


def test_sibling_l1_matches_timm():
    ref = timm_model("eca_nfnet_l1", seed=3)
    ours = ours_from(ref, "eca_nfnet_l1")
    x = torch.randn(2, 3, 160, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close_to_scale(ours(x), ref(x))
    assert ours.num_features == ref.num_features == 3072


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_and_shapes_equal_timm(name):
    import timm

    ref = {k: tuple(v.shape) for k, v in timm.create_model(name, pretrained=False).state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in build_model(name).state_dict().items()}
    assert ours == ref


def test_l0_size_and_published_facts():
    model = build_model("eca_nfnet_l0")
    assert sum(p.numel() for p in model.parameters()) == 24_143_924
    assert len(model.state_dict()) == 185
    assert len(list(model.buffers())) == 0
    assert model.num_features == 2304
    assert [eca_kernel_size(c) for c in (256, 512, 1536)] == [5, 5, 5]
    cfg = model.pretrained_cfg
    assert cfg["test_input_size"] == [3, 288, 288] and cfg["test_crop_pct"] == 1.0


def test_fresh_init_zeroes_every_residual_branch():
    model = build_model("eca_nfnet_l0")
    gains = [blk.conv3.gain for stage in model.stages for blk in stage]
    assert len(gains) == 12 and all(torch.count_nonzero(g) == 0 for g in gains)
    assert model.stem.conv1.gain.eq(1).all() and model.head.fc.bias.eq(0).all()


def test_signal_propagation_constants():
    model = build_model("eca_nfnet_l0")
    betas = [round(blk.beta, 6) for stage in model.stages for blk in stage]
    # expected variance by hand from SPEC: reset to 1 after each stage's first block, +0.2^2 after every block
    variances = [1.0, 1.04, 1.04, 1.08, 1.04, 1.08, 1.12, 1.16, 1.20, 1.24, 1.04, 1.08]
    expect = [round(v ** -0.5, 6) for v in variances]
    assert betas == expect


def test_drop_path_is_train_only_and_rates_rise_linearly():
    model = build_model("eca_nfnet_l0", drop_path_rate=0.22)
    rates = [blk.drop_path.p for stage in model.stages for blk in stage]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.22) < 1e-6
    assert all(b > a for a, b in zip(rates, rates[1:]))
    x = torch.randn(4, 256, 8, 8)
    drop = model.stages[3][2].drop_path
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(0)
    out = drop.train()(x)
    kept = [torch.equal(out[i], x[i] / (1 - drop.p)) for i in range(4)]
    dropped = [torch.count_nonzero(out[i]) == 0 for i in range(4)]
    assert all(k or d for k, d in zip(kept, dropped))


def test_reset_classifier_changes_head_only():
    model = build_model("eca_nfnet_l0").eval()
    model.reset_classifier(7)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    assert model.pretrained_cfg["num_classes"] == 7
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2304)


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'eca_nfnet_l9'"):
        build_model("eca_nfnet_l9")


def test_embedding_view_outputs_pooled_features_and_leaves_the_model_whole():
    model = randomize_(build_model(num_classes=5)).eval()
    x = torch.randn(2, 3, 64, 64)
    view = embedding_view(model)
    view.register_forward_hook(lambda *_: None)
    assert not model._forward_hooks  # the view's hook is its own
    with torch.no_grad():
        pooled, logits = view(x), model(x)
        assert torch.equal(pooled, model.forward_head(model.forward_features(x), pre_logits=True))
    assert pooled.shape == (2, model.num_features) and logits.shape == (2, 5)
    assert model.num_classes == 5 and model.pretrained_cfg["num_classes"] == 5 and view.num_classes == 0
    assert view.stem.conv1.weight.data_ptr() == model.stem.conv1.weight.data_ptr()  # shared, not copied
    assert "head.fc.weight" in model.state_dict() and "head.fc.weight" not in view.state_dict()


def test_the_architecture_names_a_checkpoint_may_give_are_the_built_ones():
    assert tuple(CONFIGS) == ARCHITECTURES


@pytest.mark.parametrize("pool, width", [("avg", 2304), ("max", 2304), ("avgmax", 2304), ("catavgmax", 4608)])
def test_global_pool_widths_and_the_folded_model_pools_alike(pool, width):
    from ecanfnet import prepare_for_inference

    model = randomize_(build_model(num_classes=4, global_pool=pool), seed=6).eval()
    assert model.num_features == 2304 and model.head_hidden_size == width and model.head.fc.in_features == width
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, width)
        avg, top = feats.mean(dim=(2, 3)), feats.amax(dim=(2, 3))
        expect = {"avg": avg, "max": top, "avgmax": (avg + top) / 2, "catavgmax": torch.cat([avg, top], 1)}[pool]
        assert torch.allclose(pooled, expect, rtol=1e-6, atol=1e-6)
        assert_close_to_scale(prepare_for_inference(model, channels_last=False)(x), model(x))
    assert embedding_view(model)(x).shape == (2, width)


def test_reset_classifier_can_change_the_pooling():
    model = build_model("eca_nfnet_l0")
    model.reset_classifier(5, global_pool="catavgmax")
    assert model.global_pool == "catavgmax" and model.head.fc.in_features == 4608 and model.head_hidden_size == 4608
    model.reset_classifier(2)  # the pooling stays
    assert model.head.fc.in_features == 4608
    with pytest.raises(ValueError, match="global_pool must be one of avg, max, avgmax, catavgmax, got 'median'"):
        model.reset_classifier(2, global_pool="median")
    assert model.global_pool == "catavgmax" and model.num_classes == 2  # unchanged by the refused call


@pytest.mark.parametrize("in_chans", [1, 4])
def test_in_chans_builds_the_stem_for_that_many_channels(in_chans):
    model = build_model("eca_nfnet_l0", num_classes=3, in_chans=in_chans).eval()
    assert model.stem.conv1.weight.shape == (16, in_chans, 3, 3)
    assert model.pretrained_cfg["input_size"] == [in_chans, 224, 224] and model.pretrained_cfg.in_chans == in_chans
    with torch.no_grad():
        assert model(torch.randn(1, in_chans, 64, 64)).shape == (1, 3)
    assert sum(p.numel() for p in model.parameters()) == 24_143_924 - 1000 * 2304 - 1000 + 3 * 2305 + 16 * 9 * (in_chans - 3)


@pytest.mark.parametrize("kwargs, words", [({"in_chans": 0}, "in_chans must be an integer from 1 to 64, got 0"),
                                           ({"in_chans": 65}, "in_chans must be an integer from 1 to 64, got 65"),
                                           ({"global_pool": "fast"}, "global_pool must be one of")])
def test_bad_model_options_are_clear_errors(kwargs, words):
    with pytest.raises(ValueError, match=words):
        build_model("eca_nfnet_l0", **kwargs)
