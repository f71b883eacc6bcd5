"""Checkpoint I/O: one resolver for every weights source, safe reading, strict loading, the hub-folder writer, fingerprints.

Sources, all through :func:`resolve_weights`:
  - ``hf-hub:OWNER/REPO[@REVISION]`` (or the card's ``hf_hub:``), via huggingface_hub's cache
    (honours ``HF_HOME`` and ``HF_HUB_OFFLINE``);
  - a folder in the hub layout: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``;
  - a ``.safetensors`` file;
  - a ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` / ``.pth.tar`` file, read with ``torch.load(weights_only=True)``:
    a state dict, or a training checkpoint holding one. timm's (``model_best.pth.tar``, ``checkpoint-N.pth.tar``)
    keep their command line as an ``argparse.Namespace``, the one class besides torch's allowed here; its
    values pass the same weights-only checks. The weights taken are timm's choice: ``state_dict_ema`` (or
    ``model_ema``) when present, else ``state_dict`` (or ``model``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import pickle
import pickletools
import re
import socket
import tarfile
import urllib.request
import threading
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Union
from urllib.parse import urlparse

import torch
from .choices import HUB_PREFIXES
from .errors import WeightsError
from .fileio import write_atomically, write_json_atomically
from .metadata import MAX_CONFIG_BYTES, PretrainedCfg, short_repr, validate_config
from .model import CONFIGS, ECANFNet

WeightsSource = Union[str, os.PathLike]
log = logging.getLogger("ecanfnet")

# Published ra2_in1k checkpoints; eca_nfnet_l3 was never released.
DEFAULT_HUB_REPOS = {
    "eca_nfnet_l0": "timm/eca_nfnet_l0",
    "eca_nfnet_l1": "timm/eca_nfnet_l1",
    "eca_nfnet_l2": "timm/eca_nfnet_l2",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
HEAD_KEYS = ("head.fc.weight", "head.fc.bias")
STEM_KEY = "stem.conv1.weight"
# Where a training checkpoint keeps its weights, in timm's order of preference (EMA weights first).
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")
# Wrapper prefixes a saved state dict may carry: DistributedDataParallel's and torch.compile's.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Classes torch's weights-only unpickler does not allow that a checkpoint may still hold: timm's training args.
TRAINING_CHECKPOINT_GLOBALS = (argparse.Namespace,)
_GLOBALS_LOCK = threading.Lock()
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# torch.save's legacy (non-zip) format starts with this number, pickled.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PREFIXES = tuple(pickle.dumps(_LEGACY_MAGIC, protocol=p) for p in range(pickle.HIGHEST_PROTOCOL + 1))


@dataclass
class Checkpoint:
    """A state dict plus the checked hub ``config.json`` that came with it ({} when there was none)."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def num_classes(self) -> int | None:
        """Classifier width stored in the weights (None when they hold no classifier)."""
        w = self.state_dict.get("head.fc.weight")
        return int(w.shape[0]) if w is not None else None

    @property
    def pretrained_cfg(self) -> PretrainedCfg:
        """The checkpoint's metadata: config.json's values over the published checkpoints' defaults."""
        return PretrainedCfg.from_validated(self.config, self.source, num_classes=self.num_classes)

    @property
    def in_chans(self) -> int | None:
        """Input channels of the weights' first convolution (None when they hold none)."""
        w = self.state_dict.get(STEM_KEY)
        return int(w.shape[1]) if w is not None and w.ndim == 4 else None

    @property
    def global_pool(self) -> str | None:
        """The classifier's pooling named by config.json (None when it names none)."""
        return self.config.get("global_pool")

    @property
    def architecture(self) -> str | None:
        """Architecture named by config.json, else inferred from the block layout of the weights."""
        arch = self.config.get("architecture")
        if arch:
            return str(arch).split(".")[0]
        return infer_architecture(self.state_dict)


def default_weights_source(name: str = "eca_nfnet_l0") -> str:
    """The hub id of the published checkpoint for an architecture."""
    if name not in DEFAULT_HUB_REPOS:
        raise WeightsError(f"{name} has no published checkpoint; pass a weights source explicitly")
    return "hf-hub:" + DEFAULT_HUB_REPOS[name]


