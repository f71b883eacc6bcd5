"""Open-set scores on a model trained here: how well each separates in- from out-of-distribution images.

1. Writes scikit-learn's 1,797 digit scans (8x8, upscaled to --image-size) as class folders and holds out a
   seeded 20 % of each class (the in-distribution test images: never trained on).
2. Trains from scratch on the rest with `train`'s defaults, except --hflip 0 (mirrored digits are other shapes).
3. Scores the held-out scans and three out-of-distribution sets of real photos, none of them digits:
   - colour: random crops of scikit-image's and scikit-learn's colour photos (chelsea, coffee, astronaut, rocket,
     china, flower, hubble_deep_field, immunohistochemistry, retina);
   - grey: the same crops in greyscale (no colour cue: digits are grey);
   - grey photos: random crops of scikit-image's greyscale photos (camera, coins, moon, page, text, clock,
     brick, grass, gravel, cell).
4. Prints, for the open-set score `predict` reports (largest cosine similarity to a class's weights) and for
   energy (logsumexp of the logits), max-logit and max-softmax: AUROC (sklearn roc_auc_score; in-distribution
   positive) and the share of each out-of-distribution set below the threshold that keeps 95 % of the held-out
   scans (what `--min-score` set there would turn into `unknown`).

    python benchmarks/open_set.py [--epochs 10] [--image-size 32] [--crops 40]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from int8_digits import split_held_out  # noqa: E402
from train_digits import write_digits  # noqa: E402

from ecanfnet.inference import Classifier
from ecanfnet.testing import photo_arrays, random_crop
from ecanfnet.training.config import TrainConfig
from ecanfnet.training.loop import train
from ecanfnet.transforms import load_image

COLOUR = ("hubble_deep_field", "immunohistochemistry", "retina")
GREY = ("camera", "coins", "moon", "page", "text", "clock", "brick", "grass", "gravel", "cell")
SCORES = ("open_set_score (cosine)", "energy", "max-logit", "max-softmax")


def crops(photos: dict[str, np.ndarray], per_photo: int, seed: int) -> list[Image.Image]:
    """per_photo random crops of each photo, keeping 30-80 % of each side."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(random_crop(arr, rng, float(rng.uniform(0.3, 0.8))))
            for arr in photos.values() for _ in range(per_photo)]


def out_of_distribution(per_photo: int) -> dict[str, list[Image.Image]]:
    """The three out-of-distribution sets (see the module docstring)."""
    from skimage import data

    colour = {**photo_arrays(), **{name: getattr(data, name)() for name in COLOUR}}
    grey = {name: np.stack([getattr(data, name)()] * 3, axis=-1) for name in GREY}
    colour_crops = crops(colour, per_photo, seed=1)
    return {"colour photos": colour_crops, "the same, grey": [c.convert("L").convert("RGB") for c in colour_crops],
            "grey photos": crops(grey, per_photo, seed=2)}


def all_scores(clf: Classifier, images: list[Image.Image], batch: int = 64) -> dict[str, np.ndarray]:
    """Each score of SCORES for each image (higher = more like the training data)."""
    parts = []
    for i in range(0, len(images), batch):
        x = torch.stack([clf.transform(im.convert("RGB")) for im in images[i:i + batch]])
        embeddings = clf.trunk(x)
        parts.append((clf.head.open_set_scores(embeddings), clf.head.logits(embeddings)))
    cosine, logits = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    values = (cosine, logits.logsumexp(-1), logits.amax(-1), logits.softmax(-1).amax(-1))
    return {name: v.numpy() for name, v in zip(SCORES, values)}


def table(inside: dict[str, np.ndarray], outside: dict[str, dict[str, np.ndarray]]) -> list[str]:
    """Markdown rows: per score, AUROC and share flagged at the 95 %-kept threshold, per out-of-distribution set."""
    from sklearn.metrics import roc_auc_score

    head = " | ".join(f"{name}: AUROC / unknown at 95 % kept" for name in outside)
    rows = [f"| score | {head} |", "|---|" + "---|" * len(outside)]
    for score in SCORES:
        cells = []
        threshold = np.quantile(inside[score], 0.05)
        for sets in outside.values():
            ood = sets[score]
            auroc = roc_auc_score(np.r_[np.ones(len(inside[score])), np.zeros(len(ood))], np.r_[inside[score], ood])
            cells.append(f"{auroc:.3f} / {100 * np.mean(ood < threshold):.0f} %")
        rows.append(f"| {score} | " + " | ".join(cells) + " |")
    return rows


def cpu_description() -> str:
    """The CPU model and the vector extensions that matter for inference speed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")
              if f in flags]
    return f"{model}, {torch.get_num_threads()} threads, flags: {' '.join(wanted) or 'none of avx2/avx512/amx'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32, help="the scans are 8x8: 32 px keeps every detail")
    parser.add_argument("--crops", type=int, default=40, help="random crops per out-of-distribution photo")
    parser.add_argument("--keep", type=Path, default=None,
                        help="train into this folder and keep it; if it holds a model already, score that one")
    args = parser.parse_args()
    print(cpu_description())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_digits(root / "digits", size=args.image_size)
        split_held_out(root / "digits", root / "held_out")  # seeded: the same scans each run
        out = args.keep or root / "model"
        if not (out / "config.json").exists():
            start = time.perf_counter()
            train(TrainConfig(data=str(root / "digits"), output=str(out), from_scratch=True, epochs=args.epochs,
                              image_size=args.image_size, hflip=0.0, workers=2, progress=False))
            print(f"trained {args.epochs} epochs at {args.image_size} px in {time.perf_counter() - start:.0f} s")
        clf = Classifier.from_pretrained(out, "cpu", "torch")
        held = sorted((root / "held_out").rglob("*.png"))
        inside = all_scores(clf, [load_image(p) for p in held])
        top1 = np.mean([r.label == p.parent.name for r, p in zip(clf.predict_files([str(p) for p in held]), held)])
    outside = {name: all_scores(clf, images) for name, images in out_of_distribution(args.crops).items()}
    sizes = ", ".join(f"{name} {len(next(iter(s.values())))}" for name, s in outside.items())
    print(f"held-out scans: {len(held)} (top-1 {100 * top1:.1f} %); out of distribution: {sizes}\n")
    print("\n".join(table(inside, outside)))


if __name__ == "__main__":
    main()
