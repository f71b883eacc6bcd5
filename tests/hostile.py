"""Hostile-input corpus: builders for the inputs an attacker (checkpoint author, uploader, file tree) would send.

Every builder writes or returns a real hostile input made on the spot; the CLI tests and the server
tests both draw from here, so a class of attack is tried through every entry point that takes it.
Bounds used by the tests that measure wall time and peak memory are defined next to the builders.
"""

from __future__ import annotations

from pathlib import Path


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory (VmHWM, MB) of a running process."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def reset_vm_hwm(pid: int) -> bool:
    """Lower a process's VmHWM to its current resident size (Linux >= 4.0: clear_refs 5); False where not allowed.

    A peak measured after the reset is the peak of what follows, not of what an earlier test did to the process.
    """
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --- checkpoints: config.json variants and tensor payloads -------------------------------------------

# Bounds for refusing a hostile checkpoint from the CLI (model load included; the refusal itself is instant).
CHECKPOINT_REFUSAL_WALL_S = 60.0
CHECKPOINT_REFUSAL_PEAK_MB = 2500.0
_DELETE = object()

# (id, field the error must name, {dotted path in config.json: new value or _DELETE}).
# Values that JSON cannot express directly (NaN, Infinity) are written by json.dumps as NaN / Infinity.
HOSTILE_CONFIGS: list[tuple[str, str, dict]] = [
    ("test_input_size_huge", "pretrained_cfg.test_input_size", {"pretrained_cfg.test_input_size": [3, 100000, 100000]}),
    ("input_size_negative", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": [3, -224, 224]}),
    ("input_size_zero", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": [3, 0, 0]}),
    ("input_size_tiny", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": [3, 8, 8]}),
    ("input_size_float", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": [3, 224.5, 224]}),
    ("input_size_strings", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": [3, "224", "224"]}),
    ("input_size_bools", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": [3, True, True]}),
    ("input_size_four_channels", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": [4, 224, 224]}),
    ("input_size_zero_channels", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": [0, 224, 224]}),
    ("input_size_too_many_channels", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": [65, 224, 224],
                                                                   "pretrained_cfg.test_input_size": [65, 288, 288]}),
    ("input_size_channels_not_the_mean", "pretrained_cfg.mean", {"pretrained_cfg.input_size": [2, 224, 224],
                                                                 "pretrained_cfg.test_input_size": [2, 288, 288]}),
    ("input_size_two_values", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": [224, 224]}),
    ("input_size_scalar", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": 224}),
    ("input_size_null", "pretrained_cfg.input_size", {"pretrained_cfg.input_size": None}),
    ("test_input_size_exponent", "pretrained_cfg.test_input_size", {"pretrained_cfg.test_input_size": [3, 1e300, 1e300]}),
    ("crop_pct_tiny", "pretrained_cfg.crop_pct", {"pretrained_cfg.crop_pct": 1e-9}),
    ("crop_pct_zero", "pretrained_cfg.crop_pct", {"pretrained_cfg.crop_pct": 0}),
    ("crop_pct_negative", "pretrained_cfg.crop_pct", {"pretrained_cfg.crop_pct": -0.5}),
    ("crop_pct_nan", "pretrained_cfg.crop_pct", {"pretrained_cfg.crop_pct": float("nan")}),
    ("crop_pct_string", "pretrained_cfg.crop_pct", {"pretrained_cfg.crop_pct": "0.9"}),
    ("test_crop_pct_zero", "pretrained_cfg.test_crop_pct", {"pretrained_cfg.test_crop_pct": 0}),
    ("test_crop_pct_infinite", "pretrained_cfg.test_crop_pct", {"pretrained_cfg.test_crop_pct": float("inf")}),
    ("mean_two_values", "pretrained_cfg.mean", {"pretrained_cfg.mean": [0.5, 0.5]}),
    ("mean_four_values", "pretrained_cfg.mean", {"pretrained_cfg.mean": [0.5, 0.5, 0.5, 0.5]}),
    ("mean_empty", "pretrained_cfg.mean", {"pretrained_cfg.mean": []}),
    ("mean_huge_list", "pretrained_cfg.mean", {"pretrained_cfg.mean": [0.5] * 100_000}),
    ("mean_strings", "pretrained_cfg.mean", {"pretrained_cfg.mean": ["a", "b", "c"]}),
    ("mean_nan", "pretrained_cfg.mean", {"pretrained_cfg.mean": [float("nan"), 0.5, 0.5]}),
    ("mean_null", "pretrained_cfg.mean", {"pretrained_cfg.mean": None}),
    ("std_zero", "pretrained_cfg.std", {"pretrained_cfg.std": [0, 0.2, 0.2]}),
    ("std_negative", "pretrained_cfg.std", {"pretrained_cfg.std": [-0.2, 0.2, 0.2]}),
    ("std_infinite", "pretrained_cfg.std", {"pretrained_cfg.std": [float("inf"), 0.2, 0.2]}),
    ("std_one_zero", "pretrained_cfg.std", {"pretrained_cfg.std": [0]}),
    ("interpolation_unknown", "pretrained_cfg.interpolation", {"pretrained_cfg.interpolation": "magic"}),
    ("interpolation_number", "pretrained_cfg.interpolation", {"pretrained_cfg.interpolation": 3}),
    ("interpolation_null", "pretrained_cfg.interpolation", {"pretrained_cfg.interpolation": None}),
    ("crop_mode_unknown", "pretrained_cfg.crop_mode", {"pretrained_cfg.crop_mode": "random"}),
    ("crop_mode_list", "pretrained_cfg.crop_mode", {"pretrained_cfg.crop_mode": ["center"]}),
    ("architecture_unknown", "architecture", {"architecture": "resnet50"}),
    ("architecture_unknown_tag", "architecture", {"architecture": "resnet50.a1_in1k"}),
    ("architecture_number", "architecture", {"architecture": 42}),
    ("architecture_empty", "architecture", {"architecture": ""}),
    ("architecture_list", "architecture", {"architecture": ["eca_nfnet_l0"]}),
    ("global_pool_unknown", "global_pool", {"global_pool": "median"}),
    ("global_pool_empty", "global_pool", {"global_pool": ""}),
    ("global_pool_list", "global_pool", {"global_pool": ["avg"]}),
    ("model_args_global_pool_unknown", "model_args.global_pool", {"model_args": {"global_pool": "fastest"}}),
    ("pretrained_cfg_string", "pretrained_cfg", {"pretrained_cfg": "bicubic"}),
    ("pretrained_cfg_list", "pretrained_cfg", {"pretrained_cfg": [1, 2]}),
    ("pretrained_cfg_null", "pretrained_cfg", {"pretrained_cfg": None}),
    ("num_classes_string", "num_classes", {"num_classes": "1000"}),
    ("num_classes_float", "num_classes", {"num_classes": 1000.5}),
    ("num_classes_negative", "num_classes", {"num_classes": -1}),
    ("num_classes_not_the_head", "num_classes", {"num_classes": 10}),
    ("label_names_too_few", "label_names", {"label_names": ["a", "b", "c"]}),
    ("label_names_numbers", "label_names", {"label_names": list(range(1000))}),
    ("label_names_huge_string", "label_names", {"label_names": ["x" * 5000] + ["a"] * 999}),
    ("label_names_string", "label_names", {"label_names": "abc"}),
    ("label_names_index_out_of_range", "label_names", {"label_names": {"0": "a", "5000": "b"}}),
    ("label_names_in_pretrained_cfg_too_few", "pretrained_cfg.label_names", {"pretrained_cfg.label_names": ["a"]}),
    ("label_descriptions_string", "label_descriptions", {"label_descriptions": "abc"}),
    ("label_descriptions_non_string", "label_descriptions", {"label_descriptions": {"n01440764": 5}}),
    ("label_descriptions_too_few", "label_descriptions", {"label_descriptions": ["a", "b"]}),
]

HOSTILE_CONFIG_FILE_IDS = ("deep_nesting", "over_16_mib", "huge_integer", "not_utf8", "truncated", "top_level_list")


def hostile_config_file(name: str) -> tuple[str, bytes]:
    """A config.json that is no valid object at all: (words the error must contain, the file's bytes)."""
    return {
        "deep_nesting": lambda: ("nested too deeply", b'{"pretrained_cfg": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "over_16_mib": lambda: ("over the limit of 16 MiB", b'{"pad": "' + b" " * (16 * 2**20) + b'"}'),
        "huge_integer": lambda: ("not valid JSON", b'{"num_classes": ' + b"9" * 10_000 + b"}"),
        "not_utf8": lambda: ("not valid JSON", b'{"architecture": "\xff\xfe"}'),
        "truncated": lambda: ("not valid JSON", b'{"pretrained_cfg": {"input_size": [3, 2'),
        "top_level_list": lambda: ("expected a JSON object", b"[1, 2, 3]"),
    }[name]()


def mutated_config(base: dict, patch: dict) -> dict:
    """A deep copy of a config.json dict with each dotted path set to its value (or removed with _DELETE)."""
    import copy

    config = copy.deepcopy(base)
    for dotted, value in patch.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node[key]
        if value is _DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return config


def write_hub_folder(folder: Path, weights: Path, config: dict | bytes) -> Path:
    """A hub-layout folder: config.json (a dict, or raw bytes as written) and model.safetensors linked to weights."""
    import json
    import os

    folder.mkdir(parents=True, exist_ok=True)
    data = config if isinstance(config, bytes) else json.dumps(config).encode()
    (folder / "config.json").write_bytes(data)
    try:
        os.link(weights, folder / "model.safetensors")  # 100 MB weights shared, not copied, per variant
    except OSError:
        os.symlink(weights, folder / "model.safetensors")
    return folder


def write_non_finite_weights(path: Path, state_dict: dict, key: str, value: float = float("nan")) -> Path:
    """A full safetensors checkpoint equal to state_dict except that tensor `key` is all `value` (NaN or inf)."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    tensors[key] = torch.full_like(tensors[key], value)
    save_file(tensors, str(path))
    return path


def hostile_pickles(folder: Path) -> dict[str, Path]:
    """.pth files torch.load(weights_only=True) must not run: plain pickles of every protocol, torch.save zip and
    legacy files holding a foreign object, a class instance, a numpy array, and a code-running __reduce__
    (which would create folder/pwned)."""
    import pickle

    import numpy as np
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "pwned"
    files: dict[str, Path] = {}

    def put(name: str, write) -> None:
        files[name] = folder / f"{name}.pth"
        write(files[name])

    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        put(f"pickle_p{protocol}_object", lambda p, v=protocol: p.write_bytes(pickle.dumps({"a": _Foreign()}, protocol=v)))
        put(f"pickle_p{protocol}_tensors", lambda p, v=protocol: p.write_bytes(pickle.dumps({"a": torch.ones(2)}, protocol=v)))
        put(f"pickle_p{protocol}_floats", lambda p, v=protocol: p.write_bytes(pickle.dumps({"a": 1.0}, protocol=v)))
    put("pickle_runs_code", lambda p: p.write_bytes(pickle.dumps(_RunsCode(f"touch {marker}"))))
    put("zip_foreign_object", lambda p: torch.save({"stem.conv1.weight": _Foreign()}, p))
    put("zip_class_instance", lambda p: torch.save(_Foreign(), p))
    put("zip_numpy_array", lambda p: torch.save({"a": np.zeros(3)}, p))
    put("zip_runs_code", lambda p: torch.save({"a": _RunsCode(f"touch {marker}")}, p))
    put("legacy_foreign_object", lambda p: torch.save({"a": torch.ones(2), "b": _Foreign()}, p,
                                                      _use_new_zipfile_serialization=False))
    put("legacy_protocol4_runs_code", lambda p: torch.save({"a": _RunsCode(f"touch {marker}")}, p, pickle_protocol=4,
                                                           _use_new_zipfile_serialization=False))
    # timm training checkpoints: their argparse.Namespace is allowed, but not what it holds
    weights = {"a": torch.ones(2)}
    put("timm_args_foreign_object", lambda p: timm_training_checkpoint(p, weights, args={"model": _Foreign()}))
    put("timm_args_runs_code", lambda p: timm_training_checkpoint(p, weights, args={"opt": _RunsCode(f"touch {marker}")}))
    put("timm_args_nested_runs_code", lambda p: timm_training_checkpoint(
        p, weights, args={"model_kwargs": {"deep": [(_RunsCode(f"touch {marker}"),)]}}))
    put("timm_metric_foreign_object", lambda p: timm_training_checkpoint(p, weights, metric=_Foreign()))
    return files


def timm_training_checkpoint(path: Path, state_dict: dict, *, ema: dict | None = None, args: dict | None = None,
                             metric: object = 81.25) -> Path:
    """A file laid out as timm's CheckpointSaver writes model_best.pth.tar / checkpoint-N.pth.tar (timm 1.0.x):
    epoch, arch, state_dict, optimizer, version, args (an argparse.Namespace of the command line), the AMP
    scaler's state, metric, the saver's history and, with model EMA, state_dict_ema. `args` entries are added
    to (or replace) a typical command line's."""
    import argparse

    import torch

    command_line = {"model": "eca_nfnet_l0", "pretrained": True, "num_classes": 10, "img_size": None,
                    "input_size": None, "mean": None, "std": None, "opt": "sgd", "lr": 0.1, "momentum": 0.9,
                    "weight_decay": 2e-5, "sched": "cosine", "epochs": 3, "clip_grad": 0.015, "clip_mode": "agc",
                    "smoothing": 0.1, "model_ema": ema is not None, "model_ema_decay": 0.9998,
                    "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "model_kwargs": {}, "device": "cpu",
                    "world_size": 1, "rank": 0, "distributed": False, "output": "", "experiment": ""}
    command_line.update(args or {})
    params = list(state_dict.values())
    optimizer = {"state": {i: {"momentum_buffer": torch.zeros_like(p)} for i, p in enumerate(params)},
                 "param_groups": [{"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 2e-5, "nesterov": True,
                                   "maximize": False, "foreach": None, "differentiable": False, "fused": None,
                                   "initial_lr": 0.1, "params": list(range(len(params)))}]}
    state = {"epoch": 2, "arch": command_line["model"], "optimizer": optimizer, "version": 2,
             "args": argparse.Namespace(**command_line), "state_dict": state_dict,
             "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                            "_growth_tracker": 0},
             "metric": metric,
             "saver": {"checkpoint_files": [("./checkpoint-2.pth.tar", metric)], "best_epoch": 2,
                       "best_metric": metric, "pending": (2, metric)}}
    if ema is not None:
        state["state_dict_ema"] = ema
    torch.save(state, path)
    return path


class _Foreign:
    """An arbitrary class: pickles of it reference tests.hostile._Foreign, which the loader must not import."""


class _RunsCode:
    """Unpickling this runs a shell command (the classic pickle exploit)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os
        return (os.system, (self.command,))


def run_measured(cmd: list[str], timeout: float = 120, **kwargs) -> tuple[object, float, float]:
    """Run cmd in a fresh wrapper process; return (CompletedProcess, wall seconds, peak RSS MB of cmd alone).

    RUSAGE_CHILDREN of the test process would also count earlier, larger children, so a one-off
    wrapper waits for cmd and reports its ru_maxrss on the last line of stderr.
    """
    import subprocess
    import sys
    import time

    wrapper = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
               "print(f'PEAK_KB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
               "sys.exit(rc)")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    wall = time.monotonic() - start
    lines = proc.stderr.splitlines()
    peak_kb = int(lines[-1].removeprefix("PEAK_KB="))
    proc.stderr = "\n".join(lines[:-1]) + ("\n" if len(lines) > 1 else "")
    return proc, wall, peak_kb / 1024


# --- images: bombs in ICO/CUR/TIFF/PNG, high bit depth, special files ---------------------------------

# A PNG of this many pixels a side inside an ICO or CUR: 144 M pixels (432 MB as RGB) in ~400 KB.
ICON_BOMB_SIDE = 12_000
# Refusing an image bomb may cost this much more peak memory than classifying one small image, and this long.
IMAGE_REFUSAL_EXTRA_MB = 100.0
IMAGE_REFUSAL_WALL_S = 30.0


def rgb_png(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit RGB PNG file declaring width x height around idat (its zlib-compressed, filtered rows), by hand:
    it may declare any size, and hold rows packed far beyond what an encoder would write."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def big_png(width: int, height: int, noisy: bool = False) -> bytes:
    """A valid 8-bit RGB PNG of width x height, compressed row by row (never held decoded): all black, or (noisy)
    one random row that every later row repeats (filter "Up", all zeros): still tiny, but a decoder must inflate
    and unfilter every row of it."""
    import zlib

    if noisy:
        import numpy as np

        first = b"\0" + np.random.default_rng(0).integers(0, 256, 3 * width, dtype=np.uint8).tobytes()
        row = b"\2" + bytes(3 * width)
    else:
        first = row = bytes(1 + 3 * width)  # filter byte 0 + black pixels
    packer = zlib.compressobj(9)
    idat = packer.compress(first) + b"".join(packer.compress(row) for _ in range(height - 1)) + packer.flush()
    return rgb_png(width, height, idat)


def icon_file(payload: bytes, kind: str = "ico", claimed: tuple[int, int] = (256, 256)) -> bytes:
    """An ICO (kind "ico") or CUR ("cur") whose one entry is payload (a PNG, or a DIB from dib_icon_entry);
    the directory claims the size `claimed` (a byte a side: 256 is written as 0), whatever payload holds."""
    import struct

    image_type, planes_or_x, bpp_or_y = (1, 1, 32) if kind == "ico" else (2, 0, 0)  # CUR: hotspot x, y
    header = struct.pack("<HHH", 0, image_type, 1)
    entry = struct.pack("<BBBBHHII", claimed[0] % 256, claimed[1] % 256, 0, 0, planes_or_x, bpp_or_y,
                        len(payload), 6 + 16)
    return header + entry + payload


def dib_icon_entry(width: int, height: int) -> bytes:
    """A 24-bit BMP info header + pixels as icons store them (the header's height counts the AND mask too)."""
    import io
    import struct

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (0, 128, 255)).save(buf, "DIB")
    dib = buf.getvalue()
    return dib[:8] + struct.pack("<i", 2 * height) + dib[12:] + bytes(4 * ((width + 31) // 32) * height)


def icon_bombs(folder: Path) -> dict[str, Path]:
    """bomb.ico and bomb.cur, each holding a ICON_BOMB_SIDE-square PNG (Pillow decodes an ICO's PNG while opening)."""
    png = big_png(ICON_BOMB_SIDE, ICON_BOMB_SIDE)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"bomb.{kind}" for kind in ("ico", "cur")}
    for kind, path in paths.items():
        path.write_bytes(icon_file(png, kind))
    return paths


def high_depth_tiffs(folder: Path, side: int) -> dict[str, tuple[Path, "object"]]:
    """A float32 ('F') and a 16-bit ('I;16') deflate TIFF, side x side; returns {mode: (path, expected 8-bit array)}.

    The expected arrays are the package's documented scaling: floats in 0..1 times 255, 16-bit values / 257.
    """
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.add.outer(np.arange(side), np.arange(side)) / (2 * side - 2)  # 0..1 along the diagonal
    floats = np.minimum(ramp * 1.1 - 0.1, 1.0).astype(np.float32)  # max 1.0: a 0..1 image; below 0 is clipped
    sixteen = np.rint(ramp * 65535).astype(np.uint16)
    out = {}
    for mode, arr, expected in (
            ("F", floats, np.clip(np.rint(floats.astype(np.float64) * 255.0), 0, 255)),
            ("I;16", sixteen, np.rint(sixteen / 257.0))):
        path = folder / f"deep_{mode.replace(';', '')}.tif"
        Image.fromarray(arr).save(path, compression="tiff_adobe_deflate")
        out[mode] = (path, expected.astype(np.uint8))
    return out


def special_files(folder: Path) -> dict[str, str]:
    """Paths that are not regular files: a FIFO with no writer (opening it would block), /dev/zero, a folder."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    fifo = folder / "pipe.png"
    os.mkfifo(fifo)
    (folder / "dir.png").mkdir()
    return {"fifo": str(fifo), "dev_zero": "/dev/zero", "folder": str(folder / "dir.png")}


# --- file trees: symlink loops, odd names -------------------------------------------------------------

# Expanding a tree with symlink loops may take this long.
TREE_WALK_WALL_S = 20.0


def symlink_loop_tree(root: Path, loops: int = 3) -> list[Path]:
    """root/{a,b}.png, root/sub/{c,d}.png and `ln -s . loopN` links (plus one into sub, one to root's parent,
    a dangling link and a link to a.png); returns the real image files, which are all any walk may list."""
    import os

    images = write_pngs(root, 2, size=16, names=["a.png", "b.png"]) + \
        write_pngs(root / "sub", 2, size=16, names=["c.png", "d.png"])
    for i in range(loops):
        os.symlink(".", root / f"loop{i}")
    os.symlink("..", root / "sub" / "up")
    os.symlink("../..", root / "sub" / "upup")
    os.symlink("missing.png", root / "dangling.png")
    os.symlink("a.png", root / "also_a.png")
    return images


# --- HTTP: slow bodies, hostile headers -------------------------------------------------------------

# Host headers a DNS-rebinding page (or a confused proxy) sends to a server bound to loopback.
REBINDING_HOSTS = ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example",
                   "10.0.0.1", "[::2]:80", "0x7f.1", ""]
LOOPBACK_HOSTS = ["localhost", "LOCALHOST:1234", "localhost.", "127.0.0.1", "127.3.2.1:99", "[::1]", "[::1]:8000"]
# Slow clients (45 of slow_clients' connections, bodies and headers) may raise a warm server's peak memory by
# this much (measured: +6 MB).
SLOW_CLIENTS_EXTRA_MB = 32.0


def slow_clients(port: int, n: int, seconds: float, stage: str = "body", path: str = "/v1/classify",
                 declared_bytes: int = 10_000) -> list[tuple[float | None, bytes]]:
    """n loopback connections sending a request one byte a second, for at most `seconds` (slowloris).

    stage "body": the headers at once (declaring declared_bytes of image body), then the body a byte
    a second; stage "headers": the request line and headers themselves a byte a second. Returns, per
    connection, when (seconds after the start) the server answered or closed it (None: it did
    neither) and the first bytes of its answer (b"" when it closed without one).
    """
    import selectors
    import socket
    import time

    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {declared_bytes}\r\n\r\n").encode()
    pending = [bytearray(b"\x89" * declared_bytes) if stage == "body" else bytearray(head) for _ in range(n)]
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]
    results: list[tuple[float | None, bytes]] = [(None, b"")] * n
    selector = selectors.DefaultSelector()
    for i, sock in enumerate(socks):
        if stage == "body":
            sock.sendall(head)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, i)
    start = next_byte = time.monotonic()
    try:
        while len(selector.get_map()) and time.monotonic() - start < seconds:
            if time.monotonic() >= next_byte:
                for key in list(selector.get_map().values()):
                    i = key.data
                    try:
                        socks[i].send(bytes(pending[i][:1]))
                        del pending[i][:1]
                    except OSError:
                        pass  # closed by the server: the read below records it
                next_byte += 1.0
            wait = max(0.0, min(next_byte, start + seconds) - time.monotonic())
            for key, _ in selector.select(wait):
                results[key.data] = (time.monotonic() - start, _read_answer(socks[key.data]))
                selector.unregister(key.fileobj)
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    return results


def _read_answer(sock, limit: int = 65536, timeout: float = 2.0) -> bytes:
    """What the server sends on sock until it closes it (at most limit bytes, waiting at most timeout a read)."""
    sock.settimeout(timeout)
    answer = b""
    while len(answer) < limit:
        try:
            chunk = sock.recv(limit - len(answer))
        except OSError:
            break
        if not chunk:
            break
        answer += chunk
    return answer


def idle_connections(port: int, n: int) -> list:
    """n loopback connections that send nothing: each holds one of the server's connections until closed."""
    import socket

    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(n)]


def one_request(port: int, target: str = "/healthz") -> bytes:
    """GET target on a new connection (Connection: close): the server's whole answer, head and body."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
        return _read_answer(sock, timeout=10)


def oversized_headers(port: int, header_bytes: int) -> bytes:
    """A request line and header_bytes of headers, never finished (no blank line); the server's answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Filler: ".encode() + b"a" * header_bytes)
        return _read_answer(sock, timeout=10)


# --- training state: OUT.training/last.pt variants -----------------------------------------------------


def hostile_training_states(folder: Path, valid: Path) -> dict[str, Path]:
    """Files that must not pass for OUT.training/last.pt, built from a valid one: truncated, empty, random
    bytes, a state dict of another model, a dict of the wrong shape, and every pickle of hostile_pickles."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    good = valid.read_bytes()
    state = torch.load(valid, weights_only=True)
    files = {f"pickle:{name}": path for name, path in hostile_pickles(folder / "pickles").items()}

    def put(name: str, write) -> None:
        files[name] = folder / f"{name}.pt"
        write(files[name])

    put("truncated", lambda p: p.write_bytes(good[: len(good) // 2]))
    put("empty", lambda p: p.write_bytes(b""))
    put("random_bytes", lambda p: p.write_bytes(bytes(range(256)) * 64))
    put("other_model_state_dict", lambda p: torch.save(torch.nn.Linear(4, 2).state_dict(), p))
    put("bare_model_weights", lambda p: torch.save(state["model"], p))
    put("model_missing_tensors", lambda p: torch.save({**state, "model": dict(list(state["model"].items())[:10])}, p))
    put("model_not_tensors", lambda p: torch.save({**state, "model": {"stem.conv1.weight": [1.0, 2.0]}}, p))
    put("a_list", lambda p: torch.save([1, 2, 3], p))
    put("model_hostile_key",
        lambda p: torch.save({**state, "model": {**state["model"], "\x1b[2J\nevil": torch.zeros(1)}}, p))
    put("optimizer_foreign", lambda p: torch.save({**state, "optimizer": {"state": {}, "param_groups": [{}]}}, p))
    put("epoch_negative", lambda p: torch.save({**state, "epoch": -3}, p))
    return files


# --- collections: embedding files and manifests ---------------------------------------------------

# Label names and file names that would drive a terminal if printed raw: set the title (OSC),
# clear the screen (CSI), an 8-bit CSI (C1), DEL, a right-to-left override, a newline.
TERMINAL_ATTACK_LABELS = ["\x1b]0;pwned\x07", "\x1b[2J\x1b[H", "a\x9b31mb\x7f\u202e"]
TERMINAL_ATTACK_NAME = "evil\x1b[2J\nname\u202e.png"


def small_model_folder(folder: Path, num_classes: int = 3, label_names: list[str] | None = None,
                       size: int = 64) -> Path:
    """A randomly initialised checkpoint folder whose preprocessing works at size x size (fast on CPU)."""
    from ecanfnet import create_model, save_pretrained

    model = create_model(pretrained=False, num_classes=num_classes)
    model.pretrained_cfg = model.pretrained_cfg.replace(input_size=(3, size, size), test_input_size=(3, size, size))
    return save_pretrained(model, folder, label_names=label_names)


def write_pngs(folder: Path, count: int, size: int = 24, names: list[str] | None = None) -> list[Path]:
    """count small random RGB PNGs in folder (names default img_000.png, ...)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, name in enumerate(names or [f"img_{i:03d}.png" for i in range(count)]):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


def corrupt_manifests(valid: dict) -> dict[str, str]:
    """Texts of OUT.json that `search` must refuse in one line: broken JSON, wrong shapes and types, deep nesting."""
    import copy
    import json

    def changed(edit) -> str:
        data = copy.deepcopy(valid)
        edit(data)
        return json.dumps(data)

    return {
        "invalid_json": '{"plan": {"version": 1,',
        "not_an_object": json.dumps([1, 2, 3]),
        "plan_missing": changed(lambda d: d.pop("plan")),
        "plan_a_string": changed(lambda d: d.update(plan="x")),
        "version_foreign": changed(lambda d: d["plan"].update(version=99)),
        "dim_a_string": changed(lambda d: d.update(dim="2304")),
        "normalize_a_list": changed(lambda d: d["plan"].update(normalize=[1])),
        "errors_not_records": changed(lambda d: d.update(errors=[1, 2])),
        "deep_nesting": "[" * 100_000 + "]" * 100_000,
        "not_utf8": "\udcff\udcfe",
    }


def hostile_vector_files() -> dict[str, object]:
    """Arrays that must not pass for OUT.npy: object dtype (a pickle inside), wrong rank, wrong dtype."""
    import numpy as np

    objects = np.empty((2, 4), dtype=object)
    objects[:] = 1.0
    return {"object_dtype": objects, "three_dims": np.zeros((2, 4, 1), np.float32),
            "float64": np.zeros((2, 4), np.float64), "wrong_width": np.zeros((2, 3), np.float32)}