def infer_architecture(state_dict: dict[str, torch.Tensor]) -> str | None:
    """Match the per-stage block counts found in the keys against the known configs."""
    depth: dict[int, int] = {}
    for key in state_dict:
        m = re.match(r"stages\.(\d+)\.(\d+)\.", key)
        if m:
            s, b = int(m.group(1)), int(m.group(2))
            depth[s] = max(depth.get(s, 0), b + 1)
    found = tuple(depth[s] for s in sorted(depth))
    for name, cfg in CONFIGS.items():
        if cfg.depths == found:
            return name
    return None


def resolve_weights(source: WeightsSource) -> Checkpoint:
    """Read a checkpoint from any supported source (see the module docstring)."""
    text = os.fspath(source)
    for prefix in HUB_PREFIXES:
        if text.startswith(prefix):
            return _from_hub(text[len(prefix):], text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_folder(path)
    if path.is_file():
        return _checkpoint(path, None, text)
    raise WeightsError(
        f"weights source {text!r}: no such file or folder "
        f"(expected a hub id like 'hf-hub:timm/eca_nfnet_l0', a hub-layout folder, "
        f"a .safetensors file or a .pth/.bin file)")


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Floating-point, finite tensors from a .safetensors file or a torch.save file (weights_only=True)."""
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from exc
    elif path.suffix in PICKLE_SUFFIXES:
        state = _unwrap_state_dict(safe_torch_load(path, training_checkpoint=True), path)
    else:
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors, .pth, .pt, .bin, .ckpt or .pth.tar")
    _check_tensors(state, path)
    return state


def _check_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse sparse, exotic floating-point or non-finite tensors, naming the first bad key.

    Integer tensors (other architectures' counters) pass here; load_checkpoint refuses them as weights.
    """
    for key, t in state.items():
        if t.layout != torch.strided or ((t.is_floating_point() or t.is_complex()) and t.dtype not in FLOAT_DTYPES):
            raise WeightsError(f"{path}: tensor {short_repr(key)} is {t.dtype} ({t.layout}); weights must be dense "
                               f"float16, bfloat16, float32 or float64 tensors")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{path}: tensor {short_repr(key)} holds NaN or infinite values")


class TorchLoadError(WeightsError):
    """safe_torch_load could not or would not read a file; `reason` says why in one line, without the path."""

    def __init__(self, path: Path, reason: str, advice: str = "") -> None:
        super().__init__(f"{path}: {reason}{advice}")
        self.path, self.reason = path, reason


def safe_torch_load(path: str | os.PathLike, *, training_checkpoint: bool = False) -> Any:
    """torch.load(weights_only=True) of a torch.save file, on the CPU; TorchLoadError (one line) for anything else.

    Nothing in the file is run: plain pickles are refused unread, and torch's weights-only unpickler
    refuses any Python object besides tensors and containers. training_checkpoint: a file the plain load
    refuses is tried once more with TRAINING_CHECKPOINT_GLOBALS (argparse.Namespace) allowed too.
    """
    path = Path(path)
    if not _is_torch_save_file(path):
        foreign = _foreign_global(path)
        if foreign:
            raise TorchLoadError(path, f"refused to load: a plain Python pickle, not a torch.save checkpoint, and it "
                                       f"references {foreign}: unpickling it could run code.",
                                 " Only torch.save tensor checkpoints and .safetensors files are read.")
        raise TorchLoadError(path, "not a readable PyTorch checkpoint: not in torch.save's format (a plain Python "
                                   "pickle, another format or a damaged file)",
                             "; only torch.save tensor checkpoints and .safetensors files are read")
    try:
        return _weights_only_load(path, with_training_globals=False)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, KeyError...
        if training_checkpoint:
            try:
                return _weights_only_load(path, with_training_globals=True)
            except Exception:  # noqa: BLE001 - reported below, from the plain load's error
                pass
        foreign = _foreign_global(path, allow_training_globals=training_checkpoint)
        if foreign:
            raise TorchLoadError(path, f"refused to load: the pickle references Python objects besides tensors "
                                       f"({foreign}), and unpickling those can run code.",
                                 " Only plain tensor checkpoints are read; convert a trusted file to .safetensors "
                                 "first.") from exc
        raise TorchLoadError(path, f"not a readable PyTorch checkpoint ({torch_error_line(exc)})") from exc


def _weights_only_load(path: Path, *, with_training_globals: bool) -> Any:
    """torch.load(weights_only=True) on the CPU, optionally with TRAINING_CHECKPOINT_GLOBALS allowed."""
    allowance = _training_checkpoint_globals() if with_training_globals else contextlib.nullcontext()
    with warnings.catch_warnings(), allowance:
        # a second line besides the refusal, about torch internals, is not wanted
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(str(path), map_location="cpu", weights_only=True)


@contextmanager
def _training_checkpoint_globals() -> Iterator[None]:
    """torch's weights-only allowlist plus TRAINING_CHECKPOINT_GLOBALS, for one load.

    torch keeps that list process-wide, so while this load runs another thread's weights-only load allows them
    too (harmless: a Namespace runs no code); the lock stops two loads from removing each other's additions,
    and classes a caller had allowed already are left in place afterwards.
    """
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: such checkpoints are refused
        yield
        return
    with _GLOBALS_LOCK:
        had = set(torch.serialization.get_safe_globals())
        with torch.serialization.safe_globals([g for g in TRAINING_CHECKPOINT_GLOBALS if g not in had]):
            yield


def _is_torch_save_file(path: Path) -> bool:
    """Whether the file has a torch.save layout: a zip archive, or the legacy pickles starting with torch's magic number."""
    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as f:
        head = f.read(64)
    return head.startswith(_LEGACY_PREFIXES) or tarfile.is_tarfile(path)


def _foreign_global(path: Path, max_bytes: int = 64 * 2**20, *, allow_training_globals: bool = False) -> str | None:
    """The first global a checkpoint's pickles name that torch's weights-only unpickler does not allow.

    Reads the opcodes only (pickletools), never unpickles; for a zip checkpoint its data.pkl.
    """
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        allowed = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - a private torch API: without it any global is named
        allowed = set()
    if allow_training_globals:
        allowed.update(f"{g.__module__}.{g.__qualname__}" for g in TRAINING_CHECKPOINT_GLOBALS)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                pkl = [i for i in archive.infolist() if i.filename.endswith("data.pkl") and i.file_size <= max_bytes]
                data = archive.read(pkl[0]) if pkl else b""
        else:
            with path.open("rb") as f:
                data = f.read(max_bytes)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError, EOFError):
        return None
    return next((g for g in _pickle_globals(data) if g not in allowed), None)


