"""Checkpoint metadata: a typed, frozen :class:`PretrainedCfg`, checked where it enters (nothing in it is trusted).

:func:`validate_config` turns an untrusted hub ``config.json`` into a cleaned copy holding only the
fields the package uses, each checked (image sizes [C, H, W] in a bounded range, crop_pct, mean/std of one
value or one per channel, a known interpolation, crop mode, global pool and architecture, label lists
matching the classifier), or
raises one ``WeightsError`` line naming the file, the field and the reason. Unknown fields are ignored.
:class:`PretrainedCfg` is what a model carries: built from such a config (or timm's pretrained_cfg
dict), it re-checks every value it is given, reads like timm's ``pretrained_cfg`` dict, knows its
evaluation settings and labels, and writes the timm-compatible ``config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator

from .choices import ARCHITECTURES, CROP_MODES, INTERPOLATIONS
from .errors import WeightsError
from .labels import label_names_for

MAX_CONFIG_BYTES = 16 * 2**20
# Image sides a checkpoint may ask for (timm's pretrained configs span 96..1024). With MIN_CROP_PCT and
# transforms.MAX_RESIZE_AREA_FACTOR this bounds the resize before the crop to 64 MiB an image.
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 16, 1024
# Input channels a model may take (3: RGB; 1: grayscale; more: multispectral), first value of input_size.
MAX_IN_CHANS = 64
# Global pooling of the classifier head, as timm names them (catavgmax concatenates avg and max: twice as wide).
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax")
# Lower bound so the resize before the crop (side / crop_pct) stays within 2 * MAX_IMAGE_SIDE.
MIN_CROP_PCT = 0.5
MAX_LABEL_CHARS = 1000
MAX_CLASSES = 1_000_000
# Informational pretrained_cfg fields kept when they are short strings; everything else unknown is dropped.
_INFO_STRINGS = ("tag", "license", "hf_hub_id", "url", "first_conv", "classifier")
_PREPROCESSING = ("input_size", "test_input_size", "crop_pct", "test_crop_pct", "crop_mode",
                  "interpolation", "mean", "std")
_LABEL_KEYS = ("label_names", "label_descriptions")

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 5
_repr.maxlevel = 2


def short_repr(value: Any) -> str:
    """A bounded, single-line repr of an untrusted value, for error messages."""
    return _repr.repr(value)


class _Invalid(ValueError):
    """One field of the metadata is wrong: "FIELD REASON"."""

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
    pool = _global_pool(config)
    if pool is not None:
        out["global_pool"] = pool
    width = _class_count(out, width)
    for key in _LABEL_KEYS:
        name, value = (key, config[key]) if key in config else (prefix + key, raw.get(key))
        if value:
            out[key] = _labels(value, name, width) if key == "label_names" else _descriptions(value, name, width)
    return out


def _class_count(clean: Mapping[str, Any], weights_width: int | None) -> int | None:
    """The classes a checked config describes: its num_classes, else the weights', else pretrained_cfg's, else its labels'."""
    for width in (clean.get("num_classes"), weights_width, (clean.get("pretrained_cfg") or {}).get("num_classes")):
        if width is not None:
            return width
    names = clean.get("label_names") or (clean.get("pretrained_cfg") or {}).get("label_names")
    return len(names) if names else None


def _global_pool(config: dict[str, Any]) -> str | None:
    """The head's pooling: model_args.global_pool (what timm builds with), else the top-level one; both checked."""
    args = config.get("model_args")
    top = _pool_name(config["global_pool"], "global_pool") if config.get("global_pool") is not None else None
    if isinstance(args, dict) and args.get("global_pool") is not None:
        return _pool_name(args["global_pool"], "model_args.global_pool")
    return top


def _pool_name(value: Any, field: str) -> str:
    """A GLOBAL_POOLS name; timm's 'fast' spellings of the same pooling ("fast", "fastavgmax", ...) included."""
    name = value.lower() if isinstance(value, str) else None
    if name is not None and name.startswith("fast"):
        name = name[len("fast"):] or "avg"
    if name not in GLOBAL_POOLS:
        raise _Invalid(field, f"must be one of {', '.join(GLOBAL_POOLS)}, got {short_repr(value)}")
    return name


