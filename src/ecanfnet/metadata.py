"""Checkpoint metadata (a hub ``config.json``) checked where it enters: nothing in it is trusted.

:func:`validate_config` returns a cleaned copy holding only the fields the package uses, each
checked (image sizes in a bounded range, crop_pct, 3-value mean/std, a known interpolation and
crop mode, a known architecture, label lists matching the classifier), or raises one
``WeightsError`` line naming the file, the field and the reason. Unknown fields are ignored.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from .errors import WeightsError
from .model import CONFIGS
from .transforms import CROP_MODES, INTERPOLATIONS

MAX_CONFIG_BYTES = 16 * 2**20
# Image sides a checkpoint may ask for (timm's pretrained configs span 96..1024). With MIN_CROP_PCT and
# transforms.MAX_RESIZE_AREA_FACTOR this bounds the resize before the crop to 64 MiB an image.
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 16, 1024
# Lower bound so the resize before the crop (side / crop_pct) stays within 2 * MAX_IMAGE_SIDE.
MIN_CROP_PCT = 0.5
MAX_LABEL_CHARS = 1000
MAX_CLASSES = 1_000_000
# Informational pretrained_cfg fields kept when they are short strings; everything else unknown is dropped.
_INFO_STRINGS = ("tag", "license", "hf_hub_id", "url", "first_conv", "classifier")
_PREPROCESSING = ("input_size", "test_input_size", "crop_pct", "test_crop_pct", "crop_mode",
                  "interpolation", "mean", "std")

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 5
_repr.maxlevel = 2


def short_repr(value: Any) -> str:
    """A bounded, single-line repr of an untrusted value, for error messages."""
    return _repr.repr(value)


class _Invalid(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field} {reason}")


def validate_config(config: dict[str, Any], source: str, num_classes: int | None = None) -> dict[str, Any]:
    """The checked config.json, cleaned to the fields used; WeightsError naming the field otherwise.

    num_classes: the classifier width of the weights (rows of head.fc.weight), when they hold one.
    """
    if not isinstance(config, dict):
        raise WeightsError(f"{source}: expected a JSON object, got {type(config).__name__}")
    try:
        return _clean_config(config, num_classes)
    except _Invalid as exc:
        raise WeightsError(f"{source}: {exc}") from None


def _clean_config(config: dict[str, Any], width: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "architecture" in config:
        out["architecture"] = _architecture(config["architecture"])
    if "num_classes" in config:
        out["num_classes"] = n = _integer(config["num_classes"], "num_classes", 0, MAX_CLASSES)
        if width is not None and n != width:
            raise _Invalid("num_classes", f"is {n} but the classifier in the weights has {width} classes")
        width = n if width is None else width
    if "pretrained_cfg" in config:
        raw, prefix = config["pretrained_cfg"], "pretrained_cfg."
        if not isinstance(raw, dict):
            raise _Invalid("pretrained_cfg", f"must be a JSON object, got {type(raw).__name__}")
    else:  # timm's legacy layout: one flat object holding the preprocessing fields
        raw, prefix = config, ""
    pretrained_cfg = _clean_pretrained_cfg(raw, prefix)
    if pretrained_cfg or "pretrained_cfg" in config:
        out["pretrained_cfg"] = pretrained_cfg
    for key in ("label_names", "label_descriptions"):
        field, value = (key, config[key]) if key in config else (prefix + key, raw.get(key))
        if value:
            out[key] = _labels(value, field, width) if key == "label_names" else _descriptions(value, field, width)
    return out


def _architecture(value: Any) -> str:
    """The base architecture name ("eca_nfnet_l0.ra2_in1k" -> "eca_nfnet_l0")."""
    base = value.split(".")[0] if isinstance(value, str) else None
    if base not in CONFIGS:
        raise _Invalid("architecture", f"must name one of {', '.join(CONFIGS)} (a '.tag' suffix is allowed), "
                                       f"got {short_repr(value)}")
    return base


def _clean_pretrained_cfg(raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("input_size", "test_input_size", "min_input_size"):  # only input_size may not be null
        if raw.get(key) is not None or (key == "input_size" and key in raw):
            out[key] = _input_size(raw[key], prefix + key)
    for key in ("crop_pct", "test_crop_pct"):
        if raw.get(key) is not None:
            out[key] = _crop_pct(raw[key], prefix + key)
    # An explicit base value without its test_* value means "test like that" (timm), not the model default.
    for base, test in (("input_size", "test_input_size"), ("crop_pct", "test_crop_pct")):
        if base in out and test not in out:
            out[test] = out[base]
    if "interpolation" in raw:
        out["interpolation"] = _choice(raw["interpolation"], prefix + "interpolation", INTERPOLATIONS)
    if raw.get("crop_mode") is not None:
        out["crop_mode"] = _choice(raw["crop_mode"], prefix + "crop_mode", CROP_MODES)
    for key in ("mean", "std"):
        if key in raw:
            out[key] = _triple(raw[key], prefix + key, positive=key == "std")
    if raw.get("num_classes") is not None:
        out["num_classes"] = _integer(raw["num_classes"], prefix + "num_classes", 0, MAX_CLASSES)
    out.update(_informational(raw))
    return out


def _informational(raw: dict[str, Any]) -> dict[str, Any]:
    """Descriptive fields nothing computes with: kept when well-formed, otherwise silently dropped."""
    out = {k: raw[k] for k in _INFO_STRINGS if isinstance(raw.get(k), str) and len(raw[k]) <= MAX_LABEL_CHARS}
    if isinstance(raw.get("fixed_input_size"), bool):
        out["fixed_input_size"] = raw["fixed_input_size"]
    pool = raw.get("pool_size")
    if isinstance(pool, list) and len(pool) == 2 and all(_is_int(v) and 0 < v <= MAX_IMAGE_SIDE for v in pool):
        out["pool_size"] = list(pool)
    return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any, field: str, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise _Invalid(field, f"must be an integer from {low} to {high:,}, got {short_repr(value)}")
    return value


def _input_size(value: Any, field: str) -> list[int]:
    ok = (isinstance(value, (list, tuple)) and len(value) == 3 and _is_int(value[0]) and value[0] == 3
          and all(_is_int(v) and MIN_IMAGE_SIDE <= v <= MAX_IMAGE_SIDE for v in value[1:]))
    if not ok:
        raise _Invalid(field, f"must be [3, H, W] with H and W integers from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE}, "
                              f"got {short_repr(value)}")
    return [3, value[1], value[2]]


def _crop_pct(value: Any, field: str) -> float:
    if not _is_number(value) or not MIN_CROP_PCT <= value <= 1:
        raise _Invalid(field, f"must be a number from {MIN_CROP_PCT} to 1, got {short_repr(value)}")
    return float(value)


def _choice(value: Any, field: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _Invalid(field, f"must be one of {', '.join(allowed)}, got {short_repr(value)}")
    return value


def _triple(value: Any, field: str, positive: bool) -> list[float]:
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_number(v) for v in value)
    if not ok or (positive and min(value) <= 0):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise _Invalid(field, f"must be 3 {kind} (one per RGB channel), got {short_repr(value)}")
    return [float(v) for v in value]


def _label_text(value: Any, field: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_LABEL_CHARS:
        raise _Invalid(field, f"must hold strings of at most {MAX_LABEL_CHARS} characters, got {short_repr(value)}")
    return value


def _labels(value: Any, field: str, width: int | None) -> list[str]:
    """A list of class names; timm's {index: name} form (gaps allowed) becomes a list."""
    if isinstance(value, dict):
        value = _indexed(value, field, width)
    if not isinstance(value, (list, tuple)):
        raise _Invalid(field, f"must be a list of strings, got {type(value).__name__}")
    names = [_label_text(v, field) for v in value]
    if width is not None and len(names) != width:
        raise _Invalid(field, f"has {len(names)} entries but the classifier has {width} classes")
    return names


def _indexed(value: dict[Any, Any], field: str, width: int | None) -> list[Any]:
    indices = [int(k) if isinstance(k, str) and k.isascii() and k.isdigit() and len(k) < 8 else -1 for k in value]
    size = width if width is not None else min(max(indices, default=-1) + 1, MAX_CLASSES)
    if not all(0 <= i < size for i in indices):
        bad = next(k for k, i in zip(value, indices) if not 0 <= i < size)
        raise _Invalid(field, f"keys must be class indices below {size}, got {short_repr(bad)}")
    names: list[Any] = [str(i) for i in range(size)]
    for i, name in zip(indices, value.values()):
        names[i] = name
    return names


def _descriptions(value: Any, field: str, width: int | None) -> dict[str, str] | list[str]:
    """timm writes {label name: description}; a plain list per class is accepted too."""
    if isinstance(value, (list, tuple)):
        return _labels(value, field, width)
    if not isinstance(value, dict) or len(value) > MAX_CLASSES:
        raise _Invalid(field, f"must map label names to descriptions, got {type(value).__name__}")
    return {_label_text(k, field): _label_text(v, field) for k, v in value.items()}