def _pickle_globals(data: bytes, max_pickles: int = 4) -> list[str]:
    """'module.name' of every GLOBAL / STACK_GLOBAL in the first pickles of data (legacy files hold several)."""
    import io

    found: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(max_pickles):
        strings: list[Any] = []
        memo: dict[Any, Any] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif "UNICODE" in op.name or "STRING" in op.name:
                    strings.append(arg)
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and strings:
                    memo[arg] = strings[-1]
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(arg))
        except Exception:  # noqa: BLE001 - damaged or non-pickle bytes end the scan
            break
    return found


def torch_error_line(exc: BaseException) -> str:
    """One line from torch's error, without its advice to disable weights_only."""
    text = str(exc)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if m:
        text = m.group(1)
    line = _first_line(text)
    if "weights_only" in line:
        line = "the weights-only unpickler rejected it"
    return f"{type(exc).__name__}: {line}"


def _first_line(exc: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an error, cut to limit characters."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit] + "..."


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """A bare state dict, or the one a training checkpoint holds under the first of STATE_DICT_KEYS (timm's order)."""
    if isinstance(obj, dict):
        key = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict)), None)
        if key is not None:
            log.info("%s: a training checkpoint; loading its %r weights", path, key)
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: does not contain a state dict of tensors")
    return {_unwrapped_key(k): v for k, v in obj.items()}


