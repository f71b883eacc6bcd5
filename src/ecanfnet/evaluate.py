"""Evaluation loops: a checkpoint's accuracy on an image folder whose class folders name its classes
(evaluate_folder: top-k, per-class precision/recall/F1, confusion, calibration, worst images), and the
validation metrics of a model over a loader (evaluate_loader, used by training)."""

from __future__ import annotations

import csv
import heapq
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from .fileio import write_atomically, write_csv_atomically
from .labels import imagenet_classes
from .metadata import PretrainedCfg
from .progress import progress as progress_reporter
from .training.data import ImageFolderDataset, collate_skipping_bad, log_unreadable, scan_image_folder
from .transforms import eval_transform

CALIBRATION_BINS = 15     # equal-width bins of the top-1 softmax probability, as Guo et al. (2017)
DEFAULT_WORST = 10        # images listed by the lowest probability of their true class
TOP_CONFUSIONS = 10       # (true -> predicted) pairs listed, most images first
OTHER_COLUMN = "(other)"  # confusion column: predictions of checkpoint classes that no evaluated folder names
PER_CLASS_FIELDS = ("class", "index", "images", "top1", "top5", "precision", "recall", "f1", "support")


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


class Outcomes:
    """What evaluate_folder keeps of each image, in memory bounded by the classes and `worst`, not the images:
    counts of (true, predicted) class-index pairs, sums per confidence bin, and the `worst` images with the
    lowest probability of their true class."""

    def __init__(self, worst: int = DEFAULT_WORST, bins: int = CALIBRATION_BINS) -> None:
        self.pairs: Counter[tuple[int, int]] = Counter()
        self.edges = np.linspace(0.0, 1.0, bins + 1)
        self.bin_images = np.zeros(bins, dtype=np.int64)
        self.bin_confidence = np.zeros(bins)
        self.bin_correct = np.zeros(bins, dtype=np.int64)
        self.worst = worst
        self.lowest: list[tuple[float, int, int, int, float]] = []  # (p(true), sample id, true, predicted, conf)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, ids: list[int]) -> None:
        """Count one batch: logits (N, C), true class indices (N,), and the samples' ids (their rank in the folder)."""
        probs = logits.float().softmax(-1)
        confidence, predicted = probs.max(-1)
        p_true = probs.gather(1, labels[:, None])[:, 0].tolist()
        conf, pred = confidence.double().numpy(), predicted.numpy()
        self.pairs.update(zip(labels.tolist(), pred.tolist()))
        # a confidence c falls in bin m when edges[m] < c <= edges[m + 1] (c = 0, impossible for a softmax: bin 0)
        which = np.clip(np.searchsorted(self.edges, conf, side="left") - 1, 0, len(self.bin_images) - 1)
        np.add.at(self.bin_images, which, 1)
        np.add.at(self.bin_confidence, which, conf)
        np.add.at(self.bin_correct, which, pred == labels.numpy())
        batch = zip(p_true, ids, labels.tolist(), pred.tolist(), conf.tolist())
        self.lowest = heapq.nsmallest(self.worst, [*self.lowest, *batch])  # ties: the earlier file first

    def calibration(self) -> Calibration:
        """The expected calibration error and bin table of everything counted."""
        return Calibration.from_bins(self.edges, self.bin_images, self.bin_confidence, self.bin_correct)


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error over equal-width bins of the top-1 softmax probability, and the bin table.

    ECE = sum over bins of (images in the bin / all images) * |accuracy in the bin - mean confidence in the bin|,
    a bin holding the confidences c with lower < c <= upper; accuracy and confidence are None for an empty bin.
    """

    ece: float
    bins: list[dict[str, Any]]

    @classmethod
    def from_bins(cls, edges: np.ndarray, images: np.ndarray, confidence_sum: np.ndarray,
                  correct: np.ndarray) -> Calibration:
        """Calibration from per-bin image counts, sums of confidence and counts of correct top-1 predictions."""
        total, ece, rows = int(images.sum()), 0.0, []
        for lo, hi, n, conf, hits in zip(edges[:-1], edges[1:], images.tolist(), confidence_sum, correct):
            accuracy, mean_conf = (float(hits) / n, float(conf) / n) if n else (None, None)
            if n:
                ece += n / total * abs(accuracy - mean_conf)
            rows.append({"lower": float(lo), "upper": float(hi), "images": n,
                         "accuracy": accuracy, "confidence": mean_conf})
        return cls(ece, rows)


@dataclass(frozen=True)
class ConfusionMatrix:
    """Images per (true class, predicted class) over the evaluated classes: rows true, columns predicted.

    The columns are the classes, then OTHER_COLUMN when the checkpoint has classes that no evaluated folder
    names (an ImageNet checkpoint on ten folders): it counts the predictions of any of those.
    """

    classes: list[str]
    columns: list[str]
    counts: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        """The matrix as a JSON-able dict."""
        return {"classes": self.classes, "columns": self.columns, "counts": self.counts}


@dataclass
class EvalReport:
    """Mean cross-entropy, top-1/top-5 accuracy, the per-class table, and (from evaluate_folder) averages,
    confusion matrix, top confusions, calibration and the worst-classified images."""

    loss: float
    top1: float
    top5: float
    images: int
    per_class: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    averages: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: ConfusionMatrix | None = None
    top_confusions: list[dict[str, Any]] = field(default_factory=list)
    calibration: Calibration | None = None
    worst: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The headline numbers as a JSON-able dict: images, top-1/5, loss, skipped, macro/weighted averages, ECE."""
        return {"images": self.images, "top1": self.top1, "top5": self.top5, "loss": self.loss,
                "skipped": len(self.skipped), **self.averages,
                "ece": self.calibration.ece if self.calibration else None}

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-able: the summary, per_class, confusion, top_confusions, calibration, worst."""
        calibration = self.calibration
        return {**self.summary(), "per_class": self.per_class,
                "confusion": self.confusion.to_dict() if self.confusion else None,
                "top_confusions": self.top_confusions,
                "calibration": {"ece": calibration.ece, "bins": calibration.bins} if calibration else None,
                "worst": self.worst}


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


def _refuse_shared_classes(folders: list[str], mapping: list[int]) -> None:
    """ValueError when two class folders name the same checkpoint class (their images would be one class)."""
    first: dict[int, str] = {}
    for folder, index in zip(folders, mapping):
        if index in first:
            raise ValueError(f"class folders {first[index]!r} and {folder!r} both name class {index} of the "
                             "checkpoint; put their images in one folder")
        first[index] = folder


@torch.no_grad()
def evaluate_folder(model: torch.nn.Module, data: str | Path, batch_size: int = 32, workers: int = 0, *,
                    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    progress: bool = False, decode: str = "exact", worst: int = DEFAULT_WORST) -> EvalReport:
    """Evaluate on DATA/CLASS/IMAGE with the checkpoint's own eval preprocessing and labels (progress: on stderr).

    forward: what turns a batch into logits (default the model); flip test-time augmentation is
    forward=ecanfnet.backends.with_flip_tta(make_runner(model, ...)). decode="fast": JPEGs decoded at a
    reduced DCT scale (see load_image). worst: how many images the report lists by the lowest probability
    of their true class. Raises ValueError for a folder without classes or images, or class folders that
    match no class of the checkpoint or the same one.
    """
    if worst < 0:
        raise ValueError(f"worst must be >= 0, got {worst}")
    folders, samples = scan_image_folder(data)
    mapping = map_class_folders(folders, model.pretrained_cfg)
    _refuse_shared_classes(folders, mapping)
    targets = torch.tensor([mapping[i] for _, i in samples])
    # each sample's label is its rank, so that a batch's images can be traced to their paths past skipped ones
    dataset = ImageFolderDataset([(path, rank) for rank, (path, _) in enumerate(samples)],
                                 eval_transform(model.pretrained_cfg), decode)
    loader = DataLoader(dataset, batch_size, num_workers=workers, collate_fn=collate_skipping_bad)
    forward = forward or model.eval()
    tally, outcomes, skipped = Tally(), Outcomes(worst), []
    with progress_reporter(len(samples), "evaluate", enabled=progress) as bar:
        for x, ranks, errors in loader:
            skipped += errors
            if x is not None:
                logits = forward(x).float().cpu()
                tally.add(logits, targets[ranks])
                outcomes.add(logits, targets[ranks], ranks.tolist())
            bar.update((len(x) if x is not None else 0) + len(errors))
    return _report(tally, outcomes, folders, mapping, skipped, paths=[path for path, _ in samples],
                   labels=model.pretrained_cfg.readable_labels())


def _report(tally: Tally, outcomes: Outcomes, folders: list[str], mapping: list[int], skipped: list[str], *,
            paths: list[str], labels: list[str]) -> EvalReport:
    """The EvalReport of an evaluation over the class folders (mapping: their checkpoint class indices)."""
    position = {index: i for i, index in enumerate(mapping)}

    def name(index: int) -> str:  # a class's folder, or the checkpoint's label for a class no folder names
        return folders[position[index]] if index in position else labels[index]

    counts = np.zeros((len(mapping), len(mapping) + (len(labels) > len(mapping))), dtype=np.int64)
    for (true, predicted), n in outcomes.pairs.items():
        counts[position[true], position.get(predicted, len(mapping))] += n
    scores = _class_scores(counts)
    per_class = []
    for i, (folder, index) in enumerate(zip(folders, mapping)):
        n, top1, top5 = tally.per_class(index)
        precision, recall, f1, support = (s[i].item() for s in scores)
        per_class.append({"class": folder, "index": index, "images": n, "top1": top1, "top5": top5,
                          "precision": precision, "recall": recall, "f1": f1, "support": support})
    worst = [{"path": paths[rank], "true": name(true), "true_probability": p_true, "predicted": name(predicted),
              "predicted_index": predicted, "confidence": confidence, "correct": predicted == true}
             for p_true, rank, true, predicted, confidence in outcomes.lowest]
    columns = folders + [OTHER_COLUMN] * (counts.shape[1] - len(folders))
    loss, top1, top5 = tally.totals()
    return EvalReport(loss, top1, top5, tally.n, per_class, skipped, averages=_averages(scores),
                      confusion=ConfusionMatrix(folders, columns, counts.tolist()),
                      top_confusions=_top_confusions(outcomes.pairs, name), calibration=outcomes.calibration(),
                      worst=worst)


def _class_scores(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, F1, support) per class of a confusion matrix whose first columns are its rows' classes.

    Precision counts the predictions of a class among the evaluated images; a ratio with nothing to divide by
    is 0 (scikit-learn's zero_division default)."""
    k = counts.shape[0]
    hits, support, predicted = np.diag(counts[:, :k]), counts.sum(1), counts[:, :k].sum(0)
    precision = np.divide(hits, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    return precision, recall, f1, support


def _averages(scores: tuple[np.ndarray, ...]) -> dict[str, dict[str, float]]:
    """Macro (every class alike) and weighted (by support) averages of precision, recall and F1."""
    *values, support = scores
    weights = support / support.sum() if support.sum() else np.zeros(len(support))
    names = ("precision", "recall", "f1")
    return {"macro": {n: float(v.mean()) if len(v) else 0.0 for n, v in zip(names, values)},
            "weighted": {n: float((v * weights).sum()) for n, v in zip(names, values)}}


def _top_confusions(pairs: Counter[tuple[int, int]], name: Callable[[int], str],
                    limit: int = TOP_CONFUSIONS) -> list[dict[str, Any]]:
    """The `limit` (true, predicted) pairs of different classes with the most images, most first."""
    wrong = sorted(((n, true, predicted) for (true, predicted), n in pairs.items() if true != predicted),
                   key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": name(true), "predicted": name(predicted), "predicted_index": predicted, "images": n}
            for n, true, predicted in wrong[:limit]]


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
    """The per-class table as CSV (PER_CLASS_FIELDS: class, index, images, top1, top5, precision, recall, f1,
    support), written atomically."""
    return write_csv_atomically(path, report.per_class, PER_CLASS_FIELDS)


def write_confusion_csv(report: EvalReport, path: str | Path) -> Path:
    """The confusion matrix as CSV, written atomically: a header `true \\ predicted,COLUMN...`, then one row per
    true class (its name, then its images per predicted column)."""
    if report.confusion is None:
        raise ValueError("this report has no confusion matrix (it comes from evaluate_folder)")
    matrix = report.confusion

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = csv.writer(f)
            rows.writerow(["true \\ predicted", *matrix.columns])
            rows.writerows([name, *counts] for name, counts in zip(matrix.classes, matrix.counts))
    return write_atomically(path, write)
