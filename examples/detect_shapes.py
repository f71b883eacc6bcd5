"""Fine-tune torchvision's Faster R-CNN on the ECA-NFNet FPN backbone with generated shapes.

    python examples/detect_shapes.py [--weights SRC] [--epochs 6] [--train 240] [--val 60]

Prints the training loss per epoch, then recall and precision at IoU 0.5 on the held-out split.
Without --weights the trunk starts from random init; --weights hf-hub:timm/eca_nfnet_l0 uses the
published ImageNet weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).parent))
from shapes import CLASS_NAMES, make_split, one_cycle, train_epoch  # noqa: E402

import ecanfnet  # noqa: E402


def recall_precision(model: FasterRCNN, data, score_threshold: float = 0.5) -> tuple[float, float]:
    """Share of true boxes found (same class, IoU >= 0.5) and share of confident detections that are right."""
    found = total = correct = detections = 0
    model.eval()
    with torch.no_grad():
        for image, target, _ in data:
            out = model([image])[0]
            keep = out["scores"] >= score_threshold
            boxes, labels = out["boxes"][keep], out["labels"][keep]
            iou = box_iou(target["boxes"], boxes) if len(boxes) else torch.zeros(len(target["boxes"]), 0)
            same = target["labels"][:, None] == labels[None, :]
            hit = (iou >= 0.5) & same
            found += int(hit.any(1).sum())
            correct += int(hit.any(0).sum())
            total += len(target["boxes"])
            detections += len(boxes)
    return found / max(total, 1), correct / max(detections, 1)


def detection_loss(model: FasterRCNN, batch: list) -> torch.Tensor:
    """Sum of the RPN and box-head losses torchvision returns in training mode."""
    return sum(model([img for img, _, _ in batch], [t for _, t, _ in batch]).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="trunk weights (default: random init)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train", type=int, default=240)
    parser.add_argument("--val", type=int, default=60)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train_set = make_split(args.train, seed=args.seed, size=args.size)
    val_set = make_split(args.val, seed=10_000 + args.seed, size=args.size)  # held out: other shapes
    backbone = ecanfnet.create_fpn_backbone(pretrained=args.weights or False)
    cfg = backbone.body.pretrained_cfg
    # Small images with at most three objects: far fewer proposals and sampled RoIs than torchvision's
    # COCO defaults (2000/512), which would spend most of the CPU time in the box head.
    model = FasterRCNN(backbone, num_classes=len(CLASS_NAMES), min_size=args.size, max_size=args.size,
                       image_mean=cfg["mean"], image_std=cfg["std"],
                       rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100,
                       rpn_pre_nms_top_n_test=150, rpn_post_nms_top_n_test=50,
                       rpn_batch_size_per_image=64, box_batch_size_per_image=64)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=1e-4)
    schedule = one_cycle(optimizer, args.lr, args.epochs, -(-len(train_set) // args.batch_size))
    start = time.perf_counter()
    for epoch in range(args.epochs):
        loss = train_epoch(model, train_set, args.batch_size, optimizer, schedule, detection_loss, f"epoch {epoch + 1}")
        print(f"epoch {epoch + 1}: train loss {loss:.4f}", flush=True)
    recall, precision = recall_precision(model, val_set)
    print(f"done in {time.perf_counter() - start:.0f} s: held-out recall@0.5 {recall:.3f}, "
          f"precision@0.5 {precision:.3f} (score >= 0.5) on {len(val_set)} images")


if __name__ == "__main__":
    main()