def _unwrapped_key(key: Any) -> Any:
    """A state-dict key without the DDP / torch.compile wrapper prefixes, in whichever order they were added."""
    while isinstance(key, str) and key.startswith(WRAPPER_PREFIXES):
        key = next(key[len(p):] for p in WRAPPER_PREFIXES if key.startswith(p))
    return key


def read_config_file(path: Path | None) -> dict[str, Any]:
    """A hub config.json parsed (not yet validated) as a dict ({} when there is none), size-bounded."""
    if path is None or not path.is_file():
        return {}
    with path.open("rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise WeightsError(f"{path}: over the limit of {MAX_CONFIG_BYTES // 2**20} MiB for a config.json")
    try:
        config = json.loads(data.decode("utf-8"))
    except RecursionError as exc:
        raise WeightsError(f"{path}: not valid JSON (nested too deeply)") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, integers of too many digits
        raise WeightsError(f"{path}: not valid JSON ({_first_line(exc)})") from exc
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return config


def _checkpoint(weights: Path, config_path: Path | None, source: str) -> Checkpoint:
    """Read and check the weights and the config.json next to them (each error names its file)."""
    raw = read_config_file(config_path)
    if raw:  # fail fast, before reading ~100 MB of weights; checked again below against the classifier
        validate_config(raw, str(config_path))
    state = _read_weights_file(weights)
    w = state.get("head.fc.weight")
    width = int(w.shape[0]) if w is not None else None
    config = validate_config(raw, str(config_path), num_classes=width) if raw else {}
    return Checkpoint(state, config, source)


def _from_folder(folder: Path) -> Checkpoint:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return _checkpoint(folder / name, folder / "config.json", str(folder))
    raise WeightsError(f"{folder}: holds neither {' nor '.join(WEIGHT_FILES)}")


def _from_hub(repo: str, text: str) -> Checkpoint:
    """Fetch (or find in the local cache) config.json and the weights of a hub repo."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, _, revision = repo.partition("@")
    # Without this check huggingface_hub retries each file for ~25 s before falling back to the cache.
    cache_only = constants.HF_HUB_OFFLINE or endpoint_problem(constants.ENDPOINT, timeout=3.0) is not None
    unreachable: list[WeightsError] = []

    def fetch(filename: str) -> Path | None:
        """The cached file (downloaded first when online); None when it cannot be had."""
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision or None, local_files_only=cache_only))
        except LocalEntryNotFoundError:  # before EntryNotFoundError: it is a subclass
            short = repo_id.split("/")[-1]
            unreachable.append(WeightsError(
                f"cannot get {repo_id} from the Hugging Face Hub: there is no connection to "
                f"{constants.ENDPOINT} (or HF_HUB_OFFLINE is set) and it is not in the cache at {constants.HF_HUB_CACHE}.\n"
                f"  - Use a local copy: --weights PATH (a hub-layout folder, .safetensors or .pth file).\n"
                f"  - To get one, on a machine with network run:\n"
                f"      pip install huggingface_hub && hf download {repo_id} --local-dir {short}\n"
                f"    then copy the folder {short} here and pass --weights {short}"))
            return None
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise WeightsError(f"{text}: no such repository or revision on the Hugging Face Hub ({exc})") from exc
        except EntryNotFoundError:
            return None

    config_path = fetch("config.json")
    for name in WEIGHT_FILES:
        path = fetch(name)
        if path is not None:
            return _checkpoint(path, config_path, text)
    if unreachable:
        raise unreachable[0]
    raise WeightsError(f"{text}: the repository holds neither {' nor '.join(WEIGHT_FILES)}")


def endpoint_problem(endpoint: str, *, timeout: float) -> str | None:
    """Why the hub endpoint cannot be reached (no TCP connection within timeout), or None when it can.

    Behind a proxy the endpoint may be unreachable directly while huggingface_hub gets through: None then.
    """
    url = urlparse(endpoint)
    if url.scheme in urllib.request.getproxies():
        return None
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A first-conv weight (out, c, kh, kw) for in_chans inputs, as timm adapts pretrained stems.

    One channel: the sum over the c input channels. Otherwise the channels repeated (cycled) to in_chans and
    scaled by c / in_chans, so a constant image gives the same response. Computed in float32, returned in
    weight's dtype; weight standardization then applies to the result as to any weight.
    """
    channels = weight.shape[1]
    if in_chans == channels:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        w = w.repeat(1, math.ceil(in_chans / channels), 1, 1)[:, :in_chans] * (channels / in_chans)
    return w.to(weight.dtype)


def adapt_checkpoint_input(ckpt: Checkpoint, in_chans: int) -> Checkpoint:
    """ckpt with its first conv adapted to in_chans input channels (itself when it already takes them)."""
    have = ckpt.in_chans
    if have is None or have == in_chans:
        return ckpt
    state = dict(ckpt.state_dict)
    state[STEM_KEY] = adapt_input_conv(state[STEM_KEY], in_chans)
    log.info("%s: adapted %s from %d to %d input channels", ckpt.source, STEM_KEY, have, in_chans)
    return Checkpoint(state, ckpt.config, ckpt.source)


def load_checkpoint(model: ECANFNet, ckpt: Checkpoint, *, strict: bool = False) -> None:
    """Load weights strictly; a classifier of another size is skipped (and left freshly initialised) unless strict."""
    state = dict(ckpt.state_dict)
    own = model.state_dict()
    head_differs = not strict and ckpt.num_classes != model.num_classes
    if head_differs:
        for k in HEAD_KEYS:
            state.pop(k, None)
    expected = {k: v for k, v in own.items() if not (head_differs and k in HEAD_KEYS)}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(k if k.isprintable() and len(k) <= 200 else short_repr(k) for k in state.keys() - expected.keys())
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                        for k, v in expected.items() if k in state and state[k].shape != v.shape)
    not_float = sorted(f"{k} ({state[k].dtype})" for k in expected if k in state and not state[k].is_floating_point())
    if missing or unexpected or mismatched or not_float:
        raise WeightsError(_describe_mismatch(model.name, ckpt, missing, unexpected, mismatched, not_float))
    if head_differs and model.num_classes:
        had = f"has {ckpt.num_classes} classes" if ckpt.num_classes else "has no classifier"
        warnings.warn(f"{ckpt.source}: the checkpoint's classifier {had}, the model {model.num_classes}; "
                      f"loaded the backbone only, the classifier is freshly initialised", stacklevel=3)
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=not head_differs, assign=True)
    if head_differs:
        model.reset_classifier(model.num_classes)  # a real, freshly initialised head (also off the meta device)


