"""Adaptive Gradient Clipping (NFNet paper), unit-wise, vectorised over all parameters.

For every unit (an output row of a weight, i.e. all dims but the first; a 1-D tensor counts as
one unit), the gradient is rescaled to ``clip * max(||W_unit||, eps)`` when its norm exceeds
that. Equal to timm's ``adaptive_clip_grad``; faster because it reads each tensor fewer times:
one norm pass over the weights, one over the gradients, the tiny per-unit arithmetic done once
for all units together, and an in-place rescale only of gradients that have a clipped unit.
"""

from __future__ import annotations

from typing import Iterable

import torch


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[torch.nn.Parameter], clip_factor: float = 0.015,
                        eps: float = 1e-3) -> int:
    """Clip gradients in place, unit-wise; returns how many units were clipped."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0
    weights = [p.detach() for p in params]
    grads = [p.grad.detach() for p in params]
    w_norms = _unit_norms(weights)
    g_norms = _unit_norms(grads)
    sizes = [n.numel() for n in w_norms]
    max_norm = torch.cat(w_norms).clamp_(min=eps).mul_(clip_factor)
    g_norm = torch.cat(g_norms)
    # min(1, max/||g||) is 1 exactly where ||g|| < max; elsewhere it is timm's max / max(||g||, 1e-6).
    scale = torch.where(g_norm < max_norm, torch.ones_like(g_norm), max_norm / g_norm.clamp(min=1e-6))
    clipped = scale < 1
    n_clipped = int(clipped.sum())
    if n_clipped:
        for g, s, hit in zip(grads, scale.split(sizes), clipped.split(sizes)):
            if hit.any():
                g.mul_(s.view(-1, *([1] * (g.ndim - 1))) if g.ndim > 1 else s)
    return n_clipped


def _unit_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2 norm of every unit: per output row for tensors of 2+ dims, the whole tensor for 0/1-D ones."""
    flat = [t for t in tensors if t.ndim <= 1]
    flat_norms = iter(torch._foreach_norm(flat) if flat else [])
    return [next(flat_norms).reshape(1) if t.ndim <= 1 else
            torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1) for t in tensors]


def unit_count(parameters: Iterable[torch.nn.Parameter]) -> int:
    """How many units adaptive_clip_grad_ looks at in these parameters (with gradients): the denominator of the
    clipped fraction."""
    return sum(p.shape[0] if p.ndim > 1 else 1 for p in parameters)
