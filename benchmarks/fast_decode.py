"""Fast decode (JPEG at a reduced DCT scale) against the exact path: speed, PSNR, logits, one run.

Writes the real photos shipped with scikit-image and scikit-learn as phone-size JPEGs (4032x3024,
quality 90, upscaled from random 4:3 crops), the same with sensor-like grain added (the upscaled
photos are smoother than a real 12 MP photo, which favours the reduced decode), and as 640x480
JPEGs. For each folder it times decode + eval preprocessing in a pool of --threads threads,
exact and fast alternating round by round, and compares the network inputs (PSNR on the 0..1 pixel
scale) and the logits of a model (randomly initialised unless --weights is given): max logit error
and top-1 / top-5 agreement of fast with exact.

    python benchmarks/fast_decode.py --images 24 --rounds 3
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


from ecanfnet.testing import input_psnr
from predict import write_photos  # noqa: E402  (the same 4:3 photo folders as benchmarks/predict.py)

from ecanfnet import Classifier, build_model  # noqa: E402
from ecanfnet.transforms import image_loader  # noqa: E402

FOLDERS = {"4032x3024": ((4032, 3024), 0.0), "4032x3024 + grain": ((4032, 3024), 4.0), "640x480": ((640, 480), 0.0)}


def preprocess_all(paths: list[str], clf: Classifier, decode: str, threads: int) -> list[torch.Tensor]:
    load = image_loader(clf.transform, decode=decode)
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda p: clf.transform(load(p)), paths))




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="images per folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="decoding threads")
    parser.add_argument("--weights", default=None, help="weights for the logit comparison (default: random init)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model().eval() if args.weights is None else None
    clf = Classifier(model, "cpu", "torch") if model is not None else Classifier.from_pretrained(args.weights, "cpu", "torch")
    std = clf.transform.std
    print(f"weights: {args.weights or 'random init'}; {args.threads} decoding threads; {args.images} images per folder; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (size, grain) in FOLDERS.items():
            folder = Path(tmp) / name.replace(" ", "_").replace("+", "")
            folder.mkdir(parents=True)
            paths = write_photos(folder, args.images, size, grain)
            mb = statistics.mean(Path(p).stat().st_size for p in paths) / 1e6
            preprocess_all(paths[:2], clf, "exact", args.threads)  # warm-up
            speed: dict[str, list[float]] = {"exact": [], "fast": []}
            for _ in range(args.rounds):
                for decode in ("exact", "fast"):
                    start = time.perf_counter()
                    inputs = preprocess_all(paths, clf, decode, args.threads)
                    speed[decode].append(len(paths) / (time.perf_counter() - start))
            exact = torch.stack(preprocess_all(paths, clf, "exact", args.threads))
            fast = torch.stack(preprocess_all(paths, clf, "fast", args.threads))
            del inputs
            psnrs = [input_psnr(f, e, std) for f, e in zip(fast, exact)]
            with torch.no_grad():
                le = torch.cat([clf.runner(exact[i:i + args.batch_size]) for i in range(0, len(paths), args.batch_size)])
                lf = torch.cat([clf.runner(fast[i:i + args.batch_size]) for i in range(0, len(paths), args.batch_size)])
            err = (lf - le).abs().max().item()
            spread = (le.max(-1).values - le.min(-1).values).mean().item()
            top1 = (lf.argmax(-1) == le.argmax(-1)).float().mean().item()
            t5e, t5f = le.topk(5, -1).indices, lf.topk(5, -1).indices
            top5 = statistics.mean(len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(t5e, t5f))
            top5_same = (t5e == t5f).all(-1).float().mean().item()
            ex, fa = statistics.median(speed["exact"]), statistics.median(speed["fast"])
            rows.append((name, mb, ex, fa, fa / ex, min(psnrs), statistics.median(psnrs), err, err / spread,
                         top1, top5, top5_same))
            print(f"{name}: exact rounds {_fmt(speed['exact'])}, fast rounds {_fmt(speed['fast'])}", flush=True)
    print()
    print("| JPEGs | MB each | exact img/s | fast img/s | speed-up | PSNR min / median (dB) | max logit error "
          "(abs; / logit range) | top-1 agreement | top-5 overlap | top-5 identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, mb, ex, fa, ratio, pmin, pmed, err, rel, top1, top5, same in rows:
        print(f"| {name} | {mb:.2f} | {ex:.2f} | {fa:.2f} | {ratio:.2f}x | {_db(pmin)} / {_db(pmed)} | "
              f"{err:.3g}; {rel:.2e} | {top1:.3f} | {top5:.3f} | {same:.3f} |")


def _db(v: float) -> str:
    return "inf (identical)" if math.isinf(v) else f"{v:.1f}"


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
