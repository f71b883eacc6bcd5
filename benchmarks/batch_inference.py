"""Classifying one folder three ways, each run as a user runs it: `predict`, `predict --output` under torchrun,
and Ray Data (examples/ray_predict.py). Wall-clock time of the whole command, start-up included.

Writes --images JPEGs (3/4 crops of the real photos of scikit-image and scikit-learn at their own size,
benchmarks/predict.py's write_photos) and an L0 checkpoint with randomised weights evaluated at --size,
then runs each variant on that folder and on a one-image folder (its start-up cost: interpreter, imports,
model load, and for the parallel ones their launcher), round after round, alternating:
  - `ecanfnet predict --format json` (one process, JSON lines on stdout);
  - `ecanfnet predict --output preds.jsonl` (one process, resumable shards);
  - `torchrun --nproc-per-node N -m ecanfnet predict --output preds.jsonl` (N processes on this machine);
  - `python examples/ray_predict.py` (a local Ray instance with --ray-cpus CPUs, N actors of
    --ray-cpus-per-actor each, Parquet out).
All run on --backend (default openvino, what `auto` picks for a folder on a CPU with OpenVINO installed; its
conversion is made once beforehand) and keep their defaults otherwise. OpenVINO runs on torch's thread
count: every core in a lone process, 1 per rank or actor under torchrun and Ray (they set OMP_NUM_THREADS).
"after start-up" is (images - 1) / (time on the folder - time on one image): the rate once running.

    python benchmarks/batch_inference.py                       # 200 images at 224, 2 rounds
    python benchmarks/batch_inference.py --images 48 --rounds 1 --size 288
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
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from predict import write_photos  # noqa: E402

from ecanfnet import create_model, save_pretrained  # noqa: E402
from ecanfnet.testing import randomize_  # noqa: E402

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_line() -> str:
    """The CPU model, its thread count and which of CPU_FLAGS it has, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{os.cpu_count()} CPUs"
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    have = [f for f in CPU_FLAGS if f in flags]
    return f"{model}, {os.cpu_count()} CPUs; flags: {' '.join(have)}; without: {' '.join(set(CPU_FLAGS) - set(have))}"


def write_weights(folder: Path, size: int) -> Path:
    """An L0 checkpoint with every tensor randomised (so no branch is zero), evaluated at size x size."""
    model = randomize_(create_model(pretrained=False))
    model.pretrained_cfg = model.pretrained_cfg.replace(test_input_size=(3, size, size), test_crop_pct=1.0)
    return save_pretrained(model, folder)


def variants(weights: Path, args: argparse.Namespace) -> dict[str, Callable[[Path, Path], list[str]]]:
    """name -> (input folder, output folder) -> the command line."""
    common = ["--weights", str(weights), "--backend", args.backend]
    ecanfnet = [sys.executable, "-m", "ecanfnet", "predict", "--no-progress", *common]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
                "-m", "ecanfnet", "predict", "--no-progress", *common]
    ray = [sys.executable, str(ROOT / "examples" / "ray_predict.py"), *common,
           "--num-cpus", str(args.ray_cpus), "--concurrency", str(args.ranks),
           "--cpus-per-actor", str(args.ray_cpus_per_actor), "--batch-size", "16"]
    return {
        "predict --format json (1 process)": lambda src, out: ecanfnet + ["--format", "json", str(src)],
        "predict --output (1 process)": lambda src, out: ecanfnet + ["--output", str(out / "p.jsonl"), str(src)],
        f"torchrun x{args.ranks} predict --output": lambda src, out: torchrun + ["--output", str(out / "p.jsonl"),
                                                                                str(src)],
        f"Ray Data, {args.ranks} actors (examples/ray_predict.py)": lambda src, out: ray + [str(src), "--output",
                                                                                         str(out / "parquet")],
    }


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds from launch to exit; RuntimeError with the end of stderr if it failed."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... exited with {proc.returncode}:\n{proc.stderr[-2000:]}")
    return seconds


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, list[float]]]:
    """{variant: {"folder": [seconds per round], "one": [seconds on one image per round]}}."""
    folders = {"folder": tmp / "images", "one": tmp / "one"}
    for folder in folders.values():
        folder.mkdir()
    paths = write_photos(folders["folder"], args.images)
    os.link(paths[0], folders["one"] / Path(paths[0]).name)
    weights = write_weights(tmp / "weights", args.size)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "ECANFNET_CACHE": str(tmp / "cache"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    runs = variants(weights, args)
    warm = tmp / "warm"
    warm.mkdir()  # the first run converts the model for the backend into the cache: not timed
    timed(next(iter(runs.values()))(folders["folder"], warm), env)
    times = {name: {"folder": [], "one": []} for name in runs}
    for r in range(args.rounds):
        for name, cmd in runs.items():
            for which, src in folders.items():
                out = tmp / f"out-{r}-{len(times[name][which])}-{which}-{abs(hash(name))}"
                out.mkdir()
                times[name][which].append(timed(cmd(src, out), env))
                print(f"  round {r + 1}: {name}, {which}: {times[name][which][-1]:.1f} s", file=sys.stderr)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=int, default=224, help="model input side (default 224)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes and Ray actors (default 2)")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray instance")
    parser.add_argument("--ray-cpus-per-actor", type=float, default=0.5)
    parser.add_argument("--json", type=Path, help="also write every round's seconds here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        times = measure(args, Path(tmp))
    print(f"# {args.images} photo-size JPEGs, L0 at {args.size}x{args.size}, {args.rounds} rounds (median); "
          f"{cpu_line()}")
    print("| variant | seconds | images/s | start-up (1 image), s | images/s after start-up |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        whole, one = statistics.median(t["folder"]), statistics.median(t["one"])
        after = (args.images - 1) / (whole - one) if whole > one else float("nan")
        print(f"| {name} | {whole:.1f} | {args.images / whole:.2f} | {one:.1f} | {after:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(times, indent=2) + "\n")


if __name__ == "__main__":
    main()
