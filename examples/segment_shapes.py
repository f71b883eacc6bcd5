"""Fine-tune the ECA-NFNet segmentation model on generated shapes and report held-out mIoU.

    python examples/segment_shapes.py [--weights SRC] [--epochs 8] [--train 480] [--val 120]

Without --weights the trunk starts from random init (the hub is not always reachable); with the
published weights (--weights hf-hub:timm/eca_nfnet_l0) it learns faster.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from shapes import CLASS_NAMES, make_split, normalize, one_cycle, train_epoch  # noqa: E402

import ecanfnet  # noqa: E402


def mean_iou(model: torch.nn.Module, data, batch_size: int, num_classes: int) -> tuple[float, list[float]]:
    """Mean over classes of intersection / union, accumulated over the whole split."""
    inter, union = torch.zeros(num_classes), torch.zeros(num_classes)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            images = torch.stack([normalize(img) for img, _, _ in data[i:i + batch_size]])
            masks = torch.stack([m for _, _, m in data[i:i + batch_size]])
            pred = model(images).argmax(1)
            for c in range(num_classes):
                inter[c] += ((pred == c) & (masks == c)).sum()
                union[c] += ((pred == c) | (masks == c)).sum()
    per_class = (inter / union.clamp_min(1)).tolist()
    return sum(per_class) / num_classes, per_class


def pixel_loss(model: torch.nn.Module, batch: list) -> torch.Tensor:
    """Per-pixel cross-entropy, the batch mirrored half of the time (mirroring keeps every shape's class)."""
    images = torch.stack([normalize(img) for img, _, _ in batch])
    masks = torch.stack([m for _, _, m in batch])
    if torch.rand(()) < 0.5:
        images, masks = images.flip(-1), masks.flip(-1)
    return F.cross_entropy(model(images), masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="trunk weights (default: random init)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train", type=int, default=480)
    parser.add_argument("--val", type=int, default=120)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_set = make_split(args.train, seed=args.seed, size=args.size)
    val_set = make_split(args.val, seed=10_000 + args.seed, size=args.size)  # held out: other shapes
    model = ecanfnet.create_segmentation_model(len(CLASS_NAMES), pretrained=args.weights or False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = one_cycle(optimizer, args.lr, args.epochs, -(-len(train_set) // args.batch_size))
    start = time.perf_counter()
    for epoch in range(args.epochs):
        loss = train_epoch(model, train_set, args.batch_size, optimizer, schedule, pixel_loss, f"epoch {epoch + 1}")
        miou, per_class = mean_iou(model, val_set, args.batch_size, len(CLASS_NAMES))
        print(f"epoch {epoch + 1}: train loss {loss:.4f}, held-out mIoU {miou:.3f} "
              f"({', '.join(f'{n} {v:.2f}' for n, v in zip(CLASS_NAMES, per_class))})", flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s: held-out mIoU {miou:.3f} on {len(val_set)} images")


if __name__ == "__main__":
    main()
