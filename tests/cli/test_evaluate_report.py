"""`ecanfnet evaluate`'s report against scikit-learn and direct computations on the same predictions.

The predictions are computed here, independently, from the saved checkpoint's logits on the same files:
per-class precision/recall/F1 and averages, the confusion matrix (with its "(other)" column), ECE and its
bins, top confusions, worst images, flip TTA; the PNGs are decoded; hostile outputs and flags are refused
before the model loads.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import CLASSES, make_image_folder, one_error_line
from test_evaluate_plots import assert_real_png

LABELS = [*CLASSES, "cat", "dog"]  # the checkpoint knows two classes that no folder names
EVALUATED = [0, 1, 2]


def centroid_model(data: Path):
    """A random trunk under a class-centroid head at 64 px: right and wrong answers (some of them the two
    classes no folder names) at confidences spread over several bins; evaluation needs no better model."""
    from ecanfnet import create_model, eval_transform, load_image

    torch.manual_seed(0)
    model = create_model(pretrained=False, num_classes=len(LABELS)).eval()
    model.pretrained_cfg = model.pretrained_cfg.replace(input_size=(3, 64, 64), test_input_size=(3, 64, 64))
    transform = eval_transform(model.pretrained_cfg)
    paths = sorted(data.glob("*/*.jpg"))
    y = torch.tensor([CLASSES.index(p.parent.name) for p in paths])
    with torch.no_grad():
        x = torch.stack([transform(load_image(p)) for p in paths])
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    mean = feats.mean(0)
    centroids = torch.stack([(feats[y == k] - mean).mean(0) for k in range(len(CLASSES))])
    centroids = centroids / centroids.norm(dim=1, keepdim=True)
    # cat and dog lie between two evaluated classes each: some images go to them
    weight = torch.cat([centroids, 0.8 * (centroids[:1] + centroids[1:2]), 0.8 * (centroids[1:2] + centroids[2:])])
    model.head.fc.weight.data.copy_(0.25 * weight)
    model.head.fc.bias.data.copy_(-0.25 * weight @ mean)
    return model


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> SimpleNamespace:
    """The data folder, the checkpoint, and the checkpoint's own logits on each file (and on its mirror image)."""
    from ecanfnet import create_model, eval_transform, load_image, save_pretrained

    root = tmp_path_factory.mktemp("evaluate_report")
    data = make_image_folder(root / "data", per_class=6, size=64)
    weights = save_pretrained(centroid_model(data), root / "model", label_names=LABELS)
    model = create_model(pretrained=str(weights)).eval()
    transform = eval_transform(model.pretrained_cfg)
    paths = sorted(data.glob("*/*.jpg"))
    with torch.no_grad():
        x = torch.stack([transform(load_image(p)) for p in paths])
        logits, mirrored = model(x), model(x.flip(-1))
    return SimpleNamespace(data=data, weights=weights, paths=[str(p) for p in paths],
                           y=np.array([CLASSES.index(p.parent.name) for p in paths]),
                           logits=logits, tta_logits=(logits + mirrored) / 2)


def base_args(case) -> list[str]:
    return ["evaluate", "--data", str(case.data), "--weights", str(case.weights), "--workers", "0",
            "--batch-size", "8", "--device", "cpu", "--no-progress"]


def confusions(y: np.ndarray, pred: np.ndarray) -> list[tuple[tuple[int, int], int]]:
    """((true, predicted), images) for each pair of different classes: most images first, then by class index."""
    wrong = Counter((int(t), int(p)) for t, p in zip(y, pred) if t != p)
    return sorted(wrong.items(), key=lambda item: (-item[1], item[0]))


def direct_ece(confidence: np.ndarray, correct: np.ndarray) -> tuple[float, list[int]]:
    """ECE over 15 equal-width bins (lo, hi], written out: sum of |bin| / n * |accuracy - mean confidence|."""
    ece, sizes = 0.0, []
    for m in range(15):
        inside = (confidence > m / 15) & (confidence <= (m + 1) / 15)
        sizes.append(int(inside.sum()))
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return ece, sizes


