"""Evaluation loops: a checkpoint's accuracy on an image folder whose class folders name its classes
(evaluate_folder), and the validation metrics of a model over a loader (evaluate_loader, used by training)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader

from .fileio import write_csv_atomically
from .labels import imagenet_classes
from .metadata import PretrainedCfg
from .progress import progress as progress_reporter
from .training.data import ImageFolderDataset, collate_skipping_bad, log_unreadable, scan_image_folder
from .transforms import eval_transform


class Tally:
    """Running cross-entropy and top-1/top-5 hits, overall and per class index."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.counts: dict[int, int] = {}
        self.hits1: dict[int, int] = {}
        self.hits5: dict[int, int] = {}

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Count one batch of logits against its labels."""
        logits = logits.float()
        self.loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        for label, ok1, ok5 in zip(y.tolist(), (top[:, 0] == y).tolist(), (top == y[:, None]).any(1).tolist()):
            self.counts[label] = self.counts.get(label, 0) + 1
            self.hits1[label] = self.hits1.get(label, 0) + ok1
            self.hits5[label] = self.hits5.get(label, 0) + ok5

    @property
    def n(self) -> int:
        """Images counted."""
        return sum(self.counts.values())

    def totals(self) -> tuple[float, float, float]:
        """(mean loss, top-1, top-5) over everything counted (nan loss and zeros when nothing was)."""
        n = self.n
        if not n:
            return float("nan"), 0.0, 0.0
        return self.loss_sum / n, sum(self.hits1.values()) / n, sum(self.hits5.values()) / n

    def per_class(self, index: int) -> tuple[int, float, float]:
        """(images, top-1, top-5) of one class index."""
        n = self.counts.get(index, 0)
        return n, self.hits1.get(index, 0) / max(n, 1), self.hits5.get(index, 0) / max(n, 1)


@dataclass
class EvalReport:
    """Mean cross-entropy, top-1/top-5 accuracy, and the same per class."""

    loss: float
    top1: float
    top5: float
    images: int
    per_class: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The headline numbers as a JSON-able dict."""
        return {"images": self.images, "top1": self.top1, "top5": self.top5, "loss": self.loss,
                "skipped": len(self.skipped)}


def map_class_folders(folders: list[str], pretrained_cfg: PretrainedCfg) -> list[int]:
    """Model output index for each class folder: by label name, by WordNet id (n01440764), or by index.

    Raises ValueError naming the folders that match none of them.
    """
    num_classes = pretrained_cfg.num_classes
    lookup = {name: i for i, name in enumerate(pretrained_cfg.readable_labels())}
    for i, raw in enumerate(pretrained_cfg.label_names or ()):
        lookup.setdefault(str(raw), i)
    if num_classes == 1000:
        for i, (wnid, label) in enumerate(imagenet_classes()):
            lookup.setdefault(wnid, i)
            lookup.setdefault(label, i)
    indices, unknown = [], []
    for folder in folders:
        if folder in lookup:
            indices.append(lookup[folder])
        elif re.fullmatch(r"\d+", folder) and int(folder) < num_classes:
            indices.append(int(folder))
        else:
            unknown.append(folder)
    if unknown:
        raise ValueError(f"class folders {unknown} match no class of the checkpoint (by label name, "
                         f"WordNet id or index 0..{num_classes - 1})")
    return indices


@torch.no_grad()
def evaluate_folder(model: torch.nn.Module, data: str | Path, batch_size: int = 32, workers: int = 0, *,
                    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    progress: bool = False, decode: str = "exact") -> EvalReport:
    """Evaluate on DATA/CLASS/IMAGE with the checkpoint's own eval preprocessing and labels (progress: on stderr).

    decode="fast": JPEGs decoded at a reduced DCT scale (see load_image)."""
    folders, samples = scan_image_folder(data)
    mapping = map_class_folders(folders, model.pretrained_cfg)
    samples = [(path, mapping[i]) for path, i in samples]
    loader = DataLoader(ImageFolderDataset(samples, eval_transform(model.pretrained_cfg), decode), batch_size,
                        num_workers=workers, collate_fn=collate_skipping_bad)
    forward = forward or model.eval()
    tally, skipped = Tally(), []
    with progress_reporter(len(samples), "evaluate", enabled=progress) as bar:
        for x, y, errors in loader:
            skipped += errors
            if x is not None:
                tally.add(forward(x), y)
            bar.update((len(x) if x is not None else 0) + len(errors))
    per_class = []
    for folder, idx in zip(folders, mapping):
        n, top1, top5 = tally.per_class(idx)
        per_class.append({"class": folder, "index": idx, "images": n, "top1": top1, "top5": top5})
    loss, top1, top5 = tally.totals()
    return EvalReport(loss, top1, top5, tally.n, per_class, skipped)


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader: DataLoader, reported: set[str] | None = None, *,
                    device: torch.device | None = None, progress: str | None = None) -> dict[str, float]:
    """Validation loss, top-1 and top-5 of model over a loader of collate_skipping_bad batches.

    reported: reasons for unreadable images already logged (each is logged once; None: a fresh set).
    progress: a label to report progress under on stderr (a bar on a terminal, a few lines in a log); None: silent.
    """
    reported = set() if reported is None else reported
    model.eval()
    tally = Tally()
    with progress_reporter(len(loader.dataset), progress or "", enabled=progress is not None, leave=False) as bar:
        for x, y, errors in loader:
            log_unreadable(errors, reported)
            if x is not None:
                tally.add(model(x.to(device or x.device)).cpu(), y)
            bar.update((len(x) if x is not None else 0) + len(errors))
    loss, top1, top5 = tally.totals()
    return {"val_loss": loss, "val_top1": top1, "val_top5": top5}


def write_per_class_csv(report: EvalReport, path: str | Path) -> Path:
    """The per-class table as CSV (class, index, images, top1, top5), written atomically."""
    return write_csv_atomically(path, report.per_class, ["class", "index", "images", "top1", "top5"])