def _describe_mismatch(name: str, ckpt: Checkpoint, missing: list[str], unexpected: list[str],
                       mismatched: list[str], not_float: list[str], *, shown: int = 8) -> str:
    lines = [f"{ckpt.source}: the checkpoint does not fit {name}"
             + (f" (it looks like {ckpt.architecture})" if ckpt.architecture not in (None, name) else "")]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches (checkpoint vs model)", mismatched),
                        ("not floating-point", not_float)):
        if keys:
            more = f", ... and {len(keys) - shown} more" if len(keys) > shown else ""
            lines.append(f"  {title} ({len(keys)}): {', '.join(keys[:shown])}{more}")
    return "\n".join(lines)


def save_pretrained(model: ECANFNet, folder: WeightsSource, label_names: list[str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the hub layout (each file replaced atomically)."""
    from safetensors.torch import save_file

    cfg = model.pretrained_cfg
    if label_names is not None:
        if len(label_names) != model.num_classes:
            raise ValueError(f"label_names has {len(label_names)} entries but the model has {model.num_classes} classes")
        cfg = cfg.replace(label_names=tuple(label_names))
    config = cfg.to_config(architecture=model.name, num_features=model.num_features,
                           global_pool=getattr(model, "global_pool", "avg"))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomically(folder / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_json_atomically(folder / "config.json", config)
    return folder


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over the names, shapes and bytes of every tensor in the state dict."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]