@pytest.mark.slow
def test_report_equals_sklearn_and_direct_computations(case, run_cli, tmp_path):
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    probs = case.logits.softmax(-1).numpy()
    pred, confidence = probs.argmax(1), probs.max(1)
    assert (pred == case.y).any() and ((pred != case.y) & (pred < 3)).any() and (pred >= 3).any(), pred

    out = {name: tmp_path / name for name in ("pc.csv", "cm.csv", "cm.png", "rel.png")}
    code, stdout, err = run_cli(*base_args(case), "--format", "json", "--worst", "4",
                                "--per-class-csv", str(out["pc.csv"]), "--confusion-csv", str(out["cm.csv"]),
                                "--confusion-png", str(out["cm.png"]), "--reliability-png", str(out["rel.png"]))
    assert code == 0 and err == "", err
    got = json.loads(stdout)
    assert {"images", "top1", "top5", "loss", "macro", "weighted", "ece", "per_class", "confusion",
            "top_confusions", "calibration", "worst", "tta"} <= set(got)
    assert got["images"] == 18 and got["tta"] is False
    assert got["top1"] == pytest.approx((pred == case.y).mean())

    precision, recall, f1, support = precision_recall_fscore_support(case.y, pred, labels=EVALUATED,
                                                                     zero_division=0)
    rows = got["per_class"]
    assert [r["class"] for r in rows] == list(CLASSES) and [r["support"] for r in rows] == support.tolist()
    for key, want in (("precision", precision), ("recall", recall), ("f1", f1)):
        assert [r[key] for r in rows] == pytest.approx(want.tolist()), key
    for average in ("macro", "weighted"):
        want = precision_recall_fscore_support(case.y, pred, labels=EVALUATED, average=average, zero_division=0)
        assert [got[average][k] for k in ("precision", "recall", "f1")] == pytest.approx(list(want[:3])), average
    with out["pc.csv"].open() as f:
        assert [{k: float(v) for k, v in r.items() if k != "class"} for r in csv.DictReader(f)] == \
            [{k: v for k, v in r.items() if k != "class"} for r in rows]

    other = [int(((case.y == k) & (pred >= 3)).sum()) for k in EVALUATED]
    want_matrix = np.column_stack([confusion_matrix(case.y, pred, labels=EVALUATED), other]).tolist()
    assert got["confusion"] == {"classes": list(CLASSES), "columns": [*CLASSES, "(other)"], "counts": want_matrix}
    with out["cm.csv"].open() as f:
        assert list(csv.reader(f)) == [["true \\ predicted", *CLASSES, "(other)"],
                                       *[[c, *map(str, r)] for c, r in zip(CLASSES, want_matrix)]]

    ece, sizes = direct_ece(confidence.astype(np.float64), pred == case.y)
    assert got["ece"] == got["calibration"]["ece"] == pytest.approx(ece, abs=1e-6) and ece > 0.01
    assert [b["images"] for b in got["calibration"]["bins"]] == sizes and sum(s > 0 for s in sizes) >= 3

    assert [(c["true"], c["predicted"], c["images"]) for c in got["top_confusions"]] == \
        [(LABELS[t], LABELS[p], n) for (t, p), n in confusions(case.y, pred)]
    p_true = probs[np.arange(18), case.y]
    order = np.argsort(p_true, kind="stable")[:4]
    assert [w["path"] for w in got["worst"]] == [case.paths[i] for i in order]
    assert [w["true_probability"] for w in got["worst"]] == pytest.approx(p_true[order].tolist(), abs=1e-6)
    assert [w["predicted"] for w in got["worst"]] == [LABELS[pred[i]] for i in order]

    assert_real_png(out["cm.png"])
    assert_real_png(out["rel.png"])


