"""Real-data training benchmark: scikit-learn's digits (1,797 real 8x8 scans) from scratch.

1. Step throughput, one run, alternating: an ecanfnet training step (forward, backward,
   vectorised AGC 0.015 outside the classifier, SGD Nesterov) against the same step with timm's
   eca_nfnet_l0 and timm's adaptive_clip_grad, same batch of 64x64 digits.
2. `ecanfnet train` with its defaults (from scratch: 60 epochs, lr 8 x 0.1 x 32/256; 10 % held out) on the digits
   written as an ImageFolder and upscaled to 64 px: validation accuracy, wall time, images/s.

    python benchmarks/train_digits.py [--epochs N] [--steps 10]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ecanfnet import build_model
from ecanfnet.training.agc import adaptive_clip_grad_
from ecanfnet.training.config import TrainConfig
from ecanfnet.training.loop import train
from ecanfnet.training.state import training_dir


def write_digits(root: Path, size: int = 64) -> int:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(image * (255 / 16), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:04d}.png")
    return len(digits.images)


def step_throughput(steps: int, batch: int) -> dict[str, float]:
    import timm
    from timm.utils.agc import adaptive_clip_grad

    x = torch.randn(batch, 3, 64, 64)
    y = torch.randint(0, 10, (batch,))
    ours = build_model("eca_nfnet_l0", num_classes=10, drop_path_rate=0.1)
    ref = timm.create_model("eca_nfnet_l0", num_classes=10, drop_path_rate=0.1)
    ref.load_state_dict(ours.state_dict())
    setups = {"timm + timm AGC": (ref, adaptive_clip_grad), "ecanfnet + vectorised AGC": (ours, adaptive_clip_grad_)}
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(model: torch.nn.Module, agc, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        agc([p for n, p in model.named_parameters() if not n.startswith("head.fc")], 0.015)
        opt.step()

    opts = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True) for name, (m, _) in setups.items()}
    times: dict[str, list[float]] = {name: [] for name in setups}
    for i in range(steps + 2):
        for name, (model, agc) in setups.items():
            model.train()
            start = time.perf_counter()
            step(model, agc, opts[name])
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=None, help="default: train's own (60 from scratch)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side for the throughput ratio; 0 skips it")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                        help="override the default RandomResizedCrop range (no longer 'defaults')")
    parser.add_argument("--hflip", type=float, default=None, help="override the flip probability")
    parser.add_argument("--ema-decay", type=float, default=None, help="override the weight-EMA decay (default off)")
    args = parser.parse_args()

    if args.steps > 0:
        ips = step_throughput(args.steps, args.batch_size)
        anchor = ips["timm + timm AGC"]
        print(f"## training step throughput, batch {args.batch_size}, 64x64, {torch.get_num_threads()} threads")
        for name, value in ips.items():
            print(f"{name:28s} {value:7.2f} images/s  {value / anchor:5.2f}x")

    with tempfile.TemporaryDirectory() as tmp:
        n = write_digits(Path(tmp) / "digits")
        overrides = {k: v for k, v in (("crop_scale", args.crop_scale), ("hflip", args.hflip),
                                                  ("ema_decay", args.ema_decay)) if v is not None}
        cfg = TrainConfig(data=str(Path(tmp) / "digits"), output=str(Path(tmp) / "out"), from_scratch=True,
                          epochs=args.epochs, batch_size=args.batch_size, image_size=64, workers=2,
                          **{k: tuple(v) if k == "crop_scale" else v for k, v in overrides.items()})
        start = time.perf_counter()
        out = train(cfg)
        wall = time.perf_counter() - start
        with (training_dir(out) / "metrics.csv").open(newline="") as f:
            history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    last, epochs = history[-1], len(history)
    trained = n * (1 - cfg.val_split) * epochs
    setting = f"overrides {overrides}" if overrides else "defaults"
    print(f"\n## ecanfnet train on digits ({n} scans, 64 px, from scratch, {setting}, {epochs} epochs)")
    print(f"val top-1 {100 * last['val_top1']:.2f}%  (best {100 * max(r['val_top1'] for r in history):.2f}%), "
          f"val loss {last['val_loss']:.4f}, wall {wall:.0f} s, {trained / wall:.1f} training images/s incl. validation")
    print("val top-1 by epoch: " + " ".join(f"{100 * r['val_top1']:.1f}" for r in history))


if __name__ == "__main__":
    main()