def _architecture(value: Any) -> str:
    """The base architecture name ("eca_nfnet_l0.ra2_in1k" -> "eca_nfnet_l0")."""
    base = value.split(".")[0] if isinstance(value, str) else None
    if base not in ARCHITECTURES:
        raise _Invalid("architecture", f"must name one of {', '.join(ARCHITECTURES)} (a '.tag' suffix is allowed), "
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
            out[key] = _per_channel(raw[key], prefix + key, positive=key == "std")
    _check_channels(out, prefix)
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
    if isinstance(pool, (list, tuple)) and len(pool) == 2 and all(_is_int(v) and 0 < v <= MAX_IMAGE_SIDE for v in pool):
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
    ok = (isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v) for v in value)
          and 1 <= value[0] <= MAX_IN_CHANS and all(MIN_IMAGE_SIDE <= v <= MAX_IMAGE_SIDE for v in value[1:]))
    if not ok:
        raise _Invalid(field, f"must be [C, H, W] with C from 1 to {MAX_IN_CHANS} (input channels) and H and W "
                              f"integers from {MIN_IMAGE_SIDE} to {MAX_IMAGE_SIDE}, got {short_repr(value)}")
    return [value[0], value[1], value[2]]


def _crop_pct(value: Any, field: str) -> float:
    if not _is_number(value) or not MIN_CROP_PCT <= value <= 1:
        raise _Invalid(field, f"must be a number from {MIN_CROP_PCT} to 1, got {short_repr(value)}")
    return float(value)


