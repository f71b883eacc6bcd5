"""Building models: the architecture, optionally with weights from any source; metadata and labels travel with them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import WeightsError
from .model import ECANFNet, ECANFNetFeatures, build_model
from .weights import HUB_PREFIXES, WeightsSource, default_weights_source, load_checkpoint, resolve_weights


def create_model(name: str | None = None, pretrained: bool | WeightsSource = False,
                 num_classes: int | None = None, *, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, features_only: bool = False,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3, 4), int8_ok: bool = False) -> ECANFNet | ECANFNetFeatures:
    """Build an ECA-NFNet, optionally with weights; metadata and labels travel with the checkpoint.

    name: architecture (default eca_nfnet_l0, or whatever the checkpoint's config names).
    pretrained: False, True (the published hub checkpoint) or any weights source.
    num_classes: default the checkpoint's (1000 without one); another value keeps the
    backbone and gives a freshly initialised classifier.
    features_only: return the multi-scale trunk (ECANFNetFeatures) with maps out_indices (0..4).
    int8_ok: a caller that only runs the model (predict, evaluate, embed, serve) also takes an INT8 model
    folder (written by `ecanfnet quantize`), as a quantize.QuantizedECANFNet; elsewhere it is refused.
    """
    int8 = _int8_folder_or_none(pretrained)
    if int8 is not None:
        return _load_int8(int8, name, num_classes, features_only, int8_ok)
    model = _create_classifier(name, pretrained, num_classes, drop_rate, drop_path_rate)
    return ECANFNetFeatures(model, out_indices) if features_only else model


def _int8_folder_or_none(pretrained: bool | WeightsSource | None) -> Path | None:
    """The folder, when pretrained names an INT8 model folder on disk."""
    if isinstance(pretrained, (str, os.PathLike)) and not os.fspath(pretrained).startswith(HUB_PREFIXES):
        from .quantize import is_int8_folder

        folder = Path(pretrained).expanduser()
        return folder if is_int8_folder(folder) else None
    return None


def _load_int8(folder: Path, name: str | None, num_classes: int | None, features_only: bool, int8_ok: bool):
    from .quantize import load_int8_folder

    if not int8_ok or features_only:
        raise WeightsError(f"{folder}: an INT8 model folder (written by `ecanfnet quantize`) can only be run: "
                           "predict, evaluate, embed, search, serve, bench; to train, export or fine-tune use "
                           "the fp32 checkpoint it was quantized from (named in its config.json)")
    model = load_int8_folder(folder)
    if name and model.name != name:
        raise WeightsError(f"{folder}: the INT8 model is {model.name}, not the requested {name}")
    if num_classes is not None and num_classes != model.num_classes:
        raise WeightsError(f"{folder}: the INT8 model has {model.num_classes} classes; its classifier cannot be "
                           f"changed to {num_classes}")
    return model


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
    meta = ckpt.pretrained_cfg
    # The labels belong to the checkpoint's classifier: a model with another one gets none.
    model.pretrained_cfg = meta if meta.num_classes == model.num_classes else meta.with_classes(model.num_classes)
    load_checkpoint(model, ckpt)
    return model
