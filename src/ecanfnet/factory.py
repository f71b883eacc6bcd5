"""Building models: the architecture, optionally with weights from any source; metadata and labels travel with them."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .choices import HUB_PREFIXES
from .errors import WeightsError
from .model import ECANFNet, ECANFNetFeatures, build_model
from .weights import (WeightsSource, adapt_checkpoint_input, default_weights_source, load_checkpoint,
                      resolve_weights)


def create_model(name: str | None = None, pretrained: bool | WeightsSource = False,
                 num_classes: int | None = None, *, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, in_chans: int | None = None, global_pool: str | None = None,
                 checkpoint_path: WeightsSource | None = None, features_only: bool = False,
                 out_indices: tuple[int, ...] = (0, 1, 2, 3, 4), int8_ok: bool = False) -> ECANFNet | ECANFNetFeatures:
    """Build an ECA-NFNet, optionally with weights; metadata and labels travel with the checkpoint.

    name: architecture (default eca_nfnet_l0, or whatever the checkpoint's config names).
    pretrained: False, True (the published hub checkpoint) or any weights source.
    num_classes: default the checkpoint's (1000 without one); another value keeps the
    backbone and gives a freshly initialised classifier.
    in_chans: input channels (default the checkpoint's, else 3); pretrained weights of another count get
    their first conv adapted as timm does (summed over RGB for 1, else repeated and rescaled).
    global_pool: the head's pooling, one of metadata.GLOBAL_POOLS (default the checkpoint's, else "avg").
    checkpoint_path: weights loaded after the model is built (and after pretrained ones), as timm's
    create_model does: every tensor must fit the model as built, classifier and first conv included.
    features_only: return the multi-scale trunk (ECANFNetFeatures) with maps out_indices (0..4).
    int8_ok: a caller that only runs the model (predict, evaluate, embed, serve) also takes an INT8 model
    folder (written by `ecanfnet quantize`), as a quantize.QuantizedECANFNet; elsewhere it is refused.
    """
    int8 = _int8_folder_or_none(pretrained)
    if int8 is not None:
        rebuilt = [k for k, v in (("in_chans", in_chans), ("global_pool", global_pool),
                                  ("checkpoint_path", checkpoint_path)) if v is not None]
        if rebuilt:
            raise WeightsError(f"{int8}: an INT8 model folder is run as quantized; {', '.join(rebuilt)} cannot "
                               f"change it (build from the fp32 checkpoint it was quantized from)")
        return _load_int8(int8, name, num_classes, features_only, int8_ok)
    options = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate, "in_chans": in_chans,
               "global_pool": global_pool}
    if checkpoint_path is not None and pretrained in (False, None):
        model = _create_for_checkpoint(name, num_classes, options)
    else:
        model = _create_classifier(name, pretrained, num_classes, options)
    if checkpoint_path is not None:
        load_checkpoint(model, resolve_weights(checkpoint_path), strict=True)
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


def _build(name: str, num_classes: int, options: dict) -> ECANFNet:
    """build_model with create_model's options (in_chans 3 and global_pool avg where they are None)."""
    in_chans, pool = options["in_chans"], options["global_pool"]
    return build_model(name, num_classes, options["drop_rate"], options["drop_path_rate"],
                       in_chans=3 if in_chans is None else in_chans, global_pool="avg" if pool is None else pool)


def _create_for_checkpoint(name: str | None, num_classes: int | None, options: dict) -> ECANFNet:
    """The model a checkpoint_path fills completely, built on the meta device (no random init to overwrite)."""
    with torch.device("meta"):
        return _build(name or "eca_nfnet_l0", 1000 if num_classes is None else num_classes, options)


def _create_classifier(name: str | None, pretrained: bool | WeightsSource, num_classes: int | None,
                       options: dict) -> ECANFNet:
    if pretrained is False or pretrained is None:
        return _build(name or "eca_nfnet_l0", 1000 if num_classes is None else num_classes, options)
    source = default_weights_source(name or "eca_nfnet_l0") if pretrained is True else pretrained
    ckpt = resolve_weights(source)
    arch = ckpt.architecture
    if name and arch and arch != name:
        raise WeightsError(f"{ckpt.source}: the checkpoint is {arch}, not the requested {name}")
    if num_classes is None:
        num_classes = ckpt.num_classes if ckpt.num_classes is not None else 1000
    in_chans = options["in_chans"] if options["in_chans"] is not None else (ckpt.in_chans or 3)
    # Built on the meta device: random init of 24M weights that are overwritten anyway is skipped.
    with torch.device("meta"):
        model = _build(name or arch or "eca_nfnet_l0", num_classes,
                       {**options, "in_chans": in_chans, "global_pool": options["global_pool"] or ckpt.global_pool})
    meta = ckpt.pretrained_cfg.with_in_chans(in_chans)
    # The labels belong to the checkpoint's classifier: a model with another one gets none.
    model.pretrained_cfg = meta if meta.num_classes == model.num_classes else meta.with_classes(model.num_classes)
    load_checkpoint(model, adapt_checkpoint_input(ckpt, in_chans))
    return model