def _choice(value: Any, field: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _Invalid(field, f"must be one of {', '.join(allowed)}, got {short_repr(value)}")
    return value


def _per_channel(value: Any, field: str, positive: bool) -> list[float]:
    ok = (isinstance(value, (list, tuple)) and 1 <= len(value) <= MAX_IN_CHANS and all(_is_number(v) for v in value))
    if not ok or (positive and min(value) <= 0):
        kind = "positive finite numbers" if positive else "finite numbers"
        raise _Invalid(field, f"must be {kind}, one per input channel (3 for RGB) or one for all, "
                              f"got {short_repr(value)}")
    return [float(v) for v in value]


def _check_channels(values: Mapping[str, Any], prefix: str) -> None:
    """The image sizes given name one channel count C, and mean and std hold one value or C (timm's rule)."""
    sizes = [k for k in ("input_size", "test_input_size", "min_input_size") if values.get(k) is not None]
    if not sizes:
        return
    first, channels = sizes[0], values[sizes[0]][0]
    for key in sizes[1:]:
        if values[key][0] != channels:
            raise _Invalid(prefix + first, f"has C={channels} but {prefix}{key} has C={values[key][0]}; the "
                                           f"channel counts must match")
    for key in ("mean", "std"):
        if values.get(key) is not None and len(values[key]) not in (1, channels):
            raise _Invalid(prefix + key, f"has {len(values[key])} values but {prefix}{first} has C={channels}; "
                                         f"give one value per channel, or one for all")


def adapted_to_channels(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    """mean or std, one value per channel: kept when it has one per channel, else one value (or, as timm resolves
    a mismatch, their average) for every channel."""
    values = tuple(values)
    if len(values) == channels:
        return values
    return (values[0] if len(set(values)) == 1 else sum(values) / len(values),) * channels


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


# ---------------------------------------------------------------- the typed object a model carries

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# What the ra2_in1k checkpoints record besides preprocessing (SPEC, hub layout).
_DEFAULT_INFO = {"pool_size": (7, 7), "first_conv": "stem.conv1", "classifier": "head.fc", "license": "apache-2.0"}


@dataclass(frozen=True, eq=False)
class PretrainedCfg(Mapping):
    """Typed, frozen checkpoint metadata: preprocessing, classes and labels; reads like timm's pretrained_cfg dict.

    Defaults are the published ra2_in1k checkpoints' (SPEC). Every value is checked on construction, so
    ``replace`` cannot make an invalid one either. As a Mapping it holds the set fields in their JSON
    form (lists), so ``cfg["input_size"] == [3, 224, 224]`` as with a timm model.
    """

    input_size: tuple[int, int, int] = (3, 224, 224)
    test_input_size: tuple[int, int, int] | None = (3, 288, 288)  # None: as input_size (so for test_crop_pct)
    interpolation: str = "bicubic"
    crop_pct: float = 0.9
    test_crop_pct: float | None = 1.0
    crop_mode: str = "center"
    mean: tuple[float, ...] = IMAGENET_MEAN  # one per input channel (a single value given is spread over them)
    std: tuple[float, ...] = IMAGENET_STD
    num_classes: int = 1000
    min_input_size: tuple[int, int, int] | None = None
    label_names: tuple[str, ...] | None = field(default=None, repr=False)
    label_descriptions: Mapping[str, str] | tuple[str, ...] | None = field(default=None, repr=False)
    # Descriptive fields nothing computes with (pool_size, first_conv, classifier, license, tag, hf_hub_id, ...).
    info: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType(dict(_DEFAULT_INFO)))

    def __post_init__(self) -> None:
        checked = _checked_fields(self)
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    # -- construction
    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str, *, num_classes: int | None = None) -> PretrainedCfg:
        """From a hub config.json (nested or timm's legacy flat layout), checked; num_classes: the weights' width."""
        clean = validate_config(dict(config), source, num_classes)
        return cls.from_validated(clean, source, num_classes=num_classes)

    @classmethod
    def from_validated(cls, clean: Mapping[str, Any], source: str, *, num_classes: int | None = None) -> PretrainedCfg:
        """From validate_config's output for source (a file, named in errors); num_classes: the weights' width."""
        values: dict[str, Any] = dict(clean.get("pretrained_cfg") or {})
        values.update({k: clean[k] for k in _LABEL_KEYS if k in clean})
        width = _class_count(clean, num_classes)
        if width is not None:
            values["num_classes"] = width
        try:
            return cls.from_dict(values)
        except _Invalid as exc:
            raise WeightsError(f"{source}: {exc}") from None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainedCfg:
        """From a pretrained_cfg-style dict (ours or timm's): checked, missing fields default, unknown ones dropped.

        As in timm, an input_size or crop_pct without its test_* value means "test like that".
        """
        if isinstance(values, PretrainedCfg):
            return values
        clean = _clean_pretrained_cfg(dict(values), "")
        channels = next((clean[k][0] for k in ("input_size", "test_input_size", "min_input_size") if k in clean), 3)
        for key, default in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            clean.setdefault(key, adapted_to_channels(default, channels))
        known = {f.name for f in dataclasses.fields(cls)}
        typed = {k: v for k, v in clean.items() if k in known}
        info = {**_DEFAULT_INFO, **{k: v for k, v in clean.items() if k not in known}}
        return cls(**typed, **{k: values[k] for k in _LABEL_KEYS if values.get(k)}, info=info)

    def replace(self, **changes: Any) -> PretrainedCfg:
        """A copy with some fields changed (checked like any other)."""
        return dataclasses.replace(self, **changes)

    def with_classes(self, num_classes: int) -> PretrainedCfg:
        """The metadata of a new classifier of num_classes: the labels, which were the old classifier's, are dropped."""
        return self.replace(num_classes=num_classes, label_names=None, label_descriptions=None)

    @property
    def in_chans(self) -> int:
        """Input channels the model takes (the first value of input_size; 3 for RGB)."""
        return self.input_size[0]

    def with_in_chans(self, in_chans: int) -> PretrainedCfg:
        """The metadata of the same model taking in_chans input channels: sizes [in_chans, H, W], mean/std adapted.

        mean and std are kept when they hold one value per channel, else replaced by their average (as timm resolves
        them, e.g. 0.449 / 0.226 for one channel).
        """
        if in_chans == self.in_chans:
            return self
        sizes = {k: None if getattr(self, k) is None else (in_chans, *getattr(self, k)[1:])
                 for k in ("input_size", "test_input_size", "min_input_size")}
        return self.replace(**sizes, mean=adapted_to_channels(self.mean, in_chans),
                            std=adapted_to_channels(self.std, in_chans))

    def as_trained_at(self, image_size: int) -> PretrainedCfg:
        """The test-time settings of a model trained at image_size: that size, the whole image (no centre crop)."""
        size = (self.in_chans, image_size, image_size)
        return self.replace(input_size=size, test_input_size=size, crop_pct=1.0, test_crop_pct=1.0)

    # -- what callers need from it
    def eval_settings(self) -> dict[str, Any]:
        """Test-time RGB preprocessing (test_input_size/test_crop_pct when given); image_size is (height, width).

        WeightsError for a model of other than 3 input channels: the image pipeline reads RGB only.
        """
        if self.in_chans != 3:
            raise WeightsError(f"the model takes {self.in_chans}-channel input (input_size {list(self.input_size)}); "
                               f"predict, evaluate, embed, serve and export preprocess RGB images only: feed such "
                               f"a model tensors of your own (model(x) with x of shape (B, {self.in_chans}, H, W))")
        size = self.test_input_size or self.input_size
        return {
            "image_size": (size[1], size[2]),
            "crop_pct": self.test_crop_pct or self.crop_pct,
            "crop_mode": self.crop_mode,
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
        }

    def readable_labels(self) -> list[str]:
        """One readable label per class: the checkpoint's (WordNet ids shown as words), ImageNet's, or the indices."""
        return label_names_for(self, self.num_classes)

    def to_config(self, *, architecture: str, num_features: int, global_pool: str = "avg") -> dict[str, Any]:
        """The hub ``config.json`` (timm's layout): architecture, classes, pretrained_cfg and labels.

        A model other than timm's default (in_chans 3, global_pool avg) also gets the model_args timm rebuilds it by.
        """
        pool = _pool_name(global_pool, "global_pool")
        config: dict[str, Any] = {
            "architecture": architecture,
            "num_classes": self.num_classes,
            "num_features": num_features,
            "global_pool": pool,
            "pretrained_cfg": {k: v for k, v in self.items() if k not in _LABEL_KEYS},
        }
        if self.in_chans != 3 or pool != "avg":
            config["model_args"] = {"in_chans": self.in_chans, "global_pool": pool}
        config.update({k: self[k] for k in _LABEL_KEYS if k in self})
        return config

    def __eq__(self, other: object) -> bool:
        """Equal to another PretrainedCfg or a dict holding the same values (as timm's dict compares)."""
        return dict(self) == dict(other) if isinstance(other, Mapping) else NotImplemented

    __hash__ = None  # type: ignore[assignment]  # like a dict: equal to dicts, so not hashable

    # -- immutable: copies are the object itself; pickling rebuilds (and re-checks) it from plain values
    def __copy__(self) -> PretrainedCfg:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> PretrainedCfg:
        return self

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        plain = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return _rebuild, ({k: dict(v) if isinstance(v, Mapping) else v for k, v in plain.items()},)

    # -- the read-only dict view
    def _as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "info":
                out.update({k: _json_value(v) for k, v in value.items()})
            elif value is not None:
                out[f.name] = _json_value(value)
        return out

    def __getitem__(self, key: str) -> Any:
        return self._as_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._as_json())

    def __len__(self) -> int:
        return len(self._as_json())


