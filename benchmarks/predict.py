"""End-to-end `predict` throughput against model-only throughput, same backend and batch, one run.

Writes N photos (crops and flips of the real photos shipped with scikit-image and scikit-learn)
as JPEGs, then times Classifier.predict_files over them (decode + resize in worker threads
while the model runs) and the model alone on ready tensors of the same batch size.

    python benchmarks/predict.py --images 200 --backend onnxruntime
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import photo_arrays, random_crop  # noqa: E402

from ecanfnet import Classifier, build_model  # noqa: E402


def write_photos(folder: Path, count: int) -> list[str]:
    photos = list(photo_arrays().values())
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        crop = random_crop(photos[i % len(photos)], rng, 3 / 4)
        if i % 2:
            crop = crop[:, ::-1]
        path = folder / f"photo_{i:04d}.jpg"
        Image.fromarray(np.ascontiguousarray(crop)).save(path, quality=92)
        paths.append(str(path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    clf = Classifier(build_model().eval(), "cpu", args.backend, "fp32")
    size = clf.transform.image_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp), args.images)
        batch = torch.randn(args.batch_size, 3, *size)
        clf.runner(batch)  # warm-up
        for _ in range(2):
            list(clf.predict_files(paths[: args.batch_size * 2], batch_size=args.batch_size, workers=args.workers))

        n_batches = -(-args.images // args.batch_size)
        model_only, end_to_end = [], []
        for _ in range(args.rounds):  # alternate, so drifts in machine speed hit both alike
            start = time.perf_counter()
            for _ in range(n_batches):
                clf.runner(batch)
            model_only.append(n_batches * args.batch_size / (time.perf_counter() - start))
            start = time.perf_counter()
            results = list(clf.predict_files(paths, batch_size=args.batch_size, workers=args.workers))
            end_to_end.append(len(results) / (time.perf_counter() - start))
    assert all(r.ok for r in results)
    print(f"backend {clf.runner.backend}, batch {args.batch_size}, {args.images} JPEG photos, {size}x{size}")
    ratios = [e / m for e, m in zip(end_to_end, model_only)]
    print(f"model only : {statistics.median(model_only):6.2f} images/s  (rounds: {_fmt(model_only)})")
    print(f"predict    : {statistics.median(end_to_end):6.2f} images/s  (rounds: {_fmt(end_to_end)})")
    print(f"ratio      : {statistics.median(ratios):6.2f}x of model-only (rounds: {_fmt(ratios)})")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
