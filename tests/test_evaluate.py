"""`ecanfnet evaluate` against the same numbers computed with timm, and the class-folder mapping."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ecanfnet.testing import photo_arrays, random_crop
from ecanfnet import build_model
from ecanfnet.cli import main
from ecanfnet.labels import imagenet_classes
from ecanfnet.evaluate import map_class_folders
from helpers import card_timm_transform

# real photos filed under ImageNet classes, named three ways: WordNet id, label, index
FOLDERS = {"n02123045": "chelsea", "coffee mug": "coffee", "n04266014": "rocket", "417": "astronaut"}


def make_labelled_folder(root: Path) -> Path:
    photos = photo_arrays()
    rng = np.random.default_rng(1)
    for folder, photo in FOLDERS.items():
        (root / folder).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(random_crop(photos[photo], rng, 3 / 4)).save(root / folder / f"{i}.png")
    return root


def test_class_folders_map_by_wnid_label_and_index():
    cfg = build_model().pretrained_cfg
    wnids = [w for w, _ in imagenet_classes()]
    assert map_class_folders(list(FOLDERS), cfg) == [wnids.index("n02123045"), 504, wnids.index("n04266014"), 417]
    with pytest.raises(ValueError, match=r"\['pizza place'\] match no class"):
        map_class_folders(["n02123045", "pizza place"], cfg)
    custom = cfg.with_classes(2).replace(label_names=("cat", "dog"))
    assert map_class_folders(["dog", "cat", "1"], custom) == [1, 0, 1]


@pytest.mark.slow
def test_evaluate_equals_timm_on_the_same_data_and_weights(tmp_path, capsys, timm_l0, timm_hub_folder):
    data = make_labelled_folder(tmp_path / "data")
    csv_path = tmp_path / "per_class.csv"
    code = main(["evaluate", "--data", str(data), "--weights", str(timm_hub_folder), "--batch-size", "5",
                 "--workers", "0", "--format", "json", "--per-class-csv", str(csv_path)])
    assert code == 0
    got = json.loads(capsys.readouterr().out)

    # the same numbers, computed independently with timm's model and timm's eval transform
    wnids = [w for w, _ in imagenet_classes()]
    targets = {"n02123045": wnids.index("n02123045"), "coffee mug": 504,
               "n04266014": wnids.index("n04266014"), "417": 417}
    logits, labels = [], []
    for folder, target in targets.items():
        for path in sorted((data / folder).iterdir()):
            with torch.no_grad():
                logits.append(timm_l0(card_timm_transform()(Image.open(path).convert("RGB")).unsqueeze(0))[0])
            labels.append(target)
    logits, labels = torch.stack(logits), torch.tensor(labels)
    top5 = logits.topk(5).indices
    assert got["images"] == 12
    assert got["top1"] == (top5[:, 0] == labels).float().mean().item()
    assert got["top5"] == (top5 == labels[:, None]).any(1).float().mean().item()
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-4)
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["class"] for r in rows] == sorted(FOLDERS) and all(r["images"] == "3" for r in rows)


@pytest.mark.parametrize("value", ["-1", "x"])
def test_evaluate_workers_below_zero_is_a_usage_error(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--data", str(tmp_path), "--workers", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument --workers: must be an integer >= 0, got {value}" in err, err


def test_two_folders_for_one_class_and_a_negative_worst_are_refused(tmp_path):
    from types import SimpleNamespace

    from ecanfnet.evaluate import evaluate_folder

    cfg = build_model().pretrained_cfg.with_classes(2).replace(label_names=("cat", "dog"))
    model = SimpleNamespace(pretrained_cfg=cfg)  # refused before any image is read or the model runs
    for folder in ("1", "dog"):
        (tmp_path / folder).mkdir()
        Image.fromarray(photo_arrays()["coffee"][:32, :32]).save(tmp_path / folder / "a.png")
    with pytest.raises(ValueError, match=r"class folders '1' and 'dog' both name class 1 of the checkpoint"):
        evaluate_folder(model, tmp_path)
    with pytest.raises(ValueError, match="worst must be >= 0, got -1"):
        evaluate_folder(model, tmp_path, worst=-1)
