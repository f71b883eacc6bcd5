"""Adaptive gradient clipping against timm's adaptive_clip_grad on the same gradients."""

from __future__ import annotations

import pytest
import torch

from ecanfnet.testing import randomize_
from ecanfnet import build_model
from ecanfnet.training.agc import adaptive_clip_grad_


def model_with_grads(grad_scale: float, seed: int = 0) -> torch.nn.Module:
    model = randomize_(build_model("eca_nfnet_l0", num_classes=10), seed)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    model(x).logsumexp(-1).sum().backward()
    for p in model.parameters():
        p.grad.mul_(grad_scale)
    model.stages[1][0].conv2.bias.grad.zero_()  # an all-zero gradient must stay zero, not NaN
    return model


@pytest.mark.parametrize("grad_scale", [1e-4, 1.0, 1e4])
@pytest.mark.parametrize("clip", [0.015, 0.1])
def test_equals_timm_adaptive_clip_grad(grad_scale, clip):
    from timm.utils.agc import adaptive_clip_grad

    ours, ref = model_with_grads(grad_scale), model_with_grads(grad_scale)
    before = {n: p.grad.clone() for n, p in ours.named_parameters()}
    n_clipped = adaptive_clip_grad_(ours.parameters(), clip)
    adaptive_clip_grad(ref.parameters(), clip)
    changed = 0
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-12), name
        changed += not torch.equal(p.grad, before[name])
        assert torch.isfinite(p.grad).all()
    assert (n_clipped == 0) == (changed == 0)


def test_more_units_are_clipped_as_gradients_grow():
    counts = [adaptive_clip_grad_(model_with_grads(scale).parameters(), 0.015) for scale in (1e-4, 1.0, 1e4)]
    assert counts[0] < counts[1] < counts[2]
    total_units = sum(p.shape[0] if p.ndim > 1 else 1 for p in build_model(num_classes=10).parameters())
    assert counts[2] > total_units // 2


def test_units_are_rows_and_vectors_are_one_unit():
    w = torch.nn.Parameter(torch.ones(2, 3))
    w.grad = torch.tensor([[0.001, 0.0, 0.0], [10.0, 0.0, 0.0]])
    b = torch.nn.Parameter(torch.ones(4))
    b.grad = torch.full((4,), 10.0)
    assert adaptive_clip_grad_([w, b], clip_factor=0.1) == 2
    # row 1 (norm 10) is cut to 0.1 * sqrt(3); row 0 is under its bound and untouched
    assert torch.allclose(w.grad[1].norm(), torch.tensor(0.1 * 3 ** 0.5))
    assert w.grad[0, 0] == 0.001
    assert torch.allclose(b.grad.norm(), torch.tensor(0.1 * 2.0))  # whole vector: 0.1 * ||ones(4)||


def test_zero_norm_weights_of_the_from_scratch_init_clip_like_timm_without_nan():
    """From random init conv3.gain is all zeros (and biases too): every unit's bound is clip * eps, not 0."""
    from timm.utils.agc import adaptive_clip_grad

    models = [build_model("eca_nfnet_l0", num_classes=10) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    zero = [n for n, p in models[0].named_parameters() if n.startswith("stages.") and n.endswith("conv3.gain")]
    assert zero and all(not p.detach().any() for n, p in models[0].named_parameters() if n in zero)
    g = torch.Generator().manual_seed(0)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        grad = torch.randn(p.shape, generator=g) * (1e-3 if "gain" in name else 1.0)
        if name == "stem.conv1.bias":
            grad.zero_()  # zero weight norm AND zero gradient: 0 / 0 must not appear
        p.grad, q.grad = grad.clone(), grad.clone()
    before = models[0].get_parameter(zero[0]).grad.clone()
    n_clipped = adaptive_clip_grad_(models[0].parameters(), 0.015)
    adaptive_clip_grad(models[1].parameters(), 0.015)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.isfinite(p.grad).all(), name
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-12), name
    # each zero-gain unit is one element whose gradient is cut to clip * eps = 1.5e-5 (and keeps its sign)
    after = models[0].get_parameter(zero[0]).grad
    assert torch.allclose(after, before.sign() * before.abs().clamp(max=0.015 * 1e-3), rtol=1e-6, atol=0)
    assert (before.abs() > 0.015 * 1e-3).sum() > 0.9 * before.numel()  # most of them were clipped
    assert n_clipped >= sum(dict(models[0].named_parameters())[n].shape[0] for n in zero)
