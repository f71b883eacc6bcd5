"""INT8 accuracy on a model trained here: scikit-learn's digits, fp32 against `ecanfnet quantize`'s INT8.

1. Writes the 1,797 digit scans (64 px) as class folders and holds out a seeded 20 % of each class.
2. `ecanfnet train --from-scratch --hflip 0` on the rest (--epochs, default 15: a few minutes per
   epoch-batch on 2 cores; the full 60-epoch recipe is in docs/benchmarks.md).
3. `ecanfnet quantize` calibrated on (a sample of) the training scans, with the held-out scans as --val:
   its report has top-1 of fp32 and INT8 on images neither calibration nor training saw.
4. `ecanfnet evaluate` of both models on the held-out scans, as an independent check of the report.
5. Optionally (--max-drop POINTS) the same with NNCF's accuracy-controlled quantization.

    python benchmarks/int8_digits.py [--epochs 15] [--max-drop 0.5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from train_digits import write_digits  # noqa: E402

ECANFNET = [sys.executable, "-m", "ecanfnet"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def split_held_out(root: Path, held: Path, share: float = 0.2, seed: int = 0) -> int:
    """Move a seeded `share` of each class folder of root into held/CLASS; return how many moved."""
    rng, moved = random.Random(seed), 0
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        (held / folder.name).mkdir(parents=True)
        for path in rng.sample(files, round(share * len(files))):
            shutil.move(str(path), held / folder.name / path.name)
            moved += 1
    return moved


def cli(*args: str) -> str:
    done = subprocess.run(ECANFNET + list(args), env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ecanfnet {args[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--samples", type=int, default=300, help="calibration scans (quantize --samples)")
    parser.add_argument("--max-drop", type=float, default=None, help="also run accuracy-controlled quantization")
    parser.add_argument("--keep", type=Path, default=None, help="copy the trained and INT8 models here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        total = write_digits(tmp / "train")
        held = split_held_out(tmp / "train", tmp / "held")
        start = time.perf_counter()
        cli("train", "--data", str(tmp / "train"), "--val", str(tmp / "held"), "--output", str(tmp / "fp32"),
            "--from-scratch", "--epochs", str(args.epochs), "--image-size", "64", "--hflip", "0", "--no-progress")
        trained = time.perf_counter() - start
        runs = {"default": []}
        if args.max_drop is not None:
            runs["accuracy-control"] = ["--max-drop", str(args.max_drop)]
        reports = {}
        for name, extra in runs.items():
            out = tmp / f"int8-{name}"
            reports[name] = json.loads(cli("quantize", "--weights", str(tmp / "fp32"), "--calibration", str(tmp / "train"),
                                           "--val", str(tmp / "held"), "--output", str(out), "--samples",
                                           str(args.samples), "--format", "json", "--no-progress", *extra))
            reports[name]["evaluate_int8"] = json.loads(cli("evaluate", "--weights", str(out), "--data",
                                                            str(tmp / "held"), "--format", "json", "--no-progress"))
        fp32 = json.loads(cli("evaluate", "--weights", str(tmp / "fp32"), "--data", str(tmp / "held"),
                              "--format", "json", "--no-progress"))
        if args.keep:
            for name in ["fp32", *(f"int8-{n}" for n in runs)]:
                shutil.copytree(tmp / name, args.keep / name, dirs_exist_ok=True)

    print(f"## digits: {total} scans, {held} held out (never trained or calibrated on), "
          f"{args.epochs} epochs from scratch in {trained:.0f} s")
    print(f"`ecanfnet evaluate`, fp32: top-1 {100 * fp32['top1']:.2f}%  top-5 {100 * fp32['top5']:.2f}%")
    print("| quantization | calibration scans | held-out top-1 fp32 | held-out top-1 int8 | drop (points) "
          "| evaluate int8 top-1 | quantize time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in reports.items():
        v = r["validation"]
        print(f"| {name} | {r['calibration']['images']} | {100 * v['top1_fp32']:.2f}% | {100 * v['top1_int8']:.2f}% "
              f"| {v['drop_points']:.2f} | {100 * r['evaluate_int8']['top1']:.2f}% | {r['seconds']:.0f} |")
        h = r["held_out"]
        print(f"  (agreement on {h['images']} calibration-folder hold-outs: top-1 {100 * h['top1_agreement']:.1f}%, "
              f"top-5 {100 * h['top5_agreement']:.1f}%, max logit error {h['logit_max_rel_error']:.2e} relative)")


if __name__ == "__main__":
    main()
