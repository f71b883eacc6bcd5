"""The optimiser recipe: learning-rate schedule (warm-up then cosine) and the weight-decay parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from ecanfnet import build_model
from ecanfnet.training.config import TrainConfig, lr_at
from ecanfnet.training.state import build_optimizer


def reference_lr(step: int, total: int, warmup: int, peak: float) -> float:
    """The schedule written out independently: (step+1)/warmup * peak, then peak/2 * (1 + cos(pi * t))."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak / 2 * (1 + math.cos(math.pi * t))


@pytest.mark.parametrize(("total", "warmup"), [(100, 10), (57, 0), (30, 29), (10, 1)])
def test_lr_warms_up_linearly_peaks_and_decays_by_cosine_to_zero(total, warmup):
    peak = 0.4
    lrs = [lr_at(s, total, warmup, peak) for s in range(total + 3)]
    assert lrs == pytest.approx([reference_lr(s, total, warmup, peak) for s in range(total + 3)], rel=1e-12, abs=1e-15)
    if warmup:
        assert lrs[:warmup] == pytest.approx([peak * (s + 1) / warmup for s in range(warmup)])
        assert lrs[warmup - 1] == pytest.approx(peak)
    assert lrs[warmup] == pytest.approx(peak)  # the cosine starts at the peak
    after = lrs[warmup:]
    assert all(a >= b for a, b in zip(after, after[1:]))  # monotone after warm-up
    assert lrs[total] == pytest.approx(0.0, abs=1e-15) and lrs[-1] == pytest.approx(0.0, abs=1e-15)
    assert max(lrs) == pytest.approx(peak)


def test_lr_after_warmup_equals_torchs_cosine_annealing():
    total, warmup, peak = 40, 8, 0.1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=0.0)
    expected = []
    for _ in range(total - warmup + 1):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    ours = [lr_at(s, total, warmup, peak) for s in range(warmup, total + 1)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_gains_and_biases_get_no_weight_decay_and_frozen_parameters_are_left_out():
    model = build_model("eca_nfnet_l0", num_classes=5)
    ids = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = build_optimizer(model, TrainConfig(data="d", output="o", weight_decay=3e-5)).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (3e-5, 0.0)
    decay_names = {ids[id(p)] for p in decay["params"]}
    no_decay_names = {ids[id(p)] for p in no_decay["params"]}
    assert decay_names | no_decay_names == set(ids.values()) and not decay_names & no_decay_names
    assert all(not n.endswith((".gain", ".bias")) for n in decay_names)
    assert {"stem.conv1.weight", "stages.0.0.conv3.weight", "final_conv.weight", "head.fc.weight"} <= decay_names
    assert {"stem.conv1.gain", "stem.conv1.bias", "stages.0.0.conv3.gain", "head.fc.bias"} <= no_decay_names
    assert all(n.endswith((".gain", ".bias")) for n in no_decay_names)

    for name, p in model.named_parameters():  # a linear probe: only the classifier is trained
        p.requires_grad_(name.startswith("head."))
    groups = build_optimizer(model, TrainConfig(data="d", output="o")).param_groups
    assert {ids[id(p)] for p in groups[0]["params"]} == {"head.fc.weight"}
    assert {ids[id(p)] for p in groups[1]["params"]} == {"head.fc.bias"}