def _rebuild(fields: dict[str, Any]) -> PretrainedCfg:
    """PretrainedCfg from its fields (how a pickled one is restored)."""
    return PretrainedCfg(**fields)


def _json_value(value: Any) -> Any:
    """A field as JSON holds it: tuples as lists, mappings as dicts."""
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _checked_fields(cfg: PretrainedCfg) -> dict[str, Any]:
    """Every field of cfg checked and in its stored form (tuples, read-only mappings); _Invalid names the bad one."""
    n = _integer(cfg.num_classes, "num_classes", 0, MAX_CLASSES)
    optional_size = {k: getattr(cfg, k) for k in ("test_input_size", "min_input_size")}
    out: dict[str, Any] = {
        "num_classes": n,
        "input_size": tuple(_input_size(cfg.input_size, "input_size")),
        **{k: None if v is None else tuple(_input_size(v, k)) for k, v in optional_size.items()},
        "crop_pct": _crop_pct(cfg.crop_pct, "crop_pct"),
        "test_crop_pct": None if cfg.test_crop_pct is None else _crop_pct(cfg.test_crop_pct, "test_crop_pct"),
    }
    # None means "test like training" (timm); stored resolved, so equal settings compare equal.
    out["test_input_size"] = out["test_input_size"] or out["input_size"]
    out["test_crop_pct"] = out["test_crop_pct"] or out["crop_pct"]
    out.update({
        "interpolation": _choice(cfg.interpolation, "interpolation", INTERPOLATIONS),
        "crop_mode": _choice(cfg.crop_mode, "crop_mode", CROP_MODES),
        "mean": tuple(_per_channel(cfg.mean, "mean", positive=False)),
        "std": tuple(_per_channel(cfg.std, "std", positive=True)),
        "label_names": None if not cfg.label_names else tuple(_labels(cfg.label_names, "label_names", n)),
        "label_descriptions": _frozen_descriptions(cfg.label_descriptions, n),
        "info": MappingProxyType(_checked_info(cfg.info)),
    })
    _check_channels(out, "")
    # one value stands for every channel (timm); stored spread, so every reader gets one per channel
    out["mean"], out["std"] = (adapted_to_channels(out[k], out["input_size"][0]) for k in ("mean", "std"))
    return out


def _frozen_descriptions(value: Any, width: int) -> Mapping[str, str] | tuple[str, ...] | None:
    if not value:
        return None
    clean = _descriptions(dict(value) if isinstance(value, Mapping) else value, "label_descriptions", width)
    return MappingProxyType(clean) if isinstance(clean, dict) else tuple(clean)


def _checked_info(info: Any) -> dict[str, Any]:
    """The informational fields, as tuples where they are lists; an ill-formed one is refused."""
    if not isinstance(info, Mapping):
        raise _Invalid("info", f"must be a mapping, got {type(info).__name__}")
    kept = _informational(info)
    if set(kept) != set(info):
        bad = next(k for k in info if k not in kept)
        raise _Invalid(str(bad), f"is not a known informational field of the right form, got {short_repr(info[bad])}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kept.items()}
