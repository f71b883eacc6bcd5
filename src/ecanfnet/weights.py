"""Checkpoints: one resolver for every weights source, strict loading, and the hub-folder writer.

Sources, all through :func:`resolve_weights`:
  - ``hf-hub:OWNER/REPO[@REVISION]`` (or the card's ``hf_hub:``), via huggingface_hub's cache
    (honours ``HF_HOME`` and ``HF_HUB_OFFLINE``);
  - a folder in the hub layout: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``;
  - a ``.safetensors`` file;
  - a ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` file, read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union
from urllib.parse import urlparse

import torch
from .errors import WeightsError
from .fileio import write_atomically, write_json_atomically
from .model import CONFIGS, ECANFNet, ECANFNetFeatures, build_model

WeightsSource = Union[str, os.PathLike]

HUB_PREFIXES = ("hf-hub:", "hf_hub:")
# Published ra2_in1k checkpoints; eca_nfnet_l3 was never released.
DEFAULT_HUB_REPOS = {
    "eca_nfnet_l0": "timm/eca_nfnet_l0",
    "eca_nfnet_l1": "timm/eca_nfnet_l1",
    "eca_nfnet_l2": "timm/eca_nfnet_l2",
}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
HEAD_KEYS = ("head.fc.weight", "head.fc.bias")


@dataclass
class Checkpoint:
    """A state dict plus the hub ``config.json`` that came with it ({} when there was none)."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def num_classes(self) -> int | None:
        """Classifier width stored in the weights (None when they hold no classifier)."""
        w = self.state_dict.get("head.fc.weight")
        return int(w.shape[0]) if w is not None else None

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
        return Checkpoint(_read_weights_file(path), {}, text)
    raise WeightsError(
        f"weights source {text!r}: no such file or folder "
        f"(expected a hub id like 'hf-hub:timm/eca_nfnet_l0', a hub-layout folder, "
        f"a .safetensors file or a .pth/.bin file)")


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or from a pickle loaded with weights_only=True."""
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    if path.suffix not in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: unknown weights format {path.suffix!r}; use .safetensors, .pth, .pt, .bin, .ckpt or .pth.tar")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError depending on the damage
        blocked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if blocked or "Unsupported class" in str(exc):
            what = f" ({blocked.group(1)})" if blocked else ""
            raise WeightsError(
                f"{path}: refused to load: the pickle references Python objects besides tensors{what}, and "
                f"unpickling those can run code. Only plain tensor checkpoints are read (torch.load "
                f"weights_only=True); convert a trusted file to .safetensors first.") from exc
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or a training checkpoint holding one under 'state_dict' or 'model'."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: does not contain a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _read_config(path: Path | None) -> dict[str, Any]:
    """A hub config.json as a dict ({} when there is none)."""
    if path is None or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: expected a JSON object")
    return config


def _from_folder(folder: Path) -> Checkpoint:
    config = _read_config(folder / "config.json")
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return Checkpoint(_read_weights_file(folder / name), config, str(folder))
    raise WeightsError(f"{folder}: holds neither {' nor '.join(WEIGHT_FILES)}")


def _from_hub(repo: str, text: str) -> Checkpoint:
    """Fetch (or find in the local cache) config.json and the weights of a hub repo."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo_id, _, revision = repo.partition("@")
    # Without this check huggingface_hub retries each file for ~25 s before falling back to the cache.
    cache_only = constants.HF_HUB_OFFLINE or not _endpoint_reachable(constants.ENDPOINT)
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

    config = _read_config(fetch("config.json"))
    for name in WEIGHT_FILES:
        path = fetch(name)
        if path is not None:
            return Checkpoint(_read_weights_file(path), config, text)
    if unreachable:
        raise unreachable[0]
    raise WeightsError(f"{text}: the repository holds neither {' nor '.join(WEIGHT_FILES)}")


