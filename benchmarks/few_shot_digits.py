"""Few-shot fine-tuning with the defaults, 20 images per class, from a backbone pretrained here.

The published ImageNet weights cannot be downloaded on machines without the Hugging Face Hub, so the
"pretrained" backbone is made in this run: `ecanfnet train --from-scratch` on scikit-learn's digits
0-4 (all ~900 scans, 64 px). Then `ecanfnet train --weights BACKBONE` with the fine-tuning defaults on
20 images each of the unseen digits 5-9, evaluated on every other scan of 5-9 (~800). The anchor is
the same 100 images trained from scratch with the defaults.

    python benchmarks/few_shot_digits.py [--pretrain-epochs 20] [--shots 20]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ecanfnet import create_model
from ecanfnet.evaluate import evaluate_folder
from ecanfnet.training.config import TrainConfig
from ecanfnet.training.loop import train
from train_digits import write_digits


def split_digits(all_digits: Path, root: Path, shots: int) -> tuple[Path, Path, Path]:
    """pretrain/ (digits 0-4, all), few/ (digits 5-9, `shots` each), test/ (the rest of 5-9)."""
    pretrain, few, test = root / "pretrain", root / "few", root / "test"
    rng = torch.Generator().manual_seed(0)
    for folder in sorted(all_digits.iterdir()):
        files = sorted(folder.iterdir())
        if int(folder.name) < 5:
            shutil.copytree(folder, pretrain / folder.name)
            continue
        order = torch.randperm(len(files), generator=rng).tolist()
        for rank, i in enumerate(order):
            dest = (few if rank < shots else test) / folder.name
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(files[i], dest / files[i].name)
    return pretrain, few, test


def timed_train(**settings) -> tuple[Path, float]:
    start = time.perf_counter()
    out = train(TrainConfig(image_size=64, workers=2, **settings))
    return out, time.perf_counter() - start


def test_top1(out: Path, test: Path) -> float:
    with torch.no_grad():
        return evaluate_folder(create_model(pretrained=out), test).top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--shots", type=int, default=20, help="training images per new class")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_digits(tmp / "all")
        pretrain, few, test = split_digits(tmp / "all", tmp, args.shots)
        backbone, t_pre = timed_train(data=str(pretrain), output=str(tmp / "backbone"), from_scratch=True,
                                      epochs=args.pretrain_epochs)
        tuned, t_tune = timed_train(data=str(few), output=str(tmp / "tuned"), weights=str(backbone))
        scratch, t_scratch = timed_train(data=str(few), output=str(tmp / "scratch"), from_scratch=True)
        n_test = sum(1 for _ in test.rglob("*.png"))
        print(f"\n## {args.shots} images per class of digits 5-9 (64 px), tested on the other {n_test} scans")
        print(f"backbone: from scratch on digits 0-4, {args.pretrain_epochs} epochs, {t_pre:.0f} s")
        print(f"fine-tuned from the backbone, defaults: test top-1 {100 * test_top1(tuned, test):.1f}%  ({t_tune:.0f} s)")
        print(f"from scratch, defaults (anchor):       test top-1 {100 * test_top1(scratch, test):.1f}%  "
              f"({t_scratch:.0f} s)")


if __name__ == "__main__":
    main()
