"""Class names: ImageNet-1k's (shipped with the package) or the checkpoint's own."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import Any

_WNID = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """The 1,000 ImageNet-1k classes in model output order, as (WordNet id, label) pairs."""
    text = resources.files("ecanfnet").joinpath("data/imagenet1k_classes.tsv").read_text(encoding="utf-8")
    rows = tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line)
    return rows  # type: ignore[return-value]


def imagenet_labels() -> list[str]:
    """The ImageNet-1k labels, e.g. index 281 -> 'tabby, tabby cat'."""
    return [label for _, label in imagenet_classes()]


def label_names_for(pretrained_cfg: dict[str, Any], num_classes: int) -> list[str]:
    """Readable labels for a model: the checkpoint's label_names, else ImageNet's, else the indices.

    Checkpoint labels that are WordNet ids (n01440764) are shown as their ImageNet label.
    """
    names = pretrained_cfg.get("label_names")
    if names and len(names) == num_classes:
        lemma = dict(imagenet_classes())
        return [lemma.get(n, n) if _WNID.match(n) else n for n in map(str, names)]
    if num_classes == 1000:
        return imagenet_labels()
    return [str(i) for i in range(num_classes)]
