"""A small generated dataset for the dense examples: coloured shapes with boxes, labels and masks.

Classes (by shape, whatever the colour): 1 rectangle, 2 ellipse, 3 triangle; 0 is background.
Each image has a smooth random background and 1-3 shapes that may overlap (later ones on top).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

CLASS_NAMES = ["background", "rectangle", "ellipse", "triangle"]


def make_sample(rng: np.random.Generator, size: int = 96) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(image (3, size, size) in [0, 1], target {boxes, labels} for detection, mask (size, size) of class ids)."""
    corner_colours = rng.uniform(0.2, 0.8, (2, 2, 3))
    ramp = np.linspace(0, 1, size)
    background = (corner_colours[0, 0] * (1 - ramp)[:, None, None] + corner_colours[1, 1] * ramp[:, None, None]
                  + 0.05 * rng.standard_normal((size, size, 3)))
    image = Image.fromarray((np.clip(background, 0, 1) * 255).astype(np.uint8))
    mask = Image.new("L", (size, size), 0)
    draw_img, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    boxes, labels = [], []
    for _ in range(rng.integers(1, 4)):
        label = int(rng.integers(1, 4))
        w, h = rng.integers(size // 5, size // 2, 2)
        x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        for draw, fill in ((draw_img, colour), (draw_mask, label)):
            if label == 1:
                draw.rectangle(box, fill=fill)
            elif label == 2:
                draw.ellipse(box, fill=fill)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
        boxes.append(box)
        labels.append(label)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}
    return pixels, target, torch.from_numpy(np.asarray(mask, dtype=np.int64))


def make_split(n: int, seed: int, size: int = 96) -> list[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]]:
    """n samples from a seeded generator (train and held-out splits use different seeds)."""
    rng = np.random.default_rng(seed)
    return [make_sample(rng, size) for _ in range(n)]


def normalize(images: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """ImageNet normalisation, as the checkpoint's pretrained_cfg asks."""
    return (images - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def one_cycle(optimizer: torch.optim.Optimizer, lr: float, epochs: int, steps_per_epoch: int):
    """Warm-up then cosine decay over the whole run, stepped once per batch."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)


def train_epoch(model: torch.nn.Module, data: list, batch_size: int, optimizer: torch.optim.Optimizer,
                schedule, batch_loss: Callable[[torch.nn.Module, list], torch.Tensor], desc: str) -> float:
    """One pass over data in shuffled batches with a progress bar; returns the mean training loss."""
    from tqdm import tqdm

    model.train()
    order = torch.randperm(len(data)).tolist()
    total, bar = 0.0, tqdm(range(0, len(order), batch_size), desc=desc, leave=False)
    for i in bar:
        batch = [data[j] for j in order[i:i + batch_size]]
        loss = batch_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.item() * len(batch)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return total / len(data)
