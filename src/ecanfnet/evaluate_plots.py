"""The pictures of an evaluation: confusion matrix and reliability diagram as PNG files (matplotlib, imported lazily).

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global backend is switched for the caller.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .backends import installed
from .evaluate import OTHER_COLUMN, Calibration, ConfusionMatrix
from .fileio import write_atomically

MATPLOTLIB_EXTRA = "pip install 'ecanfnet[train]'"  # the extras that carry matplotlib: train, explain
MAX_CONFUSION_CLASSES = 50  # more classes: the PNG shows the ones with the most errors
ANNOTATE_UP_TO = 30         # counts written in the cells up to this many classes
LABEL_CHARS = 24            # longer class names are shortened in the PNG


def require_matplotlib(what: str) -> None:
    """ImportError in one line naming the extra when matplotlib is missing (what: the feature, e.g. a flag)."""
    if not installed("matplotlib"):
        raise ImportError(f"{what} needs matplotlib: {MATPLOTLIB_EXTRA}")


def most_confused(matrix: ConfusionMatrix, limit: int = MAX_CONFUSION_CLASSES) -> ConfusionMatrix:
    """The matrix restricted to the `limit` classes with the most errors (as true or as predicted class);
    the predictions of every other class go to the OTHER_COLUMN. The matrix itself when it has no more."""
    counts = np.asarray(matrix.counts, dtype=np.int64).reshape(len(matrix.classes), len(matrix.columns))
    k = len(matrix.classes)
    if k <= limit:
        return matrix
    square = counts[:, :k]
    errors = counts.sum(1) + square.sum(0) - 2 * np.diag(square)
    keep = np.sort(np.argsort(-errors, kind="stable")[:limit])  # the most errors, in the matrix's own order
    shown = square[np.ix_(keep, keep)]
    rest = counts[keep].sum(1) - shown.sum(1)
    classes = [matrix.classes[i] for i in keep]
    return ConfusionMatrix(classes, classes + [OTHER_COLUMN], np.column_stack([shown, rest]).tolist())


def _short(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[:LABEL_CHARS - 1] + "…"


def plot_confusion(matrix: ConfusionMatrix, path: str | Path, *, limit: int = MAX_CONFUSION_CLASSES) -> Path:
    """Write the confusion matrix as a PNG: colour = share of the true class's images, counts in the cells
    (up to ANNOTATE_UP_TO classes); beyond `limit` classes, the `limit` most confused ones (see most_confused)."""
    require_matplotlib("the confusion-matrix PNG")
    from matplotlib.figure import Figure

    shown = most_confused(matrix, limit)
    counts = np.asarray(shown.counts, dtype=np.int64).reshape(len(shown.classes), len(shown.columns))
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    rows, cols = counts.shape
    side = 0.32 * max(rows, cols) + 3
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's images")
    font = 10 if rows <= 15 else 7
    ax.set_xticks(range(cols), [_short(c) for c in shown.columns], rotation=60, ha="right", fontsize=font,
                  rotation_mode="anchor", parse_math=False)
    ax.set_yticks(range(rows), [_short(c) for c in shown.classes], fontsize=font, parse_math=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if rows <= ANNOTATE_UP_TO:
        for (i, j), n in np.ndenumerate(counts):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=font,
                        color="white" if share[i, j] > 0.5 else "black")
    title = "confusion matrix" if shown is matrix else \
        f"confusion matrix: the {rows} most confused of {len(matrix.classes)} classes"
    ax.set_title(f"{title} ({int(counts.sum())} images)")
    return _save(fig, path)


def plot_reliability(calibration: Calibration, path: str | Path) -> Path:
    """Write the reliability diagram as a PNG: accuracy per confidence bin as bars over the diagonal, each
    bin's mean confidence as a dot joined to its bar, the images per bin below, the ECE in the title."""
    require_matplotlib("the reliability-diagram PNG")
    from matplotlib.figure import Figure

    bins = calibration.bins
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    filled = [i for i, b in enumerate(bins) if b["images"]]
    accuracy = np.array([bins[i]["accuracy"] for i in filled])
    confidence = np.array([bins[i]["confidence"] for i in filled])
    fig = Figure(figsize=(6, 7), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.bar(lower[filled], accuracy, width[filled], align="edge", color="tab:blue", edgecolor="black",
            label="accuracy")
    centres = lower[filled] + width[filled] / 2
    top.vlines(centres, accuracy, confidence, color="tab:red", linewidth=2)
    top.plot(centres, confidence, "o", color="tab:red", label="mean confidence (red line: the gap)")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy (top-1)")
    top.set_title(f"reliability: ECE {calibration.ece:.4f} ({len(bins)} bins, "
                  f"{sum(b['images'] for b in bins)} images)")
    top.legend(loc="upper left")
    bottom.bar(lower, [b["images"] for b in bins], width, align="edge", color="tab:grey", edgecolor="black")
    bottom.set(xlabel="confidence (top-1 softmax probability)", ylabel="images")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    """Write the figure as a PNG atomically (glyphs missing from the font are drawn as boxes, not warned about)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from")
        return write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
