"""End-to-end prediction on real-photo JPEGs: timm's own pipeline against `ecanfnet predict`, exact and fastest.

Default (--mode pipelines): writes two folders from the real photos shipped with scikit-image and
scikit-learn, 4032x3024 JPEGs (quality 90, sensor-like grain, ~2.5 MB) and 640x480 JPEGs, and runs
on each, alternating, round after round, each as its own process the way a user would:
  - timm's pipeline: timm.create_model (same randomised weights), its eval transform at the test size
    (288), a DataLoader with 2 worker processes, eager fp32, batch 16;
  - `ecanfnet predict --format json` (exact: the default decode, backend auto, fp32);
  - `ecanfnet predict --fast` on an INT8 folder made by `ecanfnet quantize` (calibrated on the 640x480 photos).
Images/s are timed in this process, alternating, with each model loaded and warmed up beforehand
(what each command does once started: the CLI is a thin layer over these calls; timm's DataLoader
workers start within the timing, as they do on every run). Peak RSS is each command run as its own
process on the folder (VmHWM of that process, polled; timm's two worker processes come on top of it).

--mode in-process: `predict` throughput against model-only throughput, same backend and batch. Writes N photos (crops and flips of the real photos shipped with scikit-image and scikit-learn)
as JPEGs, then times Classifier.predict_files over them (decode + resize in worker threads
while the model runs), with the exact decode and with decode="fast", and the model alone on ready
tensors of the same batch size, alternating round by round.

--size 4032x3024 writes phone-size JPEGs (quality 90, upscaled crops; --grain adds sensor-like noise
so the files weigh what real 12 MP photos do); --stages also reports where one image's time goes,
stage by stage in one thread (decode, resize + crop, to tensor + normalise, model per image at the
batch size), for both decodes.

    python benchmarks/predict.py                                    # the pipelines, 96 photos per folder
    python benchmarks/predict.py --mode in-process --images 200 --backend onnxruntime
    python benchmarks/predict.py --mode in-process --images 48 --size 4032x3024 --grain 4 --stages
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

from ecanfnet.testing import photo_arrays, random_crop

from ecanfnet import Classifier, build_model  # noqa: E402
from ecanfnet.transforms import image_loader  # noqa: E402

DECODES = ("exact", "fast")


def write_photos(folder: Path, count: int, size: tuple[int, int] | None = None, grain: float = 0.0) -> list[str]:
    """count JPEGs: 3/4 crops of the photos at their own size (quality 92), or 4:3 crops resized to size (quality 90)."""
    photos = list(photo_arrays().values())
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        arr = photos[i % len(photos)]
        if size is None:
            crop = random_crop(arr, rng, 3 / 4)
        else:
            side = min(arr.shape[1] / size[0], arr.shape[0] / size[1])
            crop = arr[: int(size[1] * side), : int(size[0] * side)]
        if i % 2:
            crop = crop[:, ::-1]
        img = Image.fromarray(np.ascontiguousarray(crop))
        if size is not None:
            img = img.resize(size, Image.Resampling.BICUBIC)
        if grain:
            noisy = np.asarray(img, np.float32) + rng.normal(0, grain, (img.height, img.width, 1)).astype(np.float32)
            img = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
        path = folder / f"photo_{i:04d}.jpg"
        img.save(path, quality=92 if size is None else 90)
        paths.append(str(path))
    return paths


def stage_times(clf: Classifier, paths: list[str], decode: str, batch_size: int) -> dict[str, float]:
    """Seconds per image of each stage, run one after the other in this thread."""
    load = image_loader(clf.transform, decode=decode)
    totals = dict.fromkeys(("decode", "resize + crop", "to tensor + normalise", "stack", "model"), 0.0)
    tensors = []
    for path in paths:
        t0 = time.perf_counter()
        img = load(path)
        t1 = time.perf_counter()
        crop = clf.transform.resize_and_crop(img)
        t2 = time.perf_counter()
        tensors.append(clf.transform.to_tensor(crop))
        t3 = time.perf_counter()
        totals["decode"] += t1 - t0
        totals["resize + crop"] += t2 - t1
        totals["to tensor + normalise"] += t3 - t2
    for i in range(0, len(tensors), batch_size):
        t0 = time.perf_counter()
        batch = torch.stack(tensors[i:i + batch_size])
        t1 = time.perf_counter()
        clf.runner(batch)
        t2 = time.perf_counter()
        totals["stack"] += t1 - t0
        totals["model"] += t2 - t1
    return {k: v / len(paths) for k, v in totals.items()}


TIMM_PIPELINE = """
import json, sys, torch, timm
from pathlib import Path
from PIL import Image
from timm.data import create_transform, resolve_data_config

