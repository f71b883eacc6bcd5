"""The evaluation PNGs: the confusion matrix of many classes shows the most confused ones and loses no image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ecanfnet.evaluate import OTHER_COLUMN, ConfusionMatrix
from ecanfnet.evaluate_plots import MAX_CONFUSION_CLASSES, most_confused, plot_confusion


def assert_real_png(path: Path, min_side: int = 300) -> None:
    """A decodable PNG of real size with many colours (not blank, not one colour)."""
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side, image.size
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, len(colours or [])
    assert max(n for n, _ in colours) < 0.95 * sum(n for n, _ in colours)


def test_many_classes_show_the_most_confused_and_keep_every_image(tmp_path):
    k = 60
    counts = np.zeros((k, k + 1), dtype=np.int64)
    counts[np.arange(k), np.arange(k)] = 20
    counts[np.arange(k), k] = np.arange(k)  # class i: i images predicted as a class no folder names
    counts[59, 0] = 7                       # ... and 59 -> 0, so class 0 has 7 errors as the predicted class
    # names matplotlib would read as math, or that hold control characters, are drawn as written
    names = [f"class {i}" for i in range(k - 2)] + ["$x^$ {broken", "tab\there \x1b[31m"]
    matrix = ConfusionMatrix(names, names + [OTHER_COLUMN], counts.tolist())

    shown = most_confused(matrix)
    assert len(shown.classes) == MAX_CONFUSION_CLASSES == 50
    assert shown.classes == names[10:] and shown.columns == names[10:] + [OTHER_COLUMN]  # the most errors
    got = np.array(shown.counts)
    assert got.sum(1).tolist() == counts[10:].sum(1).tolist()  # every image of a shown class is still counted
    assert got[-1, -1] == 59 + 7 and got[-1, -1 - 1] == 20     # 59 -> 0 (not shown) went to the other column
    assert most_confused(matrix, limit=60) is matrix

    assert plot_confusion(matrix, tmp_path / "cm.png") == tmp_path / "cm.png"
    assert_real_png(tmp_path / "cm.png", min_side=1000)
    assert [p.name for p in tmp_path.iterdir()] == ["cm.png"]  # no temp file left