@pytest.mark.slow
def test_tta_is_the_mean_logits_of_image_and_mirror(case, run_cli):
    plain = case.logits.softmax(-1).numpy()[np.arange(18), case.y]
    flipped = case.tta_logits.softmax(-1).numpy()[np.arange(18), case.y]
    assert np.abs(plain - flipped).max() > 1e-3  # the mirror images change the answer: TTA is visible

    code, stdout, err = run_cli(*base_args(case), "--format", "json", "--tta", "--worst", "18")
    assert code == 0, err
    got = json.loads(stdout)
    assert got["tta"] is True
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(case.tta_logits,
                                                                          torch.tensor(case.y)).item(), rel=1e-5)
    reported = {w["path"]: w["true_probability"] for w in got["worst"]}
    assert [reported[p] for p in case.paths] == pytest.approx(flipped.tolist(), abs=1e-6)


@pytest.mark.slow
def test_text_report_is_readable(case, run_cli):
    probs = case.logits.softmax(-1).numpy()
    pred = probs.argmax(1)
    code, stdout, err = run_cli(*base_args(case), "--worst", "2")
    assert code == 0 and err == "", err
    lines = stdout.splitlines()
    assert lines[0].startswith("images 18  top-1 ")
    assert lines[1].startswith("macro     precision ") and lines[2].startswith("weighted  precision ")
    assert lines[3].startswith("ECE 0.")
    assert lines[4].split() == ["class", "images", "top-1", "top-5", "precision", "recall", "f1"]
    assert [line.split()[:2] for line in lines[5:8]] == [[c, "6"] for c in CLASSES]
    (true, predicted), n = confusions(case.y, pred)[0]
    assert lines[8] == "top confusions (true -> predicted: images):"
    assert lines[9] == f"  {LABELS[true]} -> {LABELS[predicted]}: {n}"
    worst = lines.index("worst 2 images (lowest probability of the true class):")
    first = int(np.argmin(probs[np.arange(18), case.y]))
    assert lines[worst + 1].endswith(case.paths[first]) and len(lines) == worst + 3


@pytest.mark.parametrize("flag", ["--per-class-csv", "--confusion-csv", "--confusion-png", "--reliability-png"])
def test_an_output_that_is_a_folder_is_refused_before_the_model_loads(flag, run_cli, tmp_path):
    (tmp_path / "taken").mkdir()
    code, out, err = run_cli("evaluate", "--data", str(tmp_path), "--weights", str(tmp_path / "no-such-model"),
                             flag, str(tmp_path / "taken"))
    assert code == 1 and out == ""
    assert one_error_line(err) == f"ecanfnet: error: {tmp_path / 'taken'}: is a folder; give a file name"


def test_unwritable_and_shared_outputs_are_refused(run_cli, tmp_path):
    base = ["evaluate", "--data", str(tmp_path), "--weights", str(tmp_path / "no-such-model")]
    code, out, err = run_cli(*base, "--confusion-png", "/proc/cm.png")
    assert code == 1 and err.count("\n") == 1 and err.startswith("ecanfnet: error: /proc/cm.png: "), err
    code, out, err = run_cli(*base, "--confusion-csv", str(tmp_path / "x.csv"),
                             "--per-class-csv", str(tmp_path / "sub" / ".." / "x.csv"))
    assert code == 1 and one_error_line(err) == \
        f"ecanfnet: error: --per-class-csv and --confusion-csv name the same file {tmp_path / 'x.csv'}", err
    assert list(tmp_path.iterdir()) == []


def test_pngs_without_matplotlib_name_the_extra(run_cli, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run_cli("evaluate", "--data", str(tmp_path), "--weights", str(tmp_path / "no-such-model"),
                             "--reliability-png", str(tmp_path / "r.png"))
    assert code == 1 and one_error_line(err) == \
        "ecanfnet: error: --reliability-png needs matplotlib: pip install 'ecanfnet[train]'"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["-1", "x", "1.5", ""])
def test_bad_worst_is_a_usage_error(value, capsys, tmp_path):
    from ecanfnet.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--data", str(tmp_path), "--worst", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument --worst: must be an integer >= 0, got {value}" in err, err