def timm_pipeline(model, paths, batch):
    transform = create_transform(**resolve_data_config({}, model=model, use_test_size=True))
    class Files(torch.utils.data.Dataset):
        def __len__(self): return len(paths)
        def __getitem__(self, i): return transform(Image.open(paths[i]).convert("RGB")), i
    with torch.inference_mode():
        for x, idx in torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=2):
            top = model(x).softmax(-1).topk(5)
            for i, classes in zip(idx.tolist(), top.indices.tolist()):
                yield {"path": paths[i], "top5": classes}

if __name__ == "__main__":
    folder, weights, batch = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    model = timm.create_model("eca_nfnet_l0", pretrained=True, pretrained_cfg_overlay=dict(file=weights)).eval()
    for row in timm_pipeline(model, sorted(str(p) for p in folder.iterdir()), batch):
        print(json.dumps(row), flush=True)
"""


def peak_rss_mb(cmd: list[str]) -> float:
    """Run cmd to the end; the largest VmHWM its own process reached (polled; MB). Its children are not counted."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peak = 0.0
    while proc.poll() is None:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        except OSError:
            pass
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} exited with {proc.returncode}")
    return peak


def pipelines(args: argparse.Namespace) -> None:
    """timm's pipeline, `ecanfnet predict` exact and `ecanfnet predict --fast` on two folders (see the docstring)."""
    import timm
    from timm.models import save_for_hf

    from ecanfnet.testing import timm_model
    from ecanfnet import create_model

    namespace: dict = {"__name__": "timm_pipeline"}
    exec(TIMM_PIPELINE, namespace)  # the same code as the child process runs, in this process for the timing
    folders = {"4032x3024": ((4032, 3024), 4.0), "640x480": ((640, 480), 0.0)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_for_hf(timm_model("eca_nfnet_l0", seed=0), str(tmp / "fp32"), safe_serialization=True)
        paths, sizes = {}, {}
        for name, (size, grain) in folders.items():
            (tmp / name).mkdir()
            paths[name] = write_photos(tmp / name, args.images, size, grain)
            sizes[name] = statistics.mean(Path(p).stat().st_size for p in paths[name]) / 1e6
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        ecanfnet = [sys.executable, "-m", "ecanfnet"]
        subprocess.run(ecanfnet + ["quantize", "--weights", str(tmp / "fp32"), "--calibration", str(tmp / "640x480"),
                                   "--output", str(tmp / "int8"), "--min-agreement", "0", "--no-progress"],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        weights = str(tmp / "fp32" / "model.safetensors")
        timm_net = timm.create_model("eca_nfnet_l0", pretrained=True, pretrained_cfg_overlay=dict(file=weights)).eval()
        exact = Classifier(create_model(pretrained=tmp / "fp32"), "cpu", "auto", None, batch_size=args.batch_size)
        fast = Classifier(create_model(pretrained=tmp / "int8", int8_ok=True), "cpu", "auto", "fastest",
                          batch_size=args.batch_size)
        b = args.batch_size
        runs = {  # what each command does once its model is loaded (the CLI is a thin layer over these)
            "timm pipeline": lambda p: list(namespace["timm_pipeline"](timm_net, p, b)),
            "ecanfnet predict (exact)": lambda p: list(exact.predict_files(p, batch_size=b)),
            "ecanfnet predict --fast (int8)": lambda p: list(fast.predict_files(p, batch_size=b, decode="fast")),
        }
        for folder in folders:  # warm-up: compiled shapes, first-call allocations
            for fn in runs.values():
                fn(paths[folder][:b])
        ips = {(f, n): [] for f in folders for n in runs}
        for _ in range(args.rounds):
            for folder in folders:
                for name, fn in runs.items():
                    start = time.perf_counter()
                    assert len(fn(paths[folder])) == args.images
                    ips[folder, name].append(args.images / (time.perf_counter() - start))
        predict = ["predict", "--format", "json", "--no-progress", "--batch-size", str(b)]
        commands = {
            "timm pipeline": lambda f: [sys.executable, "-c", TIMM_PIPELINE, str(f), weights, str(b)],
            "ecanfnet predict (exact)": lambda f: ecanfnet + predict + ["--weights", str(tmp / "fp32"), str(f)],
            "ecanfnet predict --fast (int8)": lambda f: ecanfnet + predict + ["--fast", "--weights", str(tmp / "int8"), str(f)],
        }
        rss = {(f, n): peak_rss_mb(cmd(tmp / f)) for f in folders for n, cmd in commands.items()}
    print(f"# {args.images} JPEGs per folder, batch {b}, {args.rounds} rounds alternating; images/s: median of rounds, "
          "model loaded beforehand; peak RSS: the command run as its own process")
    for folder in folders:
        print(f"\n## {folder} JPEGs, {sizes[folder]:.2f} MB on average")
        print("| pipeline | images/s | vs timm pipeline | peak RSS (MB) | vs timm |")
        print("|---|---|---|---|---|")
        anchor, anchor_rss = statistics.median(ips[folder, "timm pipeline"]), rss[folder, "timm pipeline"]
        for name in runs:
            value = statistics.median(ips[folder, name])
            print(f"| {name} | {value:.2f} | {value / anchor:.2f}x | {rss[folder, name]:.0f} | "
                  f"{rss[folder, name] / anchor_rss:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"images_per_s": {f"{f} / {n}": v for (f, n), v in ips.items()},
                                         "peak_rss_mb": {f"{f} / {n}": v for (f, n), v in rss.items()}}, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("pipelines", "in-process"), default="pipelines")
    parser.add_argument("--json", type=Path, help="pipelines: also write every round's numbers here")
    parser.add_argument("--images", type=int, default=None, help="photos per folder (default: 96 pipelines, 200 in-process)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", default=None, metavar="WxH", help="resize the photos to this size (e.g. 4032x3024)")
    parser.add_argument("--grain", type=float, default=0.0, metavar="SIGMA", help="add Gaussian noise of this sigma")
    parser.add_argument("--stages", action="store_true", help="also time each stage, exact and fast decode")
    args = parser.parse_args()
    if args.mode == "pipelines":
        args.images = args.images or 96
        pipelines(args)
        return
    args.images = args.images or 200
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None

    clf = Classifier(build_model().eval(), "cpu", args.backend, "fp32")
    side = clf.transform.image_size
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_photos(Path(tmp), args.images, size, args.grain)
        mb = statistics.mean(Path(p).stat().st_size for p in paths) / 1e6
        batch = torch.randn(args.batch_size, 3, *side)
        clf.runner(batch)  # warm-up
        for decode in DECODES:
            list(clf.predict_files(paths[: args.batch_size * 2], batch_size=args.batch_size, workers=args.workers,
                                   decode=decode))

        n_batches = -(-args.images // args.batch_size)
        model_only: list[float] = []
        end_to_end: dict[str, list[float]] = {d: [] for d in DECODES}
        for _ in range(args.rounds):  # alternate, so drifts in machine speed hit all alike
            start = time.perf_counter()
            for _ in range(n_batches):
                clf.runner(batch)
            model_only.append(n_batches * args.batch_size / (time.perf_counter() - start))
            for decode in DECODES:
                start = time.perf_counter()
                results = list(clf.predict_files(paths, batch_size=args.batch_size, workers=args.workers,
                                                 decode=decode))
                end_to_end[decode].append(len(results) / (time.perf_counter() - start))
                assert all(r.ok for r in results)
        stages = {d: stage_times(clf, paths, d, args.batch_size) for d in DECODES} if args.stages else None

    what = f"{args.size} (quality 90{f', grain sigma {args.grain:g}' if args.grain else ''})" if size else "photo-size"
    print(f"backend {clf.runner.backend}, batch {args.batch_size}, {args.images} {what} JPEGs of {mb:.2f} MB on average, "
          f"model input {side[0]}x{side[1]}, {torch.get_num_threads()} torch threads")
    print(f"model only     : {statistics.median(model_only):6.2f} images/s  (rounds: {_fmt(model_only)})")
    for decode in DECODES:
        ratios = [e / m for e, m in zip(end_to_end[decode], model_only)]
        print(f"predict {decode:6} : {statistics.median(end_to_end[decode]):6.2f} images/s  "
              f"(rounds: {_fmt(end_to_end[decode])}); {statistics.median(ratios):.2f}x of model-only")
    if stages:
        print("\nper image, one thread (ms; share of the sum):")
        print("| stage | " + " | ".join(f"{d} decode" for d in DECODES) + " |")
        print("|---|" + "---|" * len(DECODES))
        for stage in stages["exact"]:
            cells = [f"{1000 * stages[d][stage]:.1f} ({100 * stages[d][stage] / sum(stages[d].values()):.0f} %)"
                     for d in DECODES]
            print(f"| {stage} | " + " | ".join(cells) + " |")
        print("| sum | " + " | ".join(f"{1000 * sum(stages[d].values()):.1f}" for d in DECODES) + " |")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
