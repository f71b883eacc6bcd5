"""Adaptive gradient clipping speed: ecanfnet's vectorised AGC against timm's adaptive_clip_grad.

Same ECA-NFNet-L0 gradients for both (restored before every call), alternating calls, one run;
prints the median time of each and the ratio.

    python benchmarks/agc.py --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from timm.utils.agc import adaptive_clip_grad

from ecanfnet import build_model
from ecanfnet.training.agc import adaptive_clip_grad_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clip", type=float, default=0.015)
    args = parser.parse_args()

    model = build_model("eca_nfnet_l0")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    params = [p for n, p in model.named_parameters() if not n.startswith("head.fc")]
    saved = [torch.randn_like(p) * 0.05 for p in params]  # some units over the bound, some under

    def restore() -> None:
        for p, g in zip(params, saved):
            p.grad = g.clone()

    candidates = {"timm adaptive_clip_grad": lambda: adaptive_clip_grad(params, args.clip),
                  "ecanfnet adaptive_clip_grad_": lambda: adaptive_clip_grad_(params, args.clip)}
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.rounds + 2):
        for name, fn in candidates.items():
            restore()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t[2:]) for name, t in times.items()}
    anchor = medians["timm adaptive_clip_grad"]
    print(f"{sum(p.numel() for p in params):,} parameters in {len(params)} tensors, clip {args.clip}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    for name, m in medians.items():
        print(f"{name:30s} {1000 * m:8.2f} ms   {anchor / m:5.2f}x timm")


if __name__ == "__main__":
    main()