def _endpoint_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within the timeout."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def load_checkpoint(model: ECANFNet, ckpt: Checkpoint) -> None:
    """Load weights strictly; a classifier of another size is skipped (and left freshly initialised)."""
    state = dict(ckpt.state_dict)
    own = model.state_dict()
    head_differs = ckpt.num_classes != model.num_classes
    if head_differs:
        for k in HEAD_KEYS:
            state.pop(k, None)
    expected = {k: v for k, v in own.items() if not (head_differs and k in HEAD_KEYS)}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                        for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or mismatched:
        raise WeightsError(_describe_mismatch(model.name, ckpt, missing, unexpected, mismatched))
    if head_differs and model.num_classes:
        had = f"has {ckpt.num_classes} classes" if ckpt.num_classes else "has no classifier"
        warnings.warn(f"{ckpt.source}: the checkpoint's classifier {had}, the model {model.num_classes}; "
                      f"loaded the backbone only, the classifier is freshly initialised", stacklevel=3)
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=not head_differs, assign=True)
    if head_differs:
        model.reset_classifier(model.num_classes)  # a real, freshly initialised head (also off the meta device)


def _describe_mismatch(name: str, ckpt: Checkpoint, missing: list[str], unexpected: list[str],
                       mismatched: list[str], shown: int = 8) -> str:
    lines = [f"{ckpt.source}: the checkpoint does not fit {name}"
             + (f" (it looks like {ckpt.architecture})" if ckpt.architecture not in (None, name) else "")]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches (checkpoint vs model)", mismatched)):
        if keys:
            more = f", ... and {len(keys) - shown} more" if len(keys) > shown else ""
            lines.append(f"  {title} ({len(keys)}): {', '.join(keys[:shown])}{more}")
    return "\n".join(lines)


def create_model(name: str | None = None, pretrained: bool | WeightsSource = False,
                 num_classes: int | None = None, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, features_only: bool = False,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3, 4)) -> ECANFNet | ECANFNetFeatures:
    """Build an ECA-NFNet, optionally with weights; metadata and labels travel with the checkpoint.

    name: architecture (default eca_nfnet_l0, or whatever the checkpoint's config names).
    pretrained: False, True (the published hub checkpoint) or any weights source.
    num_classes: default the checkpoint's (1000 without one); another value keeps the
    backbone and gives a freshly initialised classifier.
    features_only: return the multi-scale trunk (ECANFNetFeatures) with maps out_indices (0..4).
    """
    model = _create_classifier(name, pretrained, num_classes, drop_rate, drop_path_rate)
    return ECANFNetFeatures(model, out_indices) if features_only else model


def _create_classifier(name: str | None, pretrained: bool | WeightsSource, num_classes: int | None,
                       drop_rate: float, drop_path_rate: float) -> ECANFNet:
    if pretrained is False or pretrained is None:
        return build_model(name or "eca_nfnet_l0", 1000 if num_classes is None else num_classes,
                           drop_rate, drop_path_rate)
    source = default_weights_source(name or "eca_nfnet_l0") if pretrained is True else pretrained
    ckpt = resolve_weights(source)
    arch = ckpt.architecture
    if name and arch and arch != name:
        raise WeightsError(f"{ckpt.source}: the checkpoint is {arch}, not the requested {name}")
    if num_classes is None:
        num_classes = ckpt.num_classes if ckpt.num_classes is not None else 1000
    # Built on the meta device: random init of 24M weights that are overwritten anyway is skipped.
    with torch.device("meta"):
        model = build_model(name or arch or "eca_nfnet_l0", num_classes, drop_rate, drop_path_rate)
    model.pretrained_cfg.update(ckpt.config.get("pretrained_cfg") or {})
    model.pretrained_cfg["num_classes"] = model.num_classes
    if model.num_classes == ckpt.num_classes:
        for key in ("label_names", "label_descriptions"):
            if ckpt.config.get(key):
                model.pretrained_cfg[key] = ckpt.config[key]
    load_checkpoint(model, ckpt)
    return model


def save_pretrained(model: ECANFNet, folder: WeightsSource, label_names: list[str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in the hub layout (each file replaced atomically)."""
    from safetensors.torch import save_file

    label_names = list(label_names) if label_names is not None else model.pretrained_cfg.get("label_names")
    if label_names is not None and len(label_names) != model.num_classes:
        raise ValueError(f"label_names has {len(label_names)} entries but the model has {model.num_classes} classes")
    pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in ("label_names", "label_descriptions")}
    pretrained_cfg["num_classes"] = model.num_classes
    config: dict[str, Any] = {
        "architecture": model.name,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": "avg",
        "pretrained_cfg": pretrained_cfg,
    }
    if label_names is not None:
        config["label_names"] = label_names
    descriptions = model.pretrained_cfg.get("label_descriptions")
    if descriptions:
        config["label_descriptions"] = descriptions

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    write_atomically(folder / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_json_atomically(folder / "config.json", config)
    return folder
